"""The transfer agent: protocol, sessions and chunked pipelining over torch.distributed.

One :class:`TransferAgent` per rank. A context rank serves requests (:meth:`register_source`
then :meth:`serve`); a generation rank asks for them (:meth:`request`, :meth:`cancel`,
:meth:`wait`). Control messages (:mod:`kvtriton.transfer.protocol`) always travel over a gloo
group; data travels over the data group: NCCL for CUDA pools, gloo for CPU pools.

Threads. gloo point-to-point ``Work`` objects never report completion without a blocking
``wait()`` (and ``wait(timeout)`` closes the pair on expiry), so every blocking gloo call runs
on a per-peer thread: a *listener* receives control messages (and, on gloo, the data frames
announced by a ``Schedule``) and a *writer* sends control messages (and gloo data frames) in
order. The owning thread runs the state machines in :meth:`progress`: it never blocks on the
network, so timeouts, cancellation and dead peers are handled while transfers are in flight.
NCCL calls are issued only from the owning thread.

Pipelining. A request is cut into chunks (:mod:`kvtriton.transfer.chunking`). The sender
gathers chunk ``k+1`` while chunk ``k`` is on the wire: on gloo the writer thread sends
while the owning thread gathers the next chunk; on CUDA gathers run on their own stream and
each ``isend`` waits only for its own gather, staging buffers are a ring whose reuse waits
for the send that last used the slot. The receiver scatters chunk ``k`` while chunk ``k+1``
arrives: gloo frames are received by the listener while the owning thread scatters; on CUDA,
``irecv`` of frame ``k`` waits only for the scatter that last used its slot, and scatters run
on their own stream. Several single-chunk requests to the same receiver share one frame
(``kernels.pack_requests``, one launch per group for the batch).

Safety. The receiver scatters only into blocks of live sessions, commits (``on_commit``) only
after every chunk of every sender arrived, was scattered and (optionally) matched its
checksum, and releases (``on_release``) on error or cancel once no scatter into the blocks is
still in flight. Terminal session states are never overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from kvtriton import kernels
from kvtriton.kernels import PackedRequest
from kvtriton.layout import SEGMENT_ALIGN, select_heads, select_layers
from kvtriton.ranges import BlockSpan, TokenRange
from kvtriton.spec import KVCacheSpec
from kvtriton.transfer import protocol as P
from kvtriton.transfer.chunking import Chunk, plan_chunks
from kvtriton.transfer.config import FaultInjection, TransferOptions
from kvtriton.transfer.session import Session, SessionState
from kvtriton.transfer.topology import Topology

__all__ = [
    "FaultInjection",
    "RecvHandle",
    "TransferAgent",
    "TransferOptions",
    "checksum",
]

_CTRL_TAG = 11
_DATA_TAG = 12
#: Control frames: one fixed-size gloo message holding a 4-byte length and then one or more
#: encoded messages back to back; what does not fit follows as a second message. Each gloo
#: message costs a round trip (the sender waits until the receiver posted its recv), so small
#: messages travel inline and queued messages share a frame.
CTRL_FRAME_BYTES = 512
_FRAME_LEN = struct.Struct("<I")
_INLINE = CTRL_FRAME_BYTES - _FRAME_LEN.size


def checksum(buf: torch.Tensor) -> int:
    """Position-weighted 64-bit checksum of a 1-D uint8 tensor (same value on any device).

    ``sum(x) + sum(x * (i + 1))`` over the bytes viewed as int32 words (wrapping int64
    arithmetic), mixed with the length: any single corrupted byte changes it.
    """
    return _checksum_value(*_checksum_async(buf))


def _checksum_value(total: torch.Tensor, n: int) -> int:
    return (int(total.item()) ^ (n * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF


def _checksum_async(buf: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The device-side part of :func:`checksum` (no host sync): ``(int64 scalar, nbytes)``."""
    n = buf.numel()
    words = n // 4
    total = torch.zeros((), dtype=torch.int64, device=buf.device)
    if words:
        x = buf[: words * 4].view(torch.int32).to(torch.int64)
        idx = torch.arange(1, words + 1, dtype=torch.int64, device=buf.device)
        total = total + x.sum() + (x * idx).sum()
    if n % 4:
        tail = buf[words * 4 :].to(torch.int64)
        total = total + (tail * torch.arange(7, 7 + tail.numel(), device=buf.device)).sum()
    return total, n


def _check_blocks(
    pool: torch.Tensor, span: BlockSpan, rng: TokenRange, group: str, side: str
) -> None:
    """Every block the range touches must exist in the pool (ValueError otherwise)."""
    bsz = int(pool.shape[3])
    ids = span.block_ids_for(rng, bsz, group=group)
    bad = [b for b in ids if b >= pool.shape[1]]
    if bad:
        raise ValueError(
            f"group {group!r}: {side} block ids {bad[:4]} are outside the pool "
            f"of {pool.shape[1]} blocks"
        )


def _check_slot(pool: torch.Tensor, slot: int, group: str, side: str) -> None:
    if not 0 <= slot < pool.shape[1]:
        raise ValueError(
            f"state group {group!r}: {side} slot {slot} is outside [0, {pool.shape[1]})"
        )


class _BufferPool:
    """Reusable CPU uint8 buffers (fresh multi-MiB allocations page-fault on every frame)."""

    def __init__(self, min_bytes: int, keep: int = 4) -> None:
        self.min_bytes = min_bytes
        self.keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.numel() >= nbytes:
                    return self._free.pop(i)[:nbytes]
        return torch.empty(max(nbytes, self.min_bytes), dtype=torch.uint8)[:nbytes]

    def give(self, view: torch.Tensor) -> None:
        base = view._base if view._base is not None else view
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(base)


# ---------------------------------------------------------------------------------------
# per-peer threads
# ---------------------------------------------------------------------------------------
class _Peer:
    """Listener + writer threads of one peer rank."""

    def __init__(self, agent: TransferAgent, rank: int) -> None:
        self.agent = agent
        self.rank = rank
        self.outbox: queue.Queue[Any] = queue.Queue()
        self.lost: str | None = None
        self.bye_received = False
        self.bye_sent = False
        self.listener = threading.Thread(
            target=self._listen, daemon=True, name=f"kvtr-listen-{agent.rank}<-{rank}"
        )
        self.writer = threading.Thread(
            target=self._write, daemon=True, name=f"kvtr-write-{agent.rank}->{rank}"
        )
        self.listener.start()
        self.writer.start()
        #: pre-posted gloo receives: frames this rank expects from the peer, in order
        self.expect: queue.Queue[Any] = queue.Queue()
        self.data_listener: threading.Thread | None = None
        if agent.options.prepost and not agent.nccl_data:
            self.data_listener = threading.Thread(
                target=self._listen_data, daemon=True, name=f"kvtr-data-{agent.rank}<-{rank}"
            )
            self.data_listener.start()

    def _listen_data(self) -> None:
        agent, events = self.agent, self.agent._events
        try:
            while True:
                frame = self.expect.get()
                if frame is None:
                    return
                buf = agent._cpu_bufs.take(frame.nbytes)
                dist.recv(buf, src=self.rank, group=agent.data_group, tag=_DATA_TAG)
                events.put(("frames", self.rank, P.Schedule((frame,)), [buf]))
        except Exception as exc:
            events.put(("lost", self.rank, f"{type(exc).__name__}: {exc}", None))

    # listener: control messages, and gloo data frames right after their Schedule
    def _listen(self) -> None:
        agent, events = self.agent, self.agent._events
        try:
            while True:
                frame = torch.empty(CTRL_FRAME_BYTES, dtype=torch.uint8)
                dist.recv(frame, src=self.rank, group=agent.ctrl_group, tag=_CTRL_TAG)
                raw = frame.numpy().tobytes()
                (length,) = _FRAME_LEN.unpack_from(raw)
                blob = raw[_FRAME_LEN.size : _FRAME_LEN.size + min(length, _INLINE)]
                if length > _INLINE:
                    rest = torch.empty(length - _INLINE, dtype=torch.uint8)
                    dist.recv(rest, src=self.rank, group=agent.ctrl_group, tag=_CTRL_TAG)
                    blob += rest.numpy().tobytes()
                pos = 0
                while pos < len(blob):  # one or more messages, back to back
                    kind, size = P.decode_header(blob[pos : pos + P.HEADER_BYTES])
                    pos += P.HEADER_BYTES
                    msg = P.decode(kind, blob[pos : pos + size])
                    pos += size
                    if isinstance(msg, P.Schedule) and not agent.nccl_data:
                        bufs = []
                        for f in msg.frames:
                            buf = agent._cpu_bufs.take(f.nbytes)
                            dist.recv(buf, src=self.rank, group=agent.data_group, tag=_DATA_TAG)
                            bufs.append(buf)
                        events.put(("frames", self.rank, msg, bufs))
                    else:
                        events.put(("msg", self.rank, msg, None))
                    if isinstance(msg, P.Bye):
                        return
        except Exception as exc:  # peer died, pair closed, protocol error
            events.put(("lost", self.rank, f"{type(exc).__name__}: {exc}", None))

    def _write(self) -> None:
        agent = self.agent
        carry: Any = None
        while True:
            item = carry if carry is not None else self.outbox.get()
            carry = None
            if item is None:
                return
            kind, obj, token = item
            if self.lost is not None:
                if token is not None:
                    agent._events.put(("sent", self.rank, token, False))
                continue
            try:
                if kind == "msg":
                    # Coalesce every control message already queued (up to a data frame or
                    # the end marker) into one control frame: under load, Requests, Acks and
                    # Schedules of many requests share one gloo round trip.
                    parts = [b"".join(P.encode(obj))]
                    while True:
                        try:
                            nxt = self.outbox.get_nowait()
                        except queue.Empty:
                            break
                        if nxt is not None and nxt[0] == "msg":
                            parts.append(b"".join(P.encode(nxt[1])))
                            continue
                        carry = nxt if nxt is not None else ("end", None, None)
                        break
                    blob = b"".join(parts)
                    frame = bytearray(CTRL_FRAME_BYTES)
                    _FRAME_LEN.pack_into(frame, 0, len(blob))
                    inline = blob[:_INLINE]
                    frame[_FRAME_LEN.size : _FRAME_LEN.size + len(inline)] = inline
                    dist.send(
                        torch.frombuffer(frame, dtype=torch.uint8),
                        dst=self.rank,
                        group=agent.ctrl_group,
                        tag=_CTRL_TAG,
                    )
                    if len(blob) > _INLINE:
                        dist.send(
                            torch.frombuffer(bytearray(blob[_INLINE:]), dtype=torch.uint8),
                            dst=self.rank,
                            group=agent.ctrl_group,
                            tag=_CTRL_TAG,
                        )
                    if carry is not None and carry[0] == "end":
                        return
                else:  # gloo data frame
                    dist.send(obj, dst=self.rank, group=agent.data_group, tag=_DATA_TAG)
                if token is not None:
                    agent._events.put(("sent", self.rank, token, True))
            except Exception as exc:
                self.lost = f"{type(exc).__name__}: {exc}"
                agent._events.put(("lost", self.rank, self.lost, None))
                if token is not None:
                    agent._events.put(("sent", self.rank, token, False))

    def send_msg(self, msg: P.Message) -> None:
        self.outbox.put(("msg", msg, None))

    def send_data(self, tensor: torch.Tensor, token: Any) -> None:
        self.outbox.put(("data", tensor, token))


# ---------------------------------------------------------------------------------------
# sender side
# ---------------------------------------------------------------------------------------
@dataclass
class _Source:
    num_tokens: int
    spans: Mapping[str, BlockSpan]
    state_slots: Mapping[str, int]
    on_finished: Callable[[str, dict[int, Session]], None] | None


@dataclass
class _SendJob:
    session: Session
    request: P.Request
    chunks: tuple[Chunk, ...] = ()
    next_chunk: int = 0
    sent_chunks: int = 0
    checksums: dict[int, int] = field(default_factory=dict)
    queued: bool = False
    done_sent: bool = False
    prepost: bool = False  # the receiver pre-posted request.sizes: send exactly those


@dataclass
class _Frame:
    peer: int
    parts: list[tuple[_SendJob, Chunk, int]]  # (job, chunk, offset)
    buffer: torch.Tensor
    work: Any = None  # NCCL work


# ---------------------------------------------------------------------------------------
# receiver side
# ---------------------------------------------------------------------------------------
@dataclass
class _RecvPart:
    request: P.Request
    chunks: tuple[Chunk, ...]
    received: set[int] = field(default_factory=set)
    checksums: dict[int, Any] = field(default_factory=dict)
    done: P.Done | None = None


@dataclass(eq=False)
class RecvHandle:
    """A receiver-side request: its session, what it asked each sender for, and stats.

    Attributes:
        session: the receiver session (``session.state``, ``session.error``).
        num_tokens: prompt length ``P``.
        tokens, states: what moves, per group (the same for every sender).
        spans, state_slots: the destination blocks / slots on this rank.
        parts: per sender rank, the request sent and the progress of its chunks.
        bytes_received: payload bytes received so far (all senders).
        t_first_data: monotonic time the first frame arrived (gloo) or was announced and
            its receive posted (NCCL).
        t_last_data: monotonic time the last frame was scattered (NCCL: when the host saw
            its scatter event complete).
    """

    session: Session
    num_tokens: int
    tokens: Mapping[str, TokenRange]
    states: tuple[str, ...]
    spans: Mapping[str, BlockSpan]
    state_slots: Mapping[str, int]
    parts: dict[int, _RecvPart] = field(default_factory=dict)
    on_commit: Callable[[RecvHandle], None] | None = None
    on_release: Callable[[RecvHandle], None] | None = None
    bytes_received: int = 0
    t_first_data: float | None = None
    t_last_data: float | None = None
    pending: list[Any] = field(default_factory=list)  # CUDA events of in-flight scatters
    released: bool = False
    commit_error: str | None = None

    @property
    def request_id(self) -> str:
        return self.session.request_id

    @property
    def state(self) -> SessionState:
        return self.session.state

    @property
    def bytes_expected(self) -> int:
        return sum(c.nbytes for p in self.parts.values() for c in p.chunks)


# ---------------------------------------------------------------------------------------
# the agent
# ---------------------------------------------------------------------------------------
class TransferAgent:
    """Transfer endpoint of one rank (context or generation side).

    Args:
        topology: the world split; ``rank`` must be in it.
        rank: this process's rank in ``ctrl_group``/``data_group`` (world ranks).
        pools: this rank's pool tensors ``{group: tensor}`` for ``topology.spec(rank)``.
        ctrl_group: a gloo process group for control messages.
        data_group: a gloo (CPU pools) or NCCL (CUDA pools) group for data.
        options: :class:`TransferOptions`.
    """

    def __init__(
        self,
        topology: Topology,
        rank: int,
        pools: Mapping[str, torch.Tensor],
        ctrl_group: Any,
        data_group: Any,
        options: TransferOptions | None = None,
    ) -> None:
        self.topology = topology
        self.rank = rank
        self.info = topology.info(rank)
        self.spec: KVCacheSpec = topology.spec(rank)
        self.model = topology.model
        self.digest = self.model.model_digest()
        self.pools = dict(pools)
        missing = [g for g in self.spec.group_names if g not in self.pools]
        if missing:
            raise ValueError(f"rank {rank}: pools lack groups {missing} of its spec")
        self.options = options or TransferOptions()
        if dist.get_backend(ctrl_group) != "gloo":
            raise ValueError(
                f"ctrl_group must be a gloo group, got {dist.get_backend(ctrl_group)!r}"
            )
        self.ctrl_group = ctrl_group
        self.data_group = data_group
        self.nccl_data = dist.get_backend(data_group) == "nccl"
        self.device = next(iter(self.pools.values())).device
        if self.nccl_data and self.device.type != "cuda":
            raise ValueError("an NCCL data group needs CUDA pools")
        if not self.nccl_data and self.device.type != "cpu":
            raise ValueError("CUDA pools need an NCCL data group (gloo data moves CPU tensors)")
        self._events: queue.Queue[Any] = queue.Queue()
        self._cpu_bufs = _BufferPool(
            min(self.options.chunk_bytes, 64 << 20), keep=2 * self.options.max_frames_in_flight + 2
        )
        self._peers = {p: _Peer(self, p) for p in topology.peers(rank)}
        self._receivers = topology.receivers(rank) if self.info.side == "ctx" else ()
        self.closed = False
        # sender state
        self._sources: dict[str, _Source] = {}
        self._send_jobs: dict[tuple[int, str], _SendJob] = {}
        self._send_queue: dict[int, deque[_SendJob]] = {p: deque() for p in self._peers}
        self._pp_queue: dict[int, deque[_SendJob]] = {p: deque() for p in self._peers}
        self._inflight: dict[int, int] = dict.fromkeys(self._peers, 0)
        self._frames_out = 0
        self._next_send_at = 0.0
        self._frame_tokens: dict[int, _Frame] = {}
        self._nccl_sends: deque[_Frame] = deque()
        # receiver state
        self._recv: dict[str, RecvHandle] = {}
        self._zombies: list[RecvHandle] = []
        if self.nccl_data:
            self._gather_stream = torch.cuda.Stream(self.device)
            self._scatter_stream = torch.cuda.Stream(self.device)
            self._post_stream = torch.cuda.Stream(self.device)
            self._send_ring: dict[int, list[Any]] = {p: [] for p in self._peers}
            self._recv_ring: dict[int, list[Any]] = {p: [] for p in self._peers}
            self._send_slot = dict.fromkeys(self._peers, 0)
            self._retired: list[torch.Tensor] = []
            self._recv_slot = dict.fromkeys(self._peers, 0)
        self.stats: dict[str, float] = {
            "gather_s": 0.0,
            "scatter_s": 0.0,
            "frames_sent": 0,
            "frames_received": 0,
            "bytes_sent": 0,
        }
        if self.nccl_data:
            self._connect_nccl()

    def _connect_nccl(self) -> None:
        """Create every (sender, receiver) NCCL communicator now, in one global pair order.

        A point-to-point communicator is created by the first send/recv on the pair and that
        creation blocks the host until the peer joins. Left to the first transfer, a sender
        waiting for receiver A while A waits for another sender ... can form a cycle (with
        PP and TP on both sides); visiting the pairs in the same sorted order on every rank
        cannot. Every rank of the topology constructs its agent, so every pair completes.
        """
        pairs = sorted(
            (src.sender, r) for r in self.topology.gen_ranks for src in self.topology.sources(r)
        )
        token = torch.zeros(1, dtype=torch.uint8, device=self.device)
        for s, r in pairs:
            if s == self.rank:
                dist.isend(token, dst=r, group=self.data_group).wait()
            elif r == self.rank:
                dist.irecv(token, src=s, group=self.data_group).wait()
        torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ sender API
    def register_source(
        self,
        request_id: str,
        num_tokens: int,
        spans: Mapping[str, BlockSpan],
        state_slots: Mapping[str, int] | None = None,
        *,
        on_finished: Callable[[str, dict[int, Session]], None] | None = None,
    ) -> None:
        """Make ``request_id``'s KV on this rank available to receivers.

        ``spans``: source block span per attention group of this rank; ``state_slots``: the
        request's slot per state group. ``on_finished(request_id, {receiver: session})`` runs
        once every receiver that this rank serves ended its session (then the blocks may be
        freed).
        """
        if request_id in self._sources:
            raise ValueError(f"request {request_id!r} is already registered on rank {self.rank}")
        unknown = sorted((set(spans) | set(state_slots or {})) - set(self.spec.group_names))
        if unknown:
            raise ValueError(f"request {request_id!r}: unknown groups {unknown}")
        self._sources[request_id] = _Source(
            num_tokens, dict(spans), dict(state_slots or {}), on_finished
        )
        for (_peer, rid), job in list(self._send_jobs.items()):
            if rid == request_id and job.session.state is SessionState.INIT:
                self._accept(job)

    def send_sessions(self, request_id: str) -> dict[int, Session]:
        """This rank's sender sessions of ``request_id`` by receiver rank."""
        return {p: j.session for (p, r), j in self._send_jobs.items() if r == request_id}

    # ------------------------------------------------------------------ receiver API
    def request(
        self,
        request_id: str,
        num_tokens: int,
        tokens: Mapping[str, TokenRange],
        states: Sequence[str],
        spans: Mapping[str, BlockSpan],
        state_slots: Mapping[str, int] | None = None,
        *,
        mode: str = "per_group",
        on_commit: Callable[[RecvHandle], None] | None = None,
        on_release: Callable[[RecvHandle], None] | None = None,
    ) -> RecvHandle:
        """Ask the senders holding this rank's heads and layers for one request's KV.

        Args:
            request_id: unique among this rank's live requests.
            num_tokens: prompt length ``P``.
            tokens: half-open positions to move per attention group (a group's transfer
                range; empty or absent = nothing moves).
            states: state groups whose state moves.
            spans: destination block span per attention group with tokens (this rank's
                block size); ``state_slots``: destination slot per moving state group.
            on_commit: called once after every chunk arrived intact and was scattered
                (publish the blocks to the prefix cache here); raising fails the session.
            on_release: called once on ERROR/CANCELLED after no scatter is in flight
                (free the blocks here).
        Returns the :class:`RecvHandle`; drive it with :meth:`progress` / :meth:`wait`.
        """
        if self.info.side != "gen":
            raise ValueError(
                f"rank {self.rank} is a context rank; request() runs on "
                f"generation ranks {list(self.topology.gen_ranks)}"
            )
        if request_id in self._recv:
            raise ValueError(f"request {request_id!r} is already live on rank {self.rank}")
        state_slots = dict(state_slots or {})
        tokens = {g: r for g, r in tokens.items() if not r.is_empty}
        states = tuple(states)
        # validation before anything is sent
        for g in tokens:
            group = self.spec.group(g)
            if group.kind == "state":
                raise ValueError(
                    f"request {request_id!r}: group {g!r} is a state group; "
                    f"list it in states, not tokens"
                )
            if g not in spans:
                raise ValueError(f"request {request_id!r}: no destination span for group {g!r}")
            spans[g].check_covers(tokens[g], self.spec.tokens_per_block, group=g, side="receiver")
            _check_blocks(self.pools[g], spans[g], tokens[g], g, "destination")
            if tokens[g].end > num_tokens:
                raise ValueError(
                    f"request {request_id!r}: group {g!r} range {tokens[g]} "
                    f"goes past the prompt length {num_tokens}"
                )
        for s in states:
            if self.spec.group(s).kind != "state":
                raise ValueError(f"request {request_id!r}: {s!r} is not a state group")
            if s not in state_slots:
                raise ValueError(
                    f"request {request_id!r}: no destination slot for state group {s!r}"
                )
            _check_slot(self.pools[s], state_slots[s], s, "destination")
        session = Session(request_id, "recv", timeout_s=self.options.timeout_s)
        handle = RecvHandle(
            session,
            num_tokens,
            tokens,
            states,
            dict(spans),
            state_slots,
            on_commit=on_commit,
            on_release=on_release,
        )
        for src in self.topology.sources(self.rank):
            req = P.Request(
                request_id=request_id,
                model_digest=self.digest,
                num_tokens=num_tokens,
                tokens={g: r for g, r in tokens.items() if g in src.layers},
                states=tuple(s for s in states if s in src.layers),
                layers={g: v for g, v in src.layers.items() if g in tokens or g in states},
                heads={g: v for g, v in src.heads.items() if g in tokens or g in states},
                chunk_bytes=self.options.chunk_bytes,
                checksum=self.options.checksum,
                mode=mode,
            )
            chunks = plan_chunks(
                self.model,
                req.tokens,
                req.states,
                layers=req.layers,
                heads=req.heads,
                chunk_bytes=req.chunk_bytes,
            )
            if self.options.prepost and chunks:
                req = dataclasses.replace(req, sizes=tuple(c.nbytes for c in chunks))
            # Every source gets the request, even one with nothing to move (a full hit
            # there): its Done/Ack tells the sender the request was consumed.
            handle.parts[src.sender] = _RecvPart(req, chunks)
        self._recv[request_id] = handle
        for sender, part in handle.parts.items():
            peer = self._peers[sender]
            if peer.lost is not None:
                self._fail_recv(
                    handle, f"sender rank {sender} is unreachable: {peer.lost}", notify=sender
                )
                return handle
            peer.send_msg(part.request)
        session.advance(SessionState.READY)
        if self.options.prepost:
            for sender, part in handle.parts.items():
                frames = tuple(
                    P.Frame(c.nbytes, (P.FramePart(request_id, c.index, 0, c.nbytes),))
                    for c in part.chunks
                )
                if not frames:
                    continue
                if self.nccl_data:  # receives and scatters enqueued now, before any reply
                    self._post_nccl_recvs(sender, P.Schedule(frames))
                else:
                    for f in frames:
                        self._peers[sender].expect.put(f)
        return handle

    def cancel(self, request_id: str, reason: str = "cancelled by the receiver") -> bool:
        """Cancel a live receiver request (before or during its transfer). Returns whether
        it was cancelled (``False`` when it already ended)."""
        handle = self._recv.get(request_id)
        if handle is None:
            raise KeyError(f"no live request {request_id!r} on rank {self.rank}")
        if not handle.session.cancel(reason):
            return False
        self._notify_senders(handle, reason, error=False)
        self._release(handle)
        return True

    def handle(self, request_id: str) -> RecvHandle:
        return self._recv[request_id]

    def forget(self, request_id: str) -> None:
        """Drop a terminal receiver request from the agent's table."""
        handle = self._recv[request_id]
        if not handle.session.is_terminal:
            raise ValueError(f"request {request_id!r} is still {handle.state.value}")
        if handle.pending:
            self._zombies.append(handle)
        del self._recv[request_id]

    # ------------------------------------------------------------------ event loop
    def progress(self, timeout: float = 0.0) -> None:
        """Handle arrived messages and frames, push sends, check deadlines and CUDA work.

        Blocks up to ``timeout`` seconds waiting for the first event.
        """
        if self.nccl_data and (self._nccl_sends or self._has_gpu_pending()):
            timeout = min(timeout, 0.0002)
        try:
            ev = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            ev = None
        while ev is not None:
            self._handle_event(ev)
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                ev = None
        self._pump_sends()
        if self.nccl_data:
            self._poll_gpu()
        self._check_deadlines()

    def wait(self, request_ids: Sequence[str] | None = None, timeout: float | None = None) -> bool:
        """Progress until the given receiver requests (default: all live ones) are terminal
        and released. Returns ``False`` if ``timeout`` seconds passed first."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            ids = list(self._recv) if request_ids is None else list(request_ids)
            if all(
                self._recv[r].session.is_terminal and not self._recv[r].pending
                for r in ids
                if r in self._recv
            ):
                return True
            if end is not None and time.monotonic() >= end:
                return False
            self.progress(0.01)

    def serve(self, until: Callable[[], bool] | None = None, timeout: float | None = None) -> bool:
        """Sender loop: progress until ``until()`` holds (default: every receiver peer said
        Bye or was lost, and no send is in flight). Returns ``False`` on timeout."""
        end = None if timeout is None else time.monotonic() + timeout

        def default() -> bool:
            return (
                all(p.bye_received or p.lost is not None for p in self._peers.values())
                and not self._nccl_sends
                and not any(self._inflight.values())
                and not any(
                    q for peer, q in self._pp_queue.items() if self._peers[peer].lost is None
                )
            )

        cond = until or default
        while not cond():
            if end is not None and time.monotonic() >= end:
                return False
            self.progress(0.01)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Say Bye to every peer and stop the threads (after the peers' Bye arrived, or
        ``timeout`` seconds)."""
        if self.closed:
            return
        for p in self._peers.values():
            if p.lost is None and not p.bye_sent:
                p.send_msg(P.Bye())
                p.bye_sent = True
        end = time.monotonic() + timeout
        while time.monotonic() < end and not all(
            p.bye_received or p.lost is not None for p in self._peers.values()
        ):
            self.progress(0.01)
        for p in self._peers.values():
            p.outbox.put(None)
            p.expect.put(None)
        for p in self._peers.values():
            p.writer.join(timeout=max(0.0, end - time.monotonic()) + 1.0)
        if self.nccl_data:
            torch.cuda.synchronize(self.device)
            self._retired.clear()
        self.closed = True

    # ------------------------------------------------------------------ events
    def _handle_event(self, ev: tuple[str, int, Any, Any]) -> None:
        kind, peer, obj, extra = ev
        if kind == "msg":
            self._on_message(peer, obj)
        elif kind == "frames":
            self._on_frames(peer, obj, extra)
        elif kind == "sent":
            self._on_sent(peer, obj, extra)
        elif kind == "lost":
            self._on_lost(peer, obj)

    def _on_message(self, peer: int, msg: P.Message) -> None:
        if isinstance(msg, P.Request):
            self._on_request(peer, msg)
        elif isinstance(msg, P.Cancel):
            job = self._send_jobs.get((peer, msg.request_id))
            if job is not None:
                why = f"receiver rank {peer}: {msg.reason}"
                (job.session.fail(why) if msg.error else job.session.cancel(why))
                self._maybe_source_finished(msg.request_id)
        elif isinstance(msg, P.Ack):
            job = self._send_jobs.get((peer, msg.request_id))
            if job is not None and not job.session.is_terminal:
                job.session.advance_to(SessionState.TRANSFERRED)
                self._maybe_source_finished(msg.request_id)
        elif isinstance(msg, P.Schedule):  # NCCL data: post the receives
            self._post_nccl_recvs(peer, msg)
        elif isinstance(msg, P.Done):
            self._on_done(peer, msg)
        elif isinstance(msg, (P.Refuse, P.Abort)):
            handle = self._recv.get(msg.request_id)
            if handle is not None:
                verb = "refused" if isinstance(msg, P.Refuse) else "aborted"
                self._fail_recv(
                    handle,
                    f"sender rank {peer} {verb} request {msg.request_id!r}: {msg.reason}",
                    notify=peer,
                )
        elif isinstance(msg, P.Bye):
            self._peers[peer].bye_received = True

    def _on_lost(self, peer: int, why: str) -> None:
        p = self._peers[peer]
        if p.bye_received:
            return
        if p.lost is None:
            p.lost = why
        for handle in list(self._recv.values()):
            if peer in handle.parts and not handle.session.is_terminal:
                self._fail_recv(handle, f"lost sender rank {peer}: {why}", notify=peer)
        for (q, rid), job in list(self._send_jobs.items()):
            if q == peer and job.session.fail(f"lost receiver rank {peer}: {why}"):
                self._maybe_source_finished(rid)

    # ------------------------------------------------------------------ sender internals
    def _on_request(self, peer: int, req: P.Request) -> None:
        key = (peer, req.request_id)
        old = self._send_jobs.get(key)
        if old is not None and not old.session.is_terminal:
            why = f"duplicate request id {req.request_id!r} while one is live"
            self._peers[peer].send_msg(P.Refuse(req.request_id, why))
            if req.sizes:  # the receiver posted receives for it: feed them dummy bytes
                dup = _SendJob(Session(req.request_id, "send", peer=peer), req, prepost=True)
                dup.session.fail(why)
                self._pp_queue[peer].append(dup)
            return
        session = Session(req.request_id, "send", peer=peer, timeout_s=self.options.timeout_s)
        job = _SendJob(session, req, prepost=bool(req.sizes))
        self._send_jobs[key] = job
        if job.prepost:
            self._pp_queue[peer].append(job)  # strict request order on this pair
        if req.model_digest != self.digest:
            self._refuse(
                job,
                f"spec mismatch: receiver model digest {req.model_digest}, "
                f"sender rank {self.rank} holds {self.model.name!r} with digest "
                f"{self.digest}",
            )
            return
        try:
            P.validate_request_shape(req, self.spec.group_names)
            for g in [*req.tokens, *req.states]:
                group = self.spec.group(g)
                select_layers(group, req.layers.get(g))
                select_heads(group, req.heads.get(g))
            job.chunks = plan_chunks(
                self.model,
                req.tokens,
                req.states,
                layers=req.layers,
                heads=req.heads,
                chunk_bytes=req.chunk_bytes,
            )
        except (ValueError, KeyError) as exc:
            self._refuse(job, f"bad request: {exc}")
            return
        if job.prepost and tuple(c.nbytes for c in job.chunks) != req.sizes:
            self._refuse(
                job,
                f"chunk plan mismatch: receiver posted {list(req.sizes)} bytes, "
                f"this sender plans {[c.nbytes for c in job.chunks]}",
            )
            return
        if req.request_id in self._sources:
            self._accept(job)

    def _refuse(self, job: _SendJob, reason: str) -> None:
        job.session.fail(reason)
        self._peers[job.session.peer].send_msg(P.Refuse(job.request.request_id, reason))
        self._maybe_source_finished(job.request.request_id)

    def _accept(self, job: _SendJob) -> None:
        src = self._sources[job.request.request_id]
        req = job.request
        try:
            if src.num_tokens != req.num_tokens:
                raise ValueError(
                    f"prompt length: receiver says {req.num_tokens}, sender "
                    f"registered {src.num_tokens}"
                )
            for g, rng in req.tokens.items():
                if g not in src.spans:
                    raise ValueError(f"group {g!r}: no source span registered")
                src.spans[g].check_covers(rng, self.spec.tokens_per_block, group=g, side="sender")
                _check_blocks(self.pools[g], src.spans[g], rng, g, "source")
            for s in req.states:
                if s not in src.state_slots:
                    raise ValueError(f"state group {s!r}: no source slot registered")
                _check_slot(self.pools[s], src.state_slots[s], s, "source")
        except ValueError as exc:
            self._refuse(job, str(exc))
            return
        job.session.advance(SessionState.READY)
        if not job.chunks:  # nothing to move from this rank
            job.session.advance(SessionState.TRANSFERRING)
            self._send_done(job)
            return
        if not self.options.faults.stall and not job.prepost:
            self._send_queue[job.session.peer].append(job)
            job.queued = True

    def _send_done(self, job: _SendJob) -> None:
        if job.done_sent:
            return
        job.done_sent = True
        sums = (
            tuple(job.checksums[k] for k in range(len(job.chunks))) if job.request.checksum else ()
        )
        self._peers[job.session.peer].send_msg(
            P.Done(job.request.request_id, len(job.chunks), sums)
        )
        # The session ends TRANSFERRED when the receiver's Ack arrives.

    def _maybe_source_finished(self, request_id: str) -> None:
        src = self._sources.get(request_id)
        if src is None or src.on_finished is None:
            return
        expected = self._receivers
        sessions = self.send_sessions(request_id)
        if all(r in sessions and sessions[r].is_terminal for r in expected):
            cb, src.on_finished = src.on_finished, None
            cb(request_id, sessions)

    def _next_frame(self, peer: int) -> list[tuple[_SendJob, Chunk]] | None:
        q = self._send_queue[peer]
        while q and q[0].session.is_terminal:
            q.popleft().queued = False
        if not q:
            return None
        head = q[0]
        if self.options.batch and len(head.chunks) == 1 and head.next_chunk == 0:
            parts: list[tuple[_SendJob, Chunk]] = []
            used = 0
            for job in list(q):
                if job.session.is_terminal:
                    continue
                if len(job.chunks) != 1 or job.next_chunk != 0:
                    continue
                size = -(-job.chunks[0].nbytes // SEGMENT_ALIGN) * SEGMENT_ALIGN
                if parts and used + size > self.options.chunk_bytes:
                    break
                parts.append((job, job.chunks[0]))
                used += size
            for job, _ in parts:
                job.next_chunk = 1
                q.remove(job)
                job.queued = False
            return parts
        # Round robin over this peer's requests: one chunk each, so a short request is not
        # stuck behind a long one (sessions interleave on the wire).
        chunk = head.chunks[head.next_chunk]
        head.next_chunk += 1
        q.popleft()
        if head.next_chunk == len(head.chunks):
            head.queued = False
        else:
            q.append(head)
        return [(head, chunk)]

    def _pump_prepost(self, peer: int) -> None:
        """Pre-posted mode: every expected chunk, strictly in request order; real data for
        live requests, dummy bytes for refused / cancelled / failed ones."""
        q = self._pp_queue[peer]
        delay = self.options.faults.frame_delay_s
        while q:
            if not self.nccl_data and self._inflight[peer] >= self.options.max_frames_in_flight:
                return
            if delay and time.monotonic() < self._next_send_at:
                return
            job = q[0]
            sizes = job.request.sizes
            if job.next_chunk >= len(sizes):
                q.popleft()
                continue
            if job.session.state is SessionState.INIT:
                return  # head of line: waits for its source to be registered (or times out)
            if self.options.faults.stall and not job.session.is_terminal:
                return
            k = job.next_chunk
            job.next_chunk += 1
            if job.session.is_terminal:
                self._send_dummy(peer, sizes[k])
            else:
                self._send_frame(peer, [(job, job.chunks[k])], announce=False)
            if delay:
                self._next_send_at = time.monotonic() + delay

    def _send_dummy(self, peer: int, nbytes: int) -> None:
        """Bytes a pre-posted receive expects for a request that will not be served."""
        if self.nccl_data:
            buf, slot = self._staging(
                self._send_ring[peer], self._send_slot, peer, nbytes, self._gather_stream, send=True
            )
            with torch.cuda.stream(self._gather_stream):
                work = dist.isend(buf, dst=peer, group=self.data_group)
            self._send_ring[peer][slot] = (self._send_ring[peer][slot][0], work)
            self._nccl_sends.append(_Frame(peer, [], buf, work))
        else:
            frame = _Frame(peer, [], self._cpu_bufs.take(nbytes))
            token = id(frame)
            self._frame_tokens[token] = frame
            self._inflight[peer] += 1
            self._peers[peer].send_data(frame.buffer, token)
        self.stats["frames_sent"] += 1

    def _pump_sends(self) -> None:
        delay = self.options.faults.frame_delay_s
        for peer in self._peers:
            if self._peers[peer].lost is not None:
                continue
            if self._pp_queue[peer]:
                self._pump_prepost(peer)
            if self.nccl_data and not delay:
                # Everything queued for this peer goes out now: one Schedule announces the
                # run of frames (the receiver posts all its irecvs at once), then each frame's
                # gather and isend are enqueued on the GPU without host waits.
                run: list[list[tuple[_SendJob, Chunk]]] = []
                while (parts := self._next_frame(peer)) is not None:
                    run.append(parts)
                if not run:
                    continue
                metas = [self._frame_meta(parts) for parts in run]
                self._peers[peer].send_msg(P.Schedule(tuple(m[1] for m in metas)))
                for parts, meta in zip(run, metas, strict=True):
                    self._send_frame(peer, parts, meta)
                continue
            while self._inflight[peer] < self.options.max_frames_in_flight:
                if delay and time.monotonic() < self._next_send_at:
                    return
                parts = self._next_frame(peer)
                if parts is None:
                    break
                if self.nccl_data:
                    meta = self._frame_meta(parts)
                    self._peers[peer].send_msg(P.Schedule((meta[1],)))
                    self._send_frame(peer, parts, meta)
                else:
                    self._send_frame(peer, parts)
                if delay:
                    self._next_send_at = time.monotonic() + delay

    def _source_args(self, job: _SendJob) -> tuple[Mapping[str, BlockSpan], Mapping[str, int]]:
        src = self._sources[job.request.request_id]
        return src.spans, src.state_slots

    @staticmethod
    def _frame_meta(parts: list[tuple[_SendJob, Chunk]]) -> tuple[list[int], P.Frame]:
        offsets, total = [], 0
        for _, chunk in parts:
            offsets.append(total)
            total += -(-chunk.nbytes // SEGMENT_ALIGN) * SEGMENT_ALIGN
        total = offsets[-1] + parts[-1][1].nbytes
        frame_parts = tuple(
            P.FramePart(j.request.request_id, c.index, o, c.nbytes)
            for (j, c), o in zip(parts, offsets, strict=True)
        )
        return offsets, P.Frame(total, frame_parts)

    def _send_frame(
        self,
        peer: int,
        parts: list[tuple[_SendJob, Chunk]],
        meta: tuple[list[int], P.Frame] | None = None,
        *,
        announce: bool = True,
    ) -> None:
        """Gather one frame and put it on the wire. On gloo its Schedule goes right before
        the data; on NCCL the caller already sent one Schedule for a run of frames."""
        offsets, pframe = meta or self._frame_meta(parts)
        total = pframe.nbytes
        t0 = time.perf_counter()
        if self.nccl_data:
            buf, slot = self._staging(
                self._send_ring[peer], self._send_slot, peer, total, self._gather_stream, send=True
            )
            stream_ctx: Any = torch.cuda.stream(self._gather_stream)
        else:
            buf = self._cpu_bufs.take(total)
            stream_ctx = contextlib.nullcontext()
        with stream_ctx:
            try:
                self._pack(parts, offsets, buf)
            except (ValueError, RuntimeError) as exc:
                # Validated at accept time, so this is a bug or a pool that changed under us.
                # The frame still goes out (an NCCL peer has posted its receive), but every
                # request in it fails here and is aborted on the receiver.
                for job, _ in parts:
                    if job.session.fail(f"gather failed: {exc}"):
                        self._peers[peer].send_msg(
                            P.Abort(
                                job.request.request_id,
                                f"sender rank {self.rank}: gather failed: {exc}",
                            )
                        )
            for (job, chunk), off in zip(parts, offsets, strict=True):
                if job.request.checksum:
                    job.checksums[chunk.index] = checksum(buf[off : off + chunk.nbytes])
                    if self.options.faults.corrupt_chunk == chunk.index:
                        buf[off] ^= 0xFF
        self.stats["gather_s"] += time.perf_counter() - t0
        for job, _ in parts:
            job.session.advance_to(SessionState.TRANSFERRING)
        frame = _Frame(peer, [(j, c, o) for (j, c), o in zip(parts, offsets, strict=True)], buf)
        self._frames_out += 1
        self.stats["frames_sent"] += 1
        self.stats["bytes_sent"] += total
        p = self._peers[peer]
        if not self.nccl_data and announce:
            p.send_msg(P.Schedule((pframe,)))
        if self.nccl_data:
            with torch.cuda.stream(self._gather_stream):
                frame.work = dist.isend(buf, dst=peer, group=self.data_group)
            self._send_ring[peer][slot] = (self._send_ring[peer][slot][0], frame.work)
            self._nccl_sends.append(frame)
        else:
            token = id(frame)
            self._frame_tokens[token] = frame
            self._inflight[peer] += 1
            p.send_data(buf, token)
        faults = self.options.faults
        if faults.die_after_frames is not None and self._frames_out >= faults.die_after_frames:
            time.sleep(0.2)  # let the writer put the frame on the wire
            os._exit(17)

    def _pack(
        self, parts: list[tuple[_SendJob, Chunk]], offsets: list[int], buf: torch.Tensor
    ) -> None:
        if len(parts) == 1:
            job, chunk = parts[0]
            spans, slots = self._source_args(job)
            kernels.pack_request(
                self.spec,
                chunk.layout,
                self.pools,
                spans,
                slots,
                buf[: chunk.nbytes],
                backend=self.options.backend,
            )
            return
        reqs = []
        for (job, chunk), off in zip(parts, offsets, strict=True):
            spans, slots = self._source_args(job)
            reqs.append(PackedRequest(chunk.layout, spans, slots, off))
        kernels.pack_requests(self.spec, reqs, self.pools, buf, backend=self.options.backend)

    def _on_sent(self, peer: int, token: int, ok: bool) -> None:
        frame = self._frame_tokens.pop(token, None)
        if frame is None:
            return
        self._inflight[peer] -= 1
        self._cpu_bufs.give(frame.buffer)
        if ok:
            self._frame_delivered(frame)

    def _frame_delivered(self, frame: _Frame) -> None:
        for job, _chunk, _ in frame.parts:
            job.sent_chunks += 1
            if (
                job.sent_chunks == len(job.chunks)
                and not job.session.is_terminal
                and job.request.checksum
            ):
                self._send_done(job)

    # ------------------------------------------------------------------ CUDA staging
    def _staging(
        self,
        ring: list[Any],
        slots: dict[int, int],
        peer: int,
        nbytes: int,
        stream: Any,
        *,
        send: bool,
    ) -> tuple[torch.Tensor, int]:
        """A staging buffer of ``nbytes`` from the peer's ring; ``stream`` waits for the
        previous user of the slot (its send, or its scatter)."""
        n = self.options.staging_slots
        i = slots[peer] % n
        slots[peer] += 1
        while len(ring) < n:
            ring.append(None)
        prev = ring[i]
        if prev is not None:
            buf, waitable = prev
            if waitable is None:
                pass
            elif send:
                with torch.cuda.stream(stream):
                    waitable.wait()  # the slot's previous send must be done
            else:
                stream.wait_event(waitable)  # the slot's previous scatter must be done
        else:
            buf = None
        if buf is None or buf.numel() < nbytes:
            if buf is not None:
                # an in-flight op may still use it on another stream: keep it alive
                self._retired.append(buf)
            size = max(nbytes, min(self.options.chunk_bytes, 256 << 20))
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
        ring[i] = (buf, None)
        return buf[:nbytes], i

    def _has_gpu_pending(self) -> bool:
        return any(h.pending for h in self._recv.values()) or any(h.pending for h in self._zombies)

    def _poll_gpu(self) -> None:
        while self._nccl_sends and self._nccl_sends[0].work.is_completed():
            self._frame_delivered(self._nccl_sends.popleft())
        for handle in [*self._recv.values(), *self._zombies]:
            while handle.pending and handle.pending[0][0].query():
                _, frame_parts = handle.pending.pop(0)
                handle.t_last_data = time.monotonic()  # scattered (CUDA: now, not at post)
                for sender, chunk_index in frame_parts:
                    self._chunk_landed(handle, sender, chunk_index)
            if not handle.pending:
                if handle.session.is_terminal:
                    self._release(handle)
                else:
                    self._maybe_complete(handle)
        self._zombies = [h for h in self._zombies if h.pending]

    # ------------------------------------------------------------------ receiver internals
    def _post_nccl_recvs(self, peer: int, sched: P.Schedule) -> None:
        for frame in sched.frames:
            buf, slot = self._staging(
                self._recv_ring[peer],
                self._recv_slot,
                peer,
                frame.nbytes,
                self._post_stream,
                send=False,
            )
            with torch.cuda.stream(self._post_stream):
                work = dist.irecv(buf, src=peer, group=self.data_group)
            with torch.cuda.stream(self._scatter_stream):
                work.wait()
                landed = self._unpack_frame(peer, frame, buf)
                ev = torch.cuda.Event()
                ev.record(self._scatter_stream)
            self._recv_ring[peer][slot] = (self._recv_ring[peer][slot][0], ev)
            for handle, parts in landed.items():
                handle.pending.append((ev, parts))
            self.stats["frames_received"] += 1

    def _on_frames(self, peer: int, sched: P.Schedule, bufs: list[torch.Tensor]) -> None:
        for frame, buf in zip(sched.frames, bufs, strict=True):
            landed = self._unpack_frame(peer, frame, buf)
            self._cpu_bufs.give(buf)  # the CPU scatter is synchronous
            self.stats["frames_received"] += 1
            done = time.monotonic()
            for handle, parts in landed.items():
                handle.t_last_data = done  # the CPU scatter is synchronous
                for sender, chunk_index in parts:
                    self._chunk_landed(handle, sender, chunk_index)
                self._maybe_complete(handle)

    def _unpack_frame(
        self, peer: int, frame: P.Frame, buf: torch.Tensor
    ) -> dict[RecvHandle, list[tuple[int, int]]]:
        """Scatter the live parts of one frame (checksums first); returns, per handle, the
        (sender, chunk) pairs whose scatter was issued."""
        now = time.monotonic()
        live: list[tuple[RecvHandle, Chunk, P.FramePart]] = []
        for part in frame.parts:
            handle = self._recv.get(part.request_id)
            if handle is None or handle.session.is_terminal or peer not in handle.parts:
                continue  # drained: cancelled / failed / unknown request
            rp = handle.parts[peer]
            if (
                not 0 <= part.chunk < len(rp.chunks)
                or part.chunk in rp.received
                or rp.chunks[part.chunk].nbytes != part.nbytes
            ):
                self._fail_recv(
                    handle,
                    f"sender rank {peer} sent an unexpected chunk "
                    f"{part.chunk} ({part.nbytes} bytes)",
                    notify=None,
                )
                continue
            if handle.t_first_data is None:
                handle.t_first_data = now
            handle.t_last_data = now
            handle.bytes_received += part.nbytes
            handle.session.advance_to(SessionState.TRANSFERRING)
            if rp.request.checksum:
                view = buf[part.offset : part.offset + part.nbytes]
                rp.checksums[part.chunk] = (
                    _checksum_async(view) if self.nccl_data else checksum(view)
                )
            live.append((handle, rp.chunks[part.chunk], part))
        t0 = time.perf_counter()
        try:
            if len(live) == 1:
                handle, chunk, part = live[0]
                kernels.unpack_request(
                    self.spec,
                    chunk.layout,
                    buf[part.offset : part.offset + part.nbytes],
                    self.pools,
                    handle.spans,
                    handle.state_slots,
                    backend=self.options.backend,
                )
            elif live:
                reqs = [
                    PackedRequest(c.layout, h.spans, h.state_slots, p.offset) for h, c, p in live
                ]
                kernels.unpack_requests(
                    self.spec, reqs, buf, self.pools, backend=self.options.backend
                )
        except (ValueError, RuntimeError) as exc:  # validation: nothing was written
            for handle, _, _ in live:
                self._fail_recv(handle, f"scatter failed: {exc}", notify=None)
            return {}
        self.stats["scatter_s"] += time.perf_counter() - t0
        out: dict[RecvHandle, list[tuple[int, int]]] = {}
        for handle, chunk, _ in live:
            out.setdefault(handle, []).append((peer, chunk.index))
        return out

    def _chunk_landed(self, handle: RecvHandle, sender: int, chunk_index: int) -> None:
        rp = handle.parts.get(sender)
        if rp is not None:
            rp.received.add(chunk_index)

    def _on_done(self, peer: int, msg: P.Done) -> None:
        handle = self._recv.get(msg.request_id)
        if handle is None or handle.session.is_terminal or peer not in handle.parts:
            return
        rp = handle.parts[peer]
        if msg.num_chunks != len(rp.chunks):
            self._fail_recv(
                handle,
                f"sender rank {peer} planned {msg.num_chunks} chunks, "
                f"this receiver {len(rp.chunks)}",
                notify=peer,
            )
            return
        rp.done = msg
        handle.session.advance_to(SessionState.TRANSFERRING)
        self._maybe_complete(handle)

    def _maybe_complete(self, handle: RecvHandle) -> None:
        if handle.session.is_terminal or handle.pending:
            return
        for rp in handle.parts.values():
            if len(rp.received) != len(rp.chunks):
                return
            if rp.done is None and (rp.request.checksum or not rp.chunks):
                return  # Done carries the checksums / confirms an empty transfer
        for sender, rp in handle.parts.items():
            if not rp.request.checksum:
                continue
            assert rp.done is not None
            for k, expected in enumerate(rp.done.checksums):
                got = rp.checksums.get(k)
                if isinstance(got, tuple):
                    got = _checksum_value(*got)
                if got != expected:
                    self._fail_recv(
                        handle,
                        f"checksum mismatch in chunk {k} from sender rank "
                        f"{sender}: got {got:#x}, sender sent "
                        f"{expected:#x} (corrupted in flight)",
                        notify=None,
                    )
                    return
        self._finish_recv(handle)

    def _finish_recv(self, handle: RecvHandle) -> None:
        handle.session.advance_to(SessionState.TRANSFERRING)
        if handle.on_commit is not None:
            try:
                handle.on_commit(handle)
            except Exception as exc:
                handle.commit_error = f"{type(exc).__name__}: {exc}"
                self._fail_recv(handle, f"commit failed: {handle.commit_error}", notify=None)
                return
        handle.session.advance(SessionState.TRANSFERRED)
        for sender in handle.parts:
            peer = self._peers[sender]
            if peer.lost is None:
                peer.send_msg(P.Ack(handle.request_id))

    def _notify_senders(
        self, handle: RecvHandle, reason: str, *, error: bool, skip: int | None = None
    ) -> None:
        for sender in handle.parts:
            if sender == skip:
                continue
            peer = self._peers[sender]
            if peer.lost is None:
                peer.send_msg(P.Cancel(handle.request_id, reason, error))

    def _fail_recv(self, handle: RecvHandle, reason: str, *, notify: int | None) -> None:
        if not handle.session.fail(reason):
            return
        self._notify_senders(handle, f"failed: {reason}", error=True, skip=notify)
        self._release(handle)

    def _release(self, handle: RecvHandle) -> None:
        """``on_release`` of a failed or cancelled request, once no scatter is in flight."""
        if handle.state is SessionState.TRANSFERRED:
            return  # committed: the blocks belong to the request, not to us
        if handle.released or handle.pending:
            return  # released once the in-flight scatters are done (_poll_gpu)
        handle.released = True
        if handle.on_release is not None:
            handle.on_release(handle)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for handle in list(self._recv.values()):
            if handle.session.check_deadline(now):
                self._notify_senders(handle, f"{handle.session.error}", error=True)
                self._release(handle)
        for (peer, rid), job in list(self._send_jobs.items()):
            if job.session.check_deadline(now):
                p = self._peers[peer]
                if p.lost is None:
                    p.send_msg(P.Abort(rid, f"sender rank {self.rank}: {job.session.error}"))
                self._maybe_source_finished(rid)
