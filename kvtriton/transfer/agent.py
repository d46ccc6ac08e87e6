"""The transfer agent: one rank's sender and/or receiver over a control plane and a channel.

A thin owner: it routes control messages and channel events to the :class:`Sender` (context
ranks) or the :class:`Receiver` (generation ranks) and runs the loop. Nothing here branches
on the kind of data channel::

    agent = TransferAgent(topology, rank, pools, control, channel, TransferOptions())
    # context rank                                  # generation rank
    agent.register_source(target, prompt_digest=d)  h = agent.request(target, prompt_digest=d,
    agent.serve()                                                     on_commit=..., on_release=...)
                                                    agent.wait([rid]); h.state, h.session.error
    agent.close()                                   agent.close()

:func:`kvtriton.transfer.connect` builds the control plane and the channel for a
torch.distributed job (sockets for control, gloo / NCCL / CUDA IPC for data).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from kvtriton.target import TransferTarget
from kvtriton.transfer import protocol as P
from kvtriton.transfer.channels.base import DataChannel
from kvtriton.transfer.config import TransferOptions
from kvtriton.transfer.control import ControlPlane, Lost
from kvtriton.transfer.jobs import DataLost, Handed, Landed, Sent, WriteDone
from kvtriton.transfer.moves import PoolSet
from kvtriton.transfer.receiver import Receiver, RecvHandle
from kvtriton.transfer.sender import OnRelease, Sender
from kvtriton.transfer.session import Session
from kvtriton.transfer.topology import Topology

__all__ = ["RecvHandle", "TransferAgent"]

_TO_SENDER = (P.Request, P.Ack, P.Cancel)
_TO_RECEIVER = (P.Schedule, P.Blocks, P.Done, P.Refuse, P.Abort)


class TransferAgent:
    """Transfer endpoint of one rank (context or generation side).

    Args:
        topology: the world split; ``rank`` must be in it.
        rank: this rank (world rank of the topology).
        pools: this rank's pool tensors ``{group: tensor}`` for ``topology.spec(rank)``.
        control: the control plane to this rank's peers.
        channel: the data channel (the agent attaches it).
        options: :class:`TransferOptions`.
        clock: time source in seconds (tests drive a virtual one).
    """

    def __init__(
        self,
        topology: Topology,
        rank: int,
        pools: Mapping[str, torch.Tensor] | PoolSet,
        control: ControlPlane,
        channel: DataChannel,
        options: TransferOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topology = topology
        self.rank = rank
        self.info = topology.info(rank)
        self.is_ctx = self.info.side == "ctx"
        self.spec = topology.spec(rank)
        self.model = topology.model
        self.digest = self.model.model_digest()
        self.pools = pools if isinstance(pools, PoolSet) else PoolSet(self.spec, pools)
        self.options = options or TransferOptions()
        self.control = control
        self.channel = channel
        self.clock = clock
        self.counters: dict[str, float] = _Counters()
        self.peers = tuple(topology.peers(rank))
        self._bye_from: set[int] = set()
        #: peers lost before they said Bye (died, broke the protocol), with the reason
        self.lost_peers: dict[int, str] = {}
        self._bye_sent = False
        self.closed = False
        channel.attach(self)
        self.sender = Sender(self) if self.is_ctx else None
        self.receiver = Receiver(self) if not self.is_ctx else None

    # -- sender API -----------------------------------------------------------------------
    def register_source(
        self,
        target: TransferTarget,
        *,
        prompt_digest: str,
        lease_s: float | None = None,
        on_release: OnRelease | None = None,
        streamed: bool = False,
    ) -> None:
        """Make one request's KV on this rank available to the receivers that read it.

        ``target``: its blocks and slots on this rank (validated where it was built).
        ``prompt_digest``: :func:`~kvtriton.transfer.protocol.prompt_digest` of the prompt;
        requests must name the same. ``lease_s``: seconds the source stays available to
        receivers that have not asked yet (default ``TransferOptions.lease_s``).
        ``on_release(request_id, {receiver: final state})`` runs once when the source is
        released (every receiver ended, or the lease expired; no chunk in flight): free the
        blocks there. ``streamed``: the KV is still being written; chunks of a layer move
        once :meth:`mark_ready` says the layer is written (receivers ask with
        ``TransferOptions.layer_chunks`` so that a chunk holds one layer).
        """
        if self.sender is None:
            raise ValueError(
                f"rank {self.rank} is a generation rank; register_source() runs on "
                f"context ranks {list(self.topology.ctx_ranks)}"
            )
        self.sender.register(
            target.request_id,
            prompt_digest,
            target,
            lease_s=lease_s or self.options.lease,
            on_release=on_release,
            ready=self.channel.ready_marker(),
            streamed=streamed,
        )

    def mark_ready(self, request_id: str, layers: Iterable[int] | None = None) -> bool:
        """Global ``layers`` of a streamed source are written (``None``: all this rank holds).
        On CUDA an event is recorded on the current stream: the reads of those layers wait
        for it on the device, never the host. ``False`` when the source is gone already."""
        if self.sender is None:
            raise ValueError(f"rank {self.rank} is a generation rank (it has no sources)")
        return self.sender.mark_ready(request_id, layers, self.channel.ready_marker())

    # -- receiver API ---------------------------------------------------------------------
    def request(
        self,
        target: TransferTarget,
        *,
        prompt_digest: str,
        mode: str = "per_group",
        on_commit: Callable[[RecvHandle], None] | None = None,
        on_release: Callable[[RecvHandle], None] | None = None,
    ) -> RecvHandle:
        """Ask every sender holding part of this rank's heads and layers for ``target``'s
        ranges (its groups' token ranges and its state groups).

        ``on_commit(handle)`` runs once after every chunk arrived intact (publish the blocks
        there; raising fails the request); ``on_release(handle)`` once after an error or a
        cancel, when no write into the blocks is in flight (free them there). Drive the
        request with :meth:`progress` / :meth:`wait`.
        """
        if self.receiver is None:
            raise ValueError(
                f"rank {self.rank} is a context rank; request() runs on generation "
                f"ranks {list(self.topology.gen_ranks)}"
            )
        return self.receiver.request(
            target, prompt_digest, mode=mode, on_commit=on_commit, on_release=on_release
        )

    def cancel(self, request_id: str, reason: str = "cancelled by the receiver") -> bool:
        """Cancel a receiver request; ``False`` when it already ended."""
        return self._recv().cancel(request_id, reason)

    def handle(self, request_id: str) -> RecvHandle:
        handle = self._recv().handles.get(request_id)
        if handle is None:
            raise KeyError(f"no request {request_id!r} on rank {self.rank}")
        return handle

    def forget(self, request_id: str) -> RecvHandle:
        """Drop an ended receiver request from the agent's table (returns its handle)."""
        return self._recv().forget(request_id)

    def _recv(self) -> Receiver:
        if self.receiver is None:
            raise ValueError(f"rank {self.rank} is a context rank (no receiver requests)")
        return self.receiver

    # -- the loop -------------------------------------------------------------------------
    def progress(self, timeout: float = 0.0) -> None:
        """Handle arrived messages and channel events, schedule sends, check deadlines.

        Waits up to ``timeout`` seconds for the first message or event (less when a
        deadline comes sooner); never sleeps otherwise.
        """
        now = self.clock()
        wake = self._next_wakeup()
        if wake is not None:
            timeout = min(timeout, max(0.0, wake - now))
        for peer, msg in self.control.poll(timeout):
            self._on_message(peer, msg)
        for ev in self.channel.events():
            self._on_event(ev)
        if self.sender is not None:
            self.sender.pump()
            for ev in self.channel.events():  # a synchronous channel may finish at once
                self._on_event(ev)
        now = self.clock()
        if self.sender is not None:
            self.sender.check_deadlines(now)
        if self.receiver is not None:
            self.receiver.check_deadlines(now)

    def _next_wakeup(self) -> float | None:
        times = [
            t
            for t in (
                self.sender.next_deadline() if self.sender else None,
                self.receiver.next_deadline() if self.receiver else None,
                self.channel.next_wakeup(),
            )
            if t is not None
        ]
        return min(times) if times else None

    def _on_message(self, peer: int, msg: P.Message | Lost) -> None:
        if isinstance(msg, Lost):
            self._lost(peer, msg.reason)
        elif isinstance(msg, P.Bye):
            self._bye_from.add(peer)
        elif isinstance(msg, P.Ready) and self.sender is not None:
            error = self.channel.on_peer_message(peer, msg)
            if error is not None:
                self.peer_lost(peer, error)
        elif isinstance(msg, _TO_SENDER) and self.sender is not None:
            if isinstance(msg, P.Request):
                self.sender.on_request(peer, msg)
            elif isinstance(msg, P.Ack):
                self.sender.on_ack(peer, msg)
            else:
                self.sender.on_cancel(peer, msg)
        elif isinstance(msg, _TO_RECEIVER) and self.receiver is not None:
            self.receiver.on_message(peer, msg)
        else:
            self.peer_lost(
                peer,
                f"sent a {type(msg).__name__}, which a "
                f"{'context' if self.is_ctx else 'generation'} rank never "
                f"receives",
            )

    def _on_event(self, ev: Any) -> None:
        if isinstance(ev, Sent):
            assert self.sender is not None
            self.sender.on_sent(ev)
        elif isinstance(ev, Handed):
            assert self.sender is not None
            self.sender.maybe_done(ev.job)
        elif isinstance(ev, Landed):
            assert self.receiver is not None
            self.receiver.on_landed(ev)
        elif isinstance(ev, WriteDone):
            assert self.receiver is not None
            self.receiver.on_write_done(ev.job)
        elif isinstance(ev, DataLost):
            self.peer_lost(ev.peer, ev.reason)

    def peer_lost(self, peer: int, reason: str) -> None:
        """Treat ``peer`` as gone (its connection closed, it died, or it broke the
        protocol): its sessions end in ERROR and nothing more is sent to it."""
        if peer not in self.control.lost:
            self.control.drop(peer, reason)
        self._lost(peer, reason)

    def _lost(self, peer: int, reason: str) -> None:
        if peer in self._bye_from or peer in self.lost_peers:
            return  # an orderly close after Bye, or already handled
        self.lost_peers[peer] = reason
        self.channel.peer_lost(peer)
        if self.sender is not None:
            self.sender.peer_lost(peer, reason)
        if self.receiver is not None:
            self.receiver.peer_lost(peer, reason)

    def wait(self, request_ids: Sequence[str] | None = None, timeout: float | None = None) -> bool:
        """Progress until the given receiver requests (default: all) ended and their blocks
        are committed or released. ``False`` if ``timeout`` seconds passed first."""
        recv = self._recv()
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            ids = list(recv.handles) if request_ids is None else list(request_ids)
            if all(recv.handles[r].settled for r in ids if r in recv.handles):
                return True
            if end is not None and time.monotonic() >= end:
                return False
            self.progress(0.05 if end is None else max(0.0, min(0.05, end - time.monotonic())))

    def serve(self, until: Callable[[], bool] | None = None, timeout: float | None = None) -> bool:
        """Sender loop: progress until ``until()`` holds (default: every receiver said Bye
        or is lost and nothing is in flight). ``False`` if ``timeout`` seconds passed."""
        end = None if timeout is None else time.monotonic() + timeout
        cond = until or self._receivers_done
        while not cond():
            if end is not None and time.monotonic() >= end:
                return False
            self.progress(0.05 if end is None else max(0.0, min(0.05, end - time.monotonic())))
        return True

    def _receivers_done(self) -> bool:
        done = all(p in self._bye_from or p in self.control.lost for p in self.peers)
        return done and not (self.sender and self.sender.busy()) and not self.channel.busy()

    def close(self, timeout: float = 10.0) -> None:
        """End every live session (CANCELLED on both sides, blocks released), say Bye, drain
        what is in flight (up to ``timeout`` seconds) and release the channel and the
        connections. Sources nobody asked for are released too."""
        if self.closed:
            return
        if self.sender is not None:
            self.sender.shutdown()
        if self.receiver is not None:
            self.receiver.shutdown()
        for p in self.peers:
            if p not in self.control.lost:
                self.control.send(p, P.Bye())
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            peers_done = all(p in self._bye_from or p in self.control.lost for p in self.peers)
            busy = self.channel.busy() or (self.receiver is not None and self.receiver.busy())
            if peers_done and not busy:
                break
            self.progress(min(0.05, max(0.0, end - time.monotonic())))
        if self.sender is not None:
            self.sender.release_all()
        self.channel.close()
        self.control.close()
        self.closed = True

    # -- introspection --------------------------------------------------------------------
    def sessions(self, request_id: str | None = None) -> list[Session]:
        """Sessions this agent still holds (sender: of live sources; receiver: of requests
        not yet forgotten), optionally only those of ``request_id``."""
        out: list[Session] = []
        if self.sender is not None:
            out += self.sender.sessions()
        if self.receiver is not None:
            out += self.receiver.sessions()
        return [s for s in out if request_id is None or s.request_id == request_id]

    def stats(self) -> dict[str, Any]:
        """Counters (bytes, chunks, kernel seconds, refusals), sessions ended per state and
        the sizes of the agent's tables."""
        out: dict[str, Any] = {"rank": self.rank, **self.channel.describe(), **self.counters}
        if self.sender is not None:
            out["sender_ended"] = dict(self.sender.ended)
            out["recent_refusals"] = list(self.sender.refusals)
            out["sender_tables"] = self.sender.sizes()
        if self.receiver is not None:
            out["receiver_ended"] = dict(self.receiver.ended)
            out["receiver_tables"] = self.receiver.sizes()
        out["lost_peers"] = sorted(self.lost_peers)
        return out


class _Counters(dict):  # type: ignore[type-arg]
    """Counters that start at 0."""

    def __missing__(self, key: str) -> float:
        return 0.0
