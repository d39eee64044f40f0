"""The memory calculation (openrlhf_ditto/memory.py): activations against what the model really saves for backward
on this CPU, weights and logits against hand-computed numbers, the local backend's choice of checkpointing and
micro-batch, and both dry runs printing the plan."""

import json
from types import SimpleNamespace

import pytest
import torch

from openrlhf_ditto.cli import main as local_cli
from openrlhf_ditto.cli import train_ditto_ray
from openrlhf_ditto.cli.args import hierarchize
from openrlhf_ditto.loss import sequence_logps
from openrlhf_ditto.memory import (
    GB,
    activation_bytes,
    choose_local_memory,
    config_of,
    local_plan,
    model_shape,
    ray_plan,
    smallest_gpu,
)
from openrlhf_ditto.pairs import SequenceBatch

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def saved_for_backward(model, batch) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward in one forward (a measurement)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sequence_logps(model, batch)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_activations_match_what_the_layers_save(dtype, lora, one_thread):
    """A shape the coefficients were not fitted on: the formula is within 10% of the measured bytes per layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    rows, tokens = 4, 48

    def measured(layers: int) -> int:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=500, hidden_size=192, intermediate_size=640, num_hidden_layers=layers,
            num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
        )  # fmt: skip
        model = LlamaForCausalLM(config).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
        if lora:
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=QKVO))
        model.train()
        seq = torch.randint(500, (rows, tokens))
        mask = torch.ones(rows, tokens, dtype=torch.long)
        mask[0, :7] = 0  # left padding, as in a pair batch
        return saved_for_backward(model, SequenceBatch(seq, mask, torch.ones(rows, 16)))

    per_layer = (measured(3) - measured(1)) / 2
    shape = SimpleNamespace(hidden=192, intermediate=640, layers=1)
    calculated = activation_bytes(shape, rows, tokens, dtype, lora, checkpointing=False)
    assert calculated == pytest.approx(per_layer, rel=0.10), (calculated, per_layer)


def test_shapes_and_logits_by_hand():
    """Mistral-7B's 7.24B parameters and its paper LoRA (r 32 on q, k, v, o: 32 x (in + out) per layer), and the
    issue's OpenRLHF logits: 8 rows x 2048 positions x 151,936 vocabulary x 10 bytes = 23.2 GiB for Qwen2.5."""
    s = model_shape(config_of("Mistral-7B"), 32, QKVO)
    assert s.params == 7_241_732_096
    assert s.lora_params == 32 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024))
    qwen = model_shape(config_of("Qwen2.5-1.5B"), 32, QKVO)
    args = ray_args(["--train.micro_batch_size", "4"], "Qwen2.5-1.5B")
    logits = dict((role, size) for role, size, _ in ray_plan(qwen, args, 80 * GB))["logits"]
    assert logits / 2**30 == pytest.approx(8 * 2048 * 151936 * 10 / 2**30) and 23 < logits / 2**30 < 23.5


def ray_args(flags: list[str], model: str = "Mistral-7B") -> SimpleNamespace:
    one_gpu = ["--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--vllm.num_engines", "1"]
    one_gpu += ["--train.colocate_all", "--vllm.enable_sleep", "--ds.enable_sleep", "--vllm.gpu_memory_utilization"]
    argv = ["--actor.model_name_or_path", model, "--data.dataset", "x", *one_gpu, "0.5", *flags]
    return hierarchize(train_ditto_ray.build_parser().parse_args(argv))


def local_args(flags: list[str]) -> SimpleNamespace:
    argv = ["train", "--actor.model_name_or_path", "Mistral-7B", "--data.dataset", "x", "--rollout.engine", "vllm"]
    return hierarchize(local_cli.build_parser().parse_args([*argv, *flags]))


def test_one_gpu_recipe_needs_40_gb_and_fits_24_with_micro_batch_1():
    """recipes/ditto_1gpu_colocated.sh's comment: Qwen2.5-1.5B as the recipe runs it (micro-batch 4) does not fit
    24 GB (the fp32 logits alone are 25 GB) but fits 40 GB; with --train.micro_batch_size 1 it fits 24 GB."""
    s = model_shape(config_of("Qwen2.5-1.5B"), 32, QKVO)
    recipe = ["--actor.gradient_checkpointing_enable", "--train.micro_batch_size"]
    assert smallest_gpu(lambda size: ray_plan(s, ray_args([*recipe, "4"], "Qwen2.5-1.5B"), size)) == "40 GB"
    assert smallest_gpu(lambda size: ray_plan(s, ray_args([*recipe, "1"], "Qwen2.5-1.5B"), size)) == "24 GB"


def test_local_backend_turns_checkpointing_on_where_the_step_would_not_fit():
    """7B LoRA with the defaults (micro-batch 8 pairs, 2048 tokens): ~236 GB of activations without checkpointing.
    On 80 GB checkpointing goes on and the micro-batch stays; on 24 GB the micro-batch is halved too; an explicit
    --no-actor.gradient_checkpointing_enable is left alone; a model that fits is left alone."""
    s = model_shape(config_of("Mistral-7B"), 32, QKVO)
    args = local_args([])
    off = local_args(["--no-actor.gradient_checkpointing_enable"])
    assert dict((r, b) for r, b, _ in local_plan(s, off, 80 * GB))["activations"] > 200 * GB
    said = choose_local_memory(s, args, 80 * GB)
    assert args.actor.gradient_checkpointing_enable is True and args.train.micro_batch_size == 8
    assert "gradient checkpointing is on" in said and "--train.micro_batch_size" in said
    assert local_plan(s, args, 80 * GB)[-1][1] < 80 * GB
    small = local_args(["--rollout.engine", "torch", "--rollout.n_samples_per_prompt", "2"])
    choose_local_memory(s, small, 24 * GB, prompts=2)
    assert small.actor.gradient_checkpointing_enable and small.train.micro_batch_size < 8
    assert choose_local_memory(s, off, 80 * GB) is None and off.actor.gradient_checkpointing_enable is False
    tiny = local_args([])
    assert choose_local_memory(model_shape(config_of("SmolLM2-135M"), 32, QKVO), tiny, 80 * GB) is None
    assert tiny.actor.gradient_checkpointing_enable is False and tiny.train.micro_batch_size == 8


def test_local_backend_chooses_on_a_gpu(tiny_model_path, monkeypatch):
    """LocalBackend makes the choice from the GPU's free memory when the flag is unset. CUDA is mocked (this machine
    has none): `is_available` says yes, 1 MB is free, and `Module.to` leaves the model on the CPU."""
    from openrlhf_ditto.backends.local import LocalBackend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (1e6, 2e6))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    args = local_args(["--rollout.engine", "torch"])
    backend = LocalBackend(tiny_model_path, args)
    assert args.actor.gradient_checkpointing_enable is True and args.train.micro_batch_size == 1
    assert backend.model.base_model.model.is_gradient_checkpointing


def test_dry_runs_print_the_memory_plan(tiny_model_path, tmp_path, capsys):
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"prompt": "Errors?", "response": "Never pass silently."}) + "\n")
    base = ["--actor.model_name_or_path", str(tiny_model_path), "--data.dataset", str(demos)]
    base += ["--ckpt.output_dir", str(tmp_path / "run")]
    local_cli.main(["train", *base, "--dry_run"])
    out = capsys.readouterr().out
    assert (
        "memory plan: train on an 80 GB GPU, bf16" in out
        and "activations" in out
        and "smallest GPU it fits: 24 GB" in out
    )
    train_ditto_ray.main([*base, "--vllm.num_engines", "1", "--train.micro_batch_size", "1", "--dry_run"])
    out = capsys.readouterr().out
    assert "memory plan: one of the 8 policy GPU(s)" in out and "logits" in out
    assert not (tmp_path / "run").exists()
