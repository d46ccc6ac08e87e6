"""Plots for the notebooks and ``kvtriton simulate --plot`` (matplotlib, imported on use)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvtriton.table import format_bytes, format_count

if TYPE_CHECKING:
    from kvtriton.plan import TransferPlan
    from kvtriton.ranges import TokenRange
    from kvtriton.sim import SimResult
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
    "compare_backends",
    "plot_block_maps",
    "plot_kernel_bandwidth",
    "plot_plan_bytes",
    "plot_policy_summary",
    "plot_simulation",
    "plot_sweep",
    "plot_transfer_report",
    "with_window",
]

_POLICY_ORDER = ("no_reuse", "single_boundary", "per_group")
_POLICY_TITLES = {
    "no_reuse": "no reuse",
    "single_boundary": "single boundary",
    "per_group": "per-group",
}


def plot_simulation(
    result: SimResult, path: str | os.PathLike[str] | None = None, *, title: str | None = None
) -> Any:
    """Two panels: bytes moved per policy (bars stacked by layer group, GiB) and each group's
    hit rate per policy. Saves to ``path`` (any format matplotlib knows, by extension) when
    given; returns the ``matplotlib.figure.Figure``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'kvtriton[notebooks]'") from None
    policies = [p for p in _POLICY_ORDER if p in result.policies]
    groups = [g.name for g in result[policies[0]].groups]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_bytes, ax_hit = fig.subplots(1, 2, width_ratios=(1, 1.3))
    gib = 1024**3
    x = range(len(policies))
    bottom = [0.0] * len(policies)
    for name in groups:
        heights = [result[p].group(name).bytes / gib for p in policies]
        ax_bytes.bar(x, heights, bottom=bottom, label=name, width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for i, p in enumerate(policies):
        ax_bytes.annotate(
            format_bytes(result[p].total_bytes),
            (i, bottom[i]),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax_bytes.set_xticks(list(x), [_POLICY_TITLES[p] for p in policies])
    ax_bytes.set_ylabel("bytes moved (GiB)")
    ax_bytes.set_ylim(0, max(bottom) * 1.15 or 1)
    ax_bytes.legend(title="layer group", fontsize=8)
    ax_bytes.set_title("bytes the receiver pulls")

    width = 0.8 / len(policies)
    for k, p in enumerate(policies):
        rates = [100 * result[p].group(name).hit_rate for name in groups]
        pos = [i + (k - (len(policies) - 1) / 2) * width for i in range(len(groups))]
        ax_hit.bar(pos, rates, width=width, label=_POLICY_TITLES[p])
    ax_hit.set_xticks(range(len(groups)), groups)
    ax_hit.set_ylabel("hit rate (% of needed positions cached)")
    ax_hit.set_ylim(0, 105)
    ax_hit.legend(fontsize=8)
    ax_hit.set_title("per-group hit rate")
    t = result.trace
    fig.suptitle(
        title or f"{result.spec_name}, trace {t.get('name')!r} ({t.get('requests')} requests)"
    )
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig


# =============================================================================================
# Block maps (notebooks/01_alignment): which positions and blocks of each layer group the
# receiver reuses, receives or does not need, under each reuse policy.
# =============================================================================================

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
    kind: str
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
        if g.kind == "state":
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
                moves_state=g.moves_state if g.kind == "state" else None,
                bytes=g.bytes,
            )
        )
    return tuple(out)


def with_window(spec: KVCacheSpec, window: int, *, group: str | None = None) -> KVCacheSpec:
    """``spec`` with the sliding window of ``group`` (default: its only sliding group) set to
    ``window`` tokens; a group named ``f"sliding{W}"`` is renamed ``f"sliding{window}"``."""
    from dataclasses import replace

    sliding = [g for g in spec.groups if g.kind == "sliding"]
    if group is None:
        if len(sliding) != 1:
            raise ValueError(
                f"spec {spec.name!r} has {len(sliding)} sliding groups "
                f"({[g.name for g in sliding]}); name the one to change"
            )
        target = sliding[0]
    else:
        target = spec.group(group)
        if target.kind != "sliding":
            raise ValueError(
                f"group {group!r} of spec {spec.name!r} is {target.kind!r}, "
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
    kinds = ("full", "sliding", "state")
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
    out = {p: plans[p] for p in (*_POLICY_ORDER[::-1],) if p in plans}
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
        if m.kind == "state":
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
        if m.kind == "state":
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
    Figure = _figure_class()
    from matplotlib.patches import Patch

    chosen = _plans_of(plans)
    maps = {
        policy: block_maps(plan, tokens_per_block=tokens_per_block)
        for policy, plan in chosen.items()
    }
    nrows = [sum(1 if m.kind == "state" else 2 for m in ms) for ms in maps.values()]
    fig = Figure(figsize=(11, 0.9 + sum(0.32 * n + 0.45 for n in nrows)), layout="constrained")
    axes = fig.subplots(len(maps), 1, sharex=True, height_ratios=nrows, squeeze=False)[:, 0]
    for ax, (policy, plan) in zip(axes, chosen.items(), strict=True):
        boundary = ""
        if policy == "single_boundary":
            boundary = f", c = {format_count(plan.groups[0].cached_tokens)} for every group"
        head = f"{_POLICY_TITLES.get(policy, policy)}: {format_bytes(plan.total_bytes)}{boundary}"
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
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig


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
    policies = [p for p in _POLICY_ORDER if p in chosen] + [
        p for p in chosen if p not in _POLICY_ORDER
    ]
    if ax is None:
        Figure = _figure_class()
        fig = Figure(figsize=(6, 3.6), layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.figure
    total = max(chosen[p].total_bytes for p in policies)
    scale, unit = _byte_scale(total)
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
    ax.set_xticks(range(len(policies)), [_POLICY_TITLES.get(p, p) for p in policies])
    ax.set_ylabel(f"bytes moved ({unit})")
    ax.set_ylim(0, max(bottom) * 1.18 or 1)
    ax.legend(title="layer group", fontsize=8)
    plan0 = chosen[policies[0]]
    ax.set_title(
        title or f"{plan0.spec.name}, P = {format_count(plan0.num_tokens)}: bytes per policy",
        fontsize=10,
    )
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig


def _byte_scale(nbytes: int) -> tuple[int, str]:
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if nbytes >= 1024**power:
            return 1024**power, unit
    return 1, "B"


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'kvtriton[notebooks]'") from None
    return Figure


# =============================================================================================
# Kernels (notebooks/02_kernels): backends side by side, bandwidth against the copy limit.
# =============================================================================================


def compare_backends(
    *, device: str = "cpu", seed: int = 0, backends: tuple[str, str] = ("triton", "reference")
) -> list[dict[str, Any]]:
    """Run a fixed set of small paged moves on two kernel backends from identical inputs and
    compare every output bit for bit.

    Cases: gather with a range starting and ending inside blocks; gather from an HND pool with
    a layer subset and a head sub-range; scatter into the middle of blocks (the whole pool is
    compared, so untouched neighbours count); copy between a 4-token NHD pool and an 8-token
    HND pool (block-size change plus layout conversion); a state slot round trip; and a whole
    request of ``tiny-hybrid`` (per-group plan, packed layout) packed on a 4-token NHD sender
    and unpacked on an 8-token HND receiver.

    Returns one dict per case: ``case``, ``bytes`` (payload moved), ``equal`` (every output
    identical on both backends), ``oracle`` (the first backend's output checked position by
    position with plain indexing: the gather against the pool's blocks, the request's received
    KV and state against the sender's; ``None`` where there is no such check) and ``ms`` per
    backend (wall time of the one call; the Triton
    interpreter on CPU is slow by design). ``backend="triton"`` on CPU needs
    ``TRITON_INTERPRET=1`` before ``kvtriton.kernels`` first runs a Triton kernel.
    """
    import time

    import torch

    from kvtriton import kernels as K
    from kvtriton.cache import allocate_pools
    from kvtriton.layout import packed_layout
    from kvtriton.plan import plan_transfer
    from kvtriton.ranges import BlockSpan, TokenRange
    from kvtriton.spec import preset

    gen = torch.Generator().manual_seed(seed)

    def random_(t: torch.Tensor) -> torch.Tensor:
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
        return t

    def pool(
        layout: str, tpb: int, blocks: int = 12, layers: int = 3, heads: int = 4, dim: int = 16
    ) -> torch.Tensor:
        if layout == "NHD":
            return random_(
                torch.empty(
                    (layers, blocks, 2, tpb, heads, dim), dtype=torch.bfloat16, device=device
                )
            )
        phys = random_(
            torch.empty((layers, blocks, 2, heads, tpb, dim), dtype=torch.bfloat16, device=device)
        )
        return phys.permute(0, 1, 2, 4, 3, 5)

    def span(tokens: TokenRange, tpb: int, blocks: int = 12) -> BlockSpan:
        r = tokens.blocks(tpb)
        ids = torch.randperm(blocks, generator=gen)[: len(r)].tolist()
        return BlockSpan(r.start, ids)

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(torch.uint8)

    def same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
        return all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b, strict=True))

    Check = Callable[[list[torch.Tensor]], bool] | None
    cases: list[tuple[str, int, Callable[[str], list[torch.Tensor]], Check]] = []

    src = pool("NHD", 4)
    t1 = TokenRange(5, 27)
    s1 = span(t1, 4)
    cases.append(
        (
            f"gather [{t1.start}, {t1.end}) from 4-token NHD blocks (starts/ends inside blocks)",
            int(src[:, 0, :, 0].numel()) * len(t1) * 2,
            lambda b: [K.gather(src, s1, t1, backend=b)],
            lambda outs: all(
                torch.equal(
                    bits(outs[0][:, :, q - t1.start]), bits(src[:, s1.block_id(q // 4), :, q % 4])
                )
                for q in t1
            ),
        )
    )

    hnd = pool("HND", 4)
    t2 = TokenRange(3, 22)
    s2 = span(t2, 4)
    cases.append(
        (
            f"gather [{t2.start}, {t2.end}), HND pool, layers [2, 0], heads [1, 3)",
            2 * 2 * len(t2) * 2 * 16 * 2,
            lambda b: [K.gather(hnd, s2, t2, layers=[2, 0], heads=(1, 3), backend=b)],
            None,
        )
    )

    t3 = TokenRange(6, 19)
    s3 = span(t3, 4)
    packed3 = random_(torch.empty((3, 2, len(t3), 4, 16), dtype=torch.bfloat16, device=device))
    dst3 = pool("NHD", 4)

    def scatter(b: str) -> list[torch.Tensor]:
        out = dst3.clone()
        K.scatter(packed3, out, s3, t3, backend=b)
        return [out]

    cases.append(
        (
            f"scatter into [{t3.start}, {t3.end}) of 4-token NHD blocks (whole pool compared)",
            packed3.numel() * 2,
            scatter,
            None,
        )
    )

    t4 = TokenRange(3, 30)
    s4_src, s4_dst = span(t4, 4), span(t4, 8, blocks=6)
    dst4 = pool("HND", 8, blocks=6)

    def copy(b: str) -> list[torch.Tensor]:
        out = dst4.clone()  # a clone of a permuted view keeps its HND strides
        K.copy(src, s4_src, out, s4_dst, t4, backend=b)
        return [out]

    cases.append(
        (
            f"copy [{t4.start}, {t4.end}): 4-token NHD -> 8-token HND (block size + layout)",
            3 * 2 * len(t4) * 4 * 16 * 2,
            copy,
            None,
        )
    )

    state_pool = random_(torch.empty((2, 6, 4, 8, 8), dtype=torch.float32, device=device))

    def state(b: str) -> list[torch.Tensor]:
        out = state_pool.clone()
        dense = K.gather_state(out, 2, backend=b)
        K.scatter_state(dense, out, 5, backend=b)
        return [dense, out]

    cases.append(
        (
            "state slot 2 -> packed -> slot 5",
            2 * 4 * 8 * 8 * 4,
            state,
            lambda outs: torch.equal(outs[1][:, 5], state_pool[:, 2]),
        )
    )

    spec = preset("tiny-hybrid")
    recv_spec = spec.with_block_size(8)
    p = 30
    plan = plan_transfer(spec, p, {"full": 13, "sliding8": 0, "state": 0})
    layout = packed_layout(
        spec, {g.name: g.tokens for g in plan.groups if g.kind != "state"}, plan.state_groups
    )
    send = allocate_pools(spec, 16, num_state_slots=4, device=device, layout="NHD")
    for t in (*send.kv.values(), *send.state.values()):
        random_(t)
    recv = allocate_pools(recv_spec, 8, num_state_slots=4, device=device, layout="HND")
    send_spans = {g.name: span(g.tokens, 4, 16) for g in plan.groups if g.kind != "state"}
    recv_spans = {g.name: span(g.tokens, 8, 8) for g in plan.groups if g.kind != "state"}

    def request(b: str) -> list[torch.Tensor]:
        buf = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
        K.pack_request(
            spec, layout, {**send.kv, **send.state}, send_spans, {"state": 1}, buf, backend=b
        )
        pools = {name: t.clone() for name, t in (*recv.kv.items(), *recv.state.items())}
        K.unpack_request(recv_spec, layout, buf, pools, recv_spans, {"state": 3}, backend=b)
        return [buf, *pools.values()]

    def received(outs: list[torch.Tensor]) -> bool:
        pools = dict(zip((*recv.kv, *recv.state), outs[1:], strict=True))
        ok = torch.equal(pools["state"][:, 3], send.state["state"][:, 1])
        for g in plan.groups:
            if g.kind == "state":
                continue
            for q in g.tokens:
                got = pools[g.name][:, recv_spans[g.name].block_id(q // 8), :, q % 8]
                want = send.kv[g.name][:, send_spans[g.name].block_id(q // 4), :, q % 4]
                ok = ok and torch.equal(bits(got), bits(want))
        return ok

    cases.append(
        (
            f"tiny-hybrid request, P = {p}, full cached 13: pack (NHD, 4) -> unpack (HND, 8)",
            layout.nbytes,
            request,
            received,
        )
    )

    rows = []
    for name, nbytes, run, check in cases:
        outs, ms = [], {}
        for b in backends:
            start = time.perf_counter()
            got = run(b)
            if device != "cpu":
                torch.cuda.synchronize()
            ms[b] = 1e3 * (time.perf_counter() - start)
            outs.append(got)
        rows.append(
            {
                "case": name,
                "bytes": nbytes,
                "equal": same(outs[0], outs[1]),
                "oracle": None if check is None else bool(check(outs[0])),
                "ms": ms,
            }
        )
    return rows


def plot_kernel_bandwidth(
    bench: Mapping[str, Any],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
) -> Any:
    """Bandwidth per case of :func:`kvtriton.kernels.bench.run_benchmark` output: kvtriton,
    torch (one indexing call; per-layer loop) and a contiguous copy of the same bytes (the
    limit), in GB/s of bytes read + written. Returns the Figure (saved to ``path`` if given)."""
    import math

    Figure = _figure_class()
    cases = list(bench["cases"])
    if not cases:
        raise ValueError("the benchmark result holds no case")
    series = (
        ("kvtriton", "kvtriton (Triton)"),
        ("torch_1call", "torch, one indexing call"),
        ("torch_loop", "torch, one call per layer"),
        ("copy", "contiguous copy (limit)"),
    )
    fig = Figure(figsize=(10, 0.3 * len(cases) + 1.4), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(series)
    for k, (key, label) in enumerate(series):
        values = [c["gbs"].get(key, math.nan) for c in cases]
        pos = [i + (k - (len(series) - 1) / 2) * height for i in range(len(cases))]
        ax.barh(pos, [0 if math.isnan(v) else v for v in values], height=height, label=label)
    labels = [
        f"{c['op']} {c['src']} -> {c['dst']}, start {c['start']}, "
        f"{format_count(c['tokens'])} tok ({c['mib']:.0f} MiB)"
        for c in cases
    ]
    ax.set_yticks(range(len(cases)), labels, fontsize=7)
    ax.set_ylim(len(cases) - 0.5, -0.5)
    ax.set_xlabel("GB/s (bytes read + written)")
    fig.legend(
        *ax.get_legend_handles_labels(),
        loc="outside lower center",
        ncols=len(series),
        fontsize=8,
        frameon=False,
    )
    ax.set_title(
        title
        or f"paged KV moves on {bench.get('device', '?')} "
        f"(torch {bench.get('torch', '?')}, triton {bench.get('triton', '?')})",
        fontsize=10,
    )
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig


# =============================================================================================
# Simulations across models and settings (notebooks/03_hybrid_reuse).
# =============================================================================================


def plot_policy_summary(
    results: Mapping[str, SimResult],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
) -> Any:
    """One group of bars per simulation (e.g. per model): bytes each policy moved, as a
    percentage of what ``no_reuse`` moved in the same simulation (absolute bytes on the bars),
    and the per-group saving over single-boundary above each group. Returns the Figure."""
    Figure = _figure_class()
    if not results:
        raise ValueError("no simulation result to plot")
    labels = list(results)
    fig = Figure(figsize=(max(6.0, 1.7 * len(labels) + 2), 4.4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(_POLICY_ORDER)
    tops = [0.0] * len(labels)
    for k, policy in enumerate(_POLICY_ORDER):
        pos, heights, texts = [], [], []
        for i, label in enumerate(labels):
            r = results[label]
            if policy not in r.policies:
                continue
            base = r["no_reuse"].total_bytes if "no_reuse" in r.policies else None
            moved = r[policy].total_bytes
            pct = 100 * moved / base if base else 0.0
            pos.append(i + (k - (len(_POLICY_ORDER) - 1) / 2) * width)
            heights.append(pct)
            texts.append(format_bytes(moved))
            tops[i] = max(tops[i], pct)
        bars = ax.bar(pos, heights, width=width, label=_POLICY_TITLES[policy])
        ax.bar_label(bars, texts, fontsize=6.5, rotation=90, padding=2)
    for i, label in enumerate(labels):
        r = results[label]
        if "per_group" in r.policies and "single_boundary" in r.policies:
            _, frac = r.savings("per_group", "single_boundary")
            ax.annotate(
                f"per-group saves\n{100 * frac:.0f}% vs single",
                (i, tops[i]),
                xytext=(0, 34),
                textcoords="offset points",
                ha="center",
                fontsize=8,
            )
    ax.set_xticks(range(len(labels)), labels, fontsize=9)
    ax.set_ylabel("bytes moved (% of no reuse)")
    ax.set_ylim(0, max(tops) * 1.4 or 1)
    fig.legend(
        *ax.get_legend_handles_labels(),
        loc="outside lower center",
        ncols=len(_POLICY_ORDER),
        fontsize=8,
        frameon=False,
    )
    ax.set_title(title or "bytes the receiver pulls, per reuse policy", fontsize=10)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig


def plot_sweep(
    results: Mapping[float, SimResult],
    xlabel: str,
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
    logx: bool = False,
) -> Any:
    """Total bytes moved per policy against a swept setting (``{x: SimResult}``, e.g. cache
    capacity), with the per-group saving over single-boundary on a second axis. Returns the
    Figure (saved to ``path`` if given)."""
    Figure = _figure_class()
    if not results:
        raise ValueError("no simulation result to plot")
    xs = sorted(results)
    fig = Figure(figsize=(7.5, 4), layout="constrained")
    ax = fig.subplots()
    scale, unit = _byte_scale(max(r[p].total_bytes for r in results.values() for p in r.policies))
    for policy in _POLICY_ORDER:
        if all(policy in results[x].policies for x in xs):
            ax.plot(
                xs,
                [results[x][policy].total_bytes / scale for x in xs],
                marker="o",
                label=_POLICY_TITLES[policy],
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"bytes moved ({unit})")
    ax.set_ylim(bottom=0)
    if logx:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(xs, [format_count(x) if float(x).is_integer() else f"{x:g}" for x in xs])
    handles, labels = ax.get_legend_handles_labels()
    if all({"per_group", "single_boundary"} <= set(results[x].policies) for x in xs):
        ax2 = ax.twinx()
        (line,) = ax2.plot(
            xs,
            [100 * results[x].savings()[1] for x in xs],
            color="black",
            linestyle="--",
            marker=".",
            label="per-group saving vs single (%)",
        )
        ax2.set_ylabel("saving (%)")
        ax2.set_ylim(0, 100)
        handles.append(line)
        labels.append(line.get_label())
    ax.legend(handles, labels, fontsize=8, loc="best")
    first = results[xs[0]]
    ax.set_title(title or f"{first.spec_name}, trace {first.trace.get('name')!r}", fontsize=10)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig


# =============================================================================================
# Distributed transfers (notebooks/04_distributed).
# =============================================================================================


def plot_transfer_report(
    report: Mapping[str, Any],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
) -> Any:
    """A :func:`kvtriton.transfer.experiment.launch_local` report: bytes moved per mode (bars
    stacked by layer group, plus what no reuse would have moved), and bytes per request (summed
    over the generation ranks), turn by turn. Returns the Figure (saved to ``path`` if given)."""
    import re

    Figure = _figure_class()
    modes = [m for m in ("single_boundary", "per_group") if m in report["modes"]] + [
        m for m in report["modes"] if m not in ("single_boundary", "per_group")
    ]
    if not modes:
        raise ValueError("the report holds no mode")
    groups = list(report["modes"][modes[0]]["groups"])
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_total, ax_req = fig.subplots(1, 2, width_ratios=(1, 1.6))

    columns = ["no_reuse", *modes]
    scale, unit = _byte_scale(
        max(
            [report["modes"][m]["bytes"] for m in modes]
            + [report["modes"][modes[0]]["no_reuse_bytes"]]
        )
    )
    bottom = [0.0] * len(columns)
    for g in groups:
        heights = [report["modes"][modes[0]]["groups"][g]["no_reuse_bytes"] / scale]
        heights += [report["modes"][m]["groups"][g]["bytes"] / scale for m in modes]
        ax_total.bar(range(len(columns)), heights, bottom=bottom, width=0.6, label=g)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for i, top in enumerate(bottom):
        ax_total.annotate(
            format_bytes(round(top * scale)),
            (i, top),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax_total.set_xticks(range(len(columns)), [_POLICY_TITLES.get(c, c) for c in columns])
    ax_total.set_ylabel(f"bytes moved ({unit})")
    ax_total.set_ylim(0, max(bottom) * 1.15 or 1)
    ax_total.legend(title="layer group", fontsize=8)
    ax_total.set_title("whole stream, all receivers", fontsize=10)

    per_request: dict[str, dict[str, int]] = {m: {} for m in modes}
    for rank in report.get("ranks", []):
        if rank.get("side") != "gen":
            continue
        for m in modes:
            for q in rank["modes"][m]["requests"]:
                rid = q["rid"].split("/", 1)[-1]
                per_request[m][rid] = per_request[m].get(rid, 0) + sum(q["bytes_by_group"].values())

    def order(rid: str) -> tuple[int, int, str]:
        found = re.fullmatch(r"c(\d+)t(\d+)", rid)
        return (int(found[2]), int(found[1]), rid) if found else (1 << 30, 0, rid)

    rids = sorted({r for m in modes for r in per_request[m]}, key=order)
    if rids:
        width = 0.8 / len(modes)
        for k, m in enumerate(modes):
            pos = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(rids))]
            ax_req.bar(
                pos,
                [per_request[m].get(r, 0) / 1024 for r in rids],
                width=width,
                label=_POLICY_TITLES.get(m, m),
                color=f"C{_POLICY_ORDER.index(m) if m in _POLICY_ORDER else 5}",
            )
        ax_req.set_xticks(range(len(rids)), rids, fontsize=8)
        ax_req.set_xlabel("request (conversation c, turn t)")
        ax_req.set_ylabel("KiB moved")
        ax_req.legend(fontsize=8)
    ax_req.set_title(
        "per request: turn 0 is cold, later turns reuse the receiver's cache", fontsize=10
    )
    fig.suptitle(
        title
        or f"{report['model']}: {report['topology']}, data over "
        f"{report['data_backend']} on {report['device']}"
        + ("" if report.get("verified") else " (NOT VERIFIED)"),
        fontsize=11,
    )
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig
