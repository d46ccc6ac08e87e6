"""The simulator's clock: link profiles and their fit, units, queueing, prefill with and
without a context-side prefix cache, monotonicity (a faster link is never slower, no reuse is
never faster than per-group reuse), and bytes at concurrency 1 equal to the untimed
simulator's. Nothing here measures wall-clock time."""

from __future__ import annotations

import json
import math
import random

import pytest

from kvtriton.plan import plan_transfer
from kvtriton.sim import Request, SimResult, Trace, simulate, synthetic_trace
from kvtriton.sim.timing import (
    DEFAULT_LINK,
    LINK_MEASUREMENTS,
    LINK_PROFILES,
    LinkProfile,
    Percentiles,
    TimeModel,
    fit_link,
    link_profile,
    percentile,
)
from kvtriton.spec import KVCacheSpec, LayerGroup, preset

MiB = 1024**2
SMALL_CHAT = dict(
    users=4, turns=3, system_prompts=2, system_len=256, user_len=(16, 96), response_len=(16, 160)
)
SMALL_AGENT = dict(
    agents=3,
    steps=4,
    system_len=256,
    context_len=(512, 1024),
    step_len=(8, 64),
    response_len=(8, 48),
)


def _spec() -> KVCacheSpec:
    return KVCacheSpec(
        (
            LayerGroup("full", "full", (0, 2), num_kv_heads=2, head_dim=8),
            LayerGroup("sw", "sliding", (1,), num_kv_heads=1, head_dim=8, window=8),
        ),
        tokens_per_block=4,
        dtype="float16",
        name="t",
    )


def _link(gbps: float, overhead_us: float) -> LinkProfile:
    return LinkProfile("test", gbps, overhead_us)


# -- profiles, units, percentiles ------------------------------------------------------------


def test_link_seconds_units() -> None:
    link = _link(100.0, 50.0)  # 100 GB/s = 1e11 B/s, 50 us per request
    assert link.seconds(0) == pytest.approx(50e-6)
    assert link.seconds(10**9) == pytest.approx(0.01 + 50e-6)
    assert link.with_overrides(gbps=200.0).seconds(10**9) == pytest.approx(0.005 + 50e-6)
    custom = link_profile("nccl").with_overrides(overhead_us=0.0)
    assert custom.name == "custom" and custom.overhead_us == 0.0
    assert custom.gbps == LINK_PROFILES["nccl"].gbps and "nccl with 0 us" in custom.description
    with pytest.raises(ValueError, match="link bandwidth"):
        _link(0.0, 1.0)
    with pytest.raises(ValueError, match=">= 0 us"):
        _link(1.0, -1.0)
    with pytest.raises(ValueError, match="unknown link profile 'ib'; profiles: nccl"):
        link_profile("ib")


def test_fit_recovers_an_affine_link_and_profiles_come_from_the_measurements() -> None:
    gbps, us = 250.0, 40.0
    points = [(m, m * MiB / (us * 1e-6 + m * MiB / (gbps * 1e9)) / 1e9) for m in (1, 16, 256)]
    got_gbps, got_us = fit_link(points)
    assert got_gbps == pytest.approx(gbps, rel=1e-9) and got_us == pytest.approx(us, rel=1e-6)
    with pytest.raises(ValueError, match="at least two"):
        fit_link([(4, 10.0)])
    # each measured profile is the fit of its points, each estimate says so
    for name, entry in LINK_MEASUREMENTS.items():
        profile = LINK_PROFILES[name]
        if "points" in entry:
            assert (profile.gbps, profile.overhead_us) == fit_link(entry["points"])
            assert not profile.estimate and profile.points
        else:
            assert (
                profile.estimate and "ESTIMATE" in profile.source and "ESTIMATE" in profile.label()
            )
    raw = LINK_PROFILES["nccl"]  # 2x H200: 44 GB/s at 4 MiB ... 363 GB/s at 1 GiB
    assert 300 < raw.gbps < 400 and 0 < raw.overhead_us < 200
    assert DEFAULT_LINK in LINK_PROFILES


def test_percentiles_interpolate_like_numpy() -> None:
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        values = [rng.uniform(0, 50) for _ in range(n)]
        p = Percentiles.of(values)
        for q, got in ((0.5, p.p50), (0.9, p.p90), (0.99, p.p99)):
            assert got == pytest.approx(float(np.percentile(values, 100 * q)))
        assert p.mean == pytest.approx(sum(values) / n)
    assert math.isnan(percentile([], 0.5))
    assert Percentiles.of([3.0, 1.0, 2.0]).to_dict() == {
        "p50": 2.0,
        "p90": 2.8,
        "p99": 2.98,
        "mean": 2.0,
    }


def test_time_model_validates() -> None:
    with pytest.raises(ValueError, match="prefill_tokens_per_s must be a number > 0"):
        TimeModel(prefill_tokens_per_s=0)
    with pytest.raises(ValueError, match="decode_tokens_per_s"):
        TimeModel(decode_tokens_per_s=math.inf)
    with pytest.raises(ValueError, match="context_ranks must be an int >= 1"):
        TimeModel(context_ranks=0)
    with pytest.raises(TypeError, match="time_model must be a TimeModel"):
        simulate(_spec(), [Request("a", (1,), (2,))], capacity_blocks=8, time_model=3)  # type: ignore[arg-type]


# -- the clock on small traces, exactly -------------------------------------------------------


def test_one_request_ttft_is_prefill_plus_transfer_and_decode_ends_it() -> None:
    spec = _spec()
    req = Request("a", tuple(range(1, 1001)), tuple(range(5000, 5011)))  # P = 1000, R = 11
    model = TimeModel(
        link=_link(1.0, 500.0), prefill_tokens_per_s=10_000.0, decode_tokens_per_s=50.0
    )
    result = simulate(spec, [req], capacity_blocks=512, time_model=model)
    nbytes = plan_transfer(spec, 1000, 0).total_bytes
    transfer_ms = 0.5 + nbytes / 1e6  # 1 GB/s = 1e6 bytes per ms
    for policy in ("per_group", "single_boundary", "no_reuse"):
        t = result[policy].time
        assert t.prefill_ms.p50 == pytest.approx(100.0)  # 1000 tokens at 10k tokens/s
        assert t.transfer_ms.p50 == pytest.approx(transfer_ms)
        assert t.ttft_ms.p50 == pytest.approx(100.0 + transfer_ms)
        assert t.queue_ms.p50 == 0.0 and t.admission_ms.p50 == 0.0
        assert t.link_busy_s == pytest.approx(transfer_ms / 1000)
        # decoding starts at admission (the link does not hold it back): 10 fed tokens
        assert t.makespan_s == pytest.approx(0.1 + 10 / 50.0)


def test_the_link_queues_first_come_first_served() -> None:
    spec = _spec()
    a = Request("a", tuple(range(1, 401)), (9,))
    b = Request("b", tuple(range(1001, 1401)), (9,))  # same length, nothing shared
    model = TimeModel(link=_link(0.001, 0.0), prefill_tokens_per_s=1e6, context_ranks=2)
    result = simulate(spec, [a, b], capacity_blocks=512, time_model=model, policies=["no_reuse"])
    service_ms = plan_transfer(spec, 400, 0).total_bytes / 1e3  # 1 MB/s = 1e3 bytes per ms
    t = result["no_reuse"].time
    # both prefilled at 0.4 ms, asked at once: the second waits for the first
    assert t.transfer_ms.values == pytest.approx((service_ms, 2 * service_ms))
    assert t.ttft_ms.values == pytest.approx((0.4 + service_ms, 0.4 + 2 * service_ms))


def test_context_cache_prefills_only_the_uncached_part() -> None:
    spec = _spec()
    shared = tuple(range(1, 101))
    a = Request("a", (*shared, 7, 7), (9,), arrival=0.0)
    b = Request("b", (*shared, 8, 8, 8), (9,), arrival=1.0)
    for cache, want in ((True, [102.0, 3.0 + 100 % 4]), (False, [102.0, 103.0])):
        model = TimeModel(prefill_tokens_per_s=1000.0, context_cache=cache)
        result = simulate(spec, [a, b], capacity_blocks=512, time_model=model)
        # 100 shared tokens = 25 blocks of 4: b prefills 103 - 100 tokens, 1 ms each
        assert list(result["per_group"].time.prefill_ms.values) == pytest.approx(sorted(want))
    # the same prompt again: only its partial last block is computed; a prompt of whole
    # blocks seen before still computes its last token
    for prompt, want in ((a.prompt, 102 % 4), (shared, 1)):
        first, again = Request("x", prompt, (9,)), Request("y", prompt, (9,), arrival=2.0)
        result = simulate(
            spec,
            [first, again],
            capacity_blocks=512,
            time_model=TimeModel(prefill_tokens_per_s=1000.0),
        )
        assert min(result["per_group"].time.prefill_ms.values) == pytest.approx(want)


def test_concurrency_one_waits_for_a_decode_slot() -> None:
    spec = _spec()
    a = Request("a", tuple(range(1, 41)), tuple(range(100, 121)))  # R = 21: 20 fed tokens
    b = Request("b", tuple(range(201, 241)), (9,))
    model = TimeModel(prefill_tokens_per_s=1000.0, decode_tokens_per_s=100.0)
    result = simulate(spec, [a, b], capacity_blocks=512, concurrency=1, time_model=model)
    t = result["per_group"].time
    # a: prefilled at 40 ms, decodes 200 ms; b: prefilled at 80 ms, admitted at 240 ms
    assert sorted(t.admission_ms.values) == pytest.approx([0.0, 160.0])
    # b's one-token response ends at admission; its transfer ends the run
    assert t.transfer_ms.values[0] == pytest.approx(t.transfer_ms.values[1])  # equal P, no queue
    assert t.makespan_s == pytest.approx(0.24 + t.transfer_ms.p50 / 1000)


def test_arrivals_from_timestamps_and_rates() -> None:
    trace = synthetic_trace("chat", seed=3, **SMALL_CHAT)
    assert not trace.timed
    timed = trace.with_rate(5.0, seed=1)
    arrivals = [r.arrival for r in timed]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals) and timed.timed
    assert timed.with_rate(5.0, seed=1).requests == trace.with_rate(5.0, seed=1).requests
    assert [r.arrival for r in trace.with_rate(5.0, seed=2)] != arrivals
    # ~5 requests per second
    assert len(trace) / 5 / 3 < arrivals[-1] < len(trace) / 5 * 3
    with pytest.raises(ValueError, match="rate must be"):
        trace.with_rate(0)
    # a request is ready at its arrival: it cannot be committed before it
    model = TimeModel()
    result = simulate(preset("gpt-oss-20b"), timed, capacity_blocks=2000, time_model=model)
    assert result["per_group"].time.makespan_s > arrivals[-1]


# -- monotonicity ----------------------------------------------------------------------------


def _traces() -> list[Trace]:
    hand = Trace(
        (
            Request("a", tuple(range(1, 301)), tuple(range(900, 940)), arrival=0.0),
            Request("b", (*range(1, 201), *range(400, 500)), tuple(range(940, 960)), arrival=0.01),
            Request("c", tuple(range(1, 301)), (5, 6), arrival=0.02),
        )
    )
    return [
        synthetic_trace("chat", seed=4, **SMALL_CHAT),
        synthetic_trace("agent", seed=4, **SMALL_AGENT).with_rate(20.0, seed=4),
        hand,
    ]


def _sorted_le(a: Percentiles, b: Percentiles) -> None:
    assert len(a.values) == len(b.values)
    assert all(x <= y * (1 + 1e-12) + 1e-9 for x, y in zip(a.values, b.values, strict=True))
    for key in ("p50", "p90", "p99", "mean"):
        assert getattr(a, key) <= getattr(b, key) * (1 + 1e-12) + 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_a_faster_link_is_never_slower(seed: int) -> None:
    rng = random.Random(seed)
    spec = preset(rng.choice(["gpt-oss-20b", "gemma-3-4b", "tiny-hybrid"]))
    trace = _traces()[seed % 3]
    slow_gbps, slow_us = rng.uniform(0.5, 50), rng.uniform(0, 3000)
    slow = TimeModel(link=_link(slow_gbps, slow_us), prefill_tokens_per_s=rng.uniform(1e3, 1e5))
    fast = TimeModel(
        link=_link(slow_gbps * rng.uniform(1, 10), slow_us * rng.uniform(0, 1)),
        prefill_tokens_per_s=slow.prefill_tokens_per_s,
    )
    kw = dict(capacity_blocks=20_000, concurrency=rng.randint(1, 6), state_slots=64)
    a = simulate(spec, trace, time_model=fast, **kw)
    b = simulate(spec, trace, time_model=slow, **kw)
    for policy in a.policies:
        assert a[policy].total_bytes == b[policy].total_bytes  # the link changes no bytes
        _sorted_le(a[policy].time.transfer_ms, b[policy].time.transfer_ms)
        _sorted_le(a[policy].time.ttft_ms, b[policy].time.ttft_ms)
        assert a[policy].time.link_busy_s <= b[policy].time.link_busy_s


@pytest.mark.parametrize("seed", range(4))
def test_no_reuse_is_never_faster_than_per_group(seed: int) -> None:
    rng = random.Random(100 + seed)
    spec = preset(rng.choice(["gpt-oss-20b", "gemma-3-4b", "tiny-hybrid"]))
    model = TimeModel(link=_link(rng.uniform(0.5, 20), rng.uniform(0, 500)))
    result = simulate(
        spec,
        _traces()[seed % 3],
        capacity_blocks=20_000,
        concurrency=rng.randint(1, 6),
        state_slots=64,
        time_model=model,
    )
    per, single, none = (result[p].time for p in ("per_group", "single_boundary", "no_reuse"))
    for fast, slow in ((per, single), (single, none), (per, none)):
        _sorted_le(fast.transfer_ms, slow.transfer_ms)
        _sorted_le(fast.ttft_ms, slow.ttft_ms)
    # prefill does not depend on the receiver's policy
    assert per.prefill_ms.values == none.prefill_ms.values


# -- concurrency 1: the untimed simulator's bytes ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "params", "capacity", "expected"),
    [
        (
            "gpt-oss-20b",
            "chat",
            SMALL_CHAT,
            300,
            {
                "no_reuse": (175276032, {"full": (5608, 48), "sliding128": (1524, 9)}),
                "single_boundary": (74637312, {"full": (1928, 48), "sliding128": (1109, 9)}),
                "per_group": (60383232, {"full": (1416, 48), "sliding128": (1041, 9)}),
            },
        ),
        (
            "tiny-hybrid",
            "agent",
            SMALL_AGENT,
            700,
            {
                "no_reuse": (6440960, {"full": (12448, 321), "sliding8": (84, 3), "state": (0, 1)}),
                "single_boundary": (
                    5822464,
                    {"full": (11240, 321), "sliding8": (84, 3), "state": (0, 1)},
                ),
                "per_group": (1484800, {"full": (2768, 321), "sliding8": (84, 3), "state": (0, 1)}),
            },
        ),
    ],
)
def test_concurrency_one_keeps_the_untimed_bytes(name, kind, params, capacity, expected) -> None:
    """Numbers of the simulator before it had a clock (commit ec57d1f), same arguments; the
    time model must not change them, whatever its rates."""
    spec = preset(name)
    trace = synthetic_trace(kind, seed=2, **params)
    for model in (
        TimeModel(),
        TimeModel(prefill_tokens_per_s=50.0, decode_tokens_per_s=1e6, context_ranks=3),
    ):
        result = simulate(
            spec, trace, capacity_blocks=capacity, concurrency=1, state_slots=16, time_model=model
        )
        got = {
            str(p): (
                r.total_bytes,
                {g.name: (g.moved_tokens, g.peak_blocks_in_use) for g in r.groups},
            )
            for p, r in result.policies.items()
        }
        assert got == expected


# -- report ---------------------------------------------------------------------------------


def test_time_in_table_and_json() -> None:
    trace = synthetic_trace("chat", seed=0, users=2, turns=2, system_len=64, user_len=(8, 32))
    result = simulate(preset("gpt-oss-20b"), trace, capacity_blocks=1000)
    assert isinstance(result, SimResult)
    data = json.loads(json.dumps(result.to_dict()))
    for policy in ("per_group", "single_boundary", "no_reuse"):
        time = data["policies"][policy]["time"]
        for series in ("transfer_ms", "ttft_ms", "queue_ms", "prefill_ms", "admission_ms"):
            assert set(time[series]) == {"p50", "p90", "p99", "mean"}
            assert time[series]["p50"] <= time[series]["p90"] <= time[series]["p99"]
        ttft, parts = (
            time["ttft_ms"]["mean"],
            ("transfer_ms", "queue_ms", "prefill_ms", "admission_ms"),
        )
        assert ttft == pytest.approx(sum(time[p]["mean"] for p in parts))
    assert data["time_model"]["link"]["name"] == DEFAULT_LINK
    assert data["time_model"]["prefill_tokens_per_s"] == TimeModel().prefill_tokens_per_s
    text = result.table()
    assert "time: link nccl:" in text and "TTFT" in text and "transfer" in text
    header = next(line for line in text.splitlines() if line.startswith("ms "))
    assert header.split()[1:5] == ["p50", "p90", "p99", "mean"]
