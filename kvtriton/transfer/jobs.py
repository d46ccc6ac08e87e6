"""The per-(request, peer) work items that data channels execute, and their events.

A :class:`SendJob` is one accepted request on a sender for one receiver; a :class:`RecvJob`
is one request on a receiver for one sender (a request spans every sender holding part of
the receiver's heads and layers). Both carry the chunk plan both sides derived
(:func:`~kvtriton.transfer.chunking.plan_chunks`) and the prepared kernel moves of this side
(``moves.run(k, buffer)``): validated once when the job was born, executed per chunk.

Channels report progress as events (:class:`Sent`, :class:`Landed`, :class:`DataLost`),
which the agent's loop hands to the sender or receiver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtriton.target import TransferTarget
    from kvtriton.transfer import protocol as P
    from kvtriton.transfer.chunking import Chunk
    from kvtriton.transfer.session import Session

__all__ = ["DataLost", "Handed", "Landed", "RecvJob", "SendJob", "Sent", "WriteDone"]


@dataclass(eq=False)
class SendJob:
    """One accepted request on a sender, for one receiver ``peer``.

    Attributes:
        peer: the receiver rank.
        request: the receiver's request (validated when accepted).
        session: the sender-side session.
        target: the source blocks (the registered source's target).
        chunks: the chunk plan (identical on the receiver).
        moves: prepared pack of every chunk (``moves.run(k, buffer)``); ``None`` for a
            direct channel, which never packs.
        scheduled: chunks announced and handed to the channel (``[0, scheduled)``).
        handed: chunks irrevocably on their way (in the wire's queue or sent); with their
            checksums known, the receiver may hear Done once all are.
        sent: chunks whose bytes left this rank (their staging buffer is free again).
        in_flight: chunks handed to the channel whose send has not completed (the source
            blocks must stay leased while any is).
        checksums: chunk -> checksum (when the receiver asked for them).
    """

    peer: int
    request: P.Request
    session: Session
    target: TransferTarget
    chunks: tuple[Chunk, ...]
    moves: Any = None
    scheduled: int = 0
    handed: int = 0
    sent: int = 0
    in_flight: int = 0
    checksums: dict[int, int] = field(default_factory=dict)
    done_sent: bool = False
    corrupt_chunk: int | None = None  # fault injection (tests): flip a byte after the checksum
    ready: Any = None  # the source's readiness marker (a CUDA event), from the channel
    remote_lease: bool = False  # a peer may read the source blocks until its final word

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def total_bytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)


@dataclass(eq=False)
class RecvJob:
    """One request on a receiver, for one sender ``peer``.

    Attributes:
        peer: the sender rank.
        request: what was asked of that sender.
        handle: the request's :class:`~kvtriton.transfer.receiver.RecvHandle` (its session
            decides whether landed bytes are written).
        chunks: the chunk plan (identical on the sender).
        moves: prepared unpack of every chunk (packed channels) or the prepared copy from
            the peer's pool (direct channel, set when its Blocks arrive).
        posted: chunks whose receive was posted (``[0, posted)``; from the sender's Schedule).
        landed: chunks that arrived and were written into this rank's pool.
        pending: writes into this rank's pool that were issued and have not completed
            (device work in flight): the blocks are released only when this is 0.
        checksums: chunk -> checksum computed on arrival.
        done: the sender's Done, once it arrived.
        closed: the sender will send nothing more for this job (Done, Abort, Refuse, lost).
        refused: the sender refused the request (it holds no session for it).
        final_sent: this receiver sent the job's one final word (Ack or Cancel).
    """

    peer: int
    request: P.Request
    handle: Any
    chunks: tuple[Chunk, ...]
    moves: Any = None
    posted: int = 0
    landed: int = 0
    pending: int = 0
    checksums: dict[int, int] = field(default_factory=dict)
    done: P.Done | None = None
    closed: bool = False
    refused: bool = False
    final_sent: bool = False
    cancel_due: tuple[str, bool] | None = None  # a Cancel waiting for in-flight device work
    landed_at: list[float] = field(default_factory=list)  # clock time each chunk landed

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def live(self) -> bool:
        """Whether landed bytes should still be written (the request has not ended)."""
        return not self.handle.session.is_terminal

    @property
    def complete(self) -> bool:
        """Every chunk landed and the sender confirmed it sent them all."""
        return self.done is not None and self.landed == len(self.chunks)


@dataclass(frozen=True)
class Sent:
    """Chunk ``chunk`` of ``job`` left this rank (``checksum`` of its bytes, when asked)."""

    job: SendJob
    chunk: int
    checksum: int | None = None


@dataclass(frozen=True)
class Handed:
    """More chunks of ``job`` are irrevocably on their way (``job.handed`` counts them)."""

    job: SendJob


@dataclass(frozen=True)
class Landed:
    """Chunk ``chunk`` of ``job`` arrived; ``written``: it was written into the pool (the
    job was live when it landed); ``checksum`` of the bytes that arrived, when asked;
    ``error``: writing it failed (the request fails; nothing is committed)."""

    job: RecvJob
    chunk: int
    written: bool
    checksum: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class DataLost:
    """The data path to ``peer`` broke (``reason``)."""

    peer: int
    reason: str


@dataclass(frozen=True)
class WriteDone:
    """A device write into ``job``'s blocks, counted in ``job.pending``, completed."""

    job: RecvJob
