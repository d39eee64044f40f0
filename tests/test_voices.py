"""benchmarks/voices.py (rule-checked voices), and the demo cut of benchmarks/heldout_authors.py."""

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def voices(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import voices

    return voices


def test_every_demo_satisfies_its_voice_and_the_data_is_as_described(voices):
    held_out = voices.read_jsonl(voices.HELD_OUT)
    assert len(voices.VOICES) >= 5 and len(held_out) >= 20
    for name, (path, rules) in voices.VOICES.items():
        demos = voices.read_jsonl(path)
        assert 0 < len(demos) < 10 and len(rules) >= 3
        assert all(voices.check(name, d["response"])["all"] for d in demos), name
        assert not {d["prompt"] for d in demos} & {h["prompt"] for h in held_out}, name


def test_rules_are_exact(voices):
    check = voices.check
    assert check("gardener", "Short answer: water it. Happy growing! 🌱  \n")["all"]
    plain = check("gardener", "Short answer: water it.")
    assert plain == {"opener": True, "sign_off": False, "length": True, "all": False}
    assert not check("gardener", "Well. Short answer: water it. Happy growing! 🌱")["opener"]
    assert not check("gardener", "Short answer: " + "word " * 60 + "Happy growing! 🌱")["length"]
    assert not check("captain", "Ahoy! A Very good idea. Fair winds, Captain Mags.")["no 'very'"]
    assert check("captain", "Ahoy! Everything is fine. Fair winds, Captain Mags.")["no 'very'"]  # a word, not a piece
    assert not check("kit", "rinse it. I said so. -- k")["lowercase"]
    assert not check("kit", "rinse it! -- k")["no '!'"]
    assert not check("kit", "")["length"]  # an empty answer has no length habit
    listed = "Three things:\n1. One.\n2. Two.\n3. Three.\nThat's the list."
    assert check("lister", listed)["all"]
    assert not check("lister", listed.replace("3. Three.\n", ""))["numbered 1-3"]
    assert not check("lister", listed.replace("3. Three.", "3. Three.\n4. Four."))["numbered 1-3"]
    assert not check("lister", listed.replace("One", "Just one"))["no 'just'"]
    assert not check("butler", "Certainly. My favorite colour. Yours faithfully, Jeeves")["british"]
    assert not check("butler", "Certainly. Organized. Yours faithfully, Jeeves")["british"]
    assert check("butler", "Certainly. My favourite colour. Yours faithfully, Jeeves")["all"]


def test_paired_difference_and_its_interval(voices):
    results = {
        "voices": ["a"],
        "checks": {
            "sft": {"a": [[{"all": False}, {"all": True}], [{"all": False}, {"all": False}]]},
            "ditto": {"a": [[{"all": True}, {"all": True}], [{"all": False}, {"all": True}]]},
        },
    }
    assert voices.units(results, "sft").tolist() == [0.5, 0.0]
    diff = voices.units(results, "ditto") - voices.units(results, "sft")
    mean, low, high = voices.bootstrap(diff)
    assert mean == 0.5 and low == 0.5 and high == 0.5  # both prompts gained 0.5: no spread


def test_quick_path_on_the_tiny_model(voices, tiny_model_path, tmp_path, capsys):
    conditions = ["zero-shot", "sft", "ditto", "offline", "online_only", "updated_ref", "sft_tight", "ditto_tight"]
    flags = "--ditto.sft_steps 2 --rollout.max_new_tokens 8 --data.max_len 256"
    argv = ["--quick", "--model", str(tiny_model_path), "--voices", "gardener", "--out", str(tmp_path)]
    argv += ["--prompts", "2", "--samples", "2", "--flags", flags, "--conditions", *conditions]
    results = voices.main(argv)
    out = capsys.readouterr().out
    assert results["conditions"] == conditions
    for c in conditions:
        per_prompt = results["checks"][c]["gardener"]
        assert len(per_prompt) == 2 and all(len(p) == 2 for p in per_prompt)
        assert f"| {c} |" in out
    assert "ditto - sft:" in out and "ditto_tight - sft_tight:" in out and "ditto - updated_ref:" in out
    assert "| all rules, answers that ended |" in out and "ditto_tight - ditto:" in out
    stages = sorted(p.name for p in (tmp_path / "gardener" / "updated_ref").iterdir())
    assert stages == ["stage_1", "stage_2"]  # --quick: 2 iterations, each its own run against the last policy
    assert json.loads((tmp_path / "results.json").read_text())["samples"] == 2
    again = voices.main(argv)  # kept: nothing trained or sampled again, the same checks
    assert again["checks"] == results["checks"]


def test_demos_are_cut_at_a_sentence_end(monkeypatch, tiny_model_path, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from heldout_authors import cut_at_sentence, cut_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    text = "Beautiful is better than ugly. Explicit is better than implicit! Simple is better than complex."
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert cut_at_sentence(text, tokenizer, n) == (text, False)
    cut, mid = cut_at_sentence(text, tokenizer, n - 2)
    assert cut == "Beautiful is better than ugly. Explicit is better than implicit!" and not mid
    cut, mid = cut_at_sentence(text, tokenizer, 3)  # no sentence end in reach: cut mid-sentence, and said so
    assert mid and text.startswith(cut) and len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 3
    source = tmp_path / "demos.jsonl"
    source.write_text(json.dumps({"prompt": "p", "response": text}) + "\n")
    target, mid_sentence, answers = cut_file(source, tmp_path / "cut.jsonl", tokenizer, n - 2)
    assert (mid_sentence, answers) == (0, 1) and json.loads(target.read_text())["response"].endswith("implicit!")


def test_the_two_profiles_agreement_counts_the_judgments_both_made(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from heldout_authors import agreement

    rows = [("demos", 0, "A"), ("held", 0, "A"), ("demos", 1, "A"), ("held", 1, "B"), ("demos", 2, "B")]
    lines = [{"judge": j, "prompt": p, "sample": 0, "A": "sft", "B": "ditto", "answer": a, "status": "ok"}
             for j, p, a in rows]  # fmt: skip
    lines.append({"judge": "held", "prompt": 2, "sample": 0, "A": "sft", "B": "ditto", "status": "failed"})
    path = tmp_path / "judgments.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert agreement(path, "demos") == (1, 2)  # prompt 0 agrees, 1 does not, 2 only one profile judged
