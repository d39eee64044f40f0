"""The pipeline on every model family users train (tests/families.py: Mistral-v0.2/Llama-2 SentencePiece in the old
and the transformers 5 tokenizer layout, Llama-3, Qwen2.5, Gemma): how a demo ends, what sampling stops on, what
the reference scores, what serve-reward scores, which tokens the local judge reads, what train_dpo makes of the
export, external pairs and eval."""

import json
import os
import re
import shutil

os.environ.setdefault("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")  # train_dpo imports openrlhf.models (CPU install)

import pytest  # noqa: E402
import torch  # noqa: E402
from families import build_family  # noqa: E402
from jinja2 import TemplateError  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from openrlhf_ditto.backends.sampling import sample_responses  # noqa: E402
from openrlhf_ditto.cli.main import main  # noqa: E402
from openrlhf_ditto.demos import load_demos, load_preference_pairs  # noqa: E402
from openrlhf_ditto.experience import DittoExperienceMaker  # noqa: E402
from openrlhf_ditto.judges import judge_local, messages  # noqa: E402
from openrlhf_ditto.loss import sequence_logps  # noqa: E402
from openrlhf_ditto.models import eos_token_ids  # noqa: E402
from openrlhf_ditto.pairs import PairSampler, collate  # noqa: E402
from openrlhf_ditto.reward import DittoReward  # noqa: E402
from openrlhf_ditto.store import SampleStore  # noqa: E402
from openrlhf_ditto.turns import end_of_turn  # noqa: E402

QUESTIONS = ["What is better?", "Tell me about errors.", "Namespaces?"]
ANSWERS = [
    "Explicit is better than implicit.",
    "Errors should never pass silently.",
    "Namespaces are one honking great idea.",
]


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def write_demos(path, prompts=QUESTIONS, answers=ANSWERS):
    path.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in zip(prompts, answers)))
    return path


def test_end_of_turn_and_stop_tokens_come_from_the_template(family):
    spec, path = family
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.convert_ids_to_tokens(end_of_turn(tokenizer)) == spec.end_of_turn
    assert tokenizer.eos_token == spec.eos
    assert eos_token_ids(path, tokenizer) == set(tokenizer.convert_tokens_to_ids(list(spec.stops)))
    tokenizer.chat_template = None  # no template, no turn: the EOS
    assert end_of_turn(tokenizer) == tokenizer.eos_token_id


def test_demos_end_as_the_template_ends_an_assistant_turn(family, tmp_path):
    spec, path = family
    tokenizer = AutoTokenizer.from_pretrained(path)
    file = write_demos(tmp_path / "demos.jsonl")
    for demo, question, answer in zip(load_demos(file, tokenizer, apply_chat_template=True), QUESTIONS, ANSWERS):
        assert demo.prompt == chat_prompt(tokenizer, question)
        assert tokenizer.convert_ids_to_tokens(demo.response_ids[-1]) == spec.end_of_turn
        # the demo's tokens are the assistant turn exactly as the template writes it after the prompt
        turn = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rendered = tokenizer.apply_chat_template(turn, tokenize=False)
        assert rendered.startswith(demo.prompt)
        assert tokenizer.decode(demo.response_ids) == rendered[len(demo.prompt) :].rstrip("\n")
    # plain prompts (--data.input_template): no chat turn, the response ends with the EOS
    plain = load_demos(file, tokenizer, input_template="User: {}\nAssistant: ")
    assert [d.response_ids[-1] for d in plain] == [tokenizer.eos_token_id] * len(QUESTIONS)


def test_sampling_stops_on_the_turn_end_even_where_the_generation_config_omits_it(family, tmp_path, one_thread):
    spec, path = family
    # as Llama-3-8B-Instruct's first release: generation_config.json names only the EOS
    folder = shutil.copytree(path, tmp_path / "model")
    config = json.loads((folder / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config["eos_token_id"] = tokenizer.eos_token_id
    (folder / "generation_config.json").write_text(json.dumps(config))
    end = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    stops = eos_token_ids(folder, tokenizer)
    assert end in stops

    # a model that ends its turn after a few tokens: the turn end's logit rises with the position
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    step = {"n": 0}

    def push_the_end(module, inputs, logits):
        step["n"] += 1
        logits[..., end] += 30.0 * (step["n"] >= 4)

    model.lm_head.register_forward_hook(push_the_end)
    prompts = [
        torch.tensor(tokenizer(chat_prompt(tokenizer, q), add_special_tokens=False)["input_ids"]) for q in QUESTIONS
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(0)
    rollouts = sample_responses(model, prompts, 2, pad, stops, max_new_tokens=12)
    assert all(len(r) == 4 and r[-1] == end for group in rollouts for r in group)
    store = SampleStore.from_demos([p.tolist() for p in prompts], [[end]] * 3, [False] * 3)
    no_reference = lambda batches, runs: torch.zeros(sum(len(b.sequences) for b in batches))  # noqa: E731
    maker = DittoExperienceMaker(store, PairSampler(store), no_reference, pad, stops)
    assert maker.make_experience(rollouts)["samples/truncated_rate"] == 0.0  # finished, as the demos are


def test_reference_scores_each_response_with_its_end_token_whatever_the_padding(family, tmp_path, one_thread):
    spec, path = family
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    questions = ["Hi?", "Tell me everything about errors, namespaces and beauty, please.", "Namespaces?"]
    demos = load_demos(write_demos(tmp_path / "demos.jsonl", questions), tokenizer, apply_chat_template=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts, responses = [torch.tensor(d.prompt_ids) for d in demos], [torch.tensor(d.response_ids) for d in demos]
    batch = collate(prompts, responses, pad)
    assert batch.action_mask.sum(-1).tolist() == [len(d.response_ids) for d in demos]  # the end token is scored
    with torch.no_grad():
        together = sequence_logps(model, batch)
        alone = torch.cat([sequence_logps(model, collate([p], [r], pad)) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-5)


def test_an_empty_prompt_starts_from_bos_or_is_refused(family, tmp_path, one_thread):
    spec, path = family
    tokenizer = AutoTokenizer.from_pretrained(path)
    file = write_demos(tmp_path / "demos.jsonl", ["", "What is better?"], ANSWERS[:2])
    if spec.bos is None:  # Qwen2.5: nothing to predict the first response token from
        with pytest.raises(ValueError, match=r"record 0: the prompt is '', no tokens, and the tokenizer has no BOS"):
            load_demos(file, tokenizer)
        return
    demos = load_demos(file, tokenizer)
    assert demos[0].prompt_ids == [tokenizer.bos_token_id]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts, responses = [torch.tensor(d.prompt_ids) for d in demos], [torch.tensor(d.response_ids) for d in demos]
    with torch.no_grad():  # its first token is predicted from BOS, never from a padding position
        alone = sequence_logps(model, collate(prompts[:1], responses[:1], 0))
        beside_a_longer_prompt = sequence_logps(model, collate(prompts, responses, 0))[:1]
    torch.testing.assert_close(alone, beside_a_longer_prompt, atol=1e-4, rtol=1e-5)


def test_reward_is_the_log_ratio_on_the_rollouts_own_tokens(family, tmp_path, one_thread):
    """OpenRLHF sends query = decode(prompt ids + response ids); the server must score exactly those ids."""
    spec, path = family
    reference = build_family(spec.name, tmp_path / "reference", seed=1)
    reward = DittoReward(path, reference, beta=0.1, max_len=256)
    tokenizer = reward.tokenizer
    end = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    texts = [ANSWERS[0], "\n" + ANSWERS[1], " " + ANSWERS[2], "Now is better than never"]  # the last one is cut
    prompts, rollouts = [], []
    for i, text in enumerate(texts):
        prompt = chat_prompt(tokenizer, QUESTIONS[i % len(QUESTIONS)])  # as OpenRLHF's PromptDataset renders it
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        whole = tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
        assert whole[: len(prompt_ids)] == prompt_ids
        prompts.append(prompt)
        rollouts.append((prompt_ids, whole[len(prompt_ids) :] + [end] * (i < 3)))  # the tokens a model emits
    queries = [tokenizer.decode(p + r, skip_special_tokens=False) for p, r in rollouts]  # openrlhf/utils/agent.py
    items = reward.tokenize(queries, prompts)
    assert items == rollouts
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [
            0.1 * (sequence_logps(policy, batch) - sequence_logps(ref, batch)).item()
            for batch in (collate([torch.tensor(p)], [torch.tensor(r)], 0) for p, r in rollouts)
        ]
    assert reward(items) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match=r"prompts\[0\] is '', no tokens"):
        reward.tokenize([ANSWERS[0]], [""])


def test_local_judge_reads_the_letters_that_follow_its_context(family, one_thread):
    spec, path = family
    judgments = [
        ("Explicit is better than implicit.", "Flat is better than nested.", "Readability counts."),
        ("Errors should never pass silently.", "Now is better than never.", "Sparse is better than dense, really."),
    ]
    results = {}
    judge_local(judgments, results.__setitem__, path, batch_size=2)

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for i, judgment in enumerate(judgments):
        try:
            text = tokenizer.apply_chat_template(messages(judgment), tokenize=False, add_generation_prompt=True)
        except TemplateError:  # Mistral-v0.2 and Gemma refuse a system message: the user message alone
            assert spec.name in ("mistral", "mistral-legacy", "gemma")
            text = tokenizer.apply_chat_template(messages(judgment)[1:], tokenize=False, add_generation_prompt=True)
        context = tokenizer(text + '{"answer": "', add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            probs = model(torch.tensor([context])).logits[0, -1].softmax(-1)
        letters = []
        for letter in "AB":
            ids = tokenizer(text + '{"answer": "' + letter, add_special_tokens=False)["input_ids"]
            assert ids[:-1] == context and tokenizer.convert_ids_to_tokens(ids[-1]) == letter  # "A", never "▁A"
            letters.append(ids[-1])
        assert results[i]["status"] == "ok"
        assert (results[i]["p_a"], results[i]["p_b"]) == pytest.approx(probs[letters].tolist(), rel=1e-4)


def test_external_pairs_end_as_demos_do(family, tmp_path):
    spec, path = family
    tokenizer = AutoTokenizer.from_pretrained(path)
    end = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                    "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "No."}],
                }
            )
            + "\n"
            for q, a in zip(QUESTIONS, ANSWERS)
        )
    )
    text = tmp_path / "text.jsonl"
    text.write_text(
        "".join(json.dumps({"q": q, "chosen": a, "rejected": "No."}) + "\n" for q, a in zip(QUESTIONS, ANSWERS))
    )
    for pairs in (
        load_preference_pairs(chat, tokenizer),
        load_preference_pairs(text, tokenizer, prompt_key="q", apply_chat_template=True),
    ):
        for (chosen, rejected), question in zip(pairs, QUESTIONS):
            assert chosen.prompt == rejected.prompt == chat_prompt(tokenizer, question)
            assert chosen.response_ids[-1] == rejected.response_ids[-1] == end


@pytest.fixture(scope="module")
def runs(family_paths, tmp_path_factory):
    """A finished DITTO run (LoRA, chat template) per family, on the Zen's questions; samples are cut at 12 tokens."""
    root = tmp_path_factory.mktemp("family-runs")
    demos = write_demos(root / "demos.jsonl")
    out = {}
    for name, path in family_paths.items():
        out[name] = root / name
        main(
            ["train", "--actor.model_name_or_path", str(path), "--data.dataset", str(demos),
             "--ckpt.output_dir", str(out[name]), "--data.apply_chat_template", "--data.max_len", "96",
             "--rollout.max_new_tokens", "12", "--rollout.n_samples_per_prompt", "2", "--ditto.iterations", "2",
             "--ditto.resample_every", "1", "--ditto.sft_steps", "1", "--actor.adam.lr", "1e-2",
             "--train.batch_size", "6", "--train.micro_batch_size", "3", "--ds.lora.rank", "4"]
        )  # fmt: skip
    return out


@pytest.mark.slow
def test_export_read_back_by_train_dpo_with_the_printed_flags(family, runs, tmp_path, monkeypatch, capsys):
    from test_export import openrlhf_dpo_dataset

    spec, _ = family
    run, out = runs[spec.name], tmp_path / "pairs.jsonl"
    capsys.readouterr()
    main(["export-pairs", str(run), "--out", str(out)])
    printed = capsys.readouterr().out
    flags = re.search(r"python -m openrlhf\.cli\.train_dpo (.+?) \(", printed).group(1).split()
    tokenizer = AutoTokenizer.from_pretrained(run / "reference")
    appended = len(tokenizer(" " + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
    assert flags[flags.index("--data.max_len") + 1] == str(96 + appended)  # the run's, plus train_dpo's " EOS"
    dataset = openrlhf_dpo_dataset(monkeypatch, [*flags, "--model.model_name_or_path", str(run / "reference")])

    store = SampleStore.load(run / "store")
    fractions = json.loads((run / "run_config.json").read_text())["ditto"]["pair_fractions"]
    fractions = tuple(f / sum(fractions) for f in fractions)  # as the export renormalises them (to its --kinds)
    pairs = PairSampler(store, fractions, seed=42).sample(2 * 6)  # what the export drew: 2 steps x 6 pairs
    assert len(pairs) == len(dataset)
    changed, why = 0, []
    for i, pair in enumerate(pairs):
        chosen_ids, _, rejected_ids, _, _ = dataset[i]
        prompt = store.prompt_of(pair.chosen).tolist()
        for got, response in ((chosen_ids[0].tolist(), pair.chosen), (rejected_ids[0].tolist(), pair.rejected)):
            if got != prompt + response.ids.tolist():
                changed += 1
                why.append(response.truncated or response.ids[-1] != tokenizer.eos_token_id)
            else:  # a response train_dpo reads back as the run's own tokens is finished with the EOS
                assert not response.truncated and response.ids[-1] == tokenizer.eos_token_id
    note = re.search(r"train_dpo trains (\d+) of the (\d+) responses on other tokens", printed)
    assert (int(note.group(1)) if note else 0) == changed  # the count is every row whose tokens change
    if spec.end_of_turn != spec.eos:  # every response but one that sampled the EOS itself ends in another token
        responses = [r for pair in pairs for r in (pair.chosen, pair.rejected)]
        assert changed == sum(r.truncated or r.ids[-1] != tokenizer.eos_token_id for r in responses) and all(why)
        assert changed >= len(pairs)  # the demos end with the turn's end


@pytest.mark.slow
def test_eval_with_the_family_as_its_own_judge(family, runs, tmp_path):
    spec, path = family
    run = runs[spec.name]
    held_out = write_demos(tmp_path / "held_out.jsonl", QUESTIONS[:2], ANSWERS[1:])
    main(["eval", "--run", str(run), "--data.dataset", str(held_out), "--conditions", "zero-shot", "sft", "ditto",
          "--judge", "local", "--judge.model", str(path), "--rollout.n_samples_per_prompt", "2",
          "--rollout.max_new_tokens", "8", "--output_dir", str(tmp_path / "eval")])  # fmt: skip
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    # 3 pairs of conditions x 2 prompts x 2 samples, each judged in both orders, every judgment answered (Gemma's
    # and Mistral's templates refuse the judge's system message)
    assert results["comparisons"] == {"total": 3 * 2 * 2, "left_out": 0}
    assert results["judgments"]["total"] == results["judgments"].get("ok", 0) > 0
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "generations" / "ditto.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [chat_prompt(tokenizer, q) for q in QUESTIONS[:2]]
