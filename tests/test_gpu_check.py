"""benchmarks/gpu_check.py on this CPU with tiny shapes (--device cpu --quick), so that the check a lent GPU runs
never rots: every stage finishes and writes its results, and what the CPU can say, it says right."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_runs_on_a_cpu(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--device",
        "cpu",
        "--quick",
        "--out",
        str(out),
        "--tokenizer",
        str(tmp_path / "tok"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    stages = {
        name: json.loads((out / f"{name}.json").read_text())
        for name in ("numerics", "survival", "throughput", "end_to_end")
    }
    assert not any("error" in result for result in stages.values()), {k: v.get("error") for k, v in stages.items()}
    report = (out / "results.md").read_text()
    assert all(f"### {name}" in report for name in stages)
    numerics = stages["numerics"]
    assert numerics["padding"]["MATH"]["max"] < 0.05 and numerics["seeded_repeats"]
    assert numerics["checkpoint_cpu_and_cuda_resumes"] and numerics["checkpoint_cpu_only_resumes"]  # on a CPU
    assert stages["survival"]["0.0001"]["forward"] > 0.5  # a large update survives bf16
    assert stages["throughput"]["models"]["SmolLM2-135M"]["train_step"]["pairs_per_s"] > 0
    assert stages["end_to_end"]["stopped_exit_code"] == 130 and stages["end_to_end"]["max_weight_diff"] == 0.0
