"""The recipes: bash syntax, and each one's DITTO command through train_ditto_ray --dry_run on the tiny model."""

import json
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.sh"))


def test_recipes_exist():
    assert {r.name for r in RECIPES} >= {"ditto_mistral7b.sh", "ditto_1gpu_colocated.sh", "grpo_with_ditto_reward.sh"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_recipe_syntax(recipe):
    subprocess.run(["bash", "-n", str(recipe)], check=True)


def dry_run(recipe: Path, model: Path, tmp_path: Path) -> str:
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"prompt": "Errors?", "response": "Never pass silently."}) + "\n")
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "MODEL": str(model),
        "DEMOS": str(demos),
        "RUN": str(tmp_path / "run"),
        "PYTHON": sys.executable,
    }
    done = subprocess.run(["bash", str(recipe)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"
    return done.stdout


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_recipe_dry_run(recipe, tiny_model_path, tmp_path):
    out = dry_run(recipe, tiny_model_path, tmp_path)
    assert "resource plan" in out and "dry run ok" in out, out


@pytest.mark.slow
def test_grpo_recipe_commands(tiny_model_path, tmp_path, monkeypatch):
    """grpo_with_ditto_reward.sh's dry run checks its DITTO stage (above) and prints its other two commands:
    serve-reward's must parse with openrlhf-ditto's parser, train_ppo_ray's must pass train_ppo_ray's own parser and
    checks (its real __main__, stopped where it would start training)."""
    from openrlhf_ditto.cli.main import build_parser

    out = dry_run(RECIPES[0].with_name("grpo_with_ditto_reward.sh"), tiny_model_path, tmp_path)
    serve, grpo = [shlex.split(line.removeprefix("would run: ")) for line in out.splitlines() if "would run:" in line]
    assert serve[:5] == ["env", "CUDA_VISIBLE_DEVICES=7", sys.executable, "-m", "openrlhf_ditto.cli.main"]
    served = build_parser().parse_args(serve[5:])
    assert served.command == "serve-reward" and served.run == str(tmp_path / "run" / "ditto")

    assert grpo[:5] == ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3", sys.executable, "-m", "openrlhf.cli.train_ppo_ray"]

    class Parsed(Exception):
        pass

    def stop(args):
        raise Parsed(args)

    monkeypatch.setenv("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")  # train_ppo_ray imports flash-attn (CPU install)
    monkeypatch.setattr("ray.is_initialized", lambda: True)
    monkeypatch.setattr("openrlhf.utils.get_strategy", stop)
    monkeypatch.setattr(sys, "argv", grpo[4:])
    with pytest.raises(Parsed) as parsed:
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    args = parsed.value.args[0]
    assert args.reward.remote_url == [f"http://127.0.0.1:{served.port}/get_reward"]
    assert args.algo.advantage.estimator == "group_norm" and args.critic.model_name_or_path is None
    assert args.actor.model_name_or_path == str(tmp_path / "run" / "ditto" / "reference")  # pi_0


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
