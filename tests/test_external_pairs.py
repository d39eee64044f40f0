"""External preference pairs (--ditto.extra_pairs): read as OpenRLHF train_dpo reads them, a fourth share of every
batch, each response scored by the reference once, kept across resume, and bad files refused as demos are."""

import json
from collections import Counter

import pytest
from test_trainer import DEMOS, cli_args, run
from transformers import AutoTokenizer

from openrlhf_ditto.backends.local import LocalBackend
from openrlhf_ditto.cli.main import main
from openrlhf_ditto.demos import load_preference_pairs
from openrlhf_ditto.store import SampleStore

CHAT_PAIRS = [
    {
        "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
        "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}],
    }
    for q, good, bad in [
        ("Is flat better?", "Flat is better than nested.", "Nested is best."),
        ("Is flat better?", "Sparse is better than dense.", "Dense, always."),
        ("Should errors pass?", "Errors should never pass silently.", "Ignore them all."),
    ]
]
TEXT_PAIRS = [
    {"question": "Explicit or implicit?", "good": "Explicit is better than implicit.", "bad": "Implicit, surely."},
    {"question": "Simple or complex?", "good": "Simple is better than complex.", "bad": "Complex is fine."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def openrlhf_prompt(record, tokenizer, **keys) -> str:
    """The prompt OpenRLHF's own DPO preprocessing renders for a record (train_dpo: is_dpo=True)."""
    from openrlhf.datasets.reward_dataset import preprocess_data

    prompt, chosen, rejected, _ = preprocess_data(
        record, apply_chat_template=tokenizer.apply_chat_template, is_dpo=True, **keys
    )
    return prompt


def test_chat_pairs_read_as_train_dpo_reads_them(tokenizer, tmp_path):
    pairs = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", CHAT_PAIRS), tokenizer)
    for (chosen, rejected), record in zip(pairs, CHAT_PAIRS):
        assert chosen.prompt == rejected.prompt == openrlhf_prompt(record, tokenizer)
        assert chosen.prompt_ids == tokenizer(chosen.prompt, add_special_tokens=False)["input_ids"]
        assert (
            chosen.response == record["chosen"][-1]["content"]
            and rejected.response == record["rejected"][-1]["content"]
        )
        ids = tokenizer(chosen.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert chosen.response_ids == ids and not chosen.truncated


def test_pairs_with_a_prompt_key_read_as_train_dpo_reads_them(tokenizer, tmp_path):
    # chat: the prompt's messages apart, each response a one-message conversation
    chat = [
        {
            "prompt": [{"role": "user", "content": r["question"]}],
            "chosen": [{"role": "assistant", "content": r["good"]}],
            "rejected": [{"role": "assistant", "content": r["bad"]}],
        }
        for r in TEXT_PAIRS
    ]
    pairs = load_preference_pairs(write_jsonl(tmp_path / "chat.jsonl", chat), tokenizer, prompt_key="prompt")
    for (chosen, rejected), record in zip(pairs, chat):
        assert chosen.prompt == rejected.prompt == openrlhf_prompt(record, tokenizer, prompt_key="prompt")
        assert (chosen.response, rejected.response) == (
            record["chosen"][0]["content"],
            record["rejected"][0]["content"],
        )

    # text, with an input template
    from openrlhf.datasets.reward_dataset import preprocess_data

    keys = dict(prompt_key="question", chosen_key="good", rejected_key="bad")
    path = write_jsonl(tmp_path / "text.jsonl", TEXT_PAIRS)
    pairs = load_preference_pairs(path, tokenizer, input_template="Q: {}\nA: ", **keys)
    for (chosen, rejected), record in zip(pairs, TEXT_PAIRS):
        assert (chosen.prompt, chosen.response, rejected.response) == preprocess_data(
            record, input_template="Q: {}\nA: ", is_dpo=True, **keys
        )[:3]

    # text with --data.apply_chat_template (train_dpo would need messages): the prompt as a user turn, as for demos
    pairs = load_preference_pairs(path, tokenizer, apply_chat_template=True, **keys)
    user = [{"role": "user", "content": TEXT_PAIRS[0]["question"]}]
    assert pairs[0][0].prompt == tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize(
    "records, keys, expected",
    [
        (TEXT_PAIRS, {}, r"record 0: no key 'chosen', 'rejected'; its keys are \['bad', 'good', 'question'\]\. "),
        (TEXT_PAIRS, {"chosen_key": "good", "rejected_key": "bad"}, r"text pairs need their prompt apart.*--data\."),
        (
            [{**CHAT_PAIRS[0], "rejected": [{"role": "user", "content": "Other?"}, CHAT_PAIRS[0]["rejected"][1]]}],
            {},
            r"record 0: the chosen and rejected conversations differ before their last message",
        ),
        ([{"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}], {"prompt_key": "prompt"}, r"the same text"),
        ([{"prompt": "Hi", "chosen": "Hello", "rejected": ""}], {"prompt_key": "prompt"}, r"rejected response is ''"),
    ],
)
def test_bad_pairs_are_refused_naming_record_and_flag(tokenizer, tmp_path, records, keys, expected):
    path = write_jsonl(tmp_path / "p.jsonl", records)
    with pytest.raises(ValueError, match=expected) as info:
        load_preference_pairs(path, tokenizer, **keys)
    assert str(info.value).startswith(f"--ditto.extra_pairs: {path}, record ")


def test_a_broken_pairs_file_is_one_line(tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(CHAT_PAIRS[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"^--ditto.extra_pairs: .*p\.jsonl, line 2: not valid JSON"):
        load_preference_pairs(path, tokenizer)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--ditto.pair_fractions", "0.6", "0.2", "0.1", "0.1"], "need both --ditto.extra_pairs"),
        (["--ditto.extra_pairs", "x.jsonl"], "need both --ditto.extra_pairs"),
        (["--ditto.pair_fractions", "0.6", "0.4"], "give 3 shares"),
    ],
)
def test_external_flags_go_together(tiny_model_path, tmp_path, capsys, flags, expected):
    with pytest.raises(SystemExit) as e:
        main(cli_args(tiny_model_path, tmp_path / "demos.jsonl", tmp_path / "run", *flags))
    assert e.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.slow
def test_ditto_with_external_pairs_end_to_end_and_resumed(tiny_model_path, tmp_path):
    demos = write_jsonl(tmp_path / "demos.jsonl", DEMOS)
    extra = write_jsonl(tmp_path / "pairs.jsonl", CHAT_PAIRS)
    out = tmp_path / "run"
    flags = ["--ditto.extra_pairs", str(extra), "--ditto.pair_fractions", "0.5", "0.2", "0.1", "0.2"]
    scored = Counter()
    real = LocalBackend.reference_logps

    def counting(self, batches, runs):
        for batch in batches:
            for row, mask in zip(batch.sequences, batch.attention_mask):
                scored[tuple(row[mask.bool()].tolist())] += 1
        return real(self, batches, runs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalBackend, "reference_logps", counting)
        run(cli_args(tiny_model_path, demos, out, *flags))  # 2 iterations of 2 steps of 10 pairs
        run(cli_args(tiny_model_path, demos, out, *flags, "--resume", "--ditto.iterations", "3"))

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    counts = [
        tuple(r[f"{k}/count"] for k in ("online", "replay", "inter_model", "external"))
        for r in rows
        if r["prefix"] == "train"
    ]
    assert counts == [(8, 0, 0, 2)] * 2 + [(5, 2, 1, 2)] * 4  # iteration 0 has no history: its shares go online
    assert all("external/acc" in r and "external/margin" in r for r in rows if r["prefix"] == "train")

    store = SampleStore.load(out / "store")
    assert len(store.external) == 3 and (out / "store" / "external.json").exists()
    for chosen, rejected in store.external:  # scored once, in the first run; the resumed run read them back
        for r in (chosen, rejected):
            assert scored[tuple(store.prompt_of(r).tolist() + r.ids.tolist())] == 1
            assert r.ref_logp == r.ref_logp  # not NaN
    samples = [s for it in store.iterations for group in it for s in group]
    assert len(samples) == 3 * 3 * 3  # 3 iterations x 3 demo prompts x M=3: never sampled for external prompts
