"""A run folder has one owner: a live `train` holds its lock, a second writer and every reader are refused naming
it, a killed run leaves no stale lock, and --resume refuses demos changed since the run started."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_trainer import DEMOS, cli_args, refused, run

from openrlhf_ditto.cli.main import main


@pytest.fixture(scope="module")
def demos_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("demos") / "demos.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DEMOS))
    return path


def test_a_live_run_is_refused_to_every_writer_and_reader_until_it_dies(tiny_model_path, demos_file, tmp_path, capsys):
    out = tmp_path / "run"
    finished = tmp_path / "finished"
    run(cli_args(tiny_model_path, demos_file, finished))
    # the real `train`, frozen once it holds the folder (SIGSTOP keeps its lock, as a slow step would)
    first = subprocess.Popen(
        [sys.executable, "-m", "openrlhf_ditto.cli.main", *cli_args(tiny_model_path, demos_file, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not (out / "run_config.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        # its files, in a folder the live run does not own, so that readers have a whole run to read
        for name in ("store", "reference", "final"):
            if not (out / name).exists():
                os.symlink(finished / name, out / name)
        pid = f"process {first.pid}"
        capsys.readouterr()
        for extra in (["--resume"], ["--overwrite"], ["--resume", "--actor.adam.lr", "1e-2"]):
            message = refused(main, cli_args(tiny_model_path, demos_file, out, *extra), capsys)
            assert message.startswith(f"{out} is in use by {pid} (") and "two processes" in message, message
        readers = {
            "export-pairs": ["export-pairs", str(out), "--out", str(tmp_path / "pairs.jsonl")],
            "serve-reward": ["serve-reward", "--run", str(out), "--port", "1"],
            "eval": ["eval", "--run", str(out), "--data.dataset", str(demos_file), "--conditions", "sft"],
        }
        for name, argv in readers.items():
            message = refused(main, argv, capsys)
            assert message.startswith(f"{out} is being trained by {pid} (") and "give a copy" in message, name
        assert not (tmp_path / "pairs.jsonl").exists()
    finally:
        first.kill()  # SIGKILL: the kernel drops the lock with the process
        first.wait()
    for name in ("store", "reference", "final"):
        if (out / name).is_symlink():
            os.unlink(out / name)
    final, _ = run(cli_args(tiny_model_path, demos_file, out, "--resume"))
    assert (final / "model.safetensors").exists()


def test_resume_refuses_demos_changed_since_the_run_started(tiny_model_path, demos_file, tmp_path, capsys):
    out = tmp_path / "run"
    whole = ("--rollout.max_new_tokens", "40", "--data.max_len", "120")  # no demo cut: the refusal is the only line
    demos = tmp_path / "demos.jsonl"
    demos.write_text(demos_file.read_text())
    run(cli_args(tiny_model_path, demos, out, *whole, "--ditto.iterations", "1"))
    saved = (out / "inputs.json").read_text()
    capsys.readouterr()

    edited = [dict(d) for d in DEMOS]
    edited[2]["response"] = "Complex is better than complicated."
    edited.append({"prompt": "Now?", "response": "Now is better than never."})
    demos.write_text("".join(json.dumps(d) + "\n" for d in edited))
    message = refused(main, cli_args(tiny_model_path, demos, out, *whole, "--resume"), capsys)
    assert message.startswith("--data.dataset changed since this run started (records 2 changed; 1 added"), message
    assert "new run" in message and "new round" in message
    assert (out / "inputs.json").read_text() == saved  # refused before anything was written

    demos.write_text(demos_file.read_text())  # the run's own demos again: it resumes
    run(cli_args(tiny_model_path, demos, out, *whole, "--resume", "--ditto.iterations", "2"))
    assert (out / "checkpoints" / "latest").read_text() == "iter_00002"
