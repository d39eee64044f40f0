"""The recipes: bash syntax, and each one's DITTO command through train_ditto_ray --dry_run on the tiny model."""

import json
import os
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer import refused

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
    assert "--vllm.num_engines" in refused(main, [*base, "--dry_run"], capsys)
    assert "train_sft" in refused(
        main, [*base, "--vllm.num_engines", "1", "--ditto.sft_steps", "30", "--dry_run"], capsys
    )
    argv = [*base, "--vllm.num_engines", "1", "--actor.num_gpus_per_node", "5", "--dry_run"]
    assert "multiple of" in refused(main, argv, capsys)
    assert "colocate_all" in refused(
        main, [*base, "--vllm.num_engines", "1", "--train.colocate_all", "--dry_run"], capsys
    )
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


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ds.load_in_4bit"], "--ds.load_in_4bit cannot be used with DITTO"),  # its 4-bit weights cannot be synced
        (["--ref.offload"], "--ref.offload needs --ds.zero_stage 3"),  # a no-op below ZeRO-3
    ],
)
def test_dry_run_refuses_flags_that_would_not_work(tiny_model_path, tmp_path, capsys, flags, message):
    from openrlhf_ditto.cli.train_ditto_ray import main

    base = ["--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", str(tmp_path / "d.jsonl")]
    one_gpu = ["--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--vllm.num_engines", "1"]
    assert message in refused(main, [*base, *one_gpu, *flags, "--dry_run"], capsys)


def test_dry_run_plan_says_what_ref_offload_does(tiny_model_path, tmp_path, capsys):
    from openrlhf_ditto.cli.train_ditto_ray import main

    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"prompt": "Errors?", "response": "Never pass silently."}) + "\n")
    flags = ["--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--vllm.num_engines", "1"]
    flags += ["--ref.offload", "--ds.zero_stage", "3", "--dry_run"]
    main(["--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", str(demos), *flags])
    assert "weights offloaded to CPU (ZeRO-3)" in capsys.readouterr().out


def test_relative_paths_reach_the_roles_absolute(tiny_model_path, tmp_path, monkeypatch):
    """Ray actors do not share the driver's working directory: every path they get is absolute."""
    from openrlhf_ditto.cli.train_ditto_ray import parse_args

    monkeypatch.chdir(tmp_path)
    model = os.path.relpath(tiny_model_path)
    argv = ["--actor.model_name_or_path", model, "--data.dataset", "d.jsonl", "--ckpt.output_dir", "runs/x"]
    extra = ["--ditto.extra_pairs", "p.jsonl", "--ditto.pair_fractions", "0.6", "0.2", "0.1", "0.1"]
    one_gpu = ["--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--vllm.num_engines", "1"]
    args = parse_args([*argv, *one_gpu, *extra])
    assert args.actor.model_name_or_path == str(tiny_model_path.resolve())
    assert args.ckpt.output_dir == str(tmp_path.resolve() / "runs" / "x")
    assert args.data.dataset == str(tmp_path.resolve() / "d.jsonl")
    assert args.ditto.extra_pairs == str(tmp_path.resolve() / "p.jsonl")


def recipe_env(tmp_path, **env) -> dict:
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"prompt": "Errors?", "response": "Never pass silently."}) + "\n")
    out = {k: v for k, v in os.environ.items() if k != "MODEL"}
    return {**out, "DRY_RUN": "1", "DEMOS": str(demos), "RUN": str(tmp_path / "run"), "PYTHON": sys.executable, **env}


def test_a_hub_model_that_is_not_here_is_refused_first_saying_what_to_pass(tmp_path):
    """The recipes' default MODEL is a Hub id: on a machine that cannot fetch it, the dry run stops at once (before
    any Ray, vLLM or DeepSpeed) with one line that says how to get it and what to pass."""
    recipe = RECIPES[0].with_name("ditto_mistral7b.sh")
    env = recipe_env(tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty_cache"))
    done = subprocess.run(["bash", str(recipe)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "resource plan" not in done.stdout
    assert "mistralai/Mistral-7B-Instruct-v0.2 is not a local folder" in done.stderr
    assert "hf download mistralai/Mistral-7B-Instruct-v0.2" in done.stderr and "MODEL=" in done.stderr


def test_a_hub_model_in_the_cache_is_used_from_there(tiny_model_path, tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    shutil.copytree(tiny_model_path, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    env = recipe_env(tmp_path, MODEL="org/tiny", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    recipe = RECIPES[0].with_name("ditto_1gpu_colocated.sh")
    done = subprocess.run(["bash", str(recipe)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"dry run ok: model {repo / 'snapshots' / '0123abcd'}" in done.stdout
    # a real run needs the weights there too: it takes the cached folder, before starting anything
    code = "from openrlhf_ditto.cli.train_ditto_ray import resolve_model; print(resolve_model('org/tiny', False))"
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == str(repo / "snapshots" / "0123abcd"), found.stderr


def test_dry_run_warns_when_a_multi_node_run_folder_is_on_a_local_disk(tiny_model_path, tmp_path, capsys, monkeypatch):
    from openrlhf_ditto.cli import train_ditto_ray

    assert train_ditto_ray.filesystem(Path("/proc/self")) == "proc"
    monkeypatch.setattr(train_ditto_ray, "filesystem", lambda path: "ext4")
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"prompt": "Errors?", "response": "Never pass silently."}) + "\n")
    base = ["--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", str(demos), "--dry_run"]
    base += ["--ckpt.output_dir", str(tmp_path / "run"), "--train.micro_batch_size", "4", "--vllm.num_engines", "1"]
    for nodes, gpus in (("2", "1"), ("1", "2")):  # the same 2 GPUs per role, on 2 nodes, then on 1
        roles = [f"--{role}.{flag}" for role in ("actor", "ref") for flag in ("num_nodes", "num_gpus_per_node")]
        train_ditto_ray.main([*base, *(x for flag in roles for x in (flag, nodes if "nodes" in flag else gpus))])
        err = capsys.readouterr().err
        if nodes == "2":
            assert f"--ckpt.output_dir {tmp_path / 'run'} is on a local ext4 filesystem" in err
            assert "--actor.model_name_or_path" in err and "every node mounts" in err
        else:
            assert "warning" not in err  # one node: any disk will do
