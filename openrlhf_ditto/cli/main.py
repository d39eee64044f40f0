"""The `openrlhf-ditto` command."""

import argparse

from openrlhf_ditto import __version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="openrlhf-ditto", description="DITTO: align a language model to a handful of demonstrations."
    )
    parser.add_argument("--version", action="version", version=f"openrlhf-ditto {__version__}")
    parser.parse_args(argv)
    parser.print_help()


if __name__ == "__main__":
    main()
