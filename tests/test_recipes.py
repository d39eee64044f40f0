"""The recipes: bash syntax, and each one's DITTO command through train_ditto_ray --dry_run on the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.sh"))


def test_recipes_exist():
    assert {r.name for r in RECIPES} >= {"ditto_mistral7b.sh", "ditto_1gpu_colocated.sh"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_recipe_syntax(recipe):
    subprocess.run(["bash", "-n", str(recipe)], check=True)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_recipe_dry_run(recipe, tiny_model_path, tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"prompt": "Errors?", "response": "Never pass silently."}) + "\n")
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "MODEL": str(tiny_model_path),
        "DEMOS": str(demos),
        "RUN": str(tmp_path / "run"),
        "PYTHON": sys.executable,
    }
    done = subprocess.run(["bash", str(recipe)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resource plan" in done.stdout and "dry run ok" in done.stdout, done.stdout
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_dry_run_refuses_bad_settings(tiny_model_path, tmp_path, capsys):
    from openrlhf_ditto.cli.train_ditto_ray import main

    base = ["--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", str(tmp_path / "d.jsonl")]
    with pytest.raises(SystemExit, match="--vllm.num_engines"):
        main([*base, "--dry_run"])
    with pytest.raises(SystemExit, match="train_sft"):
        main([*base, "--vllm.num_engines", "1", "--ditto.sft_steps", "30", "--dry_run"])
    with pytest.raises(SystemExit, match="multiple of"):
        main([*base, "--vllm.num_engines", "1", "--actor.num_gpus_per_node", "5", "--dry_run"])
    with pytest.raises(SystemExit, match="colocate_all"):
        main([*base, "--vllm.num_engines", "1", "--train.colocate_all", "--dry_run"])
    with pytest.raises(SystemExit) as e:  # the demos file does not exist
        main(
            [
                *base,
                "--vllm.num_engines",
                "2",
                "--actor.num_gpus_per_node",
                "4",
                "--ref.num_gpus_per_node",
                "4",
                "--train.micro_batch_size",
                "2",
                "--dry_run",
            ]
        )
    assert e.value.code == 2
    plan = capsys.readouterr().out
    assert "GPUs 0-3" in plan and "GPUs 4-7" in plan and "GPUs 8-9" in plan and "total: 10 GPU(s)" in plan
