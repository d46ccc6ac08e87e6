"""Host-to-device staging of descriptor tables: a pinned ring per device and one
``cudaMemcpyAsync`` per request, called through ctypes.

torch's path (a pinned block from its caching host allocator, ``copy_(non_blocking=True)``)
costs ~10 us of host time per request on an H200 host; this one writes the tables into a
preallocated pinned ring and issues the copy directly (~2 us). A ring region is reused only
after the copies that read it are done: the ring is cut into quarters; leaving a quarter
records one CUDA event on each stream that copied from it, and entering a quarter again
first waits for its events (recorded three quarters ago: normally long done, so the wait is
free). Tables larger than a quarter, and processes where the CUDA runtime library cannot be
found among the loaded libraries, take torch's path (``KVTRITON_STAGING=torch`` forces it).

Not for use while a CUDA graph is being captured on the stream (the copy would be captured
and replayed from a ring region that has since been reused); nor was torch's path.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import torch

__all__ = ["RING_BYTES", "Ring", "ring", "stage_into"]

#: Pinned bytes per device (four quarters; a request's tables use at most a quarter).
RING_BYTES = 4 << 20

_H2D = 1  # cudaMemcpyHostToDevice
_DISABLE_TIMING = 2  # cudaEventDisableTiming


class _Runtime:
    """The few CUDA runtime entry points the ring needs (from the libcudart torch loaded)."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        vp, sz, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        self.memcpy = lib.cudaMemcpyAsync
        self.memcpy.argtypes = [vp, vp, sz, i, vp]
        self.memcpy.restype = i
        self.event_create = lib.cudaEventCreateWithFlags
        self.event_create.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
        self.event_create.restype = i
        self.event_record = lib.cudaEventRecord
        self.event_record.argtypes = [vp, vp]
        self.event_record.restype = i
        self.event_sync = lib.cudaEventSynchronize
        self.event_sync.argtypes = [vp]
        self.event_sync.restype = i
        self.error_string = lib.cudaGetErrorString
        self.error_string.argtypes = [i]
        self.error_string.restype = ctypes.c_char_p

    def check(self, code: int, what: str) -> None:
        if code:
            msg = self.error_string(code).decode(errors="replace")
            raise RuntimeError(f"kvtriton staging: {what} failed: {msg} ({code})")


_RUNTIME: _Runtime | bool | None = None


def runtime() -> _Runtime | None:
    """The CUDA runtime library of this process, or ``None`` (then torch's path is used)."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = False
        if os.environ.get("KVTRITON_STAGING", "ring") != "torch" and torch.cuda.is_available():
            torch.cuda.init()
            path = None
            try:
                with open("/proc/self/maps") as f:
                    for line in f:
                        if "libcudart.so" in line:
                            path = line.split()[-1]
                            break
            except OSError:
                path = None
            if path is not None:
                try:
                    _RUNTIME = _Runtime(path)
                except (OSError, AttributeError):
                    _RUNTIME = False
    return _RUNTIME or None


class Ring:
    """A host ring over ``host`` (1-D uint8, pinned) for runtime ``rt`` (see the module
    doc); ``rt`` needs ``memcpy``, ``event_create``, ``event_record``, ``event_sync`` and
    ``check`` as :class:`_Runtime` has them (tests pass a fake)."""

    def __init__(self, rt: _Runtime, host: np.ndarray) -> None:
        self.rt = rt
        self.np = host
        self.owner: object = None  # what keeps ``host`` alive (a pinned tensor)
        self.addr = host.ctypes.data
        self.quarter = host.size // 4 // 16 * 16
        self.q = 0  # current quarter
        self.pos = 0  # next free byte
        self.streams: set[int] = set()  # streams that copied from the current quarter
        self.events: list[list[int]] = [[], [], [], []]  # recorded when each quarter was left
        self.spare: list[int] = []  # created events not in use
        self.lock = threading.Lock()

    def _event(self) -> int:
        if self.spare:
            return self.spare.pop()
        ev = ctypes.c_void_p()
        self.rt.check(self.rt.event_create(ctypes.byref(ev), _DISABLE_TIMING), "event create")
        return ev.value or 0

    def _next_quarter(self) -> None:
        rt = self.rt
        left = self.events[self.q]
        for stream in self.streams:
            ev = self._event()
            rt.check(rt.event_record(ev, stream), "event record")
            left.append(ev)
        self.streams.clear()
        self.q = (self.q + 1) % 4
        self.pos = self.q * self.quarter
        waits, self.events[self.q] = self.events[self.q], []
        for ev in waits:
            rt.check(rt.event_sync(ev), "event synchronize")
            self.spare.append(ev)

    def copy(self, dst: int, meta: memoryview, ids: np.ndarray, stream: int) -> None:
        """Copy ``meta`` bytes then ``ids`` to device address ``dst`` on ``stream``."""
        mb = len(meta)
        total = mb + ids.nbytes
        with self.lock:
            if self.pos + total > (self.q + 1) * self.quarter:
                self._next_quarter()
            off = self.pos
            self.pos = off + (total + 15) // 16 * 16
            self.np[off : off + mb] = np.frombuffer(meta, dtype=np.uint8)
            self.np[off + mb : off + total] = ids.view(np.uint8)
            self.streams.add(stream)
            self.rt.check(
                self.rt.memcpy(dst, self.addr + off, total, _H2D, stream), "cudaMemcpyAsync"
            )


_RINGS: dict[int, Ring] = {}


def ring(device: int) -> Ring | None:
    """The ring of CUDA device ``device`` (created on first use), or ``None``."""
    hit = _RINGS.get(device)
    if hit is None:
        rt = runtime()
        if rt is None:
            return None
        with torch.cuda.device(device):
            host = torch.empty(RING_BYTES, dtype=torch.uint8, pin_memory=True)
        hit = _RINGS[device] = Ring(rt, host.numpy())
        hit.owner = host
    return hit


def stage_into(dst: torch.Tensor, meta: memoryview, ids: np.ndarray, stream: int) -> bool:
    """Copy the tables into the device tensor ``dst`` through the ring of its device;
    ``False`` (nothing done) when the ring cannot take them."""
    index = dst.device.index
    r = _RINGS.get(index) or ring(index)
    if r is None or len(meta) + ids.nbytes > r.quarter or torch.cuda.current_device() != index:
        return False
    r.copy(dst.data_ptr(), meta, ids, stream)
    return True
