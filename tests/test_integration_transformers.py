"""End to end on real transformers model code: KV moved by kvtriton, generation continues.

Tiny randomly initialised float32 models built from real config classes (Gemma 3 text,
GPT-OSS, Mistral with a sliding window, Qwen3-Next with gated-DeltaNet state layers), eager
attention (and Gemma 3 with SDPA), no downloads.

Tolerances. Everything that is the *same computation* is compared bit for bit: a cache
rebuilt from pools decodes exactly like the original cache; turn 1 of a disaggregated chat
and turn 2 in single-boundary mode (where every position the receiver uses was computed by
the context side's prefill of the whole prompt) equal the single-process reference exactly.
Turn 2 whenever the receiver reuses its own full-attention blocks (per-group mode; also
single-boundary mode for Qwen3-Next, whose state snapshot keeps the boundary) reuses KV that
the receiver computed itself in turn
1 (positions ``[P1, c)`` by one-token decode steps; for GPT-OSS also ``[0, P1)``, since
its MoE routes a different token set per expert when the prompt is longer), while the
reference computes them inside one prefill of the turn-2 prompt: the same math with
different matmul shapes, so float32 sums round in a different order (~1e-7 relative in
K/V). Those logits are compared with ``atol = rtol = 1e-5`` (measured: <= 3e-6 absolute on
logits of magnitude ~5) and the generated tokens must be identical (argmax margins >= 0.02).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")

import transformers
from transformers import DynamicCache

from kvtriton.adapter import preview_plan
from kvtriton.cache import allocate_pools
from kvtriton.integrations import transformers as kt
from kvtriton.integrations.chat import (
    ChatConfig,
    ContextWorker,
    GenerationWorker,
    LocalContext,
    greedy_reference,
    run_chat,
    run_chat_demo,
)
from kvtriton.kernels import gather, resolve_backend
from kvtriton.ranges import BlockSpan, GroupKind, TokenRange, ceil_div, needed_range

BACKEND = "reference"  # kernels are tested against it elsewhere; keeps this file fast
ATOL = RTOL = 1e-5
WINDOW = 6
STEPS = 8
USER_TURNS = (21, 13)  # turn-1 prompt, then new user tokens of turn 2
#: Gemma 4 (per-layer head shapes) where the installed transformers has it
GEMMA4 = pytest.param(
    "gemma4",
    marks=pytest.mark.skipif(
        not hasattr(transformers, "Gemma4TextConfig"), reason="transformers without Gemma 4"
    ),
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: torch's intra-op threads only contend on a loaded 2-core CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models() -> dict[str, object]:
    built = {kind: kt.tiny_model(kind, window=WINDOW) for kind in kt.TINY_MODELS}
    built["gemma3-sdpa"] = kt.tiny_model("gemma3", window=WINDOW, attn_implementation="sdpa")
    if hasattr(transformers, "Gemma4TextConfig"):
        built["gemma4"] = kt.tiny_model("gemma4", window=WINDOW)
    return built


def _prompt(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (n,), generator=g).tolist()


def _prefill(model, tokens, cache):
    with torch.no_grad():
        return kt.forward(model, tokens, cache)


def _decode(model, cache, token):
    with torch.no_grad():
        return kt.forward(model, [token], cache).logits[0, -1]


# ---------------------------------------------------------------------------------------
# window convention
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gemma3", "gpt-oss", "mistral"])
def test_window_convention_is_kvtriton_needed_range(models, kind):
    """transformers' sliding_window W: the query at P attends (P - W, P] -- kvtriton's W."""
    model = models[kind]
    spec = kt.spec_for_model(model, tokens_per_block=4)
    (group,) = [g for g in spec.groups if g.kind is GroupKind.SLIDING]
    assert group.window == model.config.sliding_window == WINDOW
    p = 17
    assert needed_range(group, p) == TokenRange(p + 1 - WINDOW, p)
    tokens = _prompt(p + 1)
    base_cache = DynamicCache()  # no config: every layer keeps every position
    _prefill(model, tokens[:p], base_cache)
    base = _decode(model, copy.deepcopy(base_cache), tokens[p])

    def perturbed(position: int) -> torch.Tensor:
        cache = copy.deepcopy(base_cache)
        for layer in group.layer_ids:
            cache.layers[layer].keys[:, :, position] += 1.0
            cache.layers[layer].values[:, :, position] += 1.0
        return _decode(model, cache, tokens[p])

    assert torch.equal(perturbed(p - WINDOW), base)  # just outside the window: unused
    assert not torch.allclose(perturbed(p + 1 - WINDOW), base)  # needed.start: attended


# ---------------------------------------------------------------------------------------
# cache <-> pools
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "layout", "block", "backend"),
    [
        ("gemma3", "NHD", 4, BACKEND),
        ("gemma3", "HND", 3, "triton"),
        ("gpt-oss", "HND", 3, BACKEND),
        ("mistral", "HND", 5, BACKEND),
        ("qwen3-next", "NHD", 4, BACKEND),
        pytest.param(*("gemma4", "HND", 4, BACKEND), marks=GEMMA4.marks),
    ],
)
def test_pools_round_trip_decodes_bit_exactly(models, kind, layout, block, backend):
    if backend == "triton" and resolve_backend("auto", "cpu") != "triton":
        pytest.skip(
            "the Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set by conftest "
            "on machines without a GPU)"
        )
    model = models[kind]
    spec = kt.spec_for_model(model, tokens_per_block=block)
    p = 23
    tokens = _prompt(p)
    cache = DynamicCache(config=model.config)
    out = _prefill(model, tokens, cache)
    held = kt.held_ranges(cache, spec)
    attention = [g for g in spec.groups if g.is_attention]
    for g in attention:
        assert held[g.name] == needed_range(g, p)  # a sliding layer keeps exactly W - 1
    pools = allocate_pools(spec, 16, layout=layout, num_state_slots=3)
    spans = {}  # sliding spans anchored at the window's first block, scattered block ids
    for g in attention:
        first = needed_range(g, p).start // block
        spans[g.name] = BlockSpan(first, [15 - 2 * i for i in range(ceil_div(p, block) - first)])
    slots = {g.name: 2 for g in spec.groups if g.is_state}
    written = kt.cache_to_pools(
        cache, spec, pools, spans, state_slots=slots, config=model.config, backend=backend
    )
    assert written == held
    rebuilt = kt.pools_to_cache(
        spec, pools, spans, p, model.config, state_slots=slots, backend=backend
    )
    assert kt.held_ranges(rebuilt, spec) == held
    for layer, (a, b) in enumerate(zip(cache.layers, rebuilt.layers, strict=True)):
        if kt.cache_layer_kind(a) is GroupKind.STATE:  # the oldest of K conv slots is never read
            assert torch.equal(a.recurrent_states[0], b.recurrent_states[0]), layer
            assert torch.equal(a.conv_states[0][..., 1:], b.conv_states[0][..., 1:]), layer
            assert not b.conv_states[0][..., 0].any()
            continue
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), layer
        assert a.get_seq_length() == b.get_seq_length() == p
    more = _prompt(3, seed=5)  # a chunked continuation, then decoding
    assert torch.equal(_prefill(model, more, cache).logits, _prefill(model, more, rebuilt).logits)
    token = int(out.logits[0, -1].argmax())
    for _ in range(4):
        expected, got = _decode(model, cache, token), _decode(model, rebuilt, token)
        assert torch.equal(expected, got)
        token = int(expected.argmax())


@pytest.mark.parametrize("p", [1, 4, 5, 6])
def test_prompts_shorter_than_the_window_round_trip(models, p):
    """``P < W - 1``: a sliding layer holds every position; ``P >= W - 1``: exactly W - 1."""
    model = models["gpt-oss"]
    spec = kt.spec_for_model(model, tokens_per_block=4)
    cache = DynamicCache(config=model.config)
    out = _prefill(model, _prompt(p), cache)
    sliding = next(g for g in spec.groups if g.kind is GroupKind.SLIDING)
    assert kt.held_ranges(cache, spec)[sliding.name] == TokenRange(max(0, p + 1 - WINDOW), p)
    pools = allocate_pools(spec, 4)
    spans = {g.name: BlockSpan(0, range(2)) for g in spec.groups}
    kt.cache_to_pools(cache, spec, pools.kv, spans, backend=BACKEND)
    rebuilt = kt.pools_to_cache(spec, pools.kv, spans, p, model.config, backend=BACKEND)
    token = int(out.logits[0, -1].argmax())
    for _ in range(WINDOW):  # decode across the point where the window starts sliding
        expected, got = _decode(model, cache, token), _decode(model, rebuilt, token)
        assert torch.equal(expected, got)
        token = int(expected.argmax())


def test_tp_shards_export_their_heads(models):
    model = models["gemma3"]
    spec = kt.spec_for_model(model, tokens_per_block=4)
    cache = DynamicCache(config=model.config)
    _prefill(model, _prompt(11), cache)
    for rank in range(2):
        shard = spec.shard(rank, 2)
        pools = allocate_pools(shard, 4)
        spans = {g.name: BlockSpan(0, range(3)) for g in shard.groups}
        written = kt.cache_to_pools(cache, shard, pools.kv, spans, backend=BACKEND)
        for g in shard.groups:
            packed = gather(pools.kv[g.name], spans[g.name], written[g.name], backend=BACKEND)
            for local, layer in enumerate(g.layer_ids):
                first = kt.held_positions(cache, layer).start
                sel = slice(written[g.name].start - first, written[g.name].end - first)
                k = cache.layers[layer].keys[0, rank : rank + 1, sel].transpose(0, 1)
                assert torch.equal(packed[local, 0], k)


def test_errors_are_raised_before_any_write(models):
    model = models["gpt-oss"]
    spec = kt.spec_for_model(model, tokens_per_block=4)
    cache = DynamicCache(config=model.config)
    _prefill(model, _prompt(14), cache)
    pools = allocate_pools(spec, 8)
    for t in pools.kv.values():
        t.fill_(float("nan"))
    spans = {g.name: BlockSpan(0, range(4)) for g in spec.groups}
    # The sliding layers only hold [9, 14): asking for [0, 14) fails, and the full group
    # (validated first and fine) must not have been written either.
    with pytest.raises(ValueError, match=r"sliding6.*holds positions TokenRange\[9, 14\)"):
        kt.cache_to_pools(
            cache,
            spec,
            pools.kv,
            spans,
            {"full": TokenRange(0, 14), "sliding6": TokenRange(0, 14)},
            backend=BACKEND,
        )
    assert all(bool(t.isnan().all()) for t in pools.kv.values())
    bf16 = replace(spec, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"float32 but the pool holds torch\.bfloat16"):
        kt.cache_to_pools(cache, bf16, allocate_pools(bf16, 8).kv, spans, backend=BACKEND)
    with pytest.raises(ValueError, match="whole model"):
        kt.pools_to_cache(spec.shard(0, 2), pools.kv, spans, 14, model.config)
    short = {**spans, "full": BlockSpan(0, range(2))}
    with pytest.raises(ValueError, match=r"'full'.*does not cover"):
        kt.pools_to_cache(spec, pools.kv, short, 14, model.config)


def test_spec_must_match_the_model(models):
    model = models["gemma3"]
    spec = kt.spec_for_model(model, tokens_per_block=4)
    wrong = replace(
        spec,
        groups=tuple(
            replace(g, window=WINDOW + 1) if g.kind is GroupKind.SLIDING else g for g in spec.groups
        ),
    )
    with pytest.raises(ValueError, match=r"window 7 but layer 0 has sliding_window=6"):
        kt.check_spec(wrong, model.config)
    from transformers import JambaConfig

    jamba = JambaConfig(
        vocab_size=32,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=2,
        attn_layer_offset=1,
    )
    with pytest.raises(ValueError, match="only gated-DeltaNet state layers"):
        kt.spec_for_model(jamba, tokens_per_block=4)
    qwen = models["qwen3-next"]
    spec = kt.spec_for_model(qwen, tokens_per_block=4)
    cache = DynamicCache(config=qwen.config)
    _prefill(qwen, _prompt(9), cache)
    shard = spec.shard(0, 2)
    pools = allocate_pools(shard, 4, num_state_slots=1)
    with pytest.raises(ValueError, match=r"moves only whole \(tp = 1\)"):
        kt.cache_to_pools(
            cache,
            shard,
            pools,
            {"full": BlockSpan(0, range(3))},
            state_slots={"state": 0},
            config=qwen.config,
            backend=BACKEND,
        )


# ---------------------------------------------------------------------------------------
# disaggregated chat, single process
# ---------------------------------------------------------------------------------------


def _chat(model, mode: str):
    spec = kt.spec_for_model(model, tokens_per_block=4)
    ctx = ContextWorker(model, spec, num_blocks=32, backend=BACKEND)
    gen = GenerationWorker(model, spec.with_block_size(5), num_blocks=32, backend=BACKEND)
    turns = [_prompt(USER_TURNS[0], seed=1), _prompt(USER_TURNS[1], seed=2)]
    results = run_chat(
        gen,
        LocalContext(ctx, backend=BACKEND),
        turns,
        steps=STEPS,
        mode=mode,
        evict_sliding_between_turns=True,
    )
    gen.manager.check_invariants()
    assert gen.manager.requests == () and ctx.manager.requests == ()
    return gen, turns, results


@pytest.mark.parametrize("kind", [*kt.TINY_MODELS, "gemma3-sdpa", GEMMA4])
def test_disaggregated_chat_matches_single_process(models, kind):
    model = models[kind]
    runs = {mode: _chat(model, mode) for mode in ("per_group", "single_boundary")}
    gen, turns, _ = runs["per_group"]
    p1 = USER_TURNS[0]
    p2 = p1 + STEPS + 1 + USER_TURNS[1]
    c = (p1 + STEPS) // 5 * 5  # receiver commits [0, P1 + STEPS); blocks of 5 tokens
    prompts = [turns[0], turns[0] + runs["per_group"][2][0].tokens + turns[1]]
    refs = [greedy_reference(model, prompt, STEPS) for prompt in prompts]
    full = [g for g in gen.spec.groups if g.kind is GroupKind.FULL]
    sliding = [g for g in gen.spec.groups if g.kind is GroupKind.SLIDING]
    states = tuple(g.name for g in gen.spec.groups if g.is_state)
    for mode, (_, _, results) in runs.items():
        first, second = results
        assert [r.prompt_len for r in results] == [p1, p2]
        # Turn 1: everything moved from the context side, exactly the reference.
        assert first.tokens == refs[0][0] and torch.equal(first.logits, refs[0][1]), mode
        for g in full:
            assert first.moved[g.name] == TokenRange(0, p1)
        for g in sliding:
            assert first.moved[g.name] == needed_range(g, p1)
        assert first.states == states  # a state moves whole unless held at exactly P
        # Turn 2. Single boundary keeps c only while every group can resume there: the
        # sliding pages were evicted (0), a state snapshot at c exists (c).
        assert second.tokens == refs[1][0], mode
        start = c if mode == "per_group" or not sliding else 0
        for g in full:
            assert second.moved[g.name] == TokenRange(start, p2), (mode, g.name)
        for g in sliding:
            assert second.moved[g.name] == needed_range(g, p2)
        assert second.states == states
        if start == 0 or not full:
            assert torch.equal(second.logits, refs[1][1]), mode
        else:
            torch.testing.assert_close(second.logits, refs[1][1], atol=ATOL, rtol=RTOL)
    per_group, single = runs["per_group"][2][1], runs["single_boundary"][2][1]
    if full and sliding:
        saved = sum(c * gen.spec.bytes_per_token(g) for g in full)
        assert single.bytes - per_group.bytes == saved > 0
        assert per_group.reused_blocks["full"] == range(0, c // 5)
    else:  # all sliding: nothing before the window is needed; state: the boundary holds
        assert per_group.bytes == single.bytes


@pytest.mark.parametrize("kind", [GEMMA4])
def test_per_layer_shapes_are_checked_per_layer(models, kind):
    """Gemma 4's full-attention layers override head_dim and kv heads per layer
    (per_layer_config); check_spec reads them per layer as kvtriton.hf does: no false
    mismatch, and a spec with the global shape for those layers is a mismatch naming one."""
    model = models[kind]
    spec = kt.spec_for_model(model, tokens_per_block=4)  # runs check_spec
    full, sliding = spec.group("full"), spec.group(f"sliding{WINDOW}")
    assert (full.num_kv_heads, full.head_dim, full.layer_ids) == (1, 16, (2, 5))
    assert (sliding.num_kv_heads, sliding.head_dim) == (2, 8)
    assert [kt.layer_kv_shape(model.config, i) for i in range(6)] == [(2, 8), (2, 8), (1, 16)] * 2
    wrong = replace(spec, groups=(replace(full, num_kv_heads=2, head_dim=8), sliding))
    with pytest.raises(ValueError, match=r"group 'full': 2 kv heads x 8 .* layer 2 of the model"):
        kt.check_spec(wrong, model.config)


def test_full_hit_moves_nothing_and_decodes_exactly(models):
    """The same block-aligned prompt again: every group's needed blocks are in the receiver's
    prefix cache (they came from the context side's prefill of this prompt), nothing moves,
    and decoding from the cached blocks is bit-exact."""
    model = models["gemma3"]
    spec = kt.spec_for_model(model, tokens_per_block=4)
    ctx = LocalContext(ContextWorker(model, spec, num_blocks=32, backend=BACKEND), backend=BACKEND)
    gen = GenerationWorker(model, spec.with_block_size(5), num_blocks=32, backend=BACKEND)
    prompt = _prompt(20)  # P and needed(sliding).start = 15 are multiples of 5
    first = gen.run_turn("a", prompt, STEPS, ctx)
    again = gen.run_turn("b", prompt, STEPS, ctx)
    assert first.wire_bytes > 0 and first.moved
    assert again.wire_bytes == 0 and again.moved == {} and again.plan.is_full_hit
    tokens, logits = greedy_reference(model, prompt, STEPS)
    for result in (first, again):
        assert result.tokens == tokens and torch.equal(result.logits, logits)
    gen.manager.check_invariants()


@pytest.mark.parametrize("kind", ["gemma3", "gpt-oss"])
def test_shared_system_prompt_needs_no_eviction_for_the_gap(models, kind):
    """User B shares user A's system prompt. Full attention reuses its blocks; a single
    boundary cannot resume there, because A's sliding-window blocks around the end of the
    system prompt were never allocated (A's window started later): it falls to 0."""
    model = models[kind]
    spec = kt.spec_for_model(model, tokens_per_block=4)
    system, user_a, user_b = (_prompt(n, seed=s) for n, s in ((16, 7), (12, 8), (10, 9)))
    p_b = len(system) + len(user_b)
    reference = greedy_reference(model, system + user_b, STEPS)
    seen = {}
    for mode in ("per_group", "single_boundary"):
        ctx = LocalContext(
            ContextWorker(model, spec, num_blocks=32, backend=BACKEND), backend=BACKEND
        )
        gen = GenerationWorker(model, spec.with_block_size(5), num_blocks=32, backend=BACKEND)
        gen.run_turn("A", system + user_a, STEPS, ctx, mode=mode)
        seen[mode] = b = gen.run_turn("B", system + user_b, STEPS, ctx, mode=mode)
        assert b.tokens == reference[0], mode
        assert b.moved["sliding6"] == TokenRange(p_b + 1 - WINDOW, p_b)
    assert seen["per_group"].moved["full"] == TokenRange(15, p_b)  # 3 shared blocks of 5
    assert seen["single_boundary"].moved["full"] == TokenRange(0, p_b)
    assert seen["per_group"].bytes < seen["single_boundary"].bytes
    assert torch.equal(seen["single_boundary"].logits, reference[1])
    torch.testing.assert_close(seen["per_group"].logits, reference[1], atol=ATOL, rtol=RTOL)


def test_single_boundary_collapses_only_when_window_pages_are_gone(models):
    """With its turn-1 window pages still cached, even one boundary resumes at c; once memory
    pressure evicts the released sliding-window pages the single boundary falls to 0 while
    per-group reuse keeps every full-attention block."""
    model = models["gemma3"]
    spec = kt.spec_for_model(model, tokens_per_block=4)
    ctx = ContextWorker(model, spec, num_blocks=32, backend=BACKEND)
    gen = GenerationWorker(model, spec, num_blocks=32, backend=BACKEND)
    prompt1 = _prompt(USER_TURNS[0])
    first = gen.run_turn("t1", prompt1, STEPS, LocalContext(ctx, backend=BACKEND))
    prompt2 = prompt1 + first.tokens + _prompt(USER_TURNS[1], seed=2)
    c = (USER_TURNS[0] + STEPS) // 4 * 4
    before = {
        m: preview_plan(gen.manager, prompt2, mode=m).group("full").tokens
        for m in ("per_group", "single_boundary")
    }
    assert before == dict.fromkeys(before, TokenRange(c, len(prompt2)))
    assert gen.evict_sliding() > 0
    after = {
        m: preview_plan(gen.manager, prompt2, mode=m).group("full").tokens
        for m in ("per_group", "single_boundary")
    }
    assert after == {
        "per_group": TokenRange(c, len(prompt2)),
        "single_boundary": TokenRange(0, len(prompt2)),
    }


# ---------------------------------------------------------------------------------------
# two processes, torch.distributed (gloo), kvtriton.transfer
# ---------------------------------------------------------------------------------------


def test_chat_over_torch_distributed_matches_single_process(models):
    """Context TP 2 -> generation TP 1 over gloo, three processes: ranks 0 and 1 each prefill
    and keep one of the two kv heads, rank 2 plans per group and its TransferAgent asks each
    context rank for its head; it rebuilds the cache and decodes. Bit-identical to the
    one-process run (which the test above checks against the non-disaggregated reference)."""
    turns = [_prompt(USER_TURNS[0], seed=1), _prompt(USER_TURNS[1], seed=2)]
    cfg = ChatConfig(
        model="gemma3",
        user_turns=tuple(map(tuple, turns)),
        steps=STEPS,
        window=WINDOW,
        ctx_tokens_per_block=4,
        gen_tokens_per_block=5,
        ctx_tp=2,
        backend="auto",
        timeout_s=30.0,
    )  # Triton (interpreter) where it runs
    demo = run_chat_demo(cfg)
    remote = demo.records
    assert sorted(remote) == ["per_group", "single_boundary"]
    for mode, records in remote.items():
        _, _, local = _chat(models["gemma3"], mode)
        assert len(records) == len(local) == 2
        for rec, res in zip(records, local, strict=True):
            assert rec["tokens"] == res.tokens, mode
            assert torch.equal(torch.from_numpy(rec["logits"]), res.logits), mode
            assert rec["moved"] == {g: (t.start, t.end) for g, t in res.moved.items()}
            assert rec["kv_bytes"] == res.kv_bytes and rec["wire_bytes"] > 0
    assert remote["per_group"][1]["kv_bytes"] < remote["single_boundary"][1]["kv_bytes"]
    checks = demo.checks
    assert demo.ok
    assert [(c.mode, c.turn, c.tokens_match, c.exact) for c in checks] == [
        ("per_group", 0, True, True),
        ("per_group", 1, True, False),
        ("single_boundary", 0, True, True),
        ("single_boundary", 1, True, True),
    ]
    assert 0 < checks[1].max_abs_diff < ATOL
    assert "full [25, 43), sliding6 [38, 43)" in demo.report and "saves 47.2%" in demo.report


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", kt.TINY_MODELS)
def test_chat_on_cuda_through_compiled_triton_kernels(kind):
    """Model, pools and the compiled Triton kernels on the GPU; same expectations as on CPU."""
    model = kt.tiny_model(kind, window=WINDOW).cuda()
    spec = kt.spec_for_model(model, tokens_per_block=16)
    turns = [_prompt(40, seed=1), _prompt(25, seed=2)]
    ctx = LocalContext(
        ContextWorker(model, spec, num_blocks=32, backend="triton"), backend="triton"
    )
    gen = GenerationWorker(model, spec.with_block_size(5), num_blocks=64, backend="triton")
    results = run_chat(gen, ctx, turns, steps=12, evict_sliding_between_turns=True)
    conversation: list[int] = []
    for k, result in enumerate(results):
        prompt = conversation + turns[k]
        tokens, logits = greedy_reference(model, prompt, 12)
        assert result.tokens == tokens
        if k == 0:
            assert torch.equal(result.logits, logits)
        else:
            torch.testing.assert_close(result.logits, logits, atol=ATOL, rtol=RTOL)
        conversation = prompt + result.tokens


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma3", "qwen3-next"])
def test_streamed_chat_matches_the_unstreamed_one(models, model):
    """Layer-wise streaming: forward hooks copy and mark each decoder layer while the prefill
    runs, the generation rank receives layer-major chunks meanwhile; the tokens and logits
    are bit-identical to the one-process run (which matches the reference)."""
    turns = [_prompt(USER_TURNS[0], seed=1), _prompt(USER_TURNS[1], seed=2)]
    cfg = ChatConfig(
        model=model,
        user_turns=tuple(map(tuple, turns)),
        steps=STEPS,
        window=WINDOW,
        ctx_tokens_per_block=4,
        gen_tokens_per_block=5,
        modes=("per_group",),
        backend="reference",
        timeout_s=30.0,
        streaming=True,
    )
    demo = run_chat_demo(cfg)
    assert demo.ok, demo.report
    _, _, local = _chat(models[model], "per_group")
    for rec, res in zip(demo.records["per_group"], local, strict=True):
        assert rec["tokens"] == res.tokens
        assert torch.equal(torch.from_numpy(rec["logits"]), res.logits)
