"""The ``cap-lab`` command line: one sub-command per module of this package.

Each sub-command module defines ``add_parser(subparsers)`` and ``run(args) -> int``.
User mistakes (bad values, missing files or packages) end with one ``cap-lab: error: ...``
line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("score", "prune", "eval")
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cap-lab", description="Causal Attribution Pruning lab")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"cap_lab.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as e:
        print(f"cap-lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cap-lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
