"""Control messages of the transfer protocol and their compact wire encoding.

Every control message travels over a gloo process group as uint8 tensors: a fixed
:data:`HEADER_BYTES` header (magic, protocol version, message kind, payload length) followed
by the payload, compact JSON (short keys, no spaces); the transport packs one or more
encoded messages into one fixed-size frame (``transport.CTRL_FRAME_BYTES``), with a second
gloo message only for what does not fit. Block ids never appear in a message: the
receiver names *positions* (per-group token ranges), the layers and the head sub-range it
wants, and both sides derive the packed layout from :func:`kvtriton.layout.packed_layout`.

One request, receiver ``R`` asking sender ``S`` (all messages on the control group)::

    R -> S  Request   request id, model digest, per-group token ranges, state groups,
                      layers and heads per group, chunk size, checksum on/off
    S -> R  Refuse    (spec mismatch, unknown request, ranges not held ...) -- or:
    S -> R  Schedule  frames that follow on the data channel, in order; a frame holds one
                      chunk of one request, or whole small requests batched together
    S -> R  Done      all chunks sent, with per-chunk checksums (sent only when checksums
                      are on, or when nothing moves from this sender)
    R -> S  Ack       everything arrived intact and was committed (the sender's session
                      ends TRANSFERRED only now)
    R -> S  Cancel    the receiver gave up (cancel, timeout, error); S stops scheduling
    S -> R  Abort     the sender gave up mid-request (its own error or timeout)
    * -> *  Bye       this side sends nothing more on this pair (ends the peer's listener)

Pure Python: encoding to tensors lives in :mod:`kvtriton.transfer.transport`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvtriton.ranges import TokenRange

__all__ = [
    "HEADER_BYTES",
    "MAGIC",
    "PROTOCOL_VERSION",
    "Abort",
    "Ack",
    "Bye",
    "Cancel",
    "Done",
    "Frame",
    "FramePart",
    "Message",
    "ProtocolError",
    "Refuse",
    "Request",
    "Schedule",
    "decode",
    "decode_header",
    "encode",
]

MAGIC = 0x4B565452  # "KVTR"
PROTOCOL_VERSION = 1
_HEADER = struct.Struct("<IHHQ")  # magic, version, kind, payload length
#: Size of the fixed header tensor that precedes every payload (bytes).
HEADER_BYTES = _HEADER.size


class ProtocolError(ValueError):
    """A malformed or unexpected control message."""


def _range_out(r: TokenRange) -> list[int]:
    return [r.start, r.end]


def _range_in(value: object, what: str) -> TokenRange:
    if not isinstance(value, list) or len(value) != 2:
        raise ProtocolError(f"{what}: expected [start, end], got {value!r}")
    return TokenRange(int(value[0]), int(value[1]))


@dataclass(frozen=True)
class Request:
    """The receiver asks one sender rank for (part of) one request's KV.

    Attributes:
        request_id: the request's id (unique among this receiver's live requests).
        model_digest: ``KVCacheSpec.model_digest()`` of the receiver; the sender refuses a
            request whose digest differs from its own.
        num_tokens: prompt length ``P`` (positions ``[0, P)``).
        tokens: half-open positions to move per attention group (groups left out move none).
        states: state groups whose per-request state moves.
        layers: global layer ids wanted per group (exactly the sender/receiver intersection).
        heads: global head range ``[start, end)`` wanted per group (``state_shape[0]`` range
            for state groups).
        chunk_bytes: target bytes per data chunk (the sender splits by tokens; >= 1 token).
        checksum: whether the sender sends a checksum per chunk.
        mode: ``"per_group"`` or ``"single_boundary"`` (informational, for reports).
        sizes: pre-posted mode: the receiver already posted one receive per chunk of these
            byte sizes; the sender must send exactly these chunks, in request order, with
            dummy bytes if it refuses or the request ends early (empty = Schedule mode).
    """

    KIND: ClassVar[int] = 1
    request_id: str
    model_digest: str
    num_tokens: int
    tokens: Mapping[str, TokenRange]
    states: tuple[str, ...]
    layers: Mapping[str, tuple[int, ...]]
    heads: Mapping[str, tuple[int, int]]
    chunk_bytes: int
    checksum: bool = False
    mode: str = "per_group"
    sizes: tuple[int, ...] = ()

    def groups(self) -> tuple[str, ...]:
        """Every group this request touches (attention groups with tokens, then states)."""
        return tuple([g for g, r in self.tokens.items() if not r.is_empty] + list(self.states))

    def to_json(self) -> dict[str, Any]:
        return {
            "r": self.request_id,
            "d": self.model_digest,
            "P": self.num_tokens,
            "t": {g: _range_out(r) for g, r in self.tokens.items()},
            "s": list(self.states),
            "l": {g: list(v) for g, v in self.layers.items()},
            "h": {g: list(v) for g, v in self.heads.items()},
            "c": self.chunk_bytes,
            "k": int(self.checksum),
            "m": self.mode,
            **({"z": list(self.sizes)} if self.sizes else {}),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Request:
        return cls(
            request_id=str(d["r"]),
            model_digest=str(d["d"]),
            num_tokens=int(d["P"]),
            tokens={g: _range_in(v, f"tokens[{g}]") for g, v in d["t"].items()},
            states=tuple(d["s"]),
            layers={g: tuple(int(x) for x in v) for g, v in d["l"].items()},
            heads={g: (int(v[0]), int(v[1])) for g, v in d["h"].items()},
            chunk_bytes=int(d["c"]),
            checksum=bool(d["k"]),
            mode=str(d.get("m", "per_group")),
            sizes=tuple(int(x) for x in d.get("z", ())),
        )


@dataclass(frozen=True)
class Refuse:
    """The sender will not serve the request; ``reason`` says what was wrong."""

    KIND: ClassVar[int] = 2
    request_id: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"r": self.request_id, "e": self.reason}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Refuse:
        return cls(str(d["r"]), str(d["e"]))


@dataclass(frozen=True)
class FramePart:
    """One chunk of one request inside a data frame: ``nbytes`` bytes at byte ``offset``."""

    request_id: str
    chunk: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Frame:
    """One data message on the data channel: ``nbytes`` bytes holding ``parts``."""

    nbytes: int
    parts: tuple[FramePart, ...]


@dataclass(frozen=True)
class Schedule:
    """The frames that follow on the data channel of this (sender, receiver) pair, in order."""

    KIND: ClassVar[int] = 3
    frames: tuple[Frame, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "f": [
                [f.nbytes, [[p.request_id, p.chunk, p.offset, p.nbytes] for p in f.parts]]
                for f in self.frames
            ]
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Schedule:
        frames = []
        for nbytes, parts in d["f"]:
            frames.append(
                Frame(
                    int(nbytes),
                    tuple(FramePart(str(r), int(k), int(o), int(n)) for r, k, o, n in parts),
                )
            )
        return cls(tuple(frames))


@dataclass(frozen=True)
class Done:
    """Every chunk of the request was sent; ``checksums[k]`` of chunk ``k`` when enabled."""

    KIND: ClassVar[int] = 4
    request_id: str
    num_chunks: int
    checksums: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"r": self.request_id, "n": self.num_chunks, "k": list(self.checksums)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Done:
        return cls(str(d["r"]), int(d["n"]), tuple(int(x) for x in d["k"]))


@dataclass(frozen=True)
class Cancel:
    """The receiver abandons the request (``reason``: cancelled, timed out, failed ...)."""

    KIND: ClassVar[int] = 5
    request_id: str
    reason: str
    error: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"r": self.request_id, "e": self.reason, "x": int(self.error)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Cancel:
        return cls(str(d["r"]), str(d["e"]), bool(d.get("x", 0)))


@dataclass(frozen=True)
class Abort:
    """The sender abandons a request it had accepted; no further frame of it follows."""

    KIND: ClassVar[int] = 6
    request_id: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"r": self.request_id, "e": self.reason}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Abort:
        return cls(str(d["r"]), str(d["e"]))


@dataclass(frozen=True)
class Bye:
    """This side sends nothing more on this pair."""

    KIND: ClassVar[int] = 7
    note: str = field(default="")

    def to_json(self) -> dict[str, Any]:
        return {"n": self.note}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Bye:
        return cls(str(d.get("n", "")))


@dataclass(frozen=True)
class Ack:
    """The receiver got every chunk of the request intact and committed it."""

    KIND: ClassVar[int] = 8
    request_id: str

    def to_json(self) -> dict[str, Any]:
        return {"r": self.request_id}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Ack:
        return cls(str(d["r"]))


Message = Request | Refuse | Schedule | Done | Cancel | Abort | Bye | Ack
_KINDS: dict[int, Any] = {
    c.KIND: c for c in (Request, Refuse, Schedule, Done, Cancel, Abort, Bye, Ack)
}


def encode(message: Message) -> tuple[bytes, bytes]:
    """``(header, payload)`` bytes of one message."""
    payload = json.dumps(message.to_json(), separators=(",", ":")).encode()
    header = _HEADER.pack(MAGIC, PROTOCOL_VERSION, message.KIND, len(payload))
    return header, payload


def decode_header(header: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(kind, payload length)`` from a header; ``ProtocolError`` if it is not one of ours."""
    if len(header) != HEADER_BYTES:
        raise ProtocolError(f"header must be {HEADER_BYTES} bytes, got {len(header)}")
    magic, version, kind, length = _HEADER.unpack(bytes(header))
    if magic != MAGIC:
        raise ProtocolError(
            f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}): not a kvtriton "
            f"control message, or the channel lost sync"
        )
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {PROTOCOL_VERSION}")
    if kind not in _KINDS:
        raise ProtocolError(f"unknown message kind {kind}")
    return kind, length


def decode(kind: int, payload: bytes | bytearray | memoryview) -> Message:
    """The message of ``kind`` from its payload bytes."""
    try:
        data = json.loads(bytes(payload).decode())
        return _KINDS[kind].from_json(data)  # type: ignore[no-any-return]
    except ProtocolError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"malformed {_KINDS[kind].__name__} message: {exc}") from exc


def roundtrip(message: Message) -> Message:
    """Encode then decode (tests and debugging)."""
    header, payload = encode(message)
    kind, length = decode_header(header)
    if length != len(payload):
        raise ProtocolError(f"payload length {len(payload)} != header's {length}")
    return decode(kind, payload)


def validate_request_shape(req: Request, group_names: Sequence[str]) -> None:
    """Group names in a request must belong to the spec (``ProtocolError`` otherwise)."""
    known = set(group_names)
    named = set(req.tokens) | set(req.states) | set(req.layers) | set(req.heads)
    unknown = sorted(named - known)
    if unknown:
        raise ProtocolError(
            f"request {req.request_id!r} names unknown groups {unknown}; "
            f"this spec has {list(group_names)}"
        )
