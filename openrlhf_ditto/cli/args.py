"""Command-line flags shared by `openrlhf-ditto train` and `train_ditto_ray`, their checks, and both CLIs' error
handling (one-line errors, exit codes).

Names follow OpenRLHF 0.11.2's `train_ppo_ray` / `train_sft` (dotted groups, nested by `hierarchize`) wherever
OpenRLHF has the same setting; the `--ditto.*` group holds DITTO's own. Defaults are the paper's (Mistral-7B).
"""

import argparse
import contextlib
import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from openrlhf_ditto.models import check_weights
from openrlhf_ditto.schedules import lr_scheduler


@contextlib.contextmanager
def exit_codes():
    """The exit codes of both CLIs (README, "When things go wrong"): bad input of any kind (flags, paths, data,
    model folders) 2, with one line; a run that stopped 1, Ctrl-C 130, SIGTERM 143, with where it stands."""
    from openrlhf_ditto.runfolder import RunFolderError, RunStopped

    try:
        yield
    except (RunFolderError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunStopped as e:
        print(f"error: {e}" if e.exit_code == 1 else str(e), file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:  # before the run began (nothing written yet), or a second Ctrl-C while stopping
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (exit code 2, as argparse's): the usage of `train` is a screenful."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_ditto_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--actor.model_name_or_path",
        required=True,
        help="HF model folder or name to align (or an SFT checkpoint with --ditto.sft_steps 0)",
    )
    g.add_argument(
        "--actor.gradient_checkpointing_enable",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="trade compute for memory (default: train on a GPU: on, with a smaller --train.micro_batch_size if "
        "need be, when the step would not fit its free memory without it, README: Memory; else off)",
    )

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
        "--rollout.top_k",
        type=int,
        default=50,
        help="sample among the k likeliest tokens, -1: all (default: 50, as the official DITTO code samples: at "
        "temperature 1 with transformers' default top-k, which Mistral's generation config keeps; the full "
        "distribution's heavy tail makes a small model's samples easy to rank below the demos)",
    )
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
        help="pairs per forward/backward, of one user or several (--data.users); gradients accumulate to "
        "--train.batch_size (default: 8)",
    )
    g.add_argument(
        "--train.seed", type=int, default=42, help="seed of sampling, pair drawing and adapter init (default: 42)"
    )
    g.add_argument(
        "--actor.adam.lr",
        type=float,
        default=None,
        help="DITTO learning rate (default: 3e-5 with LoRA, 1e-6 full-parameter; paper: 1e-6, which bf16 rounds away "
        "with LoRA: README, bf16: does the update survive?)",
    )
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
    g.add_argument(
        "--ditto.ipo",
        action="store_true",
        help="use the IPO loss instead of DPO (on per-token mean log-probs, as TRL and the IPO paper)",
    )
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


def add_param_dtype_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ds.param_dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="dtype of the models and of vLLM (bf16 trains against fp32 master weights, as DeepSpeed's bf16 mode; "
        "bf16 runs on a CPU too) (default: bf16 on a GPU, fp32 on a CPU)",
    )


def hierarchize(args: argparse.Namespace) -> SimpleNamespace:
    """`args.actor.adam.lr` from the flat dest "actor.adam.lr", as OpenRLHF's `openrlhf.utils.config.hierarchize`;
    an unset --actor.adam.lr becomes 3e-5 with LoRA, 1e-6 full-parameter."""
    root: dict = {}
    for key, value in vars(args).items():
        *parents, leaf = key.split(".")
        node = root
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    def build(x):
        return SimpleNamespace(**{k: build(v) for k, v in x.items()}) if isinstance(x, dict) else x

    args = build(root)
    # the one default that depends on another flag: published LoRA practice is ~10x the full-parameter lr, and bf16
    # rounds a LoRA update at the paper's 1e-6 away (README, bf16: does the update survive?)
    if getattr(getattr(getattr(args, "actor", None), "adam", None), "lr", 0) is None:
        args.actor.adam.lr = 3e-5 if args.ds.lora.rank > 0 else 1e-6
    return args


def check_ranges(rows: list[tuple[str, float | None, str, str]]) -> None:
    """Refuse the first (flag, value, valid range, hint) whose value lies outside its range ("> 0", ">= 1",
    "[0, 1)", "finite"; a value of None is the flag's unset default). NaN and inf lie outside every range."""
    for flag, value, valid, hint in rows:
        if value is None:
            continue
        if valid == "finite":
            ok = True
        elif valid[0] in "[(":
            low, high = (float(x) for x in valid[1:-1].split(","))
            ok = (low <= value if valid[0] == "[" else low < value) and (
                value <= high if valid[-1] == "]" else value < high
            )
        else:
            op, bound = valid.split()
            ok = value > float(bound) if op == ">" else value >= float(bound)
        if not (ok and math.isfinite(value)):
            shown = f"{value:g}" if isinstance(value, float) else value
            raise ValueError(f"{flag} {shown}: must be {'in ' if valid[0] in '[(' else ''}{valid} ({hint})")


def check_input_template(template: str | None) -> None:
    """--data.input_template places the prompt at its one "{}" (str.format): without one every prompt would render
    the same text, and other fields ("{question}") fail in the middle of loading the demos."""
    try:
        ok = template is None or template.format("\0").count("\0") == 1
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"--data.input_template {template!r}: put {{}} where the prompt goes, once, e.g. "
            '"User: {}\\nAssistant: " (and write other braces twice: {{ and }})'
        )


def validate(args: SimpleNamespace) -> None:
    """Refuse impossible settings before any work starts, naming the flag and its valid range (ValueError)."""
    a, d, r, t, lora = args.actor, args.ditto, args.rollout, args.train, args.ds.lora
    check_ranges(
        [
            ("--rollout.n_samples_per_prompt", r.n_samples_per_prompt, ">= 1", "paper: 10"),
            ("--rollout.max_new_tokens", r.max_new_tokens, ">= 1", "default: 512"),
            ("--rollout.temperature", r.temperature, "> 0", "default: 1.0"),
            ("--rollout.top_p", r.top_p, "(0, 1]", "default: 1.0"),
            ("--rollout.top_k", r.top_k, ">= -1", "-1: off; default: 50"),
            ("--rollout.micro_batch_size", r.micro_batch_size, ">= 1", "default: 8"),
            ("--train.batch_size", t.batch_size, ">= 1", "paper: 24"),
            ("--train.micro_batch_size", t.micro_batch_size, ">= 1", "default: 8"),
            ("--train.seed", t.seed, ">= 0", "default: 42"),
            ("--actor.adam.lr", a.adam.lr, "> 0", "default: 3e-5 with LoRA, 1e-6 full-parameter"),
            *(("--actor.adam.betas", beta, "[0, 1)", "default: 0.9 0.95") for beta in a.adam.betas),
            ("--actor.adam.weight_decay", a.adam.weight_decay, ">= 0", "default: 0"),
            ("--actor.lr_warmup_ratio", a.lr_warmup_ratio, "[0, 1]", "paper: 0.25"),
            ("--actor.max_norm", a.max_norm, "> 0", "default: 1.0"),
            ("--ds.lora.rank", lora.rank, ">= 0", "paper: 32; 0 trains all parameters"),
            ("--ds.lora.alpha", lora.alpha, ">= 1", "paper: 64"),
            ("--ds.lora.dropout", lora.dropout, "[0, 1)", "default: 0"),
            ("--ditto.sft_steps", d.sft_steps, ">= 0", "paper: 30; 0 skips SFT"),
            ("--ditto.sft_stop_loss", d.sft_stop_loss, ">= 0", "paper: 1.0"),
            ("--ditto.sft_lr", d.sft_lr, "> 0", "paper: 3e-5"),
            ("--ditto.sft_warmup_ratio", d.sft_warmup_ratio, "[0, 1]", "paper: 0.2"),
            ("--ditto.iterations", d.iterations, ">= 1", "paper: 4"),
            ("--ditto.resample_every", d.resample_every, ">= 1", "paper: 10"),
            ("--ditto.beta", d.beta, "> 0", "paper: 0.05"),
            ("--ditto.label_smoothing", d.label_smoothing, "[0, 0.5)", "default: 0, plain DPO; 0.5 learns nothing"),
            ("--ditto.nll_coef", d.nll_coef, ">= 0", "default: 0"),
            ("--ditto.val_demos", d.val_demos, ">= 0", "default: 0, none held out"),
            ("--ckpt.max_num", args.ckpt.max_num, ">= 1", "default: 3"),
        ]
    )
    check_input_template(args.data.input_template)
    f = d.pair_fractions
    if len(f) not in (3, 4) or not all(0 <= x <= 1 for x in f) or abs(sum(f) - 1) > 1e-6:
        raise ValueError(
            f"--ditto.pair_fractions {' '.join(map(str, f))}: give 3 shares (online, replay, inter-model; "
            "paper: 0.7 0.2 0.1) or 4 (and external pairs, e.g. 0.6 0.2 0.1 0.1), each >= 0, summing to 1"
        )
    external = len(f) == 4 and f[3] > 0
    if external != bool(d.extra_pairs):
        raise ValueError(
            "external pairs need both --ditto.extra_pairs FILE and a fourth --ditto.pair_fractions share, e.g. "
            "0.6 0.2 0.1 0.1"
        )
    if r.max_new_tokens >= args.data.max_len:
        raise ValueError(
            f"--rollout.max_new_tokens {r.max_new_tokens} leaves no room for the prompt in --data.max_len "
            f"{args.data.max_len}; the prompt budget is max_len - max_new_tokens: raise --data.max_len"
        )
    # built here on a stand-in optimiser, so that a name the backends cannot build fails now, not after SFT
    for flag, name, ratio, steps in (
        ("--ditto.sft_lr_scheduler", d.sft_lr_scheduler, d.sft_warmup_ratio, d.sft_steps),
        ("--actor.lr_scheduler", a.lr_scheduler, a.lr_warmup_ratio, d.iterations * d.resample_every),
    ):
        try:
            optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            lr_scheduler(name, optimizer, ratio, max(steps, 1), getattr(a, "min_lr_ratio", None))
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{flag} {name}: {str(e).splitlines()[0][:300]}; give a transformers schedule that needs no "
                "other settings: constant_with_warmup, cosine, linear, polynomial, ..."
            ) from None
    if args.logger.wandb.key and importlib.util.find_spec("wandb") is None:
        raise ValueError("--logger.wandb.key needs W&B's client: pip install wandb (or leave out --logger.wandb.key)")
    if d.val_demos and d.val_dataset:
        raise ValueError("--ditto.val_demos and --ditto.val_dataset both hold demos out: give one of them")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues a run and --overwrite deletes it: give one of them")
    check_weights(args.actor.model_name_or_path, "--actor.model_name_or_path")
    if args.resume:  # a resumed run loads the run's pi_0 in place of the model
        check_weights(Path(args.ckpt.output_dir) / "reference", "--resume: the run's pi_0")
    if not (getattr(args.data, "users", False) or getattr(args.data, "user_key", None)):  # train_ditto_ray has neither
        from openrlhf_ditto.demos import users_hint  # transformers: not for --help

        hint = users_hint(args.data.dataset, args.data.input_key)
        if hint:
            print(hint, file=sys.stderr)
