"""Position-derived KV values: what a context rank "prefills" and a receiver checks.

Every value is a function of (global layer, position, token id at the position, K/V, global
head, dim), exactly representable in the pool dtype (fp8 included), so a receiver can check
**every needed position** bit-exact without the sender's help, whether it was reused from
its prefix cache or transferred. State groups hold a function of the whole prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from kvtriton import kernels
from kvtriton.ranges import BlockSpan, TokenRange, needed_range
from kvtriton.spec import KVCacheSpec, LayerGroup

__all__ = ["kv_values", "prefill", "state_values", "verify"]


def _modulus(dtype: torch.dtype) -> int:
    # integers in [-m//2, m//2] are exact: fp8 e5m2 up to 8, e4m3 up to 16, others 125.
    if dtype == getattr(torch, "float8_e5m2", None):
        return 17
    if dtype == getattr(torch, "float8_e4m3fn", None):
        return 33
    return 251


def kv_values(
    group: LayerGroup,
    layer_ids: Sequence[int],
    heads: tuple[int, int],
    positions: TokenRange,
    token_ids: Sequence[int],
    dtype: torch.dtype,
    device: Any = "cpu",
) -> torch.Tensor:
    """Packed ``[layers, kv, tokens, heads, head_dim]`` values of ``positions``: a function of
    (global layer, position, token id at the position, K/V, global head, dim), computed on
    ``device``."""
    m = _modulus(dtype)

    def ar(lo: int, hi: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.arange(lo, hi, dtype=torch.int64, device=device).view(shape)

    lay = torch.tensor(list(layer_ids), dtype=torch.int64, device=device).view(-1, 1, 1, 1, 1)
    kv = ar(0, group.kv_factor, (1, -1, 1, 1, 1))
    pos = ar(positions.start, positions.end, (1, 1, -1, 1, 1))
    tok = torch.tensor(
        list(token_ids[positions.start : positions.end]), dtype=torch.int64, device=device
    ).view(1, 1, -1, 1, 1)
    head = ar(heads[0], heads[1], (1, 1, 1, -1, 1))
    dim = ar(0, group.head_dim, (1, 1, 1, 1, -1))
    v = (lay * 131 + pos * 7 + tok * 13 + kv * 17 + head * 19 + dim * 3) % m - m // 2
    return v.to(torch.float32).to(dtype)


def state_values(
    group: LayerGroup,
    layer_ids: Sequence[int],
    heads: tuple[int, int],
    token_ids: Sequence[int],
    dtype: torch.dtype,
    device: Any = "cpu",
) -> torch.Tensor:
    """``[layers, heads, *state_shape[1:]]`` state summarising ``token_ids`` (all of them)."""
    m = _modulus(dtype)
    assert group.state_shape is not None
    rest = group.state_shape[1:]
    n = 1
    for d in rest:
        n *= d
    salt = (len(token_ids) * 7 + sum(token_ids) * 13) % m
    lay = torch.tensor(list(layer_ids), dtype=torch.int64, device=device).view(-1, 1, 1)
    head = torch.arange(heads[0], heads[1], dtype=torch.int64, device=device).view(1, -1, 1)
    idx = torch.arange(n, dtype=torch.int64, device=device).view(1, 1, -1)
    v = (lay * 131 + head * 19 + idx * 3 + salt) % m - m // 2
    return v.to(torch.float32).to(dtype).view(len(layer_ids), heads[1] - heads[0], *rest)


def prefill(
    spec: KVCacheSpec,
    pools: Any,
    spans: dict[str, BlockSpan],
    slots: dict[str, int],
    token_ids: Sequence[int],
    backend: str,
    *,
    layers: Iterable[int] | None = None,
) -> None:
    """Write every position a context rank holds for the request (its spans up to ``P``),
    for every layer, or only the global ``layers`` given (a layer-by-layer "prefill")."""
    p = len(token_ids)
    wanted = None if layers is None else set(layers)
    for g in spec.groups:
        sel = [i for i, lid in enumerate(g.layer_ids) if wanted is None or lid in wanted]
        if not sel:
            continue
        ids = [g.layer_ids[i] for i in sel]
        if g.is_state:
            vals = state_values(
                g, ids, g.held_heads, token_ids, pools.state[g.name].dtype, pools.device
            )
            kernels.scatter_state(
                vals, pools.state[g.name], slots[g.name], layers=sel, backend=backend
            )
            continue
        span = spans[g.name]
        rng = TokenRange(span.first_block * spec.tokens_per_block, p)
        if rng.is_empty:
            continue
        vals = kv_values(g, ids, g.held_heads, rng, token_ids, pools.kv[g.name].dtype, pools.device)
        kernels.scatter(vals, pools.kv[g.name], span, rng, layers=sel, backend=backend)


def verify(
    spec: KVCacheSpec,
    pools: Any,
    spans: dict[str, BlockSpan],
    slots: dict[str, int],
    token_ids: Sequence[int],
    backend: str,
) -> list[str]:
    """Mismatches (empty = bit-exact) over every needed position of every group and state."""
    p = len(token_ids)
    bad = []
    for g in spec.groups:
        if g.is_state:
            want = state_values(
                g, g.layer_ids, g.held_heads, token_ids, pools.state[g.name].dtype, pools.device
            )
            got = kernels.gather_state(pools.state[g.name], slots[g.name], backend=backend)
        else:
            rng = needed_range(g, p)
            if rng.is_empty:
                continue
            want = kv_values(
                g,
                g.layer_ids,
                g.held_heads,
                rng,
                token_ids,
                pools.kv[g.name].dtype,
                pools.device,
            )
            got = kernels.gather(pools.kv[g.name], spans[g.name], rng, backend=backend)
        if not torch.equal(want.view(torch.uint8), got.contiguous().view(torch.uint8)):
            diff = (want.float() != got.float()).nonzero()
            bad.append(
                f"group {g.name!r}: {len(diff)} elements differ, first at "
                f"{diff[0].tolist() if len(diff) else '?'}"
            )
    return bad


# ---------------------------------------------------------------------------------------
# the stream
# ---------------------------------------------------------------------------------------
