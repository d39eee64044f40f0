"""Many users in one job: `openrlhf-ditto train --data.users` (--data.dataset is a folder of demo files, one per user,
the file's stem is the user's id) or `--data.user_key KEY` (one dataset with a user column).

Each user is a run of the one DITTO loop (trainer.py) with the same flags and seed as a single-user run of their
demos, against one resident copy of the base model: every step takes all users' rows in one batch, each row through
its own user's LoRA adapters, and each user keeps their own optimiser, lr schedule, pair sampler and RNG, so that
what a user gets does not depend on who else is in the job. This module is what is about users: who they are, the
rounds when their demos change, the summary and the `vllm serve` command that serves them all.

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
--ditto.val_dataset and --ditto.extra_pairs take a folder of files named by user id (a user without one has none; the
external share of their pairs goes to online pairs); --ditto.val_demos K holds out each user's last K demos.
"""

import json
import os
import re
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

from openrlhf_ditto.backends.lora import VLLM_MAX_LORAS, vllm_max_lora_rank
from openrlhf_ditto.demos import Demo, load_demos, load_preference_pairs, read_records
from openrlhf_ditto.pairs import KINDS
from openrlhf_ditto.runfolder import (
    RunFolderError,
    RunStopped,
    check_run_folder,
    claim_run_folder,
    latest_checkpoint,
    read_checkpoint,
    run_config,
    write_atomic,
)
from openrlhf_ditto.store import SampleStore
from openrlhf_ditto.trainer import Run, load_tokenizer, prompt_rendering, run_ditto

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
    rendering = dict(input_key=d.input_key, output_key=d.output_key, **prompt_rendering(args))
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


def user_files(flag: str, path: str | None, users) -> dict[str, Path]:
    """{user id: their file} of a folder of files named by user id (--ditto.val_dataset, --ditto.extra_pairs)."""
    if not path:
        return {}
    if not Path(path).is_dir():
        raise ValueError(f"{flag} {path}: with many users, give a folder of files named by user id (one per user)")
    files = {f.stem: f for f in sorted(Path(path).iterdir()) if f.suffix.lower() in DEMO_FILES}
    unknown = sorted(set(files) - set(users))
    if unknown:
        raise ValueError(f"{flag} {path}: files of users {unknown[:5]} who have no demos in --data.dataset")
    return files


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
    write_atomic(folder / "demos.jsonl", _jsonl(records))
    os.replace(tmp, rounds / tmp.stem)


def user_run(uid: str, status: str, records: list[dict], demos: list[Demo], args, val, pairs, files) -> Run:
    """The user's run of the loop, their folder made ready: new, resumed (from their checkpoint), or a new round
    (from their last DITTO adapter, against the same pi_0)."""
    folder = Path(args.ckpt.output_dir) / "users" / uid
    if status == "new round":
        _start_round(folder, records)
    elif status == "new":
        folder.mkdir(parents=True, exist_ok=True)
        config = run_config(args)  # the user's own view of the job: a single-user run of these demos
        config["data"].update(dataset=str((folder / "demos.jsonl").resolve()), users=False, user_key=None)
        config["ditto"].update({k: str(f[uid].resolve()) if uid in f else None for k, f in files.items()})
        write_atomic(folder / "run_config.json", json.dumps(dict(config, user=uid), indent=1))
        write_atomic(folder / "demos.jsonl", _jsonl(records))
    k = args.ditto.val_demos
    held_out = demos[len(demos) - k :] if k else val.get(uid, [])
    demos = demos[: len(demos) - k]
    store = SampleStore.from_demos(
        [d.prompt_ids for d in demos], [d.response_ids for d in demos], [d.truncated for d in demos]
    )
    if uid in pairs:
        store.add_external(pairs[uid])
    resume_from = latest_checkpoint(folder)
    if resume_from is not None:
        store = SampleStore.load(folder / "store", num_iterations=read_checkpoint(resume_from)[0]["iteration"])
    rounds = sorted((r for r in (folder / "rounds").glob("*") if r.name.isdigit()), key=lambda r: int(r.name))
    start_from = latest_checkpoint(rounds[-1]) if rounds and resume_from is None else None
    return Run(uid, folder, store, held_out, resume_from, start_from)


def train_users(args: SimpleNamespace, make_backend) -> Path:
    """Run DITTO for every user of --data.dataset in one job (`run_ditto` over a run per user); `make_backend(
    base_model)` builds the backend. Returns the run folder. Users already finished (same demos) are left as they
    are; a user whose demos changed after they finished starts a new round from their DITTO adapter.

    Everything is checked before the run folder is claimed, as for one user. A non-finite value stops only its user
    (reported at the end, exit code 1); Ctrl-C, SIGTERM or a failed write stop the job, every user keeping their last
    checkpoint, and --resume continues each from theirs.
    """
    if args.ds.lora.rank < 1:
        raise ValueError(
            "many users share one base model through their LoRA adapters: --ds.lora.rank must be >= 1 "
            "(full-parameter training holds a model per user: train each user in a run of their own)"
        )
    check_run_folder(args)
    out = Path(args.ckpt.output_dir)
    if args.resume and (out / "run_config.json").exists() and not (out / "users").is_dir():
        raise RunFolderError(f"{out} holds a single-user run; --data.users needs a run folder of its own")
    tokenizer = load_tokenizer(args)
    users = load_users(args, tokenizer)
    k = args.ditto.val_demos
    if k and (few := [uid for uid, (_, demos) in users.items() if len(demos) <= k]):
        raise ValueError(
            f"--ditto.val_demos {k} holds out every demo of users {few[:5]}; hold out fewer, or give their held-out "
            "examples with --ditto.val_dataset"
        )
    files = {
        "val_dataset": user_files("--ditto.val_dataset", args.ditto.val_dataset, users),
        "extra_pairs": user_files("--ditto.extra_pairs", args.ditto.extra_pairs, users),
    }
    d, rendering = args.data, prompt_rendering(args)
    val = {
        uid: load_demos(f, tokenizer, d.input_key, d.output_key, **rendering)
        for uid, f in files["val_dataset"].items()
    }
    pairs = {
        uid: load_preference_pairs(f, tokenizer, d.prompt_key, d.chosen_key, d.rejected_key, **rendering)
        for uid, f in files["extra_pairs"].items()
    }
    # --overwrite: the old run goes when the folder is claimed, so everyone is new
    status = {uid: "new" if args.overwrite else _status(out / "users" / uid, rows) for uid, (rows, _) in users.items()}
    todo = [uid for uid in users if status[uid] != "finished"]
    if not todo:
        print(f"all {len(users)} users of {args.data.dataset} are finished; nothing to train")
        _summary(out, args, status)
        return out
    backend = make_backend(args.actor.model_name_or_path)
    with claim_run_folder(args):  # the job's lock, held while it trains
        runs = [user_run(uid, status[uid], *users[uid], args, val, pairs, files) for uid in todo]
        run_ditto(args, backend, runs, tokenizer)
    stopped = {run.id: run.stopped for run in runs if run.stopped}
    status.update({run.id: "stopped" if run.stopped else "trained now" for run in runs})
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
    write_atomic(out / "summary.md", text)
    print(text)


def vllm_serve_command(base: str, adapters: dict[str, Path], rank: int) -> list[str]:
    """`vllm serve` of the base model with each user's DITTO policy (`final/`, rank 2 x `rank`) as a LoRA adapter
    named by their id."""
    return [
        "vllm", "serve", base, "--enable-lora", "--max-lora-rank", str(vllm_max_lora_rank(2 * rank)),
        "--max-loras", str(min(len(adapters), VLLM_MAX_LORAS)),
        "--lora-modules", *(f"{uid}={path}" for uid, path in adapters.items()),
    ]  # fmt: skip
