"""The OpenRLHF backend: the trainer's Backend protocol on OpenRLHF 0.11.2's Ray roles.

    driver (trainer.train)                          Ray actors
    OpenRLHFBackend.generate         --wake-->      vLLM engines (create_vllm_engines; sleep mode)
                                     --sync-->      DittoPolicyActor.broadcast_to_vllm (LoRA: merged weights)
                                     --n=M-->       vLLM engines: token ids
    OpenRLHFBackend.reference_logps  --batches-->   ReferenceModelActor.forward, micro-batches dealt over its ranks
    OpenRLHFBackend.train_step       --pairs-->     DittoPolicyActor.ditto_train_step, pairs split across DP ranks

This is the only module of the package that imports openrlhf, ray, deepspeed or vllm. The algorithm (controller
loop, experience maker, pair sampler, DittoActorLoss) is the one the local backend runs; nothing here redoes it.
DITTO's SFT warm start is not run here: recipes/ditto_mistral7b.sh runs it with `openrlhf.cli.train_sft`.
"""

import contextlib
import copy
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

# flash-attn installed without its CUDA kernels (a CPU machine, scripts/setup.sh) imports only through its Triton
# backend, and openrlhf.models imports flash-attn. A GPU machine keeps the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")

import ray  # noqa: E402
from openrlhf.trainer.ray import batch_vllm_engine_call, create_vllm_engines  # noqa: E402
from openrlhf.trainer.ray.launcher import RayActorGroup, ReferenceModelActor  # noqa: E402
from openrlhf.trainer.ray.ppo_actor import PolicyModelActor  # noqa: E402
from openrlhf.utils import get_strategy  # noqa: E402

from openrlhf_ditto.backends.vllm_engine import weights_for_sync  # noqa: E402
from openrlhf_ditto.loss import DittoActorLoss, train_without_dropout  # noqa: E402
from openrlhf_ditto.models import eos_token_ids  # noqa: E402
from openrlhf_ditto.pairs import PairBatch, SequenceBatch  # noqa: E402
from openrlhf_ditto.schedules import lr_scheduler  # noqa: E402

# create_vllm_engines starts every engine with dtype="bfloat16", and vLLM's WorkerWrap.update_weight refuses any other.
VLLM_DTYPE = torch.bfloat16

# Settings that OpenRLHF's PolicyModelActor / ReferenceModelActor / DeepspeedStrategy read while they build the model,
# the DeepSpeed engine and the (unused) PPO trainer, and that DITTO has no flag for: values that keep the PPO parts
# inert, otherwise OpenRLHF 0.11.2's own defaults.
_OPENRLHF_FIXED = {
    "local_rank": -1,
    "ckpt.load_enable": False,  # DITTO resumes from its run folder (--resume), not from OpenRLHF's --ckpt.path
    "ckpt.save_hf": False,
    "ckpt.disable_ds": False,
    "data.disable_fast_tokenizer": False,
    "train.enable_ema": False,
    "train.ema_beta": 0.992,
    "train.max_epochs": 1,
    "train.async_enable": False,
    "train.dynamic_batch_enable": False,
    "ds.packing_samples": False,
    "ds.tensor_parallel_size": 1,
    "ds.experts_implementation": None,
    "actor.optim": "adam",
    "actor.muon": SimpleNamespace(lr=0.02, momentum=0.95, ns_steps=5, nesterov=True),
    "actor.eps_clip": 0.2,
    "actor.eps_clip_low_high": (0.2, 0.2),
    "actor.dual_clip": None,
    "actor.loss_agg_mode": "token-mean",
    "actor.policy_loss_type": "ppo",
    "actor.aux_loss_coef": 0.0,
    "algo.advantage.is_correction_level": "off",
    "algo.advantage.is_correction_mode": "mask",
    "algo.advantage.is_correction_gating": "ratio",
    "algo.advantage.is_correction_threshold": [0.5, 5.0],
    # OpenRLHF's Actor divides logits by the sampling temperature (PPO's ratios are of the sampling policy); DPO
    # compares the models' own log-probs, as the local backend does. vLLM still samples at --rollout.temperature.
    "rollout.temperature": 1.0,
}


def openrlhf_args(args: SimpleNamespace) -> SimpleNamespace:
    """The namespace handed to OpenRLHF's strategy and roles: DITTO's flags plus `_OPENRLHF_FIXED`."""
    out = copy.deepcopy(args)
    for key, value in {**_OPENRLHF_FIXED, "ckpt.path": str(args.ckpt.output_dir)}.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            if not hasattr(node, p):
                setattr(node, p, SimpleNamespace())
            node = getattr(node, p)
        setattr(node, leaf, value)
    return out


@ray.remote(num_gpus=1)
class DittoPolicyActor(PolicyModelActor.__ray_actor_class__):
    """OpenRLHF's policy role (DeepSpeed ZeRO 0-3, LoRA, gradient checkpointing, offload/reload, vLLM weight sync)
    plus one DITTO optimiser step on a shard of a pair batch, and checkpoints into a given folder."""

    def init_model_from_pretrained(self, strategy, pretrain, max_steps=None, vllm_engines=None):
        """OpenRLHF's init, then the local backend's schedule (`schedules.lr_scheduler`) in place of OpenRLHF's, whose
        first warm-up step trains at lr 0. The DeepSpeed engine steps it and keeps it in its checkpoints."""
        super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        a, engine = strategy.args.actor, self.actor.model
        engine.lr_scheduler = self.actor_scheduler = self.trainer.actor_scheduler = lr_scheduler(
            a.lr_scheduler, engine.basic_optimizer, a.lr_warmup_ratio, max_steps, a.min_lr_ratio
        )

    def ditto_train_step(self, batch: PairBatch, total_pairs: int, total_demos: int) -> dict:
        """Forward/backward the shard's micro-batches (chosen + rejected in one forward each) and step.

        Every rank gets the same number of pairs, `strategy.accumulated_gradient` micro-batches of
        --train.micro_batch_size, so DeepSpeed's accumulation boundary and ZeRO-3's collective forwards line up.
        DeepSpeed divides each loss by the accumulation steps and averages gradients over the ranks; each
        micro-batch's loss is its share of the whole batch's means (over the `total_pairs` real pairs and the
        `total_demos` demo rows of the batch), and the factor below undoes DeepSpeed's divisions, so the step's
        gradient is the batch's however it is split (padding pairs compare a response with itself: zero gradient).
        Returns the shard's policy log-probs for the driver's metrics, with the lr of this step and DeepSpeed's
        gradient norm.
        """
        args = self.strategy.args
        d = args.ditto
        loss_fn = DittoActorLoss(d.beta, d.label_smoothing, d.ipo, d.nll_coef)
        device = torch.cuda.current_device()
        scale = self.strategy.accumulated_gradient * self.strategy.world_size
        lr = self.actor_scheduler.get_last_lr()[0]
        train_without_dropout(self.actor)
        chosen, rejected = [], []
        for mb in batch.split(args.train.micro_batch_size):
            mb = mb.to(device)
            b = len(mb.kinds)
            logps = self.actor(mb.sequences, mb.action_mask, mb.attention_mask).sum(-1)
            loss, _ = loss_fn.on_pairs(logps, mb, total_pairs, total_demos)
            self.strategy.backward(loss * scale, self.actor, self.actor_optim)
            self.strategy.optimizer_step(self.actor_optim, self.actor, self.actor_scheduler, name="actor")
            chosen.append(logps[:b].detach().float().cpu())
            rejected.append(logps[b:].detach().float().cpu())
        torch.cuda.empty_cache()  # the step's full-vocabulary logits stay cached otherwise, while vLLM wakes
        return {
            "chosen_logps": torch.cat(chosen),
            "rejected_logps": torch.cat(rejected),
            "lr": lr,
            "grad_norm": self.strategy.get_grad_norm(self.actor),
        }

    def broadcast_to_vllm(self):
        """`weights_for_sync` (LoRA: the adapted layers merged; else every weight) in the engines' dtype, under the
        base model's names, over OpenRLHF's channel (NCCL / Ray collective broadcast, or CUDA IPC when colocated)."""
        import deepspeed
        from openrlhf.trainer.ray.utils import get_physical_gpu_id
        from openrlhf.utils.distributed_util import torch_dist_barrier_and_cuda_sync
        from torch.multiprocessing.reductions import reduce_tensor

        args = self.strategy.args
        trainer = self.trainer
        rank0 = torch.distributed.get_rank() == 0
        if rank0 and args.vllm.enable_prefix_caching:  # cached KV of the old weights would be reused
            ray.get([engine.reset_prefix_cache.remote() for engine in self.vllm_engines])
        torch.cuda.empty_cache()
        zero3 = args.ds.zero_stage == 3

        @contextlib.contextmanager
        def gather(params):
            # one GatheredParameters per parameter: a coalesced gather of a layer's weight with its LoRA A and B
            # gave the weight half filled (ZeRO-3 on gloo: tests/test_openrlhf_backend.py, zero3-lora)
            with contextlib.ExitStack() as stack:
                for param in params:
                    stack.enter_context(deepspeed.zero.GatheredParameters([param], enabled=zero3))
                yield

        weights = weights_for_sync(self.actor.model.module, VLLM_DTYPE, gather=gather)
        for name, weight in weights:
            if trainer.use_cuda_ipc:
                weight = weight.clone()  # the handle must not point into a parameter that training will change
                handles = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(handles, {get_physical_gpu_id(): reduce_tensor(weight)})
                if rank0:
                    ipc_handles = {k: v for h in handles for k, v in h.items()}
                    ray.get(
                        [
                            e.update_weight_cuda_ipc.remote(
                                name, dtype=weight.dtype, shape=weight.shape, ipc_handles=ipc_handles
                            )
                            for e in self.vllm_engines
                        ]
                    )
                torch_dist_barrier_and_cuda_sync()
            elif rank0:
                refs = [
                    e.update_weight.remote(name, dtype=weight.dtype, shape=weight.shape) for e in self.vllm_engines
                ]
                if args.vllm.sync_with_ray:
                    import ray.util.collective as collective

                    collective.broadcast(weight, 0, group_name=trainer._model_update_group)
                else:
                    trainer._model_update_group.broadcast(weight, src=0, stream=torch.cuda.current_stream())
                ray.get(refs)
        torch.cuda.empty_cache()
        torch_dist_barrier_and_cuda_sync()

    def save_ditto_checkpoint(self, folder: str) -> None:
        """DeepSpeed's checkpoint (sharded per rank) into `folder`: the trainable weights with their optimizer and
        scheduler states. With LoRA that is the adapter only: the frozen base is pi_0, already in the run's
        reference/ folder (a whole Mistral-7B would add 14.5 GB to every checkpoint)."""
        from openrlhf.utils.distributed_util import torch_dist_barrier_and_cuda_sync

        lora = self.strategy.args.ds.lora.rank > 0
        self.actor.model.save_checkpoint(folder, exclude_frozen_parameters=lora)
        torch_dist_barrier_and_cuda_sync()

    def load_ditto_checkpoint(self, folder: str) -> None:
        lora = self.strategy.args.ds.lora.rank > 0  # the frozen weights are not in it: they are pi_0's, as loaded
        path, _ = self.actor.model.load_checkpoint(folder, load_module_strict=not lora)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder}")

    def save_hf_model(self, folder: str) -> None:
        """The policy as a Hugging Face folder (LoRA: the adapter only, as OpenRLHF saves it)."""
        self.strategy.save_model(self.actor, self.tokenizer, folder)


def _group_logps(group: RayActorGroup, ranks: int, batches: list[SequenceBatch]) -> torch.Tensor:
    """All micro-batches of a scoring in one round trip to the group's `forward` (OpenRLHF's reference and policy
    roles both have one), dealt out evenly over the ranks (copies of batch 0 fill the last ranks: under ZeRO-3 every
    rank must run each forward, which gathers the weights collectively). Then the ranks free their cached GPU
    memory, as OpenRLHF's experience maker does after each reference forward: the full-vocabulary logits would stay
    held while the policy trains and vLLM wakes."""
    padded = batches + batches[:1] * (-len(batches) % ranks)
    shards = {k: [getattr(b, k) for b in padded] for k in ("sequences", "action_mask", "attention_mask")}
    out = ray.get(group.async_run_method_batch("forward", **shards))
    ray.get(group.async_run_method("empty_cache"))
    logps = [logp for rank in out for logp in rank][: len(batches)]
    return torch.cat([logp.float().sum(-1) for logp in logps])


class OpenRLHFBackend:
    """The trainer's Backend on Ray groups: `policy` (RayActorGroup of DittoPolicyActor), `reference` (RayActorGroup
    of ReferenceModelActor) and `engines` (vLLM engines, as create_vllm_engines returns them). It initialises the
    roles from `model_path` (pi_0) with OpenRLHF's DeepSpeed strategy. `build_openrlhf_backend` makes the real
    groups; a test can hand in others that answer the same remote methods."""

    def __init__(self, args: SimpleNamespace, model_path, policy: RayActorGroup, reference: RayActorGroup, engines):
        self.args = args
        self.model_path = Path(model_path)
        self.policy = policy
        self.reference = reference
        self.engines = engines
        self.dp = args.actor.num_nodes * args.actor.num_gpus_per_node
        self.ref_ranks = args.ref.num_nodes * args.ref.num_gpus_per_node
        d = args.ditto
        self.loss_fn = DittoActorLoss(d.beta, d.label_smoothing, d.ipo, d.nll_coef)
        from transformers import AutoTokenizer

        # vLLM stops on the generation config's EOS ids; the chat template's turn end may not be among them
        self.stop_token_ids = sorted(eos_token_ids(model_path, AutoTokenizer.from_pretrained(model_path)))
        strategy = get_strategy(openrlhf_args(args))
        max_steps = d.iterations * d.resample_every  # the scheduler's length
        ray.get(
            policy.async_init_model_from_pretrained(strategy, str(model_path), max_steps, engines)
            + reference.async_init_model_from_pretrained(strategy, str(model_path))
        )
        self.policy_states_on_gpu = not args.ds.enable_sleep  # the policy offloads them at init in sleep mode

    def _policy_states(self, on_gpu: bool) -> None:
        """Colocated sleep mode (--ds.enable_sleep): optimizer states on the GPU only while training."""
        if self.args.ds.enable_sleep and self.policy_states_on_gpu != on_gpu:
            ray.get(self.policy.async_run_method("reload_states" if on_gpu else "offload_states"))
            self.policy_states_on_gpu = on_gpu

    # One run only (the trainer's single-user run ""): the roles hold one policy. `runs` arguments name it.
    def add_run(self, run: str, reference: Path | None) -> None:
        """The roles were loaded with the run's model (pi_0 when resuming: `build_openrlhf_backend`)."""

    def sft_step(self, batch: SequenceBatch, runs: list[str]) -> dict[str, float]:
        raise NotImplementedError(
            "the OpenRLHF backend starts from an SFT checkpoint: run openrlhf.cli.train_sft on the demos first "
            "(recipes/ditto_mistral7b.sh) and pass --ditto.sft_steps 0"
        )

    def freeze_reference(self, run: str, save_to: Path | None) -> None:
        """pi_0 is the model the roles were loaded from: the reference group holds it, the policy trains a fresh
        adapter on it (LoRA) or a copy of it. The run folder gets pi_0's files (hard links where possible)."""
        if save_to is not None:
            try:
                shutil.copytree(self.model_path, save_to, dirs_exist_ok=True, copy_function=os.link)
            except OSError:  # another filesystem
                shutil.copytree(self.model_path, save_to, dirs_exist_ok=True)

    def generate(self, prompts: list[torch.Tensor], n: int, runs: list[str], seeds: list[int]) -> list:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sleep = self.args.vllm.enable_sleep
        self._policy_states(on_gpu=False)
        if sleep:  # weights first, so the sync never holds the KV cache too (as OpenRLHF's PPO trainer does)
            batch_vllm_engine_call(self.engines, "wake_up", tags=["weights"])
        ray.get(self.policy.async_run_method("broadcast_to_vllm"))
        if sleep:
            batch_vllm_engine_call(self.engines, "wake_up", tags=["kv_cache"])
        r = self.args.rollout
        # a seed per prompt from the run's RNG, which the trainer checkpoints: a resumed run samples what the
        # uninterrupted one did, whichever engine gets the prompt
        params = [
            SamplingParams(
                n=n,
                temperature=r.temperature,
                top_p=r.top_p,
                top_k=r.top_k,
                max_tokens=r.max_new_tokens,
                stop_token_ids=self.stop_token_ids,
                seed=seed,
                output_kind=RequestOutputKind.FINAL_ONLY,  # the n samples of a prompt in one output
                detokenize=False,  # DITTO stores token ids only
            )
            for seed in seeds
        ]
        refs = [
            self.engines[i % len(self.engines)].generate.remote(p.tolist(), params[i]) for i, p in enumerate(prompts)
        ]
        outputs = ray.get(refs)
        if sleep:
            batch_vllm_engine_call(self.engines, "sleep")
        return [[list(o.token_ids) for o in out.outputs] for out in outputs]

    def reference_logps(self, batches: list[SequenceBatch], runs: list[list[str]]) -> torch.Tensor:
        return _group_logps(self.reference, self.ref_ranks, batches)

    def policy_logps(self, batches: list[SequenceBatch], runs: list[list[str]]) -> torch.Tensor:
        self._policy_states(on_gpu=True)
        return _group_logps(self.policy, self.dp, batches)

    def train_step(self, batches: dict[str, PairBatch]) -> dict[str, dict[str, float]]:
        ((run, batch),) = batches.items()
        start = time.perf_counter()
        self._policy_states(on_gpu=True)
        B, total = len(batch.kinds), self.args.train.batch_size
        # A slot the sampler gave up on (identical responses) becomes a pair of row 0 with itself: zero gradient.
        pad = torch.zeros(total - B, dtype=torch.long)
        rows = torch.cat([torch.arange(B), pad, torch.arange(B, 2 * B), pad])
        padded = PairBatch(
            sequences=batch.sequences[rows],
            attention_mask=batch.attention_mask[rows],
            action_mask=batch.action_mask[rows],
            ref_logps=batch.ref_logps[rows],
            kinds=batch.kinds[torch.cat([torch.arange(B), pad])],
            chosen_is_demo=torch.cat([batch.chosen_is_demo, pad.bool()]),
            truncated=batch.truncated[rows],
        )
        shards = padded.split(total // self.dp)
        demos = int(batch.chosen_is_demo.sum())
        refs = self.policy.async_run_method_batch(
            "ditto_train_step", batch=shards, total_pairs=[B] * self.dp, total_demos=[demos] * self.dp
        )
        out = [result[0] for result in ray.get(refs)]
        chosen = torch.cat([o["chosen_logps"] for o in out])[:B]
        rejected = torch.cat([o["rejected_logps"] for o in out])[:B]
        _, metrics = self.loss_fn.on_pairs(torch.cat([chosen, rejected]), batch)
        seconds = time.perf_counter() - start
        metrics.update(
            lr=out[0]["lr"],
            grad_norm=out[0]["grad_norm"],
            tokens_per_s=batch.attention_mask.sum().item() / seconds,
            pairs_per_s=B / seconds,
        )
        return {run: metrics}

    def save_checkpoint(self, run: str, folder: Path) -> None:
        self._policy_states(on_gpu=True)
        folder.mkdir(parents=True, exist_ok=True)
        ray.get(self.policy.async_run_method("save_ditto_checkpoint", str(folder)))

    def load_checkpoint(self, run: str, folder: Path) -> None:
        self._policy_states(on_gpu=True)
        ray.get(self.policy.async_run_method("load_ditto_checkpoint", str(folder)))

    def save_model(self, run: str, folder: Path) -> None:
        """LoRA: the adapter in adapter/ (from the policy), merged into pi_0 here on the CPU, as the local backend
        saves it; full-parameter training: the weights as OpenRLHF saves them."""
        lora = self.args.ds.lora.rank > 0
        ray.get(self.policy.async_run_method("save_hf_model", str(folder / "adapter" if lora else folder)))
        if lora:
            from openrlhf.utils.utils import convert_to_torch_dtype
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            dtype = convert_to_torch_dtype(self.args.ds.param_dtype)
            base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
            PeftModel.from_pretrained(base, folder / "adapter").merge_and_unload().save_pretrained(folder)


def build_openrlhf_backend(args: SimpleNamespace, model_path) -> OpenRLHFBackend:
    """Start (or join) Ray and place the roles as `openrlhf.cli.train_ppo_ray` does: with --train.colocate_all the
    policy, the reference and the vLLM engines share one placement group (0.2 GPU each per GPU); with
    --train.colocate_actor_ref the policy and the reference share one."""
    from ray.util.placement_group import placement_group

    if not ray.is_initialized():
        ray.init(
            runtime_env={
                "env_vars": {
                    "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
                    "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
                    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
                }
            }
        )
    t = args.train
    pg = None
    if t.colocate_actor_ref or t.colocate_all:
        pg = placement_group(
            [{"GPU": 1, "CPU": 1} for _ in range(args.actor.num_nodes * args.actor.num_gpus_per_node)]
        )
        ray.get(pg.ready())
    v = args.vllm
    engines = create_vllm_engines(
        num_engines=v.num_engines,
        tensor_parallel_size=v.tensor_parallel_size,
        pretrain=str(model_path),
        seed=t.seed,
        full_determinism=t.full_determinism_enable,
        enable_prefix_caching=v.enable_prefix_caching,
        enforce_eager=v.enforce_eager,
        max_model_len=args.data.max_len,
        shared_pg=pg if t.colocate_all else None,
        gpu_memory_utilization=v.gpu_memory_utilization,
        vllm_enable_sleep=v.enable_sleep,
    )
    policy, reference = (
        RayActorGroup(
            role.num_nodes, role.num_gpus_per_node, cls, pg=pg, num_gpus_per_actor=0.2 if pg else 1, duplicate_actors=1
        )
        for role, cls in ((args.actor, DittoPolicyActor), (args.ref, ReferenceModelActor))
    )
    return OpenRLHFBackend(args, model_path, policy, reference, engines)
