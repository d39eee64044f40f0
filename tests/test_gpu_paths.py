"""Code paths that only run on a GPU, checked on this CPU with CUDA mocked (torch.cuda's calls replaced by stand-ins
that record what was asked of them): where the GPU's memory is given back, and what must not touch CUDA."""

import importlib
import sys
import types

import pytest
import torch

GB = 1e9


class FakeGPU:
    """torch.cuda as far as these paths use it: 80 GB, `used` of which are held; records calls in order."""

    def __init__(self, monkeypatch):
        self.used, self.calls = 0.0, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: self.calls.append("empty_cache"))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (80 * GB - self.used, 80 * GB))


def test_eval_gives_each_conditions_engine_what_is_free(tiny_model_path, monkeypatch):
    """eval builds one vLLM engine per condition. vLLM refuses to start when its share of the GPU exceeds what is
    free, and a closed engine can leave memory behind (here 10 GB): the next one asks for what is free, after
    PyTorch's cache was emptied, and each engine is closed before the next starts, also when sampling fails."""
    from openrlhf_ditto import evaluate

    gpu = FakeGPU(monkeypatch)

    class Engine:
        alive = 0

        def __init__(self, folder, max_len, seed, share, dtype=None):
            gpu.calls.append(f"start {share:.3f}")
            if share * 80 * GB > 80 * GB - gpu.used or Engine.alive:
                raise ValueError(f"Free memory on device is less than desired GPU memory utilization ({share})")
            gpu.used += share * 80 * GB
            Engine.alive += 1

        def generate(self, ids, n, *args):
            if gpu.fail:
                raise RuntimeError("sampling failed")
            return [[[5]] * n for _ in ids]

        def close(self):
            gpu.calls.append("close")
            gpu.used, Engine.alive = 10 * GB, 0  # what the engine left behind

    monkeypatch.setitem(sys.modules, "openrlhf_ditto.backends.vllm_engine", types.SimpleNamespace(VLLMEngine=Engine))
    sampling = dict(engine="vllm", seed=1, n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=50)
    sampling["param_dtype"] = None
    gpu.fail = False
    for _ in range(2):  # two conditions
        assert len(evaluate._generate(str(tiny_model_path), ["a", "b"], sampling, 8, None)) == 2
    assert gpu.calls == ["empty_cache", "start 0.900", "close", "empty_cache", "start 0.855", "close"]
    gpu.fail, gpu.calls = True, []
    with pytest.raises(RuntimeError, match="sampling failed"):
        evaluate._generate(str(tiny_model_path), ["a"], sampling, 8, None)
    assert gpu.calls[-1] == "close"
    gpu.fail, gpu.calls = False, []
    evaluate._generate(str(tiny_model_path), ["a"], sampling, 8, 0.5)  # --vllm.gpu_memory_utilization 0.5
    assert gpu.calls == ["empty_cache", "start 0.500", "close"]


def test_a_sleeping_engine_empties_pytorchs_cache_before_it_wakes(monkeypatch):
    """vLLM's allocator cannot reclaim blocks PyTorch's caching allocator holds (the policy's step just freed them):
    the local backend's engine empties the cache before each wake-up. vLLM itself is a stand-in module here."""
    gpu = FakeGPU(monkeypatch)
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    name = "openrlhf_ditto.backends.vllm_engine"
    monkeypatch.setitem(sys.modules, name, None)  # restored (or removed) after the test
    del sys.modules[name]
    vllm_engine = importlib.import_module(name)

    class LLM:
        def wake_up(self, tags):
            gpu.calls.append(f"wake_up {tags[0]}")

        def sleep(self, level):
            gpu.calls.append("sleep")

        def generate(self, prompts, params, **kwargs):
            out = types.SimpleNamespace(token_ids=[7])
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    engine = object.__new__(vllm_engine.VLLMEngine)
    engine.llm, engine.enable_sleep, engine.adapter = LLM(), True, None
    assert engine.generate([torch.tensor([1, 2])], 1, {3}, 4, seeds=[0]) == [[[7]]]
    assert gpu.calls[:2] == ["empty_cache", "wake_up weights"] and gpu.calls[-1] == "sleep"


def test_validation_leaves_cuda_alone_where_the_process_never_used_it(monkeypatch):
    """The held-out signal forks the RNG around its sampling. In the Ray driver CUDA is available but never
    initialised (the roles hold the GPUs): forking CUDA's RNG there would initialise it. Mocked: CUDA available,
    one device, not initialised, and any read or write of its RNG fails the test."""
    from openrlhf_ditto.validation import held_out_signal

    FakeGPU(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def touched(*args, **kwargs):
        raise AssertionError("CUDA's RNG was touched")

    monkeypatch.setattr(torch.cuda, "get_rng_state", touched)
    monkeypatch.setattr(torch.cuda, "set_rng_state", touched)

    class Backend:
        def policy_logps(self, batches, runs):
            return torch.cat([-b.action_mask.sum(-1).float() for b in batches])

        reference_logps = policy_logps

        def generate(self, prompts, n, runs, seeds):
            return [[[1, 2]] * n for _ in prompts]

    prompts, demos = [torch.tensor([4, 5])], [torch.tensor([6, 7, 8])]
    before = torch.get_rng_state()
    signal = held_out_signal(Backend(), prompts, demos, 2, 0.05, 0, 8, seed=3)
    assert signal["margin"] == 0.0 and torch.equal(torch.get_rng_state(), before)


def test_bf16_batching_noise_at_step_0_is_below_what_the_loss_notices(tiny_model_path):
    """At step 0 the policy is the reference, so every DPO logit z = (pi_c - pi_r) - (ref_c - ref_r) should be 0;
    in bf16 the reference's micro-batch of 6 rows and the policy's pair micro-batches pad differently, and other
    kernels round differently. The loss -log sigmoid(beta z) must not notice: beta |z| below 0.02 moves the loss by
    under 1.5% of log 2 and its gradient weight sigmoid(-beta z) by under 1%. (SmolLM2-135M in bf16 on this CPU:
    beta |z| at most 0.017, README: Memory and GPU numerics.)"""
    from transformers import AutoModelForCausalLM

    from openrlhf_ditto.loss import sequence_logps
    from openrlhf_ditto.pairs import collate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 300, (int(n),), generator=g) for n in torch.randint(3, 30, (6,), generator=g)]
    responses = [torch.randint(4, 300, (int(n),), generator=g) for n in torch.randint(2, 40, (6,), generator=g)]
    with torch.no_grad():
        reference = sequence_logps(model, collate(prompts, responses, 0)).float()
        # pair micro-batches: chosen row i with rejected row i + 3
        policy = torch.cat([
            sequence_logps(model, collate([prompts[i], prompts[i + 3]], [responses[i], responses[i + 3]], 0)).float()
            for i in range(3)
        ])  # fmt: skip
    z = (policy[0::2] - policy[1::2]) - (reference[:3] - reference[3:])
    assert (0.05 * z.abs().max()).item() < 0.02
