"""Many users in one job: `openrlhf-ditto train --data.users` (--data.dataset is a folder of demo files, one per user,
the file's stem is the user's id) or `--data.user_key KEY` (one dataset with a user column).

Every user is trained as a single-user run of their demos with the same flags and seed trains them, against one
resident copy of the base model (backends/multi_lora.py): an SFT warm start gives their pi_0, an adapter, frozen as
their reference; then, each iteration, every user's rollouts at once, scored once by their own reference, and
--ditto.resample_every optimiser steps per user, round-robin. Each user has their own optimiser, pair sampler and
torch RNG state, so what a user gets does not depend on who else is in the job.

Run folder (--ckpt.output_dir):
  run_config.json     every flag of the job
  users/<id>/         one user, laid out as a single-user run (`eval` and `serve-reward` take it as --run):
    demos.jsonl         their demos as trained on (when they change, the user starts a new round)
    run_config.json     the job's flags with these demos
    reference/          pi_0: their SFT adapter of the base model
    store/ checkpoints/ metrics.jsonl   as in a single-user run
    final/              their DITTO policy: one adapter of the base model (SFT and DITTO adapters, rank 2r)
    rounds/<k>/         an earlier round's store, checkpoints, final/ and metrics.jsonl
  logs/               TensorBoard: each user's scalars under <id>/
  summary.md          a row per user, and the `vllm serve` command that serves them all
"""

import contextlib
import copy
import json
import os
import re
import shlex
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from openrlhf_ditto.backends.multi_lora import vllm_serve_command
from openrlhf_ditto.demos import Demo, load_demos, read_records
from openrlhf_ditto.evaluate import evaluate
from openrlhf_ditto.experience import DittoExperienceMaker
from openrlhf_ditto.pairs import KINDS, PairSampler
from openrlhf_ditto.store import SampleStore
from openrlhf_ditto.trainer import (
    Logger,
    RunFolderError,
    RunStopped,
    _atomic_dir,
    _on_sigterm,
    check_run_folder,
    claim_run_folder,
    load_tokenizer,
    run_config,
    sft_warm_start,
    stop_if_not_finite,
    writing,
)

USER_ID = re.compile(r"[A-Za-z0-9_-]+")  # a folder name and part of the user's adapter names
DEMO_FILES = (".json", ".jsonl", ".csv", ".parquet")
ROUND = ("store", "checkpoints", "final", "metrics.jsonl")  # what a new round of a user starts afresh


def is_multi_user(args: SimpleNamespace) -> bool:
    return bool(args.data.users or args.data.user_key)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True, default=str) + "\n" for row in rows)


def load_users(args: SimpleNamespace, tokenizer) -> dict[str, tuple[list[dict], list[Demo]]]:
    """{user id: (their demo records, their demos tokenized)}, every file read and checked as a single-user run
    checks its demos. All broken user files are named at once, and nothing starts until they are fixed or moved out
    of the folder: a user who asked for a model never silently gets none."""
    d = args.data
    path = Path(d.dataset)
    rendering = dict(
        input_key=d.input_key,
        output_key=d.output_key,
        input_template=d.input_template,
        apply_chat_template=d.apply_chat_template,
        prompt_max_len=d.max_len - args.rollout.max_new_tokens,
        generate_max_len=args.rollout.max_new_tokens,
    )
    users: dict[str, tuple[list[dict], list[Demo]]] = {}
    if d.user_key:
        records = read_records(path)
        for i, record in enumerate(records):
            if d.user_key not in record:
                raise ValueError(
                    f"demos: {path}, record {i}: no user key {d.user_key!r}; its keys are {sorted(record)}. Name the "
                    "column that holds the user's id with --data.user_key"
                )
        for record, demo in zip(records, load_demos(path, tokenizer, **rendering)):
            rows, demos = users.setdefault(str(record[d.user_key]), ([], []))
            rows.append(record)
            demos.append(demo)
    else:
        if not path.is_dir():
            raise ValueError(
                f"--data.users: --data.dataset {path} is not a folder; give a folder of demo files, one per user (the "
                "file's stem is the user's id), or one dataset with a user column and --data.user_key"
            )
        files = sorted(f for f in path.iterdir() if not f.name.startswith("."))  # not .DS_Store and the like
        if not any(f.suffix.lower() in DEMO_FILES for f in files):
            raise ValueError(f"--data.users: {path} holds no demo file ({', '.join(DEMO_FILES)}); one per user")
        broken = []  # every unusable file in one pass, so that one fix-up makes the folder right
        for file in files:
            if file.is_dir() or file.suffix.lower() not in DEMO_FILES:
                folder = "; a user is one file, not a folder" if file.is_dir() else ""
                broken.append(f"{file}: not a demo file ({', '.join(DEMO_FILES)}){folder}")
            elif not USER_ID.fullmatch(file.stem):
                broken.append(
                    f"{file}: user id {file.stem!r} is not letters, digits, _ and - only (it names a folder and "
                    "adapters); rename the file"
                )
            elif file.stem in users:
                broken.append(f"{file}: a second file for user {file.stem!r}")
            else:
                try:
                    users[file.stem] = (read_records(file), load_demos(file, tokenizer, **rendering))
                except (FileNotFoundError, ValueError) as e:
                    broken.append(str(e))
        if broken:
            raise ValueError(
                f"{len(broken)} of the {len(files)} user files in {path} cannot be used; fix them, or move them out "
                "of the folder to train the others (a finished user's work is kept either way):\n  "
                + "\n  ".join(broken)
            )
    bad = [uid for uid in users if not USER_ID.fullmatch(uid)]
    if bad:
        raise ValueError(
            f"user ids {bad[:5]} in {path}: an id is letters, digits, _ and - only (it names a folder and adapters); "
            "rename the files or the values of --data.user_key"
        )
    cut = {uid: sum(demo.truncated for demo in demos) for uid, (_, demos) in users.items()}
    if any(cut.values()):
        who = ", ".join(f"{uid} {n}" for uid, n in cut.items() if n)
        print(
            f"warning: {sum(cut.values())} demos ({who}) are longer than --rollout.max_new_tokens "
            f"{args.rollout.max_new_tokens} and are cut to it; raise --rollout.max_new_tokens (and --data.max_len) "
            "to train on them whole",
            file=sys.stderr,
        )
    return users


def _status(folder: Path, records: list[dict]) -> str:
    """What a user's folder asks for: new, resume (unfinished), finished, or a new round (their demos changed after
    they finished; also a new round that was interrupted while it moved the last one aside)."""
    if not (folder / "demos.jsonl").exists():
        return "new"
    changed = (folder / "demos.jsonl").read_text() != _jsonl(records)
    if any((folder / "rounds").glob("*.tmp")) or (changed and (folder / "final").is_dir()):
        return "new round"
    if changed:
        raise ValueError(
            f"user {folder.name}: their demos changed while their run was unfinished; restore the file and --resume "
            f"to finish it (then add the demos: the user continues from their DITTO adapter), or delete {folder} to "
            "start them over"
        )
    return "finished" if (folder / "final").is_dir() else "resume"


def _start_round(folder: Path, records: list[dict]) -> None:
    """Move the user's last round aside (rounds/<k>/) and take their new demos. The move happens inside rounds/<k>.tmp,
    renamed only once the new demos are written: a run killed midway finishes the move when it is started again."""
    rounds = folder / "rounds"
    tmp = next(rounds.glob("*.tmp"), None) or rounds / f"{len([r for r in rounds.glob('*') if r.is_dir()])}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ROUND:
        if (folder / name).exists():
            os.replace(folder / name, tmp / name)
    _write(folder / "demos.jsonl", _jsonl(records))
    os.replace(tmp, rounds / tmp.stem)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _latest(folder: Path) -> Path | None:
    """The newest complete checkpoint in folder/checkpoints (None without one)."""
    latest = folder / "checkpoints" / "latest"
    return folder / "checkpoints" / latest.read_text().strip() if latest.exists() else None


@dataclass
class User:
    id: str
    folder: Path
    store: SampleStore
    sampler: PairSampler
    maker: DittoExperienceMaker
    log: "UserLog"
    state: dict = field(default_factory=lambda: {"iteration": 0, "global_step": 0})
    rng: tuple = ()  # (CPU, CUDA or None) torch RNG states: the user's own draws, as in a single-user run


class UserLog:
    """One user's metrics: in the job's TensorBoard (and W&B) under `<id>/`, and as the rows of their metrics.jsonl."""

    def __init__(self, logger: Logger, uid: str):
        self.logger, self.uid, self.history = logger, uid, []

    def scalars(self, prefix: str, metrics: dict[str, float], step: int) -> None:
        self.logger.scalars(f"{self.uid}/{prefix}", metrics, step)
        self.history.append({"prefix": prefix, "step": step, **metrics})

    def text(self, tag: str, text: str, step: int) -> None:
        self.logger.text(f"{self.uid}/{tag}", text, step)


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


@contextlib.contextmanager
def own_rng(user: User):
    """Run with the user's torch RNG state as the global one, and keep where it ends for the user."""
    saved = _rng_state()
    _set_rng_state(user.rng)
    try:
        yield
    finally:
        user.rng = _rng_state()
        _set_rng_state(saved)


@contextlib.contextmanager
def _alone(user: User, stopped: dict[str, str]):
    """A non-finite value stops this user only: their last checkpoint stays, the others train on."""
    try:
        yield
    except RunStopped as e:
        stopped[user.id] = str(e)
        user.log.history.append({"prefix": "stopped", "step": user.state["global_step"], "reason": str(e)})
        with contextlib.suppress(OSError):
            (user.folder / "metrics.jsonl").write_text(_jsonl(user.log.history))


def _start_user(uid, status, records, demos, backend, args, logger) -> User:
    """Make the user's folder and adapters ready for their next DITTO iteration: new (SFT warm start), resumed (from
    their checkpoint), or a new round (from their last DITTO adapter, against the same pi_0)."""
    folder = Path(args.ckpt.output_dir) / "users" / uid
    if status == "new round":
        _start_round(folder, records)
    elif status == "new":
        folder.mkdir(parents=True, exist_ok=True)
        config = run_config(args)  # the user's own view of the job: a single-user run of these demos
        config["data"].update(dataset=str((folder / "demos.jsonl").resolve()), users=False, user_key=None)
        _write(folder / "run_config.json", json.dumps(dict(config, user=uid), indent=1))
        _write(folder / "demos.jsonl", _jsonl(records))
    store = SampleStore.from_demos(
        [d.prompt_ids for d in demos], [d.response_ids for d in demos], [d.truncated for d in demos]
    )
    log = UserLog(logger, uid)
    reference = folder / "reference"
    resume_from = _latest(folder)
    state = {"iteration": 0, "global_step": 0}
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        store = SampleStore.load(folder / "store", num_iterations=state["iteration"])
    torch.manual_seed(args.train.seed)  # the SFT adapter's initialisation, as in a single-user run
    backend.add_user(uid, reference if reference.is_dir() else None)
    pad = backend.pad
    if not reference.is_dir():
        sft_warm_start(backend, store, args, log, pad)
    torch.manual_seed(args.train.seed)  # the DITTO adapter's
    if reference.is_dir():
        backend.freeze_reference(None)
    else:
        with writing(f"pi_0 of user {uid} to {reference}", folder), _atomic_dir(reference) as tmp:
            backend.freeze_reference(tmp)
    rounds = sorted((r for r in (folder / "rounds").glob("*") if r.name.isdigit()), key=lambda r: int(r.name))
    if resume_from is None and rounds:
        backend.start_from(_latest(rounds[-1]) / "backend")

    sampler = PairSampler(store, tuple(args.ditto.pair_fractions), seed=args.train.seed)
    maker = DittoExperienceMaker(
        store, sampler, backend.reference_logps, pad, backend.eos_ids, args.rollout.micro_batch_size
    )
    maker.score_inputs()
    for i, demo in enumerate(store.demos):
        stop_if_not_finite(
            {"its reference log-prob": demo.ref_logp}, f"user {uid}, demo {i}", "broken reference weights"
        )
    with writing(f"the demos of user {uid} to {folder / 'store'}", folder):
        store.save(folder / "store")
    user = User(uid, folder, store, sampler, maker, log, state)
    if resume_from is not None:
        backend.load_checkpoint(resume_from / "backend")
        rng = torch.load(resume_from / "rng.pt", weights_only=False)
        sampler.load_state_dict(rng["sampler"])
        user.rng = (rng["torch"], rng.get("cuda"))
        log.history = [json.loads(line) for line in (resume_from / "metrics.jsonl").read_text().splitlines()]
    else:
        torch.manual_seed(args.train.seed)
        user.rng = _rng_state()
    return user


def _checkpoint(user: User, backend, max_num: int) -> None:
    """The user's iteration, written as a single-user run writes its checkpoints."""
    name = f"iter_{user.state['iteration']:05d}"
    checkpoints = user.folder / "checkpoints"
    with writing(f"checkpoint {checkpoints / name}", user.folder):
        user.store.save(user.folder / "store")
        with _atomic_dir(checkpoints / name) as tmp:
            backend.save_checkpoint(tmp / "backend")
            rng = {"sampler": user.sampler.state_dict(), "torch": user.rng[0], "cuda": user.rng[1]}
            torch.save(rng, tmp / "rng.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(user.state))
            (tmp / "metrics.jsonl").write_text(_jsonl(user.log.history))
        _write(checkpoints / "latest", name)
    for old in sorted(checkpoints.glob("iter_?????"))[:-max_num]:
        shutil.rmtree(old)


def _finish(user: User, backend) -> None:
    """The user's DITTO policy to final/ (one adapter of the base), and their adapters out of memory."""
    backend.use(user.id)
    with writing(f"the final model of user {user.id}", user.folder):
        with _atomic_dir(user.folder / "final") as tmp:
            backend.save_model(tmp)
        _write(user.folder / "metrics.jsonl", _jsonl(user.log.history))
    backend.drop_user(user.id)


def train_users(args: SimpleNamespace, make_backend) -> Path:
    """Run DITTO for every user of --data.dataset in one job; `make_backend(base_model)` builds a MultiLoraBackend.
    Returns the run folder. Users already finished (same demos) are left as they are; a user whose demos changed
    after they finished starts a new round from their DITTO adapter.

    Everything is checked before the run folder is claimed, as for one user. A non-finite value stops only its user
    (reported at the end, exit code 1); Ctrl-C, SIGTERM or a failed write stop the job, every user keeping their last
    checkpoint, and --resume continues each from theirs.
    """
    if args.ds.lora.rank < 1:
        raise ValueError("many users share one base model through their LoRA adapters: --ds.lora.rank must be >= 1")
    for flag, value in (
        ("--ditto.extra_pairs", args.ditto.extra_pairs),
        ("--ditto.val_demos", args.ditto.val_demos),
        ("--ditto.val_dataset", args.ditto.val_dataset),
    ):
        if value:
            raise ValueError(f"{flag} is not supported with many users yet; train without it")
    check_run_folder(args)
    out = Path(args.ckpt.output_dir)
    if args.resume and (out / "run_config.json").exists() and not (out / "users").is_dir():
        raise RunFolderError(f"{out} holds a single-user run; --data.users needs a run folder of its own")
    users = load_users(args, load_tokenizer(args))
    # --overwrite: the old run goes when the folder is claimed, so everyone is new
    status = {uid: "new" if args.overwrite else _status(out / "users" / uid, rows) for uid, (rows, _) in users.items()}
    todo = [uid for uid in users if status[uid] != "finished"]
    if not todo:
        print(f"all {len(users)} users of {args.data.dataset} are finished; nothing to train")
        _summary(out, args, status)
        return out
    backend = make_backend(args.actor.model_name_or_path)
    lock = claim_run_folder(args)

    logger = Logger(args, out / "logs")
    stopped: dict[str, str] = {}
    started: dict[str, User] = {}
    active: list[User] = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        for uid in tqdm(todo, desc=f"users ({len(todo)} to train)", disable=len(todo) < 2):
            records, demos = users[uid]
            user = started[uid] = _start_user(uid, status[uid], records, demos, backend, args, logger)
            status[uid] = "trained now"
            if user.state["iteration"] < args.ditto.iterations:
                active.append(user)
            else:  # killed after its last checkpoint, before its final/
                _finish(user, backend)
        while active:
            rollouts = backend.generate_users(
                {u.id: u.store.prompts for u in active},
                args.rollout.n_samples_per_prompt,
                lambda i: own_rng(started[i]),
            )
            for u in active:
                with own_rng(u), _alone(u, stopped):
                    backend.use(u.id)
                    stats = u.maker.make_experience(rollouts[u.id])
                    where = f"user {u.id}, iteration {u.state['iteration'] + 1}"
                    stop_if_not_finite(stats, f"{where}, sampling", "broken reference weights, or an overflow")
                    u.log.scalars("samples", stats, u.state["global_step"])
            active = [u for u in active if u.id not in stopped]
            step_bar = tqdm(range(args.ditto.resample_every), desc=f"DITTO, {len(active)} user(s)")
            for _ in step_bar:
                for u in active:
                    if u.id in stopped:
                        continue
                    with own_rng(u), _alone(u, stopped):
                        backend.use(u.id)
                        batch = u.maker.pair_batch(args.train.batch_size)
                        metrics = backend.train_step(batch)
                        metrics["truncated_rate"] = batch.truncated.float().mean().item()
                        u.state["global_step"] += 1
                        u.log.scalars("train", metrics, u.state["global_step"])
                        stop_if_not_finite(
                            metrics,
                            f"user {u.id}, step {u.state['global_step']}",
                            f"a learning rate too high (--actor.adam.lr {args.actor.adam.lr}) or an overflow",
                        )
            step_bar.close()
            active = [u for u in active if u.id not in stopped]
            for u in active:
                u.state["iteration"] += 1
                backend.use(u.id)
                _checkpoint(u, backend, args.ckpt.max_num)
                if u.state["iteration"] == args.ditto.iterations:
                    _finish(u, backend)
            active = [u for u in active if u.state["iteration"] < args.ditto.iterations]
        for uid in stopped:
            status[uid] = "stopped"
    except (KeyboardInterrupt, RunStopped) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        reason = f"stopped by {e.args[0] if e.args else 'Ctrl-C'}" if interrupted else str(e)
        for u in active:
            u.log.history.append({"prefix": "stopped", "step": u.state["global_step"], "reason": reason})
            with contextlib.suppress(OSError):
                (u.folder / "metrics.jsonl").write_text(_jsonl(u.log.history))
        code = (143 if e.args == ("SIGTERM",) else 130) if interrupted else 1
        raise RunStopped(
            f"{reason}. Nothing after each user's last checkpoint was kept (users/<id>/checkpoints/latest; finished "
            "users are complete); continue with the same command plus --resume",
            code,
        ) from None
    finally:
        logger.close()
        lock.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
    _summary(out, args, status)
    if stopped:
        raise RunStopped(
            f"{len(stopped)} of {len(users)} users stopped, each keeping their last checkpoint; the others are "
            f"finished. {' '.join(stopped.values())} Continue them with the same command plus --resume"
        )
    return out


def _summary(out: Path, args: SimpleNamespace, status: dict[str, str]) -> None:
    """Print and write summary.md: a row per user (status, and each pair kind's accuracy, margin and count over their
    last iteration's steps, from their metrics.jsonl), and the `vllm serve` command of every finished user."""
    kinds = KINDS[:3]
    lines = [
        f"# DITTO, many users: {out}",
        "",
        "Each pair kind: accuracy / mean margin (pairs) over the user's last iteration.",
        "",
        "| user | status | steps | loss | " + " | ".join(kinds) + " |",
        "| --- " * (4 + len(kinds)) + "|",
    ]
    folders = sorted(p for p in (out / "users").glob("*") if p.is_dir()) if (out / "users").is_dir() else []
    adapters = {}
    for folder in folders:
        uid = folder.name
        rows = []
        if (folder / "metrics.jsonl").exists():
            rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        train = [row for row in rows if row["prefix"] == "train"][-args.ditto.resample_every :]
        cells = []
        for kind in kinds:
            n = sum(row.get(f"{kind}/count", 0) for row in train)
            acc, margin = ([row[f"{kind}/{m}"] for row in train if f"{kind}/{m}" in row] for m in ("acc", "margin"))
            cells.append(f"{sum(acc) / len(acc):.2f} / {sum(margin) / len(margin):+.3f} ({n})" if n else "-")
        loss = f"{sum(row['loss'] for row in train) / len(train):.4f}" if train else "-"
        steps = train[-1]["step"] if train else 0
        lines.append(
            f"| {uid} | {status.get(uid, 'not in --data.dataset: kept')} | {steps} | {loss} | "
            + " | ".join(cells)
            + " |"
        )
        if (folder / "final").is_dir():
            adapters[uid] = (folder / "final").resolve()
    if adapters:
        base = args.actor.model_name_or_path
        base = str(Path(base).resolve()) if Path(base).exists() else base
        command = shlex.join(vllm_serve_command(base, adapters, args.ds.lora.rank))
        lines += [
            "",
            f"Serve the {len(adapters)} finished users' DITTO policies from one base model (a request's "
            "`model` is the user's id):",
            "",
            "```bash",
            command,
            "```",
        ]
    text = "\n".join(lines) + "\n"
    _write(out / "summary.md", text)
    print(text)


def evaluate_users(args: SimpleNamespace) -> Path:
    """`openrlhf-ditto eval` of a multi-user run: `evaluate` of each user (their folder reads as a single-user run) on
    their own held-out prompts, then the paper's per-author table, a row per user and their average. --data.dataset is
    a folder of held-out files named by user id, or one file with the user column (--data.user_key, default: the
    run's). Returns the table's path (OUT/report.md; each user's own report is OUT/users/<id>/report.md)."""
    run = Path(args.run)
    config = json.loads((run / "run_config.json").read_text())
    out = Path(args.output_dir or run / "eval")
    path, key = Path(args.data.dataset), args.data.user_key or config["data"]["user_key"]
    if key:
        held_out: dict[str, list[dict]] = {}
        for i, record in enumerate(read_records(path, "--data.dataset (held-out)")):
            if key not in record:
                raise ValueError(
                    f"--data.dataset (held-out): {path}, record {i}: no user key {key!r} (--data.user_key)"
                )
            held_out.setdefault(str(record[key]), []).append(record)
        files = {}
        for uid, records in held_out.items():
            files[uid] = out / "users" / uid / "held_out.jsonl"
            files[uid].parent.mkdir(parents=True, exist_ok=True)
            _write(files[uid], _jsonl(records))
    elif path.is_dir():
        files = {f.stem: f for f in sorted(path.iterdir()) if f.suffix.lower() in DEMO_FILES}
    else:
        raise ValueError(
            f"--data.dataset {path}: a multi-user run's held-out prompts are a folder of files named by user id, or "
            "one file with a user column (--data.user_key)"
        )
    finished = {p.parent.name for p in (run / "users").glob("*/final")}
    unknown = sorted(set(files) - finished)
    if unknown:
        raise ValueError(f"--data.dataset {path}: users {unknown} have no finished DITTO run in {run}/users")
    results = {}
    for uid in sorted(files):
        user = copy.deepcopy(args)
        user.run, user.data.dataset, user.output_dir = run / "users" / uid, files[uid], out / "users" / uid
        user.data.user_key = None
        print(f"\n# user {uid}")
        evaluate(user)
        results[uid] = json.loads((out / "users" / uid / "results.json").read_text())

    names = list(next(iter(results.values()))["conditions"])
    if "ditto" in names:  # the paper's table: DITTO's win rate against each baseline
        columns = [
            (f"DITTO vs {b}", lambda r, b=b: r["matrix"]["ditto"][b] and r["matrix"]["ditto"][b][0])
            for b in names
            if b != "ditto"
        ]
    else:  # each condition's mean win rate over the others
        columns = [(c, lambda r, c=c: r["mean"][c]) for c in names]
    rows = {uid: [cell(r) for _, cell in columns] for uid, r in results.items()}
    average = []
    for j in range(len(columns)):
        values = [row[j] for row in rows.values() if row[j] is not None]
        average.append(sum(values) / len(values) if values else None)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        f"# DITTO eval, many users: {run}",
        "",
        f"Held-out prompts `{path}`, judge `{next(iter(results.values()))['judge']}`; each user's own report (matrix, "
        "intervals, per prompt) is users/<id>/report.md.",
        "",
        "| user | " + " | ".join(name for name, _ in columns) + " |",
        "| --- " * (len(columns) + 1) + "|",
        *(f"| {uid} | " + " | ".join(pct(x) for x in row) + " |" for uid, row in rows.items()),
        "| **average** | " + " | ".join(pct(x) for x in average) + " |",
    ]
    missing = sorted(finished - set(files))
    if missing:
        lines += ["", f"Not evaluated (no held-out prompts): {', '.join(missing)}."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "report.md", text)
    table = {uid: dict(zip([name for name, _ in columns], row)) for uid, row in rows.items()}
    _write(
        out / "results.json",
        json.dumps({"users": table, "average": dict(zip([n for n, _ in columns], average))}, indent=1),
    )
    print("\n" + text)
    return out / "report.md"
