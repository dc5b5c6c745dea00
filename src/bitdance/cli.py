"""`bitdance` command line: a thin argparse layer over library functions.

Each area registers its subcommands from `bitdance.commands.<area>.register(subparsers)`; a handler
takes the parsed args and returns an exit code. Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import subprocess
import sys

from bitdance.utils import UserError

# Modules under bitdance.commands, each with register(subparsers).
COMMAND_MODULES = ("tokenizer", "generator", "evaluate", "official")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitdance",
        description="Autoregressive image generation with binary visual tokens (BitDance).",
    )
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for PyTorch (default: its own choice, one per core). On a machine "
                        "shared with other jobs, 1 avoids threads waiting on each other")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"bitdance.commands.{name}").register(sub)
    return parser


def set_threads(n: int) -> None:
    if n < 1:
        raise UserError(f"--threads must be at least 1, got {n}")
    import torch

    torch.set_num_threads(n)


def report_errors(run, prog: str = "bitdance") -> int:
    """`run()`'s exit code, with the errors a user can act on printed as one line on stderr instead of a traceback.

    The CLI and the scripts in scripts/ share it (`prog` names the one that failed); anything else is a bug and
    keeps its traceback.
    """
    try:
        return int(run() or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a named file that cannot be read or written (atomic writes raise UserErrors themselves)
        if e.filename is None:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:  # a script's child command, which printed its own reason above
        print(f"{prog}: error: exit status {e.returncode} from {shlex.join(map(str, e.cmd))}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2

    def run():
        if args.threads is not None:
            set_threads(args.threads)
        return args.func(args)

    return report_errors(run)


if __name__ == "__main__":
    sys.exit(main())
