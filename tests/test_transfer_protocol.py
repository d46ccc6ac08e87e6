"""Control messages and the socket control plane: compact encoding, bounds checked before
anything is allocated, malformed input refused, nothing unpickled."""

from __future__ import annotations

import socket
import struct
import time

import numpy as np
import pytest

from kvtriton.ranges import TokenRange
from kvtriton.transfer import protocol as P
from kvtriton.transfer.control import Lost, SocketControl

REQ = P.Request(
    request_id="conv-7/turn-2",
    prompt_digest=P.prompt_digest([1, 2, 3]),
    model_digest="cca50d2654be55bc",
    num_tokens=61,
    tokens={"full": TokenRange(40, 61), "sliding8": TokenRange(54, 61)},
    states=("state",),
    layers={"full": (1, 4), "sliding8": (0, 2, 5), "state": (3,)},
    heads={"full": (0, 1), "sliding8": (0, 1), "state": (0, 1)},
    chunk_bytes=8192,
    checksum=True,
    deadline_ms=1500,
    mode="single_boundary",
)


@pytest.mark.parametrize(
    "msg",
    [
        REQ,
        P.Hello(3, "abc", "gloo"),
        P.Refuse("r", "spec mismatch: receiver model digest a, sender holds b"),
        P.Schedule("r", 2, 5),
        P.Ready("r", 2, 5),
        P.Blocks("r", {"full": np.array([3, 1, 2**31 - 1], dtype=np.int32)}, {"state": 4}),
        P.Done("r", 3, (1, 2**64 - 1, 0)),
        P.Cancel("r", "timed out", True),
        P.Abort("r", "sender timed out", cancelled=True),
        P.Ack("r"),
        P.Bye("done"),
    ],
)
def test_round_trip(msg: P.Message) -> None:
    assert P.roundtrip(msg) == msg


def test_request_is_compact() -> None:
    frame = P.encode(REQ)
    assert P.HEADER_BYTES == 12
    assert len(frame) < 500
    assert b" " not in frame.replace(b"conv-7/turn-2", b"")


def test_prompt_digest_binds_content() -> None:
    assert P.prompt_digest([1, 2, 3]) == P.prompt_digest(np.array([1, 2, 3]))
    assert P.prompt_digest([1, 2, 3]) != P.prompt_digest([1, 2, 4])
    assert P.prompt_digest([1, 2, 3]) != P.prompt_digest([1, 2, 3, 0])
    assert len(P.prompt_digest([])) == 32


def _header(kind: int, length: int, magic: int = P.MAGIC, version: int = P.PROTOCOL_VERSION):
    return struct.pack("<IHHI", magic, version, kind, length)


def test_bad_headers_are_refused_before_allocating() -> None:
    with pytest.raises(P.ProtocolError, match="magic"):
        P.decode_header(b"\0" * P.HEADER_BYTES)
    with pytest.raises(P.ProtocolError, match="12 bytes"):
        P.decode_header(b"\0" * 11)
    with pytest.raises(P.ProtocolError, match="protocol version 99"):
        P.decode_header(_header(P.Ack.KIND, 3, version=99))
    with pytest.raises(P.ProtocolError, match="unknown message kind 99"):
        P.decode_header(_header(99, 3))
    # a length of 0xFFFFFFF0 is refused from the header alone
    with pytest.raises(P.ProtocolError, match="refused before allocating"):
        P.decode_header(_header(P.Request.KIND, 0xFFFFFFF0))


@pytest.mark.parametrize(
    "kind,payload,match",
    [
        (P.Ack.KIND, b'{"x":1}', "malformed Ack"),
        (P.Request.KIND, b"not json", "malformed Request"),
        (P.Request.KIND, b"[1, 2]", "not an object"),
        (P.Schedule.KIND, b'{"r":"a","f":0,"n":0}', "'n' must be an int in"),
        (P.Schedule.KIND, b'{"r":"a","f":-1,"n":1}', "'f' must be an int in"),
        (P.Done.KIND, b'{"r":"a","n":2,"k":["1","2","3"]}', "at most num_chunks"),
        (P.Done.KIND, b'{"r":"a","n":1,"k":["18446744073709551616"]}', "64-bit"),
        (P.Cancel.KIND, b'{"r":"a","e":"x","x":1}', "must be a bool"),
        (P.Blocks.KIND, b'{"r":"a","b":{"g":"AAA"},"s":{}}', "bad base64|multiple of 4"),
        (P.Ready.KIND, b'{"r":"' + b"a" * 300 + b'","f":0,"n":1}', "at most 256 characters"),
    ],
)
def test_malformed_payloads_name_the_problem(kind: int, payload: bytes, match: str) -> None:
    with pytest.raises(P.ProtocolError, match=match):
        P.decode(kind, payload)


def _request_json(**over: object) -> bytes:
    import json

    d = REQ.to_json()
    d.update(over)
    return json.dumps(d).encode()


@pytest.mark.parametrize(
    "over,match",
    [
        ({"P": 2**40}, "'P' must be an int in"),
        ({"P": 0}, "'P' must be an int in"),
        ({"t": {"full": [0, 10**9]}}, r"tokens\['full'\]"),
        ({"t": {"full": [5, 5]}}, "empty ranges"),
        ({"t": {"full": [7, 3]}}, r"tokens\['full'\]"),
        ({"c": 1}, "'c' must be an int in"),
        ({"c": 2**40}, "'c' must be an int in"),
        ({"h": {"full": [0, 2**40]}}, r"heads\['full'\]"),
        ({"l": {"full": list(range(5000))}}, "at most 4096"),
        ({"s": ["x"] * 100}, "state group names"),
        ({"k": 1}, "must be a bool"),
    ],
)
def test_request_fields_are_bounded(over: dict[str, object], match: str) -> None:
    with pytest.raises(P.ProtocolError, match=match):
        P.decode(P.Request.KIND, _request_json(**over))


def test_split_frames_keeps_partial_frames() -> None:
    a, b = P.encode(P.Ack("x")), P.encode(P.Bye("y"))
    buf = bytearray(a + b[:5])
    assert list(P.split_frames(buf)) == [P.Ack("x")]
    assert bytes(buf) == b[:5]
    buf += b[5:]
    assert list(P.split_frames(buf)) == [P.Bye("y")]
    assert not buf


def test_checksum_catches_every_single_byte_flip() -> None:
    import torch

    from kvtriton.transfer.checksum import checksum

    base = torch.arange(37, dtype=torch.int64).to(torch.uint8)
    ref = checksum(base)
    for i in range(base.numel()):
        flipped = base.clone()
        flipped[i] ^= 0x01
        assert checksum(flipped) != ref, i


# ---------------------------------------------------------------------------------------
# the socket control plane (two endpoints in one process)
# ---------------------------------------------------------------------------------------
def _pair() -> tuple[SocketControl, SocketControl]:
    import threading

    lis = [socket.socket(), socket.socket()]
    for s in lis:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
    addrs = {r: ("127.0.0.1", s.getsockname()[1]) for r, s in enumerate(lis)}
    out: dict[int, SocketControl] = {}

    def build(r: int) -> None:
        out[r] = SocketControl.from_addresses(
            r, lis[r], addrs, [1 - r], model_digest="d", channel="gloo", timeout_s=10
        )

    t = threading.Thread(target=build, args=(1,))
    t.start()
    build(0)
    t.join()
    return out[0], out[1]


def _poll_until(ctl: SocketControl, n: int, timeout: float = 5.0) -> list:
    got: list = []
    end = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        got += ctl.poll(0.05)
    return got


def test_socket_control_delivers_in_order_and_reports_a_closed_peer() -> None:
    a, b = _pair()
    for i in range(50):
        a.send(1, P.Schedule("r", i, 1))
    got = _poll_until(b, 50)
    assert [m.first for _, m in got] == list(range(50))
    b.send(0, P.Bye("bye"))
    b.close()
    got = _poll_until(a, 2)
    assert got[0] == (1, P.Bye("bye"))  # what was sent before the close still arrives
    assert isinstance(got[1][1], Lost) and 1 in a.lost
    a.close()


def test_a_huge_announced_length_drops_the_peer_without_allocating() -> None:
    a, b = _pair()
    conn = a._conns[1].sock
    conn.setblocking(True)
    conn.sendall(_header(P.Request.KIND, 0xFFFFFFF0) + b"x" * 64)
    got = _poll_until(b, 1)
    assert isinstance(got[0][1], Lost) and "refused before allocating" in got[0][1].reason
    assert len(b._conns[0].inbox) < 1024
    a.close()
    b.close()


def test_wake_interrupts_a_blocking_poll() -> None:
    import threading

    a, b = _pair()
    threading.Timer(0.05, a.wake).start()
    t0 = time.monotonic()
    assert a.poll(5.0) == []
    assert time.monotonic() - t0 < 2.0
    a.close()
    b.close()


def test_no_wake_is_lost_when_wakes_race_the_drain() -> None:
    """Wakes from another thread that land while the loop drains the wake pipe must still
    end the next poll at once (clearing the flag before draining once swallowed such a wake;
    the flag then stayed set and every later poll slept its whole timeout)."""
    import threading

    a, b = _pair()
    total = 100_000
    posted = [0]

    def waker() -> None:
        for _ in range(total):
            posted[0] += 1
            a.wake()

    t = threading.Thread(target=waker)
    t.start()
    seen, slowest = 0, 0.0
    while seen < total:
        t0 = time.monotonic()
        if posted[0] == seen:
            a.poll(3.0)  # a lost wake sleeps the whole 3 s here
        slowest = max(slowest, time.monotonic() - t0)
        seen = posted[0]
    t.join()
    a.close()
    b.close()
    assert slowest < 1.0, slowest
