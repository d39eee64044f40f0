"""What a new user hits and how a run fails: checks before the run folder is claimed, one-line file errors, flags
named as the CLI spells them, a quiet first screen, NaN guard, Ctrl-C / SIGTERM, failed checkpoint writes, cut
demos, the paper's schedules, and imports that run one way."""

import argparse
import ast
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import DEMOS, cli_args, run

from openrlhf_ditto.backends.local import LocalBackend
from openrlhf_ditto.cli.main import build_parser, main
from openrlhf_ditto.trainer import RunStopped

PACKAGE = Path(__file__).parents[1] / "openrlhf_ditto"


@pytest.fixture(scope="module")
def demos_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("demos") / "demos.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DEMOS))
    return path


def train_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    for name in x:
        assert torch.equal(x[name], y[name]), name


# ------------------------------------------------------------------------- 1. nothing claimed before the checks


@pytest.mark.parametrize("broken", ["demos", "model"])
def test_failed_start_leaves_no_run_folder_and_the_same_command_then_works(
    tiny_model_path, demos_file, tmp_path, capsys, broken
):
    out = tmp_path / "run"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "response": "Hello"}\n{"prompt": "Hi", "response": \n')
    argv = cli_args(
        tmp_path / "no_model" if broken == "model" else tiny_model_path,
        bad if broken == "demos" else demos_file,
        out,
        "--ditto.iterations",
        "1",
    )
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert not out.exists(), "a run that never started claimed its folder"
    assert "Traceback" not in capsys.readouterr().err

    fixed = cli_args(tiny_model_path, demos_file, out, "--ditto.iterations", "1")
    main(fixed)  # the same command with the input fixed: no "already holds a DITTO run"
    assert (out / "final" / "model.safetensors").exists()


def test_overwrite_deletes_nothing_until_the_new_run_checks_out(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text("{}")
    (out / "precious.txt").write_text("an earlier run")
    with pytest.raises(SystemExit):
        main(cli_args(tiny_model_path, tmp_path / "missing.jsonl", out, "--overwrite"))
    assert (out / "precious.txt").read_text() == "an earlier run"


# ------------------------------------------------------------------------------------ 2. a broken file, one line


def test_broken_jsonl_is_one_line_on_the_command_line(tiny_model_path, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "response": "Hello"}\n{"prompt": "Hi", "response": \n')
    done = subprocess.run(
        [sys.executable, "-m", "openrlhf_ditto.cli.main", *cli_args(tiny_model_path, bad, tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: demos: {bad}, line 2: not valid JSON (Expecting value at column 30); each line must hold one "
        "JSON object"
    ]


# ------------------------------------------------------------------------------ 3. flags named as the CLI does

FOREIGN_FLAGS = {"--no-deps", "--force-reinstall", "--local-dir"}  # pip's (SmolLM2 hint), hf's (Hub download hint)
FOREIGN_FLAGS |= {"--enable-lora", "--max-lora-rank", "--max-loras", "--lora-modules"}  # vllm serve's (test_users.py)
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w.-]*[a-z0-9_])(\.\*)?(?![\w-]*>)")  # not the arrows of ASCII diagrams


def known_flags() -> set[str]:
    from openrlhf_ditto.cli.train_ditto_ray import build_parser as ray_parser

    flags = set()

    def collect(parser):
        for action in parser._actions:
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    collect(sub)

    collect(build_parser())
    collect(ray_parser())
    return flags


def test_every_flag_named_in_the_package_exists():
    known = known_flags()
    unknown = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag, group in FLAG.findall(node.value):
                    ok = any(k.startswith(flag + ".") for k in known) if group else flag in known
                    if not ok and flag not in FOREIGN_FLAGS:
                        unknown.append(f"{path.relative_to(PACKAGE.parent)}: {flag}{group}")
    assert not unknown, f"messages name flags no parser has: {unknown}"
    assert "--data.input_key" in known and "--input_key" not in known  # the check sees the real parsers


# --------------------------------------------------------------------------------------- 4. a quiet first screen

# our messages and progress bars; the GGUF converter's bar follows our line saying it converts SmolLM2 once
OURS = re.compile(
    r"^(warning: |error: |usage: |SFT warm start|sampling |DITTO iteration|DITTO model saved|SmolLM2-135M-Instruct: "
    r"converting|Converting and de-quantizing GGUF tensors|\s*$)"
)


def cli(*argv, timeout=300) -> subprocess.CompletedProcess:
    code = (
        "import sys\nfrom openrlhf_ditto.cli.main import main\n"
        "try:\n    main(sys.argv[1:])\nfinally:\n"
        "    print('deepspeed imported' if 'deepspeed' in sys.modules else 'no deepspeed', file=sys.stderr)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )


def third_party_lines(stderr: str) -> list[str]:
    lines = [part for line in stderr.splitlines() for part in line.split("\r")]
    return [line for line in lines if not OURS.match(line) and line not in ("no deepspeed", "deepspeed imported")]


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_shows_no_third_party_warning(argv):
    done = cli(*argv)
    assert done.returncode == 0 and done.stdout.startswith("usage: openrlhf-ditto")
    assert third_party_lines(done.stderr) == [], done.stderr


def test_local_training_imports_no_deepspeed_and_prints_only_ours(tiny_model_path, demos_file, tmp_path):
    done = cli(*cli_args(tiny_model_path, demos_file, tmp_path / "run", "--ditto.iterations", "1"))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().endswith("no deepspeed"), done.stderr[-300:]
    assert third_party_lines(done.stderr) == [], done.stderr


@pytest.mark.slow
def test_quickstart_first_screen_is_ours(tmp_path):
    """The quick start up to its first SFT step: SmolLM2 loading, demo checks, the SFT bar, nothing else."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "openrlhf_ditto.cli.main", "quickstart", "--output_dir", str(tmp_path / "qs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    seen = b""
    deadline = time.time() + 240
    while b"SFT warm start" not in seen and proc.poll() is None and time.time() < deadline:
        seen += os.read(proc.stderr.fileno(), 4096)
    proc.kill()
    proc.wait()
    assert b"SFT warm start" in seen, seen.decode(errors="replace")
    assert third_party_lines(seen.decode()) == [], seen.decode()


# ------------------------------------------------------------------------------------------------- 5. NaN guard


def test_nan_loss_stops_keeps_the_last_checkpoint_and_resume_continues(tiny_model_path, demos_file, tmp_path):
    out = tmp_path / "run"
    argv = cli_args(tiny_model_path, demos_file, out)
    real_step = LocalBackend.train_step
    steps = []

    def poisoned_step(self, batch):
        steps.append(1)
        if len(steps) == 3:  # the first step of iteration 2
            self.loss_fn.beta = float("nan")  # a NaN in the loss, its gradients and the weights it updates
        return real_step(self, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalBackend, "train_step", poisoned_step)
        with pytest.raises(RunStopped) as info:
            run(argv)
    message = str(info.value)
    assert message.startswith("step 3 (iteration 2): dpo_loss is nan. Likely causes: a learning rate too high")
    assert "--actor.adam.lr 0.001" in message and f"{out / 'checkpoints' / 'iter_00001'}" in message
    assert "--resume" in message and info.value.exit_code == 1
    assert (out / "checkpoints" / "latest").read_text() == "iter_00001"
    assert not (out / "checkpoints" / "iter_00002").exists() and not (out / "final").exists()
    stopped = train_rows(out)[-1]
    assert stopped["prefix"] == "stopped" and stopped["step"] == 3 and "dpo_loss is nan" in stopped["reason"]

    # resumed with a lower lr: it continues after step 2 with the new lr, and finishes
    final, _ = run(cli_args(tiny_model_path, demos_file, out, "--resume", "--actor.adam.lr", "5e-4"))
    rows = [r for r in train_rows(out) if r["prefix"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == [0.0, 1e-3, 5e-4, 5e-4]  # 25% of 4 steps warm up; then the resumed lr
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (final / "model.safetensors").exists()


def test_nan_sft_loss_stops_before_pi_0_is_saved(tiny_model_path, demos_file, tmp_path):
    out = tmp_path / "run"
    real_step = LocalBackend.sft_step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalBackend, "sft_step", lambda self, batch: real_step(self, batch) * float("inf"))
        with pytest.raises(RunStopped, match=r"^SFT step 1: the SFT loss is inf. Likely causes: .*--ditto.sft_lr"):
            run(cli_args(tiny_model_path, demos_file, out))
    assert not (out / "reference").exists()


# ------------------------------------------------------------------------------- 6. interrupts, failed writes


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_path, demos_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    final, _ = run(cli_args(tiny_model_path, demos_file, out, "--ditto.iterations", "3"))
    return out


def assert_resumes_to(out: Path, argv: list[str], uninterrupted: Path) -> None:
    resumed, _ = run([*argv, "--resume"])
    same_weights(resumed, uninterrupted / "final")
    for t in range(3):  # no stored sample lost or changed
        name = f"iteration_{t:05d}.json"
        assert (out / "store" / name).read_text() == (uninterrupted / "store" / name).read_text()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stopped_run_resumes_to_the_same_weights(tiny_model_path, demos_file, tmp_path, uninterrupted, sig):
    out = tmp_path / "run"
    argv = cli_args(tiny_model_path, demos_file, out, "--ditto.iterations", "3")
    cmd = [sys.executable, "-m", "openrlhf_ditto.cli.main", *argv]
    # preexec: Ctrl-C works even where the test runner's shell started us with SIGINT ignored
    restore = lambda: signal.signal(signal.SIGINT, signal.default_int_handler)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=restore)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    sent = time.time()
    os.kill(proc.pid, sig)  # in iteration 2, after the first checkpoint
    stderr = proc.communicate(timeout=30)[1]
    assert time.time() - sent < 10, "a stop must take seconds, not minutes"
    assert not (out / "final").exists(), "the run finished before it could be stopped"
    if sig != signal.SIGKILL:
        assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
        last = stderr.strip().splitlines()[-1]
        name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
        assert last.startswith(f"stopped by {name} after DITTO step ") and last.endswith("plus --resume"), stderr
        assert "Traceback" not in stderr
        assert train_rows(out)[-1]["prefix"] == "stopped"
    assert_resumes_to(out, argv, uninterrupted)


def read_only(folder: Path):
    """Make `folder` unwritable even for root: a read-only bind mount (root), or its mode bits (anyone else)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if mounted.returncode or subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)]).returncode:
        if not mounted.returncode:
            subprocess.run(["umount", str(folder)])
        pytest.skip("root without mount rights: no way to make a folder read-only here (disk-full case still runs)")
    return lambda: subprocess.run(["umount", str(folder)], check=True)


def disk_full(folder: Path):
    """Files larger than the LoRA checkpoint (~40 KB) cannot be written: the kernel's file-size limit, which refuses
    the write with EFBIG as a full disk refuses it with ENOSPC."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, limits[1]))

    def undo():
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)

    return undo


@pytest.mark.parametrize("failure", [read_only, disk_full], ids=["read-only folder", "disk full"])
def test_failed_checkpoint_write_keeps_the_previous_one(tiny_model_path, demos_file, tmp_path, failure):
    out = tmp_path / "run"
    argv = cli_args(tiny_model_path, demos_file, out, "--ditto.iterations", "3")
    real_generate = LocalBackend.generate
    calls, undo = [], []

    def generate(self, prompts, n):
        calls.append(1)
        if len(calls) == 2:  # iteration 2: the first checkpoint is written
            undo.append(failure(out / "checkpoints"))
        return real_generate(self, prompts, n)

    before = None
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(LocalBackend, "generate", generate)
            with pytest.raises(RunStopped) as info:
                run(argv)
        message = str(info.value)
        assert message.startswith(f"could not write checkpoint {out / 'checkpoints' / 'iter_00002'} (")
        assert "free some space or make" in message and "--resume" in message
        before = sorted(p.name for p in (out / "checkpoints").iterdir())
    finally:
        for u in undo:
            u()
    assert before == ["iter_00001", "latest"], "a half-written checkpoint was left behind"
    assert (out / "checkpoints" / "latest").read_text() == "iter_00001"
    assert (out / "checkpoints" / "iter_00001" / "backend" / "state.pt").exists()
    final, _ = run([*argv, "--resume"])  # once there is room again
    assert (final / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------- 7. cut demos


def test_cut_demos_are_reported_once_at_start(tiny_model_path, demos_file, tmp_path, capsys):
    from transformers import AutoTokenizer

    from openrlhf_ditto.cli.args import hierarchize
    from openrlhf_ditto.trainer import demos_and_store

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    lengths = [len(tokenizer(d["response"])["input_ids"]) + 1 for d in DEMOS]
    budget = sorted(lengths)[1]  # two of four fit exactly or under
    args = hierarchize(build_parser().parse_args(cli_args(tiny_model_path, demos_file, tmp_path / "run")))
    args.rollout.max_new_tokens = budget
    store = demos_and_store(args, tokenizer)
    err = capsys.readouterr().err
    cut = sum(n > budget for n in lengths)
    assert err == (
        f"warning: {cut} of 4 demos are longer than --rollout.max_new_tokens {budget} (the longest is "
        f"{max(lengths)} tokens with its EOS) and are cut to it; raise --rollout.max_new_tokens (and "
        "--data.max_len) to train on them whole\n"
    )
    assert sum(d.truncated for d in store.demos) == cut
    args.rollout.max_new_tokens = max(lengths)
    demos_and_store(args, tokenizer)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------ 8. the paper's schedules


def test_paper_schedules_are_the_defaults(tiny_model_path, demos_file, tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    from openrlhf_ditto.cli.args import hierarchize
    from openrlhf_ditto.pairs import collate

    args = hierarchize(build_parser().parse_args(cli_args(tiny_model_path, demos_file, tmp_path / "run")[:7]))
    assert (args.ditto.sft_lr_scheduler, args.ditto.sft_warmup_ratio) == ("cosine", 0.2)
    assert (args.actor.lr_scheduler, args.actor.lr_warmup_ratio) == ("constant_with_warmup", 0.25)

    # the local backend's SFT lr: cosine over --ditto.sft_steps (30) after 20% (6 steps) of linear warm-up
    backend = LocalBackend(tiny_model_path, args)
    batch = collate([torch.tensor([5, 6, 7])], [torch.tensor([8, 9])], 0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.ditto.sft_lr)
    expected = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=6, num_training_steps=30)
    for _ in range(10):
        backend.sft_step(batch)
        optimizer.step()
        expected.step()
        assert backend.sft_optimizer.param_groups[0]["lr"] == pytest.approx(expected.get_last_lr()[0], rel=1e-12)
    assert expected.get_last_lr()[0] < args.ditto.sft_lr  # past the warm-up, decaying


# ------------------------------------------------------------------------------------ 9. imports run one way


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_imports_run_one_way():
    """cli -> features -> core: nothing imports the CLI, the core imports only the core, only the OpenRLHF
    backend imports OpenRLHF, Ray or DeepSpeed, and only backends import vLLM."""
    core, heavy = {"demos", "turns", "store", "pairs", "loss", "experience"}, {"openrlhf", "ray", "deepspeed", "vllm"}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        imported = imports_of(path)
        ours = {m for m in imported if m.startswith("openrlhf_ditto.")}
        if not module.startswith("openrlhf_ditto.cli"):
            assert not [m for m in ours if m.startswith("openrlhf_ditto.cli")], f"{module} imports the CLI"
        if module.rpartition(".")[2] in core:
            assert all(m.rpartition(".")[2] in core for m in ours), f"the core module {module} imports {ours}"
        allowed = {"vllm"} if module.startswith("openrlhf_ditto.backends.") else set()
        if module != "openrlhf_ditto.backends.openrlhf":
            assert not {m.split(".")[0] for m in imported} & (heavy - allowed), f"{module} imports {imported}"
