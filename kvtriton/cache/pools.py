"""Paged pool tensors of a (possibly sharded) :class:`~kvtriton.spec.KVCacheSpec`.

One tensor per attention group, seen as the 6-D view of DESIGN.md §1
``[layers, blocks, kv, tokens_per_block, heads, head_dim]`` (``head_dim`` stride 1):

* ``"NHD"``: physical ``[L, N, kv, B, H, D]`` contiguous (token-major);
* ``"HND"``: physical ``[L, N, kv, H, B, D]`` contiguous, permuted to the 6-D view (head-major).

Dim 0 holds the shard's layers in ``group.layer_ids`` order; the heads dim holds the shard's
``group.local_heads``. One tensor per state group ``[layers, slots, *group.local_state_shape]``
of dtype ``group.item_dtype(spec.dtype)``; a request owns one slot index, other slots hold
cached state snapshots.

Bounds, checked before anything is allocated: at most :data:`MAX_NUM_BLOCKS` blocks per
attention group and :data:`MAX_STATE_SLOTS` slots per state group (the cache manager keeps
Python lists per block, and physical block ids stay far below
:data:`~kvtriton.ranges.MAX_BLOCK_ID`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from kvtriton.ranges import check_count
from kvtriton.spec import KVCacheSpec, LayerGroup

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_NUM_BLOCKS",
    "MAX_STATE_SLOTS",
    "CachePools",
    "Layout",
    "allocate_pools",
    "blocks_for_bytes",
    "pool_bytes",
]

#: blocks per attention group at most (2**24 = 16,777,216)
MAX_NUM_BLOCKS = 2**24
#: state slots per state group at most
MAX_STATE_SLOTS = 2**20

Layout = Literal["NHD", "HND"]
LAYOUTS: tuple[str, ...] = ("NHD", "HND")


def resolve_num_blocks(spec: KVCacheSpec, num_blocks: int | Mapping[str, int]) -> dict[str, int]:
    """``{attention group: block count}`` from one count for every group or a mapping."""
    attention = [g.name for g in spec.groups if g.is_attention]
    if isinstance(num_blocks, Mapping):
        unknown = sorted(set(num_blocks) - set(attention))
        if unknown:
            raise ValueError(
                f"num_blocks names {unknown}, which are not attention groups of spec "
                f"{spec.name!r}; attention groups: {attention}"
            )
        missing = [name for name in attention if name not in num_blocks]
        if missing:
            raise ValueError(f"num_blocks has no count for attention groups {missing}")
        return {
            name: check_count(f"num_blocks[{name!r}]", num_blocks[name], 1, MAX_NUM_BLOCKS)
            for name in attention
        }
    count = check_count("num_blocks", num_blocks, 1, MAX_NUM_BLOCKS)
    return dict.fromkeys(attention, count)


def pool_bytes(
    spec: KVCacheSpec, num_blocks: int | Mapping[str, int], num_state_slots: int = 0
) -> int:
    """Bytes of every pool tensor for these capacities."""
    blocks = resolve_num_blocks(spec, num_blocks) if _has_attention(spec) else {}
    slots = check_count("num_state_slots", num_state_slots, 0, MAX_STATE_SLOTS)
    kv = sum(spec.bytes_per_block(name) * n for name, n in blocks.items())
    state = sum(spec.state_bytes(g) * slots for g in spec.groups if g.is_state)
    return kv + state


def blocks_for_bytes(spec: KVCacheSpec, num_bytes: int, num_state_slots: int = 0) -> int:
    """The largest block count ``N`` (the same for every attention group) that fits.

    ``N = (num_bytes - num_state_slots * sum(state bytes)) // sum(bytes per block)`` over the
    spec's groups; ``ValueError`` if not even one block per group fits.
    """
    check_count("num_bytes", num_bytes, 1)
    slots = check_count("num_state_slots", num_state_slots, 0, MAX_STATE_SLOTS)
    state = sum(spec.state_bytes(g) * slots for g in spec.groups if g.is_state)
    per_block = sum(spec.bytes_per_block(g) for g in spec.groups if g.is_attention)
    if per_block == 0:
        raise ValueError(f"spec {spec.name!r} has no attention group: size it by state slots")
    n = (num_bytes - state) // per_block
    if n < 1:
        raise ValueError(
            f"{num_bytes} bytes do not fit one block per attention group of spec {spec.name!r} "
            f"({per_block} bytes per block over all groups) after {state} bytes of state slots"
        )
    if n > MAX_NUM_BLOCKS:
        raise ValueError(
            f"{num_bytes:,} bytes hold {n:,} blocks per attention group of spec {spec.name!r}, "
            f"more than kvtriton's bound of {MAX_NUM_BLOCKS:,} blocks per group"
        )
    return n


def _has_attention(spec: KVCacheSpec) -> bool:
    return any(g.is_attention for g in spec.groups)


@dataclass
class CachePools:
    """The tensors of one rank's cache; see the module docstring for shapes.

    Attributes:
        spec: the (local shard) spec the tensors were made for.
        layout: ``"NHD"`` or ``"HND"`` physical order of the attention pools.
        kv: ``{attention group: 6-D view}``.
        state: ``{state group: [layers, slots, *local_state_shape]}``.
    """

    spec: KVCacheSpec
    layout: str
    kv: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_blocks(self) -> dict[str, int]:
        """``{attention group: number of blocks}``."""
        return {name: int(t.shape[1]) for name, t in self.kv.items()}

    @property
    def num_state_slots(self) -> int:
        """Slots per state group (0 without state groups)."""
        return int(next(iter(self.state.values())).shape[1]) if self.state else 0

    @property
    def device(self) -> torch.device:
        return next(iter({**self.kv, **self.state}.values())).device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.kv.values(), *self.state.values()))

    def __getitem__(self, group: str) -> torch.Tensor:
        if group in self.kv:
            return self.kv[group]
        if group in self.state:
            return self.state[group]
        raise KeyError(f"no pool for layer group {group!r}; groups: {self.spec.group_names}")


def _kv_tensor(
    spec: KVCacheSpec, group: LayerGroup, num_blocks: int, device: object, layout: str
) -> torch.Tensor:
    import torch

    dims = (group.num_layers, num_blocks, group.kv_factor)
    b, h, d = spec.tokens_per_block, group.local_heads, group.head_dim
    if layout == "NHD":
        return torch.zeros((*dims, b, h, d), dtype=spec.torch_dtype, device=device)
    physical = torch.zeros((*dims, h, b, d), dtype=spec.torch_dtype, device=device)
    return physical.permute(0, 1, 2, 4, 3, 5)


def allocate_pools(
    spec: KVCacheSpec,
    num_blocks: int | Mapping[str, int] | None = None,
    *,
    num_bytes: int | None = None,
    num_state_slots: int = 0,
    device: object = "cpu",
    layout: Layout = "NHD",
) -> CachePools:
    """Allocate zeroed pool tensors for ``spec`` on ``device``.

    Args:
        spec: the local (possibly TP/PP-sharded) spec: layers and heads of this rank.
        num_blocks: blocks per attention group (one int for all, or ``{group: count}``).
        num_bytes: alternatively a byte budget for all tensors; see :func:`blocks_for_bytes`.
        num_state_slots: slots per state group (requests' states plus cached snapshots).
        device: a torch device.
        layout: ``"NHD"`` (token-major) or ``"HND"`` (head-major) physical order.
    """
    import torch

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    slots = check_count("num_state_slots", num_state_slots, 0, MAX_STATE_SLOTS)
    states = [g.name for g in spec.groups if g.is_state]
    if states and slots < 1:
        raise ValueError(
            f"spec {spec.name!r} has state groups {states}: num_state_slots must be >= 1"
        )
    if (num_blocks is None) == (num_bytes is None):
        if _has_attention(spec) or num_bytes is not None:
            raise ValueError("give exactly one of num_blocks and num_bytes")
    if num_bytes is not None:
        num_blocks = blocks_for_bytes(spec, num_bytes, slots)
    blocks = resolve_num_blocks(spec, num_blocks) if _has_attention(spec) else {}  # type: ignore[arg-type]
    pools = CachePools(spec=spec, layout=layout)
    for group in spec.groups:
        if group.is_state:
            dtype = getattr(torch, group.item_dtype(spec.dtype))
            pools.state[group.name] = torch.zeros(
                (group.num_layers, slots, *group.local_state_shape), dtype=dtype, device=device
            )
        else:
            pools.kv[group.name] = _kv_tensor(spec, group, blocks[group.name], device, layout)
    return pools
