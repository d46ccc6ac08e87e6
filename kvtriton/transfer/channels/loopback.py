"""In-process loopback channel: agents of one process exchange packed chunks through memory.

Protocol, session and fault tests run two (or more) agents in one process over a
:class:`~kvtriton.transfer.control.LocalHub` and a :class:`LoopbackHub`: the same sender,
receiver, chunk plans, kernels and checks as across processes, deterministic and in
milliseconds. A hub may model a link: with ``bandwidth`` (bytes/s) each directed pair is a
serial link, a chunk leaves ``nbytes / bandwidth`` seconds after the previous one on the
``clock`` (a test can drive a virtual clock).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvtriton.transfer.channels.packed import CpuPackedChannel
from kvtriton.transfer.jobs import DataLost, RecvJob, Sent

__all__ = ["LoopbackChannel", "LoopbackHub"]


@dataclass
class _Link:
    frames: deque = field(default_factory=deque)  # (arrival time, bytes, Sent)
    busy_until: float = 0.0


class LoopbackHub:
    """Links between :class:`LoopbackChannel` endpoints of one process."""

    def __init__(
        self, *, bandwidth: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.bandwidth = bandwidth
        self.clock = clock
        self.links: dict[tuple[int, int], _Link] = {}
        self.channels: dict[int, LoopbackChannel] = {}

    def channel(self) -> LoopbackChannel:
        return LoopbackChannel(self)

    def link(self, src: int, dst: int) -> _Link:
        return self.links.setdefault((src, dst), _Link())


class LoopbackChannel(CpuPackedChannel):
    """One agent's endpoint on a :class:`LoopbackHub`."""

    name = "loopback"

    def __init__(self, hub: LoopbackHub) -> None:
        super().__init__()
        self.hub = hub
        self._posted: dict[int, deque[tuple[RecvJob, int, int]]] = {}
        self._sending: list[tuple[float, Sent]] = []

    def attach(self, host) -> None:  # type: ignore[no-untyped-def]
        super().attach(host)
        self.hub.channels[host.rank] = self

    def _transmit(self, peer: int, buf: torch.Tensor, sent: Sent) -> None:
        link = self.hub.link(self._host.rank, peer)
        now = self.hub.clock()
        start = max(now, link.busy_until)
        arrival = start + (buf.numel() / self.hub.bandwidth if self.hub.bandwidth else 0.0)
        link.busy_until = arrival
        link.frames.append((arrival, buf.clone(), sent))
        self._sending.append((arrival, sent))
        self.buffers.give(buf)

    def _receive(self, peer: int, job: RecvJob, k: int, nbytes: int) -> None:
        self._posted.setdefault(peer, deque()).append((job, k, nbytes))

    def pump(self) -> None:
        now = self.hub.clock()
        left = [s for t, s in self._sending if t <= now]
        self._sending = [(t, s) for t, s in self._sending if t > now]
        for sent in left:
            self._events.put(sent)
        rank = self._host.rank
        for peer, posted in self._posted.items():
            link = self.hub.link(peer, rank)
            while posted and link.frames and link.frames[0][0] <= now:
                job, k, nbytes = posted.popleft()
                _, data, _ = link.frames.popleft()
                if data.numel() != nbytes:
                    self._events.put(
                        DataLost(
                            peer,
                            f"a {data.numel()}-byte chunk arrived where {nbytes} bytes were "
                            f"posted (the pair lost sync)",
                        )
                    )
                    continue
                self._arrived(job, k, data)

    def peer_lost(self, peer: int) -> None:
        super().peer_lost(peer)
        self._posted.pop(peer, None)

    def busy(self) -> bool:
        return bool(self._sending) or any(self._posted.values())
