"""The kernel calls of a transfer: one prepared pack / unpack / copy per job.

Thin bridge to :mod:`kvtriton.kernels`: ``prepare_*`` validate a job's chunk plan against
its :class:`~kvtriton.target.TransferTarget` once; ``run(k, buffer)`` executes chunk ``k``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kvtriton import kernels
from kvtriton.layout import PackedLayout
from kvtriton.ranges import BlockSpan
from kvtriton.spec import KVCacheSpec
from kvtriton.target import TransferTarget

__all__ = ["PoolSet", "prepare_pack", "prepare_unpack"]


class PoolSet:
    """A rank's pools ``{group: tensor}`` for its shard ``spec``."""

    def __init__(self, spec: KVCacheSpec, pools: Mapping[str, torch.Tensor]) -> None:
        missing = [g for g in spec.group_names if g not in pools]
        if missing:
            raise ValueError(f"pools lack groups {missing} of spec {spec.name!r}")
        self.spec = spec
        self.pools = dict(pools)
        self.device = next(iter(self.pools.values())).device

    def num_blocks(self, group: str) -> int:
        return int(self.pools[group].shape[1])

    num_slots = num_blocks


@dataclass
class _Moves:
    pools: PoolSet
    target: TransferTarget
    layouts: tuple[PackedLayout, ...]
    backend: str
    to_packed: bool

    def __post_init__(self) -> None:
        self.spans = {
            g: BlockSpan(t.first_block, t.block_ids.tolist()) for g, t in self.target.kv.items()
        }

    @property
    def num_chunks(self) -> int:
        return len(self.layouts)

    def nbytes(self, k: int) -> int:
        return self.layouts[k].nbytes

    def run(self, k: int, buffer: torch.Tensor | None = None) -> None:
        layout = self.layouts[k]
        assert buffer is not None
        buf = buffer[: layout.nbytes]
        if self.to_packed:
            kernels.pack_request(
                self.pools.spec,
                layout,
                self.pools.pools,
                self.spans,
                self.target.state_slots,
                buf,
                backend=self.backend,
            )
        else:
            kernels.unpack_request(
                self.pools.spec,
                layout,
                buf,
                self.pools.pools,
                self.spans,
                self.target.state_slots,
                backend=self.backend,
            )


def prepare_pack(
    pools: PoolSet, target: TransferTarget, layouts: Sequence[PackedLayout], backend: str
) -> _Moves:
    return _Moves(pools, target, tuple(layouts), backend, True)


def prepare_unpack(
    pools: PoolSet, target: TransferTarget, layouts: Sequence[PackedLayout], backend: str
) -> _Moves:
    return _Moves(pools, target, tuple(layouts), backend, False)
