"""CUDA plumbing shared by the device channels: staging rings and a completion thread.

Nothing on the host waits for the device: each chunk's work is enqueued on streams (ordered
by stream waits and events), and a completion thread blocks in ``Event.synchronize`` (which
releases the GIL) in FIFO order, then posts the chunk's events and wakes the agent's loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Completions", "Ring"]


class Ring:
    """``slots`` reusable device buffers of one peer and direction. ``last`` of a slot is
    what the next user must wait for (a send work or a scatter event)."""

    def __init__(self, slots: int, device: torch.device) -> None:
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.last: list[Any] = [None] * slots
        self.next = 0
        self.retired: list[torch.Tensor] = []

    def take(self, nbytes: int) -> tuple[int, torch.Tensor]:
        i = self.next
        self.next = (i + 1) % len(self.buffers)
        buf = self.buffers[i]
        if buf is None or buf.numel() < nbytes:
            if buf is not None:
                # enqueued work on other streams may still use it: keep it until close
                self.retired.append(buf)
            buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, device=self.device)
            self.buffers[i] = buf
        return i, buf[:nbytes]


class Completions:
    """A thread that waits for CUDA events in order and runs their callbacks."""

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.outstanding = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)
        self._thread.start()

    def add(self, event: torch.cuda.Event, callback: Callable[[], None]) -> None:
        with self._lock:
            self.outstanding += 1
        self._q.put((event, callback))

    def _loop(self) -> None:
        while (item := self._q.get()) is not None:
            event, callback = item
            event.synchronize()
            with self._lock:
                self.outstanding -= 1
            callback()

    def close(self) -> None:
        self._q.put(None)
