"""Mooncake-format traces: the importer (edge cases, one-line errors naming file and line),
the tokens it makes, and exact bytes through the simulator against a token-level reference.

Every trace here is hand-made in the test; the public trace is not part of the suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtriton.sim import BlockTokens, Trace, load_trace, simulate
from kvtriton.sim.mooncake import block_token, response_token
from kvtriton.spec import KVCacheSpec, LayerGroup


def write(path: Path, records: list[object], *, blank_after: int | None = None) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def rec(ts: float, n: int, out: int, ids: list[int]) -> dict[str, object]:
    return {"timestamp": ts, "input_length": n, "output_length": out, "hash_ids": ids}


# -- the importer ---------------------------------------------------------------------------


def test_partial_last_block_and_repeated_ids_give_equal_tokens(tmp_path: Path) -> None:
    path = write(
        tmp_path / "t.jsonl",
        [
            rec(0, 1200, 3, [7, 8, 9]),  # 512 + 512 + 176 (partial)
            rec(5, 1100, 2, [7, 8, 9]),  # the same blocks, a shorter partial tail
            rec(9, 600, 1, [7, 4]),  # shares block 7 only
            rec(9, 40, 1, [9]),  # id 9 at block 0 of another prompt
        ],
    )
    trace = load_trace(path)
    assert [len(r.prompt) for r in trace] == [1200, 1100, 600, 40]
    ta, tb, tc, td = (list(r.prompt_ids()) for r in trace)
    assert ta[:1100] == tb  # equal ids: equal tokens, partial last block included
    assert ta[:512] == tc[:512] and ta[512:600] != tc[512:600]
    assert td == ta[1024:1064]  # token j of block h depends on (h, j) only
    assert ta[1024] == block_token(9, 0) and ta[1199] == block_token(9, 175)
    assert len(set(ta)) == 1200  # distinct positions, distinct ids
    # responses are unique per request
    responses = [list(r.response) for r in trace]
    assert [len(x) for x in responses] == [3, 2, 1, 1]
    assert len({t for x in responses for t in x}) == 7
    assert responses[0][0] == response_token(1, 0)
    assert not set(responses[0]) & set(ta)
    # ids, sessions, arrivals (seconds), the format
    assert [r.request_id for r in trace] == ["line1", "line2", "line3", "line4"]
    assert len({r.session for r in trace}) == 4
    assert [r.arrival for r in trace] == [0.0, 0.005, 0.009, 0.009]
    assert trace.fmt == "mooncake" and trace.name == "t"


def test_prompt_tokens_are_made_on_use_and_index_like_a_list(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path / "t.jsonl", [rec(0, 1030, 1, [1, 2, 3])]))
    prompt = trace.requests[0].prompt
    assert isinstance(prompt, BlockTokens) and "1030 tokens in 3 blocks" in repr(prompt)
    full = prompt.array()
    for i in (0, 511, 512, 1029, -1):
        assert prompt[i] == full[i]
    assert list(prompt[500:520]) == list(full[500:520])
    assert prompt == BlockTokens([1, 2, 3], 1030, 512) == list(full)
    assert prompt != BlockTokens([1, 2, 4], 1030, 512)
    with pytest.raises(IndexError):
        prompt[1030]
    with pytest.raises(ValueError, match="need 3 block ids, got 2"):
        BlockTokens([1, 2], 1030, 512)


def test_requests_are_sorted_by_timestamp_stably(tmp_path: Path) -> None:
    trace = load_trace(
        write(tmp_path / "t.jsonl", [rec(30, 4, 1, [1]), rec(10, 4, 1, [2]), rec(30, 4, 1, [3])])
    )
    assert [r.request_id for r in trace] == ["line2", "line1", "line3"]
    assert [r.arrival for r in trace] == [0.01, 0.03, 0.03]


def test_block_tokens_option_and_forced_formats(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [rec(0, 20, 1, [1, 2, 3])])  # 8-token blocks
    with pytest.raises(ValueError, match=r"t\.jsonl: line 1: input_length 20 in blocks of 512"):
        load_trace(path)
    trace = load_trace(path, block_tokens=8)
    assert list(trace.requests[0].prompt_ids())[16:] == [block_token(3, j) for j in range(4)]
    assert load_trace(path, trace_format="mooncake", block_tokens=8).requests == trace.requests
    with pytest.raises(ValueError, match="Mooncake-format record"):
        load_trace(path, trace_format="kvtriton")
    own = write(tmp_path / "own.jsonl", [{"id": "a", "prompt": [1, 2], "response": [3]}])
    with pytest.raises(ValueError, match="block_tokens applies to Mooncake-format traces only"):
        load_trace(own, block_tokens=8)
    with pytest.raises(ValueError, match="no hash_ids"):
        load_trace(own, trace_format="mooncake")


def test_save_writes_the_mooncake_records_back(tmp_path: Path) -> None:
    records = [rec(0, 600, 2, [1, 2]), rec(3, 100, 1, [1])]
    trace = load_trace(write(tmp_path / "t.jsonl", records))
    trace.save(tmp_path / "again.jsonl")
    again = load_trace(tmp_path / "again.jsonl")
    assert again.requests == trace.requests
    assert [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()] == (
        records
    )
    assert trace.head(1).requests == trace.requests[:1] and len(trace.head(1).records) == 1


def test_empty_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the trace holds no request"):
        load_trace(path)
    with pytest.raises(ValueError, match=r"empty\.jsonl: the trace holds no request"):
        load_trace(path, trace_format="mooncake")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{oops", "line 3 is not JSON"),
        ("[1, 2]", "line 3: expected a JSON object, got list"),
        (
            {"timestamp": 1, "input_length": 4, "hash_ids": [1]},
            "line 3: missing field 'output_length'",
        ),
        (
            {"input_length": 4, "output_length": 1, "hash_ids": [1]},
            "line 3: missing field 'timestamp'",
        ),
        (
            {"timestamp": 1, "output_length": 1, "hash_ids": [1]},
            "line 3: missing field 'input_length'",
        ),
        (rec(1, 0, 1, []), r"line 3: input_length must be an int >= 1, got 0"),
        (rec(1, 4, -1, [1]), r"line 3: output_length must be an int >= 0, got -1"),
        (rec(1, 4.0, 1, [1]), r"line 3: input_length must be an int >= 1, got 4.0"),
        (rec(1, True, 1, [1]), r"line 3: input_length must be an int >= 1, got True"),
        (rec(-5, 4, 1, [1]), r"line 3: timestamp must be a number of milliseconds >= 0"),
        (rec("3", 4, 1, [1]), r"line 3: timestamp must be a number of milliseconds >= 0"),
        (rec(1, 4, 1, [1, -2]), r"line 3: hash_ids must be a list of ints in \[0, 2\*\*64\)"),
        (rec(1, 4, 1, "12"), r"line 3: hash_ids must be a list"),
        (
            rec(1, 513, 1, [1]),
            r"line 3: input_length 513 in blocks of 512 tokens needs 2 hash_ids, "
            r"the record has 1",
        ),
        (rec(1, 4, 1, [1, 2]), r"needs 1 hash_ids, the record has 2"),
        ({"id": "x", "prompt": [1], "response": [1]}, "line 3: no hash_ids"),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path: Path, bad: object, message: str) -> None:
    # line 2 is blank: the error counts file lines, not records
    path = write(tmp_path / "bad.jsonl", [rec(0, 4, 1, [1]), bad], blank_after=1)
    with pytest.raises(ValueError, match=message) as info:
        load_trace(path)
    text = str(info.value)
    assert text.startswith(f"{path}: line 3") and "\n" not in text


def test_extra_fields_are_ignored_and_output_zero_is_one_token(tmp_path: Path) -> None:
    trace = load_trace(
        write(tmp_path / "t.jsonl", [{**rec(0, 4, 0, [1]), "session_id": "s", "x": [1]}])
    )
    assert len(trace.requests[0].response) == 1


def test_the_kvtriton_format_reports_lines_and_takes_timestamps(tmp_path: Path) -> None:
    path = write(
        tmp_path / "own.jsonl",
        [
            {"id": "a", "prompt": [1, 2], "response": [3], "timestamp": 250},
            {"id": "b", "prompt": [1, 2], "response": [3], "timestamp": 100},
        ],
        blank_after=1,
    )
    with pytest.raises(ValueError, match=r"own\.jsonl: line 3 \(request 'b'\): timestamp 100"):
        load_trace(path)
    ok = write(
        tmp_path / "ok.jsonl", [{"id": "a", "prompt": [1], "response": [3], "timestamp": 250}]
    )
    assert load_trace(ok).requests[0].arrival == 0.25


# -- exact bytes against a token-level reference --------------------------------------------

B, W, TRACE_BLOCK = 4, 9, 8


def _spec() -> KVCacheSpec:
    return KVCacheSpec(
        (
            LayerGroup("full", "full", (0, 2), num_kv_heads=2, head_dim=8),
            LayerGroup("sw", "sliding", (1,), num_kv_heads=1, head_dim=8, window=W),
        ),
        tokens_per_block=B,
        dtype="float16",
        name="ref",
    )


def reference_moved(prompts: list[list[tuple[int, int]]], mode: str) -> dict[str, int]:
    """Tokens each group moves over the prompts, one request at a time, with room to spare
    and one-token responses (nothing is decoded), from DESIGN.md §1 and the receiver's
    publication rule, written position by position. A token is the pair (trace block id, j)
    -- all that the Mooncake format says about it. A block is held when a full block with
    the same prefix (all tokens up to its end) was published in that group."""
    held: dict[str, set[tuple]] = {"full": set(), "sw": set()}
    moved = {"full": 0, "sw": 0}
    for p in prompts:
        n = len(p)
        start = max(0, n + 1 - W)  # needed(sw, P).start

        def holds(group: str, b: int, p: list = p) -> bool:
            return tuple(p[: (b + 1) * B]) in held[group]

        k = 0  # full attention: the run of held blocks from block 0
        while (k + 1) * B <= n and holds("full", k):
            k += 1
        b0 = start // B  # sliding: the run from the block holding needed.start
        k2 = 0
        while (b0 + k2 + 1) * B <= n and holds("sw", b0 + k2):
            k2 += 1
        if mode == "per_group":
            cached = {"full": k * B, "sw": (b0 + k2) * B if k2 else start}
            reused = {"full": range(0, k), "sw": range(b0, b0 + k2)}
        elif mode == "single_boundary":
            c = 0  # the largest j*B, j <= k, whose sliding window below it is held
            for j in range(k, 0, -1):
                if all(holds("sw", b) for b in range(max(0, j * B + 1 - W) // B, j)):
                    c = j * B
                    break
            cached = {"full": c, "sw": c}
            reused = {"full": range(0, c // B), "sw": range(b0, max(b0, c // B))}
        else:
            cached, reused = {"full": 0, "sw": 0}, {"full": range(0), "sw": range(0)}
        for g, first in (("full", 0), ("sw", start)):
            received_from = max(cached[g], first)
            moved[g] += n - received_from
            if mode == "no_reuse":
                continue  # never publishes
            for b in range(first // B, n // B):  # the full blocks of the span
                if b in reused[g] or b * B >= received_from:
                    held[g].add(tuple(p[: (b + 1) * B]))
    return moved


def test_exact_bytes_on_a_hand_made_mooncake_trace(tmp_path: Path) -> None:
    records = [
        rec(0, 20, 1, [1, 2, 3]),  # blocks of 8: 8 + 8 + 4 (partial)
        rec(10, 23, 1, [1, 2, 4]),  # shares 16 tokens: 4 blocks of 4
        rec(20, 22, 1, [1, 2, 3]),  # repeats #1's ids, 2 tokens longer in the partial block
        rec(30, 6, 1, [1]),  # a partial first block: 6 tokens of block 1
        rec(40, 17, 1, [5, 6, 7]),  # nothing shared
        rec(50, 16, 0, [1, 2]),  # exactly 2 full trace blocks
        rec(60, 24, 1, [1, 2, 4]),  # extends #2 by one token
    ]
    trace = load_trace(write(tmp_path / "hand.jsonl", records), block_tokens=TRACE_BLOCK)
    prompts = [
        [(r["hash_ids"][i // TRACE_BLOCK], i % TRACE_BLOCK) for i in range(r["input_length"])]
        for r in records
    ]
    spec = _spec()
    result = simulate(spec, trace, capacity_blocks=256, concurrency=1)
    for policy in ("per_group", "single_boundary", "no_reuse"):
        want = reference_moved(prompts, policy)
        got = result[policy]
        for g in ("full", "sw"):
            assert got.group(g).moved_tokens == want[g], (policy, g)
            assert got.group(g).kv_bytes == want[g] * spec.bytes_per_token(g), (policy, g)
    # the reference is not vacuous: per group reuses what the single boundary cannot
    assert (
        reference_moved(prompts, "per_group")["full"]
        < reference_moved(prompts, "single_boundary")["full"]
        < reference_moved(prompts, "no_reuse")["full"]
    )


def test_a_trace_object_round_trips_through_the_cli(tmp_path: Path, capsys) -> None:
    from kvtriton.cli import main

    path = write(
        tmp_path / "m.jsonl", [rec(0, 40, 3, [1, 2, 3, 4, 5]), rec(5, 30, 2, [1, 2, 3, 6])]
    )
    args = ["simulate", "--preset", "gpt-oss-20b", "--trace", str(path), "--trace-block-tokens"]
    assert main([*args, "8", "--json", "--capacity-blocks", "64"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trace"]["requests"] == 2 and data["trace"]["prompt_tokens"] == 70
    for policy in ("per_group", "single_boundary", "no_reuse"):
        time = data["policies"][policy]["time"]
        assert set(time["ttft_ms"]) == {"p50", "p90", "p99", "mean"}
        assert set(time["transfer_ms"]) == {"p50", "p90", "p99", "mean"}
    assert main([*args, "7"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: line 1: input_length 40 in blocks of 7 tokens needs 6 hash_ids" in err
    assert err.count("\n") == 1
    assert isinstance(load_trace(path, block_tokens=8), Trace)


def test_prefix_family_samples_keep_families_whole(tmp_path: Path) -> None:
    from kvtriton.sim.mooncake import sample_prefix_families

    records = [rec(10 * i, 600, 1, [i % 5, 100 + i]) for i in range(40)]  # 5 families of 8
    trace = load_trace(write(tmp_path / "t.jsonl", records))
    half = sample_prefix_families(trace, 0.4, seed=3)
    families = {r.prompt.hash_ids[0] for r in half}
    assert len(families) == 2 and len(half) == 16  # 2 of 5 first ids, every request of each
    assert [r.request_id for r in half] == [
        r.request_id for r in trace if r.prompt.hash_ids[0] in families
    ]
    assert [rec["hash_ids"][0] for rec in half.records] == [r.prompt.hash_ids[0] for r in half]
    assert sample_prefix_families(trace, 0.4, seed=3).requests == half.requests
    assert sample_prefix_families(trace, 1.0).requests == trace.requests
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        sample_prefix_families(trace, 0)
    own = load_trace(write(tmp_path / "own.jsonl", [{"id": "a", "prompt": [1], "response": [2]}]))
    with pytest.raises(ValueError, match="needs a Mooncake-format trace"):
        sample_prefix_families(own, 0.5)
    dense = trace.scale_arrivals(0.5)
    assert [r.arrival for r in dense] == [r.arrival / 2 for r in trace]
    with pytest.raises(ValueError, match="factor must be a number > 0"):
        trace.scale_arrivals(0)
