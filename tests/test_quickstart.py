import pytest

from openrlhf_ditto import quickstart as qs
from openrlhf_ditto.cli.main import main


@pytest.mark.slow
def test_quickstart_writes_report_and_plot(tmp_path, monkeypatch, capsys):
    """The real quick start on SmolLM2-135M, shrunk to a few steps (the full run is ~6 min: see README)."""
    small = ["--ditto.sft_steps", "2", "--ditto.iterations", "2", "--ditto.resample_every", "1"]
    small += ["--rollout.n_samples_per_prompt", "2", "--rollout.max_new_tokens", "8", "--train.batch_size", "4"]
    monkeypatch.setattr(qs, "FLAGS", qs.FLAGS + small)  # later flags win in argparse
    monkeypatch.setattr(qs, "HELD_OUT", qs.HELD_OUT[:1])
    main(["quickstart", "--output_dir", str(tmp_path / "qs")])
    final = tmp_path / "qs" / "final"

    assert (final / "model.safetensors").exists() and (final / "adapter").exists()
    report = (tmp_path / "qs" / "report.md").read_text()
    assert "| prompt | base model | SFT warm start (pi_0) | DITTO |" in report
    assert qs.HELD_OUT[0] in report and "| inter_model |" in report
    png = (tmp_path / "qs" / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    out = capsys.readouterr().out
    assert "--- DITTO ---" in out and "style markers in greedy held-out answers: base model" in out
    assert "sampled held-out answers with every marker: base model" in out

    with pytest.raises(SystemExit):  # a second quick start in the same folder is refused
        main(["quickstart", "--output_dir", str(tmp_path / "qs")])
    assert "--resume" in capsys.readouterr().err


def test_style_score_counts_markers():
    assert qs.style_score("Short answer: water it. Happy growing! 🌱") == 2
    assert qs.style_score("Water it.") == 0
