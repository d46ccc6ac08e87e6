"""Control messages: compact encoding round trips, and malformed input is refused."""

from __future__ import annotations

import pytest

from kvtriton.ranges import TokenRange
from kvtriton.transfer import protocol as P

REQ = P.Request(
    request_id="conv-7/turn-2",
    model_digest="cca50d2654be55bc",
    num_tokens=61,
    tokens={"full": TokenRange(40, 61), "sliding8": TokenRange(54, 61)},
    states=("state",),
    layers={"full": (1, 4), "sliding8": (0, 2, 5), "state": (3,)},
    heads={"full": (0, 1), "sliding8": (0, 1), "state": (0, 1)},
    chunk_bytes=8192,
    checksum=True,
    mode="single_boundary",
)


@pytest.mark.parametrize(
    "msg",
    [
        REQ,
        P.Refuse("r", "spec mismatch: receiver model digest a, sender holds b"),
        P.Schedule(
            (
                P.Frame(4096, (P.FramePart("a", 0, 0, 1000), P.FramePart("b", 3, 1024, 3072))),
                P.Frame(7, (P.FramePart("c", 1, 0, 7),)),
            )
        ),
        P.Done("r", 3, (1, 2**64 - 1, 0)),
        P.Cancel("r", "timed out", True),
        P.Abort("r", "sender timed out"),
        P.Ack("r"),
        P.Bye("done"),
    ],
)
def test_round_trip(msg: P.Message) -> None:
    assert P.roundtrip(msg) == msg


def test_request_is_compact() -> None:
    header, payload = P.encode(REQ)
    assert len(header) == P.HEADER_BYTES == 16
    assert len(payload) < 400  # fits one control frame
    assert b" " not in payload.replace(b"conv-7/turn-2", b"")


def test_bad_headers_and_payloads() -> None:
    header, _payload = P.encode(P.Ack("x"))
    with pytest.raises(P.ProtocolError, match="magic"):
        P.decode_header(b"\0" * P.HEADER_BYTES)
    with pytest.raises(P.ProtocolError, match="16 bytes"):
        P.decode_header(header[:-1])
    bad_version = bytearray(header)
    bad_version[4] = 99
    with pytest.raises(P.ProtocolError, match="protocol version 99"):
        P.decode_header(bytes(bad_version))
    kind, _ = P.decode_header(header)
    with pytest.raises(P.ProtocolError, match="malformed Ack"):
        P.decode(kind, b'{"x":1}')
    with pytest.raises(P.ProtocolError, match="malformed Request"):
        P.decode(P.Request.KIND, b"not json")


def test_unknown_groups_in_a_request_are_named() -> None:
    with pytest.raises(P.ProtocolError, match=r"unknown groups \['sliding8', 'state'\]"):
        P.validate_request_shape(REQ, ["full"])
    P.validate_request_shape(REQ, ["full", "sliding8", "state"])


def test_checksum_catches_every_single_byte_flip() -> None:
    import torch
    from kvtriton.transfer.transport import checksum

    g = torch.Generator().manual_seed(0)
    buf = torch.randint(0, 256, (1027,), dtype=torch.uint8, generator=g)
    ref = checksum(buf)
    assert checksum(buf.clone()) == ref
    for pos in range(buf.numel()):  # every position, including the unaligned tail
        bad = buf.clone()
        bad[pos] ^= 0x01
        assert checksum(bad) != ref, pos
    assert checksum(buf[:1026]) != checksum(buf[:1026].clone().contiguous()[:1025])
    assert checksum(torch.zeros(8, dtype=torch.uint8)) != checksum(
        torch.zeros(12, dtype=torch.uint8)
    )  # the length is mixed in
