"""The `openrlhf-ditto` command: `train` (DITTO on one machine) and `quickstart` (a demo on SmolLM2-135M)."""

import argparse
import sys

from openrlhf_ditto import __version__
from openrlhf_ditto.cli.args import add_ditto_args, hierarchize, validate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openrlhf-ditto", description="DITTO: align a language model to a handful of demonstrations."
    )
    parser.add_argument("--version", action="version", version=f"openrlhf-ditto {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,quickstart}")
    train = sub.add_parser("train", help="run DITTO on one machine (CPU or one GPU)", description=__doc__)
    add_ditto_args(train)
    quick = sub.add_parser(
        "quickstart", help="DITTO on SmolLM2-135M-Instruct with bundled demos (offline, ~10 min on 2 CPU cores)"
    )
    quick.add_argument("--output_dir", default="./ditto_quickstart", help="run folder (model, report, plot)")
    quick.add_argument("--overwrite", action="store_true", help="delete a previous quick start in --output_dir")
    quick.add_argument("--resume", action="store_true", help="continue an interrupted quick start")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return
    from transformers.utils import logging as hf_logging

    from openrlhf_ditto.trainer import RunFolderError, RunStopped

    hf_logging.disable_progress_bar()  # a bar per model load and save; ours say what the run is doing
    try:
        if ns.command == "train":
            from openrlhf_ditto.backends.local import LocalBackend
            from openrlhf_ditto.trainer import train

            args = hierarchize(ns)
            validate(args)
            final = train(args, lambda path: LocalBackend(path, args))
            print(f"DITTO model saved to {final}")
        elif ns.command == "quickstart":
            from openrlhf_ditto.quickstart import quickstart, train_argv

            args = hierarchize(parser.parse_args(["train", *train_argv(ns.output_dir, ns.overwrite, ns.resume)]))
            validate(args)
            quickstart(args)
    except (RunFolderError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunStopped as e:
        print(f"error: {e}" if e.exit_code == 1 else str(e), file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:  # before the run began (nothing written yet), or a second Ctrl-C while stopping
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
