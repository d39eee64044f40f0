"""`openrlhf-ditto quickstart`: DITTO on SmolLM2-135M-Instruct (offline) with six bundled demos.

The demos answer everyday requests in one recognisable voice: they open with "Short answer:", use a garden
metaphor and sign off "Happy growing! 🌱". The base model never writes like that, so the change is easy to see.
Settings are scaled down from the paper's (Mistral-7B) to finish in about ten minutes on two CPU cores.
"""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEMOS = Path(__file__).parent / "data" / "quickstart_demos.jsonl"
HELD_OUT = [
    "How do I keep my houseplants alive?",
    "What is a quick healthy breakfast?",
    "How should I prepare for a job interview?",
]
MARKERS = ("Short answer:", "Happy growing")
FLAGS = [
    "--data.apply_chat_template",
    "--data.max_len", "320",
    "--rollout.max_new_tokens", "56",
    "--rollout.n_samples_per_prompt", "4",
    "--ditto.sft_steps", "30",
    "--ditto.sft_lr", "1e-3",  # LoRA on a 135M model needs a larger step than the paper's 3e-5 full 7B SFT
    "--ditto.iterations", "3",
    "--ditto.resample_every", "5",
    "--actor.adam.lr", "1e-4",
    "--train.batch_size", "8",
    "--train.micro_batch_size", "8",
    "--ds.lora.rank", "16",
    "--ds.lora.alpha", "32",
]  # fmt: skip


def style_score(text: str) -> int:
    return sum(marker in text for marker in MARKERS)


@torch.no_grad()
def answers(model_path: Path, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )["input_ids"]
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out


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


def quickstart(output_dir: str, overwrite: bool = False, resume: bool = False) -> Path:
    from openrlhf_ditto.backends.local import LocalBackend
    from openrlhf_ditto.cli.args import hierarchize, validate
    from openrlhf_ditto.cli.main import build_parser
    from openrlhf_ditto.models import smollm2_path
    from openrlhf_ditto.trainer import train

    base = smollm2_path()
    argv = ["train", "--actor.model_name_or_path", str(base), "--data.dataset", str(DEMOS)]
    argv += ["--ckpt.output_dir", output_dir, *FLAGS] + ["--overwrite"] * overwrite + ["--resume"] * resume
    args = hierarchize(build_parser().parse_args(argv))
    validate(args)
    final = train(args, lambda path: LocalBackend(path, args))

    out = Path(output_dir)
    before, after = answers(base, HELD_OUT), answers(final, HELD_OUT)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    kinds = {
        k: {m: last.get(f"{k}/{m}") for m in ("count", "acc", "margin")} for k in ("online", "replay", "inter_model")
    }
    plot(out / "metrics.jsonl", out / "report.png")

    lines = ["# DITTO quick start", "", f"Base model: SmolLM2-135M-Instruct. DITTO model: `{final}`.", ""]
    lines += [
        f"Style markers {MARKERS} found in held-out answers: base {sum(map(style_score, before))}, "
        f"DITTO {sum(map(style_score, after))} (of {len(MARKERS) * len(HELD_OUT)}).",
        "",
    ]
    lines += ["| prompt | base model | DITTO model |", "| --- | --- | --- |"]
    lines += [
        f"| {p} | {b.replace(chr(10), ' ')} | {a.replace(chr(10), ' ')} |" for p, b, a in zip(HELD_OUT, before, after)
    ]
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

    for p, b, a in zip(HELD_OUT, before, after):
        print(f"\n### {p}\n--- base model ---\n{b}\n--- DITTO model ---\n{a}")
    print(f"\nper-kind metrics at the last step: {json.dumps(kinds)}")
    scores = f"base {sum(map(style_score, before))}, DITTO {sum(map(style_score, after))}"
    print(f"style markers in held-out answers: {scores}")
    print(f"report: {out / 'report.md'} (plot: {out / 'report.png'})")
    return final
