"""The sender side: registered sources under leases, peer requests validated once, chunks
scheduled in request order per receiver.

Rules (each has a test):

* A request names a registered source; an unknown id is refused at once (never parked), so
  a finished, cancelled or failed request whose source was released can never be served
  again from blocks that were freed.
* A request is bound to its content: its prompt digest must equal the source's.
* Every field of a request is checked against what this rank derives before anything is
  allocated: the model digest, the prompt length, groups this rank holds, exactly the
  layers and heads the topology assigns to that receiver, ranges inside what the source
  holds, and a chunk count with a bound.
* One session per (source, receiver): a terminal session is never replaced.
* A source is leased: it is released (``on_release``) once every receiver that reads it
  ended its session and no chunk of it is in flight, or when its lease expires (receivers
  that die before asking, or never ask) -- then its live sessions are aborted first.
* Receivers are served in request order with deadlines: a job past its deadline, or one
  that cannot finish before it at the measured rate, is aborted before it costs wire time.
* State is O(live requests): jobs and sources are dropped when they end.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvtriton.layout import packed_layout
from kvtriton.target import TransferTarget
from kvtriton.transfer import protocol as P
from kvtriton.transfer.chunking import plan_chunks
from kvtriton.transfer.jobs import SendJob, Sent
from kvtriton.transfer.session import Session, SessionState
from kvtriton.transfer.trace import trace

if TYPE_CHECKING:
    from kvtriton.transfer.agent import TransferAgent

__all__ = ["MAX_CHUNKS_PER_REQUEST", "Sender", "Source"]

#: A request whose ranges would need more chunks than this at the receiver's chunk size is
#: refused (it bounds the plan a peer can make this rank build).
MAX_CHUNKS_PER_REQUEST = 1 << 16

OnRelease = Callable[[str, dict[int, SessionState]], None]


@dataclass(eq=False)
class Source:
    """A request's KV on this rank, available to the receivers that read it.

    Attributes:
        request_id: the request.
        prompt_digest: :func:`~kvtriton.transfer.protocol.prompt_digest` of its prompt.
        target: the blocks and slots holding it (validated when registered).
        expires: clock time at which the lease ends.
        on_release: called once with ``{receiver: final session state}`` when released.
        receivers: the ranks that read it (the topology's receivers of this rank).
        sessions: receiver -> its session (live or ended).
        jobs: receiver -> its job while live or with chunks in flight.
    """

    request_id: str
    prompt_digest: str
    target: TransferTarget
    expires: float
    on_release: OnRelease | None
    receivers: frozenset[int]
    ready: Any = None
    sessions: dict[int, Session] = field(default_factory=dict)
    #: streamed sources: global layers written so far (``None``: every layer), and for each
    #: the (sequence number, marker) of the ``mark_ready`` call that wrote it
    ready_layers: set[int] | None = None
    layer_markers: dict[int, tuple[int, Any]] = field(default_factory=dict)
    jobs: dict[int, SendJob] = field(default_factory=dict)
    expired: bool = False


class _Rate:
    """Bytes per second a receiver's link sustained while it had chunks in flight."""

    def __init__(self) -> None:
        self.bytes = 0
        self.busy_s = 0.0
        self.in_flight = 0
        self.since = 0.0

    def started(self, count: int, now: float) -> None:
        if self.in_flight == 0:
            self.since = now
        self.in_flight += count

    def finished(self, nbytes: int, now: float) -> None:
        if self.in_flight <= 0:
            return  # a chunk of a job whose peer was lost meanwhile
        self.bytes += nbytes
        self.in_flight -= 1
        if self.in_flight == 0:
            self.busy_s += now - self.since

    def value(self, now: float) -> float | None:
        busy = self.busy_s + (now - self.since if self.in_flight else 0.0)
        return self.bytes / busy if self.bytes >= 1 << 20 and busy > 0 else None


class Sender:
    """Sender logic of one agent (see the module docstring)."""

    def __init__(self, agent: TransferAgent) -> None:
        self.agent = agent
        self.sources: dict[str, Source] = {}
        self.queues: dict[int, deque[SendJob]] = {}
        self._rates: dict[int, _Rate] = {}
        self.ended: dict[str, int] = {s.value: 0 for s in SessionState if s.is_terminal}
        self.refusals: deque[str] = deque(maxlen=16)  # the latest reasons, for reports
        self._marks = 0
        # deadlines without a scan of every source: leases in a heap (stale entries of
        # released sources are skipped), live jobs in a dict pruned once they end
        self._leases: list[tuple[float, int, str]] = []
        self._lease_seq = itertools.count()
        self._live_jobs: dict[tuple[str, int], tuple[Source, SendJob]] = {}
        topo = agent.topology
        self.receivers = frozenset(topo.receivers(agent.rank)) if agent.is_ctx else frozenset()
        # what each receiver must ask this rank for, derived once
        self._slices = {
            r: next(s for s in topo.sources(r) if s.sender == agent.rank) for r in self.receivers
        }

    # -- sources --------------------------------------------------------------------------
    def register(
        self,
        request_id: str,
        prompt_digest: str,
        target: TransferTarget,
        *,
        lease_s: float,
        on_release: OnRelease | None,
        ready: Any = None,
        streamed: bool = False,
    ) -> None:
        if request_id in self.sources:
            raise ValueError(
                f"request {request_id!r} is already registered on rank {self.agent.rank}"
            )
        if not (isinstance(lease_s, (int, float)) and math.isfinite(lease_s) and lease_s > 0):
            raise ValueError(f"lease_s must be a positive number of seconds, got {lease_s!r}")
        held = set(self.agent.spec.group_names)
        unknown = sorted(set(target.groups) - held)
        if unknown:
            raise ValueError(
                f"request {request_id!r}: rank {self.agent.rank} holds no groups {unknown}"
            )
        self.sources[request_id] = Source(
            request_id,
            prompt_digest,
            target,
            self.agent.clock() + lease_s,
            on_release,
            self.receivers,
            ready,
            ready_layers=set() if streamed else None,
        )
        heapq.heappush(
            self._leases, (self.sources[request_id].expires, next(self._lease_seq), request_id)
        )

    def mark_ready(self, request_id: str, layers: Any, marker: Any) -> bool:
        """Global ``layers`` (all this rank holds when ``None``) of a streamed source are
        written (``marker``: what the channel waits for before reading them). ``False`` when
        the source is gone already (every receiver ended, or its lease expired)."""
        src = self.sources.get(request_id)
        if src is None:
            return False
        held = {i for g in self.agent.spec.groups if g.name in src.target.groups
                for i in g.layer_ids}  # fmt: skip
        ids = held if layers is None else set(layers)
        unknown = sorted(ids - held)
        if unknown:
            raise ValueError(
                f"request {request_id!r}: rank {self.agent.rank} holds no layers "
                f"{unknown} of this source (it holds {sorted(held)})"
            )
        if src.ready_layers is None:
            return True  # already complete (or never streamed)
        self._marks += 1
        for i in ids:
            src.layer_markers[i] = (self._marks, marker)
        src.ready_layers |= ids
        if src.ready_layers >= held:
            src.ready_layers = None
        return True

    # -- requests -------------------------------------------------------------------------
    def on_request(self, peer: int, req: P.Request) -> None:
        trace("request", req.request_id)
        agent = self.agent
        src = self.sources.get(req.request_id)
        reason = self._check(peer, req, src)
        if reason is None:
            assert src is not None
            try:
                chunks = plan_chunks(
                    agent.model,
                    req.tokens,
                    req.states,
                    layers=req.layers,
                    heads=req.heads,
                    chunk_bytes=req.chunk_bytes,
                    by_layer=req.by_layer,
                )
            except ValueError as exc:
                reason = f"bad request: {exc}"
        if reason is not None:
            agent.control.send(
                peer, P.Refuse(req.request_id, f"sender rank {agent.rank}: {reason}")
            )
            agent.counters["refused"] += 1
            self.refusals.append(f"{req.request_id} from rank {peer}: {reason}")
            return
        assert src is not None
        session = Session(
            req.request_id, "send", peer=peer, timeout_s=agent.options.timeout_s, clock=agent.clock
        )
        session.limit_deadline(session.created + req.deadline_ms / 1e3)
        job = SendJob(peer, req, session, src.target, chunks, ready=src.ready)
        try:
            agent.channel.prepare_send(job)
        except ValueError as exc:  # the target does not hold what was checked: a bug
            session.fail(str(exc))
            agent.control.send(peer, P.Refuse(req.request_id, f"sender rank {agent.rank}: {exc}"))
            return
        src.sessions[peer] = session
        src.jobs[peer] = job
        self._live_jobs[(req.request_id, peer)] = (src, job)
        session.advance(SessionState.READY)
        if not chunks:  # nothing moves from this rank: the Done/Ack closes it
            session.advance(SessionState.TRANSFERRING)
            self._send_done(job)
            return
        self.queues.setdefault(peer, deque()).append(job)

    def _check(self, peer: int, req: P.Request, src: Source | None) -> str | None:
        """``None`` if the request may be served, else why not (nothing allocated yet)."""
        agent = self.agent
        if src is None:
            return (
                f"unknown request {req.request_id!r}: no source is registered under this "
                f"id (never registered, or finished and released)"
            )
        if peer not in src.receivers:
            return f"rank {peer} does not read this rank's sources"
        if peer in src.sessions:
            return (
                f"duplicate request {req.request_id!r} from rank {peer}: it already has a "
                f"session ({src.sessions[peer].state.value}); a session is never replaced"
            )
        if req.model_digest != agent.digest:
            return (
                f"spec mismatch: receiver model digest {req.model_digest}, this rank holds "
                f"{agent.model.name!r} with digest {agent.digest}"
            )
        if req.prompt_digest != src.prompt_digest:
            return (
                f"prompt mismatch: request {req.request_id!r} names a prompt with digest "
                f"{req.prompt_digest}, the registered source holds {src.prompt_digest}"
            )
        if req.num_tokens != src.target.num_tokens:
            return (
                f"prompt length: the receiver says {req.num_tokens}, the source holds "
                f"{src.target.num_tokens}"
            )
        spec = agent.spec
        held = {g.name: g for g in spec.groups}
        for g in req.tokens:
            if g not in held or not held[g].is_attention:
                return f"group {g!r} is not an attention group of this rank"
        for g in req.states:
            if g not in held or not held[g].is_state:
                return f"group {g!r} is not a state group of this rank"
        if len(set(req.states)) != len(req.states):
            return "duplicate state groups"
        want = self._slices[peer]
        groups = set(req.groups)
        if set(req.layers) != groups or set(req.heads) != groups:
            return "layers and heads must be given for exactly the requested groups"
        for g in groups:
            if g not in want.layers:
                return f"rank {peer} reads no part of group {g!r} from this rank"
            if tuple(req.layers[g]) != tuple(want.layers[g]):
                return (
                    f"group {g!r}: rank {peer} must ask for layers {list(want.layers[g])}, "
                    f"asked for {list(req.layers[g])}"
                )
            if tuple(req.heads[g]) != tuple(want.heads[g]):
                return (
                    f"group {g!r}: rank {peer} must ask for heads {list(want.heads[g])}, "
                    f"asked for {list(req.heads[g])}"
                )
        missing = src.target.covers(req.tokens, req.states)
        if missing is not None:
            return missing
        try:
            total = packed_layout(
                agent.model.root, req.tokens, req.states, layers=req.layers, heads=req.heads
            ).nbytes
        except (ValueError, TypeError) as exc:
            return f"bad request: {exc}"
        if total // req.chunk_bytes >= MAX_CHUNKS_PER_REQUEST:
            return (
                f"{total} bytes in chunks of {req.chunk_bytes} would take more than "
                f"{MAX_CHUNKS_PER_REQUEST} chunks; ask with a larger chunk size"
            )
        return None

    # -- receiver messages ----------------------------------------------------------------
    def on_ack(self, peer: int, msg: P.Ack) -> None:
        src = self.sources.get(msg.request_id)
        job = src.jobs.get(peer) if src else None
        if job is None:
            return
        self.agent.channel.remote_done(job)  # the receiver's final word: it reads no more
        trace("acked", msg.request_id)
        if not job.session.is_terminal and job.done_sent:
            job.session.advance_to(SessionState.TRANSFERRED)
            self._ended(src, job)  # type: ignore[arg-type]
        else:  # late (this side had ended): nothing changes but the lease
            self._maybe_release(src)  # type: ignore[arg-type]

    def on_cancel(self, peer: int, msg: P.Cancel) -> None:
        src = self.sources.get(msg.request_id)
        job = src.jobs.get(peer) if src else None
        if job is None:
            return
        self.agent.channel.remote_done(job)  # the receiver's final word: it reads no more
        why = f"receiver rank {peer}: {msg.reason}"
        live = not job.session.is_terminal
        changed = job.session.fail(why) if msg.error else job.session.cancel(why)
        if live:  # the receiver keeps its side open until it hears nothing more will follow
            self.agent.control.send(
                peer, P.Abort(msg.request_id, "cancel acknowledged", cancelled=not msg.error)
            )
        if changed:
            self._ended(src, job)  # type: ignore[arg-type]
        else:
            self._maybe_release(src)  # type: ignore[arg-type]

    # -- channel events -------------------------------------------------------------------
    def on_sent(self, ev: Sent) -> None:
        job = ev.job
        job.in_flight -= 1
        job.sent += 1
        if ev.checksum is not None:
            job.checksums[ev.chunk] = ev.checksum
        self.maybe_done(job)
        self._rates.setdefault(job.peer, _Rate()).finished(
            job.chunks[ev.chunk].nbytes, self.agent.clock()
        )
        src = self.sources.get(job.request_id)
        if src is not None and job.session.is_terminal:
            self._maybe_release(src)

    def maybe_done(self, job: SendJob) -> None:
        """Tell the receiver every chunk is on its way once all were handed to the wire and
        their checksums (when asked) are known; it may arrive before the last chunk."""
        n = len(job.chunks)
        if job.done_sent or job.session.is_terminal or job.handed < n:
            return
        if job.request.checksum and len(job.checksums) < n:
            return
        self._send_done(job)

    def _send_done(self, job: SendJob) -> None:
        if job.done_sent:
            return
        job.done_sent = True
        sums = (
            tuple(job.checksums[k] for k in range(len(job.chunks))) if job.request.checksum else ()
        )
        self.agent.control.send(job.peer, P.Done(job.request_id, len(job.chunks), sums))

    # -- scheduling -----------------------------------------------------------------------
    def pump(self) -> None:
        """Schedule what may go now, per receiver in request order: a job waiting for its
        source's layers to be written lets the jobs behind it go first."""
        agent = self.agent
        now = agent.clock()
        for peer, q in self.queues.items():
            if agent.control.is_lost(peer):
                continue
            rate = self._rates.setdefault(peer, _Rate())
            for job in list(q):
                if job.session.is_terminal:
                    q.remove(job)
                    continue
                room = agent.channel.capacity(peer)
                if room <= 0:
                    break
                src = self.sources[job.request_id]
                count = self._ready_chunks(src, job, room)
                if count == 0:
                    continue  # its next chunk's layers are not written yet
                if job.scheduled == 0:
                    why = self._cannot_finish(job, now)
                    if why is not None:
                        q.remove(job)
                        self._abort(job, why)
                        continue
                    job.session.advance_to(SessionState.TRANSFERRING)
                job.ready = self._marker(src, job, count)
                rate.started(count, now)
                trace("schedule", job.request_id)
                agent.channel.schedule(job, count)
                trace("scheduled", job.request_id)
                if job.scheduled == len(job.chunks):
                    q.remove(job)

    def _ready_chunks(self, src: Source, job: SendJob, room: int) -> int:
        """How many chunks from ``job.scheduled`` on are written (at most ``room``): their
        layers marked ready, and the channel content with the markers."""
        end = min(len(job.chunks), job.scheduled + room)
        done = self.agent.channel.marker_done
        if src.ready_layers is None and not src.layer_markers:
            return end - job.scheduled if done(src.ready) else 0
        k = job.scheduled
        while k < end:
            layers = job.chunks[k].layer_ids
            if src.ready_layers is not None and not layers <= src.ready_layers:
                break
            if not all(done(src.layer_markers[i][1]) for i in layers if i in src.layer_markers):
                break
            k += 1
        return k - job.scheduled

    @staticmethod
    def _marker(src: Source, job: SendJob, count: int) -> Any:
        """What the channel waits for before reading chunks ``[scheduled, +count)``: the
        latest write marker among their layers (or the registration's)."""
        if not src.layer_markers:
            return src.ready
        layers = set().union(
            *(c.layer_ids for c in job.chunks[job.scheduled : job.scheduled + count])
        )
        marks = [src.layer_markers[i] for i in layers if i in src.layer_markers]
        return max(marks, key=lambda m: m[0])[1] if marks else src.ready

    def _cannot_finish(self, job: SendJob, now: float) -> str | None:
        deadline = job.session.deadline
        if deadline is None:
            return None
        left = deadline - now
        if left <= 0:
            return f"its deadline passed {-left:.3g} s before it could start"
        rate = self._rates.setdefault(job.peer, _Rate()).value(now)
        if rate is not None and job.total_bytes / rate > left:
            return (
                f"{job.total_bytes} bytes at the measured {rate / 1e9:.3g} GB/s cannot "
                f"finish in the {left:.3g} s left before its deadline"
            )
        return None

    def _abort(self, job: SendJob, reason: str, *, cancelled: bool = False) -> None:
        why = f"sender rank {self.agent.rank}: {reason}"
        changed = job.session.cancel(why) if cancelled else job.session.fail(why)
        if changed:
            self.agent.control.send(job.peer, P.Abort(job.request_id, why, cancelled=cancelled))
            src = self.sources.get(job.request_id)
            if src is not None:
                self._ended(src, job)

    # -- ends -----------------------------------------------------------------------------
    def _ended(self, src: Source, job: SendJob) -> None:
        self.ended[job.session.state.value] += 1
        self._maybe_release(src)

    def _maybe_release(self, src: Source) -> None:
        if any(j.in_flight for j in src.jobs.values()):
            return  # a gather may still read the blocks
        live = [j for j in src.jobs.values() if not j.session.is_terminal]
        if live:
            return
        if not src.expired and not src.receivers <= src.sessions.keys():
            return  # a receiver has yet to ask
        del self.sources[src.request_id]
        for job in src.jobs.values():
            q = self.queues.get(job.peer)
            if q and job in q:
                q.remove(job)
        if src.on_release is not None:
            src.on_release(src.request_id, {p: s.state for p, s in src.sessions.items()})

    def check_deadlines(self, now: float) -> None:
        for key, (src, job) in list(self._live_jobs.items()):
            if job.session.is_terminal:
                del self._live_jobs[key]
            elif job.session.check_deadline(now):
                del self._live_jobs[key]
                self.agent.control.send(
                    job.peer,
                    P.Abort(job.request_id, f"sender rank {self.agent.rank}: {job.session.error}"),
                )
                self._ended(src, job)
        while self._leases and self._leases[0][0] <= now:
            entry = heapq.heappop(self._leases)
            if not self._lease_current(entry):
                continue  # released meanwhile (or the id was registered again since)
            src = self.sources[entry[2]]
            src.expired = True
            for job in list(src.jobs.values()):
                if not job.session.is_terminal:
                    self._abort(job, "the source's lease expired")
            if src.request_id in self.sources:
                self._maybe_release(src)

    def _lease_current(self, entry: tuple[float, int, str]) -> bool:
        src = self.sources.get(entry[2])
        return src is not None and not src.expired and src.expires == entry[0]

    def next_deadline(self) -> float | None:
        leases = self._leases
        while leases and not self._lease_current(leases[0]):
            heapq.heappop(leases)  # a released, expired or re-registered source's entry
        times = [leases[0][0]] if leases else []
        times += [
            job.session.deadline
            for _, job in self._live_jobs.values()
            if not job.session.is_terminal and job.session.deadline is not None
        ]
        return min(times) if times else None

    def peer_lost(self, peer: int, why: str) -> None:
        for src in list(self.sources.values()):
            job = src.jobs.get(peer)
            if job is not None:
                job.in_flight = 0  # nothing in flight to a lost peer will complete
                self._rates.pop(peer, None)
                if job.session.fail(f"lost receiver rank {peer}: {why}"):
                    self.ended[job.session.state.value] += 1
            if src.request_id in self.sources:
                # a receiver that is gone will never ask: do not wait for it
                src.sessions.setdefault(peer, _ended_session(src.request_id, peer, why))
                self._maybe_release(src)
        self.queues.pop(peer, None)

    def shutdown(self) -> None:
        """Cancel every live job (the receivers hear an Abort) and release what can be."""
        for src in list(self.sources.values()):
            for job in list(src.jobs.values()):
                if not job.session.is_terminal:
                    self._abort(job, "the sender shut down", cancelled=True)

    def release_all(self) -> None:
        """At close: release every source still held (its receivers never asked)."""
        for src in list(self.sources.values()):
            src.expired = True
            for job in src.jobs.values():
                job.in_flight = 0
            self._maybe_release(src)

    # -- introspection --------------------------------------------------------------------
    def busy(self) -> bool:
        return any(j.in_flight for s in self.sources.values() for j in s.jobs.values()) or any(
            self.queues.values()
        )

    def sessions(self) -> list[Session]:
        return [s for src in self.sources.values() for s in src.sessions.values()]

    def sizes(self) -> dict[str, int]:
        return {
            "sources": len(self.sources),
            "jobs": sum(len(s.jobs) for s in self.sources.values()),
            "queued": sum(len(q) for q in self.queues.values()),
        }


def _ended_session(request_id: str, peer: int, why: str) -> Session:
    s = Session(request_id, "send", peer=peer)
    s.fail(f"lost receiver rank {peer}: {why}")
    return s
