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

Two layers of API, one code path (:mod:`~kvtriton.kernels.descriptors` -> one kernel):

* the convenience calls below (``gather`` ... ``unpack_requests``): bare tensors and spans,
  every argument checked on every call;
* prepared plans for the hot path: :class:`PoolSet` (a rank's pools, checked once),
  :func:`prepare_pack` / :func:`prepare_unpack` / :func:`prepare_copy` (a request's chunks
  checked against its :class:`~kvtriton.target.TransferTarget` once, all descriptors staged
  in one copy) and :meth:`PreparedMoves.run` (chunk ``k``: one launch, nothing checked).

:mod:`kvtriton.kernels.naive` is the per-position oracle the tests and benchmark compare with.

Backends (the ``backend=`` argument of every entry):

* ``"triton"``: the Triton kernels in :mod:`kvtriton.kernels.triton_kernels`. On CUDA tensors
  they compile for the GPU. On CPU tensors they run under the Triton *interpreter*, which
  needs ``TRITON_INTERPRET=1`` in the environment **before** kvtriton's Triton module is
  imported (it is imported lazily, on the first Triton call), e.g.
  ``TRITON_INTERPRET=1 python my_script.py`` or ``os.environ["TRITON_INTERPRET"] = "1"`` at
  the top of a notebook. The interpreter runs the real kernel source with numpy: exact, but
  slow (use it for tests and small demos).
* ``"reference"``: :mod:`kvtriton.kernels.torch_backend`, torch indexing executing the same
  descriptors. Works on any device; the fast choice on a CPU.
* ``"auto"`` (default): Triton on CUDA tensors; on CPU tensors Triton when the interpreter is
  on (``TRITON_INTERPRET=1``), else the reference.

So on a machine without a GPU: leave ``TRITON_INTERPRET`` unset for the fast torch path,
or set ``TRITON_INTERPRET=1`` (before the first kernel call) to exercise the Triton kernels.
:func:`resolve_backend` says which backend a call would use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kvtriton.kernels import checks as C
from kvtriton.kernels.descriptors import Move, Tuning
from kvtriton.kernels.plan import PoolSet, prepare_copy, prepare_pack, prepare_unpack
from kvtriton.kernels.prepared import PreparedMoves, interpreter_enabled, resolve_backend
from kvtriton.kernels.requests import PackedRequest, plan_requests
from kvtriton.layout import PackedLayout
from kvtriton.ranges import BlockSpan, TokenRange
from kvtriton.spec import KVCacheSpec

__all__ = [
    "PackedRequest",
    "PoolSet",
    "PreparedMoves",
    "Tuning",
    "copy",
    "gather",
    "gather_state",
    "interpreter_enabled",
    "pack_request",
    "pack_requests",
    "prepare_copy",
    "prepare_pack",
    "prepare_unpack",
    "resolve_backend",
    "scatter",
    "scatter_state",
    "unpack_request",
    "unpack_requests",
]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a 1-D uint8 tensor (a view)."""
    return t.reshape(-1).view(torch.uint8)


def _align(buffer: torch.Tensor) -> int:
    addr = buffer.data_ptr()
    return 16 if addr % 16 == 0 else addr & -addr


def _execute(
    moves: Sequence[Move], buffer: torch.Tensor | None, device: torch.device, backend: str
) -> None:
    moves = [m for m in moves if m.tokens and m.layers and m.heads and m.head_bytes]
    if not moves:
        return
    align = _align(buffer) if buffer is not None else 16
    prepared = PreparedMoves(
        [moves], [0], device, backend, needs_buffer=buffer is not None, buffer_align=align
    )
    prepared.run(0, buffer)


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
    move, out = C.plan_gather(pool, span, tokens, layers, heads, out)
    _execute([move], _as_bytes(out), out.device, backend)
    return out


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
    move, packed = C.plan_scatter(packed, pool, span, tokens, layers, heads)
    _execute([move], _as_bytes(packed), pool.device, backend)


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
    _execute([move], None, src_pool.device, backend)


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
    move, out = C.plan_state(state_pool, slot, layers, heads, out, True)
    _execute([move], _as_bytes(out), out.device, backend)
    return out


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
    move, packed = C.plan_state(state_pool, slot, layers, heads, packed, False)
    _execute([move], _as_bytes(packed), packed.device, backend)


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
    local indices through it. One kernel launch (one more for state groups whose rows do not
    share the attention groups' copy unit).
    """
    C.check_backend(backend)
    req = PackedRequest(layout, spans, state_slots, 0)
    moves = plan_requests(spec, [req], pools, buffer, to_dense=True, exact_size=True)
    _execute(moves, buffer, buffer.device, backend)


def unpack_request(
    spec: KVCacheSpec,
    layout: PackedLayout,
    buffer: torch.Tensor,
    pools: Mapping[str, torch.Tensor],
    spans: Mapping[str, BlockSpan],
    state_slots: Mapping[str, int],
    backend: str = "auto",
) -> None:
    """Scatter every segment of ``layout`` from ``buffer`` into ``pools`` (one launch)."""
    C.check_backend(backend)
    req = PackedRequest(layout, spans, state_slots, 0)
    moves = plan_requests(spec, [req], pools, buffer, to_dense=False, exact_size=True)
    _execute(moves, buffer, buffer.device, backend)


def pack_requests(
    spec: KVCacheSpec,
    requests: Sequence[PackedRequest],
    pools: Mapping[str, torch.Tensor],
    buffer: torch.Tensor,
    backend: str = "auto",
) -> None:
    """Pack several requests into one buffer: request ``r`` occupies
    ``buffer[r.offset : r.offset + r.layout.nbytes]`` (offsets multiples of 128, disjoint).

    One launch for the whole batch (one more for state groups, see :func:`pack_request`).
    """
    C.check_backend(backend)
    moves = plan_requests(spec, requests, pools, buffer, to_dense=True, exact_size=False)
    _execute(moves, buffer, buffer.device, backend)


def unpack_requests(
    spec: KVCacheSpec,
    requests: Sequence[PackedRequest],
    buffer: torch.Tensor,
    pools: Mapping[str, torch.Tensor],
    backend: str = "auto",
) -> None:
    """Batched :func:`unpack_request` (see :func:`pack_requests`)."""
    C.check_backend(backend)
    moves = plan_requests(spec, requests, pools, buffer, to_dense=False, exact_size=False)
    _execute(moves, buffer, buffer.device, backend)
