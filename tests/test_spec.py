"""LayerGroup / KVCacheSpec: validation, sizes, TP shards, PP stages, digests, presets."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtriton.spec import PRESETS, GroupKind, KVCacheSpec, LayerGroup, preset


def _spec(*groups: LayerGroup, tpb: int = 16, dtype: str = "bfloat16") -> KVCacheSpec:
    return KVCacheSpec(tuple(groups), tokens_per_block=tpb, dtype=dtype, name="t")


FULL = LayerGroup("full", "full", (0, 2), num_kv_heads=4, head_dim=8)
SLIDING = LayerGroup("swa", "sliding", (1, 3), num_kv_heads=4, head_dim=8, window=32)


# -- validation ---------------------------------------------------------------------------


def test_duplicate_layer_ids_within_a_group() -> None:
    with pytest.raises(ValueError, match=r"layer group 'g': duplicate layer ids in \(1, 2, 1\)"):
        LayerGroup("g", "full", (1, 2, 1))


def test_duplicate_layer_ids_across_groups() -> None:
    other = LayerGroup("other", "full", (2, 5))
    with pytest.raises(ValueError, match=r"duplicate layer id 2: in group 'full' and 'other'"):
        _spec(FULL, other)


def test_duplicate_group_names() -> None:
    with pytest.raises(ValueError, match=r"duplicate layer group names: \['full'\]"):
        _spec(FULL, replace(FULL, layer_ids=(7,)))


def test_window_below_one_is_rejected() -> None:
    for window in (0, -4):
        with pytest.raises(ValueError, match=rf"sliding window must be an int >= 1, got {window}"):
            LayerGroup("s", "sliding", (0,), window=window)
    with pytest.raises(ValueError, match=r"sliding window must be an int >= 1, got None"):
        LayerGroup("s", "sliding", (0,))
    with pytest.raises(ValueError, match=r"sliding window must be an int >= 1, got True"):
        LayerGroup("s", "sliding", (0,), window=True)


def test_window_only_on_sliding_groups() -> None:
    with pytest.raises(ValueError, match=r"only sliding groups take a window \(kind 'full'\)"):
        LayerGroup("f", "full", (0,), window=128)


def test_sizes_must_be_positive() -> None:
    with pytest.raises(
        ValueError,
        match=r"layer group 'g': num_kv_heads must be a positive int, "
        r"got 0",
    ):
        LayerGroup("g", "full", (0,), num_kv_heads=0)
    with pytest.raises(ValueError, match=r"head_dim must be a positive int, got -64"):
        LayerGroup("g", "full", (0,), head_dim=-64)
    with pytest.raises(ValueError, match=r"state_shape entries must be a positive int, got 0"):
        LayerGroup("g", "state", (0,), state_shape=(4, 0))
    with pytest.raises(ValueError, match=r"tokens_per_block must be a positive int, got 0"):
        _spec(FULL, tpb=0)
    with pytest.raises(ValueError, match=r"tokens_per_block must be a positive int, got True"):
        _spec(FULL, tpb=True)
    with pytest.raises(ValueError, match=r"layer ids must be non-negative ints, got -1"):
        LayerGroup("g", "full", (-1,))


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(
        ValueError,
        match=r"layer group 'g': unknown kind 'cross'; expected one of "
        r"\('full', 'sliding', 'state'\)",
    ):
        LayerGroup("g", "cross", (0,))


def test_other_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"kv_factor must be 1 or 2, got 3"):
        LayerGroup("g", "full", (0,), kv_factor=3)
    with pytest.raises(ValueError, match=r"a state group needs a non-empty state_shape"):
        LayerGroup("g", "state", (0,))
    with pytest.raises(ValueError, match=r"only state groups take a state_shape"):
        LayerGroup("g", "full", (0,), state_shape=(2,))
    with pytest.raises(ValueError, match=r"head range \[2, 5\) is not inside \[0, 4\)"):
        LayerGroup("g", "full", (0,), num_kv_heads=4, head_start=2, head_end=5)
    with pytest.raises(ValueError, match=r"layer group name must be a non-empty string"):
        LayerGroup("", "full", (0,))
    with pytest.raises(ValueError, match=r"a KVCacheSpec needs at least one layer group"):
        KVCacheSpec((), tokens_per_block=16)
    with pytest.raises(ValueError, match=r"unknown dtype 'float13'"):
        _spec(FULL, dtype="float13")
    with pytest.raises(TypeError, match=r"groups must be LayerGroup objects, got str"):
        KVCacheSpec(("full",), tokens_per_block=16)  # type: ignore[arg-type]


def test_layer_ids_are_sorted_and_dtype_aliases_canonical() -> None:
    g = LayerGroup("g", "full", (5, 1, 3))
    assert g.layer_ids == (1, 3, 5)
    assert _spec(FULL, dtype="bf16").dtype == "bfloat16"
    assert _spec(FULL, dtype="fp8").itemsize == 1


# -- sizes --------------------------------------------------------------------------------


def test_bytes_per_token_and_state_bytes() -> None:
    spec = _spec(FULL, SLIDING)
    assert spec.bytes_per_token("full") == 2 * 2 * 4 * 8 * 2  # layers x K,V x heads x dim x bf16
    assert spec.bytes_per_block("swa") == spec.bytes_per_token("swa") * 16
    assert spec.state_bytes("full") == 0
    tiny = preset("tiny-hybrid")
    assert tiny.state_bytes("state") == 1 * 2 * 4 * 8 * 4  # 1 layer x (2, 4, 8) x fp32
    assert tiny.bytes_per_token("state") == 0
    mla = preset("deepseek-v3")
    assert mla.bytes_per_token("mla") == 61 * 1 * 1 * 576 * 2  # kv_factor 1: one latent


def test_group_lookup_names_what_exists() -> None:
    with pytest.raises(KeyError, match=r"no layer group 'nope' in spec 't'"):
        _spec(FULL).group("nope")


# -- tensor parallel ----------------------------------------------------------------------


def test_tp_shard_splits_heads_evenly() -> None:
    spec = preset("gpt-oss-20b")  # 8 kv heads
    ranges = [spec.shard(r, 4).group("full") for r in range(4)]
    assert [(g.head_start, g.head_end) for g in ranges] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert all(g.local_heads == 2 for g in ranges)
    shard = spec.shard(1, 4)
    assert shard.bytes_per_token("full") * 4 == spec.bytes_per_token("full")
    assert (shard.tp_rank, shard.tp_size, shard.root) == (1, 4, spec)


def test_tp_shard_replicates_when_ranks_outnumber_kv_heads() -> None:
    spec = preset("qwen3-next-80b")  # full: 2 kv heads; state_shape[0] = 32
    heads = [spec.shard(r, 8).group("full") for r in range(8)]
    assert [(g.head_start, g.head_end) for g in heads] == [(0, 1)] * 4 + [(1, 2)] * 4
    states = [spec.shard(r, 8).group("state") for r in range(8)]
    assert [(g.state_head_start, g.state_head_end) for g in states] == [
        (4 * r, 4 * r + 4) for r in range(8)
    ]
    assert states[3].local_state_shape == (4, 17152)


def test_tp_shard_errors_when_neither_divides() -> None:
    msg = (
        r"group 'full': 8 kv heads cannot be split over 3 TP ranks "
        r"\(need kv heads % tp == 0 or tp % kv heads == 0\)"
    )
    with pytest.raises(ValueError, match=msg):
        preset("gpt-oss-20b").shard(0, 3)
    with pytest.raises(ValueError, match=r"tp_rank must be in \[0, 4\), got 4"):
        preset("gpt-oss-20b").shard(4, 4)
    with pytest.raises(ValueError, match=r"already TP-sharded \(2 ranks\)"):
        preset("gpt-oss-20b").shard(0, 2).shard(0, 2)


@given(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 24]), st.sampled_from([1, 2, 3, 4, 8, 16]))
def test_tp_shards_cover_every_head(heads: int, tp: int) -> None:
    spec = _spec(LayerGroup("g", "full", (0,), num_kv_heads=heads, head_dim=4))
    if heads % tp and tp % heads:
        with pytest.raises(ValueError, match="cannot be split"):
            spec.shard(0, tp)
        return
    held = [spec.shard(r, tp).group("g") for r in range(tp)]
    spans = [(g.head_start, g.head_start + g.local_heads) for g in held]
    assert sorted({h for a, b in spans for h in range(a, b)}) == list(range(heads))
    if heads % tp == 0:  # a partition: every head on exactly one rank
        assert sum(b - a for a, b in spans) == heads
    else:  # replication: every head on tp / heads ranks, one head each
        assert all(b - a == 1 for a, b in spans)
        assert all(sum(1 for s in spans if s == (h, h + 1)) == tp // heads for h in range(heads))


# -- pipeline parallel --------------------------------------------------------------------


def test_pp_stage_contiguous_split_drops_empty_groups() -> None:
    spec = preset("tiny-hybrid")  # full (1, 4), sliding8 (0, 2, 5), state (3,)
    stages = [spec.stage(r, 4) for r in range(4)]  # 6 layers -> 2, 2, 1, 1
    held = [sorted(lay for g in s.groups for lay in g.layer_ids) for s in stages]
    assert held == [[0, 1], [2, 3], [4], [5]]
    assert stages[0].group_names == ("full", "sliding8")  # no state layer in stage 0
    assert stages[1].group("state").layer_ids == (3,)
    assert stages[2].group_names == ("full",)
    assert stages[3].group_names == ("sliding8",)
    assert all(s.root == spec and s.pp_size == 4 for s in stages)


@given(st.sampled_from(sorted(PRESETS)), st.integers(1, 8))
def test_pp_stages_partition_the_layers(name: str, pp: int) -> None:
    spec = preset(name)
    if pp > spec.num_layers:
        with pytest.raises(ValueError, match=rf"cannot split {spec.num_layers} layers into {pp}"):
            spec.stage(0, pp)
        return
    stages = [spec.stage(r, pp) for r in range(pp)]
    runs = [sorted(lay for g in s.groups for lay in g.layer_ids) for s in stages]
    all_layers = sorted(lay for g in spec.groups for lay in g.layer_ids)
    assert [lay for run in runs for lay in run] == all_layers  # contiguous, in order
    assert max(map(len, runs)) - min(map(len, runs)) <= 1
    assert all(runs)


def test_pp_stage_errors() -> None:
    with pytest.raises(ValueError, match=r"cannot split 6 layers into 7 stages"):
        preset("tiny-hybrid").stage(0, 7)
    with pytest.raises(ValueError, match=r"pp_rank must be in \[0, 2\), got -1"):
        preset("tiny-hybrid").stage(-1, 2)
    with pytest.raises(ValueError, match=r"already PP-staged"):
        preset("tiny-hybrid").stage(0, 2).stage(0, 2)


def test_shard_for_combines_stage_and_shard() -> None:
    spec = preset("gpt-oss-20b")
    s = spec.shard_for(1, 2, 1, 2)
    assert (s.tp_rank, s.tp_size, s.pp_rank, s.pp_size) == (1, 2, 1, 2)
    assert s.group("full").layer_ids == tuple(range(13, 24, 2))
    assert (s.group("full").head_start, s.group("full").head_end) == (4, 8)
    assert s.root == spec


# -- digests ------------------------------------------------------------------------------


def test_digest_is_stable_across_calls_and_rebuilds() -> None:
    a, b = preset("gemma-3-4b"), preset("gemma-3-4b")
    assert a.digest() == a.digest() == b.digest()
    assert len(a.digest()) == 16 and int(a.digest(), 16) >= 0
    assert a.model_digest() == b.model_digest()


def test_digest_differs_between_shards_and_block_sizes() -> None:
    spec = preset("gpt-oss-20b")
    digests = {
        spec.digest(),
        spec.shard(0, 2).digest(),
        spec.shard(1, 2).digest(),
        spec.stage(0, 2).digest(),
        spec.with_block_size(32).digest(),
    }
    assert len(digests) == 5


def test_model_digest_equal_across_shards_and_block_sizes() -> None:
    spec = preset("qwen3-next-80b")
    views = [
        spec.shard(3, 4),
        spec.stage(1, 3),
        spec.shard_for(1, 2, 2, 3),
        spec.with_block_size(7),
        preset("qwen3-next-80b", tokens_per_block=64),
        spec.stage(0, 2).with_block_size(5),
    ]
    assert {v.model_digest() for v in views} == {spec.model_digest()}


def test_model_digest_changes_with_the_model() -> None:
    spec = preset("gpt-oss-20b")
    wider = replace(spec, groups=(spec.groups[0], replace(spec.groups[1], window=256)))
    assert wider.model_digest() != spec.model_digest()
    assert preset("gpt-oss-20b", dtype="float16").model_digest() != spec.model_digest()
    assert preset("gpt-oss-120b").model_digest() != spec.model_digest()


# -- presets ------------------------------------------------------------------------------


def test_presets_have_real_shapes() -> None:
    oss = preset("gpt-oss-20b")
    assert oss.group_names == ("full", "sliding128")
    assert oss.group("full").layer_ids == tuple(range(1, 24, 2))
    assert oss.group("sliding128").window == 128
    gemma = preset("gemma-3-4b")
    assert gemma.group("full").num_layers == 5 and gemma.group("sliding1024").num_layers == 29
    assert preset("llama-3-8b").group_names == ("full",)
    for name in PRESETS:
        spec = preset(name)
        assert spec.name == name
        assert spec.num_layers == len({lay for g in spec.groups for lay in g.layer_ids})


def test_preset_overrides_and_unknown_name() -> None:
    spec = preset("llama-3-8b", tokens_per_block=7, dtype="fp8")
    assert (spec.tokens_per_block, spec.dtype) == (7, "float8_e4m3fn")
    with pytest.raises(ValueError, match=r"unknown preset 'llama-4'; available: gpt-oss-20b"):
        preset("llama-4")


def test_elements_match_shapes() -> None:
    for name in PRESETS:
        spec = preset(name)
        for g in spec.groups:
            if g.is_state:
                assert g.state_shape is not None
                assert g.state_elements() == g.num_layers * math.prod(g.state_shape)
            else:
                assert g.elements_per_token() == (
                    g.num_layers * g.kv_factor * g.num_kv_heads * g.head_dim
                )


# -- group kinds as types ---------------------------------------------------------------------


def test_kind_is_normalised_to_the_enum_and_still_equals_its_string() -> None:
    g = LayerGroup("s", "sliding", (0,), window=4)
    assert g.kind is GroupKind.SLIDING and g.kind == "sliding"
    assert f"{g.kind}" == str(g.kind) == "sliding"
    assert json.loads(json.dumps({"kind": g.kind})) == {"kind": "sliding"}
    assert LayerGroup("s", GroupKind.SLIDING, (0,), window=4) == g
    assert {"sliding": 1}[g.kind] == 1  # hashes like its string
    assert [k.pages_tokens for k in GroupKind] == [True, True, False]
    assert [k.has_window for k in GroupKind] == [False, True, False]
    assert [k.has_state for k in GroupKind] == [False, False, True]


def test_held_heads_and_item_dtype() -> None:
    spec = preset("qwen3-next-80b").shard(1, 2)
    full, state = spec.group("full"), spec.group("state")
    assert full.held_heads == (1, 2)  # 2 kv heads over 2 ranks
    assert state.held_heads == (16, 32)  # state_shape[0] = 32
    assert full.item_dtype(spec.dtype) == "bfloat16"
    assert state.item_dtype(spec.dtype) == "bfloat16"  # no state dtype: the model's
    assert spec.state_bytes(state) == state.state_elements() * 2
    assert full.is_attention and not full.is_state and state.is_state
    fp32 = replace(state, state_dtype="fp32")
    assert fp32.state_dtype == "float32" and fp32.item_dtype(spec.dtype) == "float32"
    assert spec.state_bytes(fp32) == state.state_elements() * 4


def test_each_kind_has_one_rule() -> None:
    kinds = [preset("tiny-hybrid").group(n).rule.kind for n in ("full", "sliding8", "state")]
    assert kinds == list(GroupKind)
    g = preset("tiny-hybrid").group("sliding8")
    assert g.rule.first_block(g, 30, 4) == (30 + 1 - 8) // 4
    assert g.rule.peak_blocks(g, 1000, 4) == (8 - 1) // 4 + 2
