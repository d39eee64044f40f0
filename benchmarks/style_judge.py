"""Does `eval --judge style` see an author's style? Its validation on real authors' writing (a CMCC-style folder of
author_XX/demos.jsonl and author_XX/heldout.jsonl, e.g. the DITTO paper's CMCC authors).

For each author and each of their held-out answers, the style judge (the same function `eval --judge style` calls,
both orders, a split counts half) compares the author's own answer to that prompt with:
  - other authors' answers to the same prompt (same content, another voice), and
  - SmolLM2-135M-Instruct's zero-shot answers to it (`--samples` at temperature 1, as eval samples them).
The judge's profile of the author is their demos plus one held-out answer as the reference, as in eval; the
reference is the author's answer to the next held-out prompt (never the answer being judged). Every text is cut to
the same number of SmolLM2 tokens, so length says nothing; `full` compares the authors' answers uncut.

    python benchmarks/style_judge.py DATA_DIR                     # ~3 min on 2 CPU cores (zero-shot sampling)
    python benchmarks/style_judge.py DATA_DIR --tokens 128 --samples 1

Zero-shot answers are kept in --out and reused.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from openrlhf_ditto.evaluate import _generate
from openrlhf_ditto.judges import judge_style
from openrlhf_ditto.models import smollm2_path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def win_rate(writing: list[str], reference: str, own: str, others: list[str]) -> list[float]:
    """The style judge's scores for `own` against each of `others`, both orders (1 won both, 0.5 split, 0 lost)."""
    judgments = [j for other in others for j in ((reference, own, other), (reference, other, own))]
    answers = [None] * len(judgments)
    judge_style(judgments, lambda i, r: answers.__setitem__(i, r["answer"]), writing)
    return [((answers[k] == "A") + (answers[k + 1] == "B")) / 2 for k in range(0, len(answers), 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="folder of author_XX/{demos,heldout}.jsonl")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 192], help="cut every text to N tokens")
    parser.add_argument("--samples", type=int, default=3, help="zero-shot samples per prompt (default: 3)")
    parser.add_argument("--out", type=Path, default=Path("runs/style_judge"), help="zero-shot answers (kept)")
    args = parser.parse_args()

    authors = {a.name: (read(a / "demos.jsonl"), read(a / "heldout.jsonl")) for a in sorted(args.data_dir.glob("*/"))}
    answers_to = {}  # prompt -> {author: answer}, from demos and held-out answers alike
    for name, (demos, held_out) in authors.items():
        for r in demos + held_out:
            answers_to.setdefault(r["prompt"], {})[name] = r["response"]

    model = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = sorted({r["prompt"] for _, held_out in authors.values() for r in held_out})
    longest = max(args.tokens)
    cache = args.out / f"zero_shot_{longest}_{args.samples}.json"
    if cache.exists():
        zero_shot = json.loads(cache.read_text())
    else:
        chats = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        sampling = dict(n=args.samples, max_new_tokens=longest, temperature=1.0, top_p=1.0, top_k=50, seed=42)
        sampling |= dict(engine="torch", param_dtype=None)
        zero_shot = dict(zip(prompts, (g["samples"] for g in _generate(str(model), chats, sampling, 4, None))))
        args.out.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(zero_shot))

    def cut(text: str, n: int | None) -> str:
        return text if n is None else tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n])

    print(f"{len(authors)} authors, {sum(len(h) for _, h in authors.values())} held-out answers; style judge, both")
    print("orders. Win rate of the author's own held-out answer (mean over authors [min, max]):\n")
    print("| tokens | vs another author, same prompt | comparisons | vs SmolLM2 zero-shot | comparisons |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for n in [*sorted(args.tokens), None]:
        rates = {"other": [], "zero": []}
        counts = {"other": 0, "zero": 0}
        for name, (demos, held_out) in authors.items():
            scores = {"other": [], "zero": []}
            writing = [d["response"] for d in demos]
            for k, h in enumerate(held_out):
                reference = held_out[(k + 1) % len(held_out)]["response"]
                others = [cut(t, n) for a, t in answers_to[h["prompt"]].items() if a != name]
                scores["other"] += win_rate(writing, reference, cut(h["response"], n), others)
                if n is not None:
                    zs = [cut(t, n) for t in zero_shot[h["prompt"]]]
                    scores["zero"] += win_rate(writing, reference, cut(h["response"], n), zs)
            for key, s in scores.items():
                if s:
                    rates[key].append(np.mean(s))
                    counts[key] += len(s)
        cells = []
        for key in ("other", "zero"):
            r = rates[key]
            cells += [
                f"{100 * np.mean(r):.1f}% [{100 * min(r):.0f}, {100 * max(r):.0f}]" if r else "n/a",
                str(counts[key]),
            ]
        print(f"| {n or 'full'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
