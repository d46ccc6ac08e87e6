"""The direct channel on a real GPU: ranks in separate processes map each other's pools
through CUDA IPC (two or more ranks may share one GPU). Same topologies, safety rules and
faults as the CPU worlds, bit-exact. Skipped without CUDA (run on the device machine)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvtriton.transfer.config import DisaggConfig, FaultInjection
from kvtriton.transfer.demo import launch_cases, launch_local
from kvtriton.transfer.report import format_report

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BASE: dict[str, Any] = dict(conversations=2, turns=2, timeout_s=20.0, channel="ipc")
ONE_TURN: dict[str, Any] = {**BASE, "turns": 1, "modes": ("per_group",)}

CASES: list[tuple[str, DisaggConfig]] = [
    ("tp1-tp1", DisaggConfig(**BASE)),
    ("tp2-tp1-bs3", DisaggConfig(ctx_tp=2, gen_tokens_per_block=3, **BASE)),
    ("tp1pp2-tp2pp1", DisaggConfig(ctx_pp=2, gen_tp=2, ctx_layout="HND", gen_layout="NHD", **BASE)),
    ("mismatch", DisaggConfig(gen_dtype="float16", **ONE_TURN)),
    (
        "timeout",
        DisaggConfig(faults={0: FaultInjection(stall=True)}, **{**ONE_TURN, "timeout_s": 1.5}),
    ),
    ("cancel", DisaggConfig(cancel=("c0t0",), **ONE_TURN)),
    # last: a dead rank breaks the world; it dies with a request accepted and its pools
    # mapped by the receiver, which must survive, fail the request and commit nothing
    ("sender-dies", DisaggConfig(faults={0: FaultInjection(die_after_frames=0)}, **ONE_TURN)),
]


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    return launch_cases(CASES, world_size=4, timeout_s=300, ngpu=1)


def _report(results: dict[str, Any], name: str) -> dict[str, Any]:
    rep = results[name]
    assert "error" not in rep, rep["error"]
    return rep


def _requests(rep: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        q
        for r in rep["ranks"]
        if r["side"] == "gen"
        for m in r["modes"].values()
        for q in m["requests"]
    ]


@pytest.mark.parametrize("name", ["tp1-tp1", "tp2-tp1-bs3", "tp1pp2-tp2pp1"])
def test_direct_channel_is_bit_exact_across_topologies(results: dict[str, Any], name: str) -> None:
    rep = _report(results, name)
    assert rep["channel"] == "ipc"
    assert rep["verified"], format_report(rep)
    pg, sb = rep["modes"]["per_group"], rep["modes"]["single_boundary"]
    assert pg["bytes"] < sb["bytes"] <= sb["no_reuse_bytes"]


@pytest.mark.parametrize(
    "name,state,match",
    [
        ("mismatch", "ERROR", "spec mismatch"),
        ("timeout", "ERROR", "timed out after 1.5 s"),
        ("cancel", None, "cancelled by the experiment"),
        ("sender-dies", "ERROR", "lost sender rank 0"),
    ],
)
def test_direct_channel_faults_end_cleanly(
    results: dict[str, Any], name: str, state: str | None, match: str
) -> None:
    rep = _report(results, name)
    reqs = _requests(rep)
    hit = [q for q in reqs if match in (q["error"] or "")]
    assert hit, [q["error"] for q in reqs]
    assert all(q["state"] == (state or "CANCELLED") for q in hit)
    for r in rep["ranks"]:  # nothing leaked on any rank that reported, nothing committed
        for m in r["modes"].values():
            assert not any(m["leaked"].values()), (r["rank"], m["leaked"])
            if r["side"] == "gen" and name != "cancel":
                assert not any(m["cached"].values())


def test_demo_runs_two_ranks_on_one_gpu() -> None:
    rep = launch_local(DisaggConfig(conversations=2, turns=2))
    assert rep["channel"] == "ipc" and rep["verified"], format_report(rep)
