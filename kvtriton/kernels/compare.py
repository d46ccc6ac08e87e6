"""Both kernel backends side by side on small moves (notebooks/02_kernels), re-exported by
:mod:`kvtriton.kernels.bench`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["compare_backends"]


def compare_backends(
    *, device: str = "cpu", seed: int = 0, backends: tuple[str, str] = ("triton", "reference")
) -> list[dict[str, Any]]:
    """Run a fixed set of small paged moves on two kernel backends from identical inputs and
    compare every output bit for bit.

    Cases: gather with a range starting and ending inside blocks; gather from an HND pool with
    a layer subset and a head sub-range; scatter into the middle of blocks (the whole pool is
    compared, so untouched neighbours count); copy between a 4-token NHD pool and an 8-token
    HND pool (block-size change plus layout conversion); a state slot round trip; and a whole
    request of ``tiny-hybrid`` (per-group plan, packed layout) packed on a 4-token NHD sender
    and unpacked on an 8-token HND receiver.

    Returns one dict per case: ``case``, ``bytes`` (payload moved), ``equal`` (every output
    identical on both backends), ``oracle`` (the first backend's outputs equal the naive
    per-position oracle's, :mod:`kvtriton.kernels.naive`) and ``ms`` per backend (wall time of
    the call; the Triton interpreter on CPU is slow by design). ``backend="triton"`` on CPU
    needs ``TRITON_INTERPRET=1`` before ``kvtriton.kernels`` first runs a Triton kernel.
    """
    from kvtriton import kernels as K
    from kvtriton.kernels import naive
    from kvtriton.layout import packed_layout
    from kvtriton.plan import plan_transfer
    from kvtriton.ranges import BlockSpan, TokenRange
    from kvtriton.spec import preset

    gen = torch.Generator().manual_seed(seed)

    def random_(t: torch.Tensor) -> torch.Tensor:
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
        return t

    def pool(
        layout: str, tpb: int, blocks: int = 12, layers: int = 3, heads: int = 4, dim: int = 16
    ) -> torch.Tensor:
        if layout == "NHD":
            shape = (layers, blocks, 2, tpb, heads, dim)
            return random_(torch.empty(shape, dtype=torch.bfloat16, device=device))
        phys = torch.empty(
            (layers, blocks, 2, heads, tpb, dim), dtype=torch.bfloat16, device=device
        )
        return random_(phys).permute(0, 1, 2, 4, 3, 5)

    def span(tokens: TokenRange, tpb: int, blocks: int = 12) -> BlockSpan:
        r = tokens.blocks(tpb)
        return BlockSpan(r.start, torch.randperm(blocks, generator=gen)[: len(r)].tolist())

    def same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
        return all(
            x.shape == y.shape and torch.equal(naive.bits(x), naive.bits(y))
            for x, y in zip(a, b, strict=True)
        )

    Oracle = Callable[[], list[torch.Tensor]] | None
    cases: list[tuple[str, int, Callable[[str], list[torch.Tensor]], Oracle]] = []

    src = pool("NHD", 4)
    t1 = TokenRange(5, 27)
    s1 = span(t1, 4)
    cases.append(
        (
            f"gather [{t1.start}, {t1.end}) from 4-token NHD blocks (starts/ends inside blocks)",
            3 * 2 * len(t1) * 4 * 16 * 2,
            lambda b: [K.gather(src, s1, t1, backend=b)],
            lambda: [naive.gather(src, s1, t1)],
        )
    )

    hnd = pool("HND", 4)
    t2 = TokenRange(3, 22)
    s2 = span(t2, 4)
    cases.append(
        (
            f"gather [{t2.start}, {t2.end}), HND pool, layers [2, 0], heads [1, 3)",
            2 * 2 * len(t2) * 2 * 16 * 2,
            lambda b: [K.gather(hnd, s2, t2, layers=[2, 0], heads=(1, 3), backend=b)],
            lambda: [naive.gather(hnd, s2, t2, [2, 0], (1, 3))],
        )
    )

    t3 = TokenRange(6, 19)
    s3 = span(t3, 4)
    packed3 = random_(torch.empty((3, 2, len(t3), 4, 16), dtype=torch.bfloat16, device=device))
    dst3 = pool("NHD", 4)

    def scatter(b: str) -> list[torch.Tensor]:
        out = dst3.clone()
        K.scatter(packed3, out, s3, t3, backend=b)
        return [out]

    def scatter_oracle() -> list[torch.Tensor]:
        out = dst3.clone()
        naive.scatter(packed3, out, s3, t3)
        return [out]

    cases.append(
        (
            f"scatter into [{t3.start}, {t3.end}) of 4-token NHD blocks (whole pool compared)",
            packed3.numel() * 2,
            scatter,
            scatter_oracle,
        )
    )

    t4 = TokenRange(3, 30)
    s4_src, s4_dst = span(t4, 4), span(t4, 8, blocks=6)
    dst4 = pool("HND", 8, blocks=6)

    def copy(b: str) -> list[torch.Tensor]:
        out = dst4.clone()  # a clone of a permuted view keeps its HND strides
        K.copy(src, s4_src, out, s4_dst, t4, backend=b)
        return [out]

    def copy_oracle() -> list[torch.Tensor]:
        out = dst4.clone()
        naive.copy(src, s4_src, out, s4_dst, t4)
        return [out]

    cases.append(
        (
            f"copy [{t4.start}, {t4.end}): 4-token NHD -> 8-token HND (block size + layout)",
            3 * 2 * len(t4) * 4 * 16 * 2,
            copy,
            copy_oracle,
        )
    )

    state_pool = random_(torch.empty((2, 6, 4, 8, 8), dtype=torch.float32, device=device))

    def state(b: str) -> list[torch.Tensor]:
        out = state_pool.clone()
        dense = K.gather_state(out, 2, backend=b)
        K.scatter_state(dense, out, 5, backend=b)
        return [dense, out]

    def state_oracle() -> list[torch.Tensor]:
        out = state_pool.clone()
        dense = naive.gather_state(out, 2)
        naive.scatter_state(dense, out, 5)
        return [dense, out]

    cases.append(("state slot 2 -> packed -> slot 5", 2 * 4 * 8 * 8 * 4, state, state_oracle))

    spec = preset("tiny-hybrid")
    recv_spec = spec.with_block_size(8)
    p = 30
    plan = plan_transfer(spec, p, {"full": 13, "sliding8": 0, "state": 0})
    tokens = {g.name: g.tokens for g in plan.groups if not g.group.is_state}
    layout = packed_layout(spec, tokens, plan.state_groups)

    def pools(s: Any, blocks: int, hnd: bool) -> dict[str, torch.Tensor]:
        out = {}
        for g in s.groups:
            if g.is_state:
                dtype = getattr(torch, g.item_dtype(s.dtype))
                out[g.name] = torch.empty(
                    (g.num_layers, 4, *g.local_state_shape), dtype=dtype, device=device
                )
            else:
                shape = [
                    g.num_layers,
                    blocks,
                    g.kv_factor,
                    s.tokens_per_block,
                    g.local_heads,
                    g.head_dim,
                ]
                if hnd:
                    shape[3], shape[4] = shape[4], shape[3]
                t = torch.empty(shape, dtype=s.torch_dtype, device=device)
                out[g.name] = t.transpose(3, 4) if hnd else t
            random_(out[g.name])
        return out

    send, recv = pools(spec, 16, False), pools(recv_spec, 8, True)
    send_spans = {name: span(rng, 4, 16) for name, rng in tokens.items()}
    recv_spans = {name: span(rng, 8, 8) for name, rng in tokens.items()}

    def request(b: str) -> list[torch.Tensor]:
        buf = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
        K.pack_request(spec, layout, send, send_spans, {"state": 1}, buf, backend=b)
        out = {name: t.clone() for name, t in recv.items()}
        K.unpack_request(recv_spec, layout, buf, out, recv_spans, {"state": 3}, backend=b)
        return [buf, *out.values()]

    def request_oracle() -> list[torch.Tensor]:
        buf = naive.pack(spec, layout, send, send_spans, {"state": 1})
        out = {name: t.clone() for name, t in recv.items()}
        naive.unpack(recv_spec, layout, buf, out, recv_spans, {"state": 3})
        return [buf, *out.values()]

    cases.append(
        (
            f"tiny-hybrid request, P = {p}, full cached 13: pack (NHD, 4) -> unpack (HND, 8)",
            layout.nbytes,
            request,
            request_oracle,
        )
    )

    rows = []
    for name, nbytes, run, oracle in cases:
        outs, ms = [], {}
        for b in backends:
            start = time.perf_counter()
            got = run(b)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            ms[b] = 1e3 * (time.perf_counter() - start)
            outs.append(got)
        rows.append(
            {
                "case": name,
                "bytes": nbytes,
                "equal": same(outs[0], outs[1]),
                "oracle": None if oracle is None else same(outs[0], oracle()),
                "ms": ms,
            }
        )
    return rows
