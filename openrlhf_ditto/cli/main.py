"""The `openrlhf-ditto` command: `train` (DITTO on one machine), `quickstart` (a demo on SmolLM2-135M), `eval`
(pairwise win rates on held-out prompts), `serve-reward` (DITTO's reward for OpenRLHF PPO/GRPO) and `export-pairs`
(DITTO's pairs for OpenRLHF DPO)."""

import argparse
import math
import sys
from pathlib import Path

from openrlhf_ditto import __version__
from openrlhf_ditto.cli.args import (
    Parser,
    add_ditto_args,
    add_param_dtype_arg,
    check_input_template,
    check_ranges,
    exit_codes,
    hierarchize,
    validate,
)
from openrlhf_ditto.pairs import KINDS
from openrlhf_ditto.presets import PRESETS


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="openrlhf-ditto", description="DITTO: align a language model to a handful of demonstrations.")
    parser.add_argument("--version", action="version", version=f"openrlhf-ditto {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,quickstart,eval,serve-reward,export-pairs}")
    train = sub.add_parser("train", help="run DITTO on one machine (CPU or one GPU)", description=__doc__)
    train.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="settings measured for a kind of model, which the flags you give override: small (~100M parameters, "
        "e.g. SmolLM2-135M; README: Does DITTO beat SFT?) (default: none, the paper's settings for 7B)",
    )
    add_ditto_args(train)
    train.add_argument(
        "--dry_run", action="store_true", help="check the flags and demos, print the memory plan, and stop"
    )
    add_param_dtype_arg(train.add_argument_group("precision"))
    g = train.add_argument_group("rollout engine: what samples from the policy, in this process")
    g.add_argument(
        "--rollout.engine",
        choices=("auto", "torch", "vllm"),
        default="auto",
        help="vllm: a vLLM engine beside the policy, loading its weights after each update (as TRL's colocated "
        "mode); torch: our batched sampler; auto: vllm on a GPU when vLLM is installed, else torch (default: auto)",
    )
    g.add_argument(
        "--vllm.gpu_memory_utilization",
        type=float,
        default=None,
        help="vllm: its share of the GPU's memory, beside the policy's (default: 0.3); on a CPU, the share of RAM "
        "for its KV cache (default: 0.1)",
    )
    g.add_argument(
        "--vllm.enable_sleep",
        action="store_true",
        help="vllm on a GPU: free its KV cache and move its weights to CPU memory while the policy trains",
    )
    g = train.add_argument_group("many users: one DITTO adapter per user against one resident base model")
    g.add_argument(
        "--data.users",
        action="store_true",
        help="--data.dataset is a folder of demo files, one per user (the file's stem is the user's id)",
    )
    g.add_argument(
        "--data.user_key",
        default=None,
        help="--data.dataset holds many users: the record key of the user's id (implies --data.users)",
    )
    quick = sub.add_parser(
        "quickstart", help="DITTO on SmolLM2-135M-Instruct with bundled demos (offline, a few minutes on 2 CPU cores)"
    )
    quick.add_argument("--output_dir", default="./ditto_quickstart", help="run folder (model, report, plot)")
    quick.add_argument("--overwrite", action="store_true", help="delete a previous quick start in --output_dir")
    quick.add_argument("--resume", action="store_true", help="continue an interrupted quick start")
    add_eval_args(
        sub.add_parser("eval", help="did DITTO work? pairwise win rates of the run and baselines on held-out prompts")
    )
    add_serve_reward_args(
        sub.add_parser(
            "serve-reward",
            help="serve DITTO's reward beta * (log pi - log pi_ref) as a remote reward model for OpenRLHF PPO/GRPO",
        )
    )
    export = sub.add_parser("export-pairs", help="write DITTO's ranked pairs as OpenRLHF train_dpo records (JSONL)")
    export.add_argument("run", help="the run folder (--ckpt.output_dir of `openrlhf-ditto train`)")
    export.add_argument("--out", required=True, help="the JSONL file to write (outside any run folder)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument("--num", type=int, default=None, help="pairs to draw (default: as many as the run trained on)")
    export.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=None,
        help="pair kinds to export, in the run's proportions (default: all)",
    )
    export.add_argument("--seed", type=int, default=42, help="seed of the pair drawing (default: 42)")
    return parser


def validate_export(ns: argparse.Namespace) -> None:
    check_ranges(
        [
            ("--num", ns.num, ">= 1", "default: as many as the run trained on"),
            ("--seed", ns.seed, ">= 0", "default: 42"),
        ]
    )


def _mix_entry(text: str) -> tuple[str, float]:
    url, _, weight = text.rpartition("=")
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not url.startswith(("http://", "https://")) or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not URL=WEIGHT, e.g. http://rm:5000/get_reward=1.0")
    return url, value


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="the run folder (--ckpt.output_dir of `openrlhf-ditto train`)")
    parser.add_argument(
        "--conditions",
        nargs="+",
        default=None,
        metavar="CONDITION",
        help="what to compare: zero-shot (the run's base model), few-shot (it, with the run's demos in context), sft "
        "(the run's pi_0), ditto (its final model), or NAME=HF_FOLDER (default: zero-shot few-shot sft ditto)",
    )
    parser.add_argument("--output_dir", default=None, help="generations, judgments and report (default: RUN/eval)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the sampling (default: 42)")
    g = parser.add_argument_group("data: held-out prompts with the user's own responses")
    g.add_argument("--data.dataset", required=True, help="a JSON/JSONL/Parquet/CSV file or a dataset folder")
    g.add_argument("--data.input_key", default=None, help="record key of the prompt (default: the run's)")
    g.add_argument("--data.output_key", default=None, help="record key of the user's response (default: the run's)")
    g.add_argument("--data.input_template", default=None, help="prompt template (default: the run's)")
    g.add_argument(
        "--data.apply_chat_template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render prompts with the tokenizer's chat template (default: as the run did)",
    )
    g.add_argument(
        "--data.user_key",
        default=None,
        help="a multi-user run: the record key of the user's id in --data.dataset (default: the run's; without one, "
        "--data.dataset is a folder of held-out files named by user id)",
    )
    g.add_argument(
        "--few_shot.k",
        type=int,
        default=None,
        help="demos in the few-shot prompt (default: all the run's, as the paper)",
    )
    g = parser.add_argument_group("rollout: samples per condition")
    g.add_argument("--rollout.n_samples_per_prompt", type=int, default=3, help="N per prompt and condition (paper: 3)")
    g.add_argument("--rollout.max_new_tokens", type=int, default=None, help="response budget (default: the run's)")
    g.add_argument("--rollout.temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0)")
    g.add_argument("--rollout.top_p", type=float, default=1.0, help="nucleus sampling top_p (default: 1.0)")
    g.add_argument(
        "--rollout.top_k",
        type=int,
        default=50,
        help="sample among the k likeliest tokens, -1: all (default: 50, as train and the official DITTO code)",
    )
    g.add_argument(
        "--rollout.batch_size", type=int, default=8, help="prompts sampled together, each N times (default: 8)"
    )
    g.add_argument(
        "--rollout.engine",
        choices=("auto", "torch", "vllm"),
        default="auto",
        help="vllm: one vLLM engine per condition; torch: our batched sampler; auto: vllm on a GPU when vLLM is "
        "installed, else torch (default: auto)",
    )
    g.add_argument(
        "--vllm.gpu_memory_utilization",
        type=float,
        default=None,
        help="vllm: its share of the GPU's memory (default: 0.9); on a CPU, the share of RAM for its KV cache "
        "(default: 0.1)",
    )
    g = parser.add_argument_group("judge: which of two outputs reads more like the user's held-out response")
    g.add_argument(
        "--judge",
        dest="judge.kind",
        choices=("openai", "local", "style"),
        default="openai",
        help="openai: an OpenAI-compatible chat endpoint (key from OPENAI_API_KEY); local: a Hugging Face chat "
        "model, reading its probabilities of A and B; style: no model, offline and deterministic, the output whose "
        "character n-grams and words are closer to the user's demos and held-out response (surface style only) "
        "(default: openai)",
    )
    g.add_argument(
        "--judge.model",
        default=None,
        help="openai: the model name (default: gpt-4o); local: a Hugging Face model folder",
    )
    g.add_argument("--judge.url", default=None, help="openai: the API base URL (default: https://api.openai.com/v1)")
    g.add_argument("--judge.concurrency", type=int, default=8, help="openai: requests at a time (default: 8)")
    g.add_argument("--judge.timeout", type=float, default=60.0, help="openai: seconds per request (default: 60)")
    g.add_argument(
        "--judge.retries",
        type=int,
        default=4,
        help="openai: retries of a failed request, 1, 2, 4... s apart (default: 4)",
    )
    g.add_argument("--judge.batch_size", type=int, default=8, help="local: judgments per forward (default: 8)")
    g.add_argument(
        "--judge.profile",
        choices=("demos", "heldout"),
        default="demos",
        help="style: the user's writing each output is compared with, besides the prompt's own held-out response: "
        "the run's demos, or the held-out answers alone (not what SFT trained on) (default: demos)",
    )
    add_param_dtype_arg(parser.add_argument_group("precision of the conditions' models"))


def validate_eval(args) -> None:
    r, j = args.rollout, args.judge
    check_ranges(
        [
            ("--seed", args.seed, ">= 0", "default: 42"),
            ("--few_shot.k", args.few_shot.k, ">= 1", "default: all the run's demos"),
            ("--rollout.n_samples_per_prompt", r.n_samples_per_prompt, ">= 1", "paper: 3"),
            ("--rollout.max_new_tokens", r.max_new_tokens, ">= 1", "default: the run's"),
            ("--rollout.temperature", r.temperature, "> 0", "paper: 1.0"),
            ("--rollout.top_p", r.top_p, "(0, 1]", "default: 1.0"),
            ("--rollout.top_k", r.top_k, ">= -1", "-1: off; default: 50"),
            ("--rollout.batch_size", r.batch_size, ">= 1", "default: 8"),
            ("--vllm.gpu_memory_utilization", args.vllm.gpu_memory_utilization, "(0, 1]", "default: 0.9, 0.1 on CPU"),
            ("--judge.concurrency", j.concurrency, ">= 1", "default: 8"),
            ("--judge.timeout", j.timeout, "> 0", "default: 60"),
            ("--judge.retries", j.retries, ">= 0", "default: 4"),
            ("--judge.batch_size", j.batch_size, ">= 1", "default: 8"),
        ]
    )
    check_input_template(args.data.input_template)
    if j.url is not None and not j.url.startswith(("http://", "https://")):
        raise ValueError(f"--judge.url {j.url}: give the API's base URL, e.g. http://judge-host:8000/v1")


def add_serve_reward_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models: a finished DITTO run, or a policy and its reference")
    g.add_argument(
        "--run", default=None, help="run folder: serves its final/ policy against its reference/ with its beta"
    )
    g.add_argument("--policy", default=None, help="policy HF folder, or a PEFT adapter trained on --reference")
    g.add_argument("--reference", default=None, help="reference HF folder (pi_0)")
    g.add_argument("--beta", type=float, default=None, help="reward beta (default with --run: the run's --ditto.beta)")
    g = parser.add_argument_group("the reward: r = clip(scale * beta * logratio + offset) + sum of weight * mixed")
    g.add_argument(
        "--length_normalize", action="store_true", help="mean log-ratio per response token instead of the sum"
    )
    g.add_argument("--scale", type=float, default=1.0, help="multiplies DITTO's reward (default: 1)")
    g.add_argument("--offset", type=float, default=0.0, help="added to DITTO's reward after --scale (default: 0)")
    g.add_argument(
        "--clip_range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help="clip DITTO's reward"
    )
    g.add_argument(
        "--mix",
        type=_mix_entry,
        action="append",
        default=[],
        metavar="URL=WEIGHT",
        help="add WEIGHT x the rewards of another OpenRLHF reward server (repeatable), e.g. http://rm:5000/get_reward=1.0",
    )
    g.add_argument(
        "--data.max_len",
        type=int,
        default=None,
        help="longest query in tokens; longer ones are refused (default: the run's --data.max_len, else 2048)",
    )
    add_param_dtype_arg(g)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0, as serve_rm)")
    g.add_argument("--port", type=int, default=5000, help="port (default: 5000, as serve_rm)")
    g.add_argument(
        "--batch_size",
        type=int,
        default=32,
        help="most queries scored in one forward, across requests; lower it if the GPU runs out of memory "
        "(default: 32)",
    )
    g.add_argument(
        "--batch_wait_ms",
        type=float,
        default=5.0,
        help="how long the first query of a batch waits for others to join it (default: 5)",
    )


def validate_serve_reward(args) -> None:
    check_ranges(
        [
            ("--beta", args.beta, "> 0", "default with --run: the run's --ditto.beta"),
            ("--scale", args.scale, "> 0", "default: 1"),
            ("--offset", args.offset, "finite", "default: 0"),
            *(("--clip_range", x, "finite", "LOW HIGH") for x in args.clip_range or ()),
            ("--data.max_len", args.data.max_len, ">= 2", "default: the run's --data.max_len, else 2048"),
            ("--port", args.port, "[1, 65535]", "default: 5000"),
            ("--batch_size", args.batch_size, ">= 1", "default: 32"),
            ("--batch_wait_ms", args.batch_wait_ms, ">= 0", "default: 5"),
        ]
    )
    if args.clip_range and not args.clip_range[0] < args.clip_range[1]:
        low, high = args.clip_range
        raise ValueError(f"--clip_range {low:g} {high:g}: LOW must be below HIGH")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(argv)
    if ns.command == "train" and ns.preset:  # the preset's flags first, so that the user's own override them
        at = argv.index("train") + 1
        ns = parser.parse_args([*argv[:at], *PRESETS[ns.preset], *argv[at:]])
    if ns.command is None:
        parser.print_help()
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per model load and save; ours say what the run is doing
    with exit_codes():
        if ns.command == "train":
            from openrlhf_ditto.backends.local import LocalBackend
            from openrlhf_ditto.trainer import train
            from openrlhf_ditto.users import is_multi_user, train_users

            args = hierarchize(ns)
            validate(args)
            u = args.vllm.gpu_memory_utilization
            check_ranges([("--vllm.gpu_memory_utilization", u, "(0, 1]", "default: 0.3, 0.1 on CPU")])
            if args.dry_run:
                from transformers import AutoTokenizer

                from openrlhf_ditto.memory import describe
                from openrlhf_ditto.trainer import demos_and_store

                tokenizer = AutoTokenizer.from_pretrained(args.actor.model_name_or_path)
                prompts = 8 if is_multi_user(args) else len(demos_and_store(args, tokenizer).prompts)
                print(describe(args, prompts, ray=False))
                return
            if is_multi_user(args):
                train_users(args, lambda path: LocalBackend(path, args))
            else:
                final = train(args, lambda path: LocalBackend(path, args))
                print(f"DITTO model saved to {final}")
        elif ns.command == "quickstart":
            from openrlhf_ditto.quickstart import quickstart, train_argv

            args = hierarchize(parser.parse_args(["train", *train_argv(ns.output_dir, ns.overwrite, ns.resume)]))
            validate(args)
            quickstart(args)
        elif ns.command == "eval":
            from openrlhf_ditto.evaluate import evaluate, evaluate_users

            args = hierarchize(ns)
            validate_eval(args)
            print(f"report: {(evaluate_users if (Path(ns.run) / 'users').is_dir() else evaluate)(args)}")
        elif ns.command == "serve-reward":
            from openrlhf_ditto.reward import serve

            args = hierarchize(ns)
            validate_serve_reward(args)
            serve(args)
        elif ns.command == "export-pairs":
            from openrlhf_ditto.export import export_pairs

            validate_export(ns)
            counts, changed, max_len = export_pairs(ns.run, ns.out, ns.num, ns.kinds, ns.seed, ns.overwrite)
            print(
                f"wrote {sum(counts.values())} pairs ({', '.join(f'{k} {counts[k]}' for k in KINDS if counts[k])}) to "
                f"{ns.out}; train on them with python -m openrlhf.cli.train_dpo --data.dataset {ns.out} "
                f"--data.prompt_key prompt --data.max_len {max_len} (prompts are rendered already: no "
                "--data.apply_chat_template; max_len: the run's plus the EOS train_dpo appends)"
            )
            if changed:
                print(
                    f"note: train_dpo trains {changed} of the {2 * sum(counts.values())} responses on other tokens "
                    "than the run's: it appends an EOS to each response that does not end with one (samples cut at "
                    "the budget, turns that end with another token) and re-tokenizes text (a sample cut inside a "
                    "character)"
                )


if __name__ == "__main__":
    main()
