"""Backends and :class:`PreparedMoves`: one request's staged descriptor tables and the
launches of each of its chunks.

Backends: ``"triton"`` (:mod:`kvtriton.kernels.triton_kernels`; compiled on CUDA tensors,
under the Triton interpreter on CPU tensors when ``TRITON_INTERPRET=1`` was set before the
first kernel call), ``"reference"`` (:mod:`kvtriton.kernels.torch_backend`, torch indexing
on any device) and ``"auto"`` (Triton on CUDA, and on CPU when the interpreter is on; else
the torch backend). Both execute the same descriptors.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from kvtriton.kernels import descriptors as D
from kvtriton.kernels.checks import check_backend

__all__ = ["PreparedMoves", "interpreter_enabled", "resolve_backend"]

_TRITON: ModuleType | None = None


def triton_module() -> ModuleType:
    """:mod:`kvtriton.kernels.triton_kernels`, imported on first use (so that
    ``TRITON_INTERPRET`` set before the first kernel call still takes effect)."""
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


@functools.cache
def _triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


_RESOLVED: dict[tuple[str, str], str] = {}


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``"triton"`` or ``"reference"``: what ``backend`` means for tensors on ``device``."""
    if _TRITON is not None:  # the answer no longer changes: cached
        key = (backend, device.type if isinstance(device, torch.device) else str(device))
        hit = _RESOLVED.get(key)
        if hit is None:
            hit = _RESOLVED[key] = _resolve(backend, device)
        return hit
    return _resolve(backend, device)


def _resolve(backend: str, device: torch.device | str) -> str:
    backend = check_backend(backend)
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


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


class PreparedMoves:
    """One request's moves, checked, built and staged once; :meth:`run` launches chunk ``k``.

    Built by :func:`~kvtriton.kernels.prepare_pack` / ``prepare_unpack`` / ``prepare_copy``
    (and internally by the convenience API). The descriptor tables of every chunk went to the
    device in one host-to-device copy on the stream that was current at construction; keep
    this object alive until the kernels it launched have run (it owns those tables).

    Attributes:
        num_chunks: chunks of the request.
        backend: ``"triton"`` or ``"reference"``.
        device: the pools' device.
    """

    def __init__(
        self,
        chunks: Sequence[Sequence[D.Move]],
        nbytes: Sequence[int],
        device: torch.device,
        backend: str,
        *,
        needs_buffer: bool,
        buffer_align: int = 16,
        tuning: D.Tuning | None = None,
    ) -> None:
        self.backend = resolve_backend(backend, device)
        self.device = device
        self.num_chunks = len(chunks)
        self._nbytes = tuple(int(n) for n in nbytes)
        self._needs_buffer = needs_buffer
        triton = self.backend == "triton"
        plan = D.build(
            chunks,
            buffer_align=buffer_align,
            sm_count=_sm_count(device),
            interpret=triton and device.type == "cpu",
            tuning=tuning,
        )
        self._chunks = plan.chunks
        self._cuda = device.type == "cuda"
        self._index = (
            (device.index if device.index is not None else torch.cuda.current_device())
            if self._cuda
            else 0
        )
        self._stream = triton_module().current_stream(self._index) if self._cuda else 0
        self._joined: set[int] = set()
        if triton:
            self._plan = None
            self._owner, self._meta, self._ids = D.stage(plan, device, self._stream)
            T = triton_module()
            self._launch = T.launch
            self._current_stream = T.current_stream
            self._calls = [[(launch, T.key(launch)) for launch in c] for c in plan.chunks]
        else:
            self._plan = plan
            ids = torch.from_numpy(plan.ids.astype(np.int64))
            meta = torch.from_numpy(np.frombuffer(plan.meta, dtype=np.int64).copy())
            self._owner = (meta.to(device), ids.to(device))
            self._meta = self._ids = 0
            self._torch_cache: dict[int, object] = {}  # launch -> index tensors (small plans)

    def nbytes(self, k: int) -> int:
        """Packed bytes of chunk ``k`` (its layout's ``nbytes``)."""
        return self._nbytes[k]

    def run(self, k: int, buffer: torch.Tensor | None = None) -> None:
        """Chunk ``k``: one kernel launch (at most one more for state groups) on the current
        stream. ``buffer``: 1-D uint8, at least :meth:`nbytes` long, 16-byte aligned, on the
        pools' device (``None`` for a pool -> pool copy). Nothing is checked, converted or
        allocated here, and the host never waits for the device."""
        launches = self._chunks[k]
        if not launches:
            return
        if self._needs_buffer and buffer is None:
            raise ValueError("this plan packs or unpacks: run(k, buffer) needs its buffer")
        if self._plan is not None:
            from kvtriton.kernels import torch_backend

            torch_backend.run(self._plan, launches, buffer, self._owner, self._torch_cache)
            return
        buf = buffer.data_ptr() if buffer is not None else self._meta
        if not self._cuda:
            for launch, consts in self._calls[k]:
                self._launch(launch, self._meta, self._ids, buf, 0, 0, consts)
            return
        if torch.cuda.current_device() != self._index:
            with torch.cuda.device(self._index):
                self.run(k, buffer)
            return
        stream = self._current_stream(self._index)
        if stream != self._stream and stream not in self._joined:
            self._join(stream)
        for launch, consts in self._calls[k]:
            self._launch(launch, self._meta, self._ids, buf, stream, self._index, consts)

    def _join(self, stream: int) -> None:
        """First run on another stream than the one that staged the tables: that stream
        waits for the staging copy, and the allocator learns the tables are used there."""
        if self._stream == torch.cuda.default_stream(self._index).cuda_stream:
            staged = torch.cuda.default_stream(self._index)
        else:
            staged = torch.cuda.ExternalStream(self._stream, device=self.device)
        event = torch.cuda.Event()
        event.record(staged)
        current = torch.cuda.current_stream(self._index)
        current.wait_event(event)
        self._owner.record_stream(current)
        self._joined.add(stream)

    def __repr__(self) -> str:
        launches = sum(len(c) for c in self._chunks)
        return (
            f"PreparedMoves({self.num_chunks} chunks, {launches} launches, "
            f"backend={self.backend!r}, device={self.device})"
        )
