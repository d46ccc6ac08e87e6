"""Which sender ranks a receiver rank asks, for which layers and heads (pure Python)."""

from __future__ import annotations

import itertools

import pytest

from kvtriton.ranges import TokenRange
from kvtriton.spec import KVCacheSpec, LayerGroup, preset
from kvtriton.transfer.chunking import plan_chunks
from kvtriton.transfer.topology import Topology

TOPOLOGIES = [
    (1, 1, 1, 1),
    (2, 1, 1, 1),
    (1, 1, 2, 1),
    (1, 2, 1, 1),
    (1, 2, 2, 1),
    (2, 2, 1, 2),
    (1, 1, 1, 2),
    (2, 1, 2, 2),
    (1, 3, 1, 2),
]


def _spec() -> KVCacheSpec:
    # 4 kv heads in "full", 2 in "sliding", 1 in "mqa" (replicated for tp >= 2), a state.
    return KVCacheSpec(
        (
            LayerGroup("full", "full", (0, 3, 6), num_kv_heads=4, head_dim=8),
            LayerGroup("sliding", "sliding", (1, 4), num_kv_heads=2, head_dim=8, window=5),
            LayerGroup("mqa", "full", (2,), num_kv_heads=1, head_dim=8),
            LayerGroup("state", "state", (5, 7), state_shape=(4, 3), state_dtype="float32"),
        ),
        tokens_per_block=4,
        dtype="bfloat16",
        name="topo-test",
    )


def _cells(spec: KVCacheSpec) -> set[tuple[str, int, int]]:
    """(group, layer, head) cells a shard holds."""
    out = set()
    for g in spec.groups:
        lo, hi = (
            (g.state_head_start, g.state_head_end)
            if g.kind == "state"
            else (g.head_start, g.head_end)
        )
        for layer in g.layer_ids:
            for h in range(lo, hi):  # type: ignore[arg-type]
                out.add((g.name, layer, h))
    return out


@pytest.mark.parametrize("ctx_tp,ctx_pp,gen_tp,gen_pp", [*TOPOLOGIES, (4, 1, 1, 1), (1, 1, 4, 1)])
def test_each_receiver_cell_is_asked_exactly_once_from_a_holder(
    ctx_tp: int, ctx_pp: int, gen_tp: int, gen_pp: int
) -> None:
    topo = Topology(_spec(), ctx_tp, ctx_pp, gen_tp, gen_pp)
    for r in topo.gen_ranks:
        wanted = _cells(topo.spec(r))
        asked: list[tuple[str, int, int]] = []
        for src in topo.sources(r):
            held = _cells(topo.spec(src.sender))
            for g, layers in src.layers.items():
                lo, hi = src.heads[g]
                cells = [(g, layer, h) for layer in layers for h in range(lo, hi)]
                assert set(cells) <= held, f"rank {src.sender} does not hold {g}"
                asked.extend(cells)
        assert sorted(asked) == sorted(wanted), (r, topo.sources(r))


def test_named_cases() -> None:
    m = preset("tiny-hybrid")  # 2 kv heads; layers: sliding 0,2,5 full 1,4 state 3
    t = Topology(m, 2, 1, 1, 1)  # tp2 -> tp1: both senders, one head each
    s = t.sources(2)
    assert [x.sender for x in s] == [0, 1]
    assert s[0].heads["full"] == (0, 1) and s[1].heads["full"] == (1, 2)
    assert s[0].layers["full"] == (1, 4)
    t = Topology(m, 1, 1, 2, 1)  # tp1 -> tp2: each receiver asks rank 0 for its head
    assert [(x.sender, x.heads["sliding8"]) for x in t.sources(1)] == [(0, (0, 1))]
    assert [(x.sender, x.heads["sliding8"]) for x in t.sources(2)] == [(0, (1, 2))]
    t = Topology(m, 1, 2, 1, 1)  # pp2 -> pp1: stage 0 holds layers 0-2, stage 1 3-5
    s = t.sources(2)
    assert dict(s[0].layers) == {"full": (1,), "sliding8": (0, 2)}
    assert dict(s[1].layers) == {"full": (4,), "sliding8": (5,), "state": (3,)}
    t = Topology(m, 1, 2, 2, 1)  # tp1pp2 -> tp2pp1
    assert [x.sender for x in t.sources(3)] == [0, 1]
    assert all(x.heads["full"] == (1, 2) for x in t.sources(3))
    assert t.peers(0) == (2, 3) and t.peers(3) == (0, 1)


def test_replicated_heads_are_asked_from_one_replica_and_spread() -> None:
    spec = _spec()
    t = Topology(spec, 4, 1, 2, 1)  # "mqa" has 1 head on 4 ctx ranks; 2 receivers
    chosen = []
    for r in t.gen_ranks:
        senders = [x.sender for x in t.sources(r) if "mqa" in x.layers]
        assert len(senders) == 1
        chosen.append(senders[0])
    assert len(set(chosen)) == 2  # the two receivers use different replicas


def test_rank_layout_and_errors() -> None:
    t = Topology(_spec(), 2, 2, 1, 2)
    assert t.world_size == 6 and t.ctx_ranks == (0, 1, 2, 3) and t.gen_ranks == (4, 5)
    i = t.info(3)
    assert (i.side, i.tp_rank, i.pp_rank) == ("ctx", 1, 1)
    assert t.info(5).pp_rank == 1
    with pytest.raises(ValueError, match="context rank"):
        t.sources(0)
    with pytest.raises(ValueError, match="outside the world"):
        t.info(6)
    with pytest.raises(ValueError, match="cannot be split"):
        Topology(_spec(), 3, 1, 1, 1)
    with pytest.raises(ValueError, match="unsharded"):
        Topology(_spec().shard(0, 2))
    with pytest.raises(ValueError, match="ctx_tp"):
        Topology(_spec(), 0)


def test_receiver_block_size_may_differ() -> None:
    t = Topology(_spec(), 1, 1, 1, 1, gen_tokens_per_block=7)
    assert t.spec(1).tokens_per_block == 7 and t.spec(0).tokens_per_block == 4
    assert t.spec(0).model_digest() == t.spec(1).model_digest()


@pytest.mark.parametrize("chunk_bytes", [1, 100, 300, 1000, 10**9])
def test_chunks_partition_the_request_exactly(chunk_bytes: int) -> None:
    spec = _spec()
    t = Topology(spec, 2, 1, 1, 1)
    src = t.sources(2)[1]
    tokens = {"full": TokenRange(3, 29), "sliding": TokenRange(25, 29), "mqa": TokenRange(0, 0)}
    chunks = plan_chunks(
        spec, tokens, ["state"], layers=src.layers, heads=src.heads, chunk_bytes=chunk_bytes
    )
    assert [c.index for c in chunks] == list(range(len(chunks)))
    # every position of every group exactly once, in order; state once
    for g, rng in tokens.items():
        got = list(itertools.chain.from_iterable(c.tokens[g] for c in chunks if g in c.tokens))
        assert got == list(rng)
    assert sum(c.states.count("state") for c in chunks) == 1
    for c in chunks:
        one_token = all(len(r) == 1 for r in c.tokens.values()) and len(c.tokens) == 1
        assert c.nbytes <= chunk_bytes or one_token or (c.states and not c.tokens)
        for seg in c.layout.segments:
            assert seg.heads == src.heads[seg.group]
            assert seg.layer_ids == tuple(src.layers[seg.group])
    if chunk_bytes >= 10**9:
        assert len(chunks) == 1


def test_nothing_to_move_plans_no_chunk() -> None:
    spec = _spec()
    assert (
        plan_chunks(spec, {"full": TokenRange(5, 5)}, [], layers={}, heads={}, chunk_bytes=64) == ()
    )
    with pytest.raises(ValueError, match="chunk_bytes"):
        plan_chunks(spec, {}, [], layers={}, heads={}, chunk_bytes=0)
