"""The kernel calls of a transfer: one prepared pack / unpack / copy per job.

``prepare_*`` validate a job's chunk plan against its :class:`~kvtriton.target.TransferTarget`
once, stage every chunk's descriptors to the device with one copy, and return a
:class:`~kvtriton.kernels.PreparedMoves` whose ``run(k, buffer)`` is one launch per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtriton.kernels import PoolSet, PreparedMoves
from kvtriton.kernels import prepare_copy as _copy
from kvtriton.kernels import prepare_pack as _pack
from kvtriton.kernels import prepare_unpack as _unpack
from kvtriton.layout import PackedLayout
from kvtriton.target import TransferTarget

__all__ = ["PoolSet", "PreparedMoves", "prepare_copy", "prepare_pack", "prepare_unpack"]


def prepare_pack(
    pools: PoolSet, target: TransferTarget, layouts: Sequence[PackedLayout], backend: str
) -> PreparedMoves:
    """Gather chunk ``k`` of ``layouts`` from ``pools`` into a packed buffer (``run(k, buf)``)."""
    return _pack(pools, target, layouts, backend=backend)


def prepare_unpack(
    pools: PoolSet, target: TransferTarget, layouts: Sequence[PackedLayout], backend: str
) -> PreparedMoves:
    """Scatter chunk ``k`` from a packed buffer into ``pools`` (``run(k, buf)``)."""
    return _unpack(pools, target, layouts, backend=backend)


def prepare_copy(
    src: PoolSet,
    src_target: TransferTarget,
    dst: PoolSet,
    dst_target: TransferTarget,
    layouts: Sequence[PackedLayout],
    backend: str,
) -> PreparedMoves:
    """Copy chunk ``k`` pool -> pool, each side through its own target (``run(k)``)."""
    return _copy(src, src_target, dst, dst_target, layouts, backend=backend)
