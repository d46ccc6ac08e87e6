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
from kvtriton.plan import PlanComparison, ReusePolicy, TransferPlan, compare_policies
from kvtriton.spec import KVCacheSpec

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
    p.add_argument(
        "--boundary",
        type=token_count_arg(),
        metavar="C",
        help="the single boundary, when the cache holds more than the counts show (default: "
        "the largest c the counts prove, kvtriton.plan.single_boundary)",
    )
    p.add_argument(
        "--plot",
        metavar="PATH",
        help="also save the block maps of the three plans (png, svg, pdf ...)",
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
    spec: KVCacheSpec,
    prompt: int,
    cached: Mapping[str, int],
    drafts: int,
    boundary: int | None = None,
) -> tuple[dict[ReusePolicy, TransferPlan], int]:
    """:func:`~kvtriton.plan.compare_policies` and the single boundary, errors as
    :class:`~kvtriton.options.UsageError`."""
    try:
        plans = compare_policies(spec, prompt, cached, boundary=boundary, num_draft_tokens=drafts)
    except (ValueError, TypeError) as exc:  # inputs were validated; keep messages clean
        raise UsageError(str(exc)) from exc
    return plans, plans.boundary


def plan_table(plans: Mapping[str, TransferPlan], boundary: int | None = None) -> str:
    """The comparison table of :func:`compare_policies` output (what ``kvtriton plan``
    prints): :meth:`kvtriton.plan.PlanComparison.table`; ``boundary`` is read from the
    plans and kept for callers that pass it."""
    return PlanComparison(plans).table()


def plans_json(plans: Mapping[str, TransferPlan]) -> str:
    return json.dumps({str(key): plan.to_dict() for key, plan in plans.items()}, indent=2)


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    cached = cached_counts(spec, args.cached, args.cached_all)
    plans, boundary = compare(spec, args.prompt, cached, args.draft, args.boundary)
    print(plans_json(plans) if args.json else plan_table(plans, boundary))
    if args.plot:
        from kvtriton.viz import plot_block_maps

        try:
            plot_block_maps(plans, args.plot)
        except (ImportError, ValueError, OSError) as exc:
            raise UsageError(f"--plot {args.plot!r}: {exc}") from exc
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0
