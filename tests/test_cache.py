"""Unit and example tests of kvtriton.cache: hashes, pools, the manager's matching rules,
capacity errors, eviction, and the GPT-OSS second-turn scenario."""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvtriton.cache import (
    HASH_NAMES,
    BlockPool,
    KVCacheManager,
    OutOfBlocksError,
    allocate_pools,
    blocks_for_bytes,
    chain_hashes,
    encode_tokens,
    pool_bytes,
    root_hash,
)
from kvtriton.plan import compare_policies, plan_transfer, single_boundary
from kvtriton.ranges import ceil_div, needed_range
from kvtriton.spec import KVCacheSpec, LayerGroup, preset
from kvtriton.testing import brute_force_match, hybrid_spec

B = 4


def hybrid(window: int = 6, tokens_per_block: int = B) -> KVCacheSpec:
    return hybrid_spec(tokens_per_block, window=window)


def snapshot(m: KVCacheManager) -> tuple:
    """Everything observable about a manager's bookkeeping (for no-change checks)."""
    refs = {g: tuple(m.refcount(g, b) for b in range(m.num_blocks(g))) for g in m.spec.group_names}
    tags = {
        g: tuple(m.block_hash(g, b) for b in range(m.num_blocks(g))) for g in m.spec.group_names
    }
    reqs = {r: m.request(r) for r in m.requests}
    evictable = {g: m.evictable(g) for g in m.spec.group_names}
    return m.stats(), refs, tags, reqs, evictable


# ---------------------------------------------------------------------------------------
# hashes
# ---------------------------------------------------------------------------------------


def test_hash_chain_matches_its_documented_definition() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    root = hashlib.sha256(b"kvtriton/block-hash/v1\x00" + b"\x00").digest()
    assert root_hash(None) == root
    h0 = hashlib.sha256(root + struct.pack("<4Q", 1, 2, 3, 4)).digest()
    h1 = hashlib.sha256(h0 + struct.pack("<4Q", 5, 6, 7, 8)).digest()
    assert chain_hashes(encode_tokens(tokens), 4, root) == [h0, h1]  # the partial block has none
    # a suffix of the chain from its parent equals the tail of the full chain
    assert chain_hashes(encode_tokens(tokens), 4, h0, start_block=1) == [h1]


def test_hash_is_stable_across_processes_and_hash_seeds() -> None:
    code = (
        "from kvtriton.cache import chain_hashes, encode_tokens, root_hash;"
        "print(chain_hashes(encode_tokens(list(range(40))), 8, root_hash('lora-a'))[-1].hex())"
    )
    outs = set()
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.add(out.stdout.strip())
    local = chain_hashes(encode_tokens(list(range(40))), 8, root_hash("lora-a"))[-1].hex()
    assert outs == {local}


def test_extra_key_and_block_size_change_every_hash() -> None:
    data = encode_tokens(list(range(16)))
    plain = chain_hashes(data, 4, root_hash(None))
    salted = chain_hashes(data, 4, root_hash("lora"))
    as_bytes = chain_hashes(data, 4, root_hash(b"lora"))
    assert not set(plain) & set(salted)
    assert salted != as_bytes  # str and bytes keys are tagged differently
    assert not set(plain) & set(chain_hashes(data, 8, root_hash(None)))
    assert root_hash(b"") != root_hash(None)


def test_xxh3_chain_matches_its_definition_and_never_meets_sha256() -> None:
    xxhash = pytest.importorskip("xxhash")
    tokens = list(range(1, 10))
    root = xxhash.xxh3_128_digest(b"kvtriton/block-hash/v1\x00xxh3_128\x00" + b"\x00")
    assert root_hash(None, hash_name="xxh3_128") == root
    h0 = xxhash.xxh3_128_digest(root + struct.pack("<4Q", 1, 2, 3, 4))
    h1 = xxhash.xxh3_128_digest(h0 + struct.pack("<4Q", 5, 6, 7, 8))
    data = encode_tokens(tokens)
    assert chain_hashes(data, 4, root, hash_name="xxh3_128") == [h0, h1]
    assert chain_hashes(data, 4, h0, start_block=1, hash_name="xxh3_128") == [h1]
    assert not set(chain_hashes(data, 4, root_hash(None))) & {h0, h1}
    with pytest.raises(ValueError, match=r"hash_name must be one of \('sha256', 'xxh3_128'\)"):
        KVCacheManager(hybrid(), 8, num_state_slots=2, hash_name="md5")  # type: ignore[arg-type]


@pytest.mark.parametrize("hash_name", HASH_NAMES)
def test_every_hash_gives_the_same_cache_behaviour(hash_name: str) -> None:
    pytest.importorskip("xxhash") if hash_name == "xxh3_128" else None
    results = []
    for name in ("sha256", hash_name):
        m = KVCacheManager(hybrid(window=6), 16, num_state_slots=4, hash_name=name)  # type: ignore[arg-type]
        prefilled(m, "a", list(range(24)))
        m.free("a")
        match = m.match([*range(24), 99, 98, 97, 96])
        alloc = m.allocate("b", match)
        m.check_invariants()
        results.append((match.cached, match.boundary, alloc.reused_blocks, alloc.state_hits))
    assert results[0] == results[1]


def test_encode_tokens_validates() -> None:
    assert encode_tokens(torch.tensor([1, 2])) == encode_tokens([1, 2])
    with pytest.raises(ValueError, match="token ids must be in"):
        encode_tokens([1, -2])
    with pytest.raises(TypeError, match="must be ints"):
        encode_tokens([1, 2.5])
    with pytest.raises(TypeError):
        encode_tokens("abc")


# ---------------------------------------------------------------------------------------
# pools
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_pool_shapes_and_layouts(layout: str) -> None:
    spec = hybrid()
    pools = allocate_pools(spec, {"full": 5, "swa": 3}, num_state_slots=2, layout=layout)
    full = pools.kv["full"]
    assert full.shape == (2, 5, 2, B, 2, 2)
    assert full.stride(-1) == 1
    if layout == "NHD":
        assert full.is_contiguous()
    else:
        assert full.stride(4) == B * 2 and full.stride(3) == 2  # heads outer, tokens inner
        assert full.permute(0, 1, 2, 4, 3, 5).is_contiguous()
    assert pools.kv["swa"].shape == (1, 3, 2, B, 2, 2)
    assert pools.state["ssm"].shape == (1, 2, 2, 3)
    assert pools.state["ssm"].dtype == torch.float32
    assert pools.num_blocks == {"full": 5, "swa": 3}
    assert pools.num_state_slots == 2
    assert pools.nbytes == pool_bytes(spec, {"full": 5, "swa": 3}, 2)
    assert pools["ssm"] is pools.state["ssm"]


def test_pools_of_a_tp_shard_hold_local_heads() -> None:
    spec = preset("gpt-oss-20b").shard(1, 4)
    pools = allocate_pools(spec, 2, device="cpu")
    assert pools.kv["full"].shape == (12, 2, 2, 16, 2, 64)
    assert pools.kv["full"].dtype == torch.bfloat16


def test_capacity_by_bytes() -> None:
    spec = hybrid()
    per_block = spec.bytes_per_block("full") + spec.bytes_per_block("swa")
    state = spec.state_bytes("ssm")
    n = blocks_for_bytes(spec, 10 * per_block + 2 * state + per_block - 1, num_state_slots=2)
    assert n == 10
    pools = allocate_pools(spec, num_bytes=10 * per_block + 2 * state, num_state_slots=2)
    assert pools.num_blocks == {"full": 10, "swa": 10}
    assert pools.nbytes <= 10 * per_block + 2 * state
    with pytest.raises(ValueError, match="do not fit one block"):
        blocks_for_bytes(spec, per_block - 1)
    with pytest.raises(ValueError, match="exactly one of"):
        allocate_pools(spec, 4, num_bytes=10**6, num_state_slots=1)
    with pytest.raises(ValueError, match="num_state_slots must be >= 1"):
        allocate_pools(spec, 4)
    with pytest.raises(ValueError, match="layout"):
        allocate_pools(spec, 4, num_state_slots=1, layout="HDN")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no count for attention groups"):
        allocate_pools(spec, {"full": 3}, num_state_slots=1)


# ---------------------------------------------------------------------------------------
# matching
# ---------------------------------------------------------------------------------------


def prefilled(m: KVCacheManager, rid: str, tokens: list[int]) -> None:
    m.allocate(rid, tokens, prefill=True)
    m.commit(rid)


def test_full_attention_match_is_k_blocks_from_block_0() -> None:
    m = KVCacheManager(preset("llama-3-8b", tokens_per_block=B), 64)
    prefilled(m, "a", list(range(10)))  # full blocks 0, 1 committed; 2 partial
    m.free("a")
    match = m.match([*range(8), 99, 100, 101, 102])
    assert match.cached == {"full": 8}
    assert match.matched_blocks == {"full": range(0, 2)}
    assert match.boundary == 8
    assert m.match([0, 1, 2, 3, 4, 5, 6, 99]).cached == {"full": 4}  # block 1 differs
    assert m.match([5, 1, 2, 3, 4, 5, 6, 7]).cached == {"full": 0}  # chain: block 1 unreachable
    assert m.match(list(range(8))).cached == {"full": 8}  # a full hit, cached = P
    assert m.match(list(range(8)), extra_key="lora").cached == {"full": 0}


def test_sliding_match_starts_at_the_window_block_and_state_only_at_p() -> None:
    spec = hybrid(window=6)
    m = KVCacheManager(spec, 64, num_state_slots=8)
    tokens = list(range(100, 124))  # 24 tokens = 6 blocks
    prefilled(m, "a", tokens)  # sliding span of a starts at block (24+1-6)//4 = 4
    m.free("a")
    match = m.match(tokens)
    assert match.cached == {"full": 24, "swa": 24, "ssm": 24}
    assert match.matched_blocks == {"full": range(0, 6), "swa": range(4, 6)}
    assert match.boundary == 24
    # P = 22: needed [17, 22) starts in block 4; blocks 4 (cached) then 5 (partial: no hash)
    short = m.match(tokens[:22])
    assert short.cached == {"full": 20, "swa": 20, "ssm": 0}
    assert short.matched_blocks["swa"] == range(4, 5)
    # the single boundary needs a snapshot at c: only at 24, which is past P=22
    assert short.boundary == 0
    # P = 13: needed [8, 13) starts at block 2, never allocated by the sliding group
    early = m.match(tokens[:13])
    assert early.cached == {"full": 12, "swa": needed_range(spec.group("swa"), 13).start, "ssm": 0}
    assert early.matched_blocks["swa"] == range(2, 2)


def test_single_boundary_rule_by_hand() -> None:
    spec = KVCacheSpec(
        (
            LayerGroup("full", "full", (0,), head_dim=2),
            LayerGroup("swa", "sliding", (1,), head_dim=2, window=9),
        ),
        tokens_per_block=B,
    )
    m = KVCacheManager(spec, 64)
    tokens = list(range(40))
    prefilled(m, "a", tokens[:32])  # swa span starts at (32+1-9)//4 = 6: blocks 6, 7 cached
    m.free("a")
    match = m.match(tokens)
    assert match.cached["full"] == 32
    # per group, the swa window of P=40 is [32, 40): blocks 8, 9, not cached
    assert match.cached["swa"] == 32
    # single boundary: c=32 needs swa blocks touching [24, 32) = 6, 7: cached
    assert match.boundary == 32
    # the counts alone cannot show that (swa's count 32 is its needed start): from them the
    # planner proves only c = 0; given the match itself it uses the cache's boundary
    assert single_boundary(spec, 40, match.cached) == 0
    assert compare_policies(spec, 40, match).boundary == 32
    m.evict(group="swa", num_blocks=1)  # the tail block (7) is evicted first
    assert m.num_cached_blocks("swa") == 1
    match = m.match(tokens)
    assert match.boundary == 0  # c=28 would need [20, 28) -> block 5: never cached
    assert match.cached["full"] == 32
    # counts alone prove less: the swa count 32 says nothing about [24, 32)
    assert single_boundary(spec, 40, match.cached) == 0 <= match.boundary


def test_gpt_oss_second_turn_per_group_keeps_full_reuse_single_collapses() -> None:
    """The scenario kvtriton exists for: window-128 pages of turn 1 are gone by turn 2."""
    spec = preset("gpt-oss-20b")  # B = 16, window 128
    bsz = spec.tokens_per_block
    m = KVCacheManager(spec, {"full": 1024, "sliding128": 16})
    turn1 = list(range(1, 1001))
    m.allocate("turn1", turn1, prefill=True)
    m.commit("turn1")
    answer = list(range(5001, 5201))
    for tok in answer:  # decode: one position at a time, the window slides
        m.append("turn1", [tok])
        m.commit("turn1")
        m.slide("turn1")
    m.free("turn1")
    assert m.num_cached_blocks("sliding128") > 0
    # two other requests fill the small sliding pool (8 blocks each): the window pages of
    # turn 1, released and unreferenced, are evicted (LRU); full-attention pages survive
    m.allocate("other1", list(range(70000, 70000 + 4000)))
    m.allocate("other2", list(range(80000, 80000 + 4000)))
    assert m.num_cached_blocks("sliding128") == 0
    m.free("other1")
    m.free("other2")
    turn2 = turn1 + answer + list(range(9001, 9301))
    p = len(turn2)
    match = m.match(turn2)
    assert match.cached["full"] == (len(turn1) + len(answer)) // bsz * bsz  # 1200 -> 1200
    assert match.boundary == 0
    assert match.cached["sliding128"] == needed_range(spec.group("sliding128"), p).start
    per_group = plan_transfer(spec, p, match.cached_tokens("per_group"))
    single = plan_transfer(spec, p, match.cached_tokens("single_boundary"))
    assert per_group.group("full").tokens.start == 1200
    assert single.group("full").tokens.start == 0
    assert per_group.group("sliding128").tokens == single.group("sliding128").tokens
    assert per_group.total_bytes < single.total_bytes / 3
    # allocation honours the mode
    a = m.allocate("t2", turn2, mode="single_boundary")
    assert a.reused_blocks["full"] == range(0, 0) and a.cached_tokens() == 0
    m.free("t2")
    b = m.allocate("t2", turn2, num_draft_tokens=3)
    assert b.reused_blocks["full"] == range(0, 75)
    assert b.spans["full"].first_block == 0 and b.spans["full"].end_block == ceil_div(p + 3, bsz)
    assert b.spans["sliding128"].first_block == (p + 1 - 128) // bsz
    m.check_invariants()


def test_slid_pages_stay_matchable_until_evicted() -> None:
    spec = hybrid(window=6)
    m = KVCacheManager(spec, 64, num_state_slots=4)
    tokens = list(range(8))
    prefilled(m, "a", tokens)
    m.append("a", list(range(8, 20)))
    m.commit("a")
    released = m.slide("a")
    assert released == {"swa": 3}  # L=20: window [15, 20) starts in block 3
    assert m.spans("a")["swa"].first_block == 3
    assert m.match(tokens).cached["swa"] == 8  # P=8 needs [3, 8): blocks 0, 1 still cached
    assert m.evict(group="swa") == 3
    assert m.match(tokens).cached["swa"] == needed_range(spec.group("swa"), 8).start
    m.check_invariants()


# ---------------------------------------------------------------------------------------
# allocation, capacity, errors
# ---------------------------------------------------------------------------------------


def test_out_of_blocks_changes_nothing_and_names_request_and_group() -> None:
    spec = hybrid(window=6)
    m = KVCacheManager(spec, {"full": 6, "swa": 4}, num_state_slots=2)
    prefilled(m, "a", list(range(12)))  # full 3 blocks, swa blocks [1, 3), a state snapshot
    before = snapshot(m)
    with pytest.raises(
        OutOfBlocksError,
        match=r"request 'b': group 'full' needs 4 new blocks "
        r"but only 3",
    ) as err:
        m.allocate("b", list(range(50, 66)))
    assert (err.value.request_id, err.value.group, err.value.needed) == ("b", "full", 4)
    assert snapshot(m) == before
    with pytest.raises(OutOfBlocksError, match="request 'a': group 'full'"):
        m.append("a", 13)
    assert snapshot(m) == before
    m.allocate("c", [7])  # takes the last slot by evicting the snapshot at 12
    assert m.num_cached_blocks("ssm") == 0
    with pytest.raises(OutOfBlocksError, match="request 'd': group 'ssm' needs 1 new slot"):
        m.allocate("d", [8])
    m.check_invariants()


def test_reused_evictable_blocks_are_not_counted_as_free_for_the_same_request() -> None:
    spec = KVCacheSpec((LayerGroup("full", "full", (0,)),), tokens_per_block=B)
    m = KVCacheManager(spec, 4)
    prefilled(m, "a", list(range(12)))  # 3 blocks cached
    m.free("a")  # 1 free + 3 evictable
    # reuses 3 cached blocks and needs 2 more (P=17 + 3 drafts -> 5 blocks): 1 free only
    before = snapshot(m)
    with pytest.raises(OutOfBlocksError, match="needs 2 new blocks but only 1"):
        m.allocate("b", list(range(17)), num_draft_tokens=3)
    assert snapshot(m) == before
    a = m.allocate("b", list(range(16)))  # 3 reused + 1 new: fits exactly
    assert a.reused_blocks["full"] == range(0, 3)
    m.check_invariants()


def test_lru_eviction_order_and_referenced_blocks_survive() -> None:
    spec = KVCacheSpec((LayerGroup("full", "full", (0,)),), tokens_per_block=B)
    m = KVCacheManager(spec, 6)
    prefilled(m, "old", list(range(8)))  # blocks x0, x1
    m.free("old")
    prefilled(m, "new", list(range(100, 108)))  # blocks y0, y1
    m.free("new")
    prefilled(m, "held", list(range(200, 208)))  # stays referenced
    old_ids = m.match(list(range(8))).block_ids["full"]
    # the LRU list evicts old before new and, within a request, the tail block first
    lru = m.evictable("full")
    assert lru[:2] == (old_ids[1], old_ids[0])
    m.allocate("x", list(range(300, 304)))  # 0 free blocks: evicts old's tail block
    assert m.match(list(range(8))).cached == {"full": 4}
    assert m.match(list(range(200, 208))).cached == {"full": 8}
    assert m.evict() == 3
    assert m.match(list(range(200, 208))).cached == {"full": 8}  # referenced: never evicted
    assert m.match(list(range(100, 108))).cached == {"full": 0}
    m.check_invariants()


def test_duplicate_commits_keep_the_first_block_and_stay_private() -> None:
    spec = KVCacheSpec((LayerGroup("full", "full", (0,)),), tokens_per_block=B)
    m = KVCacheManager(spec, 8)
    m.allocate("a", list(range(8)), prefill=True)
    m.allocate("b", list(range(8)), prefill=True)  # nothing committed yet: no reuse
    assert m.commit("a") == {"full": 2}
    assert m.commit("b") == {"full": 0}
    ids_a = m.spans("a")["full"].block_ids
    assert m.match(list(range(8))).block_ids["full"] == ids_a
    m.free("b")
    assert m.stats()["full"]["free"] == 6  # b's duplicates went back to the free list
    m.check_invariants()


def test_errors_name_the_request() -> None:
    spec = hybrid()
    m = KVCacheManager(spec, 16, num_state_slots=2)
    m.allocate("a", [1, 2, 3])
    with pytest.raises(ValueError, match="request 'a' is already live"):
        m.allocate("a", [1])
    with pytest.raises(KeyError, match="request 'zz' is not live"):
        m.free("zz")
    with pytest.raises(ValueError, match="request 'b': tokens must hold at least one"):
        m.allocate("b", [])
    with pytest.raises(ValueError, match="request 'b': mode"):
        m.allocate("b", [1], mode="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="request 'b': num_draft_tokens must be >= 0"):
        m.allocate("b", [1], num_draft_tokens=-1)
    with pytest.raises(ValueError, match="request 'a': cannot commit 9 tokens"):
        m.commit("a", 9)
    m.append("a", 2)
    with pytest.raises(ValueError, match=r"request 'a': positions \[3, 5\) were appended"):
        m.append("a", [4])
    with pytest.raises(ValueError, match="request 'a': cannot commit 5 tokens: the ids"):
        m.commit("a", 5)
    assert m.commit("a") == {"full": 0, "swa": 0, "ssm": 0}  # commits the known 3: no block
    with pytest.raises(ValueError, match="extra_key 'k' differs from the key None"):
        m.allocate("c", m.match([1, 3]), extra_key="k")
    m.check_invariants()


def test_state_snapshot_restores_the_slot() -> None:
    spec = hybrid()
    pools = allocate_pools(spec, 16, num_state_slots=3)
    m = KVCacheManager(spec, pools=pools)
    tokens = list(range(8))
    a = m.allocate("a", tokens, prefill=True)
    pools.state["ssm"][:, a.state_slots["ssm"]] = 42.0
    assert m.commit("a")["ssm"] == 1
    pools.state["ssm"][:, a.state_slots["ssm"]] = -1.0  # the request moves on
    m.free("a")
    b = m.allocate("b", tokens)
    assert b.state_hits == {"ssm": True} and b.cached["ssm"] == 8
    assert torch.all(pools.state["ssm"][:, b.state_slots["ssm"]] == 42.0)
    c = m.allocate("c", tokens[:7])
    assert c.state_hits == {"ssm": False} and c.cached["ssm"] == 0
    # one slot left? no: 3 slots = b + c + the snapshot; a fourth request evicts the snapshot
    m.free("c")
    m.allocate("d", [5])
    m.allocate("e", [6])
    assert m.num_cached_blocks("ssm") == 0
    m.check_invariants()


def test_allocate_reuses_a_precomputed_match() -> None:
    spec = hybrid()
    m = KVCacheManager(spec, 32, num_state_slots=4)
    prefilled(m, "a", list(range(16)))
    m.free("a")
    tokens = list(range(20))
    match = m.match(tokens)
    a = m.allocate("b", match)
    assert a.cached == match.cached
    assert a.spans["full"].block_ids[:4] == match.block_ids["full"]
    m.check_invariants()


def test_a_stale_match_is_redone_at_allocation() -> None:
    spec = KVCacheSpec((LayerGroup("full", "full", (0,)),), tokens_per_block=B)
    m = KVCacheManager(spec, 8)
    tokens = list(range(12))
    match = m.match(tokens)
    assert match.cached == {"full": 0}
    prefilled(m, "a", tokens[:8])  # publishes two blocks after the match was taken
    b = m.allocate("b", match)
    assert b.reused_blocks["full"] == range(0, 2) and b.cached == {"full": 8}
    m.free("a")
    m.free("b")
    fresh = m.match(tokens)
    m.evict()
    c = m.allocate("c", fresh)  # its blocks were evicted since: nothing is reused
    assert c.reused_blocks["full"] == range(0, 0)
    m.check_invariants()


# ---------------------------------------------------------------------------------------
# the matching rules against their definitions, for arbitrary index contents
# ---------------------------------------------------------------------------------------


@given(
    num_tokens=st.integers(1, 40),
    window=st.integers(1, 14),
    with_state=st.booleans(),
    data=st.data(),
)
def test_matching_rules_hold_for_any_index_contents(
    num_tokens: int, window: int, with_state: bool, data: st.DataObject
) -> None:
    groups = [LayerGroup("full", "full", (0,)), LayerGroup("swa", "sliding", (1,), window=window)]
    if with_state:
        groups.append(LayerGroup("ssm", "state", (2,), state_shape=(1,)))
    spec = KVCacheSpec(tuple(groups), tokens_per_block=B)
    m = KVCacheManager(spec, 16, num_state_slots=16)
    tokens = list(range(3, 3 + num_tokens))
    hashes = chain_hashes(encode_tokens(tokens), B, root_hash(None))
    n = len(hashes)
    run = data.draw(st.integers(0, n), label="full run")
    have = {
        "full": [b < run or data.draw(st.booleans()) for b in range(n)],
        "swa": data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="swa"),
    }
    if with_state:
        have["ssm"] = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="ssm")
    for name, present in have.items():
        # Publish exactly the blocks drawn through the group's pool: allocate, publish, free.
        pool = m.block_pool(name)
        chosen = [hashes[b] for b, there in enumerate(present) if there]
        ids = pool.allocate(len(chosen))
        assert pool.publish(chosen, ids) == len(chosen)
        pool.release(ids)
    match = m.match(tokens)
    cached, boundary = brute_force_match(spec, len(tokens), have)
    assert dict(match.cached) == cached
    assert match.boundary == boundary
    assert all(match.cached[g] >= boundary for g in ("full", "swa"))


def test_append_changes_the_draft_tail() -> None:
    spec = hybrid(window=6)
    m = KVCacheManager(spec, 32, num_state_slots=2)
    m.allocate("a", list(range(5)), num_draft_tokens=2)  # [0, 7): 2 blocks
    assert m.spans("a")["full"].end_block == 2
    spans = m.append("a", [5], num_draft_tokens=6)  # L=6, [0, 12): 3 blocks
    assert spans["full"].end_block == 3 and m.request("a").num_draft_tokens == 6
    free = m.stats()["full"]["free"]
    spans = m.append("a", 0, num_draft_tokens=0)  # [0, 6): the draft-only block goes back
    assert spans["full"].end_block == 2 and m.stats()["full"]["free"] == free + 1
    assert spans["swa"].end_block == 2
    m.check_invariants()


def test_a_match_from_another_manager_is_redone() -> None:
    spec = KVCacheSpec((LayerGroup("full", "full", (0,)),), tokens_per_block=B)
    a, b = KVCacheManager(spec, 8), KVCacheManager(spec, 8)
    tokens = list(range(8))
    prefilled(a, "x", tokens)
    match = a.match(tokens)
    assert match.cached == {"full": 8} and a.version == b.version + 2
    prefilled(b, "y", [9, 9, 9, 9])
    prefilled(b, "z", [8, 8, 8, 8])  # same version number as a, other contents
    assert a.version == b.version
    alloc = b.allocate("w", match)
    assert alloc.reused_blocks["full"] == range(0, 0)
    b.check_invariants()


def test_repr_summarises_the_pools() -> None:
    m = KVCacheManager(hybrid(), 8, num_state_slots=2)
    prefilled(m, "a", list(range(8)))
    text = repr(m)
    assert text.startswith("KVCacheManager(") and "'test-hybrid'" in text and "requests=1" in text
    # one "<group>: <used> used / <cached> cached / <size>" entry per group, from stats()
    entries = dict(
        (name, (int(used), int(cached), int(size)))
        for name, used, cached, size in re.findall(
            r"(\w+): (\d+) used / (\d+) cached / (\d+)", text
        )
    )
    assert entries == {
        name: (st["referenced"], st["cached"], st["blocks"]) for name, st in m.stats().items()
    }
    assert entries["full"] == (2, 2, 8) and entries["ssm"] == (1, 1, 2)


# ---------------------------------------------------------------------------------------
# the block pool on its own
# ---------------------------------------------------------------------------------------


def test_block_pool_moves_blocks_between_free_referenced_and_evictable() -> None:
    pool = BlockPool(4, name="g")
    ids = pool.allocate(3)
    assert ids == [0, 1, 2] and pool.num_free == 1 and pool.num_referenced == 3
    assert pool.publish([b"h0", b"h1"], ids[:2]) == 2
    pool.take([ids[0]])  # a second reference
    pool.release(ids)
    assert pool.refcount(0) == 1 and pool.evictable_ids() == (1,)  # 2 had no hash: freed
    assert pool.num_free == 2 and pool.num_available == 3
    pool.release([0])
    assert pool.evictable_ids() == (1, 0)
    pool.touch(1)
    assert pool.evictable_ids() == (0, 1)
    assert pool.allocate(3) == [0, 2, 3]  # the evicted oldest cached block, then last-freed first
    assert pool.lookup(b"h0") is None and pool.lookup(b"h1") == 1
    assert pool.available_besides([1]) == 0
    pool.check_invariants([1, 0, 1, 1])
    with pytest.raises(RuntimeError, match="allocate\\(2\\) with only 1 free or evictable"):
        pool.allocate(2)
    pool.release([0, 2, 3])
    with pytest.raises(RuntimeError, match="double free of block 2"):
        pool.release([2])
    assert pool.evict() == 1 and pool.num_cached == 0 and pool.num_free == 4


def test_block_pool_publish_keeps_the_first_of_repeated_hashes_and_ids() -> None:
    pool = BlockPool(6, name="g")
    ids = pool.allocate(6)
    assert pool.publish([b"a", b"b", b"a"], ids[:3]) == 2  # a repeated hash: first one wins
    assert pool.hash_of(ids[2]) is None and pool.lookup(b"a") == ids[0]
    assert pool.publish([b"c", b"d"], [ids[3], ids[3]]) == 1  # a repeated id: tagged once
    assert pool.publish([b"e", b"b"], ids[4:6]) == 1  # b is taken: that block stays private
    with pytest.raises(ValueError, match="2 hashes for 1 blocks"):
        pool.publish([b"x", b"y"], ids[:1])
    pool.check_invariants([1] * 6)
