"""Many users in one job against one run per user: wall time and peak memory, side by side.

The users are the CMCC dev authors (their demos.jsonl; the data stays where it is: the path is an argument). For each
N (default 1, 4, 11) the first N authors are trained twice with the same flags and seed: once as one job
(`openrlhf-ditto train --data.users`, one resident base model, every author's adapters on it) and once as N separate
`openrlhf-ditto train` runs, one after the other. Each is a process of its own, timed from start to exit (model
loading and, with vLLM, the engine start included), its peak resident memory read from the kernel (wait4). Answers are
cut short (--rollout.max_new_tokens 32) so that the whole benchmark runs in minutes on a CPU.

    python benchmarks/many_users.py --data ../shared/data/cmcc_dev          # N = 1, 4, 11 on SmolLM2-135M
    python benchmarks/many_users.py --data ../shared/data/cmcc_dev --quick  # smoke run: N = 1, 2, one iteration
    python benchmarks/many_users.py --data ... --model /models/Qwen2.5-1.5B-Instruct --engine vllm  # on a GPU

The goal (issue 17): 11 users in one job in at most 3x the time of one user, with memory that grows by adapters only.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openrlhf_ditto.models import smollm2_path

FLAGS = [
    "--data.apply_chat_template", "--data.max_len", "256", "--rollout.max_new_tokens", "32",
    "--rollout.n_samples_per_prompt", "4", "--ditto.sft_steps", "5", "--ditto.sft_lr", "1e-3",
    "--ditto.sft_stop_loss", "2.0", "--ditto.iterations", "2", "--ditto.resample_every", "2",
    "--actor.adam.lr", "3e-4", "--train.batch_size", "8", "--train.micro_batch_size", "8",
    "--ds.lora.rank", "16", "--ds.lora.alpha", "32",
]  # fmt: skip
QUICK = ["--ditto.sft_steps", "2", "--ditto.iterations", "1", "--ditto.resample_every", "2"]
QUICK += ["--rollout.n_samples_per_prompt", "2", "--rollout.max_new_tokens", "16", "--train.batch_size", "4"]


def timed(argv: list[str], log: Path) -> tuple[float, float]:
    """Run `openrlhf-ditto ARGV` in a process of its own: (wall seconds, peak resident memory in GB)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "openrlhf_ditto.cli.main", *argv], stdout=f, stderr=f)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"openrlhf-ditto {' '.join(argv)} failed; see {log}")
    return seconds, usage.ru_maxrss / 2**20  # KB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the CMCC dev folder (author_XX/demos.jsonl)")
    parser.add_argument("--model", default=None, help="base model folder (default: SmolLM2-135M-Instruct, offline)")
    parser.add_argument("--users", type=int, nargs="+", default=None, help="the N to measure (default: 1 4 11)")
    parser.add_argument("--engine", choices=("torch", "vllm"), default="torch", help="--rollout.engine (torch)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 1 2, shrunk runs")
    parser.add_argument("--out", default=None, help="runs and logs (default: a temporary folder, deleted)")
    args = parser.parse_args()
    authors = sorted(p.name for p in Path(args.data).iterdir() if (p / "demos.jsonl").exists())
    sizes = args.users or ([1, 2] if args.quick else [1, 4, 11])
    if max(sizes) > len(authors):
        raise SystemExit(f"{args.data} holds {len(authors)} authors; --users asks for {max(sizes)}")
    model = args.model or str(smollm2_path())
    flags = ["--actor.model_name_or_path", model, *FLAGS, *(QUICK if args.quick else []), "--rollout.engine"]
    flags.append(args.engine)

    with tempfile.TemporaryDirectory(prefix="many_users-") as tmp:
        out = Path(args.out or tmp)
        rows = []
        for n in sizes:
            users = out / f"users_{n}"
            users.mkdir(parents=True, exist_ok=True)
            for author in authors[:n]:  # a link, not a copy: the data stays in its folder
                link = users / f"{author}.jsonl"
                if not link.exists():
                    link.symlink_to((Path(args.data) / author / "demos.jsonl").resolve())
            print(f"N = {n}: one job", flush=True)
            job = timed(
                ["train", *flags, "--data.dataset", str(users), "--data.users", "--ckpt.output_dir",
                 str(out / f"job_{n}"), "--overwrite"],
                out / f"job_{n}.log",
            )  # fmt: skip
            runs = []
            for author in authors[:n]:
                print(f"N = {n}: separate run {len(runs) + 1}/{n} ({author})", flush=True)
                runs.append(
                    timed(
                        ["train", *flags, "--data.dataset", str(users / f"{author}.jsonl"), "--ckpt.output_dir",
                         str(out / f"run_{n}_{author}"), "--overwrite"],
                        out / f"run_{n}_{author}.log",
                    )
                )  # fmt: skip
            rows.append((n, job, sum(s for s, _ in runs), max(m for _, m in runs)))

    one_user = rows[0][1][0] if rows[0][0] == 1 else None
    quick = "quick run, " if args.quick else ""
    print(f"\n{quick}openrlhf-ditto train {' '.join(flags)}")
    print("\n| users | one job (s) | separate runs (s) | job / runs | job / one user's job | peak memory: job (GB) "
          "| peak memory: one run (GB) |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, (seconds, memory), separate, run_memory in rows:
        versus_one = f"{seconds / one_user:.2f}x" if one_user else "-"
        print(
            f"| {n} | {seconds:.0f} | {separate:.0f} | {seconds / separate:.2f} | {versus_one} | {memory:.2f} | "
            f"{run_memory:.2f} |"
        )


if __name__ == "__main__":
    main()
