"""The OpenRLHF backend on CPU: the LoRA merge sent to vLLM, and the real controller loop + OpenRLHFBackend driving
real Ray actors (real RayActorGroup dispatch, real DittoPolicyActor / ReferenceModelActor methods on OpenRLHF's
`Actor`) through two iterations.

Stand-ins, only where the real thing cannot run without a GPU:
  - DeepSpeed: `CPUStrategy` does what the engine does for a step (loss / accumulation steps, gradients averaged
    over the ranks with gloo at the boundary, clip, step) and writes per-rank checkpoint files;
  - vLLM: `CPUEngine` answers the engine methods the backend calls (wake_up, sleep, generate) with the local sampler
    and loads synced weights with `load_state_dict(strict=True)`;
  - NCCL / CUDA IPC weight sync: the CPU policy sends `merge_lora_for_sync`'s tensors to the engines through Ray;
  - flash-attn's Triton cross-entropy (OpenRLHF's log-probs) and `torch.cuda.current_device()`: plain torch on CPU.
Ray itself runs with logical GPUs, so the groups are placed exactly as on a cluster.
"""

import json
import os
from collections import Counter
from types import SimpleNamespace

os.environ.setdefault("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")  # flash-attn without CUDA kernels (CPU install)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ob = pytest.importorskip("openrlhf_ditto.backends.openrlhf")

import openrlhf.models.actor  # noqa: E402
import ray  # noqa: E402
from openrlhf.models import Actor  # noqa: E402
from openrlhf.trainer.ray.launcher import RayActorGroup, ReferenceModelActor  # noqa: E402

from openrlhf_ditto.backends.sampling import sample_responses  # noqa: E402
from openrlhf_ditto.cli.args import hierarchize, validate  # noqa: E402
from openrlhf_ditto.cli.train_ditto_ray import build_parser  # noqa: E402
from openrlhf_ditto.store import SampleStore  # noqa: E402
from openrlhf_ditto.trainer import train  # noqa: E402


def _log_probs_from_logits(logits, labels, temperature=1.0):
    return logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


openrlhf.models.actor.log_probs_from_logits = _log_probs_from_logits  # CPU stand-in for flash-attn's Triton kernel


def lora_model(path, rank=4, alpha=8):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, config)


def test_merge_lora_for_sync(tiny_model_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = lora_model(tiny_model_path)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter (peft starts B at zero)
    merged = dict(ob.merge_lora_for_sync(model, torch.bfloat16))

    base_names = set(AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict())
    assert set(merged) == base_names, "the sync must send exactly the base model's weights, under their names"
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    scale = 8 / 4  # alpha / r
    expected = layer.base_layer.weight.float() + scale * layer.lora_B.default.weight @ layer.lora_A.default.weight
    assert torch.equal(merged["model.layers.1.self_attn.v_proj.weight"], expected.to(torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    norm = model.base_model.model.model.norm.weight
    assert torch.equal(merged["model.norm.weight"], norm.to(torch.bfloat16))
    # the same weights as peft's own merge
    reference = model.merge_and_unload().state_dict()
    for name, t in merged.items():
        torch.testing.assert_close(t.float(), reference[name].float(), atol=2e-2, rtol=1e-2)


# --- Ray stand-ins -------------------------------------------------------------------------------------------------


def record(event: str, **data) -> None:
    ray.get(ray.get_actor("recorder").log.remote(event, data))


@ray.remote(num_cpus=0)
class Recorder:
    def __init__(self):
        self.events = []

    def log(self, event, data):
        self.events.append((event, data))

    def get(self):
        return self.events


class CPUStrategy:
    """The DeepspeedStrategy calls DittoPolicyActor makes, done as a DeepSpeed engine does them, on CPU."""

    def __init__(self, args, owner, world_size):
        self.args, self.owner, self.world_size = args, owner, world_size
        self.accumulated_gradient = args.train.batch_size // (args.train.micro_batch_size * world_size)
        self.micro_steps = 0
        self.grad_norm = 0.0

    def backward(self, loss, model, optimizer):
        (loss / self.accumulated_gradient).backward()

    def optimizer_step(self, optimizer, model, scheduler, name="model"):
        self.micro_steps += 1
        if self.micro_steps % self.accumulated_gradient:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= self.world_size
        self.grad_norm = torch.nn.utils.clip_grad_norm_(params, self.args.actor.max_norm).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    def get_grad_norm(self, model):
        return self.grad_norm

    def _state(self):
        o = self.owner
        trainable = {n: p.detach().clone() for n, p in o.actor.named_parameters() if p.requires_grad}
        return {
            "trainable": trainable,
            "optimizer": o.actor_optim.state_dict(),
            "scheduler": o.actor_scheduler.state_dict(),
        }

    def save_ckpt(self, model, save_dir):
        torch.save(self._state(), os.path.join(save_dir, f"rank{dist.get_rank()}.pt"))
        record("policy.save_checkpoint", rank=dist.get_rank(), folder=save_dir)

    def load_ckpt(self, model, load_dir):
        path = os.path.join(load_dir, f"rank{dist.get_rank()}.pt")
        if not os.path.exists(path):
            return None, {}
        state = torch.load(path, weights_only=False)
        self.owner.actor.load_state_dict(state["trainable"], strict=False)
        self.owner.actor_optim.load_state_dict(state["optimizer"])
        self.owner.actor_scheduler.load_state_dict(state["scheduler"])
        return path, {}

    def save_model(self, model, tokenizer, output_dir):
        if dist.get_rank() == 0:
            model.model.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
        dist.barrier()

    def is_rank_0(self):
        return dist.get_rank() == 0


def cpu_actor(strategy, pretrain, **lora) -> Actor:
    torch.cuda.current_device = lambda: "cpu"  # the roles put their tensors there
    a = strategy.args
    return Actor(pretrain, attn_implementation="eager", param_dtype=a.ds.param_dtype, **lora)


@ray.remote(num_gpus=1)
class CPUPolicyActor(ob.DittoPolicyActor.__ray_actor_class__):
    """DittoPolicyActor with its DeepSpeed / NCCL set-up replaced; ditto_train_step and the checkpoint and save
    methods are the real ones."""

    def init_model_from_pretrained(self, strategy, pretrain, max_steps=None, vllm_engines=None):
        from transformers import AutoTokenizer, get_scheduler

        dist.init_process_group("gloo", rank=self._rank, world_size=self._world_size)
        a = strategy.args
        torch.manual_seed(a.train.seed)
        lora = a.ds.lora
        self.actor = cpu_actor(
            strategy,
            pretrain,
            lora_rank=lora.rank,
            lora_alpha=lora.alpha,
            target_modules=lora.target_modules,
            lora_dropout=lora.dropout,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(pretrain)
        params = [p for p in self.actor.parameters() if p.requires_grad]
        self.actor_optim = torch.optim.AdamW(
            params, lr=a.actor.adam.lr, betas=a.actor.adam.betas, eps=a.actor.adam.eps
        )
        self.actor_scheduler = get_scheduler(a.actor.lr_scheduler, self.actor_optim, 0, max_steps)
        self.strategy = CPUStrategy(a, self, self._world_size)
        self.vllm_engines = vllm_engines
        record(
            "policy.init", rank=self._rank, pretrain=pretrain, max_steps=max_steps, temperature=a.rollout.temperature
        )

    def broadcast_to_vllm(self):
        if dist.get_rank() == 0:
            weights = {n: t.clone() for n, t in ob.merge_lora_for_sync(self.actor.model, torch.float32)}
            ray.get([e.load_weights.remote(weights) for e in self.vllm_engines])
            record("policy.sync")
        dist.barrier()

    def ditto_train_step(self, batch, total_pairs):
        record("policy.train_step", rank=dist.get_rank(), pairs=len(batch.kinds), total_pairs=total_pairs)
        return super().ditto_train_step(batch, total_pairs)

    def offload_states(self):
        record("policy.offload", rank=dist.get_rank())

    def reload_states(self):
        record("policy.reload", rank=dist.get_rank())


@ray.remote(num_gpus=1)
class CPUReferenceActor(ReferenceModelActor.__ray_actor_class__):
    """ReferenceModelActor with a CPU model instead of a DeepSpeed engine; forward is the real one."""

    def init_model_from_pretrained(self, strategy, pretrain):
        self.strategy = strategy
        self.model = cpu_actor(strategy, pretrain).eval()
        record("reference.init", rank=self._rank, pretrain=pretrain)

    def forward(self, sequences, action_mask=None, attention_mask=None, **kwargs):
        rows = [tuple(s[m.bool()].tolist()) for s, m in zip(sequences, attention_mask)]
        record("reference.forward", rank=self._rank, rows=rows)
        return super().forward(sequences, action_mask, attention_mask, **kwargs)


@ray.remote(num_cpus=0)
class CPUEngine:
    """The vLLM RolloutRayActor methods the backend calls, on the tiny model with the local sampler."""

    def __init__(self, pretrain):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(pretrain).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(pretrain)

    def load_weights(self, weights):
        self.model.load_state_dict(weights, strict=True)  # every synced name is a base-model weight, none missing
        record("engine.load_weights", checksum=sum(t.double().sum().item() for t in weights.values()))

    def wake_up(self, tags=None):
        record("engine.wake_up", tags=tags)

    def sleep(self, level=1):
        record("engine.sleep")

    def generate(self, prompt_token_ids, sampling_params):
        record("engine.generate", n=sampling_params.n, max_tokens=sampling_params.max_tokens)
        t = self.tokenizer
        [samples] = sample_responses(
            self.model,
            [torch.tensor(prompt_token_ids)],
            sampling_params.n,
            t.pad_token_id,
            [t.eos_token_id],
            sampling_params.max_tokens,
            sampling_params.temperature,
            sampling_params.top_p,
        )
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids) for ids in samples])


DEMOS = [
    {"prompt": "Tell me about errors.", "response": "Errors should never pass silently."},
    {"prompt": "What is better?", "response": "Beautiful is better than ugly."},
    {"prompt": "What is better?", "response": "Simple is better than complex."},
    {"prompt": "Namespaces?", "response": "Namespaces are one honking great idea."},
]


@pytest.fixture(scope="module")
def ray_cluster():
    # logical GPUs: Ray places the GPU roles as on a cluster; nothing here touches a real GPU
    ray.init(
        num_cpus=8,
        num_gpus=4,
        include_dashboard=False,
        runtime_env={
            "env_vars": {
                "FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE",
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.path.dirname(__file__),  # the workers import the stand-ins from this module
            }
        },
    )
    yield
    ray.shutdown()


@pytest.mark.slow
def test_controller_drives_ray_roles(ray_cluster, tiny_model_path, tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps(d) + "\n" for d in DEMOS))
    out = tmp_path / "run"
    argv = [
        "--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", str(demos),
        "--ckpt.output_dir", str(out),
        "--data.apply_chat_template", "--data.max_len", "64", "--rollout.max_new_tokens", "8",
        "--rollout.n_samples_per_prompt", "2", "--rollout.micro_batch_size", "2", "--rollout.temperature", "0.7",
        "--ditto.iterations", "2", "--ditto.resample_every", "2", "--actor.adam.lr", "1e-2",
        "--train.batch_size", "4", "--train.micro_batch_size", "1", "--ds.lora.rank", "4", "--ds.lora.alpha", "8",
        "--actor.num_gpus_per_node", "2", "--ref.num_gpus_per_node", "2", "--vllm.num_engines", "1",
        "--train.colocate_all", "--vllm.enable_sleep", "--ds.enable_sleep",
    ]  # fmt: skip
    args = hierarchize(build_parser().parse_args(argv))
    validate(args)
    recorder = Recorder.options(name="recorder").remote()
    backends = []

    def make_backend(path):
        policy = RayActorGroup(1, 2, CPUPolicyActor, num_gpus_per_actor=1)
        reference = RayActorGroup(1, 2, CPUReferenceActor, num_gpus_per_actor=1)
        backends.append(ob.OpenRLHFBackend(args, path, policy, reference, [CPUEngine.remote(str(path))]))
        return backends[-1]

    final = train(args, make_backend)
    events = ray.get(recorder.get.remote())
    names = [e for e, _ in events]

    # init: both ranks of both roles, from pi_0, log-probs at temperature 1 (vLLM samples at 0.7)
    inits = [d for e, d in events if e == "policy.init"]
    assert len(inits) == 2 and all(d["max_steps"] == 4 and d["temperature"] == 1.0 for d in inits)
    assert names.count("reference.init") == 2

    # per iteration: offload the policy's states (at init in sleep mode, later explicitly), wake the engine's
    # weights, sync, wake its KV cache, sample, sleep
    gen = [i for i, e in enumerate(names) if e == "engine.generate"]
    assert len(gen) == 2 * 3  # 2 iterations x 3 prompts
    sync = ["engine.wake_up", "engine.load_weights", "policy.sync", "engine.wake_up"]
    for first, offload in ((gen[0], []), (gen[3], ["policy.offload"] * 2)):
        before = names[:first]
        last_train = max([i for i, e in enumerate(before) if e == "policy.train_step"], default=-1)
        window = [e for e in before[last_train + 1 :] if e.startswith(("engine.", "policy."))]
        assert window[-len(offload) - 4 :] == offload + sync, window
    assert [d["tags"] for e, d in events if e == "engine.wake_up"] == [["weights"], ["kv_cache"]] * 2
    assert all(d["n"] == 2 and d["max_tokens"] == 8 for e, d in events if e == "engine.generate")
    assert names.count("engine.sleep") == 2
    checksums = [d["checksum"] for e, d in events if e == "engine.load_weights"]
    assert len(checksums) == 2 and checksums[0] != checksums[1], "the second sync carries the trained weights"

    # reference log-probs: every demo and every sample scored exactly once, rows split across the two ranks
    store = SampleStore.load(out / "store")
    expected = Counter(
        tuple(store.prompts[r.prompt].tolist() + r.ids.tolist())
        for r in store.demos + [s for it in store.iterations for group in it for s in group]
    )
    seen = Counter(row for e, d in events if e == "reference.forward" for row in d["rows"])
    assert seen == expected
    assert {d["rank"] for e, d in events if e == "reference.forward"} == {0, 1}

    # training: each step, each rank gets half of the 4 pairs; states reloaded before the first step
    steps = [d for e, d in events if e == "policy.train_step"]
    assert len(steps) == 2 * 2 * 2 and all(d["pairs"] == 2 and d["total_pairs"] <= 4 for d in steps)
    assert names.index("policy.reload") < names.index("policy.train_step")

    # a checkpoint per iteration from both ranks, between the iteration's training and the next sync
    saves = [i for i, e in enumerate(names) if e == "policy.save_checkpoint"]
    assert (
        len(saves) == 4
        and gen[3] > saves[1]
        and saves[0] > max(i for i in range(gen[3]) if names[i] == "policy.train_step")
    )
    for it in ("iter_00001", "iter_00002"):
        ranks = [torch.load(out / "checkpoints" / it / "backend" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
        for name, t in ranks[0]["trainable"].items():
            assert torch.equal(t, ranks[1]["trainable"][name]), "the ranks' averaged gradients keep them identical"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if m["prefix"] == "train"]
    assert len(train_rows) == 4 and all(m["lr"] == 1e-2 and m["grad_norm"] > 0 for m in train_rows)

    # final model: the adapter from the policy, merged into pi_0 on the driver
    assert (final / "adapter" / "adapter_config.json").exists() and (final / "config.json").exists()
    assert (out / "reference" / "config.json").exists()

    # reference_logps pads rows to a multiple of the ranks and returns one value per row
    backend = backends[0]
    batch = store_batch(store, 3)
    got = backend.reference_logps(batch)
    single = torch.cat([backend.reference_logps(store_batch(store, 1, start=i)) for i in range(3)])
    assert got.shape == (3,)
    torch.testing.assert_close(got, single, atol=0.05, rtol=0.01)


def store_batch(store, n, start=0):
    from openrlhf_ditto.pairs import collate

    demos = store.demos[start : start + n]
    return collate([store.prompts[d.prompt] for d in demos], [d.ids for d in demos], 0)
