"""The held-out signal on the tiny model: held-out demos, DITTO's implicit reward on them per iteration, and what
the end of a run says."""

import json

import pytest
import torch
from test_trainer import DEMOS, cli_args, error_of, run

from openrlhf_ditto.loss import sequence_logps
from openrlhf_ditto.pairs import collate


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    for name, rows in {"all": DEMOS, "train": DEMOS[:-1], "held_out": DEMOS[-1:]}.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in rows))
    return root


def rows_of(out, prefix: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["prefix"] == prefix]


def test_held_out_demos_are_measured_and_never_trained_on(tiny_model_path, files, tmp_path):
    held = tmp_path / "held"
    run(cli_args(tiny_model_path, files / "all.jsonl", held, "--ditto.val_demos", "1"))
    val = rows_of(held, "val")
    assert [r["iteration"] for r in val] == [0, 1, 2] and val[0]["margin"] == 0.0
    assert {"margin", "acc", "demo_reward", "sample_reward", "demo_logp_per_token"} <= set(val[1])
    assert all(0 <= r["acc"] <= 1 for r in val[1:]) and len({r["margin"] for r in val}) == 3

    # the last demo is held out: the store has the other three, and pi_0's reading of the held-out demo is the
    # reference's own log-likelihood of it
    demos = json.loads((held / "store" / "demos.json").read_text())
    assert len(demos["demos"]) == 3
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(held / "reference")
    chat = [{"role": "user", "content": DEMOS[-1]["prompt"]}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    response = tokenizer(DEMOS[-1]["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = [torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"]), torch.tensor(response[:24])]
    reference = AutoModelForCausalLM.from_pretrained(held / "reference")
    with torch.no_grad():
        expected = sequence_logps(reference, collate(ids[:1], ids[1:], tokenizer.pad_token_id)).item() / len(ids[1])
    assert val[0]["demo_logp_per_token"] == pytest.approx(expected, rel=1e-4)

    # the same held-out demo from its own file gives the same signal; and validation changes nothing of training
    given = tmp_path / "given"
    run(cli_args(tiny_model_path, files / "train.jsonl", given, "--ditto.val_dataset", str(files / "held_out.jsonl")))
    plain = tmp_path / "plain"
    run(cli_args(tiny_model_path, files / "train.jsonl", plain))
    assert rows_of(given, "val") == val
    assert without_timing(given) == without_timing(plain)
    assert not rows_of(plain, "val")


def without_timing(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "pairs_per_s")} for r in rows_of(out, "train")]


def signals(monkeypatch, margins: list[float]) -> None:
    """Held-out margins given per iteration, to exercise what the end of a run says (the signal is tested above)."""
    calls = iter(margins)
    monkeypatch.setattr("openrlhf_ditto.trainer.held_out_signal", lambda *a, **k: {"margin": next(calls)})


def test_a_final_model_worse_than_pi_0_is_said_at_the_end(tiny_model_path, files, tmp_path, monkeypatch, capsys):
    signals(monkeypatch, [0.0, 0.2, -0.3])
    run(cli_args(tiny_model_path, files / "all.jsonl", tmp_path / "run", "--ditto.val_demos", "1"))
    err = capsys.readouterr().err
    assert "DITTO's own reward ranks final/ below its SFT warm start: held-out margin -0.300 < pi_0's +0.000" in err
    assert "compare final/ with reference/ (pi_0) using `openrlhf-ditto eval`" in err

    signals(monkeypatch, [0.0, 0.2, 0.3])
    run(cli_args(tiny_model_path, files / "all.jsonl", tmp_path / "good", "--ditto.val_demos", "1"))
    captured = capsys.readouterr()
    assert "worse" not in captured.err and "held-out check: final/ margin +0.300, pi_0's +0.000" in captured.out
    run(cli_args(tiny_model_path, files / "all.jsonl", tmp_path / "unchecked"))
    assert "nothing checked that DITTO beat its SFT warm start" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--ditto.val_demos", "4"], "--ditto.val_demos 4 holds out every demo"),
        (["--ditto.val_demos", "-1"], "--ditto.val_demos -1: must be >= 0"),
        (["--ditto.val_demos", "1", "--ditto.val_dataset", "FILE"], "--ditto.val_demos and --ditto.val_dataset both"),
    ],
)
def test_bad_validation_flags(tiny_model_path, files, tmp_path, capsys, flags, expected):
    assert expected in error_of(cli_args(tiny_model_path, files / "all.jsonl", tmp_path / "run", *flags), capsys)
    assert not (tmp_path / "run").exists()
