"""``compare_backends``: a kernel cross-check that notebooks/02_kernels still imports from
:mod:`kvtriton.viz`. Transitional: it is not a plot; it is deleted once notebook 02 takes its
replacement from :mod:`kvtriton.kernels.bench` (the kernels' owner moves it there)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
    identical on both backends), ``oracle`` (the first backend's output checked position by
    position with plain indexing: the gather against the pool's blocks, the request's received
    KV and state against the sender's; ``None`` where there is no such check) and ``ms`` per
    backend (wall time of the one call; the Triton
    interpreter on CPU is slow by design). ``backend="triton"`` on CPU needs
    ``TRITON_INTERPRET=1`` before ``kvtriton.kernels`` first runs a Triton kernel.
    """
    import time

    import torch

    from kvtriton import kernels as K
    from kvtriton.cache import allocate_pools
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
            return random_(
                torch.empty(
                    (layers, blocks, 2, tpb, heads, dim), dtype=torch.bfloat16, device=device
                )
            )
        phys = random_(
            torch.empty((layers, blocks, 2, heads, tpb, dim), dtype=torch.bfloat16, device=device)
        )
        return phys.permute(0, 1, 2, 4, 3, 5)

    def span(tokens: TokenRange, tpb: int, blocks: int = 12) -> BlockSpan:
        r = tokens.blocks(tpb)
        ids = torch.randperm(blocks, generator=gen)[: len(r)].tolist()
        return BlockSpan(r.start, ids)

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(torch.uint8)

    def same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
        return all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b, strict=True))

    Check = Callable[[list[torch.Tensor]], bool] | None
    cases: list[tuple[str, int, Callable[[str], list[torch.Tensor]], Check]] = []

    src = pool("NHD", 4)
    t1 = TokenRange(5, 27)
    s1 = span(t1, 4)
    cases.append(
        (
            f"gather [{t1.start}, {t1.end}) from 4-token NHD blocks (starts/ends inside blocks)",
            int(src[:, 0, :, 0].numel()) * len(t1) * 2,
            lambda b: [K.gather(src, s1, t1, backend=b)],
            lambda outs: all(
                torch.equal(
                    bits(outs[0][:, :, q - t1.start]), bits(src[:, s1.block_id(q // 4), :, q % 4])
                )
                for q in t1
            ),
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
            None,
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

    cases.append(
        (
            f"scatter into [{t3.start}, {t3.end}) of 4-token NHD blocks (whole pool compared)",
            packed3.numel() * 2,
            scatter,
            None,
        )
    )

    t4 = TokenRange(3, 30)
    s4_src, s4_dst = span(t4, 4), span(t4, 8, blocks=6)
    dst4 = pool("HND", 8, blocks=6)

    def copy(b: str) -> list[torch.Tensor]:
        out = dst4.clone()  # a clone of a permuted view keeps its HND strides
        K.copy(src, s4_src, out, s4_dst, t4, backend=b)
        return [out]

    cases.append(
        (
            f"copy [{t4.start}, {t4.end}): 4-token NHD -> 8-token HND (block size + layout)",
            3 * 2 * len(t4) * 4 * 16 * 2,
            copy,
            None,
        )
    )

    state_pool = random_(torch.empty((2, 6, 4, 8, 8), dtype=torch.float32, device=device))

    def state(b: str) -> list[torch.Tensor]:
        out = state_pool.clone()
        dense = K.gather_state(out, 2, backend=b)
        K.scatter_state(dense, out, 5, backend=b)
        return [dense, out]

    cases.append(
        (
            "state slot 2 -> packed -> slot 5",
            2 * 4 * 8 * 8 * 4,
            state,
            lambda outs: torch.equal(outs[1][:, 5], state_pool[:, 2]),
        )
    )

    spec = preset("tiny-hybrid")
    recv_spec = spec.with_block_size(8)
    p = 30
    plan = plan_transfer(spec, p, {"full": 13, "sliding8": 0, "state": 0})
    layout = packed_layout(
        spec, {g.name: g.tokens for g in plan.groups if g.group.is_attention}, plan.state_groups
    )
    send = allocate_pools(spec, 16, num_state_slots=4, device=device, layout="NHD")
    for t in (*send.kv.values(), *send.state.values()):
        random_(t)
    recv = allocate_pools(recv_spec, 8, num_state_slots=4, device=device, layout="HND")
    send_spans = {g.name: span(g.tokens, 4, 16) for g in plan.groups if g.group.is_attention}
    recv_spans = {g.name: span(g.tokens, 8, 8) for g in plan.groups if g.group.is_attention}

    def request(b: str) -> list[torch.Tensor]:
        buf = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
        K.pack_request(
            spec, layout, {**send.kv, **send.state}, send_spans, {"state": 1}, buf, backend=b
        )
        pools = {name: t.clone() for name, t in (*recv.kv.items(), *recv.state.items())}
        K.unpack_request(recv_spec, layout, buf, pools, recv_spans, {"state": 3}, backend=b)
        return [buf, *pools.values()]

    def received(outs: list[torch.Tensor]) -> bool:
        pools = dict(zip((*recv.kv, *recv.state), outs[1:], strict=True))
        ok = torch.equal(pools["state"][:, 3], send.state["state"][:, 1])
        for g in plan.groups:
            if g.group.is_state:
                continue
            for q in g.tokens:
                got = pools[g.name][:, recv_spans[g.name].block_id(q // 8), :, q % 8]
                want = send.kv[g.name][:, send_spans[g.name].block_id(q // 4), :, q % 4]
                ok = ok and torch.equal(bits(got), bits(want))
        return ok

    cases.append(
        (
            f"tiny-hybrid request, P = {p}, full cached 13: pack (NHD, 4) -> unpack (HND, 8)",
            layout.nbytes,
            request,
            received,
        )
    )

    rows = []
    for name, nbytes, run, check in cases:
        outs, ms = [], {}
        for b in backends:
            start = time.perf_counter()
            got = run(b)
            if device != "cpu":
                torch.cuda.synchronize()
            ms[b] = 1e3 * (time.perf_counter() - start)
            outs.append(got)
        rows.append(
            {
                "case": name,
                "bytes": nbytes,
                "equal": same(outs[0], outs[1]),
                "oracle": None if check is None else bool(check(outs[0])),
                "ms": ms,
            }
        )
    return rows
