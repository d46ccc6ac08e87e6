"""The convenience API (gather / scatter / copy / state / pack_request(s)): Triton
(interpreter on CPU, compiled on CUDA) and the torch backend, both checked bit-exactly against
the naive per-position oracle (kvtriton.kernels.naive), plus validation (a failed call writes
nothing). Prepared plans: tests/test_kernels_plan.py.

Sizes are small: under the interpreter every program is a Python loop iteration. On a GPU
box every new shape compiles a kernel, so properties run fewer examples there.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_helpers import (
    BACKENDS,
    DEVICES,
    DTYPES,
    HND,
    NHD,
    as_bytes,
    hybrid_spec,
    make_pool,
    make_pools,
    poison,
    random_bits,
    same_bits,
    skip_unless_runnable,
)

from kvtriton import kernels as K
from kvtriton.kernels import checks as C
from kvtriton.kernels import naive
from kvtriton.layout import packed_layout
from kvtriton.ranges import BlockSpan, TokenRange
from kvtriton.spec import KVCacheSpec

# CPU: the CI profile (tests/conftest.py); a GPU box compiles each new shape (~0.5 s).
PROPERTY = settings(
    max_examples=30 if torch.cuda.is_available() else settings.default.max_examples,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def naive_read(pool, span, tokens, layers, heads) -> torch.Tensor:
    return naive.bits(naive.gather(pool, span, tokens, layers, heads))


def naive_write(pool, span, tokens, layers, heads, values) -> None:
    naive.scatter(values, pool, span, tokens, layers, heads)


@st.composite
def side(
    draw,
    tokens: TokenRange,
    *,
    layers_n: int | None = None,
    heads_n: int | None = None,
    kv: int | None = None,
    head_dim: int | None = None,
    unique: bool = True,
):
    """One pool side: shape, physical order, span covering ``tokens``, layer/head selection."""
    tpb = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16]))
    first_needed = tokens.start // tpb
    end_needed = -(-tokens.end // tpb) if len(tokens) else first_needed
    first_block = draw(st.integers(0, first_needed))
    end_block = end_needed + draw(st.integers(0, 2))
    n_span = end_block - first_block
    num_blocks = max(1, n_span + draw(st.integers(0, 3)))
    if unique:
        ids = draw(st.permutations(range(num_blocks)))[:n_span]
    else:
        ids = draw(st.lists(st.integers(0, num_blocks - 1), min_size=n_span, max_size=n_span))
    heads_total = draw(st.integers(1, 4))
    if heads_n is not None:
        heads_total = max(heads_total, heads_n)
    hw = heads_n if heads_n is not None else draw(st.integers(1, heads_total))
    h0 = draw(st.integers(0, heads_total - hw))
    layers_total = draw(st.integers(1, 4))
    if layers_n is not None:
        layers_total = max(layers_total, layers_n)
    ln = layers_n if layers_n is not None else draw(st.integers(1, layers_total))
    layers = draw(st.permutations(range(layers_total)))[:ln]
    kv = kv if kv is not None else draw(st.sampled_from([1, 2]))
    head_dim = head_dim if head_dim is not None else draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    order = draw(
        st.sampled_from([[0, 1, 2, 3, 4], [0, 1, 2, 4, 3], [1, 0, 2, 3, 4], [0, 1, 3, 2, 4]])
        | st.permutations(range(5))
    )
    pad = draw(st.sampled_from([0, 0, 2]))
    return dict(
        shape=(layers_total, num_blocks, kv, tpb, heads_total, head_dim),
        order=list(order),
        pad=pad,
        span=BlockSpan(first_block, ids),
        layers=tuple(layers),
        heads=(h0, h0 + hw),
    )


@st.composite
def token_range(draw, max_len: int = 24):
    start = draw(st.integers(0, 40))
    return TokenRange(start, start + draw(st.integers(0, max_len)))


# ---------------------------------------------------------------------------------------
# properties against the oracle
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(data=st.data(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_gather_matches_oracle(device, backend, data, dtype, seed):
    skip_unless_runnable(device, backend)
    tokens = data.draw(token_range())
    s = data.draw(side(tokens, unique=False))
    gen = torch.Generator().manual_seed(seed)
    pool = make_pool(s["shape"], dtype, s["order"], device, gen, s["pad"])
    before = as_bytes(pool).clone()
    out = poison(
        torch.empty(
            (
                len(s["layers"]),
                s["shape"][2],
                len(tokens),
                s["heads"][1] - s["heads"][0],
                s["shape"][5],
            ),
            dtype=dtype,
            device=device,
        )
    )
    got = K.gather(
        pool, s["span"], tokens, layers=s["layers"], heads=s["heads"], out=out, backend=backend
    )
    assert got is out
    assert torch.equal(
        as_bytes(got), naive_read(pool, s["span"], tokens, s["layers"], s["heads"]).cpu()
    )
    assert torch.equal(as_bytes(pool), before)  # the source is never written


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(data=st.data(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_scatter_matches_oracle(device, backend, data, dtype, seed):
    skip_unless_runnable(device, backend)
    tokens = data.draw(token_range())
    s = data.draw(side(tokens))
    gen = torch.Generator().manual_seed(seed)
    pool = make_pool(s["shape"], dtype, s["order"], device, gen, s["pad"], fill="poison")
    packed = random_bits(
        (
            len(s["layers"]),
            s["shape"][2],
            len(tokens),
            s["heads"][1] - s["heads"][0],
            s["shape"][5],
        ),
        dtype,
        gen,
    ).to(device)
    expected = pool.clone()
    naive_write(expected, s["span"], tokens, s["layers"], s["heads"], packed)
    K.scatter(
        packed, pool, s["span"], tokens, layers=s["layers"], heads=s["heads"], backend=backend
    )
    # every position outside the range (and every unselected layer/head) stays poisoned
    assert same_bits(pool, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(data=st.data(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_copy_matches_oracle(device, backend, data, dtype, seed):
    """Pool -> pool with independent block sizes, spans, strides, layer and head selections."""
    skip_unless_runnable(device, backend)
    tokens = data.draw(token_range())
    src = data.draw(side(tokens, unique=False))
    ln, hn = len(src["layers"]), src["heads"][1] - src["heads"][0]
    dst = data.draw(
        side(tokens, layers_n=ln, heads_n=hn, kv=src["shape"][2], head_dim=src["shape"][5])
    )
    gen = torch.Generator().manual_seed(seed)
    src_pool = make_pool(src["shape"], dtype, src["order"], device, gen, src["pad"])
    dst_pool = make_pool(dst["shape"], dtype, dst["order"], device, gen, dst["pad"], fill="poison")
    expected = dst_pool.clone()
    values = naive_read(src_pool, src["span"], tokens, src["layers"], src["heads"])
    naive_write(expected, dst["span"], tokens, dst["layers"], dst["heads"], values)
    K.copy(
        src_pool,
        src["span"],
        dst_pool,
        dst["span"],
        tokens,
        src_layers=src["layers"],
        dst_layers=dst["layers"],
        src_heads=src["heads"],
        dst_heads=dst["heads"],
        backend=backend,
    )
    assert same_bits(dst_pool, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(data=st.data(), dtype=st.sampled_from([*DTYPES, torch.int8]), seed=st.integers(0, 2**31))
def test_state_roundtrip_matches_oracle(device, backend, data, dtype, seed):
    skip_unless_runnable(device, backend)
    layers_total = data.draw(st.integers(1, 3))
    slots = data.draw(st.integers(1, 4))
    rest = data.draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))
    heads_total = data.draw(st.integers(1, 4))
    ln = data.draw(st.integers(1, layers_total))
    layers = tuple(data.draw(st.permutations(range(layers_total)))[:ln])
    hw = data.draw(st.integers(1, heads_total))
    h0 = data.draw(st.integers(0, heads_total - hw))
    slot = data.draw(st.integers(0, slots - 1))
    gen = torch.Generator().manual_seed(seed)
    # slots-major physical layout for variety: [slots, layers, heads, *rest] permuted back
    phys = random_bits((slots, layers_total, heads_total, *rest), dtype, gen).to(device)
    pool = phys.transpose(0, 1)
    bits = C.bits(pool)
    lay = torch.tensor(layers, device=device)
    out = poison(torch.empty((ln, hw, *rest), dtype=dtype, device=device))
    got = K.gather_state(pool, slot, layers=layers, heads=(h0, h0 + hw), out=out, backend=backend)
    assert torch.equal(as_bytes(got), bits[lay, slot, h0 : h0 + hw].cpu())
    packed = random_bits((ln, hw, *rest), dtype, gen).to(device)
    expected = pool.clone()
    C.bits(expected)[lay, slot, h0 : h0 + hw] = C.bits(packed)
    K.scatter_state(packed, pool, slot, layers=layers, heads=(h0, h0 + hw), backend=backend)
    assert same_bits(pool, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape",
    [
        {"resident_per_sm": 1, "interpret_programs": 3},  # few programs, many tiles each
        {"merge_heads": False, "row_args": False},  # one head per piece, rows from the table
    ],
)
def test_many_tiles_per_row(device, shape, monkeypatch):
    """Token ranges spanning many tiles (tiny tiles: each finds its place inside a row),
    looping programs (each tile's addresses loaded while the last tile moves) and one
    program per tile, heads merged into token rows or not: the same bits."""
    skip_unless_runnable(device, "triton")
    from kvtriton.kernels import descriptors as D

    tiny = D.Tuning(tile_bytes=64, min_tile_bytes=64, interpret_tile_units=16, **shape)
    monkeypatch.setattr(D, "DEFAULT_TUNING", tiny)
    gen = torch.Generator().manual_seed(0)
    pool = make_pool((2, 40, 2, 8, 3, 4), torch.bfloat16, [0, 1, 2, 4, 3], device, gen)
    span = BlockSpan(1, list(range(39, 0, -1)))
    tokens = TokenRange(11, 95)
    out = K.gather(pool, span, tokens, backend="triton")
    assert torch.equal(as_bytes(out), naive_read(pool, span, tokens, (0, 1), (0, 3)).cpu())
    dst = make_pool(
        (2, 80, 2, 4, 3, 4), torch.bfloat16, [0, 1, 2, 3, 4], device, gen, fill="poison"
    )
    dspan = BlockSpan(2, list(range(79, 0, -1)))
    expected = dst.clone()
    naive_write(expected, dspan, tokens, (1, 0), (0, 3), out)
    K.scatter(out, dst, dspan, tokens, layers=[1, 0], backend="triton")
    assert same_bits(dst, expected)


# ---------------------------------------------------------------------------------------
# request-level entries
# ---------------------------------------------------------------------------------------
def _request(
    spec: KVCacheSpec, prompt: int, cached: int, num_blocks: int, gen, *, layers=None, heads=None
):
    tokens = {}
    spans = {}
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tpb = spec.tokens_per_block
    for g in spec.groups:
        if g.kind == "state":
            continue
        lo = max(cached, 0 if g.kind == "full" else max(0, prompt + 1 - g.window))
        rng = TokenRange(min(lo, prompt), prompt)
        tokens[g.name] = rng
        n = -(-prompt // tpb)
        spans[g.name] = BlockSpan(0, perm[:n])
        perm = perm[n:]
    layout = packed_layout(spec, tokens, ["state"], layers=layers, heads=heads)
    return layout, spans


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hnd", [False, True])
def test_pack_unpack_request_matches_reference(device, hnd):
    skip_unless_runnable(device, "triton")
    spec = hybrid_spec()
    gen = torch.Generator().manual_seed(1)
    pools = make_pools(spec, 16, device, gen, order=HND if hnd else NHD)
    layout, spans = _request(
        spec,
        prompt=13,
        cached=3,
        num_blocks=16,
        gen=gen,
        layers={"win": [5, 0]},
        heads={"full": (1, 2)},
    )
    slots = {"state": 4}
    bufs = {}
    for backend in BACKENDS:
        buf = torch.full((layout.nbytes,), 0xA5, dtype=torch.uint8, device=device)
        K.pack_request(spec, layout, pools, spans, slots, buf, backend=backend)
        bufs[backend] = buf
    assert torch.equal(bufs["triton"].cpu(), bufs["reference"].cpu())
    # each segment equals the oracle gather of its group
    for seg in layout.segments:
        g = spec.group(seg.group)
        view = bufs["triton"][seg.offset : seg.end].view(getattr(torch, seg.dtype)).view(seg.shape)
        local = tuple(g.layer_ids.index(i) for i in seg.layer_ids)
        if seg.kind == "kv":
            h = (seg.heads[0] - g.head_start, seg.heads[1] - g.head_start)
            ref = naive_read(pools[g.name], spans[g.name], seg.tokens, local, h)
        else:
            ref = C.bits(pools[g.name])[
                torch.tensor(local, device=device), 4, seg.heads[0] : seg.heads[1]
            ]
        assert torch.equal(as_bytes(view), ref.cpu()), seg.group
    results = {}
    for backend in BACKENDS:
        dst = make_pools(
            spec,
            16,
            device,
            torch.Generator().manual_seed(2),
            fill="poison",
            order=HND if hnd else NHD,
        )
        K.unpack_request(spec, layout, bufs["triton"], dst, spans, {"state": 1}, backend=backend)
        results[backend] = dst
    for name in results["triton"]:
        assert same_bits(results["triton"][name], results["reference"][name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_pack_requests_batched_equals_one_by_one(device, monkeypatch):
    """Three requests in one buffer: one launch per group, bytes equal to single packs,
    and unpack_requests restores exactly the packed positions."""
    skip_unless_runnable(device, "triton")
    from kvtriton.kernels import triton_kernels as T

    spec = hybrid_spec(tpb=3)
    gen = torch.Generator().manual_seed(3)
    pools = make_pools(spec, 40, device, gen)
    reqs = []
    offset = 0
    all_blocks = torch.randperm(40, generator=gen).tolist()
    for r, (prompt, cached) in enumerate([(10, 0), (7, 5), (12, 12)]):
        layout, spans = _request(spec, prompt, cached, 40, gen)
        # disjoint blocks per request (unpack writes them)
        spans = {k: BlockSpan(0, all_blocks[: len(v)]) for k, v in spans.items()}
        all_blocks = all_blocks[max(len(v) for v in spans.values()) :]
        reqs.append(K.PackedRequest(layout, spans, {"state": r}, offset))
        offset += layout.nbytes
    launches = []
    real_launch = T.launch
    monkeypatch.setattr(T, "launch", lambda *a: (launches.append(a[0]), real_launch(*a))[1])
    buf = torch.full((offset,), 0xA5, dtype=torch.uint8, device=device)
    K.pack_requests(spec, reqs, pools, buf, backend="triton")
    # one launch for the attention groups of all three requests, one for the state rows
    # (15 fp32 = 60 bytes: a piece width the 16- and 24-byte heads do not share)
    assert [launch.rows for launch in launches] == [6, 3]
    for req in reqs:
        single = torch.full((req.layout.nbytes,), 0xA5, dtype=torch.uint8, device=device)
        K.pack_request(
            spec, req.layout, pools, req.spans, req.state_slots, single, backend="reference"
        )
        assert torch.equal(buf[req.offset : req.offset + req.layout.nbytes].cpu(), single.cpu())
    outs = {}
    for backend in BACKENDS:
        dst = make_pools(spec, 40, device, torch.Generator().manual_seed(4), fill="poison")
        K.unpack_requests(spec, reqs, buf, dst, backend=backend)
        outs[backend] = dst
    for name in outs["triton"]:
        assert same_bits(outs["triton"][name], outs["reference"][name]), name


# ---------------------------------------------------------------------------------------
# validation: ValueError naming the argument, and nothing written
# ---------------------------------------------------------------------------------------
def _bad_calls(device):
    gen = torch.Generator().manual_seed(5)
    pool = make_pool((2, 6, 2, 4, 2, 8), torch.bfloat16, [0, 1, 2, 3, 4], device, gen)
    other = make_pool((2, 6, 2, 4, 2, 8), torch.bfloat16, [0, 1, 2, 4, 3], device, gen)
    span = BlockSpan(0, [3, 1, 4])
    rng = TokenRange(1, 10)
    packed = random_bits((2, 2, 9, 2, 8), torch.bfloat16, gen).to(device)
    f32 = torch.zeros((2, 2, 9, 2, 8), dtype=torch.float32, device=device)
    meta = torch.empty((2, 2, 9, 2, 8), dtype=torch.bfloat16, device="meta")
    state = random_bits((2, 3, 2, 5), torch.float32, gen).to(device)
    return [
        # (what is written, call, the argument named)
        (pool, lambda b: K.scatter(packed, pool[0], span, rng, backend=b), "pool"),
        (pool, lambda b: K.scatter(packed, pool.transpose(4, 5), span, rng, backend=b), "pool"),
        (pool, lambda b: K.scatter(packed, pool, BlockSpan(1, [3, 1, 4]), rng, backend=b), "span"),
        (pool, lambda b: K.scatter(packed, pool, BlockSpan(0, [3, 1, 6]), rng, backend=b), "span"),
        (pool, lambda b: K.scatter(packed, pool, BlockSpan(0, [3, 1, 3]), rng, backend=b), "span"),
        (pool, lambda b: K.scatter(packed, pool, span, rng, layers=[0, 2], backend=b), "layers"),
        (pool, lambda b: K.scatter(packed, pool, span, rng, layers=[1, 1], backend=b), "layers"),
        (pool, lambda b: K.scatter(packed, pool, span, rng, heads=(1, 3), backend=b), "heads"),
        (pool, lambda b: K.scatter(packed[:, :, 1:], pool, span, rng, backend=b), "packed"),
        (pool, lambda b: K.scatter(f32, pool, span, rng, backend=b), "packed"),
        (pool, lambda b: K.scatter(meta, pool, span, rng, backend=b), "packed"),
        (
            pool,
            lambda b: K.scatter(
                packed.transpose(0, 1).contiguous().transpose(0, 1), pool, span, rng, backend=b
            ),
            "packed",
        ),
        (pool, lambda b: K.scatter(packed, pool, span, [1, 10], backend=b), "tokens"),
        (pool, lambda b: K.scatter(packed, pool, span, rng, backend="cuda"), "backend"),
        (pool, lambda b: K.scatter(packed, pool.double(), span, rng, backend=b), "pool"),
        (
            pool,
            lambda b: K.scatter(packed, pool[:, :1].expand(2, 6, 2, 4, 2, 8), span, rng, backend=b),
            "pool",
        ),
        (f32, lambda b: K.gather(pool, span, rng, out=f32, backend=b), "out"),
        (packed, lambda b: K.gather(pool, span, rng, out=packed[:1], backend=b), "out"),
        (
            other,
            lambda b: K.copy(pool, span, other, BlockSpan(0, [0, 1]), rng, backend=b),
            "dst_span",
        ),
        (
            other,
            lambda b: K.copy(pool, span, other, span, rng, dst_layers=[1], backend=b),
            "dst_layers",
        ),
        (
            other,
            lambda b: K.copy(pool, span, other, span, rng, dst_heads=(0, 1), backend=b),
            "dst_heads",
        ),
        (other, lambda b: K.copy(pool, span, other.float(), span, rng, backend=b), "dst_pool"),
        (
            pool,
            lambda b: K.copy(pool, span, pool, BlockSpan(0, [0, 1, 4]), rng, backend=b),
            "overlap",
        ),
        (
            state,
            lambda b: K.scatter_state(torch.zeros(2, 2, 5, device=device), state, 3, backend=b),
            "slot",
        ),
        (
            state,
            lambda b: K.scatter_state(torch.zeros(2, 1, 5, device=device), state, 0, backend=b),
            "packed",
        ),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_arguments_raise_and_write_nothing(device, backend):
    skip_unless_runnable(device, backend)
    for i, (target, call, name) in enumerate(_bad_calls(device)):
        before = as_bytes(target).clone()
        with pytest.raises(ValueError, match=name):
            call(backend)
        assert torch.equal(as_bytes(target), before), f"case {i} wrote before failing"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_request_validation_writes_nothing(device, backend):
    """A bad argument for the LAST group leaves every earlier group's pool untouched."""
    skip_unless_runnable(device, backend)
    spec = hybrid_spec()
    gen = torch.Generator().manual_seed(6)
    pools = make_pools(spec, 16, device, gen)
    layout, spans = _request(spec, prompt=13, cached=2, num_blocks=16, gen=gen)
    buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    K.pack_request(spec, layout, pools, spans, {"state": 1}, buf, backend=backend)
    snapshot = {k: as_bytes(v).clone() for k, v in pools.items()}
    bad = [
        (dict(state_slots={"state": 6}), "state_slots"),
        (dict(state_slots={}), "state_slots"),
        (dict(spans={**spans, "mla": BlockSpan(0, [99] * 4)}), "spans\\['mla'\\]"),
        (dict(spans={k: v for k, v in spans.items() if k != "mla"}), "spans"),
        (dict(pools={**pools, "mla": pools["mla"][:, :, :, :, :, :6]}), "pools\\['mla'\\]"),
        (dict(pools={k: v for k, v in pools.items() if k != "state"}), "pools"),
        (dict(pools={**pools, "state": pools["state"].to(torch.bfloat16)}), "pools"),
        (dict(buffer=buf[1:]), "buffer"),
        (dict(buffer=buf.view(torch.int8)), "buffer"),
        (
            dict(buffer=torch.empty(layout.nbytes + 1, dtype=torch.uint8, device=device)[1:]),
            "buffer",
        ),
    ]
    for override, name in bad:
        kwargs = dict(
            spec=spec,
            layout=layout,
            buffer=buf,
            pools=pools,
            spans=spans,
            state_slots={"state": 1},
            backend=backend,
        )
        kwargs.update(override)
        with pytest.raises(ValueError, match=name):
            K.unpack_request(**kwargs)
        for k, v in pools.items():
            assert torch.equal(as_bytes(v), snapshot[k]), (override, k)
    # overlapping requests in a batch
    reqs = [
        K.PackedRequest(layout, spans, {"state": 1}, 0),
        K.PackedRequest(layout, spans, {"state": 2}, 128),
    ]
    big = torch.empty(layout.nbytes + 128, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="overlap"):
        K.pack_requests(spec, reqs, pools, big, backend=backend)
    with pytest.raises(ValueError, match="offset"):
        K.pack_requests(
            spec, [K.PackedRequest(layout, spans, {"state": 1}, 3)], pools, big, backend=backend
        )


def test_resolve_backend():
    assert K.resolve_backend("reference", "cpu") == "reference"
    expected = "triton" if K.interpreter_enabled() else "reference"
    assert K.resolve_backend("auto", "cpu") == expected
    with pytest.raises(ValueError, match="backend"):
        K.resolve_backend("cuda", "cpu")
    if not K.interpreter_enabled():
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            K.resolve_backend("triton", "cpu")


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device with > 2.2 GB free (a pool over 2**31 elements)",
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_over_2_pow_31_elements(backend):
    """int64 address math: blocks at the end of a pool of more than 2**31 bytes (fp8)."""
    layers, blocks, kv, tpb, heads, dim = 2, 33000, 2, 16, 8, 128  # 2.16e9 elements
    assert layers * blocks * kv * tpb * heads * dim > 2**31
    pool = torch.empty(
        (layers, blocks, kv, tpb, heads, dim), dtype=torch.float8_e4m3fn, device="cuda"
    )
    gen = torch.Generator().manual_seed(7)
    span = BlockSpan(0, [blocks - 1, blocks - 3, 5])
    tokens = TokenRange(3, 40)
    for b in span.block_ids:
        C.bits(pool)[:, b] = torch.randint(
            0, 256, (layers, kv, tpb, heads, dim), dtype=torch.uint8, generator=gen
        ).cuda()
    out = K.gather(pool, span, tokens, backend=backend)
    assert torch.equal(as_bytes(out), naive_read(pool, span, tokens, (0, 1), (0, 8)).cpu())
    dspan = BlockSpan(0, [blocks - 2, blocks - 4, 7])
    K.scatter(out, pool, dspan, tokens, layers=[1, 0], backend=backend)
    assert torch.equal(as_bytes(K.gather(pool, dspan, tokens, layers=[1, 0])), as_bytes(out))
    del pool
    torch.cuda.empty_cache()


def test_packed_shapes_follow_layout():
    spec = hybrid_spec()
    layout = packed_layout(spec, {"full": TokenRange(2, 9)}, ["state"])
    seg = layout.segment("full")
    assert seg.shape == (2, 2, 7, 2, 8)
    assert math.prod(seg.shape) * 2 == seg.nbytes


@pytest.mark.parametrize("offset", [0, 2], ids=["pieces-aligned", "pieces-misaligned"])
def test_torch_backend_indexes_whole_pieces_only_when_every_piece_is_aligned(
    offset: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torch backend moves whole head rows when they start on a multiple of their width
    and falls back to one index per unit otherwise (a pool view 4 bytes into its storage):
    both bit-exact against the naive oracle."""
    from kvtriton.kernels import torch_backend

    widths: list[int] = []
    indices = torch_backend._indices

    def spy(*args: object) -> list:
        rows = indices(*args)  # type: ignore[arg-type]
        widths.extend(r[4] for r in rows)
        return rows

    monkeypatch.setattr(torch_backend, "_indices", spy)
    shape = (3, 12, 2, 4, 4, 16)
    gen = torch.Generator().manual_seed(offset)
    storage = torch.randn(math.prod(shape) + offset, generator=gen).to(torch.bfloat16)
    pool = storage[offset:].view(shape)
    tokens = TokenRange(5, 27)
    span = BlockSpan(1, torch.randperm(12, generator=gen)[:7].tolist())
    out = K.gather(pool, span, tokens, backend="reference")
    assert torch.equal(naive.bits(out), naive.bits(naive.gather(pool, span, tokens)))

    def nan_pool() -> torch.Tensor:  # the same misalignment on the scatter side
        nans = torch.full((math.prod(shape) + offset,), float("nan"), dtype=torch.bfloat16)
        return nans[offset:].view(shape)

    dst, want = nan_pool(), nan_pool()
    K.scatter(out, dst, span, tokens, backend="reference")
    naive.scatter(out, want, span, tokens)
    assert torch.equal(naive.bits(dst), naive.bits(want))
    assert widths and all((w > 1) == (offset == 0) for w in widths), widths
