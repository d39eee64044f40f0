"""What the OpenRLHF backend relies on in OpenRLHF 0.11.2 (and the vLLM / DeepSpeed it pins), pinned so that an
upgrade that changes it fails here, saying what changed and which part of openrlhf_ditto/backends/openrlhf.py
depends on it. The classes are the real installed ones; nothing here needs a GPU."""

import argparse
import inspect
import os
import re
import types

os.environ.setdefault("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")  # flash-attn without CUDA kernels (CPU install)

import pytest  # noqa: E402
import torch  # noqa: E402

from openrlhf_ditto.cli.args import hierarchize  # noqa: E402

backend = pytest.importorskip("openrlhf_ditto.backends.openrlhf")

from openrlhf.models import Actor  # noqa: E402
from openrlhf.trainer.ray import batch_vllm_engine_call, create_vllm_engines  # noqa: E402
from openrlhf.trainer.ray.launcher import BaseModelActor, RayActorGroup, ReferenceModelActor  # noqa: E402
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer, PolicyModelActor  # noqa: E402
from openrlhf.trainer.ray.vllm_engine import RolloutRayActor  # noqa: E402
from openrlhf.utils.deepspeed import DeepspeedStrategy  # noqa: E402

POLICY = PolicyModelActor.__ray_actor_class__
REFERENCE = ReferenceModelActor.__ray_actor_class__
ENGINE = RolloutRayActor.__ray_actor_class__


def params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def check(fn, expected: list[str], used_by: str) -> None:
    got = params(fn)
    assert got[: len(expected)] == expected, (
        f"OpenRLHF changed {fn.__qualname__}{inspect.signature(fn)}: expected its leading parameters to be "
        f"{expected}; {used_by} (openrlhf_ditto/backends/openrlhf.py) calls it that way"
    )


def test_installed_versions():
    from importlib.metadata import version

    assert version("openrlhf") == "0.11.2", "the OpenRLHF backend is written against OpenRLHF 0.11.2"


def test_policy_actor():
    check(
        POLICY.init_model_from_pretrained,
        ["strategy", "pretrain", "max_steps", "vllm_engines"],
        "OpenRLHFBackend.__init__ (policy.async_init_model_from_pretrained)",
    )
    for name in ("broadcast_to_vllm", "offload_states", "reload_states"):
        check(getattr(POLICY, name), [], f"OpenRLHFBackend (policy.async_run_method('{name}'))")
    check(BaseModelActor.execute_batch, ["method_name", "all_data", "start_idx", "end_idx"], "async_run_method_batch")
    # DittoPolicyActor's methods use these attributes that init_model_from_pretrained sets
    src = inspect.getsource(POLICY.init_model_from_pretrained)
    for attr in (
        "self.actor, self.actor_optim, self.actor_scheduler",
        "self.tokenizer",
        "self.trainer",
        "self.vllm_engines",
    ):
        assert attr in src, (
            f"PolicyModelActor.init_model_from_pretrained no longer sets {attr} (DittoPolicyActor uses it)"
        )
    assert issubclass(backend.DittoPolicyActor.__ray_actor_class__, POLICY)


def test_ppo_trainer_sync_channel():
    """DittoPolicyActor.broadcast_to_vllm sends `weights_for_sync` over the channel ActorPPOTrainer sets up."""
    init = inspect.getsource(ActorPPOTrainer.__init__) + inspect.getsource(ActorPPOTrainer._init_vllm_sync_group)
    for attr in ("self.use_cuda_ipc =", "self._model_update_group ="):
        assert attr in init, f"ActorPPOTrainer no longer sets {attr.split()[0]} (DittoPolicyActor.broadcast_to_vllm)"
    check(ENGINE.update_weight, ["name", "dtype", "shape"], "DittoPolicyActor.broadcast_to_vllm")
    check(
        ENGINE.update_weight_cuda_ipc, ["name", "dtype", "shape", "ipc_handles"], "DittoPolicyActor.broadcast_to_vllm"
    )
    check(ENGINE.reset_prefix_cache, [], "DittoPolicyActor.broadcast_to_vllm")
    check(BaseModelActor.empty_cache, [], "OpenRLHFBackend.reference_logps (async_run_method('empty_cache'))")
    assert '"dtype": "bfloat16"' in inspect.getsource(create_vllm_engines), (
        "create_vllm_engines no longer starts engines in bfloat16: update VLLM_DTYPE, the dtype weights_for_sync sends"
    )


def test_reference_actor():
    check(REFERENCE.init_model_from_pretrained, ["strategy", "pretrain"], "OpenRLHFBackend.__init__")
    check(REFERENCE.forward, ["sequences", "action_mask", "attention_mask"], "OpenRLHFBackend.reference_logps")


def test_actor_group():
    check(
        RayActorGroup.__init__,
        ["num_nodes", "num_gpus_per_node", "ray_actor_type", "pg", "num_gpus_per_actor", "duplicate_actors"],
        "build_openrlhf_backend",
    )
    check(RayActorGroup.async_init_model_from_pretrained, ["args", "kwargs"], "OpenRLHFBackend.__init__")
    check(RayActorGroup.async_run_method, ["method_name", "args", "kwargs"], "OpenRLHFBackend")
    check(RayActorGroup.async_run_method_batch, ["method_name", "kwargs"], "reference_logps and train_step")


def test_vllm_engines():
    sig = inspect.signature(create_vllm_engines).parameters
    names = ["num_engines", "tensor_parallel_size", "pretrain", "seed", "full_determinism", "enable_prefix_caching"]
    names += ["enforce_eager", "max_model_len", "shared_pg", "gpu_memory_utilization", "vllm_enable_sleep"]
    missing = [n for n in names if n not in sig]
    assert not missing, f"create_vllm_engines lost the keyword(s) {missing} that build_openrlhf_backend passes"
    check(batch_vllm_engine_call, ["engines", "method_name", "args"], "OpenRLHFBackend.generate (wake_up / sleep)")
    check(ENGINE.generate, ["prompt_token_ids", "sampling_params"], "OpenRLHFBackend.generate")
    check(ENGINE.wake_up, ["tags"], "OpenRLHFBackend.generate")
    check(ENGINE.sleep, ["level"], "OpenRLHFBackend.generate")
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    p = SamplingParams(
        n=3,
        temperature=0.7,
        top_p=0.9,
        max_tokens=8,
        stop_token_ids=[2, 7],
        output_kind=RequestOutputKind.FINAL_ONLY,
        detokenize=False,
    )
    assert (p.n, p.max_tokens, p.output_kind, p.detokenize) == (3, 8, RequestOutputKind.FINAL_ONLY, False)
    assert p.stop_token_ids == [2, 7]  # the chat template's turn end, which a generation config may not list


def test_actor_forward_and_strategy():
    check(Actor.forward, ["sequences", "action_mask", "attention_mask"], "DittoPolicyActor.ditto_train_step")
    assert "self.temperature" in inspect.getsource(Actor.forward), "Actor.forward no longer applies a temperature"
    check(DeepspeedStrategy.backward, ["loss", "model", "_optimizer"], "DittoPolicyActor.ditto_train_step")
    check(DeepspeedStrategy.optimizer_step, ["_optimizer", "model", "_scheduler", "name"], "ditto_train_step")
    check(DeepspeedStrategy.get_grad_norm, ["model"], "ditto_train_step")
    from deepspeed import DeepSpeedEngine

    save = inspect.signature(DeepSpeedEngine.save_checkpoint).parameters
    assert "exclude_frozen_parameters" in save, "DittoPolicyActor.save_ditto_checkpoint saves LoRA runs without pi_0"
    check(DeepSpeedEngine.load_checkpoint, ["load_dir", "tag", "load_module_strict"], "load_ditto_checkpoint")
    check(DeepspeedStrategy.save_model, ["model", "tokenizer", "output_dir"], "DittoPolicyActor.save_hf_model")
    assert "self.accumulated_gradient =" in inspect.getsource(DeepspeedStrategy.setup_distributed), (
        "DeepspeedStrategy.setup_distributed no longer sets accumulated_gradient (ditto_train_step's loss scale)"
    )
    import deepspeed.runtime.engine as engine  # DeepSpeedEngine.backward is wrapped: read its definition

    assert re.search(r"def backward\(self, loss, [^)]*scale_wrt_gas=True", inspect.getsource(engine)), (
        "DeepSpeedEngine.backward no longer divides the loss by the accumulation steps by default "
        "(scale_wrt_gas=True); ditto_train_step's loss scale assumes it does"
    )


def test_every_setting_openrlhf_reads_is_given(tmp_path):
    """Each `args.<group>.<name>` that the OpenRLHF code the backend runs reads exists in the namespace the backend
    hands it (train_ditto_ray's flags + backend._OPENRLHF_FIXED): a new setting read by an upgrade fails here."""
    from openrlhf.utils import get_strategy

    from openrlhf_ditto.cli.train_ditto_ray import build_parser

    ns = build_parser().parse_args(
        ["--actor.model_name_or_path", str(tmp_path), "--data.dataset", str(tmp_path / "d.jsonl")]
    )
    args = backend.openrlhf_args(hierarchize(ns))
    code = [
        POLICY.init_model_from_pretrained,
        POLICY.save_model,
        POLICY.offload_states,
        POLICY.reload_states,
        ActorPPOTrainer.__init__,
        ActorPPOTrainer._init_vllm_sync_group,
        REFERENCE.init_model_from_pretrained,
        REFERENCE.forward,
        get_strategy,
        *(getattr(DeepspeedStrategy, n) for n in ("__init__", "setup_distributed", "_ds_init_train_model")),
        *(getattr(DeepspeedStrategy, n) for n in ("get_ds_train_config", "_ds_init_eval_model", "get_ds_eval_config")),
        *(getattr(DeepspeedStrategy, n) for n in ("save_model", "_get_model_parameters")),
    ]
    missing = set()
    for fn in code:
        src = inspect.getsource(fn)
        for m in re.finditer(r"\bargs((?:\.\w+)+)", src):
            node = args
            for part in m.group(1).strip(".").split("."):
                if part in ("muon", "adam") and isinstance(node, dict):
                    break
                if not hasattr(node, part):
                    missing.add(f"{fn.__qualname__}: args{m.group(1)}")
                    break
                node = getattr(node, part)
    assert not missing, "OpenRLHF reads settings the backend does not give it:\n" + "\n".join(sorted(missing))
    assert args.rollout.temperature == 1.0, "the roles' log-probs must be at temperature 1 (DPO), not the sampling one"
    strategy = get_strategy(args)  # builds on CPU: only setup_distributed needs CUDA
    assert strategy.stage == args.ds.zero_stage


def test_ditto_train_step_empties_the_cuda_cache(monkeypatch):
    """The policy's step leaves its full-vocabulary logits in PyTorch's cache; the step gives them back, as
    OpenRLHF's PPO step does, before vLLM wakes on the same GPU. The strategy, the actor and CUDA are stand-ins
    that record what the step calls (no GPU here)."""
    import torch

    from openrlhf_ditto.pairs import PairBatch

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    weight = torch.zeros((), requires_grad=True)
    flags = {"ditto.beta": 0.05, "ditto.label_smoothing": 0.0, "ditto.ipo": False, "ditto.nll_coef": 0.0}
    args = hierarchize(argparse.Namespace(**flags, **{"train.micro_batch_size": 1}))
    strategy = types.SimpleNamespace(
        args=args,
        accumulated_gradient=2,
        world_size=1,
        backward=lambda loss, model, optimizer: calls.append("backward"),
        optimizer_step=lambda *a, **k: calls.append("optimizer_step"),
        get_grad_norm=lambda model: 0.5,
    )

    class Actor(torch.nn.Module):
        def forward(self, sequences, action_mask, attention_mask):
            return action_mask.float() * weight

    me = types.SimpleNamespace(
        strategy=strategy,
        actor=Actor(),
        actor_optim=None,
        actor_scheduler=types.SimpleNamespace(get_last_lr=lambda: [1e-6]),
    )
    batch = PairBatch(
        sequences=torch.ones(4, 3, dtype=torch.long),
        attention_mask=torch.ones(4, 3, dtype=torch.long),
        action_mask=torch.ones(4, 2),
        ref_logps=torch.zeros(4),
        kinds=torch.zeros(2, dtype=torch.long),
        chosen_is_demo=torch.tensor([True, False]),
        truncated=torch.zeros(4, dtype=torch.bool),
    )
    out = backend.DittoPolicyActor.__ray_actor_class__.ditto_train_step(me, batch, 2, 1)
    assert calls == ["backward", "optimizer_step"] * 2 + ["empty_cache"] and out["grad_norm"] == 0.5


def test_ray_rollouts_sample_with_the_runs_top_k(tmp_path, monkeypatch):
    """OpenRLHFBackend.generate hands vLLM --rollout.top_k (default 50, the official DITTO code's) with the other
    sampling flags; its engines and policy group stood in for, no Ray."""
    from openrlhf_ditto.cli.train_ditto_ray import build_parser

    def args_of(*flags):
        argv = ["--actor.model_name_or_path", str(tmp_path), "--data.dataset", str(tmp_path / "d.jsonl"), *flags]
        return hierarchize(build_parser().parse_args(argv))

    class Engine:
        def __init__(self):
            self.params = []
            self.generate = types.SimpleNamespace(remote=self.remote)

        def remote(self, ids, params):
            self.params.append(params)
            return types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[5, 2])] * params.n)

    monkeypatch.setattr(backend.ray, "get", lambda refs: refs)
    for flags, top_k in [((), 50), (("--rollout.top_k", "-1"), -1), (("--rollout.top_k", "7"), 7)]:
        engine = Engine()
        ours = object.__new__(backend.OpenRLHFBackend)
        ours.args, ours.engines, ours.stop_token_ids = args_of(*flags), [engine], [2]
        ours.policy = types.SimpleNamespace(async_run_method=lambda name: None)
        ours.policy_states_on_gpu = True
        assert ours.generate([torch.tensor([1, 3])] * 2, 3, [""] * 2, [0, 1]) == [[[5, 2]] * 3] * 2
        assert [(p.top_k, p.top_p, p.temperature, p.n) for p in engine.params] == [(top_k, 1.0, 1.0, 3)] * 2
