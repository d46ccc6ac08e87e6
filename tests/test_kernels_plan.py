"""Prepared plans: PoolSet, prepare_pack / prepare_unpack / prepare_copy and
PreparedMoves.run on both backends, against the naive oracle (kvtriton.kernels.naive).

Destinations are ``torch.empty`` pools filled with NaN (0xA5 bytes for fp8): every position
outside the planned ones, also inside the touched blocks, must stay poisoned. Sizes are
small (the Triton interpreter runs every program in Python).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_helpers import (
    BACKENDS,
    DEVICES,
    HND,
    NHD,
    hybrid_spec,
    make_pools,
    poison,
    same_bits,
    skip_unless_runnable,
)

from kvtriton import kernels as K
from kvtriton.kernels import descriptors as D
from kvtriton.kernels import naive
from kvtriton.layout import PackedLayout, packed_layout
from kvtriton.ranges import BlockSpan, TokenRange
from kvtriton.spec import KVCacheSpec, LayerGroup
from kvtriton.target import TransferTarget

# CPU: the CI profile (tests/conftest.py); a GPU box compiles each new shape (~0.5 s).
PROPERTY = settings(
    max_examples=25 if torch.cuda.is_available() else settings.default.max_examples,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------------------------
# a request on two ranks: specs, pools, spans, targets, chunks
# ---------------------------------------------------------------------------------------
def odd_spec(dtype: str, tpb: int) -> KVCacheSpec:
    """head_dim 3 / 5 / 48, kv 2 and 1, a sliding window and an fp32 state, 8 layers."""
    groups = (
        LayerGroup("full", "full", (0, 3, 5), num_kv_heads=4, head_dim=3),
        LayerGroup("win", "sliding", (1, 4), num_kv_heads=2, head_dim=5, window=7),
        LayerGroup("mla", "full", (2,), num_kv_heads=1, head_dim=48, kv_factor=1),
        LayerGroup("ssm", "state", (6, 7), state_shape=(4, 3, 5), state_dtype="float32"),
    )
    return KVCacheSpec(groups, tokens_per_block=tpb, dtype=dtype, name="odd")


def wide_spec(dtype: str, tpb: int) -> KVCacheSpec:
    """head_dim 256 and 512 (an MLA latent, kv 1) side by side, and a sliding group."""
    groups = (
        LayerGroup("g256", "full", (0, 2), num_kv_heads=2, head_dim=256),
        LayerGroup("g512", "full", (1,), num_kv_heads=1, head_dim=512, kv_factor=1),
        LayerGroup("slide", "sliding", (3,), num_kv_heads=2, head_dim=256, window=5),
    )
    return KVCacheSpec(groups, tokens_per_block=tpb, dtype=dtype, name="wide")


def spans_for(spec: KVCacheSpec, tokens: dict[str, TokenRange], blocks: int, gen) -> dict:
    """A span per group covering its range (first block = the range's), distinct random ids
    (a destination's ids must be)."""
    out = {}
    tpb = spec.tokens_per_block
    for name, rng in tokens.items():
        first = rng.start // tpb
        n = -(-rng.end // tpb) - first
        ids = torch.randperm(blocks, generator=gen)[:n].tolist()
        out[name] = BlockSpan(first, ids)
    return out


def target_for(spec, tokens, spans, slots, pools, prompt, destination) -> TransferTarget:
    return TransferTarget.from_spans(
        "req",
        prompt,
        tokens,
        spans,
        slots,
        tokens_per_block=spec.tokens_per_block,
        num_blocks={g.name: pools[g.name].shape[1] for g in spec.groups if g.kind != "state"},
        num_slots={g.name: pools[g.name].shape[1] for g in spec.groups if g.kind == "state"},
        destination=destination,
    )


def chunked(
    spec: KVCacheSpec,
    tokens: dict[str, TokenRange],
    states: tuple[str, ...],
    parts: int,
    layers=None,
    heads=None,
) -> list[PackedLayout]:
    """The request cut into ``parts`` chunks by token position (states in the last), each a
    packed layout, as the transfer layer's chunking does."""
    out = []
    for k in range(parts):
        sub = {}
        for name, rng in tokens.items():
            lo = rng.start + len(rng) * k // parts
            hi = rng.start + len(rng) * (k + 1) // parts
            if hi > lo:
                sub[name] = TokenRange(lo, hi)
        out.append(
            packed_layout(
                spec,
                sub,
                states if k == parts - 1 else (),
                layers={g: v for g, v in (layers or {}).items() if g in sub or g in states},
                heads={g: v for g, v in (heads or {}).items() if g in sub or g in states},
            )
        )
    return out


def check_pack(spec, chunks, pools, spans, slots, prepared, device) -> list[torch.Tensor]:
    """Run every chunk of ``prepared`` into 0xA5-filled buffers; equal to the oracle's bytes
    in every segment, padding untouched."""
    bufs = []
    for k, chunk in enumerate(chunks):
        assert prepared.nbytes(k) == chunk.nbytes
        buf = torch.full((chunk.nbytes + 64,), 0xA5, dtype=torch.uint8, device=device)
        prepared.run(k, buf)
        want = torch.full_like(buf, 0xA5)
        oracle = naive.pack(spec, chunk, pools, spans, slots)
        for seg in chunk.segments:
            want[seg.offset : seg.end] = oracle[seg.offset : seg.end]
        assert torch.equal(buf.cpu(), want.cpu()), f"chunk {k}"
        bufs.append(buf[: chunk.nbytes])
    return bufs


# ---------------------------------------------------------------------------------------
# curated cases: odd and wide head dims, every dtype, NHD / HND, block sizes 1 / 3 / 16
# ---------------------------------------------------------------------------------------
CASES = [
    # spec, dtype, (src tpb, dst tpb), (src order, dst order), tp rank of 2, chunks
    ("odd", "float32", (3, 16), (NHD, HND), 1, 3),
    ("odd", "float16", (1, 3), (HND, NHD), 0, 2),
    ("odd", "bfloat16", (16, 1), (NHD, NHD), None, 1),
    ("odd", "float8_e4m3fn", (3, 3), (HND, HND), 1, 2),
    ("wide", "bfloat16", (16, 3), (NHD, HND), None, 2),
    ("wide", "float8_e5m2", (1, 16), (HND, NHD), None, 1),
    ("wide", "float32", (3, 1), (NHD, NHD), None, 3),
]


def _request_case(case, device, seed=0):
    kind, dtype, (stpb, dtpb), (sorder, dorder), tp_rank, parts = case
    make = odd_spec if kind == "odd" else wide_spec
    model = make(dtype, stpb)
    gen = torch.Generator().manual_seed(seed)
    src_spec = model.shard(tp_rank, 2) if tp_rank is not None else model
    dst_spec = src_spec.with_block_size(dtpb)
    prompt = 23
    tokens = {}
    for g in model.groups:
        if g.kind == "state":
            continue
        start = 4 if g.kind == "full" else prompt + 1 - g.window  # cached 4 / window
        tokens[g.name] = TokenRange(start, prompt)
    states = tuple(g.name for g in model.groups if g.kind == "state")
    # what the shard holds; the first group: a layer subset and a head sub-range of it
    heads = {}
    for g in src_spec.groups:
        if g.kind == "state":
            heads[g.name] = (g.state_head_start, g.state_head_end)
        else:
            heads[g.name] = (g.head_start, g.head_end)
    first = src_spec.groups[0]
    layers = {first.name: first.layer_ids[1:]}
    heads[first.name] = (first.head_start, first.head_start + max(1, first.local_heads // 2))
    chunks = chunked(model, tokens, states, parts, layers, heads)
    src_pools = make_pools(src_spec, 24, device, gen, order=sorder)
    dst_pools = make_pools(dst_spec, 30, device, gen, order=dorder, fill="poison")
    src_spans = spans_for(src_spec, tokens, 24, gen)
    dst_spans = spans_for(dst_spec, tokens, 30, gen)
    src_slots = dict.fromkeys(states, 4)
    dst_slots = dict.fromkeys(states, 1)
    return dict(
        src_spec=src_spec,
        dst_spec=dst_spec,
        chunks=chunks,
        src_pools=src_pools,
        dst_pools=dst_pools,
        src_spans=src_spans,
        dst_spans=dst_spans,
        src_slots=src_slots,
        dst_slots=dst_slots,
        src_target=target_for(src_spec, tokens, src_spans, src_slots, src_pools, prompt, False),
        dst_target=target_for(dst_spec, tokens, dst_spans, dst_slots, dst_pools, prompt, True),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[5]}")
def test_prepared_pack_unpack_copy_match_naive(device, backend, case):
    skip_unless_runnable(device, backend)
    r = _request_case(case, device)
    src = K.PoolSet(r["src_spec"], r["src_pools"])
    dst = K.PoolSet(r["dst_spec"], r["dst_pools"])
    before = {k: v.clone() for k, v in r["src_pools"].items()}
    packer = K.prepare_pack(src, r["src_target"], r["chunks"], backend=backend)
    assert packer.num_chunks == len(r["chunks"]) and packer.backend == backend
    bufs = check_pack(
        r["src_spec"], r["chunks"], r["src_pools"], r["src_spans"], r["src_slots"], packer, device
    )
    for k, v in r["src_pools"].items():
        assert same_bits(v, before[k]), f"pack wrote its source {k}"

    # unpack into poisoned pools == the oracle's unpack of the same bytes
    unpacker = K.prepare_unpack(dst, r["dst_target"], r["chunks"], backend=backend)
    expected = {k: v.clone() for k, v in r["dst_pools"].items()}
    for k, chunk in enumerate(r["chunks"]):
        unpacker.run(k, bufs[k])
        naive.unpack(r["dst_spec"], chunk, bufs[k], expected, r["dst_spans"], r["dst_slots"])
    for k, v in r["dst_pools"].items():
        assert same_bits(v, expected[k]), f"unpack {k}"

    # pool -> pool copy into fresh poisoned pools == the oracle's copy
    for v in r["dst_pools"].values():
        poison(v)
    copier = K.prepare_copy(
        src, r["src_target"], dst, r["dst_target"], r["chunks"], backend=backend
    )
    expected = {k: v.clone() for k, v in r["dst_pools"].items()}
    for k, chunk in enumerate(r["chunks"]):
        copier.run(k)
        naive.copy_request(
            chunk,
            r["src_spec"],
            r["src_pools"],
            r["src_spans"],
            r["src_slots"],
            r["dst_spec"],
            expected,
            r["dst_spans"],
            r["dst_slots"],
        )
    for k, v in r["dst_pools"].items():
        assert same_bits(v, expected[k]), f"copy {k}"


# ---------------------------------------------------------------------------------------
# properties: random hybrid specs, shards, selections, block sizes, layouts, chunks
# ---------------------------------------------------------------------------------------
ORDERS = [NHD, HND, [1, 0, 2, 3, 4], [0, 1, 3, 2, 4], [2, 0, 1, 4, 3]]


@st.composite
def random_request(draw):
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "float8_e4m3fn"]))
    groups, layer = [], 0
    for i in range(draw(st.integers(1, 3))):
        nl = draw(st.integers(1, 2))
        kind = draw(st.sampled_from(["full", "sliding"]))
        groups.append(
            LayerGroup(
                f"g{i}",
                kind,
                tuple(range(layer, layer + nl)),
                num_kv_heads=draw(st.sampled_from([1, 2, 4])),
                head_dim=draw(st.sampled_from([1, 2, 3, 5, 8, 16])),
                kv_factor=draw(st.sampled_from([1, 2])),
                window=draw(st.integers(1, 12)) if kind == "sliding" else None,
            )
        )
        layer += nl
    if draw(st.booleans()):
        shape = (draw(st.sampled_from([2, 4])), *draw(st.lists(st.integers(1, 3), max_size=2)))
        groups.append(
            LayerGroup(
                "s",
                "state",
                (layer, layer + 1),
                state_shape=shape,
                state_dtype=draw(st.sampled_from([None, "float32"])),
            )
        )
    tpbs = (draw(st.sampled_from([1, 2, 3, 4, 8])), draw(st.sampled_from([1, 2, 3, 5, 16])))
    model = KVCacheSpec(tuple(groups), tokens_per_block=tpbs[0], dtype=dtype)
    tp = draw(st.sampled_from([None, 0, 1]))
    spec = model.shard(tp, 2) if tp is not None else model
    prompt = draw(st.integers(1, 20))
    tokens, layers, heads = {}, {}, {}
    for g in spec.groups:
        if g.kind == "state":
            lo, hi = g.state_head_start, g.state_head_end
        else:
            lo, hi = g.head_start, g.head_end
            tokens[g.name] = TokenRange(draw(st.integers(0, prompt - 1)), prompt)
        h0 = draw(st.integers(lo, hi - 1))
        heads[g.name] = (h0, draw(st.integers(h0 + 1, hi)))
        ids = draw(st.lists(st.sampled_from(g.layer_ids), min_size=1, unique=True))
        layers[g.name] = tuple(sorted(ids))
    states = tuple(g.name for g in spec.groups if g.kind == "state")
    return dict(
        model=model,
        spec=spec,
        tpbs=tpbs,
        prompt=prompt,
        tokens=tokens,
        states=states,
        layers=layers,
        heads=heads,
        parts=draw(st.integers(1, 3)),
        orders=(draw(st.sampled_from(ORDERS)), draw(st.sampled_from(ORDERS))),
        direction=draw(st.sampled_from(["pack", "unpack", "copy"])),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(r=random_request(), seed=st.integers(0, 2**31))
def test_prepared_moves_match_naive(device, backend, r, seed):
    skip_unless_runnable(device, backend)
    gen = torch.Generator().manual_seed(seed)
    chunks = chunked(r["model"], r["tokens"], r["states"], r["parts"], r["layers"], r["heads"])
    src_spec = r["spec"]
    dst_spec = src_spec.with_block_size(r["tpbs"][1])
    blocks = r["prompt"] + 2
    src_pools = make_pools(src_spec, blocks, device, gen, order=r["orders"][0], slots=3)
    dst_pools = make_pools(dst_spec, blocks, device, gen, order=r["orders"][1], slots=3)
    src_spans = spans_for(src_spec, r["tokens"], blocks, gen)
    dst_spans = spans_for(dst_spec, r["tokens"], blocks, gen)
    src_slots, dst_slots = dict.fromkeys(r["states"], 2), dict.fromkeys(r["states"], 0)
    prompt = r["prompt"]
    src_t = target_for(src_spec, r["tokens"], src_spans, src_slots, src_pools, prompt, False)
    dst_t = target_for(dst_spec, r["tokens"], dst_spans, dst_slots, dst_pools, prompt, True)
    src, dst = K.PoolSet(src_spec, src_pools), K.PoolSet(dst_spec, dst_pools)
    for v in dst_pools.values():
        poison(v)
    expected = {k: v.clone() for k, v in dst_pools.items()}
    if r["direction"] == "pack":
        packer = K.prepare_pack(src, src_t, chunks, backend=backend)
        check_pack(src_spec, chunks, src_pools, src_spans, src_slots, packer, device)
        return
    if r["direction"] == "unpack":
        unpacker = K.prepare_unpack(dst, dst_t, chunks, backend=backend)
        for k, chunk in enumerate(chunks):
            buf = naive.pack(src_spec, chunk, src_pools, src_spans, src_slots)
            unpacker.run(k, buf)
            naive.unpack(dst_spec, chunk, buf, expected, dst_spans, dst_slots)
    else:
        copier = K.prepare_copy(src, src_t, dst, dst_t, chunks, backend=backend)
        for k, chunk in enumerate(chunks):
            copier.run(k)
            naive.copy_request(
                chunk,
                src_spec,
                src_pools,
                src_spans,
                src_slots,
                dst_spec,
                expected,
                dst_spans,
                dst_slots,
            )
    for k, v in dst_pools.items():
        assert same_bits(v, expected[k]), k


# ---------------------------------------------------------------------------------------
# launches: one per chunk (+1 for state rows of another width); long rows; many rows
# ---------------------------------------------------------------------------------------
def _count_launches(monkeypatch) -> list:
    from kvtriton.kernels import triton_kernels as T

    seen: list = []
    real = T.launch
    monkeypatch.setattr(T, "launch", lambda *a: (seen.append(a[0]), real(*a))[1])
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row", [15, 16])
def test_one_launch_per_chunk(device, row, monkeypatch):
    """All groups, layers and heads of a chunk in one launch; a state group joins it when its
    rows share the copy unit and piece width (16 fp32 = 64 B), else one more (15 = 60 B)."""
    skip_unless_runnable(device, "triton")
    groups = (
        LayerGroup("full", "full", (1, 4), num_kv_heads=2, head_dim=8),
        LayerGroup("win", "sliding", (0, 2, 5), num_kv_heads=2, head_dim=8, window=6),
        LayerGroup("mla", "full", (6,), num_kv_heads=1, head_dim=12, kv_factor=1),
        LayerGroup("state", "state", (3, 7), state_shape=(2, row), state_dtype="float32"),
    )
    spec = KVCacheSpec(groups, tokens_per_block=4, dtype="bfloat16")
    gen = torch.Generator().manual_seed(0)
    pools = make_pools(spec, 16, device, gen)
    tokens = {"full": TokenRange(2, 13), "win": TokenRange(8, 13), "mla": TokenRange(0, 13)}
    spans = spans_for(spec, tokens, 16, gen)
    target = target_for(spec, tokens, spans, {"state": 3}, pools, 13, False)
    chunks = chunked(spec, tokens, ("state",), 2)
    launches = _count_launches(monkeypatch)
    packer = K.prepare_pack(K.PoolSet(spec, pools), target, chunks, backend="triton")
    check_pack(spec, chunks, pools, spans, {"state": 3}, packer, device)
    assert [launch.rows for launch in launches] == ([3, 4] if row == 16 else [3, 3, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_rows_split_by_layers_and_searched_in_two_levels(device, monkeypatch):
    """A move of more pieces than a row may hold splits into rows by layers, and a launch of
    many rows takes the two-level row search; both bit-exact."""
    skip_unless_runnable(device, "triton")
    monkeypatch.setattr(D, "MAX_PIECES", 40)  # a layer of the pool below holds 2*3*4 = 24
    monkeypatch.setattr(D, "SEG_ONE_LEVEL", 4)  # > 4 rows: two levels,
    monkeypatch.setattr(D, "SEG_FINE", 8)  # a coarse table of every 8th row
    gen = torch.Generator().manual_seed(1)
    spec = KVCacheSpec(
        (LayerGroup("kv", "full", tuple(range(5)), num_kv_heads=4, head_dim=2),),
        tokens_per_block=3,
        dtype="float16",
    )
    pools = make_pools(spec, 80, device, gen, order=HND)
    requests, offset = [], 0
    perm = torch.randperm(80, generator=gen).tolist()
    for i in range(12):  # 12 requests x 5 rows (one per layer): 60 rows
        rng = TokenRange(i % 3, i % 3 + 3)
        span = BlockSpan(rng.start // 3, perm[2 * i : 2 * i + 2])
        layout = packed_layout(spec, {"kv": rng})
        requests.append(K.PackedRequest(layout, {"kv": span}, {}, offset))
        offset += layout.nbytes
    launches = _count_launches(monkeypatch)
    buf = torch.full((offset,), 0xA5, dtype=torch.uint8, device=device)
    K.pack_requests(spec, requests, pools, buf, backend="triton")
    assert [(launch.levels, launch.rows) for launch in launches] == [(2, 60)]
    for req in requests:
        want = naive.pack(spec, req.layout, pools, req.spans, {})
        end = req.layout.segments[0].end
        assert torch.equal(buf[req.offset : req.offset + end].cpu(), want[:end].cpu())


@settings(max_examples=200, deadline=None)
@given(d=st.integers(1, 2**31 - 1), n=st.integers(0, 2**31 - 1))
def test_magic_division(d, n):
    m, s = D.magic(d)
    q = n if d == 1 else (n * m >> 32) >> s
    assert q == n // d
    top = (2**31 - 1) // d * d  # the largest multiple of d below 2**31, and its neighbour
    for x in (top, top - 1, d - 1, d):
        if 0 <= x < 2**31:
            assert (x if d == 1 else (x * m >> 32) >> s) == x // d


# ---------------------------------------------------------------------------------------
# validation: ValueError naming what was wrong, before anything runs
# ---------------------------------------------------------------------------------------
def test_poolset_validates_once():
    spec = hybrid_spec()
    gen = torch.Generator().manual_seed(2)
    pools = make_pools(spec, 8, "cpu", gen)
    ps = K.PoolSet(spec, pools)
    assert ps.device == torch.device("cpu") and dict(ps.pools) == pools
    assert ps.num_blocks("full") == 8 and ps.num_slots("state") == 6
    bad = [
        ({k: v for k, v in pools.items() if k != "mla"}, "no tensor for group 'mla'"),
        ({**pools, "extra": pools["full"]}, "does not have"),
        ({**pools, "full": pools["full"][:, :, :, :, :1]}, r"pools\['full'\]"),
        ({**pools, "win": pools["win"].float()}, "dtype"),
        ({**pools, "state": pools["state"].transpose(3, 4)}, "contiguous"),
    ]
    for given_pools, match in bad:
        with pytest.raises(ValueError, match=match):
            K.PoolSet(spec, given_pools)
    with pytest.raises(ValueError, match="KVCacheSpec"):
        K.PoolSet("spec", pools)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slots, not blocks"):
        ps.num_blocks("state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_requests_raise_before_anything_runs(backend):
    """Each bad chunk, target or pool raises ValueError naming the request, chunk and group;
    the bad part sits in the LAST chunk, so a plan that ran chunk by chunk while checking
    would already have written the first: the destination must be untouched."""
    skip_unless_runnable("cpu", backend)
    r = _request_case(CASES[0], "cpu")
    spec, pools, chunks = r["dst_spec"], r["dst_pools"], r["chunks"]
    dst = K.PoolSet(spec, pools)
    snapshot = {k: v.clone() for k, v in pools.items()}
    tokens = {name: r["dst_target"].kv[name].tokens for name in r["dst_target"].kv}
    dtype = spec.dtype

    def target(**kw):
        args = dict(tokens=tokens, spans=r["dst_spans"], slots=r["dst_slots"], tpb=None)
        args.update(kw)
        s = spec if args["tpb"] is None else spec.with_block_size(args["tpb"])
        return target_for(s, args["tokens"], args["spans"], args["slots"], pools, 23, True)

    other = odd_spec("float16" if dtype != "float16" else "float32", spec.tokens_per_block)
    bad_dtype = packed_layout(other, {"full": TokenRange(5, 9)})
    unheld = packed_layout(
        spec.model or spec, {"full": TokenRange(5, 9)}, layers={"full": [0]}, heads={"full": (0, 4)}
    )
    shrunk = {**tokens, "win": TokenRange(tokens["win"].start, 22)}
    cases = [
        (dst, r["dst_target"], [*chunks[:-1], bad_dtype], "chunk 2: .*dtype"),
        (dst, r["dst_target"], [*chunks[:-1], unheld], "heads \\[0, 4\\) of group 'full'"),
        (dst, target(tokens={k: v for k, v in tokens.items() if k != "mla"}), chunks, "'mla'"),
        (dst, target(tokens=shrunk), chunks, "not inside the target's range"),
        (dst, target(slots={}), chunks, "no slot for state group 'ssm'"),
        (dst, r["src_target"], chunks, "tokens per block"),
        ("pools", r["dst_target"], chunks, "PoolSet"),
        (dst, "target", chunks, "TransferTarget"),
        (dst, r["dst_target"], [*chunks[:-1], "layout"], "chunks\\[2\\]"),
    ]
    for pool_set, tgt, given_chunks, match in cases:
        with pytest.raises(ValueError, match=match):
            K.prepare_unpack(pool_set, tgt, given_chunks, backend=backend)
        for k, v in pools.items():
            assert same_bits(v, snapshot[k]), (match, k)
    with pytest.raises(ValueError, match="backend"):
        K.prepare_unpack(dst, r["dst_target"], chunks, backend="cuda")
    # a pool with overlapping elements cannot be unpacked into
    expanded = {**pools, "mla": pools["mla"][:, :1].expand(pools["mla"].shape)}
    with pytest.raises(ValueError, match="overlapping"):
        K.prepare_unpack(K.PoolSet(spec, expanded), r["dst_target"], chunks, backend=backend)
    # a pack plan needs its buffer
    packer = K.prepare_pack(K.PoolSet(r["src_spec"], r["src_pools"]), r["src_target"], chunks)
    with pytest.raises(ValueError, match="buffer"):
        packer.run(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_for_a_larger_pool_is_refused(backend):
    skip_unless_runnable("cpu", backend)
    r = _request_case(CASES[2], "cpu")
    spec = r["src_spec"]
    small = {k: (v[:, :4] if v.dim() == 6 else v) for k, v in r["src_pools"].items()}
    with pytest.raises(ValueError, match="outside the pool's blocks"):
        K.prepare_pack(K.PoolSet(spec, small), r["src_target"], r["chunks"], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_checks_both_sides(backend):
    skip_unless_runnable("cpu", backend)
    r = _request_case(CASES[0], "cpu")
    src = K.PoolSet(r["src_spec"], r["src_pools"])
    dst = K.PoolSet(r["dst_spec"], r["dst_pools"])
    snapshot = {k: v.clone() for k, v in r["dst_pools"].items()}
    with pytest.raises(ValueError, match=r"destination.*'full'"):
        K.prepare_copy(src, r["src_target"], dst, r["src_target"], r["chunks"], backend=backend)
    # the same pools on both sides: overlapping blocks are refused
    with pytest.raises(ValueError, match="overlap"):
        K.prepare_copy(src, r["src_target"], src, r["src_target"], r["chunks"], backend=backend)
    wide = wide_spec(r["src_spec"].dtype, 3)
    other = K.PoolSet(wide, make_pools(wide, 8, "cpu", torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="not in spec"):
        K.prepare_copy(src, r["src_target"], other, r["dst_target"], r["chunks"], backend=backend)
    for k, v in r["dst_pools"].items():
        assert same_bits(v, snapshot[k]), k


# ---------------------------------------------------------------------------------------
# CUDA: the direct launch path, another stream, graph capture
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_direct_launch_streams_and_graphs():
    from kvtriton.kernels import triton_kernels as T

    r = _request_case(CASES[4], "cuda")
    src = K.PoolSet(r["src_spec"], r["src_pools"])
    chunks = r["chunks"]
    packer = K.prepare_pack(src, r["src_target"], chunks)
    assert packer.backend == "triton"
    before = T.launch_counts()
    for _ in range(3):
        check_pack(
            r["src_spec"], chunks, r["src_pools"], r["src_spans"], r["src_slots"], packer, "cuda"
        )
    after = T.launch_counts()
    if T.DIRECT:
        # after the first launch of each specialization, every launch is direct
        assert after["direct"] - before["direct"] >= 2 * len(chunks), (before, after)
    else:
        assert after["direct"] == before["direct"]
    # prepared on the default stream, run on another one while the default stream is busy
    dst = K.PoolSet(r["dst_spec"], r["dst_pools"])
    big = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    bufs = [
        naive.pack(r["src_spec"], c, r["src_pools"], r["src_spans"], r["src_slots"]) for c in chunks
    ]
    expected = {k: v.clone() for k, v in r["dst_pools"].items()}
    for k, c in enumerate(chunks):
        naive.unpack(r["dst_spec"], c, bufs[k], expected, r["dst_spans"], r["dst_slots"])
    big.random_()  # keeps the default stream busy while the tables are staged
    unpacker = K.prepare_unpack(dst, r["dst_target"], chunks)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for k in range(len(chunks)):
            unpacker.run(k, bufs[k])
    torch.cuda.synchronize()
    for k, v in r["dst_pools"].items():
        assert same_bits(v, expected[k]), k
    # captured in a CUDA graph and replayed
    for v in r["dst_pools"].values():
        poison(v)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            for k in range(len(chunks)):
                unpacker.run(k, bufs[k])
    graph.replay()
    torch.cuda.synchronize()
    for k, v in r["dst_pools"].items():
        assert same_bits(v, expected[k]), k


def test_staging_ring_reuses_a_region_only_after_its_copies_are_done():
    """The pinned ring (fake CUDA runtime): every request's bytes arrive, and a region is
    written again only after an event recorded behind every earlier copy from it, on that
    copy's stream, was waited for."""
    import ctypes

    import numpy as np

    from kvtriton.kernels import staging

    log: list[tuple] = []
    device = np.zeros(1 << 16, dtype=np.uint8)

    class FakeRuntime:
        def memcpy(self, dst, src, n, kind, stream):
            ctypes.memmove(device.ctypes.data + dst, src, n)
            log.append(("copy", src, n, stream))
            return 0

        def event_create(self, ref, flags):
            ref._obj.value = 1000 + len(log)
            return 0

        def event_record(self, ev, stream):
            log.append(("record", ev, stream))
            return 0

        def event_sync(self, ev):
            log.append(("sync", ev))
            return 0

        def check(self, code, what):
            assert code == 0, what

    host = np.zeros(4096, dtype=np.uint8)
    ring = staging.Ring(FakeRuntime(), host)
    gen = np.random.default_rng(0)
    dst = 0
    for k in range(40):
        nmeta = int(gen.integers(1, 40)) * 8
        meta = gen.integers(0, 256, nmeta, dtype=np.uint8)
        ids = gen.integers(0, 1 << 30, int(gen.integers(0, 100)), dtype=np.int32)
        ring.copy(dst, memoryview(meta.tobytes()), ids, stream=1 + k % 3)
        got = device[dst : dst + nmeta + ids.nbytes]
        assert got.tobytes() == meta.tobytes() + ids.tobytes()
        dst += nmeta + ids.nbytes
    copies = [(i, e) for i, e in enumerate(log) if e[0] == "copy"]
    base = host.ctypes.data
    for k, (i, (_, src, n, _)) in enumerate(copies):
        for j, (_, src0, n0, stream0) in copies[:k]:
            if src0 + n0 <= src or src + n <= src0:
                continue  # no overlap
            waited = any(
                log[r][0] == "record"
                and log[r][2] == stream0
                and any(log[s] == ("sync", log[r][1]) for s in range(r + 1, i))
                for r in range(j + 1, i)
            )
            assert waited, (k, src - base, src0 - base)
    assert len(copies) == 40 and any(e[0] == "sync" for e in log)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_staging_ring_wraps_and_keeps_every_table():
    """Tables staged through the pinned ring (several times round it, on two streams, the
    device busy meanwhile) all arrive intact; larger tables take torch's path."""
    import array

    import numpy as np

    from kvtriton.kernels import descriptors as D
    from kvtriton.kernels import staging

    gen = np.random.default_rng(0)
    big = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    staged = []
    quarter = staging.RING_BYTES // 4
    for k in range(40):
        big.random_()  # queue device work ahead of the copy
        n = quarter // 8 // 3 if k % 10 else quarter // 8 + 1  # every 10th: too large
        meta = array.array("q", gen.integers(-(2**62), 2**62, n).tolist())
        ids = gen.integers(0, 2**31 - 1, int(gen.integers(1, 5000)), dtype=np.int32)
        plan = D.HostPlan(meta, ids, ())
        stream = side if k % 3 == 0 else torch.cuda.current_stream()
        with torch.cuda.stream(stream):
            owner, m, i = D.stage(plan, torch.device("cuda"))
        staged.append((owner, m, i, plan))
    torch.cuda.synchronize()
    for owner, m, i, plan in staged:
        got = owner.cpu().numpy()
        assert got[: i - m].view(np.int64).tolist() == plan.meta.tolist()
        assert np.array_equal(got[i - m :].view(np.int32), plan.ids)
    assert staging.runtime() is not None or not staging._RINGS
