"""What `openrlhf-ditto eval` costs on CPU.

1. Judgments/s of the two judges on the same model, SmolLM2-135M-Instruct (fp32): the local judge (one forward
   per judgment, the probabilities of "A" and "B") in batches of 1 and 8, beside the openai judge asking a real
   `transformers serve` of the same folder over loopback HTTP (it generates its JSON answer) at concurrency 1
   and 4. The judgments: the quick start's held-out answers as the author's writing, its demos and held-out
   answers as the two outputs.
2. A full eval of the quick start (zero-shot, few-shot, sft, ditto; 8 held-out prompts x 3 samples; local judge):
   generation and judging time, the number of judgments, and the prompt tokens an API judge would be sent.

    python benchmarks/eval_cost.py                      # ~10 minutes on 2 CPU cores (estimate), with the quick start
    python benchmarks/eval_cost.py --run ditto_quickstart   # reuse a finished quick start
    python benchmarks/eval_cost.py --quick              # smoke run: few judgments, a shrunk quick start
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from openrlhf_ditto.cli.main import main as cli
from openrlhf_ditto.judges import judge_local, judge_openai, messages
from openrlhf_ditto.models import smollm2_path
from openrlhf_ditto.quickstart import DEMOS, train_argv

HELD_OUT = Path(__file__).parents[1] / "openrlhf_ditto" / "data" / "quickstart_heldout.jsonl"
QUICK = ["--ditto.sft_steps", "4", "--ditto.iterations", "1", "--ditto.resample_every", "2"]
QUICK += ["--rollout.n_samples_per_prompt", "2", "--rollout.max_new_tokens", "24", "--train.batch_size", "4"]


def judgments(n: int) -> list[tuple[str, str, str]]:
    held_out = [json.loads(line)["response"] for line in HELD_OUT.read_text().splitlines()]
    outputs = held_out + [json.loads(line)["response"] for line in DEMOS.read_text().splitlines()]
    n_out = len(outputs)
    return [(held_out[i % len(held_out)], outputs[i % n_out], outputs[(3 * i + 1) % n_out]) for i in range(n)]


def per_second(judge, items: list, *args) -> float:
    """Judgments per second of `judge(items, on_result, *args)`."""
    done = []
    started = time.perf_counter()
    judge(items, lambda i, result: done.append(result), *args)
    assert len(done) == len(items)
    return len(items) / (time.perf_counter() - started)


def serve(model: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "transformers"), "serve", str(model), "--host", "127.0.0.1", "--port",
         str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("transformers serve exited") from None
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a finished quick start run (default: train one into --out)")
    parser.add_argument("--out", default="runs/eval_cost", help="the quick start run and its eval")
    parser.add_argument("--quick", action="store_true", help="smoke run: few judgments, a shrunk quick start")
    parser.add_argument("--judgments", type=int, default=64, help="local judge: judgments timed (default: 64)")
    parser.add_argument("--served", type=int, default=16, help="openai judge: judgments timed (default: 16)")
    args = parser.parse_args()
    if args.quick:
        args.judgments, args.served = 16, 4
    model = smollm2_path()

    rows = []
    local = judgments(args.judgments)
    judge_local(local[:2], lambda i, r: None, model, 2)  # load once, so the first timing is not the cold start
    for batch in (1, 8):
        rows.append((f"local judge, batch {batch}", per_second(judge_local, local, model, batch)))
    proc, url = serve(model)
    try:
        for concurrency in (1, 4):
            rate = per_second(
                lambda *a: asyncio.run(judge_openai(*a)), judgments(args.served), url, str(model), None, concurrency
            )
            rows.append((f"openai judge -> transformers serve, concurrency {concurrency}", rate))
    finally:
        proc.terminate()
        proc.wait()

    out = Path(args.out)
    run = Path(args.run) if args.run else out / "quickstart"
    if not (run / "final").is_dir():
        print(f"\n=== training the quick start into {run}", flush=True)
        resume = (run / "run_config.json").exists()
        cli(["train", *train_argv(str(run), resume=resume), *(QUICK if args.quick else [])])
    held_out, samples = HELD_OUT, 3
    if args.quick:
        held_out, samples = out / "held_out_quick.jsonl", 1
        held_out.write_text("".join(HELD_OUT.read_text().splitlines(keepends=True)[:2]))
    shutil.rmtree(out / "eval", ignore_errors=True)  # the full cost: nothing cached
    cli(["eval", "--run", str(run), "--data.dataset", str(held_out), "--judge", "local", "--judge.model", str(model),
         "--rollout.n_samples_per_prompt", str(samples), "--output_dir", str(out / "eval")])  # fmt: skip
    results = json.loads((out / "eval" / "results.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model)
    folder = out / "eval" / "generations"
    gens = {
        c: [json.loads(x) for x in (folder / f"{c}.jsonl").read_text().splitlines()] for c in results["conditions"]
    }
    tokens = []
    for line in (out / "eval" / "judgments.jsonl").read_text().splitlines():
        row = json.loads(line)
        a, b = gens[row["A"]][row["prompt"]], gens[row["B"]][row["prompt"]]
        chat = messages((a["reference"], a["samples"][row["sample"]], b["samples"][row["sample"]]))
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        tokens.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))

    print("\n1. Judgments/s on this CPU (SmolLM2-135M-Instruct, fp32)\n")
    print("| judge | judgments/s |\n| --- | ---: |")
    for name, rate in rows:
        print(f"| {name} | {rate:.2f} |")
    j, s = results["judgments"], results["seconds"]
    print(f"\n2. A full eval of the quick start ({run}): {len(results['conditions'])} conditions, "
          f"{len(results['per_prompt'])} held-out prompts x {samples} samples, local judge\n")  # fmt: skip
    print("| | value |\n| --- | ---: |")
    print(f"| generation, s | {s['generation']:.0f} |")
    print(f"| judgments | {j['total']} |")
    print(f"| judging, s | {s['judging']:.0f} ({j['total'] / max(s['judging'], 1e-9):.2f} judgments/s) |")
    print(f"| judge prompt tokens (SmolLM2's tokenizer), total | {sum(tokens)} |")
    print(f"| judge prompt tokens per judgment, mean | {sum(tokens) / max(len(tokens), 1):.0f} |")
    print("\nAn API judge is sent the same judgments: total tokens x its price per input token is the cost of the")
    print('prompts; each answer is about 10 output tokens ({"answer": "A"}).')


if __name__ == "__main__":
    main()
