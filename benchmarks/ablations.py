"""The paper's Table 3 (DITTO's ablations, head-to-head win rates) in our own setting: SmolLM2-135M-Instruct trained
on the quick start's six demos with `openrlhf-ditto train` flags only, then judged by `openrlhf-ditto eval` on the
held-out prompts written in the same voice (openrlhf_ditto/data/quickstart_heldout.jsonl), with the local judge.

Runs, each the quick start's flags plus:
  ditto        nothing: full DITTO from a loose warm start (SFT stopped at loss 2.0)
  no_replay    --ditto.pair_fractions 1 0 0: online pairs only, no replay and no inter-model pairs
  offline      --ditto.iterations 1 and all the steps in it: one round of sampling, the same number of steps
  ditto_tight  --ditto.sft_stop_loss 1.0: full DITTO from a tight warm start (the paper's)
Conditions judged, every pair in both orders: zero-shot, few-shot, sft (ditto's pi_0), sft_tight (ditto_tight's
pi_0) and the four runs. Beside the judge's win rates: the share of samples that carry both of the demos' style
markers ("Short answer:", "Happy growing"), a check on the judge that needs no judge.

    python benchmarks/ablations.py                       # ~30 min on 2 CPU cores (estimate): 4 runs, 1344 judgments
    python benchmarks/ablations.py --quick               # smoke run: shrunk runs, 2 prompts x 1 sample
    python benchmarks/ablations.py --judge.model /models/Qwen2.5-7B-Instruct   # a stronger local judge

Finished runs and judgments are kept in --out: a second call only adds what is missing.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from openrlhf_ditto.cli.main import main as cli
from openrlhf_ditto.models import smollm2_path
from openrlhf_ditto.quickstart import FLAGS, MARKERS, style_score, train_argv

HELD_OUT = Path(__file__).parents[1] / "openrlhf_ditto" / "data" / "quickstart_heldout.jsonl"
QUICK = ["--ditto.sft_steps", "4", "--ditto.iterations", "2", "--ditto.resample_every", "2"]
QUICK += ["--rollout.n_samples_per_prompt", "2", "--rollout.max_new_tokens", "24", "--train.batch_size", "4"]
# the paper's numbers (CMCC, Mistral-7B, GPT-4 judge): Table 3 for the ablations, Table 1 for the baselines
PAPER = {
    "ditto": "70.1 (DITTO)",
    "offline": "57.3 (sample only at start)",
    "no_replay": "68.1 without inter-model, 63.6 without replay",
    "ditto_tight": "70.1 (DITTO: the paper's warm start)",
    "sft": "56.8 (SFT, Table 1)",
    "sft_tight": "56.8 (SFT, Table 1)",
    "few-shot": "46.9 (few-shot, Table 1)",
    "zero-shot": "27.3 (zero-shot, Table 1)",
}
WHAT = {
    "ditto": "full DITTO, loose warm start (SFT to 2.0)",
    "offline": "one round of sampling, same steps",
    "no_replay": "online pairs only",
    "ditto_tight": "full DITTO, tight warm start (SFT to 1.0)",
    "sft": "pi_0 of ditto (loose)",
    "sft_tight": "pi_0 of ditto_tight (tight)",
    "few-shot": "base model, the 6 demos in context",
    "zero-shot": "base model",
}


def last(argv: list[str], flag: str) -> int:
    """The value argparse takes for `flag` (the last one given)."""
    return int(argv[len(argv) - 1 - argv[::-1].index(flag) + 1])


def ranks(values: list[float]) -> np.ndarray:
    """Ranks for Spearman's rho, ties sharing their average rank (many conditions carry no marker at all)."""
    v = np.asarray(values)
    return np.array([(v < x).sum() + ((v == x).sum() - 1) / 2 for x in v])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ablations", help="runs, generations and judgments (kept)")
    parser.add_argument("--quick", action="store_true", help="smoke run: shrunk runs, 2 prompts x 1 sample")
    parser.add_argument("--judge.model", dest="judge", default=None, help="local judge (default: SmolLM2-135M)")
    parser.add_argument("--samples", type=int, default=3, help="samples per prompt and condition (paper: 3)")
    args = parser.parse_args()
    out, shrink = Path(args.out), QUICK if args.quick else []
    base = FLAGS + shrink
    steps = last(base, "--ditto.iterations") * last(base, "--ditto.resample_every")
    variants = {
        "ditto": [],
        "no_replay": ["--ditto.pair_fractions", "1", "0", "0"],
        "offline": ["--ditto.iterations", "1", "--ditto.resample_every", str(steps)],
        "ditto_tight": ["--ditto.sft_stop_loss", "1.0"],
    }
    for name, flags in variants.items():
        run = out / name
        if not (run / "final").is_dir():
            print(f"\n=== training {name}: quick start flags {' '.join(shrink + flags)}", flush=True)
            cli(["train", *train_argv(str(run), resume=(run / "run_config.json").exists()), *shrink, *flags])

    held_out, samples = HELD_OUT, args.samples
    if args.quick:
        held_out, samples = out / "held_out_quick.jsonl", 1
        held_out.write_text("".join(HELD_OUT.read_text().splitlines(keepends=True)[:2]))
    conditions = ["zero-shot", "few-shot", "sft", f"sft_tight={out / 'ditto_tight' / 'reference'}", "ditto"]
    conditions += [f"{name}={out / name / 'final'}" for name in variants if name != "ditto"]
    judge = args.judge or str(smollm2_path())
    cli(["eval", "--run", str(out / "ditto"), "--data.dataset", str(held_out), "--conditions", *conditions,
         "--judge", "local", "--judge.model", judge, "--rollout.n_samples_per_prompt", str(samples),
         "--output_dir", str(out / "eval")])  # fmt: skip

    results = json.loads((out / "eval" / "results.json").read_text())
    matrix, mean = results["matrix"], results["mean"]
    styled = {}
    for name in results["conditions"]:
        rows = [json.loads(line) for line in (out / "eval" / "generations" / f"{name}.jsonl").read_text().splitlines()]
        texts = [t for row in rows for t in row["samples"]]
        styled[name] = sum(style_score(t) == len(MARKERS) for t in texts) / len(texts)

    def pct(cell) -> str:
        return "n/a" if cell is None else f"{100 * cell[0]:.1f} [{100 * cell[1]:.0f}, {100 * cell[2]:.0f}]"

    order = ["ditto", "offline", "no_replay", "ditto_tight", "sft", "sft_tight", "few-shot", "zero-shot"]
    prompts = len(results["per_prompt"])
    print(f"\nTable 3 in our setting: SmolLM2-135M-Instruct, 6 demos, {prompts} held-out prompts x {samples} samples,")
    print(f"judge {results['judge']}; win rates in % [95% interval, bootstrap over prompts]")
    print("(ours: each row's mean win rate over all the others, one number per method as in the paper's tables)\n")
    print("| condition | what | ours: mean win rate | ours: DITTO beats it | paper | style markers in samples |")
    print("| --- | --- | ---: | ---: | --- | ---: |")
    for name in order:
        m = "n/a" if mean[name] is None else f"{100 * mean[name]:.1f}"
        vs = "—" if name == "ditto" else pct(matrix["ditto"][name])
        print(f"| {name} | {WHAT[name]} | {m} | {vs} | {PAPER[name]} | {100 * styled[name]:.0f}% |")
    print("\nDoes DITTO beat SFT at small scale? (the open question)")
    print(f"  loose warm start (2.0): ditto over sft {pct(matrix['ditto']['sft'])}")
    print(f"  tight warm start (1.0): ditto_tight over sft_tight {pct(matrix['ditto_tight']['sft_tight'])}")
    print("Directions the paper reports (DITTO above each ablation):")
    for name in ("offline", "no_replay"):
        cell = matrix["ditto"][name]
        if cell is None:
            seen = "n/a"
        else:
            seen = "same" if cell[1] > 0.5 else "opposite" if cell[2] < 0.5 else "not clear (the interval holds 50)"
        print(f"  ditto over {name}: {pct(cell)} -> {seen}")
    known = [n for n in order if mean[n] is not None]
    judged, marked = ranks([mean[n] for n in known]), ranks([styled[n] for n in known])
    rho = f"{np.corrcoef(judged, marked)[0, 1]:.2f}" if judged.std() and marked.std() else "n/a (no spread)"
    print(f"Judge vs style markers across the {len(known)} conditions: Spearman rho {rho} (1: the judge ranks")
    print("the conditions as the markers do; about 0: the judge does not see the demos' style)")
    j = results["judgments"]
    print(f"Judgments: {j['total']} ({j.get('unparsable', 0)} unparsable, {j.get('failed', 0)} failed); "
          f"generation {results['seconds']['generation']:.0f} s, judging {results['seconds']['judging']:.0f} s "
          f"this call; report: {out / 'eval' / 'report.md'}")  # fmt: skip


if __name__ == "__main__":
    main()
