"""Every size has a stated bound, checked up front: numbers that would overflow, allocate
without bound or fail later inside a kernel are refused where they enter, with a message
naming the value and the bound (issue 14, item 6)."""

from __future__ import annotations

import math

import pytest

from kvtriton.cache.pools import MAX_NUM_BLOCKS, blocks_for_bytes, pool_bytes, resolve_num_blocks
from kvtriton.plan import plan_transfer
from kvtriton.ranges import MAX_BLOCK_ID, MAX_TOKENS, BlockSpan, TokenRange, needed_range
from kvtriton.spec import (
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_STATE_ELEMENTS,
    MAX_TOKENS_PER_BLOCK,
    KVCacheSpec,
    LayerGroup,
    preset,
    resolve_spec,
)


def test_positions_and_token_counts_are_bounded() -> None:
    spec = preset("gpt-oss-20b")
    with pytest.raises(ValueError, match=r"num_tokens must be <= 1,099,511,627,776"):
        plan_transfer(spec, 2**63, 0)
    with pytest.raises(ValueError, match=r"num_tokens must be <= "):
        plan_transfer(spec, 10**30, {"full": 6000})
    with pytest.raises(ValueError, match=r"cached tokens of group 'full' must be <= "):
        plan_transfer(spec, 8192, {"full": 2**41})
    plan = plan_transfer(spec, MAX_TOKENS, 0)  # the bound itself is fine
    assert plan.group("full").tokens == TokenRange(0, MAX_TOKENS)
    with pytest.raises(ValueError, match=r"TokenRange.end must be <= "):
        TokenRange(0, MAX_TOKENS + 1)
    with pytest.raises(ValueError, match=r"num_tokens must be <= "):
        needed_range(spec.group("sliding128"), MAX_TOKENS + 1)


def test_block_ids_and_anchors_are_bounded() -> None:
    with pytest.raises(ValueError, match=r"block_ids\[1\] must be <= 2,147,483,647.*got 1,180"):
        BlockSpan(0, [3, 2**70])
    assert BlockSpan(0, [MAX_BLOCK_ID]).block_ids == (MAX_BLOCK_ID,)
    with pytest.raises(ValueError, match=r"BlockSpan.first_block must be <= "):
        BlockSpan(2**41, [1])
    with pytest.raises(ValueError, match=r"TokenRange.start must be <= "):
        BlockSpan(2**39, [1, 2, 3]).covered(16)


def test_layer_groups_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match=r"layer group 'x': layer_ids is empty"):
        LayerGroup("x", "full", ())
    with pytest.raises(TypeError, match=r"layer_ids must be a sequence of ints, got int 3"):
        LayerGroup("x", "full", 3)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=rf"layer id 4,096 is past kvtriton's bound \(ids < {MAX_LAYERS}\)"
    ):
        LayerGroup("x", "full", (MAX_LAYERS,))
    with pytest.raises(ValueError, match=r"num_kv_heads must be <= 65,536"):
        LayerGroup("x", "full", (0,), num_kv_heads=MAX_HEADS + 1)
    with pytest.raises(ValueError, match=r"head_dim must be <= 65,536"):
        LayerGroup("x", "full", (0,), head_dim=MAX_HEAD_DIM + 1)
    with pytest.raises(ValueError, match=r"sliding window must be <= "):
        LayerGroup("x", "sliding", (0,), window=MAX_TOKENS + 1)
    with pytest.raises(ValueError, match=r"past kvtriton's bound \(4,294,967,296\)"):
        LayerGroup("x", "state", (0,), state_shape=(64, 2**27))
    assert math.prod((64, 2**26)) == MAX_STATE_ELEMENTS
    LayerGroup("x", "state", (0,), state_shape=(64, 2**26))
    group = LayerGroup("x", "full", (0,))
    with pytest.raises(ValueError, match=r"tokens_per_block must be <= 65,536"):
        KVCacheSpec((group,), tokens_per_block=MAX_TOKENS_PER_BLOCK + 1)


def test_pool_sizes_are_bounded() -> None:
    spec = preset("tiny-hybrid")
    with pytest.raises(ValueError, match=r"num_blocks must be <= 16,777,216"):
        resolve_num_blocks(spec, MAX_NUM_BLOCKS + 1)
    with pytest.raises(ValueError, match=r"num_blocks\['full'\] must be <= "):
        pool_bytes(spec, {"full": 2**70, "sliding8": 4})
    with pytest.raises(ValueError, match=r"more than kvtriton's bound of 16,777,216 blocks"):
        blocks_for_bytes(spec, int(1e30 * 2**30))  # --capacity-gib 1e30
    assert blocks_for_bytes(spec, 2**30) <= MAX_NUM_BLOCKS


def test_a_spec_argument_takes_a_spec_or_a_preset_name() -> None:
    spec = preset("gpt-oss-20b")
    assert resolve_spec(spec) is spec
    assert resolve_spec("gpt-oss-20b") == spec
    with pytest.raises(ValueError, match=r"unknown preset 'gpt-oss-21b'; available: "):
        resolve_spec("gpt-oss-21b")
    with pytest.raises(TypeError, match=r"spec must be a KVCacheSpec or a preset name .*got int 3"):
        resolve_spec(3)
