"""kvtriton.adapter: receiver plans from cache state, commit/abort, sender coverage checks,
and an end-to-end move between two managers with different block sizes and layouts (plain
torch indexing, no kernels)."""

from __future__ import annotations

import pytest
import torch

from kvtriton.adapter import (
    abort_receive,
    complete_receive,
    prepare_receive,
    preview_plan,
    source_spans,
)
from kvtriton.cache import KVCacheManager, OutOfBlocksError, allocate_pools
from kvtriton.plan import plan_transfer
from kvtriton.ranges import TokenRange, needed_range
from kvtriton.spec import KVCacheSpec, preset
from kvtriton.testing import fill_positions, hybrid_spec, read_positions, write_positions


def hybrid(tokens_per_block: int) -> KVCacheSpec:
    return hybrid_spec(
        tokens_per_block,
        window=10,
        head_dim=4,
        full_layers=(0, 2),
        state_layers=(3,),
        state_shape=(2, 5),
        name="adapter-hybrid",
    )


def test_second_turn_per_group_moves_far_less_than_single_boundary() -> None:
    spec = preset("gpt-oss-20b")
    m = KVCacheManager(spec, {"full": 512, "sliding128": 16})
    turn1 = list(range(1, 801))
    m.allocate("t1", turn1, prefill=True)
    m.commit("t1")
    m.free("t1")
    m.evict(group="sliding128")  # the window pages of turn 1 are gone
    turn2 = [*turn1, *range(3000, 3100)]
    p = len(turn2)
    preview = {
        mode: preview_plan(m, turn2, num_draft_tokens=2, mode=mode)
        for mode in ("per_group", "single_boundary")
    }
    rx = prepare_receive(m, "t2", turn2, num_draft_tokens=2)
    assert rx.plan == preview["per_group"]
    assert rx.tokens == {
        "full": TokenRange(800, p),
        "sliding128": needed_range(spec.group("sliding128"), p),
    }
    assert preview["single_boundary"].group("full").tokens == TokenRange(0, p)
    assert rx.total_bytes < preview["single_boundary"].total_bytes / 3
    for name, span in rx.spans.items():
        span.check_covers(TokenRange(needed_range(spec.group(name), p).start, p + 2), 16)
    complete_receive(m, rx)
    assert m.match(turn2).cached["full"] == p // 16 * 16
    m.check_invariants()


def test_full_hit_moves_nothing_and_still_completes() -> None:
    spec = hybrid(4)
    m = KVCacheManager(spec, 32, num_state_slots=4)
    tokens = list(range(16))
    m.allocate("a", tokens, prefill=True)
    m.commit("a")
    rx = prepare_receive(m, "b", tokens)
    assert rx.plan.is_full_hit and rx.total_bytes == 0
    assert rx.tokens == {"full": TokenRange(16, 16), "swa": TokenRange(16, 16)}
    assert rx.states == ()
    assert rx.spans["full"].block_ids == m.spans("a")["full"].block_ids  # shared
    assert complete_receive(m, rx) == {"full": 0, "swa": 0, "ssm": 0}
    m.check_invariants()


def test_abort_publishes_nothing_and_returns_every_block() -> None:
    spec = hybrid(4)
    m = KVCacheManager(spec, 32, num_state_slots=4)
    m.allocate("a", list(range(12)), prefill=True)
    m.commit("a")
    m.free("a")
    stats = m.stats()
    rx = prepare_receive(m, "b", list(range(30)), mode="single_boundary")
    assert rx.mode == "single_boundary"
    abort_receive(m, rx)
    assert m.stats() == stats
    assert m.match(list(range(30))).cached["full"] == 12
    assert "b" not in m
    m.check_invariants()


def test_prepare_receive_out_of_blocks_allocates_nothing() -> None:
    spec = hybrid(4)
    m = KVCacheManager(spec, {"full": 4, "swa": 8}, num_state_slots=2)
    stats = m.stats()
    with pytest.raises(OutOfBlocksError, match="request 'big': group 'full'"):
        prepare_receive(m, "big", list(range(17)))
    assert m.stats() == stats and m.requests == ()


def test_source_spans_checks_coverage_and_names_group_and_positions() -> None:
    spec = hybrid(4)
    tx = KVCacheManager(spec, 32, num_state_slots=2)
    tokens = list(range(20))
    tx.allocate("r", tokens, prefill=True)
    plan = plan_transfer(spec, 20, {"full": 8, "swa": 0})
    src = source_spans(tx, "r", plan)
    assert src.tokens == {"full": TokenRange(8, 20), "swa": TokenRange(11, 20)}
    assert src.states == ("ssm",)
    assert src.state_slots == tx.state_slots("r")
    assert src.spans == tx.spans("r")
    # decode on: the window slides past what the receiver asked for
    tx.append("r", list(range(20, 28)))
    tx.slide("r")
    with pytest.raises(
        ValueError,
        match=r"group 'swa'.*sender.*does not cover positions "
        r"\[11, 16\)",
    ):
        source_spans(tx, "r", plan)
    with pytest.raises(
        ValueError,
        match=r"request 'r': group 'full': positions \[28, 30\) "
        r"are past the sender's sequence of 28",
    ):
        source_spans(tx, "r", {"full": TokenRange(0, 30)})
    with pytest.raises(ValueError, match="holds no groups \\['mamba'\\]"):
        source_spans(tx, "r", {"full": TokenRange(0, 4)}, states=["mamba"])
    with pytest.raises(KeyError, match="request 'zz' is not live"):
        source_spans(tx, "zz", plan)


def test_pipeline_stage_sender_skips_groups_it_does_not_hold() -> None:
    spec = hybrid(4)
    stage = spec.stage(1, 2)  # layers 2, 3: full (layer 2) and the state group
    assert stage.group_names == ("full", "ssm")
    tx = KVCacheManager(stage, 16, num_state_slots=2)
    tx.allocate("r", list(range(9)), prefill=True)
    plan = plan_transfer(spec, 9, 0)
    src = source_spans(tx, "r", plan)
    assert set(src.spans) == {"full"} and src.states == ("ssm",)


@pytest.mark.parametrize("tx_layout, rx_layout", [("NHD", "HND"), ("HND", "NHD")])
@pytest.mark.parametrize("mode", ["per_group", "single_boundary"])
def test_end_to_end_move_between_block_sizes(tx_layout: str, rx_layout: str, mode: str) -> None:
    """Sender B=4 prefilled 30 tokens; receiver B=8 holds turn 1 (the first 16) in its prefix
    cache. After the move, every needed position of every group holds the sender's values."""
    tokens = [7 + 3 * i for i in range(30)]
    tx_spec, rx_spec = hybrid(4), hybrid(8)
    tx_pools = allocate_pools(tx_spec, 16, num_state_slots=2, layout=tx_layout)
    rx_pools = allocate_pools(rx_spec, 16, num_state_slots=3, layout=rx_layout)
    tx = KVCacheManager(tx_spec, pools=tx_pools)
    rx_m = KVCacheManager(rx_spec, pools=rx_pools)
    # sender prefill
    a = tx.allocate("r", tokens, prefill=True)
    for name, span in a.spans.items():
        start = span.first_block * 4
        fill_positions(tx_pools.kv[name], name, span, TokenRange(start, 30), tokens, 4)
    tx_pools.state["ssm"][:, a.state_slots["ssm"]] = 3.25
    # receiver turn 1: the first 16 tokens, prefilled there and committed
    t1 = rx_m.allocate("turn1", tokens[:16], prefill=True)
    for name, span in t1.spans.items():
        fill_positions(
            rx_pools.kv[name], name, span, TokenRange(span.first_block * 8, 16), tokens, 8
        )
    rx_m.commit("turn1")
    rx_m.free("turn1")

    rx = prepare_receive(rx_m, "r", tokens, num_draft_tokens=1, mode=mode)
    src = source_spans(tx, "r", rx.plan)
    for name, rng in rx.tokens.items():
        packed = read_positions(tx_pools.kv[name], src.spans[name], rng, 4)
        write_positions(rx_pools.kv[name], rx.spans[name], rng, 8, packed)
    for name in rx.states:
        rx_pools.state[name][:, rx.state_slots[name]] = tx_pools.state[name][
            :, src.state_slots[name]
        ]
    complete_receive(rx_m, rx)

    assert rx.tokens["full"].start == 16
    assert rx.states == ("ssm",)  # P=30 is no block boundary: the state always moves
    for name in ("full", "swa"):
        need = needed_range(rx_spec.group(name), 30)
        got = read_positions(rx_pools.kv[name], rx.spans[name], need, 8)
        want = read_positions(tx_pools.kv[name], tx.spans("r")[name], need, 4)
        assert torch.equal(got, want), name
    assert torch.all(rx_pools.state["ssm"][:, rx.state_slots["ssm"]] == 3.25)
    # what the receiver published is matchable and correct for a longer prompt
    match = rx_m.match([*tokens, 1, 2])
    assert match.cached["full"] == 24
    rx_m.check_invariants()
