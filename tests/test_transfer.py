"""End-to-end transfers between spawned CPU ranks over gloo.

All cases run in ONE spawned world of 4 processes (``launch_cases``): process start-up and
the torch import are paid once. Every case builds fresh caches on each rank, prefills the
context ranks with position-derived values, runs a stream of multi-turn requests (the
receiver reuses the earlier turn per layer group) and checks every needed position
bit-exact on the receiver. Fault cases check that both sides end in ERROR or CANCELLED within
the timeout, with no leaked and no committed block.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from kvtriton.spec import KVCacheSpec, LayerGroup
from kvtriton.transfer.config import DisaggConfig, FaultInjection
from kvtriton.transfer.demo import launch_cases
from kvtriton.transfer.report import format_report

pytestmark = pytest.mark.slow

BASE: dict[str, Any] = dict(kernel_backend="reference", conversations=2, turns=2, timeout_s=20.0)
ONE_TURN: dict[str, Any] = {**BASE, "turns": 1, "modes": ("per_group",)}

REPLICATED = KVCacheSpec(
    (
        LayerGroup("mqa", "full", (0, 2), num_kv_heads=1, head_dim=8),
        LayerGroup("sliding6", "sliding", (1, 3), num_kv_heads=2, head_dim=8, window=6),
    ),
    tokens_per_block=4,
    dtype="bfloat16",
    name="mqa-hybrid",
)

FULL_ONLY = KVCacheSpec(
    (LayerGroup("full", "full", (0, 1), num_kv_heads=2, head_dim=8),),
    tokens_per_block=4,
    dtype="float16",
    name="full-only",
)

CASES: list[tuple[str, DisaggConfig]] = [
    # the Triton kernels (interpreter on CPU when TRITON_INTERPRET=1) end to end
    ("tp1-tp1", DisaggConfig(**{**BASE, "kernel_backend": "auto"})),
    ("tp2-tp1", DisaggConfig(ctx_tp=2, gen_tokens_per_block=3, **BASE)),
    ("tp1-tp2", DisaggConfig(gen_tp=2, ctx_layout="HND", gen_layout="NHD", **BASE)),
    ("pp2-pp1", DisaggConfig(ctx_pp=2, **BASE)),
    ("tp1pp2-tp2pp1", DisaggConfig(ctx_pp=2, gen_tp=2, **BASE)),
    ("replicated-tp2-tp2", DisaggConfig(model=REPLICATED, ctx_tp=2, gen_tp=2, **BASE)),
    (
        "interleaved",
        DisaggConfig(
            **{
                **BASE,
                "conversations": 6,
                "in_flight": 6,
                "chunk_bytes": 1024,
                "modes": ("per_group",),
            }
        ),
    ),
    # the second turn repeats a block-aligned prompt: nothing moves, the request still
    # completes (Done with no chunk, then Ack); drafts are allocated and never sent
    (
        "full-hit",
        DisaggConfig(
            model=FULL_ONLY, turn_tokens=0, draft_tokens=3, **{**BASE, "modes": ("per_group",)}
        ),
    ),
    ("mismatch", DisaggConfig(gen_dtype="float16", **ONE_TURN)),
    ("corrupt", DisaggConfig(faults={0: FaultInjection(corrupt_chunk=1)}, **ONE_TURN)),
    (
        "cancel",
        DisaggConfig(
            cancel=("c0t0",),
            cancel_during=("c1t0",),
            chunk_bytes=512,
            faults={0: FaultInjection(frame_delay_s=0.02)},
            **ONE_TURN,
        ),
    ),
    (
        "timeout",
        DisaggConfig(faults={0: FaultInjection(stall=True)}, **{**ONE_TURN, "timeout_s": 1.5}),
    ),
    # last: a dead rank breaks the world
    (
        "sender-dies",
        DisaggConfig(faults={0: FaultInjection(die_after_frames=2)}, chunk_bytes=512, **ONE_TURN),
    ),
]


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    t0 = time.monotonic()
    out = launch_cases(CASES, world_size=4, timeout_s=200)
    out["__elapsed__"] = {"s": time.monotonic() - t0}
    return out


def _report(results: dict[str, Any], name: str) -> dict[str, Any]:
    rep = results[name]
    assert "error" not in rep, rep["error"]
    return rep


def _ranks(rep: dict[str, Any], side: str) -> list[dict[str, Any]]:
    return [r for r in rep["ranks"] if r["side"] == side]


def _requests(rep: dict[str, Any]) -> list[dict[str, Any]]:
    return [q for r in _ranks(rep, "gen") for m in r["modes"].values() for q in m["requests"]]


def _check_clean(rep: dict[str, Any]) -> None:
    """No block referenced after the stream, on any rank that reported."""
    for r in rep["ranks"]:
        for mode, m in r["modes"].items():
            assert not any(m["leaked"].values()), (r["rank"], mode, m["leaked"])


def _check_success(rep: dict[str, Any]) -> None:
    assert rep["verified"], format_report(rep)
    reqs = _requests(rep)
    assert reqs and all(q["state"] == "TRANSFERRED" and not q["mismatches"] for q in reqs)
    for r in _ranks(rep, "ctx"):
        for m in r["modes"].values():
            ended = m["stats"]["sender_ended"]
            assert ended["TRANSFERRED"] > 0 and ended["ERROR"] == ended["CANCELLED"] == 0, ended
            assert not any(m["stats"]["sender_tables"].values()), m["stats"]
    _check_clean(rep)


@pytest.mark.parametrize(
    "name",
    [
        "tp1-tp1",
        "tp2-tp1",
        "tp1-tp2",
        "pp2-pp1",
        "tp1pp2-tp2pp1",
        "replicated-tp2-tp2",
    ],
)
def test_topologies_bit_exact_with_per_group_reuse(results: dict[str, Any], name: str) -> None:
    rep = _report(results, name)
    _check_success(rep)
    pg, sb = rep["modes"]["per_group"], rep["modes"]["single_boundary"]
    assert pg["requests"] == sb["requests"] == 4
    # second turns reuse the first on the receiver: per-group moves less than no reuse, and
    # the full-attention group keeps its reuse where the single boundary collapses
    assert pg["bytes"] < pg["no_reuse_bytes"]
    assert pg["bytes"] < sb["bytes"]
    full = "mqa" if name.startswith("replicated") else "full"
    assert pg["groups"][full]["bytes"] < sb["groups"][full]["bytes"]
    # the receivers committed the turns (their prefix caches hold blocks)
    for r in _ranks(rep, "gen"):
        assert r["modes"]["per_group"]["cached"][full] > 0


def test_replicated_heads_come_from_one_replica(results: dict[str, Any]) -> None:
    rep = _report(results, "replicated-tp2-tp2")
    # 1 "mqa" head held by both ctx ranks: each receiver asks one of them only, so the
    # mqa bytes moved equal the two receivers' needs (not doubled)
    for r in _ranks(rep, "gen"):
        for q in r["modes"]["per_group"]["requests"]:
            # one head x 2 layers x kv 2 x 8 dims x 2 bytes per token
            assert q["bytes_by_group"]["mqa"] == q["tokens_by_group"]["mqa"] * 2 * 2 * 8 * 2


def test_many_sessions_in_flight_are_served_in_request_order(results: dict[str, Any]) -> None:
    rep = _report(results, "interleaved")
    _check_success(rep)
    reqs = [q for q in _requests(rep) if q["rid"].endswith("t0")]
    assert len(reqs) == 6
    # all six were asked at once (in_flight 6, in conversation order); the sender serves each
    # receiver in request order, so data reached them in that order
    by_first = [q["rid"] for q in sorted(reqs, key=lambda q: q["t_first_data"])]
    assert by_first == [f"per_group/c{c}t0" for c in range(6)], by_first


def test_full_hit_moves_nothing_and_completes(results: dict[str, Any]) -> None:
    rep = _report(results, "full-hit")
    _check_success(rep)
    reqs = _requests(rep)
    first = [q for q in reqs if q["rid"].endswith("t0")]
    second = [q for q in reqs if q["rid"].endswith("t1")]
    assert len(first) == len(second) == 2
    assert all(sum(q["bytes_by_group"].values()) == 40 * 2 * 2 * 2 * 8 * 2 for q in first)
    assert all(
        sum(q["bytes_by_group"].values()) == 0 and q["tokens_by_group"]["full"] == 0 for q in second
    )


def _check_failed(
    rep: dict[str, Any], *, recv: str, send: str | None, match: str, within: float | None = None
) -> None:
    reqs = _requests(rep)
    assert reqs
    for q in reqs:
        assert q["state"] == recv, q
        assert match in (q["error"] or ""), q["error"]
        if within is not None:
            assert q["t_total"] < within + 1.0, q["t_total"]
    for r in _ranks(rep, "ctx") if send is not None else ():
        stats = r["modes"]["per_group"]["stats"]
        ended = stats["sender_ended"]
        assert ended["TRANSFERRED"] == 0, ended
        if send == "REFUSED":  # refused before a session existed
            assert stats["refused"] > 0 and any(match in x for x in stats["recent_refusals"])
        else:
            assert ended[send] > 0, ended
            other = {"ERROR": "CANCELLED", "CANCELLED": "ERROR"}[send]
            assert ended[other] == 0, ended
        assert not any(stats["sender_tables"].values()), stats  # nothing held after close
    for r in _ranks(rep, "gen"):  # nothing reached the receiver's prefix cache
        assert not any(r["modes"]["per_group"]["cached"].values()), r["modes"]
    _check_clean(rep)
    assert not rep["verified"]


def test_spec_mismatch_is_refused_on_both_sides(results: dict[str, Any]) -> None:
    rep = _report(results, "mismatch")
    _check_failed(rep, recv="ERROR", send="REFUSED", match="spec mismatch: receiver model digest")


def test_corrupted_chunk_fails_both_sides(results: dict[str, Any]) -> None:
    rep = _report(results, "corrupt")
    _check_failed(rep, recv="ERROR", send="ERROR", match="checksum mismatch in chunk 1")


def test_cancel_before_and_during(results: dict[str, Any]) -> None:
    rep = _report(results, "cancel")
    _check_failed(rep, recv="CANCELLED", send="CANCELLED", match="cancelled by the experiment")
    during = [q for q in _requests(rep) if q["rid"].endswith("c1t0")]
    assert during and during[0]["t_first_data"] is not None  # data had started to arrive


def test_receiver_timeout(results: dict[str, Any]) -> None:
    rep = _report(results, "timeout")
    _check_failed(rep, recv="ERROR", send="ERROR", match="timed out after 1.5 s", within=1.5)


def test_sender_dies_mid_transfer(results: dict[str, Any]) -> None:
    rep = _report(results, "sender-dies")
    _check_failed(rep, recv="ERROR", send=None, match="lost sender rank 0", within=20.0)
    gen = _ranks(rep, "gen")[0]
    assert gen["modes"]["per_group"]["lost_peers"] == [0]


def test_the_shared_world_stays_within_budget(results: dict[str, Any]) -> None:
    assert results["__elapsed__"]["s"] < 120
