"""`openrlhf-ditto train --preset small`: the preset's flags reach the run, and the user's own flags win."""

import json

from test_trainer import DEMOS

from openrlhf_ditto.cli.main import main
from openrlhf_ditto.presets import SMALL_MODEL


def test_preset_flags_reach_the_run_and_yours_override_them(tiny_model_path, tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps(d) + "\n" for d in DEMOS))
    quick = ["--ditto.sft_steps", "1", "--ditto.iterations", "1", "--ditto.resample_every", "1"]
    quick += ["--rollout.max_new_tokens", "4", "--data.max_len", "96", "--ds.lora.rank", "4"]
    main(["train", "--preset", "small", "--actor.model_name_or_path", str(tiny_model_path), "--data.dataset",
          str(demos), "--ckpt.output_dir", str(tmp_path / "run"), "--actor.adam.lr", "5e-5", *quick])  # fmt: skip
    config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    preset = {f: v for f, v in zip(SMALL_MODEL, [*SMALL_MODEL[1:], "--"]) if f.startswith("--")}
    assert preset["--data.apply_chat_template"].startswith("--") and config["data"]["apply_chat_template"]
    assert config["preset"] == "small" and config["ditto"]["sft_lr"] == float(preset["--ditto.sft_lr"])
    assert config["ds"]["lora"]["alpha"] == int(preset["--ds.lora.alpha"])
    assert config["actor"]["adam"]["lr"] == 5e-5 != float(preset["--actor.adam.lr"])  # yours win
    assert config["ds"]["lora"]["rank"] == 4 and config["ditto"]["iterations"] == 1
