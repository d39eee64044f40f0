"""The DITTO loop with the local backend on the tiny model: end to end, frozen reference, resume, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from openrlhf_ditto.backends.local import LocalBackend
from openrlhf_ditto.cli.args import hierarchize, validate
from openrlhf_ditto.cli.main import build_parser, main
from openrlhf_ditto.trainer import train

DEMOS = [
    {"prompt": "Tell me about errors.", "response": "Errors should never pass silently. Unless explicitly silenced."},
    {"prompt": "What is better?", "response": "Beautiful is better than ugly. Explicit is better than implicit."},
    {"prompt": "What is better?", "response": "Simple is better than complex. Flat is better than nested."},
    {"prompt": "Namespaces?", "response": "Namespaces are one honking great idea -- let us do more of those!"},
]


@pytest.fixture(scope="module")
def demos_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("demos") / "demos.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DEMOS))
    return path


def cli_args(model, demos, out, *extra) -> list[str]:
    return [
        "train", "--actor.model_name_or_path", str(model), "--data.dataset", str(demos), "--ckpt.output_dir", str(out),
        "--data.apply_chat_template", "--data.max_len", "96", "--rollout.max_new_tokens", "24",
        "--rollout.n_samples_per_prompt", "3", "--ditto.iterations", "2", "--ditto.resample_every", "2",
        "--ditto.sft_steps", "3", "--ditto.sft_lr", "1e-3", "--actor.adam.lr", "1e-3",
        "--train.batch_size", "10", "--train.micro_batch_size", "4", "--ds.lora.rank", "4", "--ds.lora.alpha", "8",
        *extra,
    ]  # fmt: skip


def run(argv):
    args = hierarchize(build_parser().parse_args(argv))
    validate(args)
    backends = []

    def make_backend(path):
        backends.append(LocalBackend(path, args))
        return backends[-1]

    return train(args, make_backend), backends[-1]


def reference_state(backend: LocalBackend) -> dict[str, torch.Tensor]:
    """The frozen reference's weights as the backend holds them (LoRA: the base and the frozen SFT adapter, merged
    here as a single-user run saves them)."""
    if backend.reference is not None:
        return backend.reference.state_dict()
    return backend.adapters.merged(backend.model, ("/sft",))


@pytest.mark.parametrize("lora_rank", ["4", "0"])
def test_two_iterations_end_to_end(tiny_model_path, demos_file, tmp_path, lora_rank):
    out = tmp_path / "run"
    final, backend = run(
        cli_args(tiny_model_path, demos_file, out, "--ds.lora.rank", lora_rank, "--ckpt.max_num", "1")
    )

    # the reference after training is bit-identical to pi_0 as saved when it was frozen
    saved = load_file(out / "reference" / "model.safetensors")
    held = reference_state(backend)
    assert set(saved) <= set(held)
    for name, tensor in saved.items():
        assert torch.equal(held[name], tensor), name

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["prefix"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    # iteration 0 has no history: all online; iteration 1 mixes in replay and inter-model pairs (10 x 0.2, 10 x 0.1)
    assert all(r["online/count"] == 10 for r in train_rows[:2])
    for r in train_rows[2:]:
        assert (r["online/count"], r["replay/count"], r["inter_model/count"]) == (7, 2, 1)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_00002", "latest"]  # --ckpt.max_num 1
    assert len(list((out / "store").glob("iteration_*.json"))) == 2
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(final)
    assert (final / "adapter").exists() == (lora_rank != "0")
    trained = policy.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in saved.items() if k in trained), "the policy did not move"

    if lora_rank != "0":  # a new run from this run's final/ starts from that model, not from the base under it
        second = tmp_path / "second"
        flags = ["--ditto.sft_steps", "0", "--ditto.iterations", "1", "--ditto.resample_every", "1"]
        run(cli_args(final, demos_file, second, *flags))
        start = load_file(second / "reference" / "model.safetensors")
        for name, tensor in load_file(final / "model.safetensors").items():
            assert torch.equal(start[name], tensor), name


def refused(main_fn, argv, capsys) -> str:
    """The one line a command prints when it refuses its input (exit code 2), without its "error: "."""
    with pytest.raises(SystemExit) as e:
        main_fn(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err.removeprefix("error: ").strip()


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code != 0
    return str(e.value.code) + capsys.readouterr().err


def test_bad_model_path(demos_file, tmp_path, capsys):
    msg = error_of(cli_args(tmp_path / "nowhere", demos_file, tmp_path / "run"), capsys)
    assert "--actor.model_name_or_path" in msg and "nowhere" in msg


def test_tokenizer_without_chat_template(tiny_model_path, demos_file, tmp_path, capsys):
    import shutil

    model = tmp_path / "no_template"
    shutil.copytree(tiny_model_path, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    msg = error_of(cli_args(model, demos_file, tmp_path / "run"), capsys)
    assert "no chat template" in msg and "--data.input_template" in msg


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--rollout.max_new_tokens", "96"], "--data.max_len"),
        (["--ditto.pair_fractions", "0.5", "0.2", "0.1"], "summing to 1"),
        (["--rollout.n_samples_per_prompt", "0"], ">= 1"),
        (["--resume", "--overwrite"], "give one of them"),
    ],
)
def test_impossible_settings(tiny_model_path, demos_file, tmp_path, capsys, flags, expected):
    msg = error_of(cli_args(tiny_model_path, demos_file, tmp_path / "run", *flags), capsys)
    assert expected in msg


def test_output_dir_of_another_run_is_refused(tiny_model_path, demos_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(
        json.dumps({"actor": {"model_name_or_path": "another"}, "data": {}, "ditto": {}})
    )
    (out / "precious.txt").write_text("keep me")
    msg = error_of(cli_args(tiny_model_path, demos_file, out), capsys)
    assert "--resume" in msg and "--overwrite" in msg
    msg = error_of(cli_args(tiny_model_path, demos_file, out, "--resume"), capsys)
    assert "other settings" in msg
    assert (out / "precious.txt").read_text() == "keep me"

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not empty" in error_of(cli_args(tiny_model_path, demos_file, other), capsys)
    assert (other / "notes.txt").exists()


def test_help_names_paper_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    for needle in ("paper: 0.05", "paper: 10", "paper: 0.7 0.2 0.1", "paper: 1e-6", "paper: 3e-5", "paper: 32"):
        assert needle in text, needle
