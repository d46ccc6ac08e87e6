"""Control planes: how the small protocol messages travel between ranks.

A :class:`ControlPlane` delivers :mod:`~kvtriton.transfer.protocol` messages between one rank
and its peers, in order per peer, and wakes the owning thread when a message (or a data
channel's completion, through :meth:`ControlPlane.wake`) arrives:

* :class:`SocketControl`: one TCP connection per peer pair, non-blocking sockets under one
  ``selectors`` loop, length-checked frames. Measured on a 2-core CPU box, a message costs
  tens of microseconds where a gloo point-to-point message costs a round trip through a
  helper thread; nothing polls or sleeps (the owner blocks in ``select`` until a frame, a
  wake-up or its next deadline).
* :class:`LocalHub` / :class:`LocalControl`: in-process queues between agents of one process
  (protocol, session and fault tests in milliseconds, with the loopback data channel).

A peer whose connection closes, resets or sends a malformed frame is *lost*: :meth:`poll`
reports it once as ``(peer, Lost(reason))`` and nothing more is sent to it.
"""

from __future__ import annotations

import collections
import errno
import selectors
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from kvtriton.transfer import protocol as P

__all__ = ["ControlPlane", "LocalControl", "LocalHub", "Lost", "SocketControl"]


@dataclass(frozen=True)
class Lost:
    """The connection to a peer ended (``reason`` says how)."""

    reason: str


Incoming = tuple[int, "P.Message | Lost"]


class ControlPlane(ABC):
    """Ordered message delivery between this rank and its peers."""

    rank: int
    peers: tuple[int, ...]

    @abstractmethod
    def send(self, peer: int, message: P.Message) -> None:
        """Queue ``message`` for ``peer``; never blocks (a dead peer shows up in :meth:`poll`)."""

    @abstractmethod
    def poll(self, timeout: float) -> list[Incoming]:
        """Messages that arrived, waiting up to ``timeout`` seconds for the first one (or a
        :meth:`wake`); ``timeout = 0`` never blocks."""

    @abstractmethod
    def wake(self) -> None:
        """Make a concurrent or the next :meth:`poll` return now (thread-safe)."""

    @abstractmethod
    def close(self) -> None:
        """Flush what was queued (best effort) and release the connections."""

    @abstractmethod
    def drop(self, peer: int, reason: str) -> None:
        """Close the connection to a misbehaving peer; it is lost from now on."""

    def is_lost(self, peer: int) -> bool:
        return peer in self.lost

    lost: dict[int, str]


# ---------------------------------------------------------------------------------------
# TCP sockets
# ---------------------------------------------------------------------------------------
class _Conn:
    def __init__(self, peer: int, sock: socket.socket) -> None:
        self.peer = peer
        self.sock = sock
        self.inbox = bytearray()
        self.outbox = bytearray()


class SocketControl(ControlPlane):
    """TCP control connections to ``peers`` (see the module docstring).

    Build it with :meth:`connect` (collective over a torch.distributed gloo group) or from a
    listening socket and the peers' addresses (:meth:`from_addresses`).
    """

    def __init__(self, rank: int, conns: dict[int, socket.socket]) -> None:
        self.rank = rank
        self.peers = tuple(sorted(conns))
        self.lost: dict[int, str] = {}
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        for peer, sock in conns.items():
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(peer, sock)
            self._conns[peer] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: list[Incoming] = []
        self._closed = False
        self._wake_lock = threading.Lock()
        self._woken = False

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_addresses(
        cls,
        rank: int,
        listener: socket.socket,
        addresses: dict[int, tuple[str, int]],
        peers: Sequence[int],
        *,
        model_digest: str,
        channel: str,
        timeout_s: float = 60.0,
    ) -> SocketControl:
        """Connect to every peer: this rank dials peers with a higher rank and accepts those
        with a lower one; each connection starts with a :class:`~protocol.Hello` naming the
        dialling rank (checked against ``peers`` and the data channel; a different model is
        refused per request, by the sender)."""
        peers = sorted(set(peers))
        conns: dict[int, socket.socket] = {}
        deadline = time.monotonic() + timeout_s
        for peer in peers:
            if peer <= rank:
                continue
            sock = socket.create_connection(addresses[peer], timeout=timeout_s)
            sock.sendall(P.encode(P.Hello(rank, model_digest, channel)))
            conns[peer] = sock
        expected = {p for p in peers if p < rank}
        listener.settimeout(max(0.1, deadline - time.monotonic()))
        while expected:
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                raise TimeoutError(
                    f"rank {rank}: control connections from ranks {sorted(expected)} did not "
                    f"arrive within {timeout_s} s"
                ) from None
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            hello = _read_hello(sock)
            if hello.rank not in expected:
                sock.close()
                raise P.ProtocolError(
                    f"rank {rank}: a Hello from rank {hello.rank}, expected one of "
                    f"{sorted(expected)}"
                )
            if hello.channel != channel:  # a different model is refused per request instead
                sock.close()
                raise P.ProtocolError(
                    f"rank {rank}: rank {hello.rank} moves data over {hello.channel!r}; this "
                    f"rank over {channel!r}"
                )
            expected.discard(hello.rank)
            conns[hello.rank] = sock
        listener.close()
        return cls(rank, conns)

    @classmethod
    def connect(
        cls,
        rank: int,
        peers: Sequence[int],
        group: object,
        *,
        model_digest: str,
        channel: str,
        timeout_s: float = 60.0,
    ) -> SocketControl:
        """Collective over the gloo ``group`` (every rank of it must call): each rank listens
        on an ephemeral port, the addresses are exchanged as fixed-size byte tensors (no
        pickle), then the pairs in ``peers`` connect."""
        import torch
        import torch.distributed as dist

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        host = _advertised_host()
        listener.bind(("0.0.0.0" if host != "127.0.0.1" else host, 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        mine = torch.zeros(64, dtype=torch.uint8)
        text = f"{rank} {host} {port}".encode()
        mine[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        world = dist.get_world_size(group)
        table = [torch.zeros(64, dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(table, mine, group=group)
        addresses: dict[int, tuple[str, int]] = {}
        for row in table:
            fields = bytes(row.tolist()).rstrip(b"\0").decode().split()
            addresses[int(fields[0])] = (fields[1], int(fields[2]))
        return cls.from_addresses(
            rank,
            listener,
            addresses,
            peers,
            model_digest=model_digest,
            channel=channel,
            timeout_s=timeout_s,
        )

    # -- ControlPlane ---------------------------------------------------------------------
    def send(self, peer: int, message: P.Message) -> None:
        if peer in self.lost or self._closed:
            return
        conn = self._conns[peer]
        had_backlog = bool(conn.outbox)
        conn.outbox += P.encode(message)
        if not had_backlog:
            self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            while conn.outbox:
                n = conn.sock.send(conn.outbox)
                del conn.outbox[:n]
        except BlockingIOError:
            pass
        except OSError as exc:
            self._lose(conn.peer, f"send failed: {exc}")
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbox else 0)
        self._sel.modify(conn.sock, events, conn)

    def drop(self, peer: int, reason: str) -> None:
        if peer not in self.lost:
            self._lose(peer, reason)
            self._pending.pop()  # the caller already knows

    def _lose(self, peer: int, reason: str) -> None:
        if peer in self.lost:
            return
        self.lost[peer] = reason
        conn = self._conns[peer]
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self._pending.append((peer, Lost(reason)))

    def _read(self, conn: _Conn) -> None:
        ended: str | None = None
        try:
            while True:
                data = conn.sock.recv(1 << 16)
                if not data:
                    ended = "connection closed by the peer"
                    break
                conn.inbox += data
                if len(data) < 1 << 16:
                    break
        except BlockingIOError:
            pass
        except OSError as exc:
            ended = f"connection error: {exc}"
        try:  # what arrived before the end is still delivered, in order
            for msg in P.split_frames(conn.inbox):
                self._pending.append((conn.peer, msg))
        except P.ProtocolError as exc:
            ended = f"protocol error: {exc}"
        if ended is not None:
            self._lose(conn.peer, ended)

    def poll(self, timeout: float) -> list[Incoming]:
        if self._closed:
            return []
        if not self._pending:
            for key, mask in self._sel.select(max(0.0, timeout)):
                if key.data is None:
                    self._drain_wake()
                    continue
                conn = key.data
                if mask & selectors.EVENT_WRITE:
                    self._flush(conn)
                if mask & selectors.EVENT_READ and conn.peer not in self.lost:
                    self._read(conn)
        out, self._pending = self._pending, []
        return out

    def _drain_wake(self) -> None:
        # drain first, then clear the flag: a wake that lands in between leaves its byte in
        # the pipe (the next select returns at once); clearing first could swallow that byte
        # while the flag stays set, and every later wake would then be lost
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._wake_lock:
            self._woken = False

    def wake(self) -> None:
        with self._wake_lock:
            if self._woken:
                return
            self._woken = True
        try:
            self._wake_w.send(b"\0")
        except OSError as exc:  # a full pipe already wakes the loop
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise

    def close(self) -> None:
        if self._closed:
            return
        deadline = time.monotonic() + 2.0
        for conn in self._conns.values():
            if conn.peer in self.lost:
                continue
            try:
                conn.sock.setblocking(True)
                conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
                conn.sock.sendall(conn.outbox)
                conn.outbox.clear()
            except OSError:
                pass
        for conn in self._conns.values():
            if conn.peer not in self.lost:
                conn.sock.close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        self._closed = True


def _read_hello(sock: socket.socket) -> P.Hello:
    header = _recv_exact(sock, P.HEADER_BYTES)
    kind, length = P.decode_header(header)
    msg = P.decode(kind, _recv_exact(sock, length))
    if not isinstance(msg, P.Hello):
        raise P.ProtocolError(f"expected a Hello first, got {type(msg).__name__}")
    return msg


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise ConnectionError("connection closed during the handshake")
        buf += data
    return bytes(buf)


def _advertised_host() -> str:
    """The address peers reach this rank at: ``KVTRITON_CTRL_HOST``, else the interface that
    routes to ``MASTER_ADDR`` (torchrun), else loopback (ranks spawned on one machine)."""
    import os

    host = os.environ.get("KVTRITON_CTRL_HOST")
    if host:
        return host
    master = os.environ.get("MASTER_ADDR")
    if master and master not in ("127.0.0.1", "localhost"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
                return str(s.getsockname()[0])
            except OSError:
                pass
    return "127.0.0.1"


# ---------------------------------------------------------------------------------------
# in-process
# ---------------------------------------------------------------------------------------
class LocalHub:
    """Queues between :class:`LocalControl` endpoints of one process. Messages are encoded
    and decoded on the way (the same bytes and checks as a socket)."""

    def __init__(self) -> None:
        self.endpoints: dict[int, LocalControl] = {}

    def endpoint(self, rank: int, peers: Sequence[int]) -> LocalControl:
        ctl = LocalControl(self, rank, peers)
        self.endpoints[rank] = ctl
        return ctl

    def kill(self, rank: int, reason: str = "process died") -> None:
        """Simulate the death of ``rank``: its peers see the connection drop."""
        dead = self.endpoints[rank]
        dead.dead = True
        for other in self.endpoints.values():
            if rank in other.peers and rank not in other.lost:
                other.inbox.append((rank, Lost(reason)))
                other.lost[rank] = reason


class LocalControl(ControlPlane):
    """One rank's endpoint on a :class:`LocalHub`."""

    def __init__(self, hub: LocalHub, rank: int, peers: Sequence[int]) -> None:
        self.hub = hub
        self.rank = rank
        self.peers = tuple(sorted(peers))
        self.lost: dict[int, str] = {}
        self.inbox: collections.deque[Incoming] = collections.deque()
        self.dead = False
        self.sent = 0

    def send(self, peer: int, message: P.Message) -> None:
        if self.dead or peer in self.lost:
            return
        other = self.hub.endpoints.get(peer)
        if other is None or other.dead:
            return
        frame = P.encode(message)
        buf = bytearray(frame)
        (msg,) = list(P.split_frames(buf))
        self.sent += 1
        other.inbox.append((self.rank, msg))

    def poll(self, timeout: float) -> list[Incoming]:
        out = list(self.inbox)
        self.inbox.clear()
        return out

    def wake(self) -> None:
        pass

    def drop(self, peer: int, reason: str) -> None:
        self.lost.setdefault(peer, reason)
        other = self.hub.endpoints.get(peer)
        if other is not None and self.rank not in other.lost:
            other.lost[self.rank] = f"rank {self.rank} closed the connection"
            other.inbox.append((self.rank, Lost(other.lost[self.rank])))

    def close(self) -> None:
        pass
