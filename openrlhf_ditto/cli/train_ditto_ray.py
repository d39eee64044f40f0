"""`python -m openrlhf_ditto.cli.train_ditto_ray`: DITTO on OpenRLHF 0.11.2's Ray roles (GPU cluster).

Flags: the DITTO flags of `openrlhf-ditto train` (cli/args.py), plus OpenRLHF 0.11.2 `train_ppo_ray`'s own flags,
same names and defaults, for what DITTO shares with it: where the policy (actor), the reference and the vLLM
engines run, colocation and sleep modes, DeepSpeed. Start from an SFT checkpoint (openrlhf.cli.train_sft on the
demos, then openrlhf.cli.lora_combiner; see recipes/ditto_mistral7b.sh): --ditto.sft_steps is 0 here.
--dry_run checks the flags, the model folder and the demos, and prints where each role would run, without Ray.
"""

import argparse
import sys
from pathlib import Path

from openrlhf_ditto.cli.args import add_ditto_args, hierarchize, validate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openrlhf_ditto.cli.train_ditto_ray",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_ditto_args(parser)
    parser.set_defaults(**{"ditto.sft_steps": 0})
    parser.add_argument("--dry_run", action="store_true", help="check everything and print the resource plan; no Ray")

    g = parser.add_argument_group("ray: where the roles run (OpenRLHF train_ppo_ray's flags)")
    g.add_argument("--actor.num_nodes", type=int, default=1, help="number of nodes for actor")
    g.add_argument("--actor.num_gpus_per_node", type=int, default=8, help="number of gpus per node for actor")
    g.add_argument("--ref.num_nodes", type=int, default=1, help="number of nodes for reference")
    g.add_argument("--ref.num_gpus_per_node", type=int, default=8, help="number of gpus per node for reference")
    g.add_argument(
        "--train.colocate_actor_ref",
        action="store_true",
        default=False,
        help="whether to colocate reference and actor model, if true, they will share same gpus.",
    )
    g.add_argument(
        "--train.colocate_all",
        action="store_true",
        default=False,
        help="whether to colocate all models (including vLLM engines), if true, they will share same gpus.",
    )
    g.add_argument("--ref.offload", action="store_true", default=False, help="Offload reference model to CPU")

    g = parser.add_argument_group("vllm: the rollout engines")
    g.add_argument("--vllm.num_engines", type=int, default=None, help="number of vLLM Engines (DITTO needs >= 1)")
    g.add_argument(
        "--vllm.tensor_parallel_size",
        type=int,
        default=1,
        help="tensor parallel size of vLLM Engine for multi-GPU inference",
    )
    g.add_argument("--vllm.sync_backend", type=str, default="nccl", help="DeepSpeed -> vLLM weight sync backend")
    g.add_argument("--vllm.sync_with_ray", action="store_true", default=False)
    g.add_argument("--vllm.enable_prefix_caching", action="store_true", default=False)
    g.add_argument("--vllm.enforce_eager", action="store_true", default=False, help="Disable CUDA graph in vLLM")
    g.add_argument(
        "--vllm.enable_sleep",
        action="store_true",
        default=False,
        help="Enable sleep mode for vLLM when using --train.colocate_all",
    )
    g.add_argument("--vllm.gpu_memory_utilization", type=float, default=0.95, help="vLLM gpu_memory_utilization")

    g = parser.add_argument_group("ds: DeepSpeed")
    g.add_argument("--ds.zero_stage", type=int, default=2, help="DeepSpeed ZeRO stage")
    g.add_argument("--ds.param_dtype", type=str, default="bf16", choices=["bf16", "fp16"], help="Model data type")
    g.add_argument("--ds.zpg", type=int, default=1, help="ZeRO++ max partition size")
    g.add_argument("--ds.adam_offload", action="store_true", default=False, help="Offload Adam Optimizer")
    g.add_argument("--ds.attn_implementation", type=str, default="flash_attention_2", help="Attention implementation")
    g.add_argument("--ds.use_liger_kernel", action="store_true", default=False, help="Enable Liger Kernel")
    g.add_argument("--ds.grad_accum_dtype", type=str, default=None, help="Adam grad accum data type")
    g.add_argument("--ds.overlap_comm", action="store_true", default=False)
    g.add_argument(
        "--ds.enable_sleep",
        action="store_true",
        default=False,
        help="Enable sleep mode for deepspeed when using --train.colocate_all",
    )
    g.add_argument("--ds.load_in_4bit", action="store_true", default=False)
    g.add_argument("--actor.gradient_checkpointing_reentrant", action="store_true", default=False)
    g.add_argument("--actor.adam.eps", type=float, default=1e-8)
    g.add_argument("--actor.min_lr_ratio", type=float, default=0.1)
    g.add_argument(
        "--train.full_determinism_enable",
        action="store_true",
        default=False,
        help="Enable reproducible behavior during distributed training",
    )
    return parser


def validate_ray(args) -> None:
    """What the Ray roles need on top of `validate`, each error naming the flag to change."""
    if args.ditto.sft_steps != 0:
        raise SystemExit(
            "error: train_ditto_ray starts from an SFT checkpoint: run openrlhf.cli.train_sft on the demos "
            "(recipes/ditto_mistral7b.sh, stage 1) and pass its merged model with --ditto.sft_steps 0"
        )
    v, a, r = args.vllm, args.actor, args.ref
    if not v.num_engines or v.num_engines < 1:
        raise SystemExit("error: DITTO samples with vLLM: give --vllm.num_engines >= 1")
    actor_gpus = a.num_nodes * a.num_gpus_per_node
    colocated = args.train.colocate_all or args.train.colocate_actor_ref
    if colocated and (a.num_nodes, a.num_gpus_per_node) != (r.num_nodes, r.num_gpus_per_node):
        raise SystemExit(
            "error: a colocated reference runs one rank beside each policy rank: --ref.num_nodes and "
            "--ref.num_gpus_per_node must equal --actor.num_nodes and --actor.num_gpus_per_node"
        )
    if args.train.colocate_all and actor_gpus != v.num_engines * v.tensor_parallel_size:
        raise SystemExit(
            f"error: --train.colocate_all puts one vLLM GPU on each policy GPU: --vllm.num_engines x "
            f"--vllm.tensor_parallel_size ({v.num_engines} x {v.tensor_parallel_size}) must equal --actor.num_nodes x "
            f"--actor.num_gpus_per_node ({actor_gpus})"
        )
    # DeepSpeed builds both roles' engines with train_batch_size = micro-batch x accumulation steps x ranks
    for role, gpus in (("policy", actor_gpus), ("reference", r.num_nodes * r.num_gpus_per_node)):
        if args.train.batch_size % (args.train.micro_batch_size * gpus):
            raise SystemExit(
                f"error: --train.batch_size {args.train.batch_size} pairs must be a multiple of "
                f"--train.micro_batch_size x {role} GPUs ({args.train.micro_batch_size} x {gpus}): every rank runs "
                "the same number of micro-batches per step"
            )
    if v.enable_sleep and not args.train.colocate_all:  # as train_ppo_ray does
        print("Set args.vllm.enable_sleep to False when args.train.colocate_all is disabled.")
        v.enable_sleep = False


def resource_plan(args) -> str:
    """Which role runs on which GPUs, numbered 0.. over the whole job (Ray picks the nodes)."""
    a, r, v, t = args.actor, args.ref, args.vllm, args.train

    def span(first, count):
        return f"GPU {first}" if count == 1 else f"GPUs {first}-{first + count - 1}"

    actor_gpus = a.num_nodes * a.num_gpus_per_node
    ref_gpus = r.num_nodes * r.num_gpus_per_node
    vllm_gpus = v.num_engines * v.tensor_parallel_size
    lora = f"LoRA r={args.ds.lora.rank} alpha={args.ds.lora.alpha}" if args.ds.lora.rank else "all parameters"
    rows = [
        (
            "policy",
            "DittoPolicyActor",
            f"{a.num_nodes} node(s) x {a.num_gpus_per_node}",
            span(0, actor_gpus),
            f"ZeRO-{args.ds.zero_stage}, {lora}"
            + (", states offloaded while sampling" if args.ds.enable_sleep else ""),
        )
    ]
    shared = t.colocate_all or t.colocate_actor_ref
    ref_first = 0 if shared else actor_gpus
    rows.append(
        (
            "reference",
            "ReferenceModelActor",
            f"{r.num_nodes} node(s) x {r.num_gpus_per_node}",
            span(ref_first, ref_gpus),
            ("shares the policy's GPUs" if shared else "own GPUs") + (", offloaded" if r.offload else ""),
        )
    )
    vllm_first = 0 if t.colocate_all else ref_first + ref_gpus if not shared else actor_gpus
    rows.append(
        (
            "rollout",
            "vLLM RolloutRayActor",
            f"{v.num_engines} engine(s) x TP {v.tensor_parallel_size}",
            span(vllm_first, vllm_gpus),
            ("shares the policy's GPUs" if t.colocate_all else "own GPUs")
            + (", sleeps between iterations" if v.enable_sleep else ""),
        )
    )
    total = max(vllm_first + vllm_gpus, ref_first + ref_gpus, actor_gpus)
    gas = args.train.batch_size // (args.train.micro_batch_size * actor_gpus)
    lines = ["DITTO on OpenRLHF: resource plan"]
    lines += [f"  {role:<9} {cls:<21} {size:<22} {gpus:<10} {note}" for role, cls, size, gpus, note in rows]
    lines.append(f"  total: {total} GPU(s)")
    lines.append(
        f"  each step: {args.train.batch_size} pairs = {actor_gpus} rank(s) x {gas} micro-batch(es) x "
        f"{args.train.micro_batch_size} pairs; {args.ditto.iterations} iterations x {args.ditto.resample_every} "
        f"steps, M={args.rollout.n_samples_per_prompt} samples per demo prompt"
    )
    return "\n".join(lines)


def dry_run(args) -> None:
    """Load the tokenizer and the demos as the run would; touch neither Ray nor a GPU."""
    from importlib.metadata import PackageNotFoundError, version

    from transformers import AutoTokenizer

    from openrlhf_ditto.trainer import demos_and_store

    model = Path(args.actor.model_name_or_path)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"--actor.model_name_or_path {model} is not a Hugging Face model folder (config.json)")
    store = demos_and_store(args, AutoTokenizer.from_pretrained(model))
    try:
        installed = version("openrlhf")
    except PackageNotFoundError:
        installed = "not installed"
    print(
        f"dry run ok: model {model}, {len(store.demos)} demos on {len(store.prompts)} prompts from "
        f"{args.data.dataset}, OpenRLHF {installed} (written for 0.11.2)"
    )


def main(argv: list[str] | None = None) -> None:
    args = hierarchize(build_parser().parse_args(argv))
    validate(args)
    validate_ray(args)
    print(resource_plan(args))
    from openrlhf_ditto.trainer import RunFolderError, train

    try:
        if args.dry_run:
            dry_run(args)
            return
        from openrlhf_ditto.backends.openrlhf import build_openrlhf_backend

        final = train(args, lambda path: build_openrlhf_backend(args, path))
        print(f"DITTO model saved to {final}")
    except (RunFolderError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
