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

__all__ = ["PoolSet", "prepare_copy", "prepare_pack", "prepare_unpack"]


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


@dataclass
class _Copy:
    src: PoolSet
    src_target: TransferTarget
    dst: PoolSet
    dst_target: TransferTarget
    layouts: tuple[PackedLayout, ...]
    backend: str

    @property
    def num_chunks(self) -> int:
        return len(self.layouts)

    def nbytes(self, k: int) -> int:
        return self.layouts[k].nbytes

    def run(self, k: int, buffer: torch.Tensor | None = None) -> None:
        for seg in self.layouts[k].segments:
            sg, dg = self.src.spec.group(seg.group), self.dst.spec.group(seg.group)
            s_lay = [sg.layer_ids.index(i) for i in seg.layer_ids]
            d_lay = [dg.layer_ids.index(i) for i in seg.layer_ids]
            s0, d0 = sg.held_heads[0], dg.held_heads[0]
            sh = (seg.heads[0] - s0, seg.heads[1] - s0)
            dh = (seg.heads[0] - d0, seg.heads[1] - d0)
            if seg.kind == "state":
                vals = kernels.gather_state(
                    self.src.pools[seg.group],
                    self.src_target.state_slots[seg.group],
                    layers=s_lay,
                    heads=sh,
                    backend=self.backend,
                )
                kernels.scatter_state(
                    vals,
                    self.dst.pools[seg.group],
                    self.dst_target.state_slots[seg.group],
                    layers=d_lay,
                    heads=dh,
                    backend=self.backend,
                )
                continue
            st, dt = self.src_target.kv[seg.group], self.dst_target.kv[seg.group]
            kernels.copy(
                self.src.pools[seg.group],
                BlockSpan(st.first_block, st.block_ids.tolist()),
                self.dst.pools[seg.group],
                BlockSpan(dt.first_block, dt.block_ids.tolist()),
                seg.tokens,
                src_layers=s_lay,
                dst_layers=d_lay,
                src_heads=sh,
                dst_heads=dh,
                backend=self.backend,
            )


def prepare_copy(
    src: PoolSet,
    src_target: TransferTarget,
    dst: PoolSet,
    dst_target: TransferTarget,
    layouts: Sequence[PackedLayout],
    backend: str,
) -> _Copy:
    return _Copy(src, src_target, dst, dst_target, tuple(layouts), backend)
