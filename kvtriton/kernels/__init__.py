"""Paged KV gather / scatter / copy by token position, with a Triton and a torch backend.

Pools are the 6-D view ``[layers, blocks, kv, tokens_per_block, heads, head_dim]`` (DESIGN.md
§1) with ``head_dim`` stride 1 and any other strides (NHD and HND are both just strides).
Copies are by token position: each side has its own :class:`~kvtriton.ranges.BlockSpan` and
its own ``tokens_per_block`` (the pool's dim 3), so starts and ends inside blocks, block-size
mismatches and layout conversions are all the same operation. Packed tensors are contiguous
``[layers_sel, kv, tokens, heads_sel, head_dim]`` (DESIGN.md §2). Values move as same-width
integers (bit-exact; fp8 moves as bytes). ``layers`` are local indices into the pool's dim 0,
``heads`` a local half-open ``(start, end)`` into its head dim.

Every call validates all of its arguments before it writes anything; a bad argument raises
``ValueError`` naming it and a failed call changes nothing.

Backends (the ``backend=`` argument of every entry):

* ``"triton"``: the Triton kernels in :mod:`kvtriton.kernels.triton_kernels`. On CUDA tensors
  they compile for the GPU. On CPU tensors they run under the Triton *interpreter*, which
  needs ``TRITON_INTERPRET=1`` in the environment **before** kvtriton's Triton module is
  imported (it is imported lazily, on the first Triton call), e.g.
  ``TRITON_INTERPRET=1 python my_script.py`` or ``os.environ["TRITON_INTERPRET"] = "1"`` at
  the top of a notebook. The interpreter runs the real kernel source with numpy: exact, but
  slow (use it for tests and small demos).
* ``"reference"``: :mod:`kvtriton.kernels.reference`, pure torch (one advanced-indexing call
  per group). Works on any device; the fast choice on a CPU.
* ``"auto"`` (default): Triton on CUDA tensors; on CPU tensors Triton when the interpreter is
  on (``TRITON_INTERPRET=1``), else the reference.

So on a machine without a GPU: leave ``TRITON_INTERPRET`` unset for the fast torch path,
or set ``TRITON_INTERPRET=1`` (before the first kernel call) to exercise the Triton kernels.
:func:`resolve_backend` says which backend a call would use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import ModuleType

import torch

from kvtriton.kernels import _common as C
from kvtriton.kernels import reference
from kvtriton.kernels._common import PackedRequest
from kvtriton.layout import PackedLayout
from kvtriton.ranges import BlockSpan, TokenRange
from kvtriton.spec import KVCacheSpec

__all__ = [
    "PackedRequest",
    "copy",
    "gather",
    "gather_state",
    "interpreter_enabled",
    "pack_request",
    "pack_requests",
    "reference",
    "resolve_backend",
    "scatter",
    "scatter_state",
    "unpack_request",
    "unpack_requests",
]

_TRITON: ModuleType | None = None


def _triton_module() -> ModuleType:
    global _TRITON
    if _TRITON is None:
        from kvtriton.kernels import triton_kernels

        _TRITON = triton_kernels
    return _TRITON


def interpreter_enabled() -> bool:
    """Whether Triton kernels run under the interpreter (fixed when they are first imported)."""
    if _TRITON is not None:
        return bool(_TRITON.INTERPRET)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_available() -> bool:
    import importlib.util

    try:
        return (
            importlib.util.find_spec("triton") is not None
            and importlib.util.find_spec("kvtriton.kernels.triton_kernels") is not None
        )
    except (ImportError, ValueError):
        return False


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``"triton"`` or ``"reference"``: what ``backend`` means for tensors on ``device``."""
    backend = C.check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        if not _triton_available():
            return "reference"
        if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
            return "triton"
        return "reference"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if device.type == "cpu" and not interpreter_enabled():
            raise ValueError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before the first kernel call, or use backend='reference'"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' does not support {device.type} tensors")
    return backend


def _impl(backend: str, device: torch.device) -> ModuleType:
    if resolve_backend(backend, device) == "triton":
        return _triton_module()
    return reference


def gather(
    pool: torch.Tensor,
    span: BlockSpan,
    tokens: TokenRange,
    *,
    layers: Sequence[int] | None = None,
    heads: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Gather pool positions ``tokens`` (half-open) into a packed tensor.

    Args:
        pool: 6-D pool view; ``tokens_per_block`` is its dim 3.
        span: block table of the positions (must cover ``tokens``).
        tokens: positions ``[start, end)``; may start and end inside blocks; may be empty.
        layers: local layer indices into dim 0, distinct (``None``: all, in order).
        heads: local head range ``(start, end)`` (``None``: all).
        out: contiguous ``[layers_sel, kv, len(tokens), heads_sel, head_dim]`` tensor of the
            pool dtype (allocated when ``None``).

    Returns:
        ``out``.
    """
    C.check_backend(backend)
    move = C.plan_gather(pool, span, tokens, layers, heads, out)
    assert isinstance(move.dst, torch.Tensor)
    _impl(backend, move.dst.device).run_kv(move)
    return move.dst


def scatter(
    packed: torch.Tensor,
    pool: torch.Tensor,
    span: BlockSpan,
    tokens: TokenRange,
    *,
    layers: Sequence[int] | None = None,
    heads: tuple[int, int] | None = None,
    backend: str = "auto",
) -> None:
    """Scatter packed ``[layers_sel, kv, len(tokens), heads_sel, head_dim]`` into pool positions
    ``tokens``; positions outside ``tokens`` (also inside the touched blocks) stay untouched."""
    C.check_backend(backend)
    move = C.plan_scatter(packed, pool, span, tokens, layers, heads)
    _impl(backend, pool.device).run_kv(move)


def copy(
    src_pool: torch.Tensor,
    src_span: BlockSpan,
    dst_pool: torch.Tensor,
    dst_span: BlockSpan,
    tokens: TokenRange,
    *,
    src_layers: Sequence[int] | None = None,
    dst_layers: Sequence[int] | None = None,
    src_heads: tuple[int, int] | None = None,
    dst_heads: tuple[int, int] | None = None,
    backend: str = "auto",
) -> None:
    """Copy positions ``tokens`` from one pool to another on the same device.

    Both sides address the same positions, each through its own span and block size and
    with its own strides (a copy NHD -> HND is a layout conversion). Layer lists must have
    equal lengths and head ranges equal widths. Source and destination may be one pool if
    the touched (layer, block) pairs do not overlap.
    """
    C.check_backend(backend)
    move = C.plan_copy(
        src_pool, src_span, dst_pool, dst_span, tokens, src_layers, dst_layers, src_heads, dst_heads
    )
    _impl(backend, src_pool.device).run_kv(move)


def gather_state(
    state_pool: torch.Tensor,
    slot: int,
    *,
    layers: Sequence[int] | None = None,
    heads: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Copy a request's state slot out of ``state_pool`` ``[layers, slots, heads, *rest]``.

    ``heads`` is a local range over ``state_shape[0]``; the ``rest`` dims must be row-major
    contiguous. Returns ``out`` = ``[layers_sel, heads_sel, *rest]``.
    """
    C.check_backend(backend)
    move = C.plan_state(state_pool, slot, layers, heads, out, True)
    _impl(backend, move.pool.device).run_state(move)
    return move.dense


def scatter_state(
    packed: torch.Tensor,
    state_pool: torch.Tensor,
    slot: int,
    *,
    layers: Sequence[int] | None = None,
    heads: tuple[int, int] | None = None,
    backend: str = "auto",
) -> None:
    """Write packed ``[layers_sel, heads_sel, *rest]`` into state slot ``slot``."""
    C.check_backend(backend)
    move = C.plan_state(state_pool, slot, layers, heads, packed, False)
    _impl(backend, move.pool.device).run_state(move)


def _run_batches(batches: list, backend: str, buffer: torch.Tensor) -> None:
    if not batches:
        return
    impl = _impl(backend, buffer.device)
    impl.run_batches(batches)


def pack_request(
    spec: KVCacheSpec,
    layout: PackedLayout,
    pools: Mapping[str, torch.Tensor],
    spans: Mapping[str, BlockSpan],
    state_slots: Mapping[str, int],
    buffer: torch.Tensor,
    backend: str = "auto",
) -> None:
    """Gather every segment of ``layout`` into ``buffer`` (1-D uint8 of ``layout.nbytes``).

    ``spec`` is the local shard spec; segment layer ids / heads are global and are mapped to
    local indices through it. At most one kernel launch per group.
    """
    C.check_backend(backend)
    req = PackedRequest(layout, spans, state_slots, 0)
    batches = C.plan_requests(spec, [req], pools, buffer, to_dense=True, exact_size=True)
    _run_batches(batches, backend, buffer)


def unpack_request(
    spec: KVCacheSpec,
    layout: PackedLayout,
    buffer: torch.Tensor,
    pools: Mapping[str, torch.Tensor],
    spans: Mapping[str, BlockSpan],
    state_slots: Mapping[str, int],
    backend: str = "auto",
) -> None:
    """Scatter every segment of ``layout`` from ``buffer`` into ``pools`` (one launch/group)."""
    C.check_backend(backend)
    req = PackedRequest(layout, spans, state_slots, 0)
    batches = C.plan_requests(spec, [req], pools, buffer, to_dense=False, exact_size=True)
    _run_batches(batches, backend, buffer)


def pack_requests(
    spec: KVCacheSpec,
    requests: Sequence[PackedRequest],
    pools: Mapping[str, torch.Tensor],
    buffer: torch.Tensor,
    backend: str = "auto",
) -> None:
    """Pack several requests into one buffer: request ``r`` occupies
    ``buffer[r.offset : r.offset + r.layout.nbytes]`` (offsets multiples of 128, disjoint).

    One launch per (group, layer selection, head selection) for the whole batch.
    """
    C.check_backend(backend)
    batches = C.plan_requests(spec, requests, pools, buffer, to_dense=True, exact_size=False)
    _run_batches(batches, backend, buffer)


def unpack_requests(
    spec: KVCacheSpec,
    requests: Sequence[PackedRequest],
    buffer: torch.Tensor,
    pools: Mapping[str, torch.Tensor],
    backend: str = "auto",
) -> None:
    """Batched :func:`unpack_request` (see :func:`pack_requests`)."""
    C.check_backend(backend)
    batches = C.plan_requests(spec, requests, pools, buffer, to_dense=False, exact_size=False)
    _run_batches(batches, backend, buffer)
