"""`openrlhf-ditto quickstart`: DITTO on SmolLM2-135M-Instruct (offline) with six bundled demos.

The demos answer everyday requests in one recognisable voice: they open with "Short answer:", use a garden
metaphor and sign off "Happy growing! 🌱". The base model never writes like that, so the change is easy to see.
Settings are scaled down from the paper's (Mistral-7B) to finish in about five minutes on two CPU cores.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlhf_ditto.presets import SMALL_MODEL

DEMOS = Path(__file__).parent / "data" / "quickstart_demos.jsonl"
HELD_OUT = [
    "How do I keep my houseplants alive?",
    "What is a quick healthy breakfast?",
    "How should I prepare for a job interview?",
]
MARKERS = ("Short answer:", "Happy growing")
# The small-model preset (`train --preset small`) plus the quick start's data lengths. SFT stops at loss 2.0: on
# these six short demos SFT to the paper's 1.0 already copies the style (~75% of sampled answers), which leaves
# DITTO nothing visible to add.
FLAGS = [*SMALL_MODEL, "--data.max_len", "320", "--rollout.max_new_tokens", "56"]


def style_score(text: str) -> int:
    return sum(marker in text for marker in MARKERS)


@torch.no_grad()
def answers(
    model_path: Path, prompts: list[str], samples: int = 32, max_new_tokens: int = 64
) -> tuple[list[str], float]:
    """Greedy answers to `prompts`, and the share of `samples` sampled answers per prompt (temperature 1, seeded)
    that carry every style marker: greedy shows one answer, the sampled share shows how the policy moved."""
    from openrlhf_ditto.backends.sampling import sample_responses
    from openrlhf_ditto.models import eos_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    eos = eos_token_ids(model_path, tokenizer)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    ids = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, return_tensors="pt")["input_ids"] for c in chats
    ]
    greedy = []
    for x in ids:
        gen = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        greedy.append(tokenizer.decode(gen[0, x.shape[1] :], skip_special_tokens=True).strip())
    torch.manual_seed(0)
    sampled = sample_responses(model, [x[0] for x in ids], samples, tokenizer.pad_token_id, eos, max_new_tokens)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for group in sampled for r in group]
    return greedy, sum(style_score(t) == len(MARKERS) for t in texts) / len(texts)


def plot(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [r for r in rows if r["prefix"] == "train"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric, title in zip(axes, ("loss", "acc", "margin"), ("DPO loss", "reward accuracy", "reward margin")):
        for kind in ("online", "replay", "inter_model"):
            points = [(r["step"], r[f"{kind}/{metric}"]) for r in train if f"{kind}/{metric}" in r]
            if points:
                ax.plot(*zip(*points), marker=".", label=kind)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def train_argv(output_dir: str, overwrite: bool = False, resume: bool = False) -> list[str]:
    """The `openrlhf-ditto train` flags of the quick start: SmolLM2 (converted on first use), the bundled demos."""
    from openrlhf_ditto.models import smollm2_path

    argv = ["--actor.model_name_or_path", str(smollm2_path()), "--data.dataset", str(DEMOS)]
    return argv + ["--ckpt.output_dir", output_dir, *FLAGS] + ["--overwrite"] * overwrite + ["--resume"] * resume


def quickstart(args: SimpleNamespace) -> Path:
    """Train with `args` (the parsed `train_argv`), then compare base, pi_0 and DITTO on held-out prompts."""
    from openrlhf_ditto.backends.local import LocalBackend
    from openrlhf_ditto.trainer import train

    final = train(args, lambda path: LocalBackend(path, args))
    base = Path(args.actor.model_name_or_path)
    out = Path(args.ckpt.output_dir)
    # pi_0 is shown too, so the report separates what DITTO adds from what the SFT warm start already did
    models = {"base model": base, "SFT warm start (pi_0)": out / "reference", "DITTO": final}
    said, styled = {}, {}
    for name, path in models.items():
        said[name], styled[name] = answers(path, HELD_OUT)
    scores = ", ".join(f"{name} {sum(map(style_score, texts))}" for name, texts in said.items())
    rates = ", ".join(f"{name} {rate:.0%}" for name, rate in styled.items())
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    kinds = {
        k: {m: last.get(f"{k}/{m}") for m in ("count", "acc", "margin")} for k in ("online", "replay", "inter_model")
    }
    plot(out / "metrics.jsonl", out / "report.png")

    lines = ["# DITTO quick start", "", f"DITTO model: `{final}`.", ""]
    lines += [f"Style markers {MARKERS} in the greedy held-out answers (of {len(MARKERS) * len(HELD_OUT)}): {scores}."]
    lines += [f"Sampled held-out answers (temperature 1) that carry every marker: {rates}.", ""]
    lines += ["| prompt | " + " | ".join(models) + " |", "| --- " * (len(models) + 1) + "|"]
    for i, prompt in enumerate(HELD_OUT):
        lines.append(f"| {prompt} | " + " | ".join(said[m][i].replace("\n", " ") for m in models) + " |")
    lines += [
        "",
        "Last training step, per pair kind:",
        "",
        "| kind | pairs | accuracy | margin |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {k} | {v['count']} | {v['acc']} | {v['margin']} |" for k, v in kinds.items()]
    lines += ["", "![loss, accuracy and margin per pair kind over steps](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))

    for i, prompt in enumerate(HELD_OUT):
        print(f"\n### {prompt}")
        for name in models:
            print(f"--- {name} ---\n{said[name][i]}")
    print(f"\nper-kind metrics at the last step: {json.dumps(kinds)}")
    print(f"style markers in greedy held-out answers: {scores}")
    print(f"sampled held-out answers with every marker: {rates}")
    print(f"report: {out / 'report.md'} (plot: {out / 'report.png'})")
    return final
