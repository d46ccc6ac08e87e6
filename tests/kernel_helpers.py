"""Shared helpers of the kernel tests: random bit patterns, poisoned destinations, pools with
any physical dimension order, hybrid specs and their pools."""

from __future__ import annotations

import pytest
import torch

from kvtriton import kernels as K
from kvtriton.kernels.naive import bits
from kvtriton.spec import KVCacheSpec, LayerGroup

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
BACKENDS = ["triton", "reference"]
NHD = [0, 1, 2, 3, 4]
HND = [0, 1, 2, 4, 3]


def skip_unless_runnable(device: str, backend: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "triton" and device == "cpu" and not K.interpreter_enabled():
        pytest.skip(
            "Triton on CPU needs TRITON_INTERPRET=1 (tests/conftest.py sets it "
            "only when no GPU is present)"
        )


def random_bits(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs and infs included: comparisons are bitwise)."""
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * size), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


def poison(t: torch.Tensor) -> torch.Tensor:
    """NaN for float16/32/bf16, the byte 0xA5 for fp8 and ints (catches stray writes and
    unwritten positions)."""
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return t.fill_(float("nan"))
    bits(t).fill_({1: 0xA5, 2: 0x5A5A, 4: 0x5A5A5A5A}[t.element_size()])
    return t


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return bits(t).cpu()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def make_pool(shape, dtype, order, device, gen, pad_heads=0, fill="random") -> torch.Tensor:
    """A 6-D pool view with physical dim order ``order`` (a permutation of the first 5 dims;
    head_dim stays innermost) and optionally ``pad_heads`` extra heads sliced away.
    ``fill="poison"``: a ``torch.empty`` pool filled with NaN / 0xA5."""
    phys = list(shape)
    phys[4] += pad_heads
    phys_shape = [phys[i] for i in order] + [phys[5]]
    if fill == "poison":
        base = poison(torch.empty(phys_shape, dtype=dtype, device=device))
    else:
        base = random_bits(phys_shape, dtype, gen).to(device)
    inverse = [order.index(i) for i in range(5)] + [5]
    view = base.permute(*inverse)
    if pad_heads:
        view = view[:, :, :, :, pad_heads // 2 : pad_heads // 2 + shape[4]]
    assert tuple(view.shape) == tuple(shape)
    return view


def hybrid_spec(tpb: int = 4, dtype: str = "bfloat16") -> KVCacheSpec:
    """Full, sliding, MLA (kv 1) and an fp32 state group over 8 layers."""
    groups = (
        LayerGroup("full", "full", (1, 4), num_kv_heads=2, head_dim=8),
        LayerGroup("win", "sliding", (0, 2, 5), num_kv_heads=2, head_dim=8, window=6),
        LayerGroup("mla", "full", (6,), num_kv_heads=1, head_dim=12, kv_factor=1),
        LayerGroup("state", "state", (3, 7), state_shape=(2, 3, 5), state_dtype="float32"),
    )
    return KVCacheSpec(groups, tokens_per_block=tpb, dtype=dtype, name="test-hybrid")


def make_pools(
    spec: KVCacheSpec, num_blocks: int, device, gen, *, fill="random", order=NHD, slots: int = 6
) -> dict[str, torch.Tensor]:
    """One pool per group of ``spec`` (a shard spec: its local heads and layers)."""
    pools = {}
    for g in spec.groups:
        if g.kind == "state":
            dt = getattr(torch, g.state_dtype or spec.dtype)
            shape = (g.num_layers, slots, *g.local_state_shape)
            if fill == "poison":
                t = poison(torch.empty(shape, dtype=dt, device=device))
            else:
                t = random_bits(shape, dt, gen).to(device)
        else:
            shape = (
                g.num_layers,
                num_blocks,
                g.kv_factor,
                spec.tokens_per_block,
                g.local_heads,
                g.head_dim,
            )
            t = make_pool(shape, spec.torch_dtype, order, device, gen, fill=fill)
        pools[g.name] = t
    return pools
