"""Block maps (notebooks/01_alignment): which positions and blocks of each layer group the
receiver reuses, receives or does not need, under each reuse policy; and the what-if helpers
the notebook's sliders drive (:func:`alignment_plans`, :func:`with_window`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvtriton.plan import ReusePolicy
from kvtriton.ranges import GroupKind
from kvtriton.table import format_bytes, format_count
from kvtriton.viz._mpl import byte_scale, figure_class, save

if TYPE_CHECKING:
    from kvtriton.plan import TransferPlan
    from kvtriton.ranges import TokenRange
    from kvtriton.spec import KVCacheSpec

__all__ = [
    "CACHED",
    "DRAFT",
    "MOVED",
    "NOT_NEEDED",
    "PARTLY_MOVED",
    "STATUS_NAMES",
    "GroupMap",
    "alignment_plans",
    "block_maps",
    "plot_block_maps",
    "plot_plan_bytes",
    "with_window",
]

#: Status codes of :class:`GroupMap` cells (token and block rows).
NOT_NEEDED, CACHED, MOVED, PARTLY_MOVED, DRAFT = 0, 1, 2, 3, 4
STATUS_NAMES: tuple[str, ...] = (
    "not needed",
    "cached (reused)",
    "moved",
    "partly moved (copy starts/ends inside the block)",
    "draft (allocated, never sent)",
)
_STATUS_COLORS = ("#e4e4e4", "#4c9f70", "#e0703a", "#f2c14e", "#9fc5e8")


@dataclass(frozen=True)
class GroupMap:
    """One layer group of one :class:`~kvtriton.plan.TransferPlan`, position by position.

    Attributes:
        name, kind, window: the group.
        num_tokens: the prompt length ``P``; positions ``[P, P + num_draft_tokens)`` are drafts.
        tokens_per_block: the block size the ``blocks`` row is drawn at (either side's).
        needed: positions the receiver needs (half-open; empty for state groups).
        cached_tokens: the reuse boundary the group was planned with.
        moved: positions that move (half-open; empty for state groups).
        tokens: one status code per position ``[0, P + drafts)`` (``NOT_NEEDED`` / ``CACHED`` /
            ``MOVED`` / ``DRAFT``); empty for state groups.
        blocks: one status code per logical block ``[0, ceil((P + drafts) / B))``: ``MOVED``
            when every position of the block moves, ``PARTLY_MOVED`` when some do (the copy
            starts or ends inside it), else ``CACHED`` if it holds a needed position, ``DRAFT``
            if it holds only draft positions, else ``NOT_NEEDED``.
        moves_state: state groups: whether the state moves (``None`` for attention groups).
        bytes: bytes the group moves (KV + state).
    """

    name: str
    kind: GroupKind
    window: int | None
    num_tokens: int
    tokens_per_block: int
    needed: TokenRange
    cached_tokens: int
    moved: TokenRange
    tokens: tuple[int, ...]
    blocks: tuple[int, ...]
    moves_state: bool | None
    bytes: int

    def count(self, status: int, *, unit: str = "tokens") -> int:
        """How many positions (``unit="tokens"``) or blocks (``"blocks"``) have ``status``."""
        if unit not in ("tokens", "blocks"):
            raise ValueError(f"unit must be 'tokens' or 'blocks', got {unit!r}")
        return (self.tokens if unit == "tokens" else self.blocks).count(status)


def block_maps(plan: TransferPlan, *, tokens_per_block: int | None = None) -> tuple[GroupMap, ...]:
    """Per-position and per-block status of every group of ``plan`` (see :class:`GroupMap`).

    ``tokens_per_block`` draws the block row at another block size (a receiver's, say: copies
    are by position, so the token row is the same on both sides); default: the plan's spec's.
    """
    from kvtriton.ranges import ceil_div

    bsz = plan.spec.tokens_per_block if tokens_per_block is None else tokens_per_block
    if isinstance(bsz, bool) or not isinstance(bsz, int) or bsz < 1:
        raise ValueError(f"tokens_per_block must be a positive int, got {bsz!r}")
    p = plan.num_tokens
    length = p + plan.num_draft_tokens
    out = []
    for g in plan.groups:
        if g.group.is_state:
            tokens: tuple[int, ...] = ()
            blocks: tuple[int, ...] = ()
        else:
            row = [NOT_NEEDED] * length
            for q in g.needed:
                row[q] = CACHED
            for q in g.tokens:
                row[q] = MOVED
            for q in range(p, length):
                row[q] = DRAFT
            tokens = tuple(row)
            block_row = []
            for b in range(ceil_div(length, bsz)):
                cells = row[b * bsz : min(length, (b + 1) * bsz)]
                moved = cells.count(MOVED)
                if moved and moved == bsz:
                    block_row.append(MOVED)
                elif moved:
                    block_row.append(PARTLY_MOVED)
                elif CACHED in cells:
                    block_row.append(CACHED)
                elif all(c == DRAFT for c in cells):
                    block_row.append(DRAFT)
                else:
                    block_row.append(NOT_NEEDED)
            blocks = tuple(block_row)
        out.append(
            GroupMap(
                name=g.name,
                kind=g.kind,
                window=g.group.window,
                num_tokens=p,
                tokens_per_block=bsz,
                needed=g.needed,
                cached_tokens=g.cached_tokens,
                moved=g.tokens,
                tokens=tokens,
                blocks=blocks,
                moves_state=g.moves_state if g.group.is_state else None,
                bytes=g.bytes,
            )
        )
    return tuple(out)


def with_window(spec: KVCacheSpec, window: int, *, group: str | None = None) -> KVCacheSpec:
    """``spec`` with the sliding window of ``group`` (default: its only sliding group) set to
    ``window`` tokens; a group named ``f"sliding{W}"`` is renamed ``f"sliding{window}"``."""
    from dataclasses import replace

    sliding = [g for g in spec.groups if g.kind.has_window]
    if group is None:
        if len(sliding) != 1:
            raise ValueError(
                f"spec {spec.name!r} has {len(sliding)} sliding groups "
                f"({[g.name for g in sliding]}); name the one to change"
            )
        target = sliding[0]
    else:
        target = spec.group(group)
        if not target.kind.has_window:
            raise ValueError(
                f"group {group!r} of spec {spec.name!r} is {target.kind.value!r}, "
                "not a sliding-window group"
            )
    name = target.name
    if name == f"sliding{target.window}":
        name = f"sliding{window}"
        if name != target.name and name in spec.group_names:
            raise ValueError(f"spec {spec.name!r} already has a group named {name!r}")
    new = replace(target, name=name, window=window)
    groups = tuple(new if g is target else g for g in spec.groups)
    return replace(spec, groups=groups)


def alignment_plans(
    spec: KVCacheSpec,
    num_tokens: int,
    cached: Mapping[str, int],
    *,
    window: int | None = None,
    num_draft_tokens: int = 0,
) -> dict[str, TransferPlan]:
    """:func:`~kvtriton.plan.compare_policies` for a what-if: ``cached`` maps a group name or
    a kind (``"full"`` / ``"sliding"`` / ``"state"``: every group of that kind; a name wins
    over a kind) to its cached token count; ``window`` replaces the sliding window first
    (:func:`with_window`). Groups not named count as 0 cached."""
    from kvtriton.plan import compare_policies

    if window is not None:
        spec = with_window(spec, window)
    kinds = tuple(k.value for k in GroupKind)
    unknown = sorted(k for k in cached if k not in spec.group_names and k not in kinds)
    if unknown:
        raise ValueError(
            f"cached names unknown groups or kinds {unknown}; spec {spec.name!r} "
            f"has groups {list(spec.group_names)} and kinds {list(kinds)}"
        )
    counts = {
        g.name: cached[g.name] if g.name in cached else cached.get(g.kind, 0) for g in spec.groups
    }
    return compare_policies(spec, num_tokens, counts, num_draft_tokens=num_draft_tokens)


def _plans_of(plans: TransferPlan | Mapping[str, TransferPlan]) -> dict[str, TransferPlan]:
    from kvtriton.plan import TransferPlan

    if isinstance(plans, TransferPlan):
        return {plans.mode: plans}
    out = {p: plans[p] for p in ReusePolicy.table_order() if p in plans}
    out.update({k: v for k, v in plans.items() if k not in out})
    if not out:
        raise ValueError("no plan to draw")
    return out


def _draw_block_map(ax: Any, maps: Sequence[GroupMap], title: str, max_block_lines: int) -> None:
    import numpy as np
    from matplotlib.colors import ListedColormap

    length = max((len(m.tokens) for m in maps), default=0) or maps[0].num_tokens
    rows, labels, notes = [], [], []
    for m in maps:
        if m.kind.has_state:
            rows.append([MOVED if m.moves_state else CACHED] * length)
            labels.append(f"{m.name} · state")
            notes.append(
                f"{'state moves whole' if m.moves_state else 'state kept'}: {format_bytes(m.bytes)}"
            )
            continue
        rows.append(list(m.tokens))
        labels.append(f"{m.name} · tokens")
        notes.append(f"{format_count(len(m.moved))} tok: {format_bytes(m.bytes)}")
        bsz = m.tokens_per_block
        rows.append([m.blocks[q // bsz] for q in range(length)])
        labels.append(f"{m.name} · blocks")
        touched = m.count(MOVED, unit="blocks") + m.count(PARTLY_MOVED, unit="blocks")
        notes.append(f"{format_count(touched)} of {len(m.blocks)} blocks sent")
    image = np.array(rows, dtype=float)
    cmap = ListedColormap(_STATUS_COLORS)
    ax.imshow(
        image,
        cmap=cmap,
        vmin=-0.5,
        vmax=len(_STATUS_COLORS) - 0.5,
        aspect="auto",
        interpolation="nearest",
        extent=(0, length, len(rows), 0),
    )
    ax.set_yticks([i + 0.5 for i in range(len(rows))], labels, fontsize=8)
    ax.tick_params(axis="y", length=0)
    r = 0
    for m in maps:
        if m.kind.has_state:
            r += 1
            continue
        nblocks = len(m.blocks)
        if nblocks <= max_block_lines:
            ax.vlines(
                [b * m.tokens_per_block for b in range(1, nblocks)],
                r + 1,
                r + 2,
                colors="white",
                linewidth=0.8,
            )
        r += 2
        if r < len(rows):
            ax.axhline(r, color="black", linewidth=0.8)
    for i, note in enumerate(notes):
        ax.annotate(
            note,
            (1.01, 1 - (i + 0.5) / len(rows)),
            xycoords="axes fraction",
            va="center",
            fontsize=8,
        )
    ax.set_xlim(0, length)
    ax.set_title(title, fontsize=10, loc="left")


def plot_block_maps(
    plans: TransferPlan | Mapping[str, TransferPlan],
    path: str | os.PathLike[str] | None = None,
    *,
    tokens_per_block: int | None = None,
    title: str | None = None,
    max_block_lines: int = 96,
) -> Any:
    """Block maps of one plan or of :func:`~kvtriton.plan.compare_policies` output: one panel
    per policy, per attention group a row of token positions ``[0, P + drafts)`` and a row of
    blocks (at ``tokens_per_block``), per state group one row; colours by status (see
    :data:`STATUS_NAMES`), bytes moved on the right. Block borders are drawn when a group has
    at most ``max_block_lines`` blocks. Saves to ``path`` when given; returns the Figure."""
    Figure = figure_class()
    from matplotlib.patches import Patch

    chosen = _plans_of(plans)
    maps = {
        policy: block_maps(plan, tokens_per_block=tokens_per_block)
        for policy, plan in chosen.items()
    }
    nrows = [sum(1 if m.kind.has_state else 2 for m in ms) for ms in maps.values()]
    fig = Figure(figsize=(11, 0.9 + sum(0.32 * n + 0.45 for n in nrows)), layout="constrained")
    axes = fig.subplots(len(maps), 1, sharex=True, height_ratios=nrows, squeeze=False)[:, 0]
    for ax, (policy, plan) in zip(axes, chosen.items(), strict=True):
        boundary = ""
        if policy == ReusePolicy.SINGLE_BOUNDARY:
            boundary = f", c = {format_count(plan.groups[0].cached_tokens)} for every group"
        head = f"{_label(policy)}: {format_bytes(plan.total_bytes)}{boundary}"
        _draw_block_map(ax, maps[policy], head, max_block_lines)
    axes[-1].set_xlabel("token position")
    plan0 = next(iter(chosen.values()))
    drafts = f" + {plan0.num_draft_tokens} draft" if plan0.num_draft_tokens else ""
    bsz = tokens_per_block or plan0.spec.tokens_per_block
    fig.suptitle(
        title
        or f"{plan0.spec.name}: P = {format_count(plan0.num_tokens)}{drafts} "
        f"tokens, {bsz} tokens/block",
        fontsize=11,
    )
    used = sorted(
        {c for ms in maps.values() for m in ms for c in (*m.tokens, *m.blocks)} | {MOVED, CACHED}
    )
    fig.legend(
        [Patch(color=_STATUS_COLORS[c]) for c in used],
        [STATUS_NAMES[c] for c in used],
        loc="outside lower center",
        ncols=min(len(used), 3),
        fontsize=8,
        frameon=False,
    )
    return save(fig, path)


def plot_plan_bytes(
    plans: Mapping[str, TransferPlan],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
    ax: Any = None,
) -> Any:
    """Bytes one request moves per policy, bars stacked by layer group, totals on top (one
    request's :func:`~kvtriton.plan.compare_policies` output). Draws into ``ax`` when given,
    else a new Figure (saved to ``path`` when given); returns the Figure."""
    chosen = _plans_of(plans)
    order = ReusePolicy.baseline_order()
    policies = [p for p in order if p in chosen] + [p for p in chosen if p not in order]
    if ax is None:
        Figure = figure_class()
        fig = Figure(figsize=(6, 3.6), layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.figure
    total = max(chosen[p].total_bytes for p in policies)
    scale, unit = byte_scale(total)
    bottom = [0.0] * len(policies)
    for g in chosen[policies[0]].groups:
        heights = [chosen[p].group(g.name).bytes / scale for p in policies]
        ax.bar(range(len(policies)), heights, bottom=bottom, label=g.name, width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for i, p in enumerate(policies):
        ax.annotate(
            format_bytes(chosen[p].total_bytes),
            (i, bottom[i]),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_xticks(range(len(policies)), [_label(p) for p in policies])
    ax.set_ylabel(f"bytes moved ({unit})")
    ax.set_ylim(0, max(bottom) * 1.18 or 1)
    ax.legend(title="layer group", fontsize=8)
    plan0 = chosen[policies[0]]
    ax.set_title(
        title or f"{plan0.spec.name}, P = {format_count(plan0.num_tokens)}: bytes per policy",
        fontsize=10,
    )
    return save(fig, path)


def _label(policy: str) -> str:
    """A policy's title (its name when it is no :class:`ReusePolicy`)."""
    try:
        return ReusePolicy(policy).label
    except ValueError:
        return str(policy)
