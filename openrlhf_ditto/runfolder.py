"""Run-folder bookkeeping, written once for one run or many: the claim of --ckpt.output_dir and the identity that
--resume checks, atomic writes, checkpoints, where a stopped run stands, and SIGTERM as a stop.

A run folder: run_config.json (every flag), reference/ (pi_0), store/ (demos and samples, append-only),
checkpoints/iter_XXXXX/ (written atomically; `latest` names the newest), final/ (the model), metrics.jsonl, logs/,
inputs.json (the demos' fingerprints: --resume refuses changed demos), .lock (held by the process that trains it).
A many-users job holds one such folder per user under users/<id>/ (users.py).
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import torch

from openrlhf_ditto.store import SampleStore, read_json


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (it holds another run, or cannot be written)."""


class RunStopped(RuntimeError):
    """The run stopped before its end (interrupted, a non-finite value, a failed write); the message says where it
    stands and how to continue. `exit_code` is the CLI's: 130 for Ctrl-C, 143 for SIGTERM, else 1."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield a temporary sibling folder to fill, then rename it onto `target`: an interrupted or failed write leaves
    no half-written folder under the real name (and no temporary one either)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@contextlib.contextmanager
def writing(what: str, out: Path):
    """A failed write (disk full, read-only folder) stops the run; the files written before it stay intact.
    torch.save reports a full disk as a RuntimeError of its zip writer, not an OSError."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        raise RunStopped(f"could not write {what} ({e}); free some space or make {out} writable") from None


# The settings that define a run: --resume refuses a folder whose run had others, so samples never mix.
RUN_IDENTITY = (
    "actor.model_name_or_path",
    "data.dataset",
    "train.seed",
    "rollout.n_samples_per_prompt",
    "ds.lora.rank",
    "ditto.sft_steps",
    "ditto.extra_pairs",
    "ditto.val_demos",
)


def run_config(args: SimpleNamespace) -> dict:
    """Every flag of the run as a nested dict (`run_config.json`): resume checks it, and the tools that read a run
    folder (eval, serve-reward, export-pairs) take the run's beta and prompt rendering from it."""

    def plain(x):
        if isinstance(x, SimpleNamespace):
            return {k: plain(v) for k, v in vars(x).items()}
        return list(x) if isinstance(x, tuple) else str(x) if isinstance(x, Path) else x

    return plain(args)


def lock_holder(folder: Path) -> str | None:
    """Who trains the run folder `folder` now (the process that holds its .lock), or None. The kernel drops a
    flock when its process dies, so a killed run never leaves a stale lock."""
    lock = folder / ".lock"
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return lock.read_text().strip() or "another process"
    finally:
        os.close(fd)


def check_not_live(run: Path) -> None:
    """Refuse to read a run folder (or a many-users job's users/<id>) while a live process trains it."""
    for folder in (run, run.parent.parent) if run.parent.name == "users" else (run,):
        if holder := lock_holder(folder):
            raise RunFolderError(
                f"{folder} is being trained by {holder}: its final/ and checkpoints may change under this command; "
                "wait for the run to end (or stop it), or give a copy of the folder"
            )


def read_run_config(run: Path) -> dict:
    """The run_config.json of the run folder `run`, refused naming the file if it is broken or if a live process
    is training the run (eval, serve-reward and export-pairs read it first)."""
    check_not_live(run)
    file = run / "run_config.json"
    config = read_json(file)
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("actor", "data", "ditto")):
        raise ValueError(f"{file} is not the run_config.json of a DITTO run (its flags): it was changed after the run")
    return config


def _identity(config: dict) -> dict:
    def get(key):
        node = config
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else None
        return node

    return {key: get(key) for key in RUN_IDENTITY}


def check_run_folder(args: SimpleNamespace) -> Path | None:
    """Refuse a run folder that holds another run or other files, touching nothing; returns the checkpoint to
    resume from (or None)."""
    out = Path(args.ckpt.output_dir)
    config_file = out / "run_config.json"
    if holder := lock_holder(out):
        raise RunFolderError(
            f"{out} is in use by {holder}: two processes writing one run folder would mix their runs; wait for it "
            "to end (or stop it), or choose another --ckpt.output_dir"
        )
    for flag, folder in (("--ckpt.output_dir", out), ("--logger.tensorboard_dir", args.logger.tensorboard_dir)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise RunFolderError(f"{flag} {folder} is a file; give a folder")
    if config_file.exists():
        if not args.resume and not args.overwrite:
            raise RunFolderError(
                f"{out} already holds a DITTO run; pass --resume to continue it or --overwrite to delete it and "
                "start again (or choose another --ckpt.output_dir)"
            )
        if args.resume and (saved := _identity(read_run_config(out))) != _identity(run_config(args)):
            raise RunFolderError(
                f"{out} holds a run with other settings ({saved}); --resume needs the same "
                f"{', '.join('--' + key for key in RUN_IDENTITY)} (or use --overwrite to start again)"
            )
        inputs = [
            ("--actor.model_name_or_path", args.actor.model_name_or_path),
            ("--data.dataset", args.data.dataset),
            ("--ditto.extra_pairs", args.ditto.extra_pairs),
        ]
        for flag, path in inputs:
            if args.overwrite and path and Path(path).exists() and Path(path).resolve().is_relative_to(out.resolve()):
                raise RunFolderError(
                    f"--overwrite would delete {flag} {path}, which lies in --ckpt.output_dir {out}; copy it out "
                    "first, or choose another --ckpt.output_dir"
                )
    # --overwrite deletes a DITTO run, never a folder of other files (a .lock alone is a start that claimed nothing)
    elif out.exists() and any(f.name != ".lock" for f in out.iterdir()):
        raise RunFolderError(f"{out} is not empty and holds no DITTO run; choose an empty --ckpt.output_dir")
    elif args.resume:
        print(f"{out} holds no run to resume: starting a new one")
    return latest_checkpoint(out) if args.resume else None


def claim_run_folder(args: SimpleNamespace, inputs: dict | None = None):
    """Make --ckpt.output_dir this run's (--overwrite deletes what it held), only once everything checked out, and
    hold its lock: returns the open lock file, which the caller closes when the run ends. `inputs`
    (`input_fingerprints`) is written to inputs.json for --resume to compare."""
    out, tensorboard = Path(args.ckpt.output_dir), args.logger.tensorboard_dir
    try:  # first: a folder it cannot write stops the start before the run folder is touched
        if tensorboard:
            Path(tensorboard).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"cannot write --logger.tensorboard_dir {tensorboard}: {e}") from None
    try:
        if args.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process claimed it since check_run_folder
            lock.close()
            raise RunFolderError(
                f"{out} is in use by {lock_holder(out)}; wait for it to end, or choose another --ckpt.output_dir"
            ) from None
        lock.truncate(0)
        lock.write(f"process {os.getpid()} ({' '.join(sys.argv) or 'python'})")
        lock.flush()
        (out / "run_config.json").write_text(json.dumps(run_config(args), indent=1))
        if inputs is not None:
            (out / "inputs.json").write_text(json.dumps(inputs))
    except OSError as e:
        raise RunFolderError(f"cannot write the run folder --ckpt.output_dir {out}: {e}") from None
    return lock


def input_fingerprints(store: SampleStore) -> dict[str, list[str]]:
    """A short hash per demo and per external pair, as tokenized (so a changed template counts as a change)."""

    def digest(*ids: torch.Tensor) -> str:
        return hashlib.sha256(json.dumps([x.tolist() for x in ids]).encode()).hexdigest()[:16]

    return {
        "demos": [digest(store.prompt_of(d), d.ids) for d in store.demos],
        "extra_pairs": [digest(store.prompt_of(c), c.ids, r.ids) for c, r in store.external],
    }


def check_inputs_unchanged(args: SimpleNamespace, inputs: dict[str, list[str]]) -> None:
    """--resume continues on the data the run started with: refuse it, naming the records, when they changed."""
    file = Path(args.ckpt.output_dir) / "inputs.json"
    if not (args.resume and file.exists()):
        return
    saved = read_json(file)
    for key, flag in (("demos", "--data.dataset"), ("extra_pairs", "--ditto.extra_pairs")):
        old, new = saved.get(key, []), inputs[key]
        changed = [str(i) for i, (a, b) in enumerate(zip(old, new)) if a != b]
        what = [f"records {', '.join(changed[:10])} changed"] if changed else []
        what += [f"{len(new) - len(old)} added"] if len(new) > len(old) else []
        what += [f"{len(old) - len(new)} removed"] if len(new) < len(old) else []
        if what:
            raise RunFolderError(
                f"{flag} changed since this run started ({'; '.join(what)}, counted from 0 in file order): --resume "
                "continues on the data the run started with. Train on the new data in a new run (another "
                "--ckpt.output_dir, or --overwrite), or with many users (--data.users) in a new round"
            )


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in folder/checkpoints (None without one)."""
    latest = folder / "checkpoints" / "latest"
    return folder / "checkpoints" / latest.read_text().strip() if latest.exists() else None


def write_checkpoint(
    folder: Path, store, state: dict, save_backend, rng: dict, history: list[dict], max_num: int
) -> None:
    """The run's store, then checkpoints/iter_<state's iteration>/: the backend's state (`save_backend(path)`), the
    RNG states, trainer_state.json and the metrics so far; then `latest` names it, and the oldest beyond `max_num`
    go."""
    name = f"iter_{state['iteration']:05d}"
    checkpoints = folder / "checkpoints"
    with writing(f"checkpoint {checkpoints / name}", folder):
        store.save(folder / "store")
        with atomic_dir(checkpoints / name) as tmp:
            save_backend(tmp / "backend")
            torch.save(rng, tmp / "rng.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            (tmp / "metrics.jsonl").write_text(jsonl(history))
        write_atomic(checkpoints / "latest", name)
    for old in sorted(checkpoints.glob("iter_?????"))[:-max_num]:
        shutil.rmtree(old)


def read_checkpoint(checkpoint: Path) -> tuple[dict, dict, list[dict]]:
    """(trainer state, RNG states, metrics so far) of a checkpoint `write_checkpoint` wrote."""
    rng = torch.load(checkpoint / "rng.pt", weights_only=False)
    return read_json(checkpoint / "trainer_state.json"), rng, read_json(checkpoint / "metrics.jsonl", lines=True)


def resume_hint(out: Path) -> str:
    """Where a stopped run stands and how to continue it."""
    latest = latest_checkpoint(out)
    if latest is not None:
        return f"the last complete checkpoint is {latest}; continue from it with the same command plus --resume"
    if (out / "reference").exists():
        return f"no DITTO checkpoint yet; --resume starts DITTO again from pi_0 ({out / 'reference'}), SFT kept"
    return "nothing was trained yet; --resume (or --overwrite) starts again from the SFT warm start"


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


@contextlib.contextmanager
def sigterm_stops():
    """SIGTERM raises KeyboardInterrupt("SIGTERM") inside (in the main thread), as Ctrl-C raises KeyboardInterrupt."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
