"""The per-request transfer state machine (pure Python)."""

from __future__ import annotations

import pytest

from kvtriton.transfer.session import InvalidTransition, Session, SessionState

S = SessionState


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_happy_path_records_history() -> None:
    clock = Clock()
    s = Session("r1", "recv", clock=clock)
    assert s.state is S.INIT and not s.is_terminal
    for state in (S.READY, S.TRANSFERRING, S.TRANSFERRED):
        clock.t += 1
        assert s.advance(state)
    assert s.is_terminal and s.error is None
    assert [h[0] for h in s.history] == [S.INIT, S.READY, S.TRANSFERRING, S.TRANSFERRED]
    assert s.time_in(S.READY) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [S.TRANSFERRING, S.TRANSFERRED, S.INIT])
def test_skipping_a_step_is_a_bug(bad: SessionState) -> None:
    s = Session("r1", "send")
    with pytest.raises(InvalidTransition, match="INIT -> "):
        s.advance(bad)
    assert s.state is S.INIT


def test_advance_to_walks_intermediate_states_and_never_back() -> None:
    s = Session("r", "recv")
    assert s.advance_to(S.TRANSFERRING)
    assert [h[0] for h in s.history] == [S.INIT, S.READY, S.TRANSFERRING]
    assert not s.advance_to(S.TRANSFERRING)
    with pytest.raises(InvalidTransition):
        s.advance_to(S.READY)


@pytest.mark.parametrize("at", [S.INIT, S.READY, S.TRANSFERRING])
@pytest.mark.parametrize("end", ["fail", "cancel"])
def test_terminal_states_are_never_overwritten(at: SessionState, end: str) -> None:
    s = Session("r", "recv")
    s.advance_to(at) if at is not S.INIT else None
    assert getattr(s, end)("first reason")
    final = s.state
    assert final is (S.ERROR if end == "fail" else S.CANCELLED)
    # every later event is ignored, except that a cancel outranks a failure (precedence
    # cancel > fail > complete on conflicting ends: both sides then agree on CANCELLED)
    assert not s.fail("second")
    assert not s.advance(S.TRANSFERRED)
    assert not s.advance_to(S.TRANSFERRED)
    assert not s.check_deadline(now=1e12)
    assert s.state is final and s.error == "first reason"
    if end == "fail":
        assert s.cancel("third")
        assert s.state is S.CANCELLED and s.error == "third"
    else:
        assert not s.cancel("third")
    assert not s.fail("fourth") and not s.cancel("fifth")
    assert s.state is S.CANCELLED


def test_transferred_is_terminal_too() -> None:
    s = Session("r", "send")
    s.advance_to(S.TRANSFERRED)
    assert not s.fail("late error") and not s.cancel()
    assert s.state is S.TRANSFERRED and s.error is None


def test_deadline_moves_to_error_only_once_it_passed() -> None:
    clock = Clock()
    s = Session("r", "recv", timeout_s=2.0, clock=clock)
    s.advance(S.READY)
    clock.t += 1.999
    assert not s.check_deadline()
    clock.t += 0.001
    assert s.check_deadline()
    assert s.state is S.ERROR and "timed out after 2 s in state READY" in (s.error or "")


def test_no_timeout_means_no_deadline() -> None:
    s = Session("r", "recv")
    assert s.deadline is None and not s.check_deadline(now=1e18)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="side"):
        Session("r", "both")
    with pytest.raises(ValueError, match="timeout_s"):
        Session("r", "recv", timeout_s=0)
