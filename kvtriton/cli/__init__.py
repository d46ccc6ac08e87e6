"""The ``kvtriton`` command (also ``python -m kvtriton``).

One module per subcommand (:mod:`~kvtriton.cli.plan`, :mod:`~kvtriton.cli.presets`,
:mod:`~kvtriton.cli.simulate`, :mod:`~kvtriton.cli.bench`, :mod:`~kvtriton.cli.demo`), each
with ``add_arguments(parser)`` and ``run(args) -> int``; :data:`COMMANDS` lists them as
:class:`Command` entries. Shared option sets and argparse value types (the model-selection
options ``--preset/--hf-config/--hf-set/--block-size``, bounded ints and floats) come from
:mod:`kvtriton.options`, which sits below the CLI so scripts and experiments use them too.
To add a subcommand, write a module with two functions and append one entry::

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--size", type=positive_int, default=64)

    def run(args: argparse.Namespace) -> int:
        from kvtriton.kernels import gather      # heavy imports (torch) inside run only
        ...
        return 0

    COMMANDS.append(Command("mine", "what it does", add_arguments, run))

Rules for subcommands: import torch (or anything heavy) only inside ``run`` (or
``add_arguments``, which runs only for the selected command) so that ``kvtriton --help`` and
``kvtriton plan`` stay instant; raise :class:`CliError` for a user mistake (it prints one
``kvtriton: error: ...`` line and exits 2, no traceback); return the exit status. Tables go
through :mod:`kvtriton.table`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from kvtriton.cli import bench, demo, plan, presets, simulate
from kvtriton.cli.demo import add_arguments as add_demo_arguments
from kvtriton.cli.demo import run as run_demo
from kvtriton.cli.plan import cached_counts, plan_table
from kvtriton.cli.presets import presets_table
from kvtriton.options import UsageError, add_model_arguments, positive_int, spec_from_args

__all__ = [
    "COMMANDS",
    "CliError",
    "Command",
    "add_demo_arguments",
    "add_model_arguments",
    "build_parser",
    "cached_counts",
    "main",
    "plan_table",
    "positive_int",
    "presets_table",
    "run_demo",
    "spec_from_args",
]

PROG = "kvtriton"

#: A user mistake: printed as one ``kvtriton: error: <message>`` line, exit status 2.
CliError = UsageError


class _Parser(argparse.ArgumentParser):
    """argparse with kvtriton's one-line error format (subparsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` runs it
    and returns the exit status."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str = ""


COMMANDS: list[Command] = [
    Command("plan", plan.HELP, plan.add_arguments, plan.run, epilog=plan.EPILOG),
    Command("presets", presets.HELP, presets.add_arguments, presets.run),
    Command("demo", demo.HELP, add_demo_arguments, run_demo),
    Command(
        "simulate", simulate.HELP, simulate.add_arguments, simulate.run, epilog=simulate.EPILOG
    ),
    Command("bench", bench.HELP, bench.add_arguments, bench.run, epilog=bench.EPILOG),
]


def build_parser(
    commands: Sequence[Command] | None = None, *, argv: Sequence[str] | None = None
) -> argparse.ArgumentParser:
    """The argument parser with one subparser per entry of ``commands`` (default COMMANDS).

    With ``argv``, only the subcommand that ``argv`` selects (its first non-option word)
    gets its ``add_arguments`` called: the others are listed by name and help only, so one
    subcommand's imports never slow down or break another (``kvtriton --help`` calls none).
    """
    commands = COMMANDS if commands is None else commands
    selected: str | None = None
    if argv is not None:  # top-level options take no value, so the first word is the command
        selected = next((a for a in argv if not a.startswith("-")), None)
    parser = _Parser(
        prog=PROG,
        description="kvtriton: move exactly the paged KV cache each layer group still needs "
        "between the ranks of a disaggregated LLM server.",
    )
    from kvtriton import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands:
        p = sub.add_parser(
            command.name, help=command.help, description=command.help, epilog=command.epilog or None
        )
        if argv is None or command.name == selected:
            command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kvtriton`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv=argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 0
    try:
        status: int = args._run(args)
        sys.stdout.flush()
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `kvtriton presets | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status
