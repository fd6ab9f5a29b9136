"""The ``cap-lab`` command line: one sub-command per module of this package.

Each sub-command module defines ``add_parser(subparsers)`` and ``run(args) -> int``; shared
arguments live in :mod:`cap_lab.cli.common`, argument and path checks in
:mod:`cap_lab.cli.checks`, the scores JSON format in :mod:`cap_lab.cli.scores_json`.

User mistakes (bad values, missing files or packages, unwritable outputs) end with one
``cap-lab: error: ...`` line on stderr and exit status 2, never a traceback, and are found
before any slow work (loading the model, building the calibration set, scoring). A bad flag
value is reported by argparse (its ``type=`` checks name the flag and the allowed range) in the
same one-line form. So is :class:`cap_lab.modeling.ReplayError`: an installed transformers
release whose decoder layers cap_lab cannot replay faithfully (the message names the version).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from cap_lab.modeling.replay import ReplayError

COMMANDS = ("score", "prune", "eval", "plan")
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, ImportError, ReplayError)


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``cap-lab: error: ...`` line (exit status 2)."""

    def error(self, message: str):
        command = self.prog.split(" ", 1)[1] if " " in self.prog else None
        where = f"{command}: " if command else ""
        help_hint = f"{self.prog} --help"
        self.exit(2, f"cap-lab: error: {where}{message} (see {help_hint})\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="cap-lab", description="Causal Attribution Pruning lab")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"cap_lab.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``cap-lab`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, message already printed)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as e:
        message = " ".join(str(e).split("\n"))  # one line, whatever the exception says
        print(f"cap-lab: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cap-lab: interrupted", file=sys.stderr)
        return 130
