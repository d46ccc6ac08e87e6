"""Shared test support: small hybrid specs, brute-force oracles of DESIGN.md §1 and
position-derived pool contents.

The oracles here are deliberately written from the definitions, position by position, and
never call the code they check (:func:`~kvtriton.ranges.needed_range`, the cache manager's
matching): tests compare the package against them. Everything but the tensor helpers is pure
Python; the tensor helpers take torch tensors (torch is imported for :data:`DEVICES` only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from kvtriton.ranges import BlockSpan, GroupKind, TokenRange
from kvtriton.spec import KVCacheSpec, LayerGroup

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEVICES",
    "brute_force_match",
    "fill_positions",
    "hybrid_spec",
    "moved_positions",
    "needed_positions",
    "position_value",
    "read_positions",
    "write_positions",
]


def _devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


#: Devices tests run kernels and pools on: the CPU, and CUDA when there is a GPU.
DEVICES: list[str] = _devices()


# -- specs ---------------------------------------------------------------------------------


def hybrid_spec(
    tokens_per_block: int = 4,
    *,
    window: int = 6,
    num_kv_heads: int = 2,
    head_dim: int = 2,
    sliding_heads: int | None = None,
    full_layers: Sequence[int] = (0, 3),
    sliding_layers: Sequence[int] = (1,),
    state_layers: Sequence[int] | None = (2,),
    state_shape: tuple[int, ...] = (2, 3),
    dtype: str = "float32",
    name: str = "test-hybrid",
) -> KVCacheSpec:
    """A small hybrid: ``full`` (full attention), ``swa`` (sliding window ``window``) and,
    unless ``state_layers`` is ``None``, ``ssm`` (a float32 state of ``state_shape``)."""
    groups = [
        LayerGroup("full", GroupKind.FULL, tuple(full_layers), num_kv_heads, head_dim),
        LayerGroup(
            "swa",
            GroupKind.SLIDING,
            tuple(sliding_layers),
            sliding_heads or num_kv_heads,
            head_dim,
            window=window,
        ),
    ]
    if state_layers is not None:
        groups.append(
            LayerGroup(
                "ssm",
                GroupKind.STATE,
                tuple(state_layers),
                state_shape=state_shape,
                state_dtype="float32",
            )
        )
    return KVCacheSpec(tuple(groups), tokens_per_block=tokens_per_block, dtype=dtype, name=name)


# -- oracles of DESIGN.md §1 ------------------------------------------------------------------


def needed_positions(kind: str, window: int | None, prompt: int) -> set[int]:
    """Positions whose KV the query at ``q = P`` reads, excluding ``q`` itself (computed at
    decode): keys in ``(q - W, q]`` (``W`` infinite for full attention); none for a state."""
    kind = GroupKind(kind)
    if kind is GroupKind.STATE:
        return set()
    q = prompt
    if kind is GroupKind.FULL:
        return {k for k in range(prompt) if k <= q}
    assert window is not None
    return {k for k in range(prompt) if q - window < k <= q}


def moved_positions(kind: str, window: int | None, prompt: int, cached: int) -> set[int]:
    """Needed positions the receiver does not hold (it holds every needed position below
    ``cached``)."""
    return {k for k in needed_positions(kind, window, prompt) if not k < cached}


def brute_force_match(
    spec: KVCacheSpec, num_tokens: int, have: Mapping[str, Sequence[bool]]
) -> tuple[dict[str, int], int]:
    """Per-group cached counts and the single boundary a prefix cache gives a prompt of
    ``num_tokens`` tokens, from the definitions, over every position (not only block
    boundaries). ``have[group][b]``: the cache holds logical block ``b`` of the prompt (for a
    state group: a snapshot at ``(b + 1) * B``)."""
    p, bsz = num_tokens, spec.tokens_per_block

    def holds(group: str, lo: int, hi: int) -> bool:  # every block touching [lo, hi)
        blocks = range(lo // bsz, (hi + bsz - 1) // bsz)
        return all(b < len(have[group]) and have[group][b] for b in blocks)

    def snapshot_at(group: str, c: int) -> bool:
        return c % bsz == 0 and have[group][c // bsz - 1]

    cached: dict[str, int] = {}
    ok = [True] * (p + 1)
    for g in spec.groups:
        if g.kind is GroupKind.FULL:
            cached[g.name] = max(c for c in range(p + 1) if holds(g.name, 0, c))
            for c in range(p + 1):
                ok[c] = ok[c] and holds(g.name, 0, c)
        elif g.kind is GroupKind.SLIDING:
            assert g.window is not None
            start = max(0, p + 1 - g.window)
            best = max(
                c for c in range(start, p + 1) if c == start or holds(g.name, start // bsz * bsz, c)
            )
            # whole blocks are held: a run past needed.start ends on a block boundary
            cached[g.name] = (best + bsz - 1) // bsz * bsz if best > start else start
            for c in range(p + 1):
                ok[c] = ok[c] and holds(g.name, max(0, c + 1 - g.window), c)
        else:
            cached[g.name] = p if snapshot_at(g.name, p) else 0
            for c in range(1, p + 1):
                ok[c] = ok[c] and snapshot_at(g.name, c)
    return cached, max(c for c in range(p + 1) if ok[c])


# -- position-derived pool contents ------------------------------------------------------------


def position_value(group: str, layer: int, kv: int, position: int, token: int, head: int) -> float:
    """A value that names its group, layer, K/V, position, token id and head: a move that
    lands a value anywhere else is visible (float32-exact for the small sizes of tests)."""
    return float(
        token * 1000
        + position * 10
        + kv * 5
        + head
        + layer * 0.5
        + (100_000_000 if group == "swa" else 0)
    )


def fill_positions(
    pool: torch.Tensor,
    group: str,
    span: BlockSpan,
    positions: TokenRange,
    tokens: Sequence[int],
    tokens_per_block: int,
) -> None:
    """Write :func:`position_value` at ``positions`` of a 6-D pool view through ``span``."""
    bsz = tokens_per_block
    for p in positions:
        block = span.block_id(p // bsz)
        for layer in range(pool.shape[0]):
            for kv in range(pool.shape[2]):
                for head in range(pool.shape[4]):
                    pool[layer, block, kv, p % bsz, head] = position_value(
                        group, layer, kv, p, tokens[p], head
                    )


def read_positions(
    pool: torch.Tensor, span: BlockSpan, positions: TokenRange, tokens_per_block: int
) -> torch.Tensor:
    """``[layers, kv, tokens, heads, dim]`` read position by position (a gather's oracle)."""
    import torch

    bsz = tokens_per_block
    cols = [pool[:, span.block_id(p // bsz), :, p % bsz] for p in positions]
    return torch.stack(cols, dim=2)


def write_positions(
    pool: torch.Tensor,
    span: BlockSpan,
    positions: TokenRange,
    tokens_per_block: int,
    packed: torch.Tensor,
) -> None:
    """Write ``packed`` (``[layers, kv, tokens, heads, dim]``) position by position (a
    scatter's oracle)."""
    bsz = tokens_per_block
    for i, p in enumerate(positions):
        pool[:, span.block_id(p // bsz), :, p % bsz] = packed[:, :, i]
