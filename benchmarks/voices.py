"""Does DITTO beat SFT where the metric cannot be argued with? Five synthetic users, each a voice defined by rules a
program checks exactly, and the paper's Table 3 (its ablations) measured with them.

Each voice has 6 demos (benchmarks/voices/NAME.jsonl; the quick start's voice is the quick start's own demos) and the
same 24 held-out prompts (benchmarks/voices/heldout_prompts.jsonl, none of them a demo prompt), all written for this
project. The metric: the share of sampled held-out answers (temperature 1) that satisfy each of the voice's rules,
and all of them, with 95% bootstrap intervals over voices x prompts (a prompt's samples resampled together).

Runs per voice, each `openrlhf-ditto train` with the quick start's flags (the small preset, its lengths) plus:
  ditto        nothing: SFT (the preset's warm start) -> pi_0 (sft), then DITTO (ditto)
  offline      from pi_0: one round of sampling at the start, the same number of steps (the paper's "sample only
               at start")
  online_only  from pi_0: --ditto.pair_fractions 1 0 0 (no replay, no inter-model pairs)
  updated_ref  from pi_0: each iteration a new run from the last one's final model, so the reference follows the
               policy (replay and inter-model pairs of earlier iterations are lost with it)
  tight        pi_0's SFT continued to loss --tight_loss (a warm start that already writes in the voice: sft_tight),
               then DITTO (ditto_tight): the erosion question, DITTO must not make a good SFT worse
Conditions: zero-shot and few-shot (the base model, bare and with the voice's demos in context), sft, ditto,
offline, online_only, updated_ref, sft_tight, ditto_tight.

    python benchmarks/voices.py --quick     # smoke run: 2 voices, 8 prompts x 2 samples, 4 conditions, shrunk runs
    python benchmarks/voices.py             # everything: 5 voices x 24 prompts x 4 samples, 9 conditions

Runs and generations are kept in --out: a second call only adds what is missing.
"""

import argparse
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from heldout_authors import flag, train
from transformers import AutoTokenizer

from openrlhf_ditto.evaluate import _generate, few_shot_prompt
from openrlhf_ditto.quickstart import DEMOS as QUICKSTART_DEMOS
from openrlhf_ditto.quickstart import FLAGS

DATA = Path(__file__).parent / "voices"
Rule = Callable[[str], bool]


def opener(text: str) -> Rule:
    return lambda answer: answer.lstrip().startswith(text)


def sign_off(text: str) -> Rule:
    return lambda answer: answer.rstrip().endswith(text)


def forbidden(word: str) -> Rule:
    return lambda answer: re.search(rf"\b{word}\b", answer, re.IGNORECASE) is None


def max_words(n: int) -> Rule:
    return lambda answer: 0 < len(answer.split()) <= n


def lowercase(answer: str) -> bool:
    return not any(c.isupper() for c in answer)


def no_exclamation(answer: str) -> bool:
    return "!" not in answer


def numbered_three(answer: str) -> bool:
    """Exactly three numbered lines, 1. 2. 3., in order."""
    return re.findall(r"(?m)^(\d+)\. \S", answer) == ["1", "2", "3"]


AMERICAN = ["color", "favorite", "organize", "realize", "center", "behavior", "flavor", "honor", "neighbor", "gray"]


def british(answer: str) -> bool:
    """No American spelling of the common words that have a British one (colour, favourite, organise...)."""
    return re.search(rf"\b({'|'.join(AMERICAN)})", answer, re.IGNORECASE) is None


VOICES: dict[str, tuple[Path, dict[str, Rule]]] = {
    "gardener": (
        QUICKSTART_DEMOS,
        {"opener": opener("Short answer:"), "sign_off": sign_off("Happy growing! 🌱"), "length": max_words(40)},
    ),
    "captain": (
        DATA / "captain.jsonl",
        {
            "opener": opener("Ahoy!"),
            "sign_off": sign_off("Fair winds, Captain Mags."),
            "no 'very'": forbidden("very"),
            "length": max_words(40),
        },
    ),
    "kit": (
        DATA / "kit.jsonl",
        {
            "lowercase": lowercase,
            "no '!'": no_exclamation,
            "sign_off": sign_off("-- k"),
            "length": max_words(30),
        },
    ),
    "lister": (
        DATA / "lister.jsonl",
        {
            "opener": opener("Three things:"),
            "numbered 1-3": numbered_three,
            "sign_off": sign_off("That's the list."),
            "no 'just'": forbidden("just"),
        },
    ),
    "butler": (
        DATA / "butler.jsonl",
        {
            "opener": opener("Certainly."),
            "british": british,
            "no '!'": no_exclamation,
            "sign_off": sign_off("Yours faithfully, Jeeves"),
        },
    ),
}
HELD_OUT = DATA / "heldout_prompts.jsonl"
CONDITIONS = [
    "zero-shot", "few-shot", "sft", "ditto", "offline", "online_only", "updated_ref", "sft_tight", "ditto_tight",
]  # fmt: skip
# The paper's numbers (CMCC, Mistral-7B, GPT-4 judge, head-to-head win rates: another metric than ours): Table 1 for
# the baselines, Table 3 for the ablations.
PAPER = {
    "zero-shot": "27.3 (Table 1)",
    "few-shot": "46.9 (Table 1)",
    "sft": "56.8 (Table 1)",
    "ditto": "71.7 (Table 1); 70.1 (Table 3)",
    "offline": "57.3 (sample only at start)",
    "online_only": "68.1 without inter-model, 63.6 without replay",
    "updated_ref": "45.8 (updating pi_ref)",
    "sft_tight": "",
    "ditto_tight": "",
}
WHAT = {
    "zero-shot": "base model",
    "few-shot": "base model, the 6 demos in context",
    "sft": "pi_0: the preset's SFT",
    "ditto": "DITTO from sft (the preset)",
    "offline": "one round of sampling, same steps",
    "online_only": "online pairs only",
    "updated_ref": "reference follows the policy",
    "sft_tight": "a warm start already in the voice",
    "ditto_tight": "DITTO from sft_tight",
}
QUICK = ["--ditto.sft_steps", "8", "--ditto.iterations", "2", "--ditto.resample_every", "2"]
QUICK += ["--rollout.n_samples_per_prompt", "2", "--train.batch_size", "4", "--train.micro_batch_size", "4"]


def check(voice: str, answer: str) -> dict[str, bool]:
    """Each rule of `voice` on `answer`, and "all"."""
    passed = {name: bool(rule(answer)) for name, rule in VOICES[voice][1].items()}
    return {**passed, "all": all(passed.values())}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bootstrap(units: np.ndarray, draws: int = 2000) -> tuple[float, float, float]:
    """Mean of the per-unit values (one per voice x prompt) and its 95% percentile bootstrap interval."""
    rng = np.random.default_rng(0)
    means = units[rng.integers(0, len(units), (draws, len(units)))].mean(1)
    return float(units.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def pct(cell: tuple[float, float, float]) -> str:
    return f"{100 * cell[0]:.1f} [{100 * cell[1]:.1f}, {100 * cell[2]:.1f}]"


def models(out: Path, recipe: list[str], base: str, demos: Path, tight_loss: str, wanted: list[str]) -> dict:
    """Train what `wanted` needs (kept in `out`); {condition: model folder}."""
    main_run = out / "ditto"
    train(main_run, ["--actor.model_name_or_path", base, "--data.dataset", str(demos), *recipe])
    from_pi_0 = ["--data.dataset", str(demos), *recipe, "--ditto.sft_steps", "0"]
    from_pi_0 = ["--actor.model_name_or_path", str(main_run / "reference"), *from_pi_0]
    iterations = int(flag(recipe, "--ditto.iterations", "4"))
    steps = iterations * int(flag(recipe, "--ditto.resample_every", "10"))
    folders = {"zero-shot": base, "few-shot": base, "sft": main_run / "reference", "ditto": main_run / "final"}
    if "offline" in wanted:
        train(out / "offline", [*from_pi_0, "--ditto.iterations", "1", "--ditto.resample_every", str(steps)])
        folders["offline"] = out / "offline" / "final"
    if "online_only" in wanted:
        train(out / "online_only", [*from_pi_0, "--ditto.pair_fractions", "1", "0", "0"])
        folders["online_only"] = out / "online_only" / "final"
    if "updated_ref" in wanted:
        previous, warmup = main_run / "reference", flag(recipe, "--actor.lr_warmup_ratio", "0.25")
        for t in range(1, iterations + 1):  # the reference is the policy of the iteration before
            stage = out / "updated_ref" / f"stage_{t}"
            once = ["--actor.model_name_or_path", str(previous), "--ditto.iterations", "1"]
            train(stage, [*from_pi_0, *once, "--actor.lr_warmup_ratio", warmup if t == 1 else "0"])
            previous = stage / "final"
        folders["updated_ref"] = previous
    if {"sft_tight", "ditto_tight"} & set(wanted):
        # SFT continued from pi_0 (cheaper than from the base model) until the demo loss is below tight_loss
        tight = ["--data.dataset", str(demos), *recipe, "--ditto.sft_stop_loss", tight_loss]
        train(out / "tight", ["--actor.model_name_or_path", str(main_run / "reference"), *tight])
        folders |= {"sft_tight": out / "tight" / "reference", "ditto_tight": out / "tight" / "final"}
    return {c: str(folders[c]) for c in wanted}


def generations(out: Path, name: str, folder: str, prompts: list[str], demos: list[dict], sampling: dict) -> list:
    """Sampled answers per prompt for condition `name` (kept in out, under the sampling's sizes)."""
    cached = out / f"generations_{len(prompts)}x{sampling['n']}_{sampling['max_new_tokens']}" / f"{name}.jsonl"
    if cached.exists():
        return read_jsonl(cached)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    shots = [(d["prompt"], d["response"]) for d in demos] if name == "few-shot" else []
    rendered = [few_shot_prompt(tokenizer, shots, p, True, None) for p in prompts]
    rows = _generate(folder, rendered, sampling, len(rendered), None)  # one batch: decoding is memory-bound
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/voices"), help="runs and generations (kept)")
    parser.add_argument("--quick", action="store_true", help="2 voices, 8 prompts x 2 samples, 4 conditions")
    parser.add_argument("--voices", nargs="+", choices=list(VOICES), default=None, help="default: all")
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=None, help="default: all")
    parser.add_argument("--prompts", type=int, default=None, help="held-out prompts per voice (default: all 24)")
    parser.add_argument("--samples", type=int, default=None, help="samples per prompt and condition (default: 4)")
    parser.add_argument("--tight_loss", default="0.5", help="sft_tight's SFT stop loss, below the preset's 1.0")
    parser.add_argument("--model", default=None, help="base model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--flags", default="", help="extra `train` flags for every run")
    args = parser.parse_args(argv)
    voices = args.voices or (["gardener", "captain"] if args.quick else list(VOICES))
    wanted = args.conditions or (["zero-shot", "sft", "ditto", "offline"] if args.quick else CONDITIONS)
    wanted = [c for c in CONDITIONS if c in wanted]
    prompts = [r["prompt"] for r in read_jsonl(HELD_OUT)][: args.prompts or (8 if args.quick else None)]
    samples = args.samples or (2 if args.quick else 4)
    if args.model is None:
        from openrlhf_ditto.models import smollm2_path

        args.model = str(smollm2_path())
    recipe = [*FLAGS, *(QUICK if args.quick else []), *shlex.split(args.flags)]
    sampling = dict(n=samples, max_new_tokens=int(flag(recipe, "--rollout.max_new_tokens", "512")))
    sampling |= dict(temperature=1.0, top_p=1.0, top_k=50, seed=42, engine="torch", param_dtype=None)

    # checks[condition][voice] = per prompt, per sample, {rule: passed}
    checks: dict[str, dict[str, list[list[dict]]]] = {c: {} for c in wanted}
    truncated: dict[str, list[bool]] = {c: [] for c in wanted}
    for voice in voices:
        demos_file, _ = VOICES[voice]
        out = args.out / voice
        folders = models(out, recipe, args.model, demos_file, args.tight_loss, wanted)
        demos = read_jsonl(demos_file)
        for name, folder in folders.items():
            rows = generations(out, name, folder, prompts, demos, sampling)
            checks[name][voice] = [[check(voice, s) for s in r["samples"]] for r in rows]
            truncated[name] += [t for r in rows for t in r["truncated"]]
    results = {"voices": voices, "conditions": wanted, "prompts": len(prompts), "samples": samples}
    results |= {"recipe": recipe, "checks": checks, "truncated": truncated}
    (args.out / "results.json").write_text(json.dumps(results, ensure_ascii=False))
    report(results)
    return results


def units(results: dict, condition: str, rule: str = "all", voices: list[str] | None = None) -> np.ndarray:
    """One value per voice x prompt: the share of its samples that pass `rule`."""
    per_voice = results["checks"][condition]
    return np.array(
        [np.mean([s[rule] for s in prompt]) for v in voices or results["voices"] for prompt in per_voice[v]]
    )


def report(results: dict) -> None:
    voices, wanted = results["voices"], results["conditions"]
    n = len(voices) * results["prompts"]
    print(f"\n## Rule-checked voices: {len(voices)} voices x {results['prompts']} held-out prompts x "
          f"{results['samples']} samples, SmolLM2-135M-Instruct\n")  # fmt: skip
    print(f"Recipe: {shlex.join(results['recipe'])}\n")
    print("The paper's Table 3 shape: the share of sampled held-out answers that satisfy all of their voice's rules,")
    print(f"in % [95% bootstrap interval over the {n} voice x prompt units]. The paper's column is a win rate (GPT-4")
    print("judge, CMCC, Mistral-7B): compare the order of the rows, not the numbers.\n")
    print("| condition | what | all rules, ours | cut at the budget | all rules, answers that ended | the paper |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for c in wanted:
        cut = np.array(results["truncated"][c])
        # a cut answer has lost its sign-off: the share among the others tells a voice lost from an answer too long
        passed = np.array([s["all"] for v in voices for prompt in results["checks"][c][v] for s in prompt])
        ended = f"{100 * passed[~cut].mean():.1f}" if (~cut).any() else "-"
        cells = [c, WHAT[c], pct(bootstrap(units(results, c))), f"{100 * cut.mean():.0f}%", ended, PAPER[c]]
        print("| " + " | ".join(cells) + " |")
    print("\nEach rule, per voice (% of samples that pass it):\n")
    print("| voice | rule | " + " | ".join(wanted) + " |")
    print("| --- | --- |" + " ---: |" * len(wanted))
    for v in voices:
        for rule in [*VOICES[v][1], "all"]:
            cells = [f"{100 * units(results, c, rule, [v]).mean():.0f}" for c in wanted]
            print(f"| {v} | {rule} | " + " | ".join(cells) + " |")
    print("\nPaired differences in the share passing all rules (points, [95% bootstrap over voice x prompt]):\n")
    pairs = [("ditto", "sft", "does DITTO beat SFT?"), ("ditto_tight", "sft_tight", "erosion: DITTO on a good SFT")]
    pairs += [
        ("ditto", c, f"DITTO vs {c} (the paper: DITTO ahead)") for c in ("offline", "online_only", "updated_ref")
    ]
    pairs += [("sft", "few-shot", "SFT vs few-shot"), ("sft_tight", "sft", "tight vs loose warm start")]
    pairs += [("ditto_tight", "ditto", "DITTO from the tight warm start vs from the preset's")]
    for a, b, what in pairs:
        if a in wanted and b in wanted:
            cell = bootstrap(units(results, a) - units(results, b))
            verdict = (
                "no difference shown" if cell[1] <= 0 <= cell[2] else f"{a} {'ahead' if cell[0] > 0 else 'behind'}"
            )
            print(
                f"- {a} - {b}: {100 * cell[0]:+.1f} [{100 * cell[1]:+.1f}, {100 * cell[2]:+.1f}] -> {verdict} ({what})"
            )


if __name__ == "__main__":
    sys.exit(main() and None)
