"""The README's memory table: GPU memory per role for the recipes and `openrlhf-ditto train`, at 7B with LoRA and
with all parameters, from `openrlhf_ditto.memory` (the calculation both dry runs print). No GPU, no weights.

The Ray recipes' own flags are read by running each recipe with a stand-in Python that prints them, so the table
follows the recipes. Models are openrlhf_ditto.memory.SHAPES (their configs only).

    python benchmarks/memory_table.py
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from openrlhf_ditto.cli import main as local_cli
from openrlhf_ditto.cli import train_ditto_ray
from openrlhf_ditto.cli.args import hierarchize
from openrlhf_ditto.memory import GB, config_of, local_plan, model_shape, ray_plan, smallest_gpu
from openrlhf_ditto.presets import PRESETS

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
BASE = ["--actor.model_name_or_path", "MODEL", "--data.dataset", "demos.jsonl"]


def recipe_flags(recipe: str) -> list[str]:
    """The flags a recipe (with DRY_RUN=1) passes to train_ditto_ray, less --dry_run."""
    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp) / "python"
        stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[3:]))\n")
        stub.chmod(0o755)
        env = {**os.environ, "DRY_RUN": "1", "PYTHON": str(stub), "MODEL": "MODEL"}
        out = subprocess.run(["bash", RECIPES / recipe], env=env, capture_output=True, text=True, check=True)
    return [f for f in json.loads(out.stdout) if f != "--dry_run"]


def row(setup: str, gpus: str, plan_at) -> str:
    plan = plan_at(80 * GB)
    cells = " | ".join(f"{size / GB:.1f}" for _, size, _ in plan)
    return f"| {setup} | {gpus} | {cells} | {smallest_gpu(plan_at)} |"


def main() -> None:
    print("| setup | GPUs | policy weights | optimizer states | reference | vLLM or KV cache | activations | logits "
          "| peak per policy GPU (GB) | smallest GPU it fits |")  # fmt: skip
    print("| --- | --- |" + " ---: |" * 8 + " --- |")
    for recipe, gpus in (("ditto_mistral7b.sh", "8 x 80 GB"), ("ditto_1gpu_colocated.sh", "1 x 80 GB")):
        flags = recipe_flags(recipe)
        for model in ("Qwen2.5-1.5B", "Mistral-7B") if recipe == "ditto_1gpu_colocated.sh" else ("Mistral-7B",):
            for lora in (True, False):
                argv = [*flags, *(() if lora else ("--ds.lora.rank", "0"))]
                argv[argv.index("--actor.model_name_or_path") + 1] = model
                args = hierarchize(train_ditto_ray.build_parser().parse_args(argv))
                s = model_shape(config_of(model), args.ds.lora.rank, args.ds.lora.target_modules)
                setup = f"{recipe} {model} {'LoRA' if lora else 'all parameters'}"
                print(row(setup, gpus, lambda size, s=s, args=args: ray_plan(s, args, size)))
    local = [
        ("train, defaults (before: checkpointing off)", "Mistral-7B", ["--no-actor.gradient_checkpointing_enable"]),
        ("train, defaults", "Mistral-7B", []),
        ("train, all parameters", "Mistral-7B", ["--ds.lora.rank", "0"]),
        ("train --preset small", "SmolLM2-135M", PRESETS["small"]),
    ]
    for setup, model, extra in local:
        argv = ["train", *BASE, "--rollout.engine", "vllm", *extra]
        argv[argv.index("MODEL")] = model
        args = hierarchize(local_cli.build_parser().parse_args(argv))
        s = model_shape(config_of(model), args.ds.lora.rank, args.ds.lora.target_modules)
        chosen = local_plan(s, args, 80 * GB)[4][2]  # on 80 GB: the micro-batch and checkpointing it runs with
        print(row(f"{setup} {model} ({chosen})", "1 x 80 GB", lambda size, s=s, args=args: local_plan(s, args, size)))


if __name__ == "__main__":
    main()
