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
from types import SimpleNamespace

from openrlhf_ditto.cli.args import Parser, add_ditto_args, check_ranges, exit_codes, hierarchize, validate
from openrlhf_ditto.models import check_causal_lm, check_lora_targets, check_weights


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    g.add_argument(
        "--vllm.enable_prefix_caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="share the prompt's KV cache among its M samples (default: on; OpenRLHF's default is off)",
    )
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
    """What the Ray roles need on top of `validate`, each error naming the flag to change (ValueError)."""
    check_ranges(
        [
            ("--actor.num_nodes", args.actor.num_nodes, ">= 1", "default: 1"),
            ("--actor.num_gpus_per_node", args.actor.num_gpus_per_node, ">= 1", "default: 8"),
            ("--ref.num_nodes", args.ref.num_nodes, ">= 1", "default: 1"),
            ("--ref.num_gpus_per_node", args.ref.num_gpus_per_node, ">= 1", "default: 8"),
            ("--vllm.tensor_parallel_size", args.vllm.tensor_parallel_size, ">= 1", "default: 1"),
            ("--vllm.gpu_memory_utilization", args.vllm.gpu_memory_utilization, "(0, 1]", "default: 0.95"),
            ("--ds.zero_stage", args.ds.zero_stage, "[0, 3]", "default: 2"),
            ("--ds.zpg", args.ds.zpg, ">= 1", "default: 1"),
            ("--actor.adam.eps", args.actor.adam.eps, "> 0", "default: 1e-8"),
            ("--actor.min_lr_ratio", args.actor.min_lr_ratio, "[0, 1]", "default: 0.1"),
        ]
    )
    if args.vllm.sync_backend not in ("nccl", "gloo"):
        raise ValueError(f"--vllm.sync_backend {args.vllm.sync_backend}: give nccl (GPUs) or gloo")
    if args.ditto.sft_steps != 0:
        raise ValueError(
            "train_ditto_ray starts from an SFT checkpoint: run openrlhf.cli.train_sft on the demos "
            "(recipes/ditto_mistral7b.sh, stage 1) and pass its merged model with --ditto.sft_steps 0"
        )
    v, a, r = args.vllm, args.actor, args.ref
    if not v.num_engines or v.num_engines < 1:
        raise ValueError("DITTO samples with vLLM: give --vllm.num_engines >= 1")
    actor_gpus = a.num_nodes * a.num_gpus_per_node
    colocated = args.train.colocate_all or args.train.colocate_actor_ref
    if colocated and (a.num_nodes, a.num_gpus_per_node) != (r.num_nodes, r.num_gpus_per_node):
        raise ValueError(
            "a colocated reference runs one rank beside each policy rank: --ref.num_nodes and "
            "--ref.num_gpus_per_node must equal --actor.num_nodes and --actor.num_gpus_per_node"
        )
    if args.train.colocate_all and actor_gpus != v.num_engines * v.tensor_parallel_size:
        raise ValueError(
            f"--train.colocate_all puts one vLLM GPU on each policy GPU: --vllm.num_engines x "
            f"--vllm.tensor_parallel_size ({v.num_engines} x {v.tensor_parallel_size}) must equal --actor.num_nodes x "
            f"--actor.num_gpus_per_node ({actor_gpus})"
        )
    # DeepSpeed builds both roles' engines with train_batch_size = micro-batch x accumulation steps x ranks
    for role, gpus in (("policy", actor_gpus), ("reference", r.num_nodes * r.num_gpus_per_node)):
        if args.train.batch_size % (args.train.micro_batch_size * gpus):
            raise ValueError(
                f"--train.batch_size {args.train.batch_size} pairs must be a multiple of "
                f"--train.micro_batch_size x {role} GPUs ({args.train.micro_batch_size} x {gpus}): every rank runs "
                "the same number of micro-batches per step"
            )
    if args.ds.load_in_4bit:
        raise ValueError(
            "--ds.load_in_4bit cannot be used with DITTO: the vLLM engines hold pi_0 in bf16, so a 4-bit "
            "policy would sample with other weights than it trains, and its packed 4-bit weights cannot be merged "
            "into them; drop it (LoRA in bf16 is the paper's setting; --ds.zero_stage 3 or --ds.adam_offload save "
            "memory)"
        )
    if r.offload and args.ds.zero_stage != 3:
        raise ValueError(
            f"--ref.offload needs --ds.zero_stage 3: DeepSpeed offloads parameters only at ZeRO-3, and below "
            f"it OpenRLHF runs the reference at stage 0, where the flag does nothing (stage {args.ds.zero_stage} "
            "given); add --ds.zero_stage 3 or drop --ref.offload"
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
            ("shares the policy's GPUs" if shared else "own GPUs")
            + (", weights offloaded to CPU (ZeRO-3)" if r.offload else ""),
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


def resolve_model(name: str, dry_run: bool) -> Path:
    """--actor.model_name_or_path as an absolute local folder, checked before Ray, vLLM and DeepSpeed start: a
    folder as it is; a Hub id from this machine's Hugging Face cache (a dry run may fetch just its config and
    tokenizer files, which is all it reads)."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--actor.model_name_or_path {path} is not a Hugging Face model folder (no config.json)"
            )
        check_causal_lm(path, "--actor.model_name_or_path")
        return path.resolve()
    from huggingface_hub import snapshot_download

    get = "fetch it" if dry_run else "find it in this machine's Hugging Face cache"
    try:
        files = ["*.json", "*.model", "*.txt", "*.tiktoken"] if dry_run else None
        folder = Path(snapshot_download(name, allow_patterns=files, local_files_only=not dry_run))
        if not dry_run and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise FileNotFoundError(f"{folder} has no weights")
    except Exception as e:  # offline, no such repo, gated, not a repo id, an incomplete download: all mean the same
        raise FileNotFoundError(
            f"--actor.model_name_or_path {name} is not a local folder, and could not {get} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}). Download it first, e.g. `hf download "
            f"{name} --local-dir /shared/models/{name.rpartition('/')[2]}`, and pass that folder (the recipes: "
            "MODEL=/shared/models/...)"
        ) from None
    if not dry_run:  # a dry run fetched no weights
        check_weights(folder, "--actor.model_name_or_path")
    return folder


def resolve_paths(args) -> None:
    """Make every path absolute on the driver: Ray actors do not share its working directory (those of a cluster
    started with `ray start` run elsewhere), and they load the model and write checkpoints into the run folder."""
    args.actor.model_name_or_path = str(resolve_model(args.actor.model_name_or_path, args.dry_run))
    args.data.dataset = str(Path(args.data.dataset).expanduser().resolve())
    args.ckpt.output_dir = str(Path(args.ckpt.output_dir).expanduser().resolve())
    if args.ditto.extra_pairs:
        args.ditto.extra_pairs = str(Path(args.ditto.extra_pairs).expanduser().resolve())
    if args.logger.tensorboard_dir:
        args.logger.tensorboard_dir = str(Path(args.logger.tensorboard_dir).expanduser().resolve())


def filesystem(path: Path) -> str:
    """The type of the filesystem that holds `path` (its longest mount point in /proc/mounts), or "" if unknown."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    path = str(path)
    found = [(len(m), fs) for m, fs in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
    return max(found)[1] if found else ""


def dry_run(args) -> None:
    """Load the tokenizer and the demos as the run would; touch neither Ray nor a GPU."""
    from importlib.metadata import PackageNotFoundError, version

    from transformers import AutoTokenizer

    from openrlhf_ditto.memory import describe
    from openrlhf_ditto.trainer import check_run_folder, demos_and_store

    model = Path(args.actor.model_name_or_path)
    check_run_folder(args)
    if args.ds.lora.rank > 0:
        check_lora_targets(model, args.ds.lora.target_modules)
    store = demos_and_store(args, AutoTokenizer.from_pretrained(model))
    try:
        installed = version("openrlhf")
    except PackageNotFoundError:
        installed = "not installed"
    print(
        f"dry run ok: model {model}, {len(store.demos)} demos on {len(store.prompts)} prompts from "
        f"{args.data.dataset}, OpenRLHF {installed} (written for 0.11.2)"
    )
    print(describe(args, len(store.prompts), ray=True))
    if max(args.actor.num_nodes, args.ref.num_nodes) > 1:  # every node's actors read the model, write the run folder
        for flag, path in (("--actor.model_name_or_path", model), ("--ckpt.output_dir", Path(args.ckpt.output_dir))):
            fs = filesystem(path)
            if fs in ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs"):
                print(
                    f"warning: {flag} {path} is on a local {fs} filesystem, but the roles span several nodes: put it "
                    "on a filesystem every node mounts at the same path (NFS, Lustre, ...)",
                    file=sys.stderr,
                )


def parse_args(argv: list[str] | None = None) -> SimpleNamespace:
    """Flags in, a checked namespace with absolute paths out (or ValueError / FileNotFoundError saying why)."""
    args = hierarchize(build_parser().parse_args(argv))
    validate(args)
    validate_ray(args)
    resolve_paths(args)
    return args


def main(argv: list[str] | None = None) -> None:
    from openrlhf_ditto.trainer import train

    with exit_codes():
        args = parse_args(argv)
        print(resource_plan(args))
        if args.dry_run:
            dry_run(args)
            return
        from openrlhf_ditto.backends.openrlhf import build_openrlhf_backend

        final = train(args, lambda path: build_openrlhf_backend(args, path))
        print(f"DITTO model saved to {final}")


if __name__ == "__main__":
    main()
