"""Packed chunks over gloo point-to-point (CPU pools).

gloo's ``send`` blocks its caller until the bytes moved and a receive never reports
completion without a blocking wait, so each peer gets a *send* thread and a *wait* thread
that do nothing else: the owning thread gathers chunk ``k+1`` while the send thread has
chunk ``k`` on the wire, posts receives itself (``irecv``: posted before it answers
``Ready``), and scatters a chunk as soon as the wait thread hands it over (one queue hop and
a wake-up of the owner's ``select``). Receives are posted in announcement order, which is
the order the sender puts the chunks on the wire: no tag or size ever comes from the peer.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from kvtriton.transfer.channels.packed import CpuPackedChannel
from kvtriton.transfer.jobs import DataLost, RecvJob, Sent

__all__ = ["GlooChannel"]

_DATA_TAG = 12


class _PeerThreads:
    def __init__(self, channel: GlooChannel, peer: int) -> None:
        self.channel = channel
        self.peer = peer
        self.sends: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.recvs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        rank = channel._host.rank
        self.sender = threading.Thread(
            target=self._send_loop, daemon=True, name=f"kvtr-send-{rank}->{peer}"
        )
        self.receiver = threading.Thread(
            target=self._recv_loop, daemon=True, name=f"kvtr-recv-{rank}<-{peer}"
        )
        self.sender.start()
        self.receiver.start()

    def _send_loop(self) -> None:
        import torch.distributed as dist

        ch = self.channel
        while (item := self.sends.get()) is not None:
            buf, sent = item
            try:
                dist.send(buf, dst=self.peer, group=ch.group, tag=_DATA_TAG)
            except Exception as exc:  # the peer died or the pair closed
                ch._post(DataLost(self.peer, f"gloo send failed: {type(exc).__name__}: {exc}"))
                return
            ch.buffers.give(buf)
            ch._post(sent)

    def _recv_loop(self) -> None:
        ch = self.channel
        while (item := self.recvs.get()) is not None:
            job, k, buf, work = item
            try:
                work.wait()
            except Exception as exc:
                ch._post(DataLost(self.peer, f"gloo recv failed: {type(exc).__name__}: {exc}"))
                return
            ch._arrivals.put((job, k, buf))
            ch._host.control.wake()


class GlooChannel(CpuPackedChannel):
    """Packed chunks over a gloo process group whose ranks are the world ranks.

    Args:
        group: the gloo group for data (may be the one of other uses; the channel's
            messages carry their own tag).
    """

    name = "gloo"

    def __init__(self, group: Any) -> None:
        super().__init__()
        self.group = group
        self._peers: dict[int, _PeerThreads] = {}
        self._arrivals: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._posted: dict[int, int] = {}  # peer -> receives posted, not yet landed

    def _threads(self, peer: int) -> _PeerThreads:
        t = self._peers.get(peer)
        if t is None:
            t = self._peers[peer] = _PeerThreads(self, peer)
        return t

    def _transmit(self, peer: int, buf: torch.Tensor, sent: Sent) -> None:
        self._threads(peer).sends.put((buf, sent))

    def _receive(self, peer: int, job: RecvJob, k: int, nbytes: int) -> None:
        import torch.distributed as dist

        buf = self.buffers.take(nbytes)
        work = dist.irecv(buf, src=peer, group=self.group, tag=_DATA_TAG)  # posted now
        self._posted[peer] = self._posted.get(peer, 0) + 1
        self._threads(peer).recvs.put((job, k, buf, work))

    def pump(self) -> None:
        while True:
            try:
                job, k, buf = self._arrivals.get_nowait()
            except queue.Empty:
                return
            if job.peer not in self._posted:
                continue  # from a peer declared lost meanwhile
            self._posted[job.peer] -= 1
            self._arrived(job, k, buf)

    def busy(self) -> bool:
        return any(n > 0 for n in self._posted.values()) or any(
            n > 0 for n in self._in_flight.values()
        )

    def peer_lost(self, peer: int) -> None:
        super().peer_lost(peer)
        threads = self._peers.pop(peer, None)
        if threads is not None:
            threads.sends.put(None)
            threads.recvs.put(None)
        self._posted.pop(peer, None)  # receives from a lost peer never land

    def close(self) -> None:
        for t in self._peers.values():
            t.sends.put(None)
            t.recvs.put(None)
        for t in self._peers.values():
            t.sender.join(timeout=5.0)
        self._peers.clear()
