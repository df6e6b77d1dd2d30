"""The `prism` command line tool: `prism <command> ...`.

Subcommands live in prism_kernels/commands/<name>.py, each exposing
``register(subparsers)`` which adds its parser and sets ``func``. A command
listed in COMMANDS whose module does not exist (yet) is skipped; a module that
exists but fails to import raises (a broken command is never hidden).
"""
from __future__ import annotations

import argparse
import importlib
import os
import importlib.util
import sys
from typing import List, Optional

COMMANDS = ["costs", "demo", "run", "generate", "eval"]


def _version() -> str:
    from prism_kernels import __version__
    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prism",
        description="Prism distributed Transformer inference: cost model, demo, runtime, evaluation.")
    parser.add_argument("--version", action="version", version=f"prism-kernels {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        modname = f"prism_kernels.commands.{name}"
        if importlib.util.find_spec(modname) is None:
            continue
        importlib.import_module(modname).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        rc = func(args)
    except BrokenPipeError:
        # `prism costs | head`: the reader left; stop quietly like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
