"""How much of a DITTO LoRA update survives bf16: in the policy's log-probs, in what vLLM samples after a weight sync,
and in `final/`, at lr 1e-6 ... 1e-4 (README, "bf16: does the update survive?").

For SmolLM2-135M-Instruct and a wider random stand-in (hidden 2048, weights N(0, 0.02), 2 layers, as a 7B model's
layers are wide and its weights small), a fresh LoRA (the recipes' r 32, alpha 64 on q,k,v,o) is given the update 40
Adam steps at `lr` make (the recipes' 4 iterations x 10): each B entry moves by 40 x lr along the sign of its
gradient (Adam's step is about lr per entry while a gradient's sign holds; at B = 0 only B has a gradient), the
gradient of the six quick-start demos' log-likelihood (the demo side of DPO's first step). Each row of the table is
the change of the demos' summed log-probs (adapter on minus off) measured four ways: in fp32 (the update itself),
and in bf16 by the policy (peft adds the fp32 adapter's output to the bf16 base layer's), by a bf16 vLLM engine
after `weights_for_sync` (merged in fp32, cast to bf16) and by `final/` (merged into the bf16 weights as
`save_model` does, then scored in fp32). "share" is the projection of a bf16 change on the fp32 one
(sum d16 * d32 / sum d32^2: 1 = all of it arrived, 0 = rounded away); "noise" is the rms of what is left
(d16 - share * d32) over the rms of d32.

    OMP_NUM_THREADS=1 nice python benchmarks/bf16_survival.py [--no-vllm]
"""

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from openrlhf_ditto.loss import sequence_logps
from openrlhf_ditto.models import smollm2_path
from openrlhf_ditto.pairs import collate
from openrlhf_ditto.quickstart import DEMOS

LRS = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4)
STEPS = 40  # the recipes' DITTO steps: 4 iterations x 10
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def wide_standin(folder: Path, tokenizer_from: Path) -> Path:
    """A random Llama of a 7B model's width (hidden 2048; initializer_range 0.02: weights N(0, 0.02)), 2 layers."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def demo_rows(path: Path, max_response: int = 48):
    """The quick-start demos as one batch (chat-rendered prompt, response cut at `max_response` tokens)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    records = [json.loads(line) for line in DEMOS.read_text().splitlines() if line.strip()]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, return_tensors="pt"
        )["input_ids"][0]
        for r in records
    ]
    responses = [
        torch.tensor(tokenizer(r["response"], add_special_tokens=False)["input_ids"][:max_response]) for r in records
    ]
    return prompts, responses, collate(prompts, responses, tokenizer.pad_token_id or 0)


def with_adapter(model, seed: int = 0):
    torch.manual_seed(seed)  # the same A in fp32 and bf16
    return get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=TARGETS))


def lora_direction(path: Path, batch) -> dict[str, torch.Tensor]:
    """sign(d log-likelihood of the demos / dB) at B = 0, per lora_B weight, in fp32."""
    model = with_adapter(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    sequence_logps(model, batch).sum().backward()
    return {n: p.grad.sign() for n, p in model.named_parameters() if "lora_B" in n}


def set_update(model, direction: dict[str, torch.Tensor], lr: float) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(direction[n] * STEPS * lr)


@torch.no_grad()
def change(model, batch) -> torch.Tensor:
    """Per demo: summed log-prob with the adapter minus without it."""
    model.eval()
    on = sequence_logps(model, batch)
    with model.disable_adapter():
        off = sequence_logps(model, batch)
    return on - off


@torch.no_grad()
def merged_change(model, base_fp32, batch) -> torch.Tensor:
    """`final/`: the adapter merged into the model's own dtype (as `save_model`), scored in fp32."""
    final = copy.deepcopy(model).merge_and_unload().float()
    return sequence_logps(final.eval(), batch) - sequence_logps(base_fp32, batch)


def share(d16: torch.Tensor, d32: torch.Tensor) -> tuple[float, float]:
    s = (d16 * d32).sum() / (d32 * d32).sum()
    return s.item(), ((d16 - s * d32).pow(2).mean().sqrt() / d32.pow(2).mean().sqrt()).item()


def measure(name: str, path: Path, use_vllm: bool) -> list[str]:
    from openrlhf_ditto.backends.vllm_engine import VLLMEngine, weights_for_sync

    prompts, responses, batch = demo_rows(path)
    direction = lora_direction(path, batch)
    fp32 = with_adapter(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    bf16 = with_adapter(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = None
    if use_vllm:
        length = max(len(p) + len(r) for p, r in zip(prompts, responses)) + 8
        engine = VLLMEngine(path, length, seed=0, gpu_memory_utilization=0.02, dtype=torch.bfloat16)
        before = engine.logps(prompts, responses)
    rows = []
    for lr in LRS:
        set_update(fp32, direction, lr)
        set_update(bf16, direction, lr)
        d32 = change(fp32, batch)
        cells = [share(change(bf16, batch), d32)]
        if engine is not None:
            after = engine.logps(prompts, responses, weights_for_sync(bf16, torch.bfloat16))
            cells.append(share(after - before, d32))
        cells.append(share(merged_change(bf16, base, batch), d32))
        shown = " | ".join(f"{s:.2f} ({n:.2f})" for s, n in cells)
        rows.append(f"| {name} | {lr:g} | {d32.mean().item():+.4f} | {shown} |")
        print(rows[-1], flush=True)
    if engine is not None:
        engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-vllm", dest="vllm", action="store_false", help="skip the vLLM column")
    args = parser.parse_args()
    start = time.perf_counter()
    smol = smollm2_path()
    header = "| model | lr | fp32 change (nats, mean of 6 demos) | policy in bf16: share (noise) |"
    header += " vLLM bf16 after sync |" if args.vllm else ""
    header += " final/ (merged in bf16) |"
    print(header + "\n|" + " --- |" * (header.count("|") - 1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure("SmolLM2-135M", smol, args.vllm)
        rows += measure("wide random (hidden 2048)", wide_standin(Path(tmp) / "wide", smol), args.vllm)
    print(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
