"""Does DITTO beat SFT on real authors' writing? The paper's Table 1 in our setting, with its ablations.

DATA_DIR holds one folder per author (author_XX/demos.jsonl, author_XX/heldout.jsonl: {"prompt", "response"}),
e.g. the DITTO paper's CMCC authors. For each author, exactly as a user would:
  1. `openrlhf-ditto train --preset small` on the author's demos (SmolLM2-135M-Instruct, plus any --flags), then
  2. `openrlhf-ditto eval --judge style` on the author's held-out answers: zero-shot, few-shot, SFT (pi_0) and
     DITTO, every pair both ways, 3 samples per prompt (the paper's protocol, with the offline style judge).
Printed: DITTO's win rate against each baseline per author, the mean over authors with a 95% interval over authors
(t), beside the paper's numbers (Mistral-7B, GPT-4 judge).

--ablations adds, per author (each a `train` run from the same pi_0 unless said, judged in the same eval):
  offline      one round of sampling at the start, the same number of steps (the paper: 70.1 -> 57.3)
  updated_ref  the reference follows the policy: each iteration a new run from the last one's final model,
               --ditto.sft_steps 0 (replay and inter-model pairs of earlier iterations are lost with it)
               (the paper: 70.1 -> 45.8)
  tight        its own SFT to the paper's loss 1.0, then DITTO (sft_tight, ditto_tight) against the preset's
               warm start
--variant NAME="FLAGS" (repeatable) adds a DITTO run from the same pi_0 with other flags (the recipe search).
--per_iteration judges every iteration's policy too (rebuilt from the run's checkpoints) and sets the held-out
signal (--ditto.val_demos, val/ in metrics.jsonl) beside the judge's win rate over SFT.

--tokens N cuts every demo and held-out answer at its last sentence end before N tokens (not mid-sentence: DITTO
would learn that answers stop there) and sets the response budget to N + 1 (the end of turn): a quick look on a CPU
(the CMCC answers are ~700 tokens). The report gives the share of samples cut at the budget.
The style judge runs twice on the same generations: its profile of the author is the run's demos (`--judge.profile
demos`, what SFT trained on) or the held-out answers alone (`--judge.profile heldout`); the report sets them side by
side, with how often the two pick the same output. Runs, generations and judgments are kept
in --out per author: a killed benchmark continues where it stopped with the same command, and a new variant costs
only its own run.

    python benchmarks/heldout_authors.py DATA_DIR                                   # all authors, whole answers
    python benchmarks/heldout_authors.py DATA_DIR --authors author_10 author_11 --tokens 128 --ablations
"""

import argparse
import json
import math
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from transformers import AutoTokenizer

from openrlhf_ditto.cli.main import main as cli
from openrlhf_ditto.models import smollm2_path
from openrlhf_ditto.presets import SMALL_MODEL

# The paper's CMCC numbers (Mistral-7B, GPT-4 judge): each method's win rate (Table 1), and the ablations.
PAPER = {"zero-shot": 27.3, "few-shot": 46.9, "sft": 56.8, "ditto": 71.7}
BASELINES = ("zero-shot", "few-shot", "sft")


def flag(argv: list[str], name: str, default: str) -> str:
    """The value argparse takes for `name` (the last one given)."""
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1] if name in argv else default


SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def cut_at_sentence(text: str, tokenizer, tokens: int) -> tuple[str, bool]:
    """`text` cut at its last sentence end within its first `tokens` tokens, so that no demo teaches DITTO that an
    answer stops mid-sentence; and whether it had none there (then it is cut at `tokens`, mid-sentence)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= tokens:
        return text, False
    head = tokenizer.decode(ids[:tokens])
    ends = [m.end() for m in SENTENCE_END.finditer(head)]
    return (head[: ends[-1]], False) if ends else (head, True)


def cut_file(source: Path, target: Path, tokenizer, tokens: int | None) -> tuple[Path, int, int]:
    """The records of `source` with each response cut by `cut_at_sentence` (a copy outside the repo), and how many
    of how many had no sentence end within `tokens` tokens."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    if tokens is None:
        return source, 0, len(rows)
    mid_sentence = 0
    for r in rows:
        r["response"], cut = cut_at_sentence(r["response"], tokenizer, tokens)
        mid_sentence += cut
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if target.exists() and target.read_text() != text:
        raise SystemExit(f"{target} holds answers cut another way (an older version): give a new --out")
    target.write_text(text)
    return target, mid_sentence, len(rows)


def train(run: Path, argv: list[str]) -> None:
    """`openrlhf-ditto train` as a user runs it; a killed run continues (--resume), a finished one is kept."""
    if (run / "final" / "config.json").exists():
        return
    resume = ["--resume"] if (run / "run_config.json").exists() else []
    print(f"\n=== train {run}: {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    cli(["train", *argv, "--ckpt.output_dir", str(run), *resume])
    (run / "train_seconds.txt").write_text(f"{time.perf_counter() - started:.0f}\n")


def iteration_model(run: Path, t: int) -> Path:
    """Iteration t's policy as a Hugging Face folder, rebuilt from the run's checkpoint as --resume loads it."""
    from openrlhf_ditto.backends.local import LocalBackend

    folder = run / "iterations" / f"iter_{t}"
    if not (folder / "config.json").exists():
        config = json.loads((run / "run_config.json").read_text(), object_hook=lambda d: SimpleNamespace(**d))
        backend = LocalBackend(run / "reference", config)
        backend.add_run("", run / "reference")
        backend.freeze_reference("", None)
        backend.load_checkpoint("", run / "checkpoints" / f"iter_{t:05d}" / "backend")
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        backend.save_model("", tmp)
        tmp.rename(folder)
    return folder


def interval(values: list[float]) -> str:
    """Mean and 95% t-interval over authors, in percent."""
    v = np.array([x for x in values if x is not None]) * 100
    if len(v) == 0:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.1f}"
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26, 11: 2.23}.get(len(v), 2.0)
    half = t * v.std(ddof=1) / math.sqrt(len(v))
    return f"{v.mean():.1f} [{v.mean() - half:.0f}, {v.mean() + half:.0f}]"


def ranks(values: list[float]) -> np.ndarray:
    v = np.asarray(values)
    return np.array([(v < x).sum() + ((v == x).sum() - 1) / 2 for x in v])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="folder of author_XX/{demos,heldout}.jsonl")
    parser.add_argument("--authors", nargs="+", default=None, help="author folders to run (default: all)")
    parser.add_argument(
        "--tokens", type=int, default=None, help="cut answers at a sentence end before N tokens, budget N + 1"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/heldout_authors"), help="runs and evals (kept)")
    parser.add_argument("--flags", default="", help="extra `train` flags for every run, e.g. '--actor.adam.lr 1e-4'")
    parser.add_argument("--samples", type=int, default=3, help="eval samples per prompt and condition (paper: 3)")
    parser.add_argument("--ablations", action="store_true", help="offline, updated_ref, tight (see above)")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"', help="another DITTO run")
    parser.add_argument("--per_iteration", action="store_true", help="judge every iteration; the held-out signal")
    parser.add_argument("--keep_models", action="store_true", help="keep every model's weights after its eval")
    args = parser.parse_args()

    started = time.perf_counter()
    model = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    authors = args.authors or sorted(p.name for p in args.data_dir.iterdir() if (p / "demos.jsonl").exists())
    # room for the few-shot prompt (every demo before the question) in SmolLM2's 8192-token context; a demo cut to
    # N tokens still ends with its end-of-turn token, so N + 1 tokens
    budget = ["--data.max_len", "8192", "--rollout.max_new_tokens", str(args.tokens + 1 if args.tokens else 1024)]
    recipe = ["--preset", "small", *budget, *shlex.split(args.flags)]
    if args.per_iteration:
        recipe += ["--ditto.val_demos", flag(recipe, "--ditto.val_demos", "1"), "--ckpt.max_num", "100"]
    recipe_flags = [*SMALL_MODEL, *recipe]  # what the runs get: the preset's flags, then ours
    iterations = int(flag(recipe_flags, "--ditto.iterations", "4"))
    steps = iterations * int(flag(recipe_flags, "--ditto.resample_every", "10"))
    variants = dict(v.split("=", 1) for v in args.variant)

    results = {}
    for author in authors:
        out = args.out / author
        out.mkdir(parents=True, exist_ok=True)
        demos, *counts = cut_file(args.data_dir / author / "demos.jsonl", out / "demos.jsonl", tokenizer, args.tokens)
        held_out, *more = cut_file(
            args.data_dir / author / "heldout.jsonl", out / "heldout.jsonl", tokenizer, args.tokens
        )
        mid_sentence = [a + b for a, b in zip(counts, more)]
        base = ["--actor.model_name_or_path", model, "--data.dataset", str(demos), *recipe]
        main_run = out / "ditto"
        train(main_run, base)
        from_pi_0 = [*base, "--actor.model_name_or_path", str(main_run / "reference"), "--ditto.sft_steps", "0"]
        conditions = ["zero-shot", "few-shot", "sft", "ditto"]
        for name, flags in variants.items():
            train(out / name, [*from_pi_0, *shlex.split(flags)])
            conditions.append(f"{name}={out / name / 'final'}")
        if args.ablations:
            train(out / "offline", [*from_pi_0, "--ditto.iterations", "1", "--ditto.resample_every", str(steps)])
            previous = main_run / "reference"
            warmup = flag(recipe_flags, "--actor.lr_warmup_ratio", "0.25")
            for t in range(1, iterations + 1):  # the reference is the policy of the iteration before
                stage = out / "updated_ref" / f"stage_{t}"
                once = ["--actor.model_name_or_path", str(previous), "--ditto.iterations", "1"]
                train(stage, [*from_pi_0, *once, "--actor.lr_warmup_ratio", warmup if t == 1 else "0"])
                previous = stage / "final"
            train(out / "tight", [*base, "--ditto.sft_stop_loss", "1.0"])
            conditions += [f"offline={out / 'offline' / 'final'}", f"updated_ref={previous}"]
            conditions += [f"sft_tight={out / 'tight' / 'reference'}", f"ditto_tight={out / 'tight' / 'final'}"]
        if args.per_iteration:
            conditions += [f"iter_{t}={iteration_model(main_run, t)}" for t in range(1, iterations)]  # the last: ditto
        judged = out / "eval"
        for profile in ("heldout", "demos"):  # one folder, one set of generations; results.json: the last one's
            cli(["eval", "--run", str(main_run), "--data.dataset", str(held_out), "--judge", "style",
                 "--judge.profile", profile, "--rollout.n_samples_per_prompt", str(args.samples),
                 "--output_dir", str(judged), "--conditions", *conditions])  # fmt: skip
            if profile == "heldout":
                heldout_profile = json.loads((judged / "results.json").read_text())
        results[author] = json.loads((judged / "results.json").read_text())
        results[author] |= {"heldout_profile": heldout_profile, "mid_sentence": mid_sentence}
        results[author]["agreement"] = agreement(judged / "judgments.jsonl", results[author]["judge"])
        results[author]["val"] = {  # the held-out signal of every DITTO run with a final/ of its own
            name: [
                r
                for r in map(json.loads, (out / name / "metrics.jsonl").read_text().splitlines())
                if r["prefix"] == "val"
            ]
            for name in ["ditto", *variants]
        }
        if not args.keep_models:  # ~0.5 GB each; the eval keeps their generations, the runs keep pi_0 and adapters
            for weights in out.glob("**/model.safetensors"):
                if weights.parent != main_run / "reference":
                    weights.unlink()
        print(f"=== {author} done, {time.perf_counter() - started:.0f} s since the start", flush=True)

    report(results, args, recipe_flags, time.perf_counter() - started)


def agreement(judgments: Path, demos_judge: str) -> tuple[int, int]:
    """Of the comparisons both profiles judged (the same two outputs, the same order), how many they decided the
    same way, and how many there were."""
    by_judge: dict[bool, dict] = {True: {}, False: {}}
    for row in map(json.loads, judgments.read_text().splitlines()):
        if row["status"] == "ok":
            by_judge[row["judge"] == demos_judge][row["prompt"], row["sample"], row["A"], row["B"]] = row["answer"]
    both = by_judge[True].keys() & by_judge[False].keys()
    return sum(by_judge[True][k] == by_judge[False][k] for k in both), len(both)


def report(results: dict, args, recipe: list[str], seconds: float) -> None:
    authors = list(results)
    print(f"\n## DITTO on {len(authors)} real authors: SmolLM2-135M-Instruct, style judge\n")
    print(f"Recipe: {shlex.join(recipe)}")
    print(f"Answers cut to {args.tokens or 'their whole length (budget 1024)'} tokens; {args.samples} samples per")
    print(f"prompt and condition; every pair judged both ways. Wall time {seconds / 60:.0f} min.\n")
    print("DITTO's win rate against each baseline (the paper's Table 1 shape), per author:\n")
    others = [c for c in results[authors[0]]["conditions"] if c not in ("ditto", *BASELINES)]
    cols = [*BASELINES, *[c for c in others if not c.startswith("iter_")]]
    print("| author | " + " | ".join(f"vs {c}" for c in cols) + " | DITTO's mean win rate |")
    print("| --- " * (len(cols) + 2) + "|")
    for a in authors:
        m = results[a]["matrix"]["ditto"]
        cells = [f"{100 * m[c][0]:.0f}" if m.get(c) else "n/a" for c in cols]
        print(f"| {a} | " + " | ".join(cells) + f" | {100 * results[a]['mean']['ditto']:.0f} |")
    vs = {c: [results[a]["matrix"]["ditto"][c][0] if results[a]["matrix"]["ditto"].get(c) else None for a in authors]
          for c in cols}  # fmt: skip
    means = [results[a]["mean"]["ditto"] for a in authors]
    print("| **mean [95% over authors]** | " + " | ".join(interval(vs[c]) for c in cols) + f" | {interval(means)} |")
    print("\nEach method's mean win rate over the others (one number per method, as the paper's Table 1 gives):\n")
    names = list(results[authors[0]]["conditions"])
    print("| method | ours, mean over authors [95%] | the paper (CMCC, Mistral-7B, GPT-4 judge) |")
    print("| --- | ---: | ---: |")
    for c in names:
        print(f"| {c} | {interval([results[a]['mean'][c] for a in authors])} | {PAPER.get(c, '')} |")
    beats = sum(results[a]["matrix"]["ditto"]["sft"][0] > 0.5 for a in authors)
    print(f"\nDITTO beats SFT (win rate > 50%) for {beats} of {len(authors)} authors; the paper: DITTO's mean win")
    print("rate on CMCC 71.7, and it beats SFT by 11.7 points on average.")
    print("\nThe style judge's profile: the run's demos (what SFT trained on) vs the held-out answers alone, DITTO's")
    print("win rate against each baseline (mean over authors [95%]):\n")
    print("| profile | " + " | ".join(f"vs {c}" for c in cols) + " |\n| --- " * 1 + "|" + " ---: |" * len(cols))
    for label, key in (("demos (today's)", None), ("held-out answers", "heldout_profile")):
        m = [(results[a][key] if key else results[a])["matrix"]["ditto"] for a in authors]
        print(f"| {label} | " + " | ".join(interval([x[c][0] if x.get(c) else None for x in m]) for c in cols) + " |")
    same, total = (sum(results[a]["agreement"][i] for a in authors) for i in (0, 1))
    print(
        f"\nThe two profiles pick the same output in {same} of {total} judgments ({100 * same / max(total, 1):.0f}%)."
    )
    flips = [a for a in authors if (results[a]["matrix"]["ditto"]["sft"][0] - 0.5)
             * (results[a]["heldout_profile"]["matrix"]["ditto"]["sft"][0] - 0.5) < 0]  # fmt: skip
    print(
        f"DITTO vs SFT in opposite directions under the two profiles: {len(flips)} of {len(authors)} authors "
        f"({', '.join(flips) or 'none'})."
    )
    if args.tokens:
        mid, answers = (sum(results[a]["mid_sentence"][i] for a in authors) for i in (0, 1))
        print(
            f"\nDemos and held-out answers cut at their last sentence end before {args.tokens} tokens; {mid} of "
            f"{answers} had none there and are cut mid-sentence."
        )
    print("Samples cut at the budget (--rollout.max_new_tokens), mean over authors: " + ", ".join(
        f"{c} {100 * np.mean([results[a]['truncated'][c] for a in authors]):.0f}%" for c in names) + ".")  # fmt: skip
    if args.ablations:
        print(
            "\nAblations (DITTO's win rate over each; the paper: DITTO 70.1 vs offline 57.3, updated reference 45.8):"
        )
        for c in ("offline", "updated_ref", "ditto_tight"):
            print(f"  ditto vs {c}: {interval(vs[c])}")
        print(f"  ditto_tight vs sft_tight (warm start tight, SFT to 1.0): "
              f"{interval([results[a]['matrix']['ditto_tight']['sft_tight'][0] for a in authors])}")  # fmt: skip
    if args.per_iteration:
        signal_vs_judge(results)


def signal_vs_judge(results: dict) -> None:
    """Per author and iteration: the held-out signal (val/) beside the judge's win rate of that policy over SFT."""
    print("\nJudge-free signal vs the style judge, per author and iteration (pi_0 = sft: 50% by definition):\n")
    print("| author | iteration | val margin | val log-lik/token | judge: win rate over sft | over zero-shot |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    within = {"margin": [], "demo_logp_per_token": []}
    picked, best, last, across = [], [], [], []
    for a, r in results.items():
        val = {int(v["iteration"]): v for v in r["val"]["ditto"]}
        names = {0: "sft", **{t: f"iter_{t}" if f"iter_{t}" in r["matrix"] else "ditto" for t in val if t}}
        judge = {t: 0.5 if n == "sft" else r["matrix"][n]["sft"][0] for t, n in names.items()}
        for t in sorted(names):
            zero = r["matrix"][names[t]]["zero-shot"][0]
            print(f"| {a} | {t} | {val[t]['margin']:+.3f} | {val[t]['demo_logp_per_token']:.3f} | "
                  f"{100 * judge[t]:.0f}% | {100 * zero:.0f}% |")  # fmt: skip
        ts = sorted(names)
        for key in within:
            x, y = ranks([val[t][key] for t in ts]), ranks([judge[t] for t in ts])
            if x.std() and y.std():
                within[key].append(np.corrcoef(x, y)[0, 1])
        picked.append(judge[max(ts, key=lambda t: (val[t]["margin"], -t))])
        best.append(max(judge.values()))
        last.append(judge[max(ts)])
        runs = {n: rows[-1] for n, rows in r["val"].items() if rows and n in r["matrix"]}
        if len(runs) > 2:  # across runs of other settings: does the signal rank them as the judge does?
            x, y = ranks([v["margin"] for v in runs.values()]), ranks([r["matrix"][n]["sft"][0] for n in runs])
            across.append(np.corrcoef(x, y)[0, 1] if x.std() and y.std() else 0.0)
    if across:
        print(f"Across the DITTO runs of each author (main and variants): Spearman rho of the final val margin with "
              f"the judge's win rate over SFT: mean {np.mean(across):+.2f} over {len(across)} authors")  # fmt: skip
    for key, rhos in within.items():
        print(f"Spearman rho of val {key} with the judge's win rate over SFT, within each author's iterations: "
              f"mean {np.mean(rhos):+.2f} over {len(rhos)} authors ({sum(r > 0 for r in rhos)} positive)")  # fmt: skip
    print(f"Win rate over SFT of the iteration with the best margin: {interval(picked)}; of the last "
          f"iteration: {interval(last)}; of the best iteration (judge's hindsight): {interval(best)}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
