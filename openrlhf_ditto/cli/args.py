"""Command-line flags shared by `openrlhf-ditto train` and `train_ditto_ray`.

Names follow OpenRLHF 0.11.2's `train_ppo_ray` / `train_sft` (dotted groups, nested by `hierarchize`) wherever
OpenRLHF has the same setting; the `--ditto.*` group holds DITTO's own. Defaults are the paper's (Mistral-7B).
"""

import argparse
from types import SimpleNamespace


def add_ditto_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--actor.model_name_or_path",
        required=True,
        help="HF model folder or name to align (or an SFT checkpoint with --ditto.sft_steps 0)",
    )
    g.add_argument("--actor.gradient_checkpointing_enable", action="store_true", help="trade compute for memory")

    g = parser.add_argument_group("data: the demonstrations")
    g.add_argument("--data.dataset", required=True, help="demos: a JSON/JSONL/Parquet/CSV file or a dataset folder")
    g.add_argument("--data.input_key", default="prompt", help="record key of the prompt (default: prompt)")
    g.add_argument("--data.output_key", default="response", help="record key of the demo response (default: response)")
    g.add_argument("--data.input_template", default=None, help='prompt template, e.g. "User: {}\\nAssistant: "')
    g.add_argument(
        "--data.apply_chat_template", action="store_true", help="render prompts with the tokenizer's chat template"
    )
    g.add_argument("--data.max_len", type=int, default=2048, help="max tokens of prompt + response (default: 2048)")
    g.add_argument(
        "--data.prompt_key",
        default=None,
        help="--ditto.extra_pairs: key of the prompt, as train_dpo's (default: none; chat records use the chosen "
        "conversation minus its last message)",
    )
    g.add_argument(
        "--data.chosen_key", default="chosen", help="--ditto.extra_pairs: key of the chosen response (default: chosen)"
    )
    g.add_argument(
        "--data.rejected_key",
        default="rejected",
        help="--ditto.extra_pairs: key of the rejected response (default: rejected)",
    )

    g = parser.add_argument_group("rollout: sampling from the current policy")
    g.add_argument(
        "--rollout.n_samples_per_prompt",
        type=int,
        default=10,
        help="M, samples per demo prompt per iteration (paper: 10)",
    )
    g.add_argument(
        "--rollout.max_new_tokens",
        type=int,
        default=512,
        help="response token budget; longer demos are cut, samples reaching it are kept as truncated (default: 512)",
    )
    g.add_argument("--rollout.temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    g.add_argument("--rollout.top_p", type=float, default=1.0, help="nucleus sampling top_p (default: 1.0)")
    g.add_argument(
        "--rollout.micro_batch_size",
        type=int,
        default=8,
        help="sequences per reference forward when scoring (default: 8)",
    )

    g = parser.add_argument_group("train")
    g.add_argument(
        "--train.batch_size", type=int, default=24, help="ranked pairs per optimiser step (paper: 8 prompts x 3 = 24)"
    )
    g.add_argument(
        "--train.micro_batch_size",
        type=int,
        default=8,
        help="pairs per forward/backward; gradients accumulate to --train.batch_size (default: 8)",
    )
    g.add_argument(
        "--train.seed", type=int, default=42, help="seed of sampling, pair drawing and adapter init (default: 42)"
    )
    g.add_argument("--actor.adam.lr", type=float, default=1e-6, help="DITTO learning rate (paper: 1e-6)")
    g.add_argument(
        "--actor.adam.betas", type=float, nargs=2, default=(0.9, 0.95), help="Adam betas (default: 0.9 0.95)"
    )
    g.add_argument("--actor.adam.weight_decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument(
        "--actor.lr_scheduler",
        default="constant_with_warmup",
        help="DITTO lr schedule, a transformers scheduler name (paper: constant_with_warmup)",
    )
    g.add_argument(
        "--actor.lr_warmup_ratio",
        type=float,
        default=0.25,
        help="DITTO warm-up steps as a fraction of all DITTO steps (paper: 0.25)",
    )
    g.add_argument("--actor.max_norm", type=float, default=1.0, help="gradient clipping norm (default: 1.0)")

    g = parser.add_argument_group("LoRA")
    g.add_argument("--ds.lora.rank", type=int, default=32, help="LoRA rank; 0 trains all parameters (paper: 32)")
    g.add_argument("--ds.lora.alpha", type=int, default=64, help="LoRA alpha (paper: 64)")
    g.add_argument(
        "--ds.lora.target_modules",
        nargs="*",
        default=["q_proj", "k_proj", "v_proj", "o_proj"],
        help="modules LoRA adapts (paper: q_proj k_proj v_proj o_proj)",
    )
    g.add_argument("--ds.lora.dropout", type=float, default=0.0, help="LoRA dropout (default: 0)")

    g = parser.add_argument_group("ditto: the algorithm")
    g.add_argument(
        "--ditto.sft_steps",
        type=int,
        default=30,
        help="max SFT warm-start steps on the demos; 0 starts from the given model as pi_0 (paper: 30)",
    )
    g.add_argument(
        "--ditto.sft_stop_loss", type=float, default=1.0, help="stop SFT once the demo loss is below this (paper: 1.0)"
    )
    g.add_argument("--ditto.sft_lr", type=float, default=3e-5, help="SFT learning rate (paper: 3e-5)")
    g.add_argument(
        "--ditto.sft_lr_scheduler",
        default="cosine",
        help="SFT lr schedule over --ditto.sft_steps, a transformers scheduler name (paper: cosine)",
    )
    g.add_argument(
        "--ditto.sft_warmup_ratio",
        type=float,
        default=0.2,
        help="SFT warm-up steps as a fraction of --ditto.sft_steps (paper: 0.2)",
    )
    g.add_argument(
        "--ditto.iterations", type=int, default=4, help="sample-then-train iterations (paper: 40 steps / 10 = 4)"
    )
    g.add_argument(
        "--ditto.resample_every",
        type=int,
        default=10,
        help="optimiser steps per iteration before resampling (paper: 10)",
    )
    g.add_argument(
        "--ditto.pair_fractions",
        type=float,
        nargs="+",
        default=(0.7, 0.2, 0.1),
        metavar="SHARE",
        help="shares of online, replay and inter-model pairs per batch, and a fourth of external pairs with "
        "--ditto.extra_pairs; must sum to 1 (paper: 0.7 0.2 0.1)",
    )
    g.add_argument(
        "--ditto.extra_pairs",
        default=None,
        help="your own preference pairs, mixed into every batch at the fourth --ditto.pair_fractions share: a file "
        "as train_dpo reads it (--data.prompt_key, --data.chosen_key, --data.rejected_key)",
    )
    g.add_argument("--ditto.beta", type=float, default=0.05, help="DPO beta (paper: 0.05)")
    g.add_argument(
        "--ditto.label_smoothing", type=float, default=0.0, help="cDPO label smoothing (default: 0, plain DPO)"
    )
    g.add_argument("--ditto.ipo", action="store_true", help="use the IPO loss instead of DPO")
    g.add_argument(
        "--ditto.nll_coef", type=float, default=0.0, help="weight of an NLL term on the demos' tokens (default: 0)"
    )
    g.add_argument(
        "--ditto.val_demos",
        type=int,
        default=0,
        help="hold the last K demos out of training and log DITTO's implicit reward on them after every iteration "
        "(val/ in the logs: judge-free model selection; default: 0, none)",
    )
    g.add_argument(
        "--ditto.val_dataset",
        default=None,
        help="validate on your own held-out examples instead (a file read as the demos are); no demo is held out",
    )
    g.add_argument(
        "--ditto.keep_best",
        action="store_true",
        help="final/ is the iteration (pi_0 included) with the best held-out margin, not the last; needs "
        "--ditto.val_demos or --ditto.val_dataset",
    )

    g = parser.add_argument_group("logging and checkpoints")
    g.add_argument(
        "--ckpt.output_dir",
        default="./ditto_run",
        help="run folder: reference, samples, checkpoints, final model, logs",
    )
    g.add_argument(
        "--resume",
        "--ckpt.load_enable",
        dest="resume",
        action="store_true",
        help="continue the run in --ckpt.output_dir from its last checkpoint",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="delete a previous run in --ckpt.output_dir and start again"
    )
    g.add_argument("--ckpt.max_num", type=int, default=3, help="checkpoints kept, newest first (default: 3)")
    g.add_argument("--logger.tensorboard_dir", default=None, help="TensorBoard folder (default: <output_dir>/logs)")
    g.add_argument("--logger.wandb.key", default=None, help="W&B API key; logging to W&B is on when given")
    g.add_argument("--logger.wandb.project", default="openrlhf_ditto", help="W&B project")
    g.add_argument("--logger.wandb.run_name", default="ditto", help="W&B run name")


def hierarchize(args: argparse.Namespace) -> SimpleNamespace:
    """`args.actor.adam.lr` from the flat dest "actor.adam.lr", as OpenRLHF's `openrlhf.utils.config.hierarchize`."""
    root: dict = {}
    for key, value in vars(args).items():
        *parents, leaf = key.split(".")
        node = root
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    def build(x):
        return SimpleNamespace(**{k: build(v) for k, v in x.items()}) if isinstance(x, dict) else x

    return build(root)


def validate(args: SimpleNamespace) -> None:
    """Refuse impossible settings before any work starts, saying which flag to change."""
    f = args.ditto.pair_fractions
    if len(f) not in (3, 4) or min(f) < 0 or abs(sum(f) - 1) > 1e-6:
        raise SystemExit(
            f"error: --ditto.pair_fractions {' '.join(map(str, f))}: give 3 shares (online, replay, inter-model; "
            "paper: 0.7 0.2 0.1) or 4 (and external pairs, e.g. 0.6 0.2 0.1 0.1), each >= 0, summing to 1"
        )
    external = len(f) == 4 and f[3] > 0
    if external != bool(args.ditto.extra_pairs):
        raise SystemExit(
            "error: external pairs need both --ditto.extra_pairs FILE and a fourth --ditto.pair_fractions share, e.g. "
            "0.6 0.2 0.1 0.1"
        )
    if args.rollout.n_samples_per_prompt < 1:
        raise SystemExit(
            f"error: --rollout.n_samples_per_prompt (M) is {args.rollout.n_samples_per_prompt}; it must be >= 1 "
            "(paper: 10)"
        )
    if args.rollout.max_new_tokens >= args.data.max_len:
        raise SystemExit(
            f"error: --rollout.max_new_tokens {args.rollout.max_new_tokens} leaves no room for the prompt in "
            f"--data.max_len {args.data.max_len}; the prompt budget is max_len - max_new_tokens: raise --data.max_len"
        )
    for flag, value in [
        ("--ditto.iterations", args.ditto.iterations),
        ("--ditto.resample_every", args.ditto.resample_every),
        ("--train.batch_size", args.train.batch_size),
        ("--train.micro_batch_size", args.train.micro_batch_size),
        ("--ckpt.max_num", args.ckpt.max_num),
    ]:
        if value < 1:
            raise SystemExit(f"error: {flag} is {value}; it must be >= 1")
    if args.ditto.val_demos < 0 or (args.ditto.val_demos and args.ditto.val_dataset):
        raise SystemExit(
            f"error: --ditto.val_demos is {args.ditto.val_demos}; hold out K >= 1 demos, or give --ditto.val_dataset "
            "(not both)"
        )
    if args.ditto.keep_best and not (args.ditto.val_demos or args.ditto.val_dataset):
        raise SystemExit(
            "error: --ditto.keep_best picks the iteration with the best held-out signal: give --ditto.val_demos K "
            "or --ditto.val_dataset FILE"
        )
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume continues a run and --overwrite deletes it: give one of them")
