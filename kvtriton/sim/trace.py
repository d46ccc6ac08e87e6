"""Request traces: :class:`Request`, :class:`Trace`, the JSONL trace format and its loader.

A :class:`Trace` is a sequence of :class:`Request` (prompt token ids, response token ids,
session, the request it continues). :func:`kvtriton.sim.synthetic.synthetic_trace` builds seeded
``"chat"`` and ``"agent"`` traces. :func:`load_trace` reads the
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
  - optional ``"session"`` (default: the id);
  - optional ``"timestamp"``: arrival time in milliseconds from the start (a number >= 0;
    requests without one arrive at 0 unless a rate is given, :meth:`Trace.with_rate`).

Synthetic ids are ``random.Random(f"{seed}/{key}")`` draws in ``[0, vocab_size)`` with key
``"segment/NAME"``, ``"ID/new"`` or ``"ID/response"``, so a file reproduces the same tokens
everywhere.

:func:`load_trace` also reads Mooncake-format traces (records with ``hash_ids``; see
:mod:`kvtriton.sim.mooncake`), detected from the first record or forced with
``trace_format``. docs/traces.md documents both formats.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

__all__ = [
    "FORMAT_VERSION",
    "TRACE_FORMATS",
    "Request",
    "Trace",
    "TraceFormat",
    "load_trace",
    "trace_from_records",
]

TraceFormat = Literal["auto", "kvtriton", "mooncake"]
#: What ``load_trace(trace_format=...)`` takes: detect from the first record, or force one.
TRACE_FORMATS: tuple[str, ...] = ("auto", "kvtriton", "mooncake")

#: The ``kvtriton_trace`` version of the JSONL header this module reads and writes.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Request:
    """One request of a trace.

    Attributes:
        request_id: unique within the trace.
        prompt: prompt token ids (``P = len(prompt) >= 1``): a tuple, or a sequence that
            makes them on use (:class:`~kvtriton.sim.mooncake.BlockTokens`).
        response: token ids the receiver decodes (``R >= 1``).
        session: a label grouping a conversation or an agent's loop.
        after: an earlier request that must finish before this one starts (or ``None``).
        arrival: arrival time in seconds from the start of the trace (``None``: at 0, or
            as a rate gives it).
    """

    request_id: str
    prompt: Sequence[int]
    response: Sequence[int]
    session: str = ""
    after: str | None = None
    arrival: float | None = None

    @property
    def sequence(self) -> tuple[int, ...]:
        """Prompt followed by response: what a continuing request extends."""
        return tuple(self.prompt) + tuple(self.response)

    def prompt_ids(self) -> Sequence[int]:
        """The prompt in the form the cache manager hashes fastest (an ``array("Q")`` for
        generated prompts, else the tuple itself)."""
        make = getattr(self.prompt, "array", None)
        return make() if make is not None else self.prompt


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order plus the JSONL records they came from (for :meth:`save`)."""

    requests: tuple[Request, ...]
    name: str = "trace"
    records: tuple[Mapping[str, Any], ...] = field(default=(), repr=False, compare=False)
    fmt: Literal["kvtriton", "mooncake"] = field(default="kvtriton", repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.requests)

    def head(self, n: int) -> Trace:
        """The first ``n`` requests (in arrival order), with the records that build them."""
        check_int(n, "n", 1)
        if n >= len(self.requests):
            return self
        requests = self.requests[:n]
        if self.fmt == "mooncake" or not self.records:
            records = self.records[:n]
        else:  # compact records: everything up to the n-th request's record
            last = requests[-1].request_id
            end = next(i for i, r in enumerate(self.records) if r.get("id") == last)
            records = self.records[: end + 1]
        return Trace(requests, name=self.name, records=records, fmt=self.fmt)

    def with_rate(self, rate: float, *, seed: int = 0) -> Trace:
        """Arrivals of a Poisson process of ``rate`` requests per second (seeded), in trace
        order; a request that continues another still waits for it when simulated."""
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < math.inf:
            raise ValueError(f"rate must be a number of requests per second > 0, got {rate!r}")
        rng = random.Random(f"{seed}/arrivals")
        t, requests = 0.0, []
        for r in self.requests:
            requests.append(replace(r, arrival=t))
            t += rng.expovariate(rate)
        times = {r.request_id: r.arrival for r in requests}
        records = tuple(
            {**rec, "timestamp": 1000.0 * times[rec["id"]]}
            if self.fmt == "kvtriton" and rec.get("id") in times
            else rec
            for rec in self.records
        )
        return Trace(tuple(requests), name=self.name, records=records, fmt=self.fmt)

    def scale_arrivals(self, factor: float) -> Trace:
        """Arrival times multiplied by ``factor`` (``1/9``: nine times the load); records
        are kept as read (the change is in the requests only)."""
        if (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or not 0 < factor < math.inf
        ):
            raise ValueError(f"factor must be a number > 0, got {factor!r}")
        requests = tuple(
            r if r.arrival is None else replace(r, arrival=r.arrival * factor)
            for r in self.requests
        )
        return Trace(requests, name=self.name, records=self.records, fmt=self.fmt)

    @property
    def timed(self) -> bool:
        """Whether any request has an arrival time."""
        return any(r.arrival is not None for r in self.requests)

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
        """JSONL records: the ones it was built from (compact kvtriton records, or Mooncake
        records), else explicit prompts."""
        if self.records:
            return [dict(r) for r in self.records]
        out: list[dict[str, Any]] = [{"kvtriton_trace": FORMAT_VERSION, "name": self.name}]
        for r in self.requests:
            rec: dict[str, Any] = {
                "id": r.request_id,
                "session": r.session,
                "prompt": list(r.prompt),
                "response": list(r.response),
            }
            if r.after is not None:
                rec["after"] = r.after
            if r.arrival is not None:
                rec["timestamp"] = 1000.0 * r.arrival
            out.append(rec)
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trace as JSONL (see the module docstring)."""
        with open(path, "w") as fh:
            for rec in self.to_records():
                fh.write(json.dumps(rec, separators=(",", ":")) + "\n")


def synthetic_ids(seed: int, vocab: int, key: str, n: int) -> tuple[int, ...]:
    rng = random.Random(f"{seed}/{key}")
    return tuple(rng.choices(range(vocab), k=n))


def _ids(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of token ids, got {type(value).__name__}")
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"{where}[{i}]: token ids are ints >= 0, got {t!r}")
    return tuple(value)


def check_int(value: Any, where: str, minimum: int) -> int:
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
    "timestamp",
}


def trace_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    name: str | None = None,
    source: str = "trace",
    lines: Sequence[int] | None = None,
) -> Trace:
    """Resolve JSONL records (see the module docstring) into a :class:`Trace`.

    ``ValueError`` names ``source``, the record (its file line when ``lines`` gives the line
    of each record, else its 1-based number) and the field at fault.
    """
    seed, vocab, trace_name = 0, 32000, name
    segments: dict[str, tuple[int, ...]] = {}
    done: dict[str, Request] = {}
    requests: list[Request] = []
    kept: list[Mapping[str, Any]] = []
    for line, rec in enumerate(records, start=1):
        where = f"{source}: " + (f"line {lines[line - 1]}" if lines else f"record {line}")
        if not isinstance(rec, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        kept.append(rec)
        if "kvtriton_trace" in rec:
            if line != 1:
                raise ValueError(f"{where}: the header must be the first record")
            if rec["kvtriton_trace"] != FORMAT_VERSION:
                raise ValueError(
                    f"{where}: unsupported trace format version "
                    f"{rec['kvtriton_trace']!r} (expected {FORMAT_VERSION})"
                )
            seed = check_int(rec.get("seed", 0), f"{where}: seed", 0)
            vocab = check_int(rec.get("vocab_size", 32000), f"{where}: vocab_size", 1)
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
                else synthetic_ids(
                    seed, vocab, f"segment/{seg}", check_int(rec["len"], f"{where}: len", 1)
                )
            )
            continue
        unknown = sorted(set(rec) - _REQUEST_KEYS)
        if unknown:
            hint = " (a Mooncake-format record: read it as trace_format='mooncake')"
            raise ValueError(
                f"{where}: unknown fields {unknown}; a request takes {sorted(_REQUEST_KEYS)}"
                + (hint if "hash_ids" in rec else "")
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
                    n = check_int(rec["prefix_len"], f"{where}: prefix_len", 0)
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
                else synthetic_ids(
                    seed,
                    vocab,
                    f"{rid}/new",
                    check_int(rec.get("new_len", 0), f"{where}: new_len", 0),
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
            else synthetic_ids(
                seed,
                vocab,
                f"{rid}/response",
                check_int(rec["response_len"], f"{where}: response_len", 1),
            )
        )
        if not response:
            raise ValueError(f"{where}: the response is empty (R >= 1 needed)")
        if after is not None and after not in done:
            raise ValueError(f"{where}: after {after!r} is no earlier request")
        session = rec.get("session", rid)
        if not isinstance(session, str):
            raise ValueError(f"{where}: session must be a string, got {session!r}")
        arrival = None
        if "timestamp" in rec:
            ts = rec["timestamp"]
            if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts < math.inf:
                raise ValueError(f"{where}: timestamp must be milliseconds >= 0, got {ts!r}")
            arrival = ts / 1000.0
            if requests and requests[-1].arrival is not None and arrival < requests[-1].arrival:
                raise ValueError(
                    f"{where}: timestamp {ts} is earlier than the previous request's "
                    "(requests are listed in arrival order)"
                )
        req = Request(rid, prompt, response, session, after, arrival)
        done[rid] = req
        requests.append(req)
    if not requests:
        raise ValueError(f"{source}: the trace holds no request")
    return Trace(tuple(requests), name=trace_name or "trace", records=tuple(kept))


def load_trace(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    trace_format: TraceFormat = "auto",
    block_tokens: int | None = None,
) -> Trace:
    """Read a JSONL trace file: kvtriton's format (the module docstring) or the Mooncake
    format (:mod:`kvtriton.sim.mooncake`; ``block_tokens`` per ``hash_ids`` entry, default
    512). ``trace_format="auto"`` picks Mooncake when the first record holds ``hash_ids``.
    Errors name the file and the line."""
    if trace_format not in TRACE_FORMATS:
        raise ValueError(f"trace_format must be one of {TRACE_FORMATS}, got {trace_format!r}")
    src = os.fspath(path)
    try:
        with open(src) as fh:
            parsed = list(_parse_lines(fh, src))
    except OSError as exc:
        raise ValueError(f"cannot read trace {src!r}: {exc.strerror or exc}") from None
    default = os.path.splitext(os.path.basename(src))[0]
    from kvtriton.sim import mooncake

    if trace_format == "auto":
        first = parsed[0][1] if parsed else None
        trace_format = "mooncake" if mooncake.is_mooncake_record(first) else "kvtriton"
    if trace_format == "mooncake":
        return mooncake.mooncake_trace(
            parsed,
            source=src,
            name=name or default,
            block_tokens=mooncake.DEFAULT_BLOCK_TOKENS if block_tokens is None else block_tokens,
        )
    if block_tokens is not None:
        raise ValueError(f"{src}: block_tokens applies to Mooncake-format traces only")
    trace = trace_from_records(
        [rec for _, rec in parsed],  # type: ignore[misc]
        name=name,
        source=src,
        lines=[line for line, _ in parsed],
    )
    return trace if name else _named(trace, default)


def _parse_lines(lines: Iterable[str], src: str) -> Iterator[tuple[int, object]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{src}: line {number} is not JSON: {exc.msg}") from None


def _named(trace: Trace, default: str) -> Trace:
    if trace.name != "trace":
        return trace
    return Trace(trace.requests, name=default, records=trace.records)
