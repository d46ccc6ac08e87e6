"""Packed chunks over NCCL point-to-point (CUDA pools).

Sender, per chunk: on the gather stream, wait until the ring slot's previous send finished,
gather into the slot (one kernel launch, prepared once per request), ``isend``. Receiver, per
announced chunk: on the post stream, wait until the slot's previous scatter finished,
``irecv``; on the scatter stream, wait for the receive, scatter (one launch), record an
event. So gather ``k+1`` overlaps send ``k`` overlaps scatter ``k-1``, all enqueued without
a host wait; a completion thread turns the recorded events into ``Sent`` / ``Landed``
events. NCCL matches sends and receives in call order per pair, which is the announcement
order on both sides.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from kvtriton.transfer import protocol as P
from kvtriton.transfer.channels.base import DataChannel
from kvtriton.transfer.channels.cuda import Completions, Ring
from kvtriton.transfer.channels.packed import PackedMoves
from kvtriton.transfer.checksum import checksum_async, checksum_value
from kvtriton.transfer.jobs import Handed, Landed, RecvJob, SendJob, Sent, WriteDone

__all__ = ["NcclChannel"]


class NcclChannel(PackedMoves, DataChannel):
    """Packed chunks over an NCCL process group whose ranks are the world ranks.

    Args:
        group: the NCCL group for data.
        device: this rank's CUDA device (its pools live there).
    """

    name = "nccl"

    def __init__(self, group: Any, device: torch.device) -> None:
        super().__init__()
        self.group = group
        self.device = torch.device(device)
        self.gather_stream = torch.cuda.Stream(self.device)
        self.post_stream = torch.cuda.Stream(self.device)
        self.scatter_stream = torch.cuda.Stream(self.device)
        self.done_stream = torch.cuda.Stream(self.device)
        self._send_rings: dict[int, Ring] = {}
        self._recv_rings: dict[int, Ring] = {}
        self._in_flight: dict[int, int] = defaultdict(int)
        self._posted: dict[int, int] = defaultdict(int)
        self._sends = Completions("kvtr-nccl-sent")
        self._recvs = Completions("kvtr-nccl-landed")

    def connect_finish(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Create every (sender, receiver) communicator now, in ONE global pair order.

        A point-to-point communicator is created by the first send/recv on the pair, and
        that creation blocks the host until the peer joins; left to the first transfer, a
        sender waiting for receiver A while A waits for another sender can form a cycle (PP
        and TP on both sides). Visiting the pairs in the same sorted order on every rank
        cannot. Every rank of the topology must call this with the same pairs.
        """
        import torch.distributed as dist

        rank = self._host.rank
        token = torch.zeros(1, dtype=torch.uint8, device=self.device)
        for s, r in sorted(pairs):
            if s == rank:
                dist.isend(token, dst=r, group=self.group).wait()
            elif r == rank:
                dist.irecv(token, src=s, group=self.group).wait()
        torch.cuda.synchronize(self.device)

    def ready_marker(self) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _ring(self, rings: dict[int, Ring], peer: int) -> Ring:
        ring = rings.get(peer)
        if ring is None:
            ring = rings[peer] = Ring(self._host.options.staging_slots, self.device)
        return ring

    # -- sender ---------------------------------------------------------------------------
    def capacity(self, peer: int) -> int:
        # enqueue up to two rings ahead: slot reuse is ordered on the device
        return max(0, 2 * self._host.options.staging_slots - self._in_flight[peer])

    def schedule(self, job: SendJob, count: int) -> None:
        import torch.distributed as dist

        host = self._host
        first = job.scheduled
        host.control.send(job.peer, P.Schedule(job.request_id, first, count))
        ring = self._ring(self._send_rings, job.peer)
        for k in range(first, first + count):
            nbytes = job.chunks[k].nbytes
            slot, buf = ring.take(nbytes)
            with torch.cuda.stream(self.gather_stream):
                if job.ready is not None and k == first:
                    self.gather_stream.wait_event(job.ready)  # the source's KV is written
                if ring.last[slot] is not None:
                    ring.last[slot].wait()  # the slot's previous send must be done
                job.moves.run(k, buf)
                total = checksum_async(buf) if job.request.checksum else None
                if job.corrupt_chunk == k:
                    buf[0:1].bitwise_xor_(0xFF)
                work = dist.isend(buf, dst=job.peer, group=self.group)
            ring.last[slot] = work
            with torch.cuda.stream(self.done_stream):
                work.wait()
                event = torch.cuda.Event()
                event.record(self.done_stream)
            job.in_flight += 1
            self._in_flight[job.peer] += 1
            host.counters["bytes_sent"] += nbytes
            host.counters["chunks_sent"] += 1
            self._sends.add(event, _on_sent(self, job, k, total))
        job.scheduled = first + count
        job.handed += count  # enqueued on the device: checksums (if asked) come with Sent
        self._events.put(Handed(job))

    # -- receiver -------------------------------------------------------------------------
    def on_announce(self, job: RecvJob, message: P.Schedule | P.Blocks) -> str | None:
        import torch.distributed as dist

        if not isinstance(message, P.Schedule):
            return f"a {type(message).__name__} on the nccl channel"
        if message.first != job.posted or message.first + message.count > len(job.chunks):
            return (
                f"chunks [{message.first}, {message.first + message.count}) announced, "
                f"expected from {job.posted} of {len(job.chunks)}"
            )
        ring = self._ring(self._recv_rings, job.peer)
        for k in range(message.first, message.first + message.count):
            nbytes = job.chunks[k].nbytes
            slot, buf = ring.take(nbytes)
            with torch.cuda.stream(self.post_stream):
                if ring.last[slot] is not None:
                    self.post_stream.wait_event(ring.last[slot])  # its previous scatter
                work = dist.irecv(buf, src=job.peer, group=self.group)
            live = job.live
            with torch.cuda.stream(self.scatter_stream):
                work.wait()
                total = checksum_async(buf) if job.request.checksum else None
                if live:
                    job.moves.run(k, buf)
                    job.pending += 1
                event = torch.cuda.Event()
                event.record(self.scatter_stream)
            ring.last[slot] = event
            self._posted[job.peer] += 1
            self._host.counters["bytes_received"] += nbytes
            self._host.counters["chunks_received"] += 1
            self._recvs.add(event, _on_landed(self, job, k, live, total))
        job.posted = message.first + message.count
        return None

    # -- both -----------------------------------------------------------------------------
    def events(self) -> list[Any]:
        out = super().events()
        for ev in out:
            if isinstance(ev, Sent):
                self._in_flight[ev.job.peer] -= 1
            elif isinstance(ev, Landed):
                self._posted[ev.job.peer] -= 1
        return out

    def busy(self) -> bool:
        return any(n > 0 for n in self._in_flight.values()) or any(
            n > 0 for n in self._posted.values()
        )

    def peer_lost(self, peer: int) -> None:
        # NCCL work toward a dead peer never completes; stop counting it
        self._in_flight[peer] = 0
        self._posted[peer] = 0

    def close(self) -> None:
        if not self.busy():
            torch.cuda.synchronize(self.device)
        self._sends.close()
        self._recvs.close()

    def describe(self) -> dict[str, Any]:
        return {"channel": self.name, "device": torch.cuda.get_device_name(self.device)}


def _on_sent(ch: NcclChannel, job: SendJob, k: int, total: Any) -> Any:
    def done() -> None:
        value = checksum_value(*total) if total is not None else None
        ch._post(Sent(job, k, value))

    return done


def _on_landed(ch: NcclChannel, job: RecvJob, k: int, written: bool, total: Any) -> Any:
    def done() -> None:
        value = checksum_value(*total) if total is not None else None
        if written:
            ch._post(WriteDone(job))
        ch._post(Landed(job, k, written, value))

    return done
