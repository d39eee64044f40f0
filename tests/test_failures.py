"""What a new user hits and how a run fails: checks before the run folder is claimed, one-line file errors, flags
named as the CLI spells them, a quiet first screen, NaN guard, Ctrl-C / SIGTERM, failed checkpoint writes, cut
demos, the paper's schedules, and imports that run one way."""

import argparse
import ast
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import DEMOS, cli_args, refused, run

from openrlhf_ditto.backends.local import LocalBackend
from openrlhf_ditto.cli.args import hierarchize
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

    def poisoned_step(self, batches):
        steps.append(1)
        if len(steps) == 3:  # the first step of iteration 2
            self.loss_fn.beta = float("nan")  # a NaN in the loss, its gradients and the weights it updates
        return real_step(self, batches)

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
    assert [r["lr"] for r in rows] == [1e-3, 1e-3, 5e-4, 5e-4]  # one warm-up step (of 4) is none; then today's lr
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (final / "model.safetensors").exists()


def test_nan_sft_loss_stops_before_pi_0_is_saved(tiny_model_path, demos_file, tmp_path):
    out = tmp_path / "run"
    real_step = LocalBackend.sft_step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalBackend, "sft_step", lambda *a: {run: x * float("inf") for run, x in real_step(*a).items()})
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

    def generate(self, *a):
        calls.append(1)
        if len(calls) == 2:  # iteration 2: the first checkpoint is written
            undo.append(failure(out / "checkpoints"))
        return real_generate(self, *a)

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
    from openrlhf_ditto.pairs import collate

    args = hierarchize(build_parser().parse_args(cli_args(tiny_model_path, demos_file, tmp_path / "run")[:7]))
    assert (args.ditto.sft_lr_scheduler, args.ditto.sft_warmup_ratio) == ("cosine", 0.2)
    assert (args.actor.lr_scheduler, args.actor.lr_warmup_ratio) == ("constant_with_warmup", 0.25)

    # the local backend's SFT lr: 20% of --ditto.sft_steps (30), 6 steps, of linear warm-up, step k (1-based) at k/6
    # of the lr, then a cosine that reaches 0 one step after the last (schedules.py)
    backend = LocalBackend(tiny_model_path, args)
    backend.add_run("")
    batch = collate([torch.tensor([5, 6, 7])], [torch.tensor([8, 9])], 0)
    for k in range(2, 12):
        backend.sft_step(batch, [""])  # step k - 1; the optimiser now holds step k's lr
        expected = k / 6 if k <= 6 else 0.5 * (1 + math.cos(math.pi * (k - 6) / (31 - 6)))
        lr = backend.sft_optimizers[""][0].param_groups[0]["lr"]
        assert lr == pytest.approx(expected * args.ditto.sft_lr, rel=1e-12)


@pytest.mark.parametrize("name", ["constant_with_warmup", "cosine", "linear", "polynomial", "cosine_with_restarts"])
def test_no_step_of_a_schedule_trains_at_lr_zero(name):
    """transformers' schedules give the first warm-up step lr 0 and end a decay at 0: a user's step that does
    nothing. The rule (schedules.py) shifts them by one step: the k-th of w warm-up steps at k/w of the lr."""
    from openrlhf_ditto.schedules import lr_scheduler

    for steps in range(1, 13):
        for ratio in (0.0, 0.1, 0.2, 0.25, 0.5, 1.0):
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            scheduler = lr_scheduler(name, optimizer, ratio, steps)
            lrs = []
            for _ in range(steps):
                lrs.append(optimizer.param_groups[0]["lr"])
                optimizer.step()
                scheduler.step()
            warmup = math.ceil(ratio * steps)
            assert min(lrs) > 0, (steps, ratio, lrs)
            assert lrs[:warmup] == pytest.approx([k / warmup for k in range(1, warmup + 1)]), (steps, ratio, lrs)


def test_one_sft_step_moves_the_model_and_the_first_ditto_step_trains(tiny_model_path, demos_file, tmp_path):
    """--ditto.sft_steps 1 used to run its only step at the warm-up's lr 0 (pi_0 was the base model, while the bar
    showed a loss), and the first DITTO step too."""
    out = tmp_path / "run"
    run(cli_args(tiny_model_path, demos_file, out, "--ditto.sft_steps", "1", "--ditto.iterations", "1"))
    base, pi_0 = load_file(tiny_model_path / "model.safetensors"), load_file(out / "reference" / "model.safetensors")
    assert any(not torch.equal(base[name], pi_0[name]) for name in base), "the SFT step did not train"
    assert [r["lr"] for r in train_rows(out) if r["prefix"] == "train"] == [1e-3, 1e-3]  # 25% of 2 steps: none


def test_the_ray_policy_takes_the_same_schedule(tiny_model_path, demos_file, monkeypatch):
    """DittoPolicyActor puts the rule's schedule where OpenRLHF built its own (whose first warm-up step is at lr 0):
    on the DeepSpeed engine, which steps it and checkpoints it, and where ditto_train_step reads the lr. OpenRLHF's
    init needs Ray and GPUs (tests/test_openrlhf_backend.py runs it on CPU with stand-ins); here it is replaced by
    what it leaves: an engine holding its optimizer and OpenRLHF's schedule, built as its DeepspeedStrategy does."""
    ob = pytest.importorskip("openrlhf_ditto.backends.openrlhf")
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
    from transformers import get_scheduler

    from openrlhf_ditto.cli.train_ditto_ray import build_parser as ray_parser

    argv = ["--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", str(demos_file)]
    args = hierarchize(ray_parser().parse_args([*argv, "--actor.adam.lr", "1e-2", "--ditto.resample_every", "1"]))
    a = args.actor

    def openrlhf_init(self, strategy, pretrain, max_steps=None, vllm_engines=None):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=a.adam.lr)
        warmup = math.ceil(max_steps * a.lr_warmup_ratio)
        engine = SimpleNamespace(
            basic_optimizer=optimizer, lr_scheduler=get_scheduler(a.lr_scheduler, optimizer, warmup, max_steps)
        )
        self.actor, self.actor_scheduler = SimpleNamespace(model=engine), engine.lr_scheduler
        self.trainer = SimpleNamespace(actor_scheduler=engine.lr_scheduler)

    monkeypatch.setattr(PolicyModelActor.__ray_actor_class__, "init_model_from_pretrained", openrlhf_init)
    actor = object.__new__(ob.DittoPolicyActor.__ray_actor_class__)
    actor.init_model_from_pretrained(SimpleNamespace(args=args), str(tiny_model_path), max_steps=4)
    engine, lrs = actor.actor.model, []
    for _ in range(4):
        lrs.append(actor.actor_scheduler.get_last_lr()[0])  # as ditto_train_step reads it
        engine.basic_optimizer.step()
        engine.lr_scheduler.step()  # as DeepSpeed's engine.step() does
    assert lrs == [1e-2] * 4  # OpenRLHF's own: [0.0, 1e-2, 1e-2, 1e-2]


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


# ------------------------------------------- 10. bad input of any kind: one line, exit code 2, nothing claimed


TRAIN_RANGES = [  # every numeric flag of `train`, each just outside its range
    (["--ditto.beta", "0"], "--ditto.beta 0: must be > 0 (paper: 0.05)"),
    (["--ditto.beta", "-1"], "--ditto.beta -1: must be > 0 (paper: 0.05)"),
    (["--ditto.beta", "nan"], "--ditto.beta nan: must be > 0"),
    (["--ditto.beta", "inf"], "--ditto.beta inf: must be > 0"),
    (["--actor.adam.lr", "-1"], "--actor.adam.lr -1: must be > 0 (default: 3e-5 with LoRA, 1e-6 full-parameter)"),
    (["--ditto.sft_lr", "0"], "--ditto.sft_lr 0: must be > 0 (paper: 3e-5)"),
    (["--ditto.label_smoothing", "0.5"], "--ditto.label_smoothing 0.5: must be in [0, 0.5)"),
    (["--ditto.label_smoothing", "-0.1"], "--ditto.label_smoothing -0.1: must be in [0, 0.5)"),
    (["--ditto.pair_fractions", "1.5", "-0.5", "0"], "--ditto.pair_fractions 1.5 -0.5 0.0: give 3 shares"),
    (["--actor.lr_warmup_ratio", "1.5"], "--actor.lr_warmup_ratio 1.5: must be in [0, 1] (paper: 0.25)"),
    (["--ditto.sft_warmup_ratio", "-0.1"], "--ditto.sft_warmup_ratio -0.1: must be in [0, 1] (paper: 0.2)"),
    (["--rollout.temperature", "0"], "--rollout.temperature 0: must be > 0"),
    (["--rollout.top_p", "0"], "--rollout.top_p 0: must be in (0, 1]"),
    (["--rollout.top_p", "1.5"], "--rollout.top_p 1.5: must be in (0, 1]"),
    (["--rollout.top_k", "-2"], "--rollout.top_k -2: must be >= -1 (-1: off; default: 50)"),
    (["--rollout.n_samples_per_prompt", "0"], "--rollout.n_samples_per_prompt 0: must be >= 1 (paper: 10)"),
    (["--rollout.max_new_tokens", "0"], "--rollout.max_new_tokens 0: must be >= 1"),
    (["--rollout.micro_batch_size", "0"], "--rollout.micro_batch_size 0: must be >= 1"),
    (["--data.max_len", "24"], "--rollout.max_new_tokens 24 leaves no room for the prompt in --data.max_len 24"),
    (["--train.batch_size", "0"], "--train.batch_size 0: must be >= 1 (paper: 24)"),
    (["--train.micro_batch_size", "-2"], "--train.micro_batch_size -2: must be >= 1"),
    (["--train.seed", "-1"], "--train.seed -1: must be >= 0"),
    (["--actor.adam.betas", "0.9", "1"], "--actor.adam.betas 1: must be in [0, 1)"),
    (["--actor.adam.weight_decay", "-0.1"], "--actor.adam.weight_decay -0.1: must be >= 0"),
    (["--actor.max_norm", "0"], "--actor.max_norm 0: must be > 0"),
    (["--ds.lora.rank", "-1"], "--ds.lora.rank -1: must be >= 0"),
    (["--ds.lora.alpha", "0"], "--ds.lora.alpha 0: must be >= 1 (paper: 64)"),
    (["--ds.lora.dropout", "1"], "--ds.lora.dropout 1: must be in [0, 1)"),
    (["--ditto.sft_steps", "-1"], "--ditto.sft_steps -1: must be >= 0"),
    (["--ditto.sft_stop_loss", "-1"], "--ditto.sft_stop_loss -1: must be >= 0"),
    (["--ditto.iterations", "0"], "--ditto.iterations 0: must be >= 1 (paper: 4)"),
    (["--ditto.resample_every", "0"], "--ditto.resample_every 0: must be >= 1 (paper: 10)"),
    (["--ditto.nll_coef", "-1"], "--ditto.nll_coef -1: must be >= 0"),
    (["--ckpt.max_num", "0"], "--ckpt.max_num 0: must be >= 1"),
    (["--vllm.gpu_memory_utilization", "0"], "--vllm.gpu_memory_utilization 0: must be in (0, 1]"),
    (["--actor.lr_scheduler", "sideways"], "--actor.lr_scheduler sideways: sideways is not a valid SchedulerType"),
    (["--ditto.sft_lr_scheduler", "reduce_lr_on_plateau"], "--ditto.sft_lr_scheduler reduce_lr_on_plateau: "),
    (["--ditto.beta", "x"], "argument --ditto.beta: invalid float value: 'x' (see openrlhf-ditto train --help)"),
    (
        ["--data.input_template", "Q: {question}"],
        "--data.input_template 'Q: {question}': put {} where the prompt goes",
    ),
    (["--data.input_template", "Q:"], "--data.input_template 'Q:': put {} where the prompt goes, once"),
]


@pytest.mark.parametrize(("flags", "message"), TRAIN_RANGES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_train_refuses_every_number_out_of_range(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    argv = cli_args(tmp_path / "model", tmp_path / "demos.jsonl", out, *flags)
    assert refused(main, argv, capsys).startswith(message)
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        TRAIN_RANGES[0],  # the train flags: the same checks
        (["--actor.num_nodes", "0"], "--actor.num_nodes 0: must be >= 1"),
        (["--actor.num_gpus_per_node", "0"], "--actor.num_gpus_per_node 0: must be >= 1"),
        (["--ref.num_nodes", "0"], "--ref.num_nodes 0: must be >= 1"),
        (["--ref.num_gpus_per_node", "-1"], "--ref.num_gpus_per_node -1: must be >= 1"),
        (["--vllm.tensor_parallel_size", "0"], "--vllm.tensor_parallel_size 0: must be >= 1"),
        (["--vllm.gpu_memory_utilization", "1.5"], "--vllm.gpu_memory_utilization 1.5: must be in (0, 1]"),
        (["--ds.zero_stage", "4"], "--ds.zero_stage 4: must be in [0, 3]"),
        (["--ds.zpg", "0"], "--ds.zpg 0: must be >= 1"),
        (["--actor.adam.eps", "0"], "--actor.adam.eps 0: must be > 0"),
        (["--actor.min_lr_ratio", "2"], "--actor.min_lr_ratio 2: must be in [0, 1]"),
        (["--vllm.sync_backend", "mpi"], "--vllm.sync_backend mpi: give nccl (GPUs) or gloo"),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, list) else "",
)
def test_train_ditto_ray_refuses_every_number_out_of_range(tmp_path, capsys, flags, message):
    from openrlhf_ditto.cli.train_ditto_ray import main as ray_main

    out = tmp_path / "run"
    argv = ["--actor.model_name_or_path", str(tmp_path), "--data.dataset", str(tmp_path / "d.jsonl")]
    argv += ["--ckpt.output_dir", str(out), "--vllm.num_engines", "1", "--dry_run", *flags]
    assert refused(ray_main, argv, capsys).startswith(message)
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "-1"], "--seed -1: must be >= 0"),
        (["--few_shot.k", "0"], "--few_shot.k 0: must be >= 1"),
        (["--rollout.n_samples_per_prompt", "0"], "--rollout.n_samples_per_prompt 0: must be >= 1 (paper: 3)"),
        (["--rollout.max_new_tokens", "0"], "--rollout.max_new_tokens 0: must be >= 1"),
        (["--rollout.temperature", "-1"], "--rollout.temperature -1: must be > 0 (paper: 1.0)"),
        (["--rollout.top_p", "2"], "--rollout.top_p 2: must be in (0, 1]"),
        (["--rollout.top_k", "-5"], "--rollout.top_k -5: must be >= -1"),
        (["--rollout.batch_size", "0"], "--rollout.batch_size 0: must be >= 1"),
        (["--judge.concurrency", "0"], "--judge.concurrency 0: must be >= 1"),
        (["--judge.timeout", "0"], "--judge.timeout 0: must be > 0"),
        (["--judge.retries", "-1"], "--judge.retries -1: must be >= 0"),
        (["--judge.batch_size", "0"], "--judge.batch_size 0: must be >= 1"),
        (["--vllm.gpu_memory_utilization", "1.5"], "--vllm.gpu_memory_utilization 1.5: must be in (0, 1]"),
        (["--judge.url", "judge-host:8000/v1"], "--judge.url judge-host:8000/v1: give the API's base URL"),
        (["--data.input_template", "{}{}"], "--data.input_template '{}{}': put {} where the prompt goes, once"),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, list) else "",
)
def test_eval_refuses_every_number_out_of_range(tmp_path, capsys, argv, message):
    out = tmp_path / "eval"
    base = ["eval", "--run", str(tmp_path), "--data.dataset", str(tmp_path / "h.jsonl"), "--output_dir", str(out)]
    assert refused(main, [*base, *argv], capsys).startswith(message)
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--beta", "0"], "--beta 0: must be > 0"),
        (["--beta", "-0.05"], "--beta -0.05: must be > 0"),
        (["--scale", "0"], "--scale 0: must be > 0"),
        (["--offset", "nan"], "--offset nan: must be finite"),
        (["--clip_range", "1", "-1"], "--clip_range 1 -1: LOW must be below HIGH"),
        (["--clip_range", "nan", "1"], "--clip_range nan: must be finite"),
        (["--data.max_len", "1"], "--data.max_len 1: must be >= 2"),
        (["--port", "0"], "--port 0: must be in [1, 65535]"),
        (["--port", "70000"], "--port 70000: must be in [1, 65535]"),
        (["--batch_size", "0"], "--batch_size 0: must be >= 1"),
        (["--batch_wait_ms", "-1"], "--batch_wait_ms -1: must be >= 0"),
        (["--mix", "http://rm:5000/get_reward=nan"], "argument --mix: 'http://rm:5000/get_reward=nan' is not"),
        (["--mix", "rm:5000=1"], "argument --mix: 'rm:5000=1' is not URL=WEIGHT"),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, list) else "",
)
def test_serve_reward_refuses_every_number_out_of_range(tmp_path, capsys, argv, message):
    assert refused(main, ["serve-reward", "--run", str(tmp_path), *argv], capsys).startswith(message)


@pytest.mark.parametrize(
    ("argv", "message"), [(["--num", "0"], "--num 0: must be >= 1"), (["--seed", "-1"], "--seed -1: must be >= 0")]
)
def test_export_pairs_refuses_every_number_out_of_range(tmp_path, capsys, argv, message):
    out = tmp_path / "pairs.jsonl"
    assert refused(main, ["export-pairs", str(tmp_path), "--out", str(out), *argv], capsys).startswith(message)
    assert not out.exists()


def test_a_refused_flag_claims_nothing_and_the_fixed_command_runs(tiny_model_path, demos_file, tmp_path, capsys):
    """--actor.adam.lr -1 used to fail in torch's optimiser after the run folder was claimed ("Invalid learning rate:
    -1.0", no flag named); the fixed command was then refused as "already holds a DITTO run"."""
    out = tmp_path / "run"
    argv = cli_args(tiny_model_path, demos_file, out, "--ditto.iterations", "1")
    for flags in (["--actor.adam.lr", "-1"], ["--ditto.sft_lr", "-1"], ["--actor.lr_scheduler", "cosine_with_min_lr"]):
        assert refused(main, [*argv, *flags], capsys).startswith(flags[0])
        assert not out.exists()
    main(argv)
    assert (out / "final" / "model.safetensors").exists()


# -------------------------------------------------------- 11. paths and model folders that are not what is asked


def test_overwrite_deletes_only_a_run_and_never_its_inputs(tiny_model_path, demos_file, tmp_path, capsys):
    """--overwrite used to delete whatever --ckpt.output_dir held (a home folder, the model, the demos)."""
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "thesis.tex").write_text("years of work")
    msg = refused(main, cli_args(tiny_model_path, demos_file, papers, "--overwrite"), capsys)
    assert msg == f"{papers} is not empty and holds no DITTO run; choose an empty --ckpt.output_dir"
    assert (papers / "thesis.tex").read_text() == "years of work"

    run = tmp_path / "run"  # a run whose folder holds the new run's demos and model
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"actor": {}, "data": {}, "ditto": {}}))
    (run / "demos.jsonl").write_text(demos_file.read_text())
    msg = refused(main, cli_args(tiny_model_path, run / "demos.jsonl", run, "--overwrite"), capsys)
    assert msg.startswith(f"--overwrite would delete --data.dataset {run / 'demos.jsonl'}, which lies in")
    model = run / "model"
    shutil.copytree(tiny_model_path, model)
    msg = refused(main, cli_args(model, demos_file, run, "--overwrite"), capsys)
    assert msg.startswith(f"--overwrite would delete --actor.model_name_or_path {model}, which lies in")
    assert (run / "demos.jsonl").exists() and (model / "model.safetensors").exists()


def test_output_paths_that_are_files_are_refused(tiny_model_path, demos_file, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert refused(main, cli_args(tiny_model_path, demos_file, a_file), capsys) == (
        f"--ckpt.output_dir {a_file} is a file; give a folder"
    )
    argv = cli_args(tiny_model_path, demos_file, tmp_path / "run", "--logger.tensorboard_dir", str(a_file))
    assert refused(main, argv, capsys) == f"--logger.tensorboard_dir {a_file} is a file; give a folder"
    argv = cli_args(tiny_model_path, demos_file, tmp_path / "run", "--logger.tensorboard_dir", "/proc/ditto-logs")
    argv += ["--rollout.max_new_tokens", "48"]  # no demo cut: no warning before the error
    assert refused(main, argv, capsys).startswith("cannot write --logger.tensorboard_dir /proc/ditto-logs: ")
    assert a_file.read_text() == "mine" and not (tmp_path / "run").exists()


def test_lora_targets_that_name_no_module_are_refused_before_anything_starts(
    tiny_model_path, demos_file, tmp_path, capsys
):
    """peft said so without naming the flag (local), or in every Ray actor once the weights were loaded."""
    from openrlhf_ditto.cli.train_ditto_ray import main as ray_main

    out = tmp_path / "run"
    message = f"--ds.lora.target_modules q_proj qkv: no module qkv in {tiny_model_path}, whose linear layers are "
    argv = cli_args(tiny_model_path, demos_file, out, "--ds.lora.target_modules", "q_proj", "qkv")
    assert refused(main, argv, capsys).startswith(message)
    ray = ["--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", str(demos_file), "--dry_run"]
    ray += ["--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--vllm.num_engines", "1"]
    ray += ["--ckpt.output_dir", str(out), "--ds.lora.target_modules", "q_proj", "qkv"]
    assert refused(ray_main, ray, capsys).startswith(message)
    assert not out.exists()


def test_lora_targets_gpt2_conv1d_and_non_linear_layers(tiny_model_path, tmp_path):
    """GPT-2's attention and MLP layers are transformers' Conv1D: the listing skipped them ("whose linear layers are
    lm_head"). An embedding passed the check, then was concatenated on the wrong axis in the combined adapter."""
    from transformers import GPT2Config

    from openrlhf_ditto.models import check_lora_targets

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    with pytest.raises(ValueError) as e:
        check_lora_targets(gpt2, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert "whose linear layers are c_attn c_fc c_proj lm_head" in str(e.value)
    check_lora_targets(gpt2, ["c_attn", "c_proj"])
    for model, target, kind in ((tiny_model_path, "embed_tokens", "Embedding"), (gpt2, "wte", "Embedding")):
        with pytest.raises(ValueError) as e:
            check_lora_targets(model, ["q_proj" if model == tiny_model_path else "c_attn", target])
        assert f": not a linear layer: {target} ({kind}); DITTO adapts linear layers only" in str(e.value)


@pytest.fixture(scope="module")
def damaged_model(tiny_model_path, tmp_path_factory):
    """The tiny model with its model.safetensors cut to half its size (an interrupted download or copy)."""
    folder = tmp_path_factory.mktemp("damaged") / "model"
    shutil.copytree(tiny_model_path, folder)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return folder


def test_a_damaged_weights_file_is_one_line_in_every_command_that_loads_a_model(
    damaged_model, tiny_model_path, demos_file, tmp_path, capsys, monkeypatch
):
    """It was a SafetensorError traceback ("incomplete metadata") in train and eval, "dry run ok" in the dry run."""
    from openrlhf_ditto.cli.train_ditto_ray import main as ray_main
    from openrlhf_ditto.runfolder import run_config

    weights = damaged_model / "model.safetensors"
    size = weights.stat().st_size
    original = (tiny_model_path / "model.safetensors").stat().st_size
    damage = f"{weights}: {size} bytes where its header describes {original}"
    out = tmp_path / "run"
    assert refused(main, cli_args(damaged_model, demos_file, out), capsys).startswith(
        f"--actor.model_name_or_path {damage}; the file is cut short or damaged"
    )
    ray = ["--actor.model_name_or_path", str(damaged_model), "--data.dataset", str(demos_file), "--dry_run"]
    ray += ["--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--vllm.num_engines", "1"]
    assert refused(ray_main, [*ray, "--ckpt.output_dir", str(out)], capsys).startswith(
        f"--actor.model_name_or_path {damage}"
    )
    assert not out.exists()
    resumed = tmp_path / "resumed"  # a run whose pi_0 (reference/) was damaged since
    shutil.copytree(damaged_model, resumed / "reference")
    assert refused(main, cli_args(tiny_model_path, demos_file, resumed, "--resume"), capsys).startswith(
        f"--resume: the run's pi_0 {resumed / 'reference' / 'model.safetensors'}: {size} bytes where"
    )
    monkeypatch.setattr("openrlhf_ditto.models.smollm2_path", lambda: damaged_model)
    assert refused(main, ["quickstart", "--output_dir", str(out)], capsys).startswith(
        f"--actor.model_name_or_path {damage}"
    )
    assert not out.exists()
    serve = ["serve-reward", "--policy", str(damaged_model), "--reference", str(tiny_model_path), "--beta", "1"]
    assert refused(main, serve, capsys).startswith(f"--policy {damage}")
    run = tmp_path / "finished"  # a run folder as eval reads it: its flags
    run.mkdir()
    flags = hierarchize(build_parser().parse_args(cli_args(tiny_model_path, demos_file, run)))
    (run / "run_config.json").write_text(json.dumps(run_config(flags)))
    evaluate = ["eval", "--run", str(run), "--data.dataset", str(demos_file), "--judge", "style"]
    evaluate += ["--conditions", "zero-shot", f"cut={damaged_model}"]
    assert refused(main, evaluate, capsys).startswith(f"--conditions cut: {damage}")
    assert not (run / "eval").exists()


def test_a_model_without_a_language_model_head_is_refused(reward_model, demos_file, tmp_path, capsys):
    """It used to load with a new, random head (a table of "MISSING" weights) and train on noise."""
    from openrlhf_ditto.cli.train_ditto_ray import main as ray_main

    message = f"{reward_model} holds a LlamaForSequenceClassification, which has no language-model head"
    out = tmp_path / "run"
    assert refused(main, cli_args(reward_model, demos_file, out), capsys) == (
        f"--actor.model_name_or_path {message}: give a causal LM (a chat or base model, *ForCausalLM in its "
        "config.json)"
    )
    assert not out.exists()
    ray = ["--actor.model_name_or_path", str(reward_model), "--data.dataset", str(demos_file), "--dry_run"]
    one_gpu = ["--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--vllm.num_engines", "1"]
    assert refused(ray_main, [*ray, *one_gpu], capsys).startswith(f"--actor.model_name_or_path {message}")
    serve = ["serve-reward", "--policy", str(reward_model), "--reference", str(reward_model), "--beta", "1"]
    assert refused(main, serve, capsys).startswith(f"--reference {message}")


def test_a_run_folder_given_as_the_model_is_named(tiny_model_path, demos_file, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text("{}")
    msg = refused(main, cli_args(run, demos_file, tmp_path / "new"), capsys)
    assert msg.startswith(f"cannot load a tokenizer from --actor.model_name_or_path {run} (a DITTO run folder: its "
                          f"model is {run / 'final'})")  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="W&B's client is installed here")
def test_wandb_without_its_client_is_refused_before_the_folder_is_claimed(
    tiny_model_path, demos_file, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = cli_args(tiny_model_path, demos_file, out, "--logger.wandb.key", "k")
    assert refused(main, argv, capsys).startswith("--logger.wandb.key needs W&B's client: pip install wandb")
    assert not out.exists()


def test_dry_run_checks_the_run_folder_too(tiny_model_path, demos_file, tmp_path, capsys):
    from openrlhf_ditto.cli.train_ditto_ray import main as ray_main

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", str(demos_file), "--dry_run"]
    argv += ["--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--vllm.num_engines", "1"]
    assert refused(ray_main, [*argv, "--ckpt.output_dir", str(out)], capsys) == (
        f"{out} is not empty and holds no DITTO run; choose an empty --ckpt.output_dir"
    )


def test_train_ditto_ray_exits_as_train_does_when_a_run_stops(
    tiny_model_path, demos_file, tmp_path, capsys, monkeypatch
):
    """A run that stops exits 1 (Ctrl-C 130) with where it stands, as `openrlhf-ditto train`: no traceback. The
    Ray run itself needs GPUs; `train` is replaced here by what it raises."""
    import openrlhf_ditto.trainer as trainer
    from openrlhf_ditto.cli.train_ditto_ray import main as ray_main

    argv = ["--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", str(demos_file)]
    argv += ["--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--vllm.num_engines", "1"]
    argv += ["--ckpt.output_dir", str(tmp_path / "run")]
    for raised, code in ((RunStopped("step 3: the loss is nan. ... plus --resume"), 1), (KeyboardInterrupt(), 130)):

        def stopped(args, make_backend, raised=raised):
            raise raised

        monkeypatch.setattr(trainer, "train", stopped)
        with pytest.raises(SystemExit) as e:
            ray_main(argv)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == code and "Traceback" not in last
        assert last == ("error: step 3: the loss is nan. ... plus --resume" if code == 1 else "interrupted")
