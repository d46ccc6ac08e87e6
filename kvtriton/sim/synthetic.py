"""Seeded synthetic traces: multi-turn chat and agentic loops (:func:`synthetic_trace`).

Each generator writes compact JSONL records (segments and ``*_len`` fields, see
:mod:`kvtriton.sim.trace`) and resolves them with :func:`~kvtriton.sim.trace.trace_from_records`,
so a saved synthetic trace is small and reproduces the same token ids everywhere.
"""

from __future__ import annotations

import random
from typing import Any

from kvtriton.sim.trace import FORMAT_VERSION, Trace, check_int, trace_from_records

__all__ = ["TRACE_KINDS", "agent_trace", "chat_trace", "synthetic_trace"]

#: The synthetic trace kinds :func:`synthetic_trace` builds.
TRACE_KINDS: tuple[str, ...] = ("chat", "agent")


def _span(rng: random.Random, bounds: tuple[int, int], what: str) -> int:
    lo, hi = bounds
    if (
        isinstance(lo, bool)
        or isinstance(hi, bool)
        or not (isinstance(lo, int) and isinstance(hi, int))
    ):
        raise ValueError(f"{what} must be a (min, max) pair of ints, got {bounds!r}")
    if not 0 <= lo <= hi:
        raise ValueError(f"{what} must satisfy 0 <= min <= max, got {bounds!r}")
    return rng.randint(lo, hi)


def chat_trace(
    *,
    seed: int = 0,
    users: int = 8,
    turns: int = 4,
    system_prompts: int = 2,
    system_len: int = 1024,
    user_len: tuple[int, int] = (32, 256),
    response_len: tuple[int, int] = (64, 384),
    vocab_size: int = 32000,
) -> Trace:
    """Multi-turn chat: user ``u`` uses system prompt ``u % system_prompts`` (shared by users);
    turn ``t`` continues turn ``t - 1`` (its prompt and response) with a new user message.
    Requests arrive turn by turn, users in a seeded random order each turn. Lengths are tokens,
    drawn uniformly from the inclusive ``(min, max)`` ranges."""
    check_int(seed, "seed", 0)
    check_int(vocab_size, "vocab_size", 1)
    check_int(users, "users", 1)
    check_int(turns, "turns", 1)
    check_int(system_prompts, "system_prompts", 1)
    check_int(system_len, "system_len", 0)
    rng = random.Random(seed)
    records: list[dict[str, Any]] = [
        {"kvtriton_trace": FORMAT_VERSION, "name": "chat", "seed": seed, "vocab_size": vocab_size}
    ]
    if system_len:
        records += [{"segment": f"sys{k}", "len": system_len} for k in range(system_prompts)]
    for t in range(turns):
        order = list(range(users))
        rng.shuffle(order)
        for u in order:
            rec: dict[str, Any] = {"id": f"u{u}-t{t}", "session": f"u{u}"}
            if t:
                rec["prefix"] = f"u{u}-t{t - 1}"
            elif system_len:
                rec["prefix"] = f"sys{u % system_prompts}"
            rec["new_len"] = max(
                1 if not system_len and not t else 0, _span(rng, user_len, "user_len")
            )
            rec["response_len"] = max(1, _span(rng, response_len, "response_len"))
            records.append(rec)
    return trace_from_records(records, source="chat_trace")


def agent_trace(
    *,
    seed: int = 0,
    agents: int = 4,
    steps: int = 8,
    system_len: int = 2048,
    context_len: tuple[int, int] = (4096, 8192),
    step_len: tuple[int, int] = (16, 128),
    response_len: tuple[int, int] = (16, 96),
    vocab_size: int = 32000,
) -> Trace:
    """Agentic loops: every agent shares a tool/system prompt of ``system_len`` tokens, adds a
    long task context (``context_len``), then each step continues the previous one with a short
    tool output (``step_len``) and a short response (``response_len``). Steps arrive round by
    round, agents in a seeded random order."""
    check_int(seed, "seed", 0)
    check_int(vocab_size, "vocab_size", 1)
    check_int(agents, "agents", 1)
    check_int(steps, "steps", 1)
    check_int(system_len, "system_len", 0)
    rng = random.Random(seed)
    records: list[dict[str, Any]] = [
        {"kvtriton_trace": FORMAT_VERSION, "name": "agent", "seed": seed, "vocab_size": vocab_size}
    ]
    if system_len:
        records.append({"segment": "tools", "len": system_len})
    for s in range(steps):
        order = list(range(agents))
        rng.shuffle(order)
        for a in order:
            rec: dict[str, Any] = {"id": f"a{a}-s{s}", "session": f"a{a}"}
            if s:
                rec["prefix"] = f"a{a}-s{s - 1}"
                rec["new_len"] = _span(rng, step_len, "step_len")
            else:
                if system_len:
                    rec["prefix"] = "tools"
                rec["new_len"] = max(0 if system_len else 1, _span(rng, context_len, "context_len"))
            rec["response_len"] = max(1, _span(rng, response_len, "response_len"))
            records.append(rec)
    return trace_from_records(records, source="agent_trace")


def synthetic_trace(kind: str = "chat", **params: Any) -> Trace:
    """A seeded synthetic trace: ``kind`` is ``"chat"`` (:func:`chat_trace`) or ``"agent"``
    (:func:`agent_trace`); ``params`` go to that function."""
    if kind == "chat":
        return chat_trace(**params)
    if kind == "agent":
        return agent_trace(**params)
    raise ValueError(f"unknown trace kind {kind!r}; expected one of {TRACE_KINDS} or a .jsonl path")
