"""`bitdance` command line: a thin argparse layer over library functions.

Each area registers its subcommands from `bitdance.commands.<area>.register(subparsers)`; a handler
takes the parsed args and returns an exit code. Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bitdance.utils import UserError

# Modules under bitdance.commands, each with register(subparsers).
COMMAND_MODULES = ("tokenizer", "generator", "evaluate", "official")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitdance",
        description="Autoregressive image generation with binary visual tokens (BitDance).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"bitdance.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"bitdance: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"bitdance: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("bitdance: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
