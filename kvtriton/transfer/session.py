"""Per-request, per-side transfer state machine.

::

    INIT -> READY -> TRANSFERRING -> TRANSFERRED
      \\        \\           \\
       +--------+-----------+----> ERROR | CANCELLED

``INIT``: created. ``READY``: the receiver sent its request(s); the sender validated a
request against its source. ``TRANSFERRING``: data is moving. ``TRANSFERRED`` (receiver:
every chunk arrived intact and was committed; sender: the receiver acknowledged that commit),
``ERROR`` and ``CANCELLED`` are terminal. When two ends conflict (a cancel racing a failure
or a completion), precedence decides: cancel > fail > complete. A terminal ``ERROR`` still
becomes ``CANCELLED`` on a later cancel (both release the same blocks, and both sides then
agree); nothing else ever changes a terminal state, so a late message changes nothing.
Pure Python.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "TERMINAL",
    "InvalidTransition",
    "Session",
    "SessionState",
]


class SessionState(enum.Enum):
    INIT = "INIT"
    READY = "READY"
    TRANSFERRING = "TRANSFERRING"
    TRANSFERRED = "TRANSFERRED"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({SessionState.TRANSFERRED, SessionState.ERROR, SessionState.CANCELLED})

_FORWARD = {
    SessionState.INIT: {SessionState.READY},
    SessionState.READY: {SessionState.TRANSFERRING},
    SessionState.TRANSFERRING: {SessionState.TRANSFERRED},
}


class InvalidTransition(RuntimeError):
    """A forward transition that skips or reverses a step (a bug in the caller)."""


@dataclass
class Session:
    """State of one request on one side.

    Attributes:
        request_id: the request.
        side: ``"send"`` or ``"recv"``.
        peer: the other rank (sender sessions) or ``None`` (a receiver session may span
            several senders).
        timeout_s: seconds from creation after which :meth:`check_deadline` moves a
            non-terminal session to ``ERROR``; ``None`` = no deadline.
        clock: time source (seconds), replaceable in tests.
    """

    request_id: str
    side: str
    peer: int | None = None
    timeout_s: float | None = None
    clock: Callable[[], float] = time.monotonic
    state: SessionState = SessionState.INIT
    error: str | None = None
    created: float = field(init=False)
    history: list[tuple[SessionState, float]] = field(init=False)
    _deadline: float | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.side not in ("send", "recv"):
            raise ValueError(f"side must be 'send' or 'recv', got {self.side!r}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {self.timeout_s}")
        self.created = self.clock()
        self.history = [(self.state, self.created)]

    # -- queries --------------------------------------------------------------------------
    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal

    @property
    def deadline(self) -> float | None:
        if self.timeout_s is None:
            return self._deadline
        own = self.created + self.timeout_s
        return own if self._deadline is None else min(own, self._deadline)

    def limit_deadline(self, deadline: float) -> None:
        """Never run past ``deadline`` (clock seconds), e.g. the peer's own deadline."""
        self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)

    def time_in(self, state: SessionState) -> float:
        """Seconds spent in ``state`` (0 if never entered; up to now if still in it)."""
        total = 0.0
        for i, (s, t) in enumerate(self.history):
            if s is state:
                end = self.history[i + 1][1] if i + 1 < len(self.history) else self.clock()
                total += end - t
        return total

    # -- transitions ----------------------------------------------------------------------
    def _enter(self, state: SessionState) -> None:
        self.state = state
        self.history.append((state, self.clock()))

    def advance(self, state: SessionState) -> bool:
        """Move one step forward. Returns ``False`` (and changes nothing) when the session
        is already terminal; raises :class:`InvalidTransition` for a skipped/reversed step."""
        if self.is_terminal:
            return False
        if state not in _FORWARD.get(self.state, ()):
            raise InvalidTransition(
                f"{self.side} session {self.request_id!r}: cannot go {self.state.value} -> "
                f"{state.value} (allowed: INIT -> READY -> TRANSFERRING -> TRANSFERRED)"
            )
        self._enter(state)
        return True

    def advance_to(self, state: SessionState) -> bool:
        """Step forward through intermediate states up to ``state`` (no-op if already there
        or terminal). Returns whether the state changed."""
        if self.is_terminal or self.state is state:
            return False
        order = [
            SessionState.INIT,
            SessionState.READY,
            SessionState.TRANSFERRING,
            SessionState.TRANSFERRED,
        ]
        if state not in order or order.index(state) < order.index(self.state):
            raise InvalidTransition(
                f"{self.side} session {self.request_id!r}: cannot go {self.state.value} -> "
                f"{state.value}"
            )
        while self.state is not state:
            self._enter(order[order.index(self.state) + 1])
        return True

    def fail(self, reason: str) -> bool:
        """Move to ``ERROR`` with ``reason`` unless already terminal (returns whether it did)."""
        if self.is_terminal:
            return False
        self.error = reason
        self._enter(SessionState.ERROR)
        return True

    def cancel(self, reason: str = "cancelled") -> bool:
        """Move to ``CANCELLED`` unless it already ended ``TRANSFERRED`` or ``CANCELLED``
        (cancel takes precedence over a failure). Returns whether the state changed."""
        if self.state in (SessionState.TRANSFERRED, SessionState.CANCELLED):
            return False
        self.error = reason
        self._enter(SessionState.CANCELLED)
        return True

    def check_deadline(self, now: float | None = None) -> bool:
        """Fail the session if its deadline passed; returns whether it timed out now."""
        if self.is_terminal or self.deadline is None:
            return False
        now = self.clock() if now is None else now
        if now < self.deadline:
            return False
        limit = self.deadline - self.created
        return self.fail(f"timed out after {limit:.3g} s in state {self.state.value}")

    def __repr__(self) -> str:
        extra = f", error={self.error!r}" if self.error else ""
        return f"Session({self.side} {self.request_id!r}, {self.state.value}{extra})"
