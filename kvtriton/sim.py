"""Workload simulator: bytes a disaggregated receiver pulls per layer group, per reuse policy.

A request trace runs through the real receiver cache manager
(:class:`kvtriton.cache.KVCacheManager`, bookkeeping only: no tensors) once per policy:

* ``no_reuse`` -- every request moves everything it needs (``cached = 0``); nothing is
  published in the prefix cache;
* ``single_boundary`` -- one reuse boundary ``c`` per request, the largest position at which
  every group could resume (what systems with one committed-token counter do);
* ``per_group`` -- each layer group keeps its own boundary (kvtriton).

For each request, in trace order: :func:`kvtriton.adapter.prepare_receive` in the policy's
mode (the manager matches the prompt, reuses cached blocks, allocates the rest, and the plan is
:func:`kvtriton.plan.plan_transfer` with the allocation's cached counts), its bytes are
counted, :func:`kvtriton.adapter.complete_receive` commits the prompt (the KV was received);
then the receiver decodes the response: each step ``append``-s the fed token, ``commit``-s at
block boundaries and ``slide``-s the windows, so sliding-window pages really leave the window
(they stay matchable until evicted); at the end the request is ``free``-d. A response of
``R`` tokens feeds ``R - 1`` of them (the first comes from the sender's prefill, the last is
never fed), so the receiver holds KV for ``[0, P + R - 1)`` when it ends.

Up to ``concurrency`` requests are live at once and decode in lock-step, one step taking each
request to its next block boundary (at most ``B`` tokens: block allocation, commits and window
releases happen at block granularity, so the cache contents match token-by-token decoding at
every block boundary). A request starts
when the request it continues (``after``) has finished and, per attention group, the free
plus evictable blocks cover the worst-case growth of every live request plus its own (so
decoding never runs out of blocks); otherwise it waits. ``OutOfBlocksError`` is only possible
(and reported as ``ValueError``) when a single request does not fit the pool.

Traces
------
A :class:`Trace` is a sequence of :class:`Request` (prompt token ids, response token ids,
session, the request it continues). :func:`synthetic_trace` builds seeded ``"chat"``
(multi-turn chat, system prompts shared across users) and ``"agent"`` (agentic loops: a long
context, then short tool outputs and short responses) traces. :func:`load_trace` reads the
JSONL format below, which :meth:`Trace.save` writes.

JSONL trace format (one JSON object per line; blank lines are ignored)
---------------------------------------------------------------------
* optional first line, the header: ``{"kvtriton_trace": 1, "name": "chat", "seed": 0,
  "vocab_size": 32000}`` -- ``seed`` and ``vocab_size`` drive the synthetic token ids of
  ``*_len`` fields below (defaults 0 and 32000);
* a segment (a named token run, not a request): ``{"segment": "sys0", "tokens": [1, 2, ...]}``
  or ``{"segment": "sys0", "len": 1024}`` (synthetic ids);
* a request: ``{"id": "u0-t1", "session": "u0", ...}`` with ``id`` unique and

  - the prompt: either ``"prompt": [ids...]``, or ``"prefix": NAME`` (a segment, or an earlier
    request whose sequence is its prompt followed by its response) with optional
    ``"prefix_len": n`` (keep the first ``n`` tokens) and new tokens ``"new": [ids...]`` or
    ``"new_len": n`` (synthetic ids);
  - the response: ``"response": [ids...]`` or ``"response_len": n`` (``n >= 1``; synthetic);
  - optional ``"after": ID``: an earlier request that must finish first (default: the
    ``prefix`` when it names a request);
  - optional ``"session"`` (default: the id).

Synthetic ids are ``random.Random(f"{seed}/{key}")`` draws in ``[0, vocab_size)`` with key
``"segment/NAME"``, ``"ID/new"`` or ``"ID/response"``, so a file reproduces the same tokens
everywhere.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtriton.adapter import complete_receive, prepare_receive
from kvtriton.cache.manager import KVCacheManager, OutOfBlocksError
from kvtriton.cache.pools import blocks_for_bytes, resolve_num_blocks
from kvtriton.plan import plan_transfer
from kvtriton.ranges import ceil_div
from kvtriton.spec import KVCacheSpec
from kvtriton.table import Column, Table, format_bytes, format_count

__all__ = [
    "POLICIES",
    "TRACE_KINDS",
    "GroupStats",
    "PolicyResult",
    "Request",
    "SimResult",
    "Trace",
    "add_simulate_arguments",
    "agent_trace",
    "chat_trace",
    "default_capacity_blocks",
    "load_trace",
    "run_simulate",
    "simulate",
    "synthetic_trace",
    "trace_from_records",
]

POLICIES: tuple[str, ...] = ("no_reuse", "single_boundary", "per_group")
TRACE_KINDS: tuple[str, ...] = ("chat", "agent")
_FORMAT_VERSION = 1


# =============================================================================================
# Traces
# =============================================================================================


@dataclass(frozen=True)
class Request:
    """One request of a trace.

    Attributes:
        request_id: unique within the trace.
        prompt: prompt token ids (``P = len(prompt) >= 1``).
        response: token ids the receiver decodes (``R >= 1``).
        session: a label grouping a conversation or an agent's loop.
        after: an earlier request that must finish before this one starts (or ``None``).
    """

    request_id: str
    prompt: tuple[int, ...]
    response: tuple[int, ...]
    session: str = ""
    after: str | None = None

    @property
    def sequence(self) -> tuple[int, ...]:
        """Prompt followed by response: what a continuing request extends."""
        return self.prompt + self.response


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order plus the JSONL records they came from (for :meth:`save`)."""

    requests: tuple[Request, ...]
    name: str = "trace"
    records: tuple[Mapping[str, Any], ...] = field(default=(), repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)

    @property
    def response_tokens(self) -> int:
        return sum(len(r.response) for r in self.requests)

    @property
    def sessions(self) -> int:
        return len({r.session for r in self.requests})

    def summary(self) -> dict[str, Any]:
        n = max(1, len(self.requests))
        return {
            "name": self.name,
            "requests": len(self.requests),
            "sessions": self.sessions,
            "prompt_tokens": self.prompt_tokens,
            "response_tokens": self.response_tokens,
            "mean_prompt_tokens": round(self.prompt_tokens / n, 1),
            "max_prompt_tokens": max((len(r.prompt) for r in self.requests), default=0),
        }

    def to_records(self) -> list[dict[str, Any]]:
        """JSONL records: the compact ones it was built from, else explicit prompts."""
        if self.records:
            return [dict(r) for r in self.records]
        out: list[dict[str, Any]] = [{"kvtriton_trace": _FORMAT_VERSION, "name": self.name}]
        for r in self.requests:
            rec: dict[str, Any] = {
                "id": r.request_id,
                "session": r.session,
                "prompt": list(r.prompt),
                "response": list(r.response),
            }
            if r.after is not None:
                rec["after"] = r.after
            out.append(rec)
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trace as JSONL (see the module docstring)."""
        with open(path, "w") as fh:
            for rec in self.to_records():
                fh.write(json.dumps(rec, separators=(",", ":")) + "\n")


def _synthetic(seed: int, vocab: int, key: str, n: int) -> tuple[int, ...]:
    rng = random.Random(f"{seed}/{key}")
    return tuple(rng.choices(range(vocab), k=n))


def _ids(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of token ids, got {type(value).__name__}")
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"{where}[{i}]: token ids are ints >= 0, got {t!r}")
    return tuple(value)


def _length(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: expected an int >= {minimum}, got {value!r}")
    return value


_REQUEST_KEYS = {
    "id",
    "session",
    "prompt",
    "prefix",
    "prefix_len",
    "new",
    "new_len",
    "response",
    "response_len",
    "after",
}


def trace_from_records(
    records: Iterable[Mapping[str, Any]], *, name: str | None = None, source: str = "trace"
) -> Trace:
    """Resolve JSONL records (see the module docstring) into a :class:`Trace`.

    ``ValueError`` names ``source``, the 1-based record number and the field at fault.
    """
    seed, vocab, trace_name = 0, 32000, name
    segments: dict[str, tuple[int, ...]] = {}
    done: dict[str, Request] = {}
    requests: list[Request] = []
    kept: list[Mapping[str, Any]] = []
    for line, rec in enumerate(records, start=1):
        where = f"{source}: record {line}"
        if not isinstance(rec, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        kept.append(rec)
        if "kvtriton_trace" in rec:
            if line != 1:
                raise ValueError(f"{where}: the header must be the first record")
            if rec["kvtriton_trace"] != _FORMAT_VERSION:
                raise ValueError(
                    f"{where}: unsupported trace format version "
                    f"{rec['kvtriton_trace']!r} (expected {_FORMAT_VERSION})"
                )
            seed = _length(rec.get("seed", 0), f"{where}: seed", 0)
            vocab = _length(rec.get("vocab_size", 32000), f"{where}: vocab_size", 1)
            trace_name = trace_name or rec.get("name")
            continue
        if "segment" in rec:
            seg = rec["segment"]
            if not isinstance(seg, str) or not seg or seg in segments or seg in done:
                raise ValueError(f"{where}: segment name {seg!r} must be a new non-empty string")
            if ("tokens" in rec) == ("len" in rec):
                raise ValueError(f"{where}: segment {seg!r} needs exactly one of tokens, len")
            segments[seg] = (
                _ids(rec["tokens"], f"{where}: tokens")
                if "tokens" in rec
                else _synthetic(
                    seed, vocab, f"segment/{seg}", _length(rec["len"], f"{where}: len", 1)
                )
            )
            continue
        unknown = sorted(set(rec) - _REQUEST_KEYS)
        if unknown:
            raise ValueError(
                f"{where}: unknown fields {unknown}; a request takes {sorted(_REQUEST_KEYS)}"
            )
        rid = rec.get("id")
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"{where}: a request needs a non-empty string id, got {rid!r}")
        where = f"{where} (request {rid!r})"
        if rid in done or rid in segments:
            raise ValueError(f"{where}: duplicate id")
        after = rec.get("after")
        if "prompt" in rec:
            if any(k in rec for k in ("prefix", "prefix_len", "new", "new_len")):
                raise ValueError(f"{where}: give prompt, or prefix/new, not both")
            prompt = _ids(rec["prompt"], f"{where}: prompt")
        else:
            head: tuple[int, ...] = ()
            if "prefix" in rec:
                ref = rec["prefix"]
                if ref in segments:
                    head = segments[ref]
                elif ref in done:
                    head = done[ref].sequence
                    after = ref if after is None else after
                else:
                    raise ValueError(f"{where}: prefix {ref!r} is no earlier segment or request")
                if "prefix_len" in rec:
                    n = _length(rec["prefix_len"], f"{where}: prefix_len", 0)
                    if n > len(head):
                        raise ValueError(
                            f"{where}: prefix_len {n} exceeds the {len(head)} tokens of {ref!r}"
                        )
                    head = head[:n]
            elif "prefix_len" in rec:
                raise ValueError(f"{where}: prefix_len without prefix")
            if "new" in rec and "new_len" in rec:
                raise ValueError(f"{where}: give new or new_len, not both")
            new = (
                _ids(rec["new"], f"{where}: new")
                if "new" in rec
                else _synthetic(
                    seed,
                    vocab,
                    f"{rid}/new",
                    _length(rec.get("new_len", 0), f"{where}: new_len", 0),
                )
            )
            prompt = head + new
        if not prompt:
            raise ValueError(f"{where}: the prompt is empty (P >= 1 needed)")
        if ("response" in rec) == ("response_len" in rec):
            raise ValueError(f"{where}: needs exactly one of response, response_len")
        response = (
            _ids(rec["response"], f"{where}: response")
            if "response" in rec
            else _synthetic(
                seed,
                vocab,
                f"{rid}/response",
                _length(rec["response_len"], f"{where}: response_len", 1),
            )
        )
        if not response:
            raise ValueError(f"{where}: the response is empty (R >= 1 needed)")
        if after is not None and after not in done:
            raise ValueError(f"{where}: after {after!r} is no earlier request")
        session = rec.get("session", rid)
        if not isinstance(session, str):
            raise ValueError(f"{where}: session must be a string, got {session!r}")
        req = Request(rid, prompt, response, session, after)
        done[rid] = req
        requests.append(req)
    if not requests:
        raise ValueError(f"{source}: the trace holds no request")
    return Trace(tuple(requests), name=trace_name or "trace", records=tuple(kept))


def load_trace(path: str | os.PathLike[str], *, name: str | None = None) -> Trace:
    """Read a JSONL trace file (format in the module docstring)."""
    records = []
    src = os.fspath(path)
    try:
        with open(src) as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{src}: line {number} is not JSON: {exc.msg}") from None
    except OSError as exc:
        raise ValueError(f"cannot read trace {src!r}: {exc.strerror or exc}") from None
    trace = trace_from_records(records, name=name, source=src)
    return trace if name else _named(trace, os.path.splitext(os.path.basename(src))[0])


def _named(trace: Trace, default: str) -> Trace:
    if trace.name != "trace":
        return trace
    return Trace(trace.requests, name=default, records=trace.records)


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


def _check(what: str, value: int, minimum: int) -> int:
    return _length(value, what, minimum)


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
    _check("seed", seed, 0)
    _check("vocab_size", vocab_size, 1)
    _check("users", users, 1)
    _check("turns", turns, 1)
    _check("system_prompts", system_prompts, 1)
    _check("system_len", system_len, 0)
    rng = random.Random(seed)
    records: list[dict[str, Any]] = [
        {"kvtriton_trace": _FORMAT_VERSION, "name": "chat", "seed": seed, "vocab_size": vocab_size}
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
    _check("seed", seed, 0)
    _check("vocab_size", vocab_size, 1)
    _check("agents", agents, 1)
    _check("steps", steps, 1)
    _check("system_len", system_len, 0)
    rng = random.Random(seed)
    records: list[dict[str, Any]] = [
        {"kvtriton_trace": _FORMAT_VERSION, "name": "agent", "seed": seed, "vocab_size": vocab_size}
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


# =============================================================================================
# Results
# =============================================================================================


@dataclass(frozen=True)
class GroupStats:
    """One layer group under one policy, summed over the trace.

    Attributes:
        name, kind, window, layers: the group.
        needed_tokens: sum over requests of ``len(needed(g, P))`` (0 for state groups).
        moved_tokens: positions moved (``<= needed_tokens``).
        kv_bytes, state_bytes: bytes moved.
        state_moves: requests whose state moved (state groups).
        requests: requests planned.
        peak_blocks_in_use: the most blocks (or state slots) referenced by live requests at once.
        pool_blocks: the group's pool size (blocks, or state slots).
    """

    name: str
    kind: str
    window: int | None
    layers: int
    needed_tokens: int
    moved_tokens: int
    kv_bytes: int
    state_bytes: int
    state_moves: int
    requests: int
    peak_blocks_in_use: int
    pool_blocks: int

    @property
    def bytes(self) -> int:
        return self.kv_bytes + self.state_bytes

    @property
    def hit_rate(self) -> float:
        """Fraction of needed positions already on the receiver (state: requests whose state
        stayed); in ``[0, 1]``, 0 when nothing was needed."""
        if self.kind == "state":
            return 1 - self.state_moves / self.requests if self.requests else 0.0
        if not self.needed_tokens:
            return 0.0
        return 1 - self.moved_tokens / self.needed_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.name,
            "kind": self.kind,
            "window": self.window,
            "layers": self.layers,
            "needed_tokens": self.needed_tokens,
            "moved_tokens": self.moved_tokens,
            "kv_bytes": self.kv_bytes,
            "state_bytes": self.state_bytes,
            "bytes": self.bytes,
            "state_moves": self.state_moves,
            "hit_rate": self.hit_rate,
            "peak_blocks_in_use": self.peak_blocks_in_use,
            "pool_blocks": self.pool_blocks,
        }


@dataclass(frozen=True)
class PolicyResult:
    """One policy over the whole trace.

    Attributes:
        policy: ``"no_reuse"``, ``"single_boundary"`` or ``"per_group"``.
        groups: per layer group, in spec order.
        requests: requests planned (all of the trace).
        full_hits: requests that moved nothing at all.
        waits: admission attempts deferred because the pool could not cover the worst-case
            growth of the live requests plus the next one (a measure of capacity pressure).
    """

    policy: str
    groups: tuple[GroupStats, ...]
    requests: int
    full_hits: int
    waits: int

    @property
    def total_bytes(self) -> int:
        return sum(g.bytes for g in self.groups)

    @property
    def peak_blocks_in_use(self) -> int:
        """Sum over attention groups of each group's peak (an upper bound of the joint peak)."""
        return sum(g.peak_blocks_in_use for g in self.groups if g.kind != "state")

    def group(self, name: str) -> GroupStats:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no layer group {name!r}; groups: {[g.name for g in self.groups]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "requests": self.requests,
            "full_hits": self.full_hits,
            "waits": self.waits,
            "total_bytes": self.total_bytes,
            "groups": [g.to_dict() for g in self.groups],
        }


@dataclass(frozen=True)
class SimResult:
    """What :func:`simulate` measured: one :class:`PolicyResult` per policy.

    Attributes:
        spec_name: the spec's label; trace: :meth:`Trace.summary`.
        tokens_per_block: ``B``; pool_blocks: ``{attention group: blocks}``; state_slots:
            slots per state group (0 without state groups); concurrency: live requests.
        policies: ``{policy: PolicyResult}`` in the order simulated.
    """

    spec_name: str
    trace: Mapping[str, Any]
    tokens_per_block: int
    pool_blocks: Mapping[str, int]
    state_slots: int
    concurrency: int
    policies: Mapping[str, PolicyResult]

    def __getitem__(self, policy: str) -> PolicyResult:
        try:
            return self.policies[policy]
        except KeyError:
            raise KeyError(
                f"policy {policy!r} was not simulated; ran {list(self.policies)}"
            ) from None

    def savings(
        self, policy: str = "per_group", baseline: str = "single_boundary"
    ) -> tuple[int, float]:
        """``(bytes saved, fraction saved)`` of ``policy`` against ``baseline``."""
        base = self[baseline].total_bytes
        saved = base - self[policy].total_bytes
        return saved, (saved / base if base else 0.0)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec_name,
            "trace": dict(self.trace),
            "tokens_per_block": self.tokens_per_block,
            "pool_blocks": dict(self.pool_blocks),
            "state_slots": self.state_slots,
            "concurrency": self.concurrency,
            "policies": {name: p.to_dict() for name, p in self.policies.items()},
            "savings": {},
        }
        for policy, baseline in _saving_pairs(self.policies):
            saved, frac = self.savings(policy, baseline)
            out["savings"][f"{policy}_vs_{baseline}"] = {"bytes": saved, "fraction": frac}
        return out

    def table(self) -> str:
        """Aligned text: one row per layer group, per policy its hit rate, bytes moved and peak
        blocks in use; totals and the savings below (what ``kvtriton simulate`` prints)."""
        t = self.trace
        order = [p for p in ("per_group", "single_boundary", "no_reuse") if p in self.policies]
        columns: list[Column | str] = ["group", "kind", Column("layers")]
        for _ in order:
            columns += [Column("hit rate"), Column("moved"), Column("bytes"), Column("peak")]
        table = Table(columns, spans=[("", 3), *((_TITLES[p], 4) for p in order)])
        first = self.policies[order[0]]
        for g in first.groups:
            cells: list[object] = [g.name, g.kind, g.layers]
            for p in order:
                s = self.policies[p].group(g.name)
                moved = f"{s.state_moves} st" if s.kind == "state" else format_count(s.moved_tokens)
                cells += [
                    f"{100 * s.hit_rate:.1f}%",
                    moved,
                    format_bytes(s.bytes),
                    format_count(s.peak_blocks_in_use),
                ]
            table.add_row(*cells)
        table.add_rule()
        totals: list[object] = ["total", "", sum(g.layers for g in first.groups)]
        for p in order:
            r = self.policies[p]
            totals += ["", "", format_bytes(r.total_bytes), format_count(r.peak_blocks_in_use)]
        table.add_row(*totals)
        pool = ", ".join(f"{g} {format_count(n)}" for g, n in self.pool_blocks.items())
        head = (
            f"{self.spec_name} on trace {t.get('name')!r}: {t.get('requests')} requests in "
            f"{t.get('sessions')} sessions, {format_count(t.get('prompt_tokens', 0))} prompt "
            f"tokens; pool blocks: {pool or '-'}"
            + (f", {self.state_slots} state slots" if self.state_slots else "")
            + f"; {self.tokens_per_block} tokens/block; concurrency {self.concurrency}"
        )
        lines = [
            head,
            "",
            table.render(),
            "",
            "hit rate: needed positions already on the receiver (state groups: states "
            "kept); moved: tokens (st: states); peak: most blocks referenced at once",
        ]
        windows = [g.window for g in first.groups if g.kind == "sliding" and g.window]
        longest = int(t.get("max_prompt_tokens", 0) or 0)
        if windows and longest and min(windows) > longest:
            lines.append(
                f"note: every sliding window (>= {min(windows):,}) exceeds the longest "
                f"prompt ({longest:,} tokens): on this trace the sliding layers read "
                "their whole context like full attention, so one boundary loses little"
            )
        for policy, baseline in _saving_pairs(self.policies):
            saved, frac = self.savings(policy, baseline)
            lines.append(
                f"{_TITLES[policy]} vs {_TITLES[baseline]}: saves "
                f"{format_bytes(saved)} ({100 * frac:.1f}% of "
                f"{format_bytes(self[baseline].total_bytes)})"
            )
        return "\n".join(lines)


_TITLES = {"per_group": "per-group", "single_boundary": "single boundary", "no_reuse": "no reuse"}


def _saving_pairs(policies: Mapping[str, Any]) -> list[tuple[str, str]]:
    pairs = [
        ("per_group", "single_boundary"),
        ("per_group", "no_reuse"),
        ("single_boundary", "no_reuse"),
    ]
    return [(a, b) for a, b in pairs if a in policies and b in policies]


# =============================================================================================
# Simulation
# =============================================================================================


class _Acc:
    __slots__ = ("kv", "moved", "needed", "peak", "state", "state_moves")

    def __init__(self) -> None:
        self.needed = self.moved = self.kv = self.state = self.state_moves = self.peak = 0


class _Live:
    __slots__ = ("fed", "length", "req")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.length = len(req.prompt)
        self.fed = 0  # response tokens appended so far (R - 1 in all)


def _final_length(req: Request) -> int:
    return len(req.prompt) + len(req.response) - 1


def _max_blocks(spec: KVCacheSpec, group_kind: str, window: int | None, length: int) -> int:
    """The most blocks a request of final length ``length`` ever holds in one group."""
    bsz = spec.tokens_per_block
    total = ceil_div(length, bsz)
    if group_kind == "sliding":
        assert window is not None
        return min(total, (window - 1) // bsz + 2)
    return total


def _resolve_capacity(
    spec: KVCacheSpec,
    capacity_blocks: int | Mapping[str, int] | None,
    capacity_bytes: int | None,
    slots: int,
) -> dict[str, int]:
    attention = [g for g in spec.groups if g.kind != "state"]
    if (capacity_blocks is None) == (capacity_bytes is None):
        raise ValueError("give exactly one of capacity_blocks and capacity_bytes")
    if not attention:
        return {}
    if capacity_bytes is not None:
        return resolve_num_blocks(spec, blocks_for_bytes(spec, capacity_bytes, slots))
    return resolve_num_blocks(spec, capacity_blocks)  # type: ignore[arg-type]


def simulate(
    spec: KVCacheSpec,
    trace: Trace | Sequence[Request],
    *,
    capacity_blocks: int | Mapping[str, int] | None = None,
    capacity_bytes: int | None = None,
    policies: Sequence[str] = POLICIES,
    concurrency: int = 8,
    state_slots: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> SimResult:
    """Run ``trace`` through a fresh receiver :class:`KVCacheManager` per policy.

    Args:
        spec: the receiver's (model or shard) spec: bytes are counted over its layers/heads.
        trace: a :class:`Trace` (or a sequence of :class:`Request`).
        capacity_blocks: blocks per attention group (one int for all, or ``{group: n}``);
            or ``capacity_bytes``: a byte budget over all pools (the same block count for
            every attention group, after the state slots; see ``blocks_for_bytes``).
        policies: any of ``"no_reuse"``, ``"single_boundary"``, ``"per_group"``.
        concurrency: the most requests live (decoding) at once.
        state_slots: slots per state group (live states plus cached snapshots); default
            ``4 * concurrency``.
        progress: called with 1 after each request is planned (e.g. ``tqdm.update``).

    Raises:
        ValueError: bad arguments, or a request that does not fit the pool even alone.
    """
    if not isinstance(trace, Trace):
        trace = Trace(tuple(trace))
    if not trace.requests:
        raise ValueError("the trace holds no request")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies or len(set(policies)) != len(policies):
        raise ValueError(f"policies must be distinct names from {POLICIES}, got {list(policies)}")
    _check("concurrency", concurrency, 1)
    has_state = any(g.kind == "state" for g in spec.groups)
    slots = 4 * concurrency if state_slots is None else _check("state_slots", state_slots, 1)
    if has_state and slots <= concurrency:
        raise ValueError(
            f"state_slots ({slots}) must exceed concurrency ({concurrency}): "
            "each live request holds one slot"
        )
    blocks = _resolve_capacity(spec, capacity_blocks, capacity_bytes, slots if has_state else 0)
    ids = [r.request_id for r in trace.requests]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids in the trace must be unique")
    results = {
        p: _run(spec, trace, p, blocks, slots if has_state else 0, concurrency, progress)
        for p in policies
    }
    return SimResult(
        spec_name=spec.name,
        trace=trace.summary(),
        tokens_per_block=spec.tokens_per_block,
        pool_blocks=blocks,
        state_slots=slots if has_state else 0,
        concurrency=concurrency,
        policies=results,
    )


def _run(
    spec: KVCacheSpec,
    trace: Trace,
    policy: str,
    blocks: dict[str, int],
    slots: int,
    concurrency: int,
    progress: Callable[[int], None] | None,
) -> PolicyResult:
    mgr = KVCacheManager(spec, blocks or None, num_state_slots=slots)
    bsz = spec.tokens_per_block
    attention = [g for g in spec.groups if g.kind != "state"]
    acc = {g.name: _Acc() for g in spec.groups}
    publish = policy != "no_reuse"
    mode = "single_boundary" if policy == "single_boundary" else "per_group"
    pending = list(trace.requests)
    finished: set[str] = set()
    live: dict[str, _Live] = {}
    full_hits = waits = 0

    def growth(state: _Live, group_kind: str, window: int | None, name: str) -> int:
        # Blocks held now (spans end at ceil(L/B); a sliding span, slid after every step,
        # starts at the block of needed(L).start), without building spans.
        held = ceil_div(state.length, bsz)
        if group_kind == "sliding":
            assert window is not None
            held -= max(0, state.length + 1 - window) // bsz
        return max(0, _max_blocks(spec, group_kind, window, _final_length(state.req)) - held)

    def fits(req: Request) -> bool:
        for g in attention:
            need = _max_blocks(spec, g.kind, g.window, _final_length(req))
            need += sum(growth(s, g.kind, g.window, g.name) for s in live.values())
            if need > mgr.num_free_blocks(g.name):
                return False
        return True

    def track() -> None:
        for name, st in mgr.stats().items():
            a = acc[name]
            a.peak = max(a.peak, st["referenced"])

    while pending or live:
        i = 0
        while i < len(pending) and len(live) < concurrency:
            req = pending[i]
            if req.after is not None and req.after not in finished:
                i += 1
                continue
            if live and not fits(req):
                waits += 1
                break
            rid = req.request_id
            try:
                rx = prepare_receive(mgr, rid, req.prompt, mode=mode)  # type: ignore[arg-type]
            except OutOfBlocksError as exc:
                if live:
                    waits += 1
                    break
                raise ValueError(
                    f"{policy}: request {rid!r} (P={len(req.prompt)}) does not fit "
                    f"the pool even alone: {exc}; raise the capacity"
                ) from None
            # no_reuse never publishes, so its match finds nothing: the plan is cached = 0
            # (a sliding group's vacuous count needed.start moves the same positions).
            plan = rx.plan if publish else plan_transfer(spec, len(req.prompt), 0)
            for gt in plan.groups:
                a = acc[gt.name]
                a.needed += len(gt.needed)
                a.moved += len(gt.tokens)
                a.kv += gt.kv_bytes
                a.state += gt.state_bytes
                a.state_moves += int(gt.moves_state)
            full_hits += int(plan.is_full_hit)
            if publish:
                complete_receive(mgr, rx)
            live[rid] = _Live(req)
            pending.pop(i)
            if progress is not None:
                progress(1)
        track()
        if not live:
            raise AssertionError("no request could start")  # after= always names earlier ones
        for rid in list(live):
            state = live[rid]
            req = state.req
            left = len(req.response) - 1 - state.fed
            if left > 0:
                # One step decodes up to the next block boundary (at most B tokens).
                n = min(left, bsz - state.length % bsz)
                try:
                    mgr.append(rid, req.response[state.fed : state.fed + n])
                except OutOfBlocksError as exc:
                    raise ValueError(
                        f"{policy}: request {rid!r} ran out of blocks while "
                        f"decoding: {exc}; raise the capacity"
                    ) from None
                state.fed += n
                state.length += n
                if publish and state.length % bsz == 0:
                    mgr.commit(rid, state.length)
                mgr.slide(rid)
            else:
                if publish:
                    mgr.commit(rid)
                mgr.free(rid)
                finished.add(rid)
                del live[rid]
        track()
    groups = tuple(
        GroupStats(
            name=g.name,
            kind=g.kind,
            window=g.window,
            layers=g.num_layers,
            needed_tokens=acc[g.name].needed,
            moved_tokens=acc[g.name].moved,
            kv_bytes=acc[g.name].kv,
            state_bytes=acc[g.name].state,
            state_moves=acc[g.name].state_moves,
            requests=len(trace.requests),
            peak_blocks_in_use=acc[g.name].peak,
            pool_blocks=slots if g.kind == "state" else blocks[g.name],
        )
        for g in spec.groups
    )
    return PolicyResult(
        policy=policy, groups=groups, requests=len(trace.requests), full_hits=full_hits, waits=waits
    )


def default_capacity_blocks(
    spec: KVCacheSpec, trace: Trace, *, concurrency: int = 8, factor: float = 4.0
) -> int:
    """A pool size that holds ``concurrency`` of the trace's longest requests ``factor`` times
    over (room for a prefix cache beside the live requests), in blocks per group."""
    longest = max(_final_length(r) for r in trace.requests)
    return max(1, math.ceil(factor * concurrency * ceil_div(longest, spec.tokens_per_block)))


# =============================================================================================
# ``kvtriton simulate`` (registered in kvtriton/cli.py; options and run live here)
# =============================================================================================


def _pair(text: str) -> tuple[int, int]:
    import argparse

    lo, sep, hi = text.partition(":")
    try:
        pair = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX token counts, got {text!r}") from None
    if not 0 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, got {text!r}")
    return pair


def _gib(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in GiB, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the capacity must be > 0 GiB, got {text!r}")
    return value


def add_simulate_arguments(p: Any) -> None:
    """Options of ``kvtriton simulate`` (``p`` is an ``argparse.ArgumentParser``)."""
    from kvtriton.cli import add_model_arguments, positive_int

    add_model_arguments(p)
    p.add_argument(
        "--trace",
        default="chat",
        metavar="chat|agent|FILE.jsonl",
        help="a synthetic trace kind or a JSONL trace file (format: kvtriton.sim)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic trace (0)")
    p.add_argument(
        "--users", type=positive_int, metavar="N", help="chat users / agents (default 8 / 4)"
    )
    p.add_argument(
        "--turns",
        type=positive_int,
        metavar="N",
        help="chat turns per user / agent steps (default 4 / 8)",
    )
    p.add_argument(
        "--system-prompts",
        type=positive_int,
        metavar="N",
        help="distinct chat system prompts shared by the users (default 2)",
    )
    p.add_argument(
        "--system-len",
        type=int,
        metavar="N",
        help="shared system / tool prompt tokens (default 1024 chat, 2048 agent)",
    )
    p.add_argument(
        "--input-len",
        type=_pair,
        metavar="MIN:MAX",
        help="new tokens per turn: chat message / agent tool output (default 32:256 / 16:128)",
    )
    p.add_argument(
        "--context-len",
        type=_pair,
        metavar="MIN:MAX",
        help="agent task context at step 0 (default 4096:8192)",
    )
    p.add_argument(
        "--output-len",
        type=_pair,
        metavar="MIN:MAX",
        help="response tokens (default 64:384 chat, 16:96 agent)",
    )
    cap = p.add_mutually_exclusive_group()
    cap.add_argument(
        "--capacity-blocks",
        type=positive_int,
        metavar="N",
        help="receiver pool: blocks per attention group (default: 4x what "
        "--concurrency of the longest requests hold)",
    )
    cap.add_argument(
        "--capacity-gib",
        type=_gib,
        metavar="GIB",
        help="receiver pool: GiB over all groups (same block count per group)",
    )
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=8,
        metavar="N",
        help="requests decoding at once (8)",
    )
    p.add_argument(
        "--state-slots",
        type=positive_int,
        metavar="N",
        help="slots per state group (default 4 x concurrency)",
    )
    p.add_argument(
        "--policies",
        default=",".join(POLICIES),
        metavar="LIST",
        help=f"comma-separated subset of {','.join(POLICIES)}",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--plot", metavar="PATH", help="also save a plot (png, svg, pdf ...)")
    p.add_argument("--save-trace", metavar="PATH", help="also write the trace as JSONL")


def _cli_trace(args: Any) -> Trace:
    from kvtriton.cli import CliError

    if args.trace in TRACE_KINDS:
        params: dict[str, Any] = {"seed": args.seed}
        chat = args.trace == "chat"
        for option, key in (
            ("users", "users" if chat else "agents"),
            ("turns", "turns" if chat else "steps"),
            ("system_len", "system_len"),
            ("output_len", "response_len"),
            ("input_len", "user_len" if chat else "step_len"),
        ):
            if getattr(args, option) is not None:
                params[key] = getattr(args, option)
        only = {"system_prompts": chat, "context_len": not chat}
        for option, allowed in only.items():
            if getattr(args, option) is not None:
                if not allowed:
                    raise CliError(
                        f"--{option.replace('_', '-')} does not apply to --trace {args.trace}"
                    )
                params[option] = getattr(args, option)
        return synthetic_trace(args.trace, **params)
    if not os.path.exists(args.trace):
        raise CliError(
            f"--trace {args.trace!r} is neither {' nor '.join(TRACE_KINDS)} nor an "
            "existing JSONL file"
        )
    generator = [
        o
        for o in (
            "users",
            "turns",
            "system_prompts",
            "system_len",
            "input_len",
            "context_len",
            "output_len",
        )
        if getattr(args, o) is not None
    ]
    if generator:
        raise CliError(
            f"--{generator[0].replace('_', '-')} shapes synthetic traces only, not "
            f"the trace file {args.trace!r}"
        )
    return load_trace(args.trace)


def run_simulate(args: Any) -> int:
    """``kvtriton simulate``: print the per-policy table (or JSON) and optionally a plot."""
    from kvtriton.cli import CliError, spec_from_args

    try:
        spec = spec_from_args(args)
        trace = _cli_trace(args)
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        if args.capacity_gib is not None:
            capacity: dict[str, Any] = {"capacity_bytes": int(args.capacity_gib * 1024**3)}
        else:
            capacity = {
                "capacity_blocks": args.capacity_blocks
                or default_capacity_blocks(spec, trace, concurrency=args.concurrency)
            }
        if args.save_trace:
            trace.save(args.save_trace)
        from tqdm import tqdm

        with tqdm(
            total=len(trace) * len(policies), unit="req", desc="simulate", disable=None, leave=False
        ) as bar:
            result = simulate(
                spec,
                trace,
                policies=policies,
                concurrency=args.concurrency,
                state_slots=args.state_slots,
                progress=bar.update,
                **capacity,
            )
    except (ValueError, TypeError, OSError) as exc:
        raise CliError(str(exc)) from exc
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    if args.plot:
        from kvtriton.viz import plot_simulation

        try:
            plot_simulation(result, args.plot)
        except (ImportError, ValueError, OSError) as exc:
            raise CliError(f"--plot {args.plot!r}: {exc}") from exc
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0
