"""The OpenRLHF backend on CPU, with OpenRLHF's real roles on the real DeepSpeed engine.

The controller loop and OpenRLHFBackend drive real Ray actors through two iterations: OpenRLHF's PolicyModelActor
(as DittoPolicyActor) and ReferenceModelActor, two ranks each, every rank with its real DeepSpeed engine (ZeRO-2 or
ZeRO-3, gloo on CPU). DeepSpeed's gradient scaling and averaging, the ZeRO-3 gathered merge for the weight sync,
offload/reload of the policy's states in sleep mode, DeepSpeed's checkpoint round trip and OpenRLHF's HF save are the
real ones. Replaced, because they run only on a GPU:
  - `cpu_patches`: torch.cuda's device calls (set_device, current_device, synchronize, current_stream), the "cuda"
    device mesh, flash-attn's Triton cross-entropy (OpenRLHF then takes its own torch path), and the PPO replay
    buffer, which DITTO never uses and which OpenRLHF builds on "cuda:N";
  - vLLM generation: `CPUEngine` answers the engine methods the backend calls with the local sampler on a bf16 copy
    of the model, and refuses a weight of another dtype as vLLM's worker does;
  - the NCCL group between policy rank 0 and the engines: `RayChannel` carries its broadcast through Ray (CUDA IPC,
    the colocated channel, cannot run without a GPU: these runs colocate with --vllm.sync_backend gloo).
Ray runs with logical GPUs, so the groups are placed as on a cluster.
"""

import hashlib
import json
import os
import shutil
from collections import Counter
from types import SimpleNamespace

os.environ.setdefault("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")  # flash-attn without CUDA kernels (CPU install)

import pytest  # noqa: E402
import torch  # noqa: E402

ob = pytest.importorskip("openrlhf_ditto.backends.openrlhf")

import ray  # noqa: E402
from openrlhf.trainer.ray.launcher import RayActorGroup, ReferenceModelActor  # noqa: E402
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from openrlhf_ditto.backends.sampling import sample_responses  # noqa: E402
from openrlhf_ditto.cli.train_ditto_ray import parse_args  # noqa: E402
from openrlhf_ditto.loss import DittoActorLoss, sequence_logps  # noqa: E402
from openrlhf_ditto.models import eos_token_ids  # noqa: E402
from openrlhf_ditto.pairs import PairSampler, collate_pairs  # noqa: E402
from openrlhf_ditto.store import SampleStore  # noqa: E402
from openrlhf_ditto.trainer import train  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_model(path, dtype=torch.float32, rank=4, alpha=8):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=ATTENTION))


def test_weights_for_sync_with_lora_sends_only_the_adapted_layers_merged(tiny_model_path):
    torch.manual_seed(0)
    model = lora_model(tiny_model_path)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter (peft starts B at zero)
    synced = dict(ob.weights_for_sync(model, torch.bfloat16))

    adapted = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ATTENTION}
    assert set(synced) == adapted, "the rest is pi_0's, which the engines already hold"
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    scale = 8 / 4  # alpha / r
    expected = layer.base_layer.weight.float() + scale * layer.lora_B.default.weight @ layer.lora_A.default.weight
    assert torch.equal(synced["model.layers.1.self_attn.v_proj.weight"], expected.to(torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in synced.values())
    merged = model.merge_and_unload().state_dict()  # the same weights as peft's own merge
    for name, t in synced.items():
        torch.testing.assert_close(t.float(), merged[name].float(), atol=2e-2, rtol=1e-2)


def test_weights_for_sync_full_parameter_fp16_sends_every_weight_in_the_engines_dtype(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float16)
    synced = dict(ob.weights_for_sync(model, torch.bfloat16))
    state = model.state_dict()
    assert set(synced) == set(state)
    for name, t in synced.items():  # vLLM's worker asserts the dtype: a fp16 policy is cast, never sent as fp16
        assert t.dtype == torch.bfloat16 and torch.equal(t, state[name].to(torch.bfloat16))


# --- the CPU stand-ins for what needs a GPU -----------------------------------------------------------------------


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

    def clear(self):
        self.events = []


def cpu_patches() -> None:
    """In a Ray worker: the CUDA-only calls of OpenRLHF's roles, made to work on CPU (see the module docstring)."""
    import sys

    import openrlhf.utils.deepspeed.deepspeed as strategy_module
    from openrlhf.trainer.ray import ppo_actor

    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: None
    sys.modules["flash_attn.ops.triton.cross_entropy"] = None  # ImportError: OpenRLHF's own log-softmax path
    mesh = strategy_module.init_device_mesh
    strategy_module.init_device_mesh = lambda device, *a, **k: mesh("cpu", *a, **k)
    ppo_actor.NaiveReplayBuffer = lambda *a, **k: None

    def sync_group(trainer, backend):  # ActorPPOTrainer._init_vllm_sync_group, on rank 0: NCCL with the engines
        trainer._model_update_group = RayChannel(trainer.vllm_engines)

    ppo_actor.ActorPPOTrainer._init_vllm_sync_group = sync_group


class RayChannel:
    """The NCCL group's broadcast from policy rank 0: each engine receives the tensor its update_weight announced."""

    def __init__(self, engines):
        self.engines = engines

    def broadcast(self, tensor, src, stream=None):
        ray.get([e.receive.remote(tensor.clone()) for e in self.engines])


@ray.remote(num_gpus=1)
class CPUPolicyActor(ob.DittoPolicyActor.__ray_actor_class__):
    """DittoPolicyActor (real), recording what it is asked to do."""

    def init_model_from_pretrained(self, strategy, pretrain, max_steps=None, vllm_engines=None):
        cpu_patches()
        a = strategy.args
        record("policy.init", rank=self._rank, pretrain=pretrain, max_steps=max_steps, cwd=os.getcwd())
        super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        record("policy.ready", rank=self._rank, temperature=self.actor.temperature, zero=a.ds.zero_stage)

    def ditto_train_step(self, batch, total_pairs):
        out = super().ditto_train_step(batch, total_pairs)
        record("policy.train_step", rank=self._rank, pairs=len(batch.kinds), total_pairs=total_pairs)
        return out

    def broadcast_to_vllm(self):
        record("policy.sync", rank=self._rank)
        super().broadcast_to_vllm()

    def offload_states(self):
        record("policy.offload", rank=self._rank)
        super().offload_states()

    def reload_states(self):
        record("policy.reload", rank=self._rank)
        super().reload_states()


@ray.remote(num_gpus=1)
class CPUReferenceActor(ReferenceModelActor.__ray_actor_class__):
    """OpenRLHF's ReferenceModelActor (real), recording the rows it scores and its cache releases."""

    def init_model_from_pretrained(self, strategy, pretrain):
        cpu_patches()
        super().init_model_from_pretrained(strategy, pretrain)

    def forward(self, sequences, action_mask=None, attention_mask=None, **kwargs):
        rows = [tuple(s[m.bool()].tolist()) for s, m in zip(sequences, attention_mask)]
        record("reference.forward", rank=self._rank, rows=rows)
        return super().forward(sequences, action_mask, attention_mask, **kwargs)

    def empty_cache(self):
        record("reference.empty_cache", rank=self._rank)
        super().empty_cache()


@ray.remote(num_cpus=0)
class CPUEngine:
    """The vLLM engine methods the backend calls (RolloutRayActor's), on a bf16 copy of the model."""

    def __init__(self, pretrain):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(pretrain, dtype=torch.bfloat16).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(pretrain)
        self.eos = eos_token_ids(pretrain, self.tokenizer)
        self.announced = None

    def update_weight(self, name, dtype, shape, empty_cache=False):
        assert dtype == torch.bfloat16, f"mismatch dtype: src {dtype}, dst torch.bfloat16"  # vLLM's WorkerWrap
        self.announced = (name, tuple(shape))

    def receive(self, weight):
        name, shape = self.announced
        assert (weight.dtype, tuple(weight.shape)) == (torch.bfloat16, shape)
        self.model.get_parameter(name).data.copy_(weight)  # vLLM's load_weights takes the HF names
        record("engine.load_weight", name=name)

    def weights(self):
        return {n: t.clone() for n, t in self.model.state_dict().items()}

    def reset_prefix_cache(self):
        record("engine.reset_prefix_cache")

    def wake_up(self, tags=None):
        record("engine.wake_up", tags=tags)

    def sleep(self, level=1):
        record("engine.sleep")

    def generate(self, prompt_token_ids, sampling_params):
        record("engine.generate", n=sampling_params.n, detokenize=sampling_params.detokenize)
        # seeded by the weights and the prompt: a resumed run samples what the uninterrupted run sampled
        digest = hashlib.sha256(str(prompt_token_ids).encode())
        for t in self.model.state_dict().values():
            digest.update(t.float().numpy().tobytes())
        torch.manual_seed(int.from_bytes(digest.digest()[:8], "little"))
        [samples] = sample_responses(
            self.model,
            [torch.tensor(prompt_token_ids)],
            sampling_params.n,
            self.tokenizer.pad_token_id,
            self.eos,
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
                "OMP_NUM_THREADS": "1",  # five processes share two cores
                "PYTHONPATH": os.path.dirname(__file__),  # the workers import the stand-ins from this module
            }
        },
    )
    recorder = Recorder.options(name="recorder").remote()
    yield recorder
    ray.shutdown()


def release(held: list) -> None:
    """Free what runs hold in the Ray cluster for the next run: removing a placement group stops its actors."""
    for item in held:
        if isinstance(item, PlacementGroup):
            remove_placement_group(item)
        else:
            ray.kill(item)
    held.clear()


@pytest.fixture
def held():
    """The placement groups and engines a test's runs start, released after it, passed or failed."""
    items = []
    yield items
    release(items)


def run_ditto(held: list, tiny_model_path, zero_stage: int, lora: int, output_dir: str, *extra: str):
    """train_ditto_ray's own flag parsing (relative paths, resolved there) -> the real controller loop over the real
    roles; returns the args, the backend and the events recorded."""
    argv = [
        "--actor.model_name_or_path", os.path.relpath(tiny_model_path), "--data.dataset", "demos.jsonl",
        "--ckpt.output_dir", output_dir,
        "--data.apply_chat_template", "--data.max_len", "64", "--rollout.max_new_tokens", "8",
        "--rollout.n_samples_per_prompt", "2", "--rollout.micro_batch_size", "3", "--rollout.temperature", "0.7",
        "--ditto.iterations", "2", "--ditto.resample_every", "2", "--actor.adam.lr", "1e-2",
        "--train.batch_size", "4", "--train.micro_batch_size", "1",
        "--ds.zero_stage", str(zero_stage), "--ds.lora.rank", str(lora), "--ds.lora.alpha", "8",
        "--ds.attn_implementation", "sdpa",
        "--actor.num_gpus_per_node", "2", "--ref.num_gpus_per_node", "2", "--vllm.num_engines", "2",
        "--train.colocate_all", "--vllm.enable_sleep", "--vllm.sync_backend", "gloo",
        # the policy's states offloaded while vLLM samples: at ZeRO-3 DeepSpeed's offload_states/reload_states make
        # CPU runs irreproducible (about 1 run in 6 ends with other weights, once NaN; ZeRO-2: 8 of 8 identical)
        *(["--ds.enable_sleep"] if zero_stage == 2 else []),
        *extra,
    ]  # fmt: skip
    args = parse_args(argv)
    backends = []

    def make_backend(path):
        groups = [placement_group([{"GPU": 1, "CPU": 1}] * 2) for _ in range(2)]  # policy, reference
        engines = [CPUEngine.remote(str(path)) for _ in range(2)]
        held.extend(groups + engines)
        ray.get([pg.ready() for pg in groups])
        policy = RayActorGroup(1, 2, CPUPolicyActor, pg=groups[0], num_gpus_per_actor=1)
        reference = RayActorGroup(1, 2, CPUReferenceActor, pg=groups[1], num_gpus_per_actor=1)
        backends.append(ob.OpenRLHFBackend(args, path, policy, reference, engines))
        return backends[-1]

    recorder = ray.get_actor("recorder")
    ray.get(recorder.clear.remote())
    train(args, make_backend)
    return args, backends[0], ray.get(recorder.get.remote())


def load_folder(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def grad_norm_in_one_process(final, batch, args, lora: bool) -> float:
    """The gradient norm of the mean DITTO loss over `batch`'s pairs, in one process, for the bf16 policy saved in
    `final` (LoRA: its adapter on pi_0, the adapter trainable)."""
    from peft import PeftModel

    if lora:
        base = AutoModelForCausalLM.from_pretrained(final.parent / "reference", dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(base, final / "adapter", is_trainable=True, autocast_adapter_dtype=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.bfloat16)
    d = args.ditto
    loss_fn = DittoActorLoss(d.beta, d.label_smoothing, d.ipo, d.nll_coef)
    loss_fn.on_pairs(sequence_logps(model, batch), batch)[0].backward()
    grads = [p.grad.float().flatten() for p in model.parameters() if p.requires_grad]
    return torch.linalg.vector_norm(torch.cat(grads)).item()


SYNC = {"policy.offload", "policy.reload", "policy.sync", "engine.wake_up", "engine.reset_prefix_cache"}
CONFIGS = [(2, 4), (3, 4), (2, 0), (3, 0)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("zero_stage", "lora"), CONFIGS, ids=[f"zero{z}-{'lora' if r else 'full'}" for z, r in CONFIGS]
)
def test_ditto_on_the_real_roles(ray_cluster, held, tiny_model_path, tmp_path, monkeypatch, zero_stage, lora):
    monkeypatch.chdir(tmp_path)  # the flags name relative paths; the Ray workers run in another directory
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DEMOS))
    args, backend, events = run_ditto(held, tiny_model_path, zero_stage, lora, "run")
    out = tmp_path / "run"
    names = [e for e, _ in events]

    # init: both ranks, from pi_0 by its absolute path, in a working directory that is not the driver's
    inits = [d for e, d in events if e == "policy.init"]
    assert len(inits) == 2 and all(d["max_steps"] == 4 and os.path.isabs(d["pretrain"]) for d in inits)
    assert all(os.path.realpath(d["cwd"]) != os.path.realpath(tmp_path) for d in inits)
    ready = [d for e, d in events if e == "policy.ready"]
    assert all(d["temperature"] == 1.0 and d["zero"] == zero_stage for d in ready), "log-probs at temperature 1"

    # per iteration: the policy's states offloaded (at init in sleep mode, later explicitly), the engine's weights
    # woken, the sync (rank 0 resets the prefix cache first), its KV cache woken, then M samples per prompt with no
    # detokenizing, and sleep
    gen = [i for i, e in enumerate(names) if e == "engine.generate"]
    assert len(gen) == 2 * 3  # 2 iterations x 3 prompts
    for first, offload in ((gen[0], []), (gen[3], ["policy.offload"] * 2 if args.ds.enable_sleep else [])):
        last_step = max(i for i, e in enumerate(names[:first]) if e in ("policy.ready", "policy.train_step"))
        window = [e for e in names[last_step:first] if e in SYNC]
        k = len(offload) + 2
        assert window[:k] == offload + ["engine.wake_up"] * 2 and window[-2:] == ["engine.wake_up"] * 2, window
        assert sorted(window[k:-2]) == ["engine.reset_prefix_cache"] * 2 + ["policy.sync"] * 2, window
    assert [d["tags"] for e, d in events if e == "engine.wake_up"] == ([["weights"]] * 2 + [["kv_cache"]] * 2) * 2
    assert all(d["n"] == 2 and d["detokenize"] is False for e, d in events if e == "engine.generate")
    assert names.count("engine.sleep") == 2 * 2
    sleep = args.ds.enable_sleep  # states back for each iteration's first step; offloaded again for the second's sync
    assert (names.count("policy.reload"), names.count("policy.offload")) == ((2 * 2, 2) if sleep else (0, 0))
    base_names = set(ray.get(backend.engines[0].weights.remote()))
    adapted = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ATTENTION}
    for start, end in ((0, gen[0]), (gen[2], gen[3])):
        synced = [d["name"] for e, d in events[start:end] if e == "engine.load_weight"]
        assert sorted(synced) == sorted([*(adapted if lora else base_names)] * 2), (
            "to both engines; LoRA: adapted only"
        )

    # reference: every demo and sample scored exactly once, on both ranks; each scoring (the demos, then each
    # iteration's samples) ends with both ranks releasing their cached memory before the policy or vLLM runs again
    store = SampleStore.load(out / "store")
    responses = store.demos + [s for it in store.iterations for group in it for s in group]
    expected_rows = Counter(tuple(store.prompt_of(r).tolist() + r.ids.tolist()) for r in responses)
    forwards = [d for e, d in events if e == "reference.forward"]
    assert Counter(row for d in forwards for row in d["rows"]) == expected_rows
    assert {d["rank"] for d in forwards} == {0, 1}
    assert names.count("reference.empty_cache") == 3 * 2
    dirty = False
    for e in names:
        dirty = (dirty or e == "reference.forward") and e != "reference.empty_cache"
        assert not (dirty and e.startswith(("policy.", "engine."))), "the reference still holds its cache"

    # training: both ranks get half of each step's 4 pairs; DeepSpeed's grad norm and the schedule reach the metrics
    steps = [d for e, d in events if e == "policy.train_step"]
    assert len(steps) == 2 * 2 * 2 and all(d["pairs"] == 2 and d["total_pairs"] <= 4 for d in steps)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if m["prefix"] == "train"]
    assert [m["lr"] for m in train_rows] == [0.0, 1e-2, 1e-2, 1e-2]  # constant after 25% warm-up
    assert all(m["grad_norm"] > 0 for m in train_rows)

    # the engine ends up with the weights the policy was saved with (through ZeRO-3's gathered merge too)
    final = out / "final"
    backend.generate(store.prompts[:1], 1)  # one more sync: the final weights
    engine, saved = ray.get(backend.engines[1].weights.remote()), load_folder(final)
    assert set(engine) == set(saved)
    for name, t in engine.items():
        if lora:  # OpenRLHF's adapter merged into pi_0 by peft in bf16, against our fp32 merge cast to bf16
            torch.testing.assert_close(t.float(), saved[name].float(), rtol=1e-2, atol=1e-2)
        else:
            assert torch.equal(t, saved[name].to(torch.bfloat16)), name

    # the reference's log-probs, its micro-batches dealt over the two ranks (3 batches: one copy fills rank 1)
    reference = AutoModelForCausalLM.from_pretrained(out / "reference", dtype=torch.bfloat16)
    batches = [collate_pairs(PairSampler(store, (1, 0, 0), seed=s).sample(1), store, 0) for s in range(3)]
    got = backend.reference_logps(batches)
    with torch.no_grad():
        want = torch.cat([sequence_logps(reference, b) for b in batches])
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.1)
    # and the policy's (the held-out signal's), through OpenRLHF's policy role, against the saved final policy
    policy = AutoModelForCausalLM.from_pretrained(final, dtype=torch.bfloat16)
    with torch.no_grad():
        want = torch.cat([sequence_logps(policy, b) for b in batches])
    torch.testing.assert_close(backend.policy_logps(batches), want, rtol=0.02, atol=0.1)
    assert not torch.allclose(want, got, atol=1e-3), "the policy moved away from the reference"

    # checkpoints are DeepSpeed's, per rank; with LoRA, the adapter and its optimizer state, not the frozen base
    base_bytes = sum(t.numel() * 2 for t in load_folder(out / "reference").values())
    for it in ("iter_00001", "iter_00002"):
        files = [f for f in (out / "checkpoints" / it / "backend").rglob("*.pt")]
        assert {f.name for f in files} >= {f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
        size = sum(f.stat().st_size for f in files)
        assert (size < base_bytes / 2) == bool(lora), f"checkpoint {size} bytes; the frozen bf16 base {base_bytes}"

    # a step's gradient is the mean over the batch's real pairs, whatever the ranks, micro-batches and padding: one
    # step on 3 pairs (the 4th slot pads) against the same gradient in one process
    batch = collate_pairs(PairSampler(store, (0.7, 0.2, 0.1), seed=1).sample(3), store, 0)
    expected = grad_norm_in_one_process(final, batch, args, bool(lora))
    assert backend.train_step(batch)["grad_norm"] == pytest.approx(expected, rel=0.05)

    # resume: a copy of the run, stopped after iteration 1, continues to the same weights and samples
    shutil.copytree(out, tmp_path / "resumed", ignore=shutil.ignore_patterns("final", "iter_00002", "logs"))
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("iter_00001")
    release(held)
    run_ditto(held, tiny_model_path, zero_stage, lora, "resumed", "--resume")
    resumed = load_folder(tmp_path / "resumed" / "final")
    assert all(torch.equal(saved[k], resumed[k]) for k in saved), "the resumed run ends with other weights"
    for f in (out / "store").glob("*.json"):
        assert f.read_bytes() == (tmp_path / "resumed" / "store" / f.name).read_bytes(), f.name
