"""bf16 as GPUs run it, on this CPU (`--ds.param_dtype bf16`): a DITTO update at the recipes' lr reaches the
policy's log-probs, what the in-process vLLM engine samples from after a weight sync, and `final/`; full-parameter
training keeps fp32 master weights. The tiny model's weights are N(0, 0.02), as a 7B model's: a LoRA update below
half a bf16 ulp of them (the paper's lr 1e-6 over 10 steps) rounds away, which `test_lr_whose_update_rounds_away`
shows the measurement can see."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from openrlhf_ditto.backends.local import LocalBackend
from openrlhf_ditto.cli.args import hierarchize
from openrlhf_ditto.cli.main import build_parser
from openrlhf_ditto.loss import sequence_logps
from openrlhf_ditto.pairs import PairSampler, collate, collate_pairs
from openrlhf_ditto.store import DEMO, Response, SampleStore

STEPS = 10  # one iteration of the recipes' --ditto.resample_every


def backend_args(model, dtype: str, *flags: str):
    argv = ["train", "--actor.model_name_or_path", str(model), "--data.dataset", "demos.jsonl",
            "--ds.param_dtype", dtype, "--ditto.iterations", "1", "--ditto.resample_every", str(STEPS),
            "--train.batch_size", "8", *flags]  # fmt: skip
    return hierarchize(build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def store():
    """4 prompts, each with a demo and 4 samples of the same iteration: the same pairs for every run."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 380, (n,), generator=g).tolist() for n in (5, 8, 6, 9)]
    demos = [Response(p, torch.randint(4, 380, (12,), generator=g), 0.0, False, DEMO) for p in range(4)]
    store = SampleStore(prompts, demos)
    store.add_iteration(
        [Response(p, torch.randint(4, 380, (10,), generator=g), 0.0, False, 0) for p in range(4) for _ in range(4)]
    )
    return store


def responses_of(store) -> list[Response]:
    return store.demos + [r for group in store.iterations[0] for r in group]


def rows(store):
    responses = responses_of(store)
    return [store.prompt_of(r) for r in responses], [r.ids for r in responses]


def train(backend, store) -> None:
    """STEPS DITTO steps from pi_0 on pairs drawn with a fixed seed, reference log-probs from this backend."""
    prompts, responses = rows(store)
    ref = backend.reference_logps([collate(prompts, responses, backend.pad)], [[""] * len(prompts)])
    for r, logp in zip(responses_of(store), ref.tolist()):
        r.ref_logp = logp
    sampler = PairSampler(store, seed=0)
    for _ in range(STEPS):
        backend.train_step({"": collate_pairs(sampler.sample(8), store, backend.pad)})


def logratio(backend, store) -> torch.Tensor:
    """log pi - log pi_ref of every stored row, as the loss sees it."""
    prompts, responses = rows(store)
    batch, runs = collate(prompts, responses, backend.pad), [[""] * len(prompts)]
    return backend.policy_logps([batch], runs) - backend.reference_logps([batch], runs)


def engine_logps(backend, prompts, responses) -> torch.Tensor:
    """The vLLM engine's log-probs of the rows through the adapter the last sampling synced (the run's policy)."""
    from vllm.lora.request import LoRARequest

    i = backend.loaded[""]
    request = LoRARequest(f"run{i}", i, str(Path(backend.sync_dir.name) / f"run{i}"))
    return backend.vllm.logps(prompts, responses, lora_requests=[request] * len(prompts))


def share(d: torch.Tensor, d32: torch.Tensor) -> float:
    """The projection of a change on the fp32 one: 1 = all of it arrived, 0 = rounded away."""
    return ((d * d32).sum() / (d32 * d32).sum()).item()


def survival(model_path, store, tmp_path, lr: str) -> dict[str, float]:
    """Shares of the fp32-trained update that a bf16-trained policy's log-probs, its vLLM engine (bf16, after the
    weight sync) and its final/ (merged in bf16, scored in fp32 against reference/) keep."""
    pytest.importorskip("vllm")
    from openrlhf_ditto.backends.vllm_engine import VLLMEngine

    fp32 = LocalBackend(model_path, backend_args(model_path, "fp32", "--actor.adam.lr", lr))
    fp32.add_run("")
    torch.manual_seed(0)  # the fresh adapter's A: the same in both runs, as the trainer seeds it
    fp32.freeze_reference("", None)
    train(fp32, store)
    d32 = logratio(fp32, store)

    args = backend_args(model_path, "bf16", "--actor.adam.lr", lr, "--rollout.engine", "vllm",
                        "--vllm.gpu_memory_utilization", "0.02", "--rollout.max_new_tokens", "1",
                        "--data.max_len", "64")  # fmt: skip
    bf16 = LocalBackend(model_path, args)
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    bf16.add_run("")
    torch.manual_seed(0)
    bf16.freeze_reference("", tmp_path / "reference")
    prompts, responses = rows(store)
    bf16.generate(prompts[:1], 1, [""], [0])  # builds the engine at pi_0
    assert isinstance(bf16.vllm, VLLMEngine) and bf16.vllm.dtype == torch.bfloat16
    before = engine_logps(bf16, prompts, responses)
    train(bf16, store)
    policy = logratio(bf16, store)
    bf16.generate(prompts[:1], 1, [""], [0])  # syncs the policy's adapter, as before each iteration's sampling
    engine = engine_logps(bf16, prompts, responses) - before
    bf16.vllm.close()
    bf16.save_model("", tmp_path / "final")

    batch = collate(prompts, responses, bf16.pad)

    def scored(folder):
        with torch.no_grad():
            return sequence_logps(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), batch)

    final = scored(tmp_path / "final") - scored(tmp_path / "reference")
    shares = {"policy": share(policy, d32), "vllm": share(engine, d32), "final": share(final, d32)}
    print(f"lr {lr}: fp32 change {d32.abs().mean():.4f} nats a row; shares in bf16 {shares}")
    return shares


@pytest.mark.slow
def test_update_at_the_recipes_lr_reaches_policy_vllm_and_final(tiny_model_path, store, tmp_path, one_thread):
    args = backend_args(tiny_model_path, "bf16")
    assert args.ds.lora.rank > 0 and args.actor.adam.lr == 3e-5  # the LoRA default, as the recipes give it
    shares = survival(tiny_model_path, store, tmp_path, "3e-5")
    assert all(s > 0.9 for s in shares.values()), shares  # seen: 1.01, 0.99, 1.00


@pytest.mark.slow
def test_lr_whose_update_rounds_away(tiny_model_path, store, tmp_path, one_thread):
    """The paper's 1e-6 with LoRA: the measurement above sees it lost in all three places."""
    shares = survival(tiny_model_path, store, tmp_path, "1e-6")
    assert all(s < 0.5 for s in shares.values()), shares  # seen: 0.13, -0.15, 0.12


def test_full_parameter_bf16_step_moves_the_weights_an_fp32_step_moves(tiny_model_path, store, one_thread):
    """At the full-parameter default lr 1e-6 a bf16 parameter (|w| > 2.4e-4) cannot move by itself: the optimiser
    steps fp32 master weights, and the bf16 weights the forward uses are those rounded."""
    moved = {}
    for dtype in ("fp32", "bf16"):
        backend = LocalBackend(tiny_model_path, backend_args(tiny_model_path, dtype, "--ds.lora.rank", "0"))
        assert backend.args.actor.adam.lr == 1e-6
        backend.add_run("")
        backend.freeze_reference("", None)
        weights = backend.optimizers[""][0].param_groups[0]["params"]  # what the optimiser steps
        start = [w.detach().float().clone() for w in weights]
        train(backend, store)
        moved[dtype] = torch.cat([(w.detach().float() - s).flatten() for w, s in zip(weights, start)])
        if dtype == "bf16":
            for p in backend.model.parameters():
                assert p.dtype == torch.bfloat16
            for p, w in zip(backend._trainable(""), weights):
                assert torch.equal(p, w.to(torch.bfloat16)), "the forward's weights are the masters rounded"
    cosine = torch.nn.functional.cosine_similarity(moved["fp32"], moved["bf16"], dim=0).item()
    assert cosine > 0.9 and (moved["bf16"] != 0).float().mean() > 0.5, cosine


@pytest.mark.parametrize(("lr", "warned"), [("1e-6", True), ("3e-5", False)])
def test_warns_once_when_the_update_is_lost_to_rounding(tiny_model_path, tmp_path, capsys, one_thread, lr, warned):
    """logratio_abs (mean |log pi - log pi_ref| of a step's rows) is logged; at the paper's lr in bf16 it is still at
    the end of iteration 1 where one step put it (rounding noise: 0.002-0.005 here, where 3e-5 grows from 0.003 to
    0.16), and the run says so once, naming the flag."""
    import json

    from openrlhf_ditto.cli.main import main

    demos = tmp_path / "demos.jsonl"
    texts = ["Beautiful is better than ugly.", "Simple is better than complex.", "Flat is better than nested."]
    demos.write_text("".join(json.dumps({"prompt": f"Say {i}", "response": t}) + "\n" for i, t in enumerate(texts)))
    main(["train", "--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", str(demos),
          "--ckpt.output_dir", str(tmp_path / "run"), "--data.apply_chat_template", "--ds.param_dtype", "bf16",
          "--actor.adam.lr", lr, "--ditto.sft_steps", "0", "--ditto.iterations", "2", "--ditto.resample_every", "5",
          "--rollout.n_samples_per_prompt", "3", "--rollout.max_new_tokens", "16", "--data.max_len", "64",
          "--train.batch_size", "8", "--rollout.engine", "torch"])  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shifts = [r["logratio_abs"] for r in rows if r["prefix"] == "train"]
    err = capsys.readouterr().err
    print(f"lr {lr}: logratio_abs per step {[f'{s:.2g}' for s in shifts]}")
    assert err.count("update is lost to rounding; raise --actor.adam.lr") == warned, err


def test_serve_reward_and_eval_run_in_bf16(tiny_model_path, one_thread):
    """--ds.param_dtype reaches serve-reward's models and eval's sampler: both run in bf16 on a CPU."""
    from openrlhf_ditto.cli.main import build_parser
    from openrlhf_ditto.evaluate import _generate
    from openrlhf_ditto.reward import DittoReward

    served = hierarchize(build_parser().parse_args(["serve-reward", "--ds.param_dtype", "bf16"]))
    reward = DittoReward(tiny_model_path, tiny_model_path, beta=0.1, dtype=served.ds.param_dtype)
    assert reward.policy.dtype == torch.bfloat16 and reward.reference.dtype == torch.bfloat16
    assert reward(reward.tokenize(["Errors should never pass silently."], ["Errors"])) == [0.0]  # pi is pi_ref
    sampling = dict(n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=50, seed=0, engine="torch")
    sampling["param_dtype"] = "bf16"
    generations = _generate(str(tiny_model_path), ["Beautiful is"], sampling, 1, None)
    assert len(generations[0]["samples"]) == 2
