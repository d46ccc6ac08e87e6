"""``kvtriton bench ttft``: the summary's arithmetic and its refusals (the measurement itself
runs in notebooks/06_streaming through tests/test_notebooks.py, on CPU with two gloo ranks)."""

from __future__ import annotations

import pytest

from kvtriton.transfer.ttft import POLICIES, TtftConfig, format_ttft, summarise

LAYERS = 4


def _result(prefill: dict[str, float], ttft: dict[str, float], *, failed: str = "") -> dict:
    """Two ranks' raw output: per policy and mode two timed runs with these times (s)."""
    ctx_runs, gen_runs = {}, {}
    for policy in POLICIES:
        for mode in ("plain", "streamed"):
            done = [prefill[mode] * (i + 1) / LAYERS for i in range(LAYERS)]
            ctx_runs[f"{policy}/{mode}"] = [
                {"prefill_s": prefill[mode], "layer_done_s": done} for _ in range(2)
            ]
            landed = [[i, done[i] + 0.001] for i in range(LAYERS)]
            gen_runs[f"{policy}/{mode}"] = [
                {"ttft_s": ttft[mode], "bytes": 1 << 20, "landed_s": landed, "exact": True}
                for _ in range(2)
            ]
    cfg = TtftConfig(model="tiny-hybrid", prompt_tokens=64, history_tokens=32, reps=2)
    from dataclasses import asdict

    return {
        "config": asdict(cfg),
        "ranks": [
            {"runs": ctx_runs, "failed": [], "device": "cpu", "channel": "gloo",
             "compute_steps": 0},
            {"runs": gen_runs, "failed": [failed] if failed else [], "device": "cpu",
             "channel": "gloo", "compute_steps": 0},
        ],
    }  # fmt: skip


def test_transfer_hidden_and_target_come_from_the_plain_prefill() -> None:
    # plain: 100 ms prefill + 20 ms transfer; streamed: the prefill slowed to 110 ms (a
    # shared GPU), committed 2 ms after it
    s = summarise(_result({"plain": 0.100, "streamed": 0.110}, {"plain": 0.120, "streamed": 0.112}))
    (row, *_) = s["rows"]
    assert [r["policy"] for r in s["rows"]] == list(POLICIES)
    assert row["transfer_ms"] == pytest.approx(20.0)
    assert row["layer_transfer_ms"] == pytest.approx(5.0)
    assert row["tail_streamed_ms"] == pytest.approx(2.0)
    assert row["saved_ms"] == pytest.approx(8.0)
    assert row["hidden"] == pytest.approx(0.4)
    assert not row["target_met"]  # 112 > 100 + 5 + 1
    assert row["exact"]
    text = format_ttft(s)
    assert "missed" in text and "tiny-hybrid" in text


def test_the_target_is_met_when_streaming_hides_all_but_one_layer() -> None:
    s = summarise(
        _result({"plain": 0.100, "streamed": 0.100}, {"plain": 0.120, "streamed": 0.1055})
    )
    assert all(r["target_met"] for r in s["rows"])
    assert s["rows"][0]["hidden"] == pytest.approx(14.5 / 20)


def test_no_transfer_time_means_nothing_to_hide() -> None:
    s = summarise(_result({"plain": 0.100, "streamed": 0.100}, {"plain": 0.099, "streamed": 0.1}))
    assert s["rows"][0]["transfer_ms"] == 0.0
    assert s["rows"][0]["hidden"] is None
    assert "-" in format_ttft(s)


def test_a_failed_request_of_any_turn_fails_the_summary() -> None:
    bad = _result({"plain": 0.1, "streamed": 0.1}, {"plain": 0.12, "streamed": 0.11},
                  failed="per_group, plain, h1: ended ERROR: timed out")  # fmt: skip
    with pytest.raises(RuntimeError, match="h1: ended ERROR: timed out"):
        summarise(bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_tokens": 0}, "prompt_tokens"),
        ({"prompt_tokens": 64, "history_tokens": 64}, "history_tokens"),
        ({"layer_ms": -1.0}, "layer_ms"),
        ({"reps": 0}, "reps"),
    ],
)
def test_config_refuses_what_cannot_run(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TtftConfig(**kwargs)
