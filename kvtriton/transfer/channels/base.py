"""The data-channel interface: how one request's chunks move between a sender and a receiver.

The sender decides *which* chunks go next (request order per receiver, deadlines); a channel
moves them. Every channel speaks the same protocol around the bytes: before chunks move, the
sender announces them (:class:`~kvtriton.transfer.protocol.Schedule` on packed channels,
:class:`~kvtriton.transfer.protocol.Blocks` on the direct one), the receiver checks the
announcement against its own chunk plan and posts what it needs, and both sides report
progress as :mod:`~kvtriton.transfer.jobs` events. Nothing outside a channel branches on
what the channel is.
"""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from kvtriton.transfer import protocol as P
    from kvtriton.transfer.config import TransferOptions
    from kvtriton.transfer.control import ControlPlane
    from kvtriton.transfer.jobs import RecvJob, SendJob
    from kvtriton.transfer.moves import PoolSet

__all__ = ["ChannelHost", "DataChannel"]


class ChannelHost(Protocol):
    """What a channel needs from the agent that owns it."""

    rank: int
    control: ControlPlane
    options: TransferOptions
    pools: PoolSet
    counters: dict[str, float]


class DataChannel(ABC):
    """Moves the chunks of send and receive jobs. One instance per agent.

    Lifecycle: :meth:`attach` (once, by the agent), then the agent calls the sender-side
    :meth:`capacity` / :meth:`schedule`, the receiver-side :meth:`on_announce`, and drains
    :meth:`events` in its loop. Events from helper threads are queued and wake the loop.
    """

    name: ClassVar[str]
    #: whether chunks travel as bytes a checksum can cover (the direct channel's never do)
    checksums: ClassVar[bool] = True
    #: whether the announce that opens a request's last chunks also says the sender is done
    #: (the sender then sends no ``Done``: a direct channel has nothing left in flight)
    announce_ends: ClassVar[bool] = False

    def __init__(self) -> None:
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.host: ChannelHost | None = None

    def attach(self, host: ChannelHost) -> None:
        """Bind to the owning agent (its rank, control plane, options, pools, stats)."""
        self.host = host

    @property
    def _host(self) -> ChannelHost:
        assert self.host is not None, "attach() the channel to an agent first"
        return self.host

    def connect(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Collective set-up over every (sender, receiver) pair of the topology, called by
        every rank with the same pairs after :meth:`attach`: :meth:`connect_start` then
        :meth:`connect_finish` (agents of one process run every start before any finish)."""
        self.connect_start(pairs)
        self.connect_finish(pairs)

    def connect_start(self, pairs: Sequence[tuple[int, int]]) -> None:  # noqa: B027
        """What this rank tells its peers at set-up (default: nothing)."""

    def connect_finish(self, pairs: Sequence[tuple[int, int]]) -> None:  # noqa: B027
        """What this rank waits for at set-up (default: nothing)."""

    def _post(self, event: Any) -> None:
        """Queue an event (any thread) and wake the agent's loop."""
        self._events.put(event)
        self._host.control.wake()

    def events(self) -> list[Any]:
        """Events since the last call (sender: ``Sent``; receiver: ``Landed``; both:
        ``DataLost``)."""
        self.pump()
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def pump(self) -> None:  # noqa: B027 - optional hook
        """Advance work that runs on the owning thread (default: nothing)."""

    # -- sender side ----------------------------------------------------------------------
    @abstractmethod
    def capacity(self, peer: int) -> int:
        """How many more chunks may be scheduled toward ``peer`` now."""

    @abstractmethod
    def schedule(self, job: SendJob, count: int) -> None:
        """Announce chunks ``[job.scheduled, job.scheduled + count)`` of ``job`` to its
        receiver and start moving them (``job.scheduled`` / ``job.in_flight`` advance);
        each completes with a ``Sent`` event."""

    def on_peer_message(self, peer: int, message: P.Message) -> str | None:
        """A channel-specific message from a receiver (e.g. ``Ready``). Returns ``None``, or
        why it is invalid (the pair is then treated as broken)."""
        return f"a {type(message).__name__}, which the {self.name} channel never expects"

    def ready_marker(self) -> Any:
        """Called when a source is registered: what marks its KV as written (on CUDA an
        event recorded on the current stream, which the sender's reads wait for); ``None``
        when the writes are already complete (CPU)."""
        return None

    def marker_done(self, marker: Any) -> bool:
        """Whether the sender may announce chunks whose KV ``marker`` marks (channels that
        order reads on the device return ``True`` at once; the direct channel announces
        only written KV, so its receivers never wait on another process's event)."""
        return True

    def remote_done(self, job: SendJob) -> None:
        """The receiver's final word (Ack or Cancel) arrived: it reads the source no more
        (channels whose receivers read the sender's memory hold a lease until then)."""
        if job.remote_lease:
            job.remote_lease = False
            job.in_flight -= 1

    def chunk_bytes(self, requested: int) -> int:
        """The chunk size a receiver asks for on this channel (default: the option)."""
        return requested

    def prepare_send(self, job: SendJob) -> None:  # noqa: B027 - optional hook
        """Prepare the job's kernel moves once, when the sender accepts it."""

    # -- receiver side --------------------------------------------------------------------
    @abstractmethod
    def on_announce(self, job: RecvJob, message: P.Schedule | P.Blocks) -> str | None:
        """The sender announced chunks of ``job``: check the announcement against the job's
        own chunk plan and post what is needed (bytes of a job that already ended are
        drained, never written). Returns ``None``, or a sentence saying why the
        announcement is invalid (the receiver then treats the pair as broken)."""

    def prepare_recv(self, job: RecvJob) -> None:  # noqa: B027 - optional hook
        """Prepare the job's kernel moves once, when the request is made."""

    def finished(self, job: RecvJob) -> None:  # noqa: B027 - optional hook
        """``job`` is complete or abandoned and will never be touched again."""

    # -- both ------------------------------------------------------------------------------
    def peer_lost(self, peer: int) -> None:  # noqa: B027 - optional hook
        """``peer`` is gone: drop what waits on it (posted receives, queued sends)."""

    def busy(self) -> bool:
        """Whether work handed to the channel is still in flight."""
        return False

    def next_wakeup(self) -> float | None:
        """Clock time at which the channel wants the loop to run again without any message
        or event (``None``: only on events)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop helper threads and release buffers (after the agent said Bye)."""

    def describe(self) -> dict[str, Any]:
        """What a report should say about this channel."""
        return {"channel": self.name}
