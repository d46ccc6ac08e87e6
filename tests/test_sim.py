"""kvtriton.sim: traces (generators, JSONL) and the per-policy receiver simulation."""

from __future__ import annotations

import json
import re

import pytest

from kvtriton.cache.pools import blocks_for_bytes
from kvtriton.plan import plan_transfer
from kvtriton.sim import (
    POLICIES,
    Request,
    SimResult,
    Trace,
    load_trace,
    simulate,
    synthetic_trace,
    trace_from_records,
)
from kvtriton.spec import KVCacheSpec, LayerGroup, preset

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


def _hybrid(window: int = 8, block: int = 4) -> KVCacheSpec:
    groups = (
        LayerGroup("full", "full", (1, 3), num_kv_heads=2, head_dim=8),
        LayerGroup(
            f"sliding{window}", "sliding", (0, 2), num_kv_heads=2, head_dim=8, window=window
        ),
    )
    return KVCacheSpec(groups, tokens_per_block=block, dtype="float16", name="hybrid")


# -- traces --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "params"), [("chat", SMALL_CHAT), ("agent", SMALL_AGENT)])
def test_synthetic_traces_are_seeded(kind, params):
    a = synthetic_trace(kind, seed=3, **params)
    b = synthetic_trace(kind, seed=3, **params)
    c = synthetic_trace(kind, seed=4, **params)
    assert a.requests == b.requests
    assert a.requests != c.requests
    assert len(a) == (
        params.get("users", 0) * params.get("turns", 0) or params["agents"] * params["steps"]
    )


def test_chat_turns_continue_and_system_prompts_are_shared():
    trace = synthetic_trace("chat", seed=1, **SMALL_CHAT)
    by_id = {r.request_id: r for r in trace}
    for r in trace:
        user, turn = r.request_id[1:].split("-t")
        assert r.session == f"u{user}"
        if int(turn):
            prev = by_id[f"u{user}-t{int(turn) - 1}"]
            assert r.after == prev.request_id
            assert r.prompt[: len(prev.sequence)] == prev.sequence
            assert len(r.prompt) > len(prev.sequence) or r.prompt == prev.sequence
        else:
            assert r.after is None
    # Users 0 and 2 share system prompt 0; users 0 and 1 do not share theirs.
    head = {u: by_id[f"u{u}-t0"].prompt[:256] for u in range(4)}
    assert head[0] == head[2] and head[1] == head[3] and head[0] != head[1]
    # Requests arrive turn by turn.
    turns = [int(r.request_id.split("-t")[1]) for r in trace]
    assert turns == sorted(turns)


def test_agent_steps_are_short_continuations_of_a_long_context():
    trace = synthetic_trace("agent", seed=2, **SMALL_AGENT)
    by_id = {r.request_id: r for r in trace}
    for r in trace:
        agent, step = r.request_id[1:].split("-s")
        if int(step):
            prev = by_id[f"a{agent}-s{int(step) - 1}"]
            assert r.prompt[: len(prev.sequence)] == prev.sequence
            assert 8 <= len(r.prompt) - len(prev.sequence) <= 64
        else:
            assert 256 + 512 <= len(r.prompt) <= 256 + 1024


def test_jsonl_round_trip_compact_and_explicit(tmp_path):
    trace = synthetic_trace("chat", seed=5, **SMALL_CHAT)
    path = tmp_path / "chat.jsonl"
    trace.save(path)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["kvtriton_trace"] == 1 and first["seed"] == 5
    loaded = load_trace(path)
    assert loaded.requests == trace.requests and loaded.name == "chat"
    # A trace built from requests saves explicit prompts.
    explicit = Trace(trace.requests[:3])
    explicit.save(tmp_path / "mine.jsonl")
    again = load_trace(tmp_path / "mine.jsonl")
    assert again.requests == explicit.requests and again.name == "mine"


def test_jsonl_prefix_encoding_builds_prompts():
    trace = trace_from_records(
        [
            {"segment": "sys", "tokens": [1, 2, 3, 4]},
            {"id": "a", "prefix": "sys", "new": [5, 6], "response": [7, 8]},
            {"id": "b", "prefix": "a", "new": [9], "response_len": 2},
            {
                "id": "c",
                "prefix": "a",
                "prefix_len": 3,
                "new_len": 2,
                "response": [1],
                "session": "s",
            },
            {"id": "d", "prompt": [4, 4], "response": [4], "after": "b"},
        ]
    )
    a, b, c, d = trace.requests
    assert a.prompt == (1, 2, 3, 4, 5, 6) and a.after is None and a.session == "a"
    assert b.prompt == (1, 2, 3, 4, 5, 6, 7, 8, 9) and b.after == "a" and len(b.response) == 2
    assert c.prompt[:3] == (1, 2, 3) and len(c.prompt) == 5 and c.session == "s"
    assert d.after == "b"
    assert all(0 <= t < 32000 for t in b.response + c.prompt)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            [{"id": "a", "prompt": [1], "response": [1]}, {"kvtriton_trace": 1}],
            "header must be the first",
        ),
        ([{"kvtriton_trace": 2}], "unsupported trace format"),
        ([{"id": "a", "prompt": [1], "response": [1]}] * 2, "duplicate id"),
        ([{"id": "a", "prefix": "nope", "new": [1], "response": [1]}], "no earlier segment"),
        ([{"id": "a", "prompt": [1], "prefix": "x", "response": [1]}], "not both"),
        ([{"id": "a", "prompt": [1]}], "exactly one of response"),
        ([{"id": "a", "prompt": [1, -2], "response": [1]}], r"prompt\[1\]"),
        ([{"id": "a", "prompt": [], "response": [1]}], "prompt is empty"),
        ([{"id": "a", "prompt": [1], "response_len": 0}], "response_len"),
        ([{"id": "a", "prompt": [1], "response": [1], "after": "z"}], "no earlier request"),
        ([{"id": "a", "prompt": [1], "response": [1], "color": 1}], "unknown fields"),
        (
            [
                {"segment": "s", "len": 4},
                {"id": "a", "prefix": "s", "prefix_len": 9, "response": [1]},
            ],
            "prefix_len 9 exceeds",
        ),
        ([], "no request"),
    ],
)
def test_jsonl_errors_name_the_record_and_field(records, message):
    with pytest.raises(ValueError, match=message):
        trace_from_records(records, source="t.jsonl")


def test_load_trace_reports_bad_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "prompt": [1], "response": [1]}\n\n{oops\n')
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        load_trace(path)
    with pytest.raises(ValueError, match="cannot read trace"):
        load_trace(tmp_path / "missing.jsonl")


# -- simulation: exact small scenarios -------------------------------------------------------


def test_shared_prefix_scenario_is_exact():
    """Two prompts share 32 tokens (8 blocks of 4). The receiver never held sliding-window
    pages of the shared part, so the single boundary collapses to 0 while the full-attention
    group keeps its 32 cached tokens."""
    spec = _hybrid(window=8, block=4)
    shared = list(range(100, 132))
    a = Request("a", tuple(shared + [1] * 8), (5,))
    b = Request("b", tuple(shared + [2] * 8), (5,))
    result = simulate(spec, [a, b], capacity_blocks=64, concurrency=1)
    per, single, none = result["per_group"], result["single_boundary"], result["no_reuse"]
    # a moves everything under every policy: full [0, 40), sliding needed [33, 40).
    assert none.group("full").moved_tokens == 80
    assert single.group("full").moved_tokens == 80
    assert per.group("full").moved_tokens == 40 + 8
    for p in (per, single, none):
        assert p.group("sliding8").moved_tokens == 14
        assert p.group("sliding8").needed_tokens == 14
        assert p.group("full").needed_tokens == 80
    assert per.group("full").kv_bytes == 48 * spec.bytes_per_token("full")
    assert per.group("full").hit_rate == pytest.approx(32 / 80)
    saved, frac = result.savings()
    assert saved == 32 * spec.bytes_per_token("full") and 0 < frac < 1


def test_next_turn_reuses_the_decoded_response():
    spec = _hybrid(window=8, block=4)
    first = Request("t0", tuple(range(1, 21)), tuple(range(50, 63)))  # P=20, R=13
    second = Request("t1", (*first.sequence, 7, 7, 7), (1,), after="t0")
    result = simulate(spec, [first, second], capacity_blocks=64, policies=["per_group"])
    full = result["per_group"].group("full")
    # The receiver decoded 12 of the 13 response tokens: KV of [0, 32) = 8 full blocks; the
    # second prompt (P = 36) moves [32, 36).
    assert full.moved_tokens == 20 + 4
    sliding = result["per_group"].group("sliding8")
    # needed(36) = [29, 36): blocks 7 ([28, 32), decoded) is cached, so [32, 36) moves.
    assert sliding.moved_tokens == 7 + 4


def test_sliding_pages_leave_the_window_while_decoding():
    spec = _hybrid(window=8, block=4)
    long = Request("r", tuple(range(1, 9)), tuple(range(1000, 1200)))  # decodes 199 tokens
    result = simulate(spec, [long], capacity_blocks=64, policies=["per_group"])
    per = result["per_group"]
    assert per.group("full").peak_blocks_in_use == (8 + 199 + 3) // 4
    assert per.group("sliding8").peak_blocks_in_use <= (8 - 1) // 4 + 2


def test_no_reuse_matches_independent_plans():
    spec = preset("tiny-hybrid")
    trace = synthetic_trace(
        "chat", seed=0, users=3, turns=2, system_len=32, user_len=(4, 12), response_len=(4, 20)
    )
    result = simulate(spec, trace, capacity_blocks=4096, policies=["no_reuse"])
    expected = sum(plan_transfer(spec, len(r.prompt), 0).total_bytes for r in trace)
    assert result["no_reuse"].total_bytes == expected
    assert result["no_reuse"].full_hits == 0


# -- simulation: invariants over synthetic traces --------------------------------------------


def _check_order(result: SimResult) -> None:
    per, single, none = (result[p] for p in ("per_group", "single_boundary", "no_reuse"))
    assert per.total_bytes <= single.total_bytes <= none.total_bytes
    for g in per.groups:
        assert per.group(g.name).bytes <= single.group(g.name).bytes <= none.group(g.name).bytes
    for p in (per, single, none):
        for g in p.groups:
            assert 0.0 <= g.hit_rate <= 1.0
            assert g.moved_tokens <= g.needed_tokens
            assert g.peak_blocks_in_use <= g.pool_blocks


@pytest.mark.parametrize(
    ("name", "kind", "params"),
    [
        ("gpt-oss-20b", "chat", SMALL_CHAT),
        ("gpt-oss-20b", "agent", SMALL_AGENT),
        ("gemma-3-4b", "chat", SMALL_CHAT),
        ("tiny-hybrid", "chat", SMALL_CHAT),
    ],
)
def test_policy_order_with_ample_capacity(name, kind, params):
    spec = preset(name)
    trace = synthetic_trace(kind, seed=11, **params)
    result = simulate(spec, trace, capacity_blocks=20_000, concurrency=4)
    _check_order(result)


@pytest.mark.parametrize("seed", range(30))
def test_policy_order_on_random_hybrids(seed):
    """Random block sizes, windows, extra sliding/state groups, trace kinds and concurrency:
    with a pool that never evicts, per-group <= single boundary <= no reuse in every group."""
    import random

    rng = random.Random(seed)
    window = rng.randint(1, 64)
    groups = [
        LayerGroup("full", "full", (0,), 2, 4),
        LayerGroup(f"sliding{window}", "sliding", (1,), 2, 4, window=window),
    ]
    other = rng.randint(1, 64)
    if rng.random() < 0.4 and other != window:
        groups.append(LayerGroup(f"sliding{other}", "sliding", (2,), 1, 4, window=other))
    if rng.random() < 0.3:
        groups.append(LayerGroup("state", "state", (3,), state_shape=(2, 3)))
    spec = KVCacheSpec(
        tuple(groups), tokens_per_block=rng.choice([1, 2, 4, 8, 16]), dtype="float16"
    )
    if rng.random() < 0.5:
        trace = synthetic_trace(
            "chat",
            seed=seed,
            users=3,
            turns=3,
            system_len=rng.randint(0, 80),
            user_len=(1, 40),
            response_len=(1, 50),
        )
    else:
        trace = synthetic_trace(
            "agent",
            seed=seed,
            agents=3,
            steps=3,
            system_len=rng.randint(0, 80),
            context_len=(1, 100),
            step_len=(0, 20),
            response_len=(1, 30),
        )
    result = simulate(
        spec, trace, capacity_blocks=5000, concurrency=rng.randint(1, 4), state_slots=64
    )
    _check_order(result)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_window_longer_than_every_sequence_behaves_like_full_attention(policy):
    """Oracle: with W above every sequence length, the sliding group needs, caches and moves
    exactly what the full-attention group does."""
    groups = (
        LayerGroup("full", "full", (0,), 2, 4),
        LayerGroup("sliding100000", "sliding", (1,), 2, 4, window=100_000),
    )
    spec = KVCacheSpec(groups, tokens_per_block=8, dtype="float16")
    trace = synthetic_trace("chat", seed=7, **SMALL_CHAT)
    result = simulate(spec, trace, capacity_blocks=5000, concurrency=3, policies=[policy])
    full, sliding = (result[policy].group(n) for n in ("full", "sliding100000"))
    assert (full.needed_tokens, full.moved_tokens, full.bytes, full.peak_blocks_in_use) == (
        sliding.needed_tokens,
        sliding.moved_tokens,
        sliding.bytes,
        sliding.peak_blocks_in_use,
    )


def test_tp_shard_moves_its_share_of_the_bytes():
    spec = preset("gpt-oss-20b")
    trace = synthetic_trace("chat", seed=0, **SMALL_CHAT)
    whole = simulate(spec, trace, capacity_blocks=20_000)
    half = simulate(spec.shard(1, 2), trace, capacity_blocks=20_000)
    for p in POLICIES:
        assert half[p].total_bytes * 2 == whole[p].total_bytes
        for g in whole[p].groups:
            assert half[p].group(g.name).moved_tokens == g.moved_tokens


def test_gpt_oss_chat_per_group_saves_over_single_boundary():
    spec = preset("gpt-oss-20b")
    trace = synthetic_trace("chat", seed=0, **SMALL_CHAT)
    result = simulate(spec, trace, capacity_blocks=20_000)
    saved, frac = result.savings("per_group", "single_boundary")
    assert saved > 0 and frac > 0.05
    # Shared system prompts: per-group keeps full-attention reuse the single boundary loses.
    full = "full"
    assert result["per_group"].group(full).hit_rate > result["single_boundary"].group(full).hit_rate


def test_capacity_pressure_still_orders_against_no_reuse_and_waits():
    spec = preset("gpt-oss-20b")
    trace = synthetic_trace("chat", seed=0, **SMALL_CHAT)
    result = simulate(spec, trace, capacity_blocks=120, concurrency=4)
    for p in ("per_group", "single_boundary"):
        assert result[p].total_bytes <= result["no_reuse"].total_bytes
        assert result[p].group("full").peak_blocks_in_use <= 120
    assert result["no_reuse"].waits > 0


def test_capacity_bytes_equals_the_block_count_it_buys():
    spec = preset("gpt-oss-20b")
    trace = synthetic_trace(
        "chat", seed=0, users=2, turns=2, system_len=64, user_len=(8, 32), response_len=(8, 32)
    )
    nbytes = 3 * 1024**3
    by_bytes = simulate(spec, trace, capacity_bytes=nbytes)
    by_blocks = simulate(spec, trace, capacity_blocks=blocks_for_bytes(spec, nbytes))
    assert by_bytes.to_dict() == by_blocks.to_dict()


def test_state_groups_run_and_report_state_moves():
    spec = preset("tiny-hybrid")
    trace = synthetic_trace(
        "agent",
        seed=0,
        agents=2,
        steps=3,
        system_len=16,
        context_len=(16, 40),
        step_len=(1, 8),
        response_len=(2, 9),
    )
    result = simulate(spec, trace, capacity_blocks=512, concurrency=2, state_slots=16)
    _check_order(result)
    state = result["no_reuse"].group("state")
    assert state.state_moves == len(trace) and state.hit_rate == 0.0
    assert result["no_reuse"].group("state").state_bytes == len(trace) * spec.state_bytes("state")
    assert result["per_group"].group("state").peak_blocks_in_use <= 16


# -- results and errors -----------------------------------------------------------------------


def test_table_and_dict():
    spec = preset("gpt-oss-20b")
    trace = synthetic_trace(
        "chat", seed=0, users=2, turns=2, system_len=64, user_len=(8, 32), response_len=(8, 32)
    )
    result = simulate(spec, trace, capacity_blocks=1000)
    text = result.table()
    for word in (
        "per-group",
        "single boundary",
        "no reuse",
        "sliding128",
        "full",
        "total",
        "per-group vs single boundary: saves",
    ):
        assert word in text
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data["policies"]) == set(POLICIES)
    assert data["savings"]["per_group_vs_single_boundary"]["bytes"] == result.savings()[0]
    assert data["policies"]["per_group"]["groups"][0]["group"] == "full"


def test_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    from kvtriton.viz import plot_simulation

    spec = preset("gpt-oss-20b")
    trace = synthetic_trace(
        "chat", seed=0, users=2, turns=2, system_len=64, user_len=(8, 32), response_len=(8, 32)
    )
    fig = plot_simulation(simulate(spec, trace, capacity_blocks=1000), tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert len(fig.axes) == 3  # bytes per group, transfer-time CDF, TTFT CDF


def test_a_policy_has_one_colour_in_every_panel_and_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_hex

    from kvtriton.plan import ReusePolicy
    from kvtriton.viz import (
        POLICY_STYLES,
        plot_policy_summary,
        plot_simulation,
        plot_sweep,
        plot_time_cdfs,
        plot_time_sweep,
    )

    spec = preset("gpt-oss-20b")
    trace = synthetic_trace("chat", seed=0, **SMALL_CHAT)
    result = simulate(spec, trace, capacity_blocks=1000)
    other = simulate(spec, trace, capacity_blocks=300)
    colour = {to_hex(POLICY_STYLES[p]["color"]): p for p in ReusePolicy}
    assert len(colour) == 3

    def line_policies(ax):
        return [
            colour[to_hex(line.get_color())]
            for line in ax.get_lines()
            if line.get_label()[0] != "_"
        ]

    figures = [
        plot_simulation(result),
        plot_time_cdfs({"a": result, "b": other}),
        plot_sweep({1000: result, 300: other}, "capacity"),
        plot_time_sweep({1000: result, 300: other}, "capacity"),
        plot_policy_summary({"a": result, "b": other}),
    ]
    seen = set()
    for fig in figures:
        for ax in fig.axes:
            for line in ax.get_lines():
                hexed = to_hex(line.get_color())
                named = re.fullmatch(r"(.+?)( p\d+)?", line.get_label()).group(1)
                if named in {p.label for p in ReusePolicy}:
                    p = colour[hexed]
                    assert named == p.label, (line.get_label(), p)
                    seen.add(p)
            for patch in ax.patches:
                assert to_hex(patch.get_facecolor()) in colour
        # one legend per figure, outside every axes: it covers no data
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        assert len(fig.legends) == 1
        box = fig.legends[0].get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer))
    assert seen == set(ReusePolicy)
    assert [p for p in line_policies(figures[1].axes[0])] == list(ReusePolicy.baseline_order())


def test_bad_arguments_are_refused():
    spec = preset("gpt-oss-20b")
    trace = synthetic_trace("chat", seed=0, users=1, turns=1, system_len=64)
    with pytest.raises(ValueError, match="exactly one of capacity"):
        simulate(spec, trace)
    with pytest.raises(ValueError, match="exactly one of capacity"):
        simulate(spec, trace, capacity_blocks=10, capacity_bytes=10)
    with pytest.raises(ValueError, match="policies"):
        simulate(spec, trace, capacity_blocks=100, policies=["greedy"])
    with pytest.raises(ValueError, match="does not fit the pool even alone"):
        simulate(spec, trace, capacity_blocks=3)
    with pytest.raises(ValueError, match="state_slots"):
        simulate(preset("tiny-hybrid"), trace, capacity_blocks=100, concurrency=4, state_slots=4)
    with pytest.raises(ValueError, match="unknown trace kind"):
        synthetic_trace("batch")
    with pytest.raises(ValueError, match="user_len"):
        synthetic_trace("chat", user_len=(10, 5))
    with pytest.raises(ValueError, match="seed"):
        synthetic_trace("agent", seed=-1)


# -- the kvtriton simulate command -------------------------------------------------------------

_SMALL_ARGS = [
    "--users",
    "2",
    "--turns",
    "2",
    "--system-len",
    "64",
    "--input-len",
    "8:32",
    "--output-len",
    "8:32",
]


def test_cli_simulate_table_json_plot_and_trace(tmp_path, capsys):
    from kvtriton.cli import main

    plot, saved = tmp_path / "p.png", tmp_path / "t.jsonl"
    args = ["simulate", "--preset", "gpt-oss-20b", *_SMALL_ARGS, "--save-trace", str(saved)]
    if _has_matplotlib():
        args += ["--plot", str(plot)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "per-group vs single boundary: saves" in out and "sliding128" in out
    assert (
        load_trace(saved).requests
        == synthetic_trace(
            "chat", users=2, turns=2, system_len=64, user_len=(8, 32), response_len=(8, 32)
        ).requests
    )
    if _has_matplotlib():
        assert plot.stat().st_size > 1000
    assert (
        main(
            [
                "simulate",
                "--preset",
                "gpt-oss-20b",
                "--trace",
                str(saved),
                "--json",
                "--capacity-blocks",
                "500",
                "--policies",
                "per_group,single_boundary",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert set(data["policies"]) == {"per_group", "single_boundary"}
    assert data["pool_blocks"] == {"full": 500, "sliding128": 500}


def test_cli_simulate_hf_config(capsys):
    pytest.importorskip("transformers")
    from kvtriton.cli import main

    assert main(["simulate", "--hf-config", "GptOssConfig", *_SMALL_ARGS]) == 0
    assert "gpt_oss (gpt-oss-120b) on trace 'chat'" in capsys.readouterr().out
    assert (
        main(
            [
                "simulate",
                "--hf-config",
                "Gemma3TextConfig",
                "--hf-set",
                "sliding_window=64",
                *_SMALL_ARGS,
            ]
        )
        == 0
    )
    assert "sliding64" in capsys.readouterr().out
    assert main(["simulate", "--preset", "gpt-oss-20b", "--hf-set", "sliding_window=64"]) == 2
    assert "--hf-set applies to --hf-config" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trace", "missing.jsonl"], "neither chat nor agent"),
        (["--context-len", "5:9"], "does not apply to --trace chat"),
        (["--capacity-blocks", "2"], "does not fit the pool even alone"),
        (["--policies", "per_group,bogus"], "policies must be"),
        (["--input-len", "9:3"], "MIN <= MAX"),
    ],
)
def test_cli_simulate_errors_are_one_line(args, message, capsys):
    from kvtriton.cli import main

    assert main(["simulate", "--preset", "gpt-oss-20b", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_block_hash_does_not_change_the_result():
    pytest.importorskip("xxhash")
    spec = preset("gpt-oss-20b")
    trace = synthetic_trace("chat", **SMALL_CHAT)
    a = simulate(spec, trace, capacity_blocks=400)
    b = simulate(spec, trace, capacity_blocks=400, hash_name="xxh3_128")
    assert a.to_dict() == b.to_dict()


def test_cli_simulate_time_options(tmp_path, capsys):
    from kvtriton.cli import main

    base = ["simulate", "--preset", "gpt-oss-20b", *_SMALL_ARGS, "--json"]
    assert main([*base, "--link", "direct", "--request-overhead-us", "7", "--rate", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    link = data["time_model"]["link"]
    assert link["name"] == "custom" and link["request_overhead_us"] == 7.0
    assert link["gbps"] == 2000.0 and link["estimate"] is True
    args = ["--link-gbps", "10", "--prefill-tokens-per-s", "5000", "--requests", "3"]
    assert main([*base, *args]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["time_model"]["link"]["gbps"] == 10.0 and data["trace"]["requests"] == 3
    assert data["time_model"]["prefill_tokens_per_s"] == 5000.0
    slow = data["policies"]["no_reuse"]["time"]["transfer_ms"]["mean"]
    assert main([*base, "--link-gbps", "1000", "--requests", "3"]) == 0
    fast = json.loads(capsys.readouterr().out)["policies"]["no_reuse"]["time"]["transfer_ms"]
    assert fast["mean"] < slow
    # a rate for a trace with timestamps, trace options for a synthetic trace: one-line errors
    timed = tmp_path / "t.jsonl"
    timed.write_text('{"id": "a", "prompt": [1, 2], "response": [3], "timestamp": 5}\n')
    for args, message in (
        (["--trace", str(timed), "--rate", "3"], "--rate applies to traces without arrival"),
        (["--trace-format", "mooncake"], "apply to trace files, not --trace chat"),
        (["--link", "ib"], "invalid choice: 'ib'"),
        (["--link-gbps", "0"], "must be > 0"),
        (["--prefill-tokens-per-s", "nan"], "must be a finite number"),
    ):
        assert main(["simulate", "--preset", "gpt-oss-20b", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
