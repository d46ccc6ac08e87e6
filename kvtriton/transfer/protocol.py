"""Control messages of the transfer protocol and their wire encoding.

(Slightly over 600 lines: every message with its bounds checks in one module, so the wire
format is reviewed as one.)

Every control message is one frame on a control connection (:mod:`kvtriton.transfer.control`):
a fixed :data:`HEADER_BYTES` header (magic, protocol version, message kind, payload length)
followed by a compact JSON payload (short keys, no spaces). Peers of one job are trusted
for liveness, not for memory safety: a header announcing more than
:data:`MAX_PAYLOAD_BYTES` is refused before anything is allocated, every field is
type-checked and bounded on decode (:class:`ProtocolError`), and nothing is ever unpickled.

Block ids never travel on the packed path: the receiver names *positions* (per-group token
ranges), the layers and the head sub-range it wants, and both sides derive the same chunk
plan (:func:`kvtriton.transfer.chunking.plan_chunks`). Only the direct intra-host channel
passes a sender's block ids (:class:`Blocks`), which the receiver checks against the mapped
pool before any kernel uses them.

One request, receiver ``R`` asking sender ``S``::

    R -> S  Request   request id, prompt digest (binds the request to its content), model
                      digest, per-group token ranges, state groups, layers and heads per group,
                      chunk size, checksum on/off, remaining deadline
    S -> R  Refuse    (unknown request, spec or prompt mismatch, ranges not held ...) -- or:
    S -> R  Schedule  packed channels: chunks [first, first + count) of the request follow on
                      the data channel of this pair, in order (the receiver posts receives)
    R -> S  Ready     packed CPU channels: those receives are posted (the chunks may go)
    S -> R  Blocks    direct channel: the sender's block ids / slots of the requested ranges
                      and an interprocess event that fires once its KV is written
    S -> R  Done      every chunk was handed to the wire (with per-chunk checksums when on);
                      on the direct channel the Blocks that opens the last chunks stands for
                      it (the receiver pulls: nothing is owed after it) and no Done is sent
    R -> S  Ack       everything arrived intact and was committed: the sender's session ends
                      TRANSFERRED and the receiver's share of the source lease is returned
    R -> S  Cancel    the receiver gave up (cancel, timeout, error)
    S -> R  Abort     the sender gave up mid-request (its own error, timeout, shutdown)
    * -> *  Hello     first message on a connection: who is speaking
    * -> *  PoolHandles  direct channel set-up: a rank's pools as CUDA IPC handles
    * -> *  Bye       this side sends nothing more on this pair

Pure Python (no torch).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kvtriton.ranges import TokenRange

__all__ = [
    "HEADER_BYTES",
    "MAGIC",
    "MAX_PAYLOAD_BYTES",
    "MAX_TOKENS",
    "PROTOCOL_VERSION",
    "Abort",
    "Ack",
    "Blocks",
    "Bye",
    "Cancel",
    "Done",
    "Hello",
    "Message",
    "PoolHandles",
    "ProtocolError",
    "Ready",
    "Refuse",
    "Request",
    "Schedule",
    "decode",
    "decode_header",
    "encode",
    "prompt_digest",
]

MAGIC = 0x4B565452  # "KVTR"
PROTOCOL_VERSION = 2
_HEADER = struct.Struct("<IHHI")  # magic, version, kind, payload length
#: Size of the fixed header that precedes every payload (bytes).
HEADER_BYTES = _HEADER.size
#: Largest payload a peer may announce: a request's ranges are a few hundred bytes; the
#: direct channel's Blocks of a 1M-token request with 16-token blocks is ~350 KB per group.
MAX_PAYLOAD_BYTES = 8 << 20
#: Largest prompt length a peer may name (positions are int64 on the device; this bounds
#: every size derived from a peer's message).
MAX_TOKENS = 1 << 26
#: Largest chunk a receiver may ask for (bytes) and the smallest (one 128-byte line).
MAX_CHUNK_BYTES = 1 << 31
MIN_CHUNK_BYTES = 128
_MAX_ID = 256
_MAX_TEXT = 2048
_MAX_GROUPS = 64
_MAX_LAYERS = 4096


class ProtocolError(ValueError):
    """A malformed, out-of-bounds or unexpected control message."""


def prompt_digest(token_ids: Sequence[int] | np.ndarray) -> str:
    """32 hex digits binding a request to its prompt (blake2b of the int64 token ids)."""
    arr = np.ascontiguousarray(np.asarray(token_ids, dtype=np.int64))
    return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------
# field readers: each checks type and bounds and names the field
# ---------------------------------------------------------------------------------------
def _int(d: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ProtocolError(f"field {key!r} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _str(d: Mapping[str, Any], key: str, limit: int = _MAX_ID) -> str:
    v = d[key]
    if not isinstance(v, str) or len(v) > limit:
        raise ProtocolError(f"field {key!r} must be a string of at most {limit} characters")
    return v


def _bool(d: Mapping[str, Any], key: str) -> bool:
    v = d[key]
    if not isinstance(v, bool):
        raise ProtocolError(f"field {key!r} must be a bool, got {v!r}")
    return v


def _dict(d: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = d[key]
    if not isinstance(v, dict) or len(v) > _MAX_GROUPS:
        raise ProtocolError(f"field {key!r} must be an object of at most {_MAX_GROUPS} groups")
    for name in v:
        if len(name) > _MAX_ID:
            raise ProtocolError(f"field {key!r}: group name too long")
    return v


def _pair(value: object, what: str, hi: int) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or any(isinstance(x, bool) or not isinstance(x, int) for x in value)
        or not 0 <= value[0] <= value[1] <= hi
    ):
        raise ProtocolError(f"{what}: expected [start, end] with 0 <= start <= end <= {hi}")
    return int(value[0]), int(value[1])


def _b64(value: object, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * limit:
        raise ProtocolError(f"{what} must be base64 text of at most {limit} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise ProtocolError(f"{what}: bad base64 ({exc})") from None
    if len(raw) > limit:
        raise ProtocolError(f"{what}: {len(raw)} bytes, at most {limit}")
    return raw


def _int_list(value: object, what: str, limit: int, hi: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > limit:
        raise ProtocolError(f"{what}: expected a list of at most {limit} ints")
    for x in value:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= hi:
            raise ProtocolError(f"{what}: entries must be ints in [0, {hi}]")
    return tuple(value)


# ---------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """First message on a control connection: the speaking rank and what it runs."""

    KIND: ClassVar[int] = 1
    rank: int
    model_digest: str
    channel: str

    def to_json(self) -> dict[str, Any]:
        return {"r": self.rank, "d": self.model_digest, "c": self.channel}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Hello:
        return cls(_int(d, "r", 0, 1 << 20), _str(d, "d"), _str(d, "c"))


@dataclass(frozen=True)
class Request:
    """The receiver asks one sender rank for (part of) one request's KV.

    Attributes:
        request_id: unique among the receiver's live requests.
        prompt_digest: :func:`prompt_digest` of the prompt's token ids; the sender refuses a
            request whose digest differs from the source's (a reused id cannot commit
            another prompt's KV).
        model_digest: ``KVCacheSpec.model_digest()`` of the receiver's model.
        num_tokens: prompt length ``P`` (positions ``[0, P)``).
        tokens: half-open positions to move per attention group (non-empty ranges only).
        states: state groups whose per-request state moves.
        layers: global layer ids wanted per group (the topology's sender/receiver slice).
        heads: global head range ``[start, end)`` wanted per group.
        chunk_bytes: target bytes per data chunk.
        checksum: whether the sender sends a checksum per chunk.
        deadline_ms: milliseconds the receiver will still wait (the sender never works on a
            request past it).
        mode: ``"per_group"`` or ``"single_boundary"`` (informational).
        by_layer: layer-major chunks (``plan_chunks(by_layer=True)``): each chunk can move
            as soon as its layer is written (layer-wise streaming).
    """

    KIND: ClassVar[int] = 2
    request_id: str
    prompt_digest: str
    model_digest: str
    num_tokens: int
    tokens: Mapping[str, TokenRange]
    states: tuple[str, ...]
    layers: Mapping[str, tuple[int, ...]]
    heads: Mapping[str, tuple[int, int]]
    chunk_bytes: int
    checksum: bool = False
    deadline_ms: int = 60_000
    mode: str = "per_group"
    by_layer: bool = False

    @property
    def groups(self) -> tuple[str, ...]:
        """Every group this request touches (attention groups with tokens, then states)."""
        return (*self.tokens, *self.states)

    def to_json(self) -> dict[str, Any]:
        return {
            "r": self.request_id,
            "p": self.prompt_digest,
            "d": self.model_digest,
            "P": self.num_tokens,
            "t": {g: [r.start, r.end] for g, r in self.tokens.items()},
            "s": list(self.states),
            "l": {g: list(v) for g, v in self.layers.items()},
            "h": {g: list(v) for g, v in self.heads.items()},
            "c": self.chunk_bytes,
            "k": self.checksum,
            "e": self.deadline_ms,
            "m": self.mode,
            "y": self.by_layer,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Request:
        num_tokens = _int(d, "P", 1, MAX_TOKENS)
        tokens = {}
        for g, v in _dict(d, "t").items():
            start, end = _pair(v, f"tokens[{g!r}]", num_tokens)
            if start == end:
                raise ProtocolError(f"tokens[{g!r}]: empty ranges are left out")
            tokens[g] = TokenRange(start, end)
        states = d["s"]
        if not isinstance(states, list) or len(states) > _MAX_GROUPS:
            raise ProtocolError("field 's' must be a list of state group names")
        for s in states:
            if not isinstance(s, str) or len(s) > _MAX_ID:
                raise ProtocolError("field 's': state group names must be short strings")
        layers = {
            g: _int_list(v, f"layers[{g!r}]", _MAX_LAYERS, 1 << 20)
            for g, v in _dict(d, "l").items()
        }
        heads = {g: _pair(v, f"heads[{g!r}]", 1 << 20) for g, v in _dict(d, "h").items()}
        mode = _str(d, "m", 32)
        return cls(
            request_id=_str(d, "r"),
            prompt_digest=_str(d, "p", 64),
            model_digest=_str(d, "d", 64),
            num_tokens=num_tokens,
            tokens=tokens,
            states=tuple(states),
            layers=layers,
            heads=heads,
            chunk_bytes=_int(d, "c", MIN_CHUNK_BYTES, MAX_CHUNK_BYTES),
            checksum=_bool(d, "k"),
            deadline_ms=_int(d, "e", 0, 1 << 40),
            mode=mode,
            by_layer=_bool(d, "y"),
        )


@dataclass(frozen=True)
class Refuse:
    """The sender will not serve the request; ``reason`` says what was wrong."""

    KIND: ClassVar[int] = 3
    request_id: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"r": self.request_id, "e": self.reason[:_MAX_TEXT]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Refuse:
        return cls(_str(d, "r"), _str(d, "e", _MAX_TEXT))


@dataclass(frozen=True)
class Schedule:
    """Chunks ``[first, first + count)`` of the request follow on the data channel of this
    pair, in order (packed channels). The receiver posts receives for them from its own
    chunk plan: sizes never come from the peer."""

    KIND: ClassVar[int] = 4
    request_id: str
    first: int
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"r": self.request_id, "f": self.first, "n": self.count}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Schedule:
        return cls(_str(d, "r"), _int(d, "f", 0, 1 << 32), _int(d, "n", 1, 1 << 32))


@dataclass(frozen=True)
class Ready:
    """The receiver posted its receives for chunks ``[first, first + count)`` of the request
    (packed CPU channels: gloo stalls for milliseconds on bytes that arrive before their
    receive is posted, so the sender holds announced chunks until this arrives)."""

    KIND: ClassVar[int] = 11
    request_id: str
    first: int
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"r": self.request_id, "f": self.first, "n": self.count}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Ready:
        return cls(_str(d, "r"), _int(d, "f", 0, 1 << 32), _int(d, "n", 1, 1 << 32))


@dataclass(frozen=True)
class Blocks:
    """The sender's blocks for the requested ranges (direct channel): per attention group the
    physical ids of the blocks the range touches, in logical order, and per state group the
    slot (in the request's first Blocks only), and which chunks may be read now with the
    event that fires once their KV is written (a streamed source sends one Blocks per run of
    ready layers). The receiver checks every id against the mapped pool before use. The
    Blocks that opens the request's last chunks is also its Done (none is sent)."""

    KIND: ClassVar[int] = 5
    request_id: str
    block_ids: Mapping[str, np.ndarray]
    slots: Mapping[str, int] = field(default_factory=dict)
    event: bytes = b""  # an interprocess CUDA event: these chunks' KV is written when it fires
    first: int = 0  # chunks [first, first + count) may be read now (block ids: first only)
    count: int = 0

    def to_json(self) -> dict[str, Any]:
        ids = {
            g: base64.b64encode(np.ascontiguousarray(v, dtype="<i4").tobytes()).decode()
            for g, v in self.block_ids.items()
        }
        out = {"r": self.request_id, "b": ids, "s": dict(self.slots), "f": self.first,
               "n": self.count}  # fmt: skip
        if self.event:
            out["e"] = base64.b64encode(self.event).decode()
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Blocks:
        ids: dict[str, np.ndarray] = {}
        for g, v in _dict(d, "b").items():
            if not isinstance(v, str):
                raise ProtocolError(f"blocks[{g!r}] must be base64 text")
            try:
                raw = base64.b64decode(v, validate=True)
            except ValueError as exc:
                raise ProtocolError(f"blocks[{g!r}]: bad base64 ({exc})") from None
            if len(raw) % 4:
                raise ProtocolError(f"blocks[{g!r}]: {len(raw)} bytes is not a multiple of 4")
            ids[g] = np.frombuffer(raw, dtype="<i4").astype(np.int32)
        slots = {g: _int({"v": v}, "v", 0, 1 << 31) for g, v in _dict(d, "s").items()}
        return cls(
            _str(d, "r"), ids, slots, _b64(d.get("e", ""), "event", 128),
            _int(d, "f", 0, 1 << 32), _int(d, "n", 0, 1 << 32),
        )  # fmt: skip

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Blocks)
            and self.request_id == other.request_id
            and dict(self.slots) == dict(other.slots)
            and self.event == other.event
            and (self.first, self.count) == (other.first, other.count)
            and self.block_ids.keys() == other.block_ids.keys()
            and all(np.array_equal(v, other.block_ids[g]) for g, v in self.block_ids.items())
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class PoolHandles:
    """The direct channel's set-up: a rank's pools as CUDA IPC handles and the metadata to
    view them (``{group: fields}``, see :mod:`kvtriton.transfer.channels.ipc`). Every field
    is type-checked here; the receiving rank checks shapes against its topology and the
    view against the real size of the mapped allocation before any kernel touches it."""

    KIND: ClassVar[int] = 12
    rank: int
    pools: Mapping[str, Mapping[str, Any]]

    def to_json(self) -> dict[str, Any]:
        out = {}
        for g, f in self.pools.items():
            out[g] = {
                k: (base64.b64encode(v).decode() if isinstance(v, bytes) else v)
                for k, v in f.items()
            }
        return {"r": self.rank, "p": out}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PoolHandles:
        pools: dict[str, dict[str, Any]] = {}
        for g, f in _dict(d, "p").items():
            if not isinstance(f, dict):
                raise ProtocolError(f"pools[{g!r}] must be an object")
            pools[g] = {
                "device": _int(f, "device", 0, 1 << 10),
                "handle": _b64(f["handle"], "handle", 256),
                "size": _int(f, "size", 1, 1 << 50),
                "offset": _int(f, "offset", 0, 1 << 50),
                "ref_handle": _b64(f["ref_handle"], "ref_handle", 1024),
                "ref_offset": _int(f, "ref_offset", 0, 1 << 40),
                "event": _b64(f["event"], "event", 256),
                "event_sync": _bool(f, "event_sync"),
                "dtype": _str(f, "dtype", 32),
                "shape": _int_list(f["shape"], "shape", 8, 1 << 40),
                "stride": _int_list(f["stride"], "stride", 8, 1 << 50),
                "storage_offset": _int(f, "storage_offset", 0, 1 << 50),
            }
        return cls(_int(d, "r", 0, 1 << 20), pools)


@dataclass(frozen=True)
class Done:
    """Every chunk of the request was handed to the wire; ``checksums[k]`` of chunk ``k``
    when checksums are on."""

    KIND: ClassVar[int] = 6
    request_id: str
    num_chunks: int
    checksums: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"r": self.request_id, "n": self.num_chunks, "k": [str(x) for x in self.checksums]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Done:
        n = _int(d, "n", 0, 1 << 32)
        sums = d["k"]
        if not isinstance(sums, list) or len(sums) > n:
            raise ProtocolError("field 'k' must be a list of at most num_chunks checksums")
        try:
            values = tuple(int(x) for x in sums if isinstance(x, str) and len(x) <= 20)
        except ValueError:
            raise ProtocolError("field 'k': checksums must be decimal strings") from None
        if len(values) != len(sums) or any(not 0 <= v < 1 << 64 for v in values):
            raise ProtocolError("field 'k': checksums must be 64-bit unsigned decimal strings")
        return cls(_str(d, "r"), n, values)


@dataclass(frozen=True)
class Ack:
    """The receiver got every chunk of the request intact and committed it."""

    KIND: ClassVar[int] = 7
    request_id: str

    def to_json(self) -> dict[str, Any]:
        return {"r": self.request_id}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Ack:
        return cls(_str(d, "r"))


@dataclass(frozen=True)
class Cancel:
    """The receiver abandons the request (``error``: it failed rather than being cancelled)."""

    KIND: ClassVar[int] = 8
    request_id: str
    reason: str
    error: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"r": self.request_id, "e": self.reason[:_MAX_TEXT], "x": self.error}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Cancel:
        return cls(_str(d, "r"), _str(d, "e", _MAX_TEXT), _bool(d, "x"))


@dataclass(frozen=True)
class Abort:
    """The sender abandons a request it had accepted (``cancelled``: by a shutdown, not an
    error); no further chunk of it follows beyond those already scheduled."""

    KIND: ClassVar[int] = 9
    request_id: str
    reason: str
    cancelled: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"r": self.request_id, "e": self.reason[:_MAX_TEXT], "x": self.cancelled}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Abort:
        return cls(_str(d, "r"), _str(d, "e", _MAX_TEXT), _bool(d, "x"))


@dataclass(frozen=True)
class Bye:
    """This side sends nothing more on this pair."""

    KIND: ClassVar[int] = 10
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"n": self.note[:_MAX_TEXT]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Bye:
        return cls(_str(d, "n", _MAX_TEXT))


Message = (
    Hello
    | Request
    | Refuse
    | Schedule
    | Ready
    | Blocks
    | PoolHandles
    | Done
    | Ack
    | Cancel
    | Abort
    | Bye
)
_MESSAGES = (Hello, Request, Refuse, Schedule, Ready, Blocks, PoolHandles, Done, Ack, Cancel,
             Abort, Bye)  # fmt: skip
_KINDS: dict[int, Any] = {c.KIND: c for c in _MESSAGES}


def encode(message: Message) -> bytes:
    """One frame: header + payload."""
    payload = json.dumps(message.to_json(), separators=(",", ":")).encode()
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            f"{type(message).__name__} payload of {len(payload)} bytes exceeds the "
            f"{MAX_PAYLOAD_BYTES}-byte limit"
        )
    return _HEADER.pack(MAGIC, PROTOCOL_VERSION, message.KIND, len(payload)) + payload


def decode_header(header: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(kind, payload length)`` from a header; ``ProtocolError`` if it is not one of ours
    or announces more than :data:`MAX_PAYLOAD_BYTES`."""
    if len(header) != HEADER_BYTES:
        raise ProtocolError(f"header must be {HEADER_BYTES} bytes, got {len(header)}")
    magic, version, kind, length = _HEADER.unpack(bytes(header))
    if magic != MAGIC:
        raise ProtocolError(
            f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}): not a kvtriton control "
            f"message, or the connection lost sync"
        )
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {PROTOCOL_VERSION}")
    if kind not in _KINDS:
        raise ProtocolError(f"unknown message kind {kind}")
    if length > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            f"a {_KINDS[kind].__name__} of {length} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte "
            f"limit: refused before allocating"
        )
    return kind, length


def decode(kind: int, payload: bytes | bytearray | memoryview) -> Message:
    """The message of ``kind`` from its payload bytes (``ProtocolError`` if malformed)."""
    cls = _KINDS[kind]
    try:
        data = json.loads(bytes(payload).decode())
        if not isinstance(data, dict):
            raise ProtocolError(f"malformed {cls.__name__} message: not an object")
        return cls.from_json(data)  # type: ignore[no-any-return]
    except ProtocolError as exc:
        raise ProtocolError(f"malformed {cls.__name__} message: {exc}") from None
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError(f"malformed {cls.__name__} message: {exc!r}") from None


def roundtrip(message: Message) -> Message:
    """Encode then decode (tests and debugging)."""
    frame = encode(message)
    kind, length = decode_header(frame[:HEADER_BYTES])
    if length != len(frame) - HEADER_BYTES:
        raise ProtocolError(f"payload length {len(frame) - HEADER_BYTES} != header's {length}")
    return decode(kind, frame[HEADER_BYTES:])


def split_frames(buffer: bytearray) -> Iterable[Message]:
    """Decode and remove every complete frame at the front of ``buffer`` (a connection's
    receive buffer); a partial frame stays. Raises ``ProtocolError`` on a bad frame."""
    pos = 0
    try:
        while len(buffer) - pos >= HEADER_BYTES:
            kind, length = decode_header(buffer[pos : pos + HEADER_BYTES])
            end = pos + HEADER_BYTES + length
            if len(buffer) < end:
                break
            yield decode(kind, buffer[pos + HEADER_BYTES : end])
            pos = end
    finally:
        del buffer[:pos]
