"""Fault injection for tests: a data-channel wrapper that misbehaves on purpose.

Only tests (and the experiment's fault cases, which tests drive) wrap a channel in a
:class:`FaultyChannel`; the library never injects faults itself.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

from kvtriton.transfer import protocol as P
from kvtriton.transfer.channels.base import DataChannel
from kvtriton.transfer.config import FaultInjection
from kvtriton.transfer.jobs import RecvJob, SendJob, Sent

__all__ = ["FaultyChannel"]


class FaultyChannel(DataChannel):
    """Delegates to ``inner`` except for the faults in ``faults`` (sender side)."""

    def __init__(self, inner: DataChannel, faults: FaultInjection) -> None:
        super().__init__()
        self.inner = inner
        self.faults = faults
        self.name = inner.name  # type: ignore[misc]
        self.checksums = inner.checksums  # type: ignore[misc]
        self.announce_ends = inner.announce_ends  # type: ignore[misc]
        self._sent = 0
        self._next_at = 0.0

    def attach(self, host: Any) -> None:
        super().attach(host)
        self.inner.attach(host)

    def connect_start(self, pairs: Sequence[tuple[int, int]]) -> None:
        self.inner.connect_start(pairs)

    def connect_finish(self, pairs: Sequence[tuple[int, int]]) -> None:
        self.inner.connect_finish(pairs)

    def capacity(self, peer: int) -> int:
        if self.faults.stall:
            return 0
        room = self.inner.capacity(peer)
        if self.faults.die_after_frames is not None:
            return min(room, 1)  # one chunk at a time: the death lands mid-request
        if self.faults.frame_delay_s > 0:
            if self._host_clock() < self._next_at:
                return 0
            return min(room, 1)
        return room

    def next_wakeup(self) -> float | None:
        inner = self.inner.next_wakeup()
        if self.faults.frame_delay_s > 0 and self._next_at:
            return self._next_at if inner is None else min(inner, self._next_at)
        return inner

    def _host_clock(self) -> float:
        return self._host.clock()  # type: ignore[attr-defined, no-any-return]

    def ready_marker(self) -> Any:
        return self.inner.ready_marker()

    def remote_done(self, job: SendJob) -> None:
        self.inner.remote_done(job)

    def marker_done(self, marker: Any) -> bool:
        return self.inner.marker_done(marker)

    def chunk_bytes(self, requested: int) -> int:
        return self.inner.chunk_bytes(requested)

    def prepare_send(self, job: SendJob) -> None:
        self.inner.prepare_send(job)
        if self.faults.corrupt_chunk is not None and job.request.checksum:
            job.corrupt_chunk = self.faults.corrupt_chunk

    def schedule(self, job: SendJob, count: int) -> None:
        if self.faults.die_after_frames == 0:  # dies with the request accepted, nothing sent
            os.kill(os.getpid(), signal.SIGKILL)
        self.inner.schedule(job, count)
        if self.faults.frame_delay_s > 0:
            self._next_at = self._host_clock() + self.faults.frame_delay_s

    def on_peer_message(self, peer: int, message: P.Message) -> str | None:
        return self.inner.on_peer_message(peer, message)

    def on_announce(self, job: RecvJob, message: P.Schedule | P.Blocks) -> str | None:
        return self.inner.on_announce(job, message)

    def prepare_recv(self, job: RecvJob) -> None:
        self.inner.prepare_recv(job)

    def finished(self, job: RecvJob) -> None:
        self.inner.finished(job)

    def events(self) -> list[Any]:
        out = self.inner.events()
        limit = self.faults.die_after_frames
        if limit is not None:
            self._sent += sum(isinstance(ev, Sent) for ev in out)
            if self._sent >= limit:
                # those chunks left this rank: die the hard way (no cleanup, no goodbye)
                os.kill(os.getpid(), signal.SIGKILL)
        return out

    def peer_lost(self, peer: int) -> None:
        self.inner.peer_lost(peer)

    def busy(self) -> bool:
        return self.inner.busy()

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()
