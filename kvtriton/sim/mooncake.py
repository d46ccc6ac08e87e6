"""Mooncake-format request traces (the FAST'25 release of kvcache-ai/Mooncake and any trace
written the same way): one JSON object per line,

* ``timestamp`` -- arrival time in milliseconds from the start of the trace (int or float);
* ``input_length`` -- prompt tokens (``P >= 1``);
* ``output_length`` -- response tokens (``0`` is read as 1: the first token always exists);
* ``hash_ids`` -- one id per block of ``block_tokens`` prompt tokens (512 in the public
  traces; the last block is partial when ``P`` is no multiple of it), so
  ``len(hash_ids) == ceil(input_length / block_tokens)``. Equal ids mean an equal block
  *and* an equal prefix before it (a hash chain).

Other fields are ignored. The traces carry no token ids, so this module makes them: token
``j`` of trace block ``h`` is :func:`block_token` ``(h, j)``, a fixed 63-bit mix of the two
numbers (no vocabulary: the cache only compares ids), so equal ids give equal tokens, in a
partial last block too, and different ids give different tokens. Response tokens mix the
request's line number in another domain, so every response is unique. Prompts are generated
when asked for (:class:`BlockTokens`): a trace of 60 M prompt tokens holds only its ids.
Requests are sorted by ``timestamp`` (stable), ids are ``line<N>`` (the 1-based line of the
file). See docs/traces.md for both trace formats.
"""

from __future__ import annotations

import os
import random
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

import numpy as np

from kvtriton.ranges import ceil_div
from kvtriton.sim.trace import Request, Trace, load_trace

__all__ = [
    "DEFAULT_BLOCK_TOKENS",
    "MOONCAKE_FIELDS",
    "BlockTokens",
    "block_token",
    "is_mooncake_record",
    "load_mooncake",
    "mooncake_trace",
    "response_token",
    "sample_prefix_families",
]

#: Tokens per ``hash_ids`` entry in the public Mooncake traces.
DEFAULT_BLOCK_TOKENS = 512
#: The fields every record of the format holds.
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_PROMPT_SALT = 0x6B7674726974F001  # domain of prompt tokens
_RESPONSE_SALT = 0x6B7674726974F002  # domain of response tokens


def _mix(x: int) -> int:
    """SplitMix64's finaliser on a Python int (the reference of :func:`_mix_np`)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix_np(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def block_token(block_id: int, j: int) -> int:
    """Token ``j`` of the trace block with id ``block_id``: a 63-bit int fixed by both."""
    base = _mix(block_id ^ _PROMPT_SALT)
    return _mix(base + (j + 1) * _GOLDEN) & _MASK63


def response_token(request: int, j: int) -> int:
    """Token ``j`` of the response of request ``request`` (its line number)."""
    base = _mix(request ^ _RESPONSE_SALT)
    return _mix(base + (j + 1) * _GOLDEN) & _MASK63


def _tokens(bases: np.ndarray, length: int, block_tokens: int) -> array:
    """``length`` tokens of consecutive blocks with mixed ids ``bases`` (uint64)."""
    offsets = (np.arange(1, block_tokens + 1, dtype=np.uint64) * np.uint64(_GOLDEN))[None, :]
    with np.errstate(over="ignore"):
        grid = _mix_np(bases[:, None] + offsets) & np.uint64(_MASK63)
    flat = grid.reshape(-1)[:length]
    out = array("Q")
    out.frombytes(flat.astype("<u8", copy=False).tobytes())
    return out


class BlockTokens(Sequence[int]):
    """The prompt of a Mooncake-format request, generated on use: ``length`` tokens of the
    trace blocks ``hash_ids`` (``block_tokens`` each, the last one possibly partial).

    Indexing with an int gives one token, a slice an ``array("Q")``; :meth:`array` gives all
    of them (what the cache manager hashes). Equal when ids, length and block size are.
    """

    __slots__ = ("block_tokens", "hash_ids", "length")

    def __init__(self, hash_ids: Sequence[int], length: int, block_tokens: int) -> None:
        if ceil_div(length, block_tokens) != len(hash_ids):
            raise ValueError(
                f"{length} tokens in blocks of {block_tokens} need "
                f"{ceil_div(length, block_tokens)} block ids, got {len(hash_ids)}"
            )
        self.hash_ids = tuple(hash_ids)
        self.length = length
        self.block_tokens = block_tokens

    def __len__(self) -> int:
        return self.length

    def array(self) -> array:
        """Every token id, as the ``array("Q")`` the cache manager takes."""
        with np.errstate(over="ignore"):
            ids = np.array(self.hash_ids, dtype=np.uint64) ^ np.uint64(_PROMPT_SALT)
            bases = _mix_np(ids)
        return _tokens(bases, self.length, self.block_tokens)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> array: ...
    def __getitem__(self, index: int | slice) -> int | array:
        if isinstance(index, slice):
            return self.array()[index]
        i = range(self.length)[index]  # IndexError / negative indices as for a list
        return block_token(self.hash_ids[i // self.block_tokens], i % self.block_tokens)

    def __iter__(self) -> Iterator[int]:
        return iter(self.array())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BlockTokens):
            return (self.hash_ids, self.length, self.block_tokens) == (
                other.hash_ids,
                other.length,
                other.block_tokens,
            )
        if isinstance(other, Sequence):
            return len(other) == self.length and list(self.array()) == list(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.hash_ids, self.length, self.block_tokens))

    def __repr__(self) -> str:
        return (
            f"BlockTokens({self.length} tokens in {len(self.hash_ids)} blocks of "
            f"{self.block_tokens})"
        )


def response_tokens(request: int, length: int) -> array:
    """The ``length`` response tokens of request ``request`` (unique per request)."""
    with np.errstate(over="ignore"):
        base = _mix_np(np.array([request ^ _RESPONSE_SALT], dtype=np.uint64))
    offsets = np.arange(1, length + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
    with np.errstate(over="ignore"):
        flat = _mix_np(base + offsets) & np.uint64(_MASK63)
    out = array("Q")
    out.frombytes(flat.astype("<u8", copy=False).tobytes())
    return out


def is_mooncake_record(record: object) -> bool:
    """Whether a parsed JSONL record is in the Mooncake format (it holds ``hash_ids``)."""
    return isinstance(record, Mapping) and "hash_ids" in record


def _int(rec: Mapping[str, Any], key: str, minimum: int, where: str) -> int:
    if key not in rec:
        raise ValueError(f"{where}: missing field {key!r} (a record holds {list(MOONCAKE_FIELDS)})")
    value = rec[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {key} must be an int >= {minimum}, got {value!r}")
    return value


def _request(
    rec: object, line: int, block_tokens: int, where: str
) -> tuple[float, Request, Mapping[str, Any]]:
    if not isinstance(rec, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "hash_ids" not in rec:
        raise ValueError(
            f"{where}: no hash_ids: every record of a Mooncake-format trace holds "
            f"{list(MOONCAKE_FIELDS)}"
        )
    ts = rec.get("timestamp")
    if "timestamp" not in rec:
        raise ValueError(f"{where}: missing field 'timestamp' (milliseconds)")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts < float("inf"):
        raise ValueError(f"{where}: timestamp must be a number of milliseconds >= 0, got {ts!r}")
    length = _int(rec, "input_length", 1, where)
    output = _int(rec, "output_length", 0, where)
    ids = rec["hash_ids"]
    if not isinstance(ids, list) or any(
        isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < 2**64 for h in ids
    ):
        raise ValueError(f"{where}: hash_ids must be a list of ints in [0, 2**64)")
    need = ceil_div(length, block_tokens)
    if len(ids) != need:
        raise ValueError(
            f"{where}: input_length {length} in blocks of {block_tokens} tokens needs {need} "
            f"hash_ids, the record has {len(ids)} (is the trace's block size "
            f"{block_tokens}? see --trace-block-tokens)"
        )
    request = Request(
        f"line{line}",
        BlockTokens(ids, length, block_tokens),
        response_tokens(line, max(1, output)),
        session=f"line{line}",
        arrival=ts / 1000.0,
    )
    return ts / 1000.0, request, rec


def mooncake_trace(
    records: Iterable[tuple[int, object]],
    *,
    source: str = "trace",
    name: str | None = None,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
) -> Trace:
    """A :class:`Trace` from ``(line number, parsed record)`` pairs of a Mooncake-format file.

    Raises ``ValueError`` naming ``source``, the line and the field at fault.
    """
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise ValueError(f"block_tokens must be an int >= 1, got {block_tokens!r}")
    rows = [_request(rec, line, block_tokens, f"{source}: line {line}") for line, rec in records]
    if not rows:
        raise ValueError(f"{source}: the trace holds no request")
    rows.sort(key=lambda row: row[0])  # stable: equal timestamps keep file order
    return Trace(
        tuple(r for _, r, _ in rows),
        name=name or "mooncake",
        records=tuple(rec for _, _, rec in rows),
        fmt="mooncake",
    )


def load_mooncake(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
) -> Trace:
    """Read a Mooncake-format JSONL file (blank lines are skipped)."""
    return load_trace(path, name=name, trace_format="mooncake", block_tokens=block_tokens)


def sample_prefix_families(trace: Trace, fraction: float, *, seed: int = 0) -> Trace:
    """The requests of a Mooncake-format trace whose first block id falls in a seeded
    random ``fraction`` of the trace's first block ids, in order, with their records.

    Requests that share any prefix share their first block, so a family is kept or dropped
    whole: the sample keeps the trace's prefix sharing (its share of prompt tokens that
    follow a cached prefix) and its time span, at a fraction of the requests and the load.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if trace.fmt != "mooncake" or not all(isinstance(r.prompt, BlockTokens) for r in trace):
        raise ValueError("sampling prefix families needs a Mooncake-format trace")
    firsts = sorted({r.prompt.hash_ids[0] for r in trace})  # type: ignore[attr-defined]
    keep = set(
        random.Random(f"{seed}/families").sample(firsts, max(1, round(fraction * len(firsts))))
    )
    chosen = [
        i
        for i, r in enumerate(trace.requests)
        if r.prompt.hash_ids[0] in keep  # type: ignore[attr-defined]
    ]
    return Trace(
        tuple(trace.requests[i] for i in chosen),
        name=trace.name,
        records=tuple(trace.records[i] for i in chosen) if trace.records else (),
        fmt="mooncake",
    )
