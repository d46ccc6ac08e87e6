"""``kvtriton plan``: what each layer group moves for one request, per reuse policy."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence

from kvtriton.options import (
    UsageError,
    add_model_arguments,
    group_count_arg,
    spec_from_args,
    token_count_arg,
)
from kvtriton.plan import ReusePolicy, TransferPlan, compare_policies, single_boundary
from kvtriton.spec import KVCacheSpec
from kvtriton.table import Column, Table, format_bytes, format_count, format_percent

__all__ = ["add_arguments", "cached_counts", "compare", "plan_table", "run"]

HELP = (
    "per-group transfer plan for one request: what each layer group moves "
    "under per-group, single-boundary and no reuse"
)
EPILOG = "example: kvtriton plan --preset gpt-oss-20b --prompt 8192 --cached full=6000"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--prompt",
        required=True,
        type=token_count_arg("the prompt length P", minimum=1),
        metavar="P",
        help="prompt length P in tokens (1 to 2**40); the receiver decodes position P next",
    )
    p.add_argument(
        "--cached",
        action="append",
        type=group_count_arg,
        default=[],
        metavar="GROUP=N",
        help="the receiver holds group GROUP's needed positions below N "
        "(repeatable; overrides --cached-all for that group)",
    )
    p.add_argument(
        "--cached-all",
        type=token_count_arg(),
        default=0,
        metavar="N",
        help="cached tokens for every group not named by --cached (default 0)",
    )
    p.add_argument(
        "--draft",
        type=token_count_arg(),
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
            raise UsageError(
                f"unknown layer group {name!r} in --cached; preset {spec.name!r} has "
                f"groups: {', '.join(spec.group_names)}"
            )
        if name in given and given[name] != n:
            raise UsageError(f"--cached names group {name!r} twice ({given[name]} and {n})")
        given[name] = counts[name] = n
    return counts


def compare(
    spec: KVCacheSpec, prompt: int, cached: Mapping[str, int], drafts: int
) -> tuple[dict[ReusePolicy, TransferPlan], int]:
    """:func:`~kvtriton.plan.compare_policies` and the single boundary, errors as
    :class:`~kvtriton.options.UsageError`."""
    try:
        return (
            compare_policies(spec, prompt, cached, num_draft_tokens=drafts),
            single_boundary(spec, prompt, cached),
        )
    except (ValueError, TypeError) as exc:  # inputs were validated; keep messages clean
        raise UsageError(str(exc)) from exc


def plan_table(plans: Mapping[str, TransferPlan], boundary: int) -> str:
    """The per-group comparison table of :func:`compare_policies` output, plus totals and
    savings (what ``kvtriton plan`` prints)."""
    policies = ReusePolicy.table_order()
    per = plans[ReusePolicy.PER_GROUP]
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
    for _ in policies:
        columns += [Column("tokens"), Column("blocks"), Column("bytes")]
    table = Table(columns, spans=[("", 6), *((policy.label, 3) for policy in policies)])
    for g in per.groups:
        cells: list[object] = [
            g.name,
            g.kind,
            g.group.num_layers,
            g.group.window,
            "state" if g.group.is_state else f"[{g.needed.start}, {g.needed.end})",
            format_count(g.cached_tokens),
        ]
        for policy in policies:
            pg = plans[policy].group(g.name)
            if pg.group.is_state:
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
    for policy in policies:
        plan = plans[policy]
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
    for policy in policies[1:]:
        other = plans[policy].total_bytes
        saved = other - per.total_bytes
        if other == 0:
            lines.append(f"per-group vs {policy.label}: both move nothing (full hit)")
        else:
            lines.append(
                f"per-group vs {policy.label}: saves {format_bytes(saved)} "
                f"({format_percent(saved, other)} of {format_bytes(other)})"
            )
    return "\n".join(lines)


def plans_json(plans: Mapping[str, TransferPlan]) -> str:
    return json.dumps({str(key): plan.to_dict() for key, plan in plans.items()}, indent=2)


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    cached = cached_counts(spec, args.cached, args.cached_all)
    plans, boundary = compare(spec, args.prompt, cached, args.draft)
    print(plans_json(plans) if args.json else plan_table(plans, boundary))
    return 0
