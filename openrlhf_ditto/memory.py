"""What a DITTO run holds in GPU memory at its peak, per role, from the model's config alone (no weights loaded).

`train --dry_run` and `train_ditto_ray --dry_run` print it; benchmarks/memory_table.py prints the README's table.
A calculation, not a measurement: weights and optimizer states are exact byte counts; activations use the bytes a
transformers Llama/Mistral/Qwen2 decoder layer saves for backward per token under SDPA (no attention-score matrix),
measured on this CPU with saved-tensor hooks (tests/test_memory.py checks the formula against that measurement);
CUDA's allocator adds fragmentation, CUDA context and NCCL buffers (a few GB) on top.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

GB = 1e9
GPU_SIZES = (24, 40, 48, 80, 141)  # GB: common GPUs the plan says it fits

# Bytes per token per decoder layer saved for backward: a * hidden_size + b * intermediate_size, by (weight dtype,
# LoRA or all parameters). LoRA saves more per hidden unit in bf16: peft keeps the adapter in fp32 and casts the
# layer's input to it.
ACTIVATION_BYTES = {
    ("bf16", True): (34, 6),
    ("bf16", False): (25, 8),
    ("fp32", True): (31, 12),
    ("fp32", False): (42, 16),
}
# Per logit (row x position x vocabulary) at the peak of backward: the model's logits (bf16: 2 bytes), their fp32
# copy (4) and its gradient (4). OpenRLHF's Actor computes them at every position; the local backend only at the
# response's (`logits_to_keep`).
LOGIT_BYTES = {"bf16": 10, "fp32": 8}

# Model shapes for the README's table and benchmarks/gpu_check.py (their Hugging Face configs, no weights).
SHAPES = {
    "SmolLM2-135M": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    "Qwen2.5-1.5B": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
    ),
    "Mistral-7B": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=32768,
    ),
}  # fmt: skip


@dataclass
class Shape:
    params: int
    lora_params: int  # of the adapter the plan's --ds.lora flags add (0: all parameters train)
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int  # key (= value) width per token and layer


def config_of(name_or_path) -> "transformers.PretrainedConfig":  # noqa: F821
    """A SHAPES name, or a model folder's config."""
    from transformers import AutoConfig

    if name_or_path in SHAPES:
        kwargs = dict(SHAPES[name_or_path])
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return AutoConfig.from_pretrained(name_or_path)


def model_shape(config, lora_rank: int = 0, lora_targets: list[str] = ()) -> Shape:
    """Exact parameter counts from an empty model on the meta device; the LoRA adapter's is r x (in + out) per
    targeted linear layer."""
    import torch
    from transformers import AutoModelForCausalLM

    lora_targets = [lora_targets] if isinstance(lora_targets, str) else lora_targets
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lora = sum(
        lora_rank * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rpartition(".")[2] in lora_targets
    )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(
        params=sum(p.numel() for p in model.parameters()),
        lora_params=lora,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
    )


def activation_bytes(s: Shape, rows: int, tokens: int, dtype: str, lora: bool, checkpointing: bool) -> float:
    """What one micro-batch's forward keeps for backward in the decoder layers (`rows` x `tokens`). With
    gradient checkpointing each layer keeps its input, and backward recomputes one layer at a time."""
    a, b = ACTIVATION_BYTES[(dtype, lora)]
    layer = rows * tokens * (a * s.hidden + b * s.intermediate)
    if checkpointing:
        return rows * tokens * s.layers * s.hidden * (2 if dtype == "bf16" else 4) + layer
    return layer * s.layers


def _states(s: Shape, dtype: str) -> tuple[int, float]:
    """(trainable parameters, their bytes beyond the bf16 weights): gradient, fp32 master copy and Adam's two
    moments. LoRA: peft keeps the adapter in fp32 (4 + 4 + 8 bytes); all parameters in bf16: bf16 gradient,
    fp32 master, Adam (2 + 4 + 8, as DeepSpeed's bf16 mode); in fp32: gradient and Adam (4 + 8)."""
    if s.lora_params:
        return s.lora_params, 16.0 * s.lora_params
    return s.params, (14.0 if dtype == "bf16" else 12.0) * s.params


def local_plan(
    s: Shape, args: SimpleNamespace, gpu_bytes: float, prompts: int = 8, dtype: str = "bf16"
) -> list[tuple[str, float, str]]:
    """`openrlhf-ditto train` on one device with `prompts` demo prompts: (role, bytes, note) rows; the last is the
    peak. Checkpointing left unset is chosen as the backend chooses it on a GPU of `gpu_bytes`."""
    if args.actor.gradient_checkpointing_enable is None:
        args = copy.deepcopy(args)
        choose_local_memory(s, args, gpu_bytes, prompts)
    w = 2 if dtype == "bf16" else 4
    lora = bool(s.lora_params)
    L, R = args.data.max_len, min(args.rollout.max_new_tokens, args.data.max_len)
    rows = 2 * args.train.micro_batch_size
    ckpt = bool(args.actor.gradient_checkpointing_enable)
    trainable, states = _states(s, dtype)
    weights = w * s.params + (4 * s.lora_params if lora else 0)
    reference = 0.0 if lora else w * s.params
    vllm = args.rollout.engine == "vllm"
    engine = (args.vllm.gpu_memory_utilization or 0.3) * gpu_bytes if vllm else 0.0
    # the torch sampler's KV cache: every demo prompt x M samples at once, every layer
    kv = 0.0 if vllm else prompts * args.rollout.n_samples_per_prompt * L * s.layers * 2 * s.kv_dim * w
    acts = activation_bytes(s, rows, L, dtype, lora, ckpt)
    logits = rows * (R + 1) * s.vocab * LOGIT_BYTES[dtype]
    sampler = "--vllm.gpu_memory_utilization x GPU" if vllm else f"{prompts} prompts x M samples x {L} tokens"
    master = ", fp32 master" if dtype == "bf16" and not lora else ""
    plan = [
        ("policy weights", weights, f"{s.params / 1e9:.2f}B parameters in {dtype}" + " + fp32 adapter" * lora),
        ("optimizer states", states, f"{trainable / 1e6:,.1f}M trainable: gradient{master}, Adam"),
        ("reference", reference, "the policy, adapter disabled" if lora else "a frozen copy"),
        ("vLLM engine" if vllm else "sampler KV cache", engine or kv, sampler),
        ("activations", acts, f"{rows} rows x {L} tokens, checkpointing {'on' if ckpt else 'off'}"),
        ("logits", logits, f"{rows} rows x {R + 1} response positions x {s.vocab} vocab, fp32 + gradient"),
    ]
    peak = weights + states + reference + engine + max(kv, acts + logits)
    return [*plan, ("peak", peak, "weights + states + reference + engine + max(sampling, training step)")]


def ray_plan(s: Shape, args: SimpleNamespace, gpu_bytes: float) -> list[tuple[str, float, str]]:
    """`train_ditto_ray` on OpenRLHF: the rows of one policy GPU (bf16, DeepSpeed ZeRO); the last is its peak."""
    a, t, v, z = args.actor, args.train, args.vllm, args.ds.zero_stage
    ranks = a.num_nodes * a.num_gpus_per_node
    lora = bool(s.lora_params)
    L, rows = args.data.max_len, 2 * t.micro_batch_size
    trainable, states = _states(s, "bf16")
    weights = 2 * s.params / (ranks if z == 3 else 1) + (4 * s.lora_params if lora else 0)
    grads = (4 if lora else 2) * trainable  # ZeRO-1 shards Adam and the master copy, ZeRO-2 the gradients too
    states = (states - grads) / (ranks if z >= 1 else 1) + grads / (ranks if z >= 2 else 1)
    colocated = t.colocate_all or t.colocate_actor_ref
    reference = 0.0 if args.ref.offload or not colocated else 2 * s.params / (ranks if z == 3 else 1)
    engine = v.gpu_memory_utilization * gpu_bytes if t.colocate_all else 0.0
    acts = activation_bytes(s, rows, L, "bf16", lora, bool(a.gradient_checkpointing_enable))
    logits = rows * L * s.vocab * LOGIT_BYTES["bf16"]  # OpenRLHF's Actor: every position's logits
    sleeping = t.colocate_all and v.enable_sleep
    training = weights + states + reference + acts + logits + (0.0 if sleeping else engine)
    sampling = weights + (0.0 if args.ds.enable_sleep else states) + reference + engine
    own = f", ZeRO-{z} over {ranks} rank(s)"
    where = "offloaded (ZeRO-3)" if args.ref.offload else "colocated" if colocated else "on its own GPUs"
    state = "sleeps while the policy trains" if sleeping else "awake"
    ckpt = "on" if a.gradient_checkpointing_enable else "off"
    plan = [
        ("policy weights", weights, f"{s.params / 1e9:.2f}B parameters in bf16{own if z == 3 else ''}"),
        (
            "optimizer states",
            states,
            f"{trainable / 1e6:,.1f}M trainable: gradient, fp32 master, Adam{own * (z >= 1)}",
        ),
        ("reference", reference, where),
        ("vLLM engine", engine, f"colocated, {state}" if t.colocate_all else "on its own GPUs"),
        ("activations", acts, f"{rows} rows x {L} tokens, checkpointing {ckpt}"),
        ("logits", logits, f"{rows} rows x {L} positions x {s.vocab} vocab, fp32 + gradient"),
    ]
    return [*plan, ("peak", max(training, sampling), "max(training step, sampling)")]


def smallest_gpu(plan_at: Callable[[float], list[tuple[str, float, str]]]) -> str:
    """The smallest of GPU_SIZES whose plan (`plan_at(its bytes)`: vLLM takes a share of the GPU) fits it."""
    for size in GPU_SIZES:
        if plan_at(size * GB)[-1][1] <= size * GB:
            return f"{size} GB"
    return f"none up to {GPU_SIZES[-1]} GB"


def format_plan(title: str, plan: list[tuple[str, float, str]], smallest: str) -> str:
    lines = [f"memory plan: {title} (a calculation; README: Memory)"]
    lines += [f"  {role:<17} {size / GB:7.1f} GB  {note}" for role, size, note in plan]
    lines.append(f"  smallest GPU it fits: {smallest}")
    return "\n".join(lines)


def choose_local_memory(s: Shape, args: SimpleNamespace, free_bytes: float, prompts: int = 8) -> str | None:
    """--actor.gradient_checkpointing_enable unset (None) on a GPU: turn it on when the training step would not fit
    `free_bytes` without it, then halve --train.micro_batch_size until it fits (the step's gradient is the same
    however the batch is split). Sets both on `args`; returns what it changed, or None."""
    a, t = args.actor, args.train
    if a.gradient_checkpointing_enable is not None:
        return None
    a.gradient_checkpointing_enable = False
    if local_plan(s, args, free_bytes, prompts)[-1][1] <= free_bytes:
        return None
    a.gradient_checkpointing_enable = True
    while t.micro_batch_size > 1 and local_plan(s, args, free_bytes, prompts)[-1][1] > free_bytes:
        t.micro_batch_size //= 2
    peak = local_plan(s, args, free_bytes, prompts)[-1][1]
    return (
        f"memory: {free_bytes / GB:.0f} GB free on the GPU, so gradient checkpointing is on and "
        f"--train.micro_batch_size is {t.micro_batch_size} (peak {peak / GB:.0f} GB; set "
        "--actor.gradient_checkpointing_enable / --no-actor.gradient_checkpointing_enable and "
        "--train.micro_batch_size to choose)"
    )


def describe(args: SimpleNamespace, prompts: int, ray: bool) -> str:
    """The dry runs' memory plan for the run's flags, on this machine's GPU (or an 80 GB one where there is none).
    The local plan is in bf16, as on a GPU, with the checkpointing and micro-batch the backend would choose."""
    import importlib.util

    import torch

    gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * GB
    lora = args.ds.lora
    s = model_shape(config_of(args.actor.model_name_or_path), lora.rank, lora.target_modules)
    where = f"{'this' if torch.cuda.is_available() else 'an'} {gpu / GB:.0f} GB GPU"
    if ray:
        ranks = args.actor.num_nodes * args.actor.num_gpus_per_node
        plan_at = lambda size: ray_plan(s, args, size)  # noqa: E731
        title = f"one of the {ranks} policy GPU(s), {where}"
    else:
        args = copy.deepcopy(args)
        if args.rollout.engine == "auto":
            args.rollout.engine = "vllm" if importlib.util.find_spec("vllm") else "torch"
        plan_at = lambda size: local_plan(s, args, size, prompts)  # noqa: E731
        title = f"train on {where}, bf16"
    return format_plan(title, plan_at(gpu), smallest_gpu(plan_at))
