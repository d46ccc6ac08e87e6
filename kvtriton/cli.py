"""The ``kvtriton`` command (also ``python -m kvtriton``).

Subcommands live in :data:`COMMANDS`, a list of :class:`Command` entries ``(name, help,
add_arguments, run)``. To add one, write two functions and append one entry::

    def add_bench_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--size", type=positive_int, default=64)

    def run_bench(args: argparse.Namespace) -> int:
        from kvtriton.kernels import gather      # heavy imports (torch) inside run only
        ...
        return 0

    COMMANDS.append(Command("bench", "time the kernels", add_bench_arguments, run_bench))

Rules for subcommands: import torch (or anything heavy) only inside ``run`` so that
``kvtriton --help`` and ``kvtriton plan`` stay instant; raise :class:`CliError` for a user
mistake (it prints one ``kvtriton: error: ...`` line and exits 2, no traceback); return the
exit status. Tables go through :mod:`kvtriton.table`.

``demo`` prints the plan table for the issue's scenario, then runs the end-to-end transfer
demo (:func:`run_demo`, options from :mod:`kvtriton.transfer.config`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from kvtriton.plan import TransferPlan, compare_policies, single_boundary
from kvtriton.spec import PRESETS, KVCacheSpec, preset
from kvtriton.table import Column, Table, format_bytes, format_count, format_percent

__all__ = [
    "COMMANDS",
    "POLICIES",
    "CliError",
    "Command",
    "build_parser",
    "main",
    "plan_table",
    "positive_int",
]

PROG = "kvtriton"

#: The three policies of a plan table, in column order: (key in compare_policies, title).
POLICIES: tuple[tuple[str, str], ...] = (
    ("per_group", "per-group"),
    ("single_boundary", "single boundary"),
    ("no_reuse", "no reuse"),
)


class CliError(Exception):
    """A user mistake: printed as one ``kvtriton: error: <message>`` line, exit status 2."""


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


# -- argument types -----------------------------------------------------------------------


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text.replace("_", ""), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{what} must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "the value")


def _count(text: str) -> int:
    return _int_at_least(text, 0, "token count")


def _prompt(text: str) -> int:
    return _int_at_least(text, 1, "the prompt length P")


def _cached_pair(text: str) -> tuple[str, int]:
    name, eq, count = text.partition("=")
    name = name.strip()
    if not eq or not name:
        raise argparse.ArgumentTypeError(
            f"expected GROUP=TOKENS (for example full=6000), got {text!r}"
        )
    return name, _int_at_least(count.strip(), 0, f"cached tokens of group {name!r}")


def _load_preset(name: str, tokens_per_block: int | None = None) -> KVCacheSpec:
    if name not in PRESETS:
        raise CliError(
            f"unknown preset {name!r}; available: {', '.join(PRESETS)} (see '{PROG} presets')"
        )
    return preset(name, tokens_per_block=tokens_per_block)


def _hf_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--hf-set``; VALUE parsed as JSON, else kept as a bare string."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE (e.g. sliding_window=1024), got {text!r}"
        )
    try:
        parsed: object = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--preset NAME | --hf-config PATH_OR_CLASS`` (+ ``--hf-set``, ``--block-size``)."""
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--preset", metavar="NAME", help=f"built-in model spec (see '{PROG} presets')"
    )
    model.add_argument(
        "--hf-config",
        metavar="PATH_OR_CLASS",
        help="a transformers config: config.json, a directory holding one, or a "
        "config class name such as GptOssConfig or Gemma3TextConfig "
        "(instantiated with its defaults; no network, no weights)",
    )
    p.add_argument(
        "--hf-set",
        action="append",
        type=_hf_setting,
        default=[],
        metavar="KEY=VALUE",
        help="change a config field before mapping (repeatable; VALUE is JSON, e.g. "
        "--hf-set sliding_window=1024 --hf-set num_hidden_layers=34)",
    )
    p.add_argument(
        "--block-size",
        type=positive_int,
        default=None,
        metavar="B",
        help="tokens per block (default: the preset's, 16 for --hf-config)",
    )


def spec_from_args(args: argparse.Namespace) -> KVCacheSpec:
    """The spec that :func:`add_model_arguments`' options select."""
    if args.preset is not None:
        if args.hf_set:
            raise CliError("--hf-set applies to --hf-config, not to --preset")
        return _load_preset(args.preset, args.block_size)
    from kvtriton.hf import spec_from_hf_config

    try:
        return spec_from_hf_config(
            args.hf_config, tokens_per_block=args.block_size or 16, overrides=dict(args.hf_set)
        )
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise CliError(f"--hf-config {args.hf_config!r}: {exc}") from None


# -- plan ---------------------------------------------------------------------------------


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--prompt",
        required=True,
        type=_prompt,
        metavar="P",
        help="prompt length P in tokens (>= 1); the receiver decodes position P next",
    )
    p.add_argument(
        "--cached",
        action="append",
        type=_cached_pair,
        default=[],
        metavar="GROUP=N",
        help="the receiver holds group GROUP's needed positions below N "
        "(repeatable; overrides --cached-all for that group)",
    )
    p.add_argument(
        "--cached-all",
        type=_count,
        default=0,
        metavar="N",
        help="cached tokens for every group not named by --cached (default 0)",
    )
    p.add_argument(
        "--draft",
        type=_count,
        default=0,
        metavar="K",
        help="speculative draft positions the receiver allocates (never moved)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the three plans (compare_policies) as JSON instead of a table",
    )


def cached_counts(
    spec: KVCacheSpec, pairs: Sequence[tuple[str, int]], default: int
) -> dict[str, int]:
    """Per-group cached counts from ``--cached G=N`` pairs over a ``--cached-all`` default."""
    counts = dict.fromkeys(spec.group_names, default)
    given: dict[str, int] = {}
    for name, n in pairs:
        if name not in counts:
            raise CliError(
                f"unknown layer group {name!r} in --cached; preset {spec.name!r} has "
                f"groups: {', '.join(spec.group_names)}"
            )
        if name in given and given[name] != n:
            raise CliError(f"--cached names group {name!r} twice ({given[name]} and {n})")
        given[name] = counts[name] = n
    return counts


def plan_table(plans: Mapping[str, TransferPlan], boundary: int) -> str:
    """The per-group comparison table of :func:`compare_policies` output, plus totals and
    savings (what ``kvtriton plan`` prints)."""
    per = plans["per_group"]
    spec = per.spec
    tpb = spec.tokens_per_block
    columns: list[Column | str] = [
        "group",
        "kind",
        Column("layers"),
        Column("window"),
        Column("needed"),
        Column("cached"),
    ]
    for _ in POLICIES:
        columns += [Column("tokens"), Column("blocks"), Column("bytes")]
    table = Table(columns, spans=[("", 6), *((title, 3) for _, title in POLICIES)])
    for g in per.groups:
        cells: list[object] = [
            g.name,
            g.kind,
            g.group.num_layers,
            g.group.window if g.kind == "sliding" else None,
            "state" if g.kind == "state" else f"[{g.needed.start}, {g.needed.end})",
            format_count(g.cached_tokens),
        ]
        for key, _ in POLICIES:
            pg = plans[key].group(g.name)
            if pg.kind == "state":
                cells += ["state" if pg.moves_state else "kept", None, format_bytes(pg.bytes)]
            else:
                cells += [
                    format_count(len(pg.tokens)),
                    format_count(len(pg.blocks(tpb))),
                    format_bytes(pg.bytes),
                ]
        table.add_row(*cells)
    table.add_rule()
    totals: list[object] = ["total", "", spec.num_layers, "", "", ""]
    for key, _ in POLICIES:
        plan = plans[key]
        totals += [
            format_count(sum(len(g.tokens) for g in plan.groups)),
            format_count(sum(len(g.blocks(tpb)) for g in plan.groups)),
            format_bytes(plan.total_bytes),
        ]
    table.add_row(*totals)

    head = (
        f"{spec.name}: prompt P = {format_count(per.num_tokens)} tokens"
        f"{f' + {per.num_draft_tokens} draft (never moved)' if per.num_draft_tokens else ''}"
        f", {tpb} tokens/block, {spec.dtype}; single boundary c = {format_count(boundary)}"
        f" (min over groups)"
    )
    lines = [head, "", table.render(), ""]
    for key, title in POLICIES[1:]:
        other = plans[key].total_bytes
        saved = other - per.total_bytes
        if other == 0:
            lines.append(f"per-group vs {title}: both move nothing (full hit)")
        else:
            lines.append(
                f"per-group vs {title}: saves {format_bytes(saved)} "
                f"({format_percent(saved, other)} of {format_bytes(other)})"
            )
    return "\n".join(lines)


def _plans_json(plans: Mapping[str, TransferPlan]) -> str:
    return json.dumps({key: plan.to_dict() for key, plan in plans.items()}, indent=2)


def _compare(
    spec: KVCacheSpec, prompt: int, cached: Mapping[str, int], drafts: int
) -> tuple[dict[str, TransferPlan], int]:
    try:
        return (
            compare_policies(spec, prompt, cached, num_draft_tokens=drafts),
            single_boundary(spec, prompt, cached),
        )
    except (ValueError, TypeError) as exc:  # inputs were validated; keep messages clean
        raise CliError(str(exc)) from exc


def run_plan(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    cached = cached_counts(spec, args.cached, args.cached_all)
    plans, boundary = _compare(spec, args.prompt, cached, args.draft)
    print(_plans_json(plans) if args.json else plan_table(plans, boundary))
    return 0


# -- presets ------------------------------------------------------------------------------


def add_presets_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the specs as JSON")


def presets_table(specs: Sequence[KVCacheSpec]) -> str:
    """One row per layer group of each spec (what ``kvtriton presets`` prints)."""
    table = Table(
        [
            "preset",
            Column("block"),
            "dtype",
            "group",
            "kind",
            Column("window"),
            Column("layers"),
            Column("kv heads x dim"),
            Column("KV/token"),
            Column("state/request"),
        ]
    )
    for spec in specs:
        for i, g in enumerate(spec.groups):
            first = i == 0
            shape = (
                f"{g.num_kv_heads} x {g.head_dim}" + (" (K only)" if g.kv_factor == 1 else "")
                if g.kind != "state"
                else "x".join(map(str, g.state_shape or ()))
            )
            table.add_row(
                spec.name if first else "",
                spec.tokens_per_block if first else "",
                spec.dtype if first else "",
                g.name,
                g.kind,
                g.window if g.kind == "sliding" else None,
                g.num_layers,
                shape,
                format_bytes(spec.bytes_per_token(g)) if g.kind != "state" else None,
                format_bytes(spec.state_bytes(g)) if g.kind == "state" else None,
            )
    return table.render()


def run_presets(args: argparse.Namespace) -> int:
    specs = [preset(name) for name in PRESETS]
    if args.json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
    else:
        print(presets_table(specs))
    return 0


# -- demo ---------------------------------------------------------------------------------

DEMO_PRESET = "gpt-oss-20b"
DEMO_PROMPT = 8192
DEMO_CACHED = {"full": 6000}


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The end-to-end demo's options (those of ``scripts/disagg.py``; torch-free)."""
    from kvtriton.transfer.config import add_arguments

    add_arguments(p)


def run_demo(args: argparse.Namespace) -> int:
    """The main job: the plan at model scale, then a real transfer between spawned ranks.

    Prints the per-group plan of gpt-oss-20b (P = 8192, 6000 tokens cached), then spawns
    context and generation ranks on this machine (gloo on CPU, NCCL when every rank owns a
    GPU), runs a multi-turn request stream with per-group prefix reuse on the receiver and
    verifies every needed position bit-exact (:mod:`kvtriton.transfer.experiment`).
    """
    _plan_preface()
    print()
    print(
        "Now for real: the same per-group rule moving KV between spawned ranks "
        "(scripts/disagg.py has the same options, and runs under torchrun)."
    )
    print(flush=True)
    from kvtriton.transfer.demo import run_cli

    try:
        return run_cli(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _plan_preface() -> None:
    """Plan table for a hybrid model whose receiver holds 6000 tokens of full attention."""
    spec = _load_preset(DEMO_PRESET)
    cached = cached_counts(spec, list(DEMO_CACHED.items()), 0)
    plans, boundary = _compare(spec, DEMO_PROMPT, cached, 0)
    print(plan_table(plans, boundary))
    per, single = plans["per_group"], plans["single_boundary"]
    full = per.group("full")
    sliding = next(g for g in per.groups if g.kind == "sliding")
    saved = single.total_bytes - per.total_bytes
    text = (
        f"What this shows: the receiver's prefix cache already holds the first "
        f"{format_count(full.cached_tokens)} prompt tokens for the {full.group.num_layers} "
        f"full-attention layers, but its {sliding.group.num_layers} sliding-window layers "
        f"(W = {sliding.group.window}) kept nothing that the next query reads, so their cached "
        f"count is {sliding.cached_tokens}. A system with one reuse boundary per sequence must "
        f"take the minimum over groups (c = {boundary}) and resends all "
        f"{format_count(len(single.group('full').tokens))} tokens of the full-attention layers. "
        f"kvtriton keeps one boundary per layer group: the full-attention layers send only "
        f"[{full.tokens.start}, {full.tokens.end}) ({format_count(len(full.tokens))} tokens) and "
        f"the sliding layers send only the {len(sliding.tokens)} positions their window still "
        f"reads, [{sliding.tokens.start}, {sliding.tokens.end}): "
        f"{format_bytes(per.total_bytes)} instead of {format_bytes(single.total_bytes)} "
        f"({format_percent(saved, single.total_bytes)} less)."
    )
    print()
    print(textwrap.fill(text, width=100))


# -- simulate (options and run live in kvtriton.sim) ----------------------------------------


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    from kvtriton.sim import add_simulate_arguments as add

    add(p)


def run_simulate(args: argparse.Namespace) -> int:
    from kvtriton.sim import run_simulate as run

    return run(args)


# -- bench (each benchmark's own options live in its module) --------------------------------

BENCHMARKS = {
    "kernels": "kvtriton.kernels.bench",
    "cache": "kvtriton.cache.bench",
    "transfer": "kvtriton.transfer.bench",
}


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "which",
        choices=sorted(BENCHMARKS),
        help="kernels: gather/scatter/copy vs copy_ and torch indexing (GPU); "
        "cache: match + allocate + commit (CPU); transfer: end to end vs raw "
        "NCCL send/recv (2 GPUs, spawned with torchrun)",
    )
    p.add_argument(
        "--nproc",
        type=positive_int,
        default=2,
        help="transfer only: ranks torchrun spawns (default 2)",
    )
    p.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="options passed to the benchmark (see `kvtriton bench WHICH -- --help`)",
    )


def run_bench(args: argparse.Namespace) -> int:
    import importlib
    import subprocess

    extra = [a for a in args.args if a != "--"]
    module = BENCHMARKS[args.which]
    if args.which == "transfer":
        # One process per rank: torchrun spawns them; NVLink multicast stays off.
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            "-m",
            module,
            *extra,
        ]
        return subprocess.call(cmd, env=env)
    status: int | None = importlib.import_module(module).main(extra)
    return int(status or 0)


# -- registry and entry point ---------------------------------------------------------------

COMMANDS: list[Command] = [
    Command(
        "plan",
        "per-group transfer plan for one request: what each layer group moves "
        "under per-group, single-boundary and no reuse",
        add_plan_arguments,
        run_plan,
        epilog="example: kvtriton plan --preset gpt-oss-20b --prompt 8192 --cached full=6000",
    ),
    Command(
        "presets",
        "list the built-in model specs and their layer groups",
        add_presets_arguments,
        run_presets,
    ),
    Command(
        "demo",
        "the main job: the per-group plan of a hybrid model (gpt-oss-20b, "
        "P = 8192, 6000 tokens cached), then a real multi-turn transfer between spawned "
        "context and generation ranks, verified bit-exact",
        add_demo_arguments,
        run_demo,
    ),
    Command(
        "simulate",
        "run a request trace through a receiver cache under no reuse, single "
        "boundary and per-group reuse: bytes moved, hit rates, peak blocks per layer group",
        add_simulate_arguments,
        run_simulate,
        epilog="example: kvtriton simulate --hf-config GptOssConfig --trace chat --plot sim.png",
    ),
    Command(
        "bench",
        "benchmarks: kernels (GPU), cache (CPU), transfer (2 GPUs, torchrun)",
        add_bench_arguments,
        run_bench,
        epilog="example: kvtriton bench kernels -- --json kernels.json",
    ),
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
