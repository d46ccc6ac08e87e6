"""The receiver side: ask every overlapping sender, land chunks, commit only what is intact.

Rules (each has a test):

* A request asks each sender holding part of this rank's heads and layers for exactly that
  part (the topology's slice), with the prompt's digest, and derives the chunk plan itself:
  announcements are checked against it (sizes never come from a peer).
* Chunks are written only into this request's destination blocks, and only while the
  request is live; bytes of a request that already ended are drained and dropped.
* ``on_commit`` runs once, after every chunk of every sender landed, each sender's Done
  arrived and every checksum matched; only then does the session end ``TRANSFERRED`` and
  each sender hear an Ack.
* On an error or a cancel, ``on_release`` runs once, after no write into the blocks is
  still in flight; nothing reaches the prefix cache.
* State is O(live requests): a job is dropped once its sender can send nothing more for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvtriton.target import TransferTarget
from kvtriton.transfer import protocol as P
from kvtriton.transfer.chunking import plan_chunks
from kvtriton.transfer.jobs import Landed, RecvJob
from kvtriton.transfer.session import Session, SessionState
from kvtriton.transfer.trace import trace

if TYPE_CHECKING:
    from kvtriton.transfer.agent import TransferAgent

__all__ = ["Receiver", "RecvHandle"]


@dataclass(eq=False)
class RecvHandle:
    """A receiver-side request: its session, its destination, per-sender jobs and timings.

    Attributes:
        session: the receiver session (``session.state``, ``session.error``).
        target: the destination blocks and slots on this rank.
        prompt_digest: the prompt's digest (sent to every sender).
        mode: reuse mode (reports).
        jobs: sender rank -> its job (what was asked, progress).
        bytes_received: payload bytes that landed so far (all senders).
        t_first_data, t_last_data: clock times the first / last chunk landed.
    """

    session: Session
    target: TransferTarget
    prompt_digest: str
    mode: str
    jobs: dict[int, RecvJob] = field(default_factory=dict)
    on_commit: Callable[[RecvHandle], None] | None = None
    on_release: Callable[[RecvHandle], None] | None = None
    bytes_received: int = 0
    t_first_data: float | None = None
    t_last_data: float | None = None
    released: bool = False
    commit_error: str | None = None

    @property
    def request_id(self) -> str:
        return self.session.request_id

    @property
    def state(self) -> SessionState:
        return self.session.state

    @property
    def num_tokens(self) -> int:
        return self.target.num_tokens

    @property
    def bytes_expected(self) -> int:
        return sum(c.nbytes for j in self.jobs.values() for c in j.chunks)

    @property
    def pending(self) -> int:
        """Writes into this request's blocks still in flight."""
        return sum(j.pending for j in self.jobs.values())

    @property
    def settled(self) -> bool:
        """Terminal, and its blocks are committed or released."""
        return self.session.is_terminal and (
            self.state is SessionState.TRANSFERRED or self.released
        )


class Receiver:
    """Receiver logic of one agent (see the module docstring)."""

    def __init__(self, agent: TransferAgent) -> None:
        self.agent = agent
        self.handles: dict[str, RecvHandle] = {}
        self._live: dict[str, RecvHandle] = {}  # handles whose session has not ended yet
        self.jobs: dict[tuple[int, str], RecvJob] = {}
        self.ended: dict[str, int] = {s.value: 0 for s in SessionState if s.is_terminal}
        self._sources = agent.topology.sources(agent.rank) if not agent.is_ctx else ()

    # -- requests -------------------------------------------------------------------------
    def request(
        self,
        target: TransferTarget,
        prompt_digest: str,
        *,
        mode: str,
        on_commit: Callable[[RecvHandle], None] | None,
        on_release: Callable[[RecvHandle], None] | None,
    ) -> RecvHandle:
        agent = self.agent
        rid = target.request_id
        if rid in self.handles:
            raise ValueError(
                f"request {rid!r} is already on rank {agent.rank} (forget() it "
                f"once it ended before reusing the id)"
            )
        if any(key[1] == rid for key in self.jobs):
            raise ValueError(
                f"request {rid!r}: a sender may still send bytes of an earlier "
                f"request with this id; use a new id"
            )
        held = {g.name: g for g in agent.spec.groups}
        for g in target.kv:
            if g not in held or not held[g].is_attention:
                raise ValueError(
                    f"request {rid!r}: {g!r} is not an attention group of rank {agent.rank}"
                )
        for g in target.state_slots:
            if g not in held or not held[g].is_state:
                raise ValueError(
                    f"request {rid!r}: {g!r} is not a state group of rank {agent.rank}"
                )
        tokens = {g: t.tokens for g, t in target.kv.items()}
        states = tuple(target.state_slots)
        session = Session(rid, "recv", timeout_s=agent.options.timeout_s, clock=agent.clock)
        handle = RecvHandle(
            session, target, prompt_digest, mode, on_commit=on_commit, on_release=on_release
        )
        deadline_ms = int(agent.options.timeout_s * 1e3)
        for src in self._sources:
            groups = [g for g in (*tokens, *states) if g in src.layers]
            req = P.Request(
                request_id=rid,
                prompt_digest=prompt_digest,
                model_digest=agent.digest,
                num_tokens=target.num_tokens,
                tokens={g: r for g, r in tokens.items() if g in src.layers},
                states=tuple(s for s in states if s in src.layers),
                layers={g: src.layers[g] for g in groups},
                heads={g: src.heads[g] for g in groups},
                chunk_bytes=agent.channel.chunk_bytes(agent.options.chunk_bytes),
                checksum=agent.options.checksum and agent.channel.checksums,
                deadline_ms=deadline_ms,
                mode=mode,
                by_layer=agent.options.layer_chunks,
            )
            chunks = plan_chunks(
                agent.model,
                req.tokens,
                req.states,
                layers=req.layers,
                heads=req.heads,
                chunk_bytes=req.chunk_bytes,
                by_layer=req.by_layer,
            )
            job = RecvJob(src.sender, req, handle, chunks)
            agent.channel.prepare_recv(job)
            handle.jobs[src.sender] = job
        self.handles[rid] = handle
        self._live[rid] = handle
        lost = [s for s in handle.jobs if agent.control.is_lost(s)]
        if lost:  # nothing was sent: fail at once
            for job in handle.jobs.values():
                job.closed = job.final_sent = True
            self._fail(
                handle, f"sender rank {lost[0]} is unreachable: {agent.control.lost[lost[0]]}"
            )
            return handle
        trace("ask", rid)
        for sender, job in handle.jobs.items():
            self.jobs[(sender, rid)] = job
            agent.control.send(sender, job.request)
        session.advance(SessionState.READY)
        return handle

    def cancel(self, request_id: str, reason: str) -> bool:
        handle = self.handles.get(request_id)
        if handle is None:
            raise KeyError(f"no request {request_id!r} on rank {self.agent.rank}")
        if not handle.session.cancel(reason):
            return False
        self._notify(handle, reason, error=False)
        self._settle(handle)
        return True

    def forget(self, request_id: str) -> RecvHandle:
        handle = self.handles.get(request_id)
        if handle is None:
            raise KeyError(f"no request {request_id!r} on rank {self.agent.rank}")
        if not handle.session.is_terminal:
            raise ValueError(f"request {request_id!r} is still {handle.state.value}")
        del self.handles[request_id]
        self._live.pop(request_id, None)
        return handle

    # -- sender messages ------------------------------------------------------------------
    def on_message(self, peer: int, msg: P.Message) -> None:
        rid = msg.request_id  # type: ignore[union-attr]
        job = self.jobs.get((peer, rid))
        if job is None:
            if isinstance(msg, (P.Schedule, P.Blocks)):
                self.agent.peer_lost(
                    peer, f"announced chunks of request {rid!r}, which it was not asked for"
                )
            return  # a late Done/Refuse/Abort of a closed job
        handle = job.handle
        if isinstance(msg, (P.Schedule, P.Blocks)):
            if job.closed:
                self.agent.peer_lost(peer, f"announced chunks of request {rid!r} after its end")
                return
            trace("announced", rid)
            error = self.agent.channel.on_announce(job, msg)
            trace("posted", rid)
            if error is not None:
                self.agent.peer_lost(peer, f"request {rid!r}: {error}")
                return
            handle.session.advance_to(SessionState.TRANSFERRING)
            n = len(job.chunks)
            channel = self.agent.channel
            if channel.announce_ends and not job.request.checksum and job.posted == n:
                job.done = P.Done(rid, n, ())  # the sender sends no Done on this channel
                job.closed = True
                self._maybe_complete(handle)
        elif isinstance(msg, P.Done):
            if msg.num_chunks != len(job.chunks) or (
                job.request.checksum and len(msg.checksums) != msg.num_chunks
            ):
                job.closed = True
                self._fail(
                    handle,
                    f"sender rank {peer} says it sent {msg.num_chunks} chunks "
                    f"({len(msg.checksums)} checksums); this rank planned "
                    f"{len(job.chunks)}",
                )
            else:
                job.done = msg
                job.closed = True
                handle.session.advance_to(SessionState.TRANSFERRING)
                self._maybe_complete(handle)
        elif isinstance(msg, (P.Refuse, P.Abort)):
            # every job still ends with one final word from here (Cancel), so a sender that
            # aborted knows when this rank stopped reading its blocks
            job.closed = True
            job.refused = isinstance(msg, P.Refuse)
            verb = "refused" if job.refused else "aborted"
            why = f"sender rank {peer} {verb} request {rid!r}: {msg.reason}"
            if isinstance(msg, P.Abort) and msg.cancelled:
                if handle.session.cancel(why):
                    self._notify(handle, why, error=False)
            else:
                self._fail(handle, why)
            self._settle(handle)
        self._maybe_close(job)

    # -- channel events -------------------------------------------------------------------
    def on_landed(self, ev: Landed) -> None:
        job = ev.job
        handle = job.handle
        job.landed += 1
        if ev.checksum is not None:
            job.checksums[ev.chunk] = ev.checksum
        now = self.agent.clock()
        job.landed_at.append(now)
        trace("landed", job.request_id)
        if ev.written:
            handle.bytes_received += job.chunks[ev.chunk].nbytes
            if handle.t_first_data is None:
                handle.t_first_data = now
            handle.t_last_data = now
        if ev.error is not None:
            self._fail(handle, ev.error)
        if handle.session.is_terminal:
            self._settle(handle)
        else:
            self._maybe_complete(handle)
        self._maybe_close(job)

    def on_write_done(self, job: RecvJob) -> None:
        """A device write into the job's blocks completed (channels with async writes)."""
        job.pending -= 1
        self._send_cancel(job)
        if job.handle.session.is_terminal:
            self._settle(job.handle)
        self._maybe_close(job)

    # -- completion -----------------------------------------------------------------------
    def _maybe_complete(self, handle: RecvHandle) -> None:
        if handle.session.is_terminal or handle.pending:
            return
        if not all(job.complete for job in handle.jobs.values()):
            return
        for sender, job in handle.jobs.items():
            if not job.request.checksum:
                continue
            assert job.done is not None
            for k, expected in enumerate(job.done.checksums):
                got = job.checksums.get(k)
                if got != expected:
                    self._fail(
                        handle,
                        f"checksum mismatch in chunk {k} from sender rank "
                        f"{sender}: got {got:#x}, the sender sent {expected:#x} "
                        f"(corrupted in flight)",
                    )
                    return
        handle.session.advance_to(SessionState.TRANSFERRING)
        if handle.on_commit is not None:
            try:
                handle.on_commit(handle)
            except Exception as exc:
                handle.commit_error = f"{type(exc).__name__}: {exc}"
                self._fail(handle, f"commit failed: {handle.commit_error}")
                return
        handle.session.advance(SessionState.TRANSFERRED)
        trace("committed", handle.request_id)
        self.ended[SessionState.TRANSFERRED.value] += 1
        for sender, job in handle.jobs.items():
            job.final_sent = True
            self.agent.control.send(sender, P.Ack(handle.request_id))

    def _fail(self, handle: RecvHandle, reason: str, *, skip: int | None = None) -> None:
        if handle.session.fail(reason):
            self._notify(handle, reason, error=True, skip=skip)
        self._settle(handle)

    def _notify(
        self, handle: RecvHandle, reason: str, *, error: bool, skip: int | None = None
    ) -> None:
        for sender, job in handle.jobs.items():
            if sender != skip and not job.final_sent and not job.refused:
                job.cancel_due = (reason, error)
                self._send_cancel(job)

    def _send_cancel(self, job: RecvJob) -> None:
        """The job's final word, once no device work of it is in flight: until then this rank
        may still read the sender's memory (direct channel), which stays leased."""
        if job.cancel_due is None or job.pending or job.final_sent:
            return
        reason, error = job.cancel_due
        job.final_sent = True
        self.agent.control.send(job.peer, P.Cancel(job.request_id, reason, error))

    def _settle(self, handle: RecvHandle) -> None:
        """``on_release`` of an ended, uncommitted request once no write is in flight."""
        if handle.state is SessionState.TRANSFERRED or handle.released or handle.pending:
            return
        if not handle.session.is_terminal:
            return
        handle.released = True
        self.ended[handle.state.value] += 1
        if handle.on_release is not None:
            handle.on_release(handle)

    def _maybe_close(self, job: RecvJob) -> None:
        """Drop a job once its sender can send nothing more and nothing is in flight."""
        key = (job.peer, job.request_id)
        if self.jobs.get(key) is not job:
            return
        done_with = job.closed or job.handle.state is SessionState.TRANSFERRED
        if done_with and job.landed >= job.posted and job.pending == 0:
            del self.jobs[key]
            self.agent.channel.finished(job)

    # -- timeouts and peers ---------------------------------------------------------------
    def check_deadlines(self, now: float) -> None:
        for rid, handle in list(self._live.items()):
            if handle.session.is_terminal:
                del self._live[rid]
            elif handle.session.check_deadline(now):
                del self._live[rid]
                self._notify(handle, str(handle.session.error), error=True)
                self._settle(handle)

    def next_deadline(self) -> float | None:
        times = [
            h.session.deadline
            for h in self._live.values()
            if not h.session.is_terminal and h.session.deadline is not None
        ]
        return min(times) if times else None

    def peer_lost(self, peer: int, why: str) -> None:
        for (sender, _), job in list(self.jobs.items()):
            if sender != peer:
                continue
            job.closed = job.final_sent = True
            job.posted = job.landed  # nothing more will land from a lost peer
            job.pending = 0
            self._fail(job.handle, f"lost sender rank {peer}: {why}", skip=peer)
            self._maybe_close(job)

    def shutdown(self) -> None:
        """Cancel every live request (its senders hear a Cancel)."""
        for handle in list(self.handles.values()):
            if not handle.session.is_terminal:
                handle.session.cancel("the receiver shut down")
                self._notify(handle, "the receiver shut down", error=False)
                self._settle(handle)

    # -- introspection --------------------------------------------------------------------
    def busy(self) -> bool:
        return any(h.pending for h in self.handles.values()) or any(
            not j.closed for j in self.jobs.values()
        )

    def sessions(self) -> list[Session]:
        return [h.session for h in self.handles.values()]

    def sizes(self) -> dict[str, int]:
        return {"handles": len(self.handles), "open_jobs": len(self.jobs)}
