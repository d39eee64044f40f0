"""Many users in one job: one batched job, the same job round-robin (the last release's loop) and separate runs.

The users are the CMCC dev authors (their demos.jsonl; the data stays where it is: the path is an argument). For each
N (default 1, 4, 11) the first N authors are trained with the same flags and seed:
  - batched: `openrlhf-ditto train --data.users` of this code: every step takes all users' rows in one forward and
    backward (SFT, sampling, scoring and DITTO steps alike);
  - round-robin: the same job run by the code of --baseline (a checkout of the last release, cf47364: one forward
    and backward per user, each user in turn);
  - separate: N single-user runs of this code, one after the other (each author's run is timed once and summed).
Each is a process of its own, timed from start to exit, its peak resident memory read from the kernel (wait4), and the
time inside the backend's calls summed per phase: SFT (sft_step), sampling (generate), scoring (reference and policy
log-probs) and DITTO steps (train_step); "other" is the rest (imports, model loading, saving).

    git worktree add --detach /tmp/release cf47364
    OMP_NUM_THREADS=1 python benchmarks/many_users.py --data ../shared/data/cmcc_dev --baseline /tmp/release
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = [
    "--data.apply_chat_template", "--data.max_len", "192", "--rollout.max_new_tokens", "16",
    "--rollout.n_samples_per_prompt", "2", "--ditto.sft_steps", "2", "--ditto.sft_lr", "1e-3",
    "--ditto.iterations", "1", "--ditto.resample_every", "2", "--actor.adam.lr", "3e-4",
    "--train.batch_size", "4", "--train.micro_batch_size", "4", "--ds.lora.rank", "8", "--ds.lora.alpha", "16",
    "--rollout.engine", "torch",
]  # fmt: skip
PHASES = {  # phase: the backend methods whose time it sums (the outermost call only)
    "SFT": ("sft_step",),
    "sampling": ("generate", "generate_users"),
    "scoring": ("reference_logps", "policy_logps"),
    "DITTO steps": ("train_step",),
}


def child(argv: list[str], times_file: str) -> None:
    """In the timed process: wrap the backend classes' methods with timers, then run `openrlhf-ditto ARGV`."""
    import openrlhf_ditto.backends.local as local

    classes = [local.LocalBackend]
    try:  # the last release's many-users backend
        from openrlhf_ditto.backends.multi_lora import MultiLoraBackend

        classes.append(MultiLoraBackend)
    except ImportError:
        pass
    times, depth = dict.fromkeys(PHASES, 0.0), [0]

    def timed(phase, method):
        def wrapper(*args, **kwargs):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    times[phase] += time.perf_counter() - start

        return wrapper

    for cls in classes:
        for phase, names in PHASES.items():
            for name in names:
                if name in vars(cls):
                    setattr(cls, name, timed(phase, vars(cls)[name]))
    from openrlhf_ditto.cli.main import main

    try:
        main(argv)
    finally:
        Path(times_file).write_text(json.dumps(times))


def timed_run(code: Path, argv: list[str], log: Path) -> dict:
    """`openrlhf-ditto ARGV` with the package at `code`, in a process of its own: wall seconds, peak memory, phases."""
    times = log.with_suffix(".times.json")
    env = dict(os.environ, PYTHONPATH=str(code))
    start = time.perf_counter()
    with open(log, "w") as f:
        cmd = [sys.executable, __file__, "--child", str(times), "--", *argv]
        proc = subprocess.Popen(cmd, stdout=f, stderr=f, env=env, cwd=code)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"openrlhf-ditto {' '.join(argv)} failed; see {log}")
    phases = json.loads(times.read_text())
    return {"wall": seconds, "memory": usage.ru_maxrss / 2**20, **phases}  # ru_maxrss: KB on Linux


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # in the timed process: --child TIMES_FILE -- ARGV
        child(sys.argv[4:], sys.argv[2])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--data", required=True, help="the CMCC dev folder (author_XX/demos.jsonl)")
    parser.add_argument("--baseline", default=None, help="a checkout of the last release, for round-robin")
    parser.add_argument("--model", default=None, help="base model folder (default: SmolLM2-135M-Instruct, offline)")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 4, 11], help="the N to measure (default: 1 4 11)")
    parser.add_argument("--out", default=None, help="runs and logs (default: a temporary folder, deleted)")
    args = parser.parse_args()
    from openrlhf_ditto.models import smollm2_path

    code = Path(__file__).resolve().parents[1]
    authors = sorted(p.name for p in Path(args.data).iterdir() if (p / "demos.jsonl").exists())
    if max(args.users) > len(authors):
        raise SystemExit(f"{args.data} holds {len(authors)} authors; --users asks for {max(args.users)}")
    flags = ["--actor.model_name_or_path", args.model or str(smollm2_path()), *FLAGS]

    print(f"openrlhf-ditto train {' '.join(flags)}")
    header = "| users | way | wall (s) | SFT | sampling | scoring | DITTO steps | other | peak memory (GB) |"
    table = [header, "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory(prefix="many_users-") as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        separate: dict[str, dict] = {}
        for n in args.users:
            users = out / f"users_{n}"
            users.mkdir(exist_ok=True)
            for author in authors[:n]:  # a link, not a copy: the data stays in its folder
                if not (users / f"{author}.jsonl").exists():
                    (users / f"{author}.jsonl").symlink_to((Path(args.data) / author / "demos.jsonl").resolve())
            row = {}
            ways = [("batched", code)] + ([("round-robin", Path(args.baseline).resolve())] if args.baseline else [])
            for way, root in ways:
                print(f"N = {n}: {way} job", flush=True)
                job = ["train", *flags, "--data.dataset", str(users), "--data.users", "--ckpt.output_dir",
                       str(out / f"{way}_{n}"), "--overwrite"]  # fmt: skip
                row[way] = timed_run(root, job, out / f"{way}_{n}.log")
            for author in authors[:n]:
                if author not in separate:
                    print(f"N = {n}: separate run of {author}", flush=True)
                    run = ["train", *flags, "--data.dataset", str(users / f"{author}.jsonl"), "--ckpt.output_dir",
                           str(out / f"run_{author}"), "--overwrite"]  # fmt: skip
                    separate[author] = timed_run(code, run, out / f"run_{author}.log")
            runs = [separate[a] for a in authors[:n]]
            row["separate"] = {k: sum(r[k] for r in runs) for k in runs[0]} | {
                "memory": max(r["memory"] for r in runs)
            }
            for way, r in row.items():
                other = r["wall"] - sum(r[p] for p in PHASES)
                cells = " | ".join(f"{r[p]:.1f}" for p in PHASES)
                table.append(f"| {n} | {way} | {r['wall']:.0f} | {cells} | {other:.0f} | {r['memory']:.2f} |")
            print("\n".join(["", *table]), flush=True)  # the table so far, after each N

    print("\nseparate: the sum of N single-user runs (memory: the largest one)")


if __name__ == "__main__":
    main()
