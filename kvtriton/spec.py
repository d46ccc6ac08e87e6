"""Model KV-cache specifications: layer groups, TP/PP sharding and built-in presets.

(Over 600 lines on purpose: one job, the spec types with their validation and sharding; the
last ~180 lines are the preset table built from those types, kept beside them so a preset and
the rules it must satisfy are read together.)

Pure Python (no torch import): a spec names its dtype as a string and only converts it to a
``torch.dtype`` on request (:attr:`KVCacheSpec.torch_dtype`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kvtriton.ranges import MAX_TOKENS, GroupKind, KindRule, kind_rule

__all__ = [
    "DTYPE_BYTES",
    "MAX_HEADS",
    "MAX_HEAD_DIM",
    "MAX_LAYERS",
    "MAX_STATE_ELEMENTS",
    "MAX_TOKENS_PER_BLOCK",
    "PRESETS",
    "PRESET_CONFIGS",
    "GroupKind",
    "KVCacheSpec",
    "LayerGroup",
    "preset",
    "resolve_spec",
]

# Bounds checked when a spec is built (far past any real model; they keep every size that
# follows from a spec -- bytes per block, pool elements, wire offsets -- inside int64).
#: layer ids are in ``[0, MAX_LAYERS)``
MAX_LAYERS = 4096
#: ``num_kv_heads`` (and ``state_shape[0]``, the heads TP splits) at most this
MAX_HEADS = 2**16
#: ``head_dim`` at most this
MAX_HEAD_DIM = 2**16
#: elements of one layer's state (``prod(state_shape)``) at most this
MAX_STATE_ELEMENTS = 2**32
#: ``tokens_per_block`` at most this
MAX_TOKENS_PER_BLOCK = 2**16

#: Bytes per element of every dtype a pool may hold. fp8 KV moves as raw bytes.
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
    "int8": 1,
}

_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "e5m2": "float8_e5m2",
}


def canonical_dtype(name: object) -> str:
    """Canonical dtype name (``"bfloat16"`` ...) from a string alias or a ``torch.dtype``."""
    text = str(name).removeprefix("torch.")
    text = _DTYPE_ALIASES.get(text, text)
    if text not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPE_BYTES)}")
    return text


def _positive(what: str, value: object, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{what} must be <= {maximum:,} (kvtriton's bound), got {value:,}")
    return value


@dataclass(frozen=True)
class LayerGroup:
    """Layers that share one attention window and one paged pool.

    Attributes:
        name: unique within a spec.
        kind: a :class:`~kvtriton.ranges.GroupKind` (its string is accepted and normalised):
            ``FULL`` (window = infinity), ``SLIDING`` (window ``W`` tokens: a query at ``q``
            attends ``(q - W, q]``) or ``STATE`` (one fixed-size state per request).
        layer_ids: global layer indices held (sorted, unique). A PP stage holds a subset.
        num_kv_heads: KV heads of the whole model (before TP sharding).
        head_dim: elements per head (the contiguous dimension of a pool).
        window: sliding window in tokens (sliding groups only).
        kv_factor: 2 for K and V, 1 for an MLA latent or K-only cache.
        state_shape: per-layer state shape of a state group (``state_shape[0]`` is split by TP).
        state_dtype: element dtype of the state (defaults to the spec's dtype).
        head_start, head_end: the global kv-head range ``[head_start, head_end)`` this shard
            holds; the whole model's range unless the spec was sharded.
        state_head_start, state_head_end: likewise for ``state_shape[0]`` of a state group.
    """

    name: str
    kind: GroupKind
    layer_ids: tuple[int, ...]
    num_kv_heads: int = 1
    head_dim: int = 1
    window: int | None = None
    kv_factor: int = 2
    state_shape: tuple[int, ...] | None = None
    state_dtype: str | None = None
    head_start: int = 0
    head_end: int | None = None
    state_head_start: int = 0
    state_head_end: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"layer group name must be a non-empty string, got {self.name!r}")
        where = f"layer group {self.name!r}"
        kind = GroupKind.parse(self.kind, where=where)
        object.__setattr__(self, "kind", kind)
        try:
            if isinstance(self.layer_ids, (str, bytes)):
                raise TypeError
            ids = tuple(self.layer_ids)
        except TypeError:
            raise TypeError(
                f"{where}: layer_ids must be a sequence of ints, got "
                f"{type(self.layer_ids).__name__} {self.layer_ids!r}"
            ) from None
        if not ids:
            raise ValueError(
                f"{where}: layer_ids is empty (a layer group holds at least one layer)"
            )
        for layer in ids:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"{where}: layer ids must be non-negative ints, got {layer!r}")
            if layer >= MAX_LAYERS:
                raise ValueError(
                    f"{where}: layer id {layer:,} is past kvtriton's bound (ids < {MAX_LAYERS})"
                )
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: duplicate layer ids in {ids}")
        object.__setattr__(self, "layer_ids", tuple(sorted(ids)))
        _positive(f"{where}: num_kv_heads", self.num_kv_heads, MAX_HEADS)
        _positive(f"{where}: head_dim", self.head_dim, MAX_HEAD_DIM)
        if self.kv_factor not in (1, 2):
            raise ValueError(f"{where}: kv_factor must be 1 or 2, got {self.kv_factor!r}")
        if kind.has_window:
            if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
                raise ValueError(
                    f"{where}: sliding window must be an int >= 1, got {self.window!r}"
                )
            if self.window > MAX_TOKENS:
                raise ValueError(
                    f"{where}: sliding window must be <= {MAX_TOKENS:,} (kvtriton's bound), got "
                    f"{self.window:,}"
                )
        elif self.window is not None:
            raise ValueError(f"{where}: only sliding groups take a window (kind {kind.value!r})")
        if kind.has_state:
            if not self.state_shape:
                raise ValueError(f"{where}: a state group needs a non-empty state_shape")
            shape = tuple(self.state_shape)
            for dim in shape:
                _positive(f"{where}: state_shape entries", dim)
            _positive(f"{where}: state_shape[0] (state heads)", shape[0], MAX_HEADS)
            if math.prod(shape) > MAX_STATE_ELEMENTS:
                raise ValueError(
                    f"{where}: a state of {math.prod(shape):,} elements per layer "
                    f"{shape} is past kvtriton's bound ({MAX_STATE_ELEMENTS:,})"
                )
            object.__setattr__(self, "state_shape", shape)
            if self.state_dtype is not None:
                object.__setattr__(self, "state_dtype", canonical_dtype(self.state_dtype))
            end = shape[0] if self.state_head_end is None else self.state_head_end
            object.__setattr__(self, "state_head_end", end)
            if not 0 <= self.state_head_start < end <= shape[0]:
                raise ValueError(
                    f"{where}: state head range [{self.state_head_start}, {end}) is not inside "
                    f"[0, {shape[0]})"
                )
        elif self.state_shape is not None:
            raise ValueError(f"{where}: only state groups take a state_shape")
        end = self.num_kv_heads if self.head_end is None else self.head_end
        object.__setattr__(self, "head_end", end)
        if not 0 <= self.head_start < end <= self.num_kv_heads:
            raise ValueError(
                f"{where}: head range [{self.head_start}, {end}) is not inside "
                f"[0, {self.num_kv_heads})"
            )

    # -- kind -----------------------------------------------------------------------------
    @property
    def rule(self) -> KindRule:
        """The position rules of this group's kind (needed range, first block, transfer)."""
        return kind_rule(self)

    @property
    def is_attention(self) -> bool:
        """Holds paged per-token KV (full attention or a sliding window)."""
        return self.kind.pages_tokens

    @property
    def is_state(self) -> bool:
        """Holds one fixed-size state per request (no paged KV)."""
        return self.kind.has_state

    @property
    def held_heads(self) -> tuple[int, int]:
        """The global head range ``[start, end)`` this shard holds: kv heads of an attention
        group, ``state_shape[0]`` of a state group."""
        if self.kind.has_state:
            assert self.state_head_end is not None
            return self.state_head_start, self.state_head_end
        assert self.head_end is not None
        return self.head_start, self.head_end

    def item_dtype(self, pool_dtype: str) -> str:
        """Element dtype of this group's pool when the spec's dtype is ``pool_dtype``: the
        state dtype of a state group that names one, else ``pool_dtype``."""
        return self.state_dtype or pool_dtype

    # -- sizes --------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def local_heads(self) -> int:
        """KV heads held by this shard."""
        assert self.head_end is not None
        return self.head_end - self.head_start

    @property
    def local_state_shape(self) -> tuple[int, ...]:
        """Per-layer state shape held by this shard (state groups only)."""
        if self.state_shape is None:
            raise ValueError(f"layer group {self.name!r} ({self.kind}) has no state")
        assert self.state_head_end is not None
        return (self.state_head_end - self.state_head_start, *self.state_shape[1:])

    def elements_per_token(self) -> int:
        """Pool elements per token position over this shard's layers (0 for state groups)."""
        if not self.kind.pages_tokens:
            return 0
        return self.num_layers * self.kv_factor * self.local_heads * self.head_dim

    def state_elements(self) -> int:
        """State elements per request over this shard's layers (0 for attention groups)."""
        if not self.kind.has_state:
            return 0
        return self.num_layers * math.prod(self.local_state_shape)

    def _model_fields(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "window": self.window,
            "kv_factor": self.kv_factor,
            "state_shape": list(self.state_shape) if self.state_shape else None,
            "state_dtype": self.state_dtype,
        }

    def to_dict(self) -> dict[str, Any]:
        out = self._model_fields()
        out.update(
            layer_ids=list(self.layer_ids),
            head_start=self.head_start,
            head_end=self.head_end,
            state_head_start=self.state_head_start,
            state_head_end=self.state_head_end,
        )
        return out


def _split_even(total: int, parts: int, index: int, what: str) -> tuple[int, int]:
    """``[start, end)`` of part ``index`` when ``total`` items split evenly in ``parts``."""
    if total % parts:
        raise ValueError(f"{what}: {total} does not split evenly into {parts} parts")
    size = total // parts
    return index * size, (index + 1) * size


def _check_rank(what: str, rank: int, size: int) -> None:
    _positive(f"{what}_size", size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise ValueError(f"{what}_rank must be in [0, {size}), got {rank!r}")


@dataclass(frozen=True)
class KVCacheSpec:
    """The KV-cache shape of a model (or of one TP/PP shard of it).

    Attributes:
        groups: layer groups in a fixed order (the wire order, DESIGN.md §2).
        tokens_per_block: positions per paged block (any positive int).
        dtype: pool element dtype name, e.g. ``"bfloat16"``.
        name: a label for tables and plots.
        tp_rank, tp_size, pp_rank, pp_size: which shard this is (``0, 1, 0, 1`` = the model).
        model: the unsharded spec this shard came from (``None`` for the model itself).
    """

    groups: tuple[LayerGroup, ...]
    tokens_per_block: int
    dtype: str = "bfloat16"
    name: str = "model"
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    model: KVCacheSpec | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        groups = tuple(self.groups)
        if not groups:
            raise ValueError("a KVCacheSpec needs at least one layer group")
        for group in groups:
            if not isinstance(group, LayerGroup):
                raise TypeError(f"groups must be LayerGroup objects, got {type(group).__name__}")
        object.__setattr__(self, "groups", groups)
        names = [g.name for g in groups]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate layer group names: {duplicates}")
        seen: dict[int, str] = {}
        for group in groups:
            for layer in group.layer_ids:
                if layer in seen:
                    raise ValueError(
                        f"duplicate layer id {layer}: in group {seen[layer]!r} and {group.name!r}"
                    )
                seen[layer] = group.name
        _positive("tokens_per_block", self.tokens_per_block, MAX_TOKENS_PER_BLOCK)
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        _check_rank("tp", self.tp_rank, self.tp_size)
        _check_rank("pp", self.pp_rank, self.pp_size)

    # -- lookup -------------------------------------------------------------------------
    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def group(self, name: str) -> LayerGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"no layer group {name!r} in spec {self.name!r}; groups: {self.group_names}")

    @property
    def num_layers(self) -> int:
        return sum(g.num_layers for g in self.groups)

    @property
    def itemsize(self) -> int:
        """Bytes per pool element."""
        return DTYPE_BYTES[self.dtype]

    @property
    def torch_dtype(self):  # type: ignore[no-untyped-def]
        import torch

        return getattr(torch, self.dtype)

    @property
    def root(self) -> KVCacheSpec:
        """The unsharded model spec."""
        return self.model if self.model is not None else self

    # -- sizes --------------------------------------------------------------------------
    def bytes_per_token(self, group: str | LayerGroup) -> int:
        """Bytes of KV per token position in ``group`` over this shard's layers and heads."""
        g = self.group(group) if isinstance(group, str) else group
        return g.elements_per_token() * self.itemsize

    def bytes_per_block(self, group: str | LayerGroup) -> int:
        return self.bytes_per_token(group) * self.tokens_per_block

    def state_bytes(self, group: str | LayerGroup) -> int:
        """Bytes of one request's state in ``group`` (0 for attention groups)."""
        g = self.group(group) if isinstance(group, str) else group
        return g.state_elements() * DTYPE_BYTES[g.item_dtype(self.dtype)]

    # -- identity -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tokens_per_block": self.tokens_per_block,
            "dtype": self.dtype,
            "tp": [self.tp_rank, self.tp_size],
            "pp": [self.pp_rank, self.pp_size],
            "groups": [g.to_dict() for g in self.groups],
        }

    def digest(self) -> str:
        """Stable hash of everything in this (possibly sharded) spec."""
        return _sha(self.to_dict())

    def model_digest(self) -> str:
        """Stable hash of the model's KV shape: equal on every shard, for handshakes.

        Excludes ``tokens_per_block`` and the shard layout (sender and receiver may differ in
        both) and includes group order, kinds, windows, global layer ids, heads and dtypes.
        """
        root = self.root
        layers = {g.name: list(g.layer_ids) for g in root.groups}
        payload = {
            "dtype": root.dtype,
            "groups": [{**g._model_fields(), "layer_ids": layers[g.name]} for g in root.groups],
        }
        return _sha(payload)

    # -- parallelism --------------------------------------------------------------------
    def shard(self, tp_rank: int, tp_size: int) -> KVCacheSpec:
        """The spec held by tensor-parallel rank ``tp_rank`` of ``tp_size``.

        KV heads split evenly: with ``H`` kv heads and ``H % tp_size == 0`` rank ``r`` holds
        heads ``[r*H/tp, (r+1)*H/tp)``. With fewer heads than ranks (``tp_size % H == 0``)
        each head is replicated on ``tp_size / H`` consecutive ranks and rank ``r`` holds head
        ``r // (tp_size / H)``. A state group splits ``state_shape[0]`` the same way.
        Sharding an already-sharded spec is not supported (shard the model spec).
        """
        _check_rank("tp", tp_rank, tp_size)
        if self.tp_size != 1:
            raise ValueError(f"spec {self.name!r} is already TP-sharded ({self.tp_size} ranks)")
        groups = []
        for g in self.groups:
            start, end = _head_split(g.num_kv_heads, tp_rank, tp_size, g.name, "kv heads")
            if g.kind.has_state:
                assert g.state_shape is not None
                s0, s1 = _head_split(g.state_shape[0], tp_rank, tp_size, g.name, "state_shape[0]")
                groups.append(
                    replace(
                        g, head_start=start, head_end=end, state_head_start=s0, state_head_end=s1
                    )
                )
            else:
                groups.append(replace(g, head_start=start, head_end=end))
        return replace(
            self, groups=tuple(groups), tp_rank=tp_rank, tp_size=tp_size, model=self.root
        )

    def stage(self, pp_rank: int, pp_size: int) -> KVCacheSpec:
        """The spec held by pipeline stage ``pp_rank`` of ``pp_size``.

        The model's layers (the union of all groups' ids, sorted) split into ``pp_size``
        contiguous runs whose sizes differ by at most one (earlier stages take the extra
        layer). Each group keeps the ids inside the stage; groups left with no layer are
        dropped. Staging a spec that is already staged is not supported.
        """
        _check_rank("pp", pp_rank, pp_size)
        if self.pp_size != 1:
            raise ValueError(f"spec {self.name!r} is already PP-staged ({self.pp_size} stages)")
        all_layers = sorted(layer for g in self.groups for layer in g.layer_ids)
        if pp_size > len(all_layers):
            raise ValueError(f"cannot split {len(all_layers)} layers into {pp_size} stages")
        base, extra = divmod(len(all_layers), pp_size)
        lo = pp_rank * base + min(pp_rank, extra)
        hi = lo + base + (1 if pp_rank < extra else 0)
        held = set(all_layers[lo:hi])
        groups = []
        for g in self.groups:
            ids = tuple(layer for layer in g.layer_ids if layer in held)
            if ids:
                groups.append(replace(g, layer_ids=ids))
        return replace(
            self, groups=tuple(groups), pp_rank=pp_rank, pp_size=pp_size, model=self.root
        )

    def shard_for(self, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int) -> KVCacheSpec:
        """Convenience: ``self.stage(pp_rank, pp_size).shard(tp_rank, tp_size)``."""
        staged = self.stage(pp_rank, pp_size) if pp_size > 1 else self
        return staged.shard(tp_rank, tp_size) if tp_size > 1 else staged

    def with_block_size(self, tokens_per_block: int) -> KVCacheSpec:
        """The same spec with another ``tokens_per_block`` (the receiver may differ)."""
        return replace(self, tokens_per_block=tokens_per_block)


def _head_split(total: int, rank: int, size: int, group: str, what: str) -> tuple[int, int]:
    if total % size == 0:
        return _split_even(total, size, rank, f"group {group!r} {what}")
    if size % total == 0:
        head = rank // (size // total)
        return head, head + 1
    raise ValueError(
        f"group {group!r}: {total} {what} cannot be split over {size} TP ranks "
        f"(need {what} % tp == 0 or tp % {what} == 0)"
    )


def _sha(payload: object) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Presets: real shapes (from the public configs) with no weights.
# ---------------------------------------------------------------------------------------


def _groups_from_layer_types(
    layer_types: Sequence[str],
    *,
    num_kv_heads: int,
    head_dim: int,
    window: int | None = None,
    state_shape: tuple[int, ...] | None = None,
    state_dtype: str | None = None,
    full_heads: int | None = None,
    full_head_dim: int | None = None,
) -> tuple[LayerGroup, ...]:
    by_kind: dict[GroupKind, list[int]] = {}
    for layer, kind in enumerate(layer_types):
        by_kind.setdefault(GroupKind.parse(kind, where=f"layer {layer}"), []).append(layer)
    make = {
        GroupKind.FULL: lambda ids: LayerGroup(
            "full", GroupKind.FULL, ids, full_heads or num_kv_heads, full_head_dim or head_dim
        ),
        GroupKind.SLIDING: lambda ids: LayerGroup(
            f"sliding{window}", GroupKind.SLIDING, ids, num_kv_heads, head_dim, window=window
        ),
        GroupKind.STATE: lambda ids: LayerGroup(
            "state", GroupKind.STATE, ids, state_shape=state_shape, state_dtype=state_dtype
        ),
    }
    return tuple(make[kind](tuple(by_kind[kind])) for kind in GroupKind if kind in by_kind)


def _every(n: int, period: int, full_at: int) -> list[str]:
    """Layer types where layer ``i`` is full when ``i % period == full_at``, else sliding."""
    return ["full" if i % period == full_at else "sliding" for i in range(n)]


def _gpt_oss_20b() -> KVCacheSpec:
    # openai/gpt-oss-20b: 24 layers alternating sliding(128)/full, 8 kv heads x 64.
    types = ["sliding" if i % 2 == 0 else "full" for i in range(24)]
    return KVCacheSpec(
        _groups_from_layer_types(types, num_kv_heads=8, head_dim=64, window=128),
        tokens_per_block=16,
        dtype="bfloat16",
        name="gpt-oss-20b",
    )


def _gpt_oss_120b() -> KVCacheSpec:
    types = ["sliding" if i % 2 == 0 else "full" for i in range(36)]
    return KVCacheSpec(
        _groups_from_layer_types(types, num_kv_heads=8, head_dim=64, window=128),
        tokens_per_block=16,
        dtype="bfloat16",
        name="gpt-oss-120b",
    )


def _gemma3_4b() -> KVCacheSpec:
    # google/gemma-3-4b: 34 layers, 5 sliding(1024) : 1 full, 4 kv heads x 256.
    return KVCacheSpec(
        _groups_from_layer_types(_every(34, 6, 5), num_kv_heads=4, head_dim=256, window=1024),
        tokens_per_block=16,
        dtype="bfloat16",
        name="gemma-3-4b",
    )


def _gemma3_27b() -> KVCacheSpec:
    # google/gemma-3-27b: 62 layers, 5 sliding(1024) : 1 full, 16 kv heads x 128.
    return KVCacheSpec(
        _groups_from_layer_types(_every(62, 6, 5), num_kv_heads=16, head_dim=128, window=1024),
        tokens_per_block=16,
        dtype="bfloat16",
        name="gemma-3-27b",
    )


def _llama3_8b() -> KVCacheSpec:
    # meta-llama/Llama-3.1-8B: 32 full-attention layers, 8 kv heads x 128.
    return KVCacheSpec(
        _groups_from_layer_types(["full"] * 32, num_kv_heads=8, head_dim=128),
        tokens_per_block=16,
        dtype="bfloat16",
        name="llama-3-8b",
    )


def _qwen3_next_80b() -> KVCacheSpec:
    # Qwen/Qwen3-Next-80B-A3B (= Qwen3NextConfig's defaults): 48 layers, 3 gated DeltaNet : 1
    # full attention (2 kv heads x 256). Linear-attention state per layer and value head, as
    # kvtriton.hf packs it: the 128 x 128 recurrent state plus the K - 1 = 3 previous conv
    # inputs of the q, k, v channels apportioned over the 32 value heads,
    # (2 * 16 * 128 + 32 * 128) * 3 / 32 = 768 elements; the model's dtype (bfloat16).
    hv, hk, dk, dv, taps = 32, 16, 128, 128, 3
    conv = (2 * hk * dk + hv * dv) * taps // hv
    types = ["full" if i % 4 == 3 else "state" for i in range(48)]
    return KVCacheSpec(
        _groups_from_layer_types(
            types, num_kv_heads=2, head_dim=256, state_shape=(hv, dk * dv + conv)
        ),
        tokens_per_block=16,
        dtype="bfloat16",
        name="qwen3-next-80b",
    )


def _deepseek_v3() -> KVCacheSpec:
    # deepseek-ai/DeepSeek-V3: 61 layers of MLA; one latent of 512 + 64 rope dims (kv_factor 1).
    group = LayerGroup("mla", "full", tuple(range(61)), num_kv_heads=1, head_dim=576, kv_factor=1)
    return KVCacheSpec((group,), tokens_per_block=64, dtype="bfloat16", name="deepseek-v3")


def _tiny_hybrid() -> KVCacheSpec:
    # A small hybrid for CPU demos and tests: full + sliding(8) + state, 2 kv heads x 16.
    groups = (
        LayerGroup("full", "full", (1, 4), num_kv_heads=2, head_dim=16),
        LayerGroup("sliding8", "sliding", (0, 2, 5), num_kv_heads=2, head_dim=16, window=8),
        LayerGroup("state", "state", (3,), state_shape=(2, 4, 8), state_dtype="float32"),
    )
    return KVCacheSpec(groups, tokens_per_block=4, dtype="float32", name="tiny-hybrid")


#: preset -> the ``transformers`` config class (and the fields changed from its defaults)
#: whose KV-cache spec (``kvtriton.hf.spec_from_hf_config``) is exactly the preset's; the
#: same numbers either way (tests/test_hf.py checks every entry). tiny-hybrid has none.
PRESET_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt-oss-20b": ("GptOssConfig", {"num_hidden_layers": 24}),
    "gpt-oss-120b": ("GptOssConfig", {}),
    "gemma-3-4b": ("Gemma3TextConfig", {"num_hidden_layers": 34, "sliding_window": 1024}),
    "gemma-3-27b": (
        "Gemma3TextConfig",
        {
            "num_hidden_layers": 62,
            "sliding_window": 1024,
            "num_attention_heads": 32,
            "num_key_value_heads": 16,
            "head_dim": 128,
        },
    ),
    "llama-3-8b": ("LlamaConfig", {"num_key_value_heads": 8}),
    "qwen3-next-80b": ("Qwen3NextConfig", {}),
    "deepseek-v3": ("DeepseekV3Config", {}),
}


PRESETS: dict[str, Any] = {
    "gpt-oss-20b": _gpt_oss_20b,
    "gpt-oss-120b": _gpt_oss_120b,
    "gemma-3-4b": _gemma3_4b,
    "gemma-3-27b": _gemma3_27b,
    "llama-3-8b": _llama3_8b,
    "qwen3-next-80b": _qwen3_next_80b,
    "deepseek-v3": _deepseek_v3,
    "tiny-hybrid": _tiny_hybrid,
}


def preset(
    name: str, *, tokens_per_block: int | None = None, dtype: str | None = None
) -> KVCacheSpec:
    """A built-in spec by name (see :data:`PRESETS`), optionally with another block size/dtype."""
    try:
        spec: KVCacheSpec = PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None
    if tokens_per_block is not None:
        spec = spec.with_block_size(tokens_per_block)
    if dtype is not None:
        spec = replace(spec, dtype=dtype)
    return spec


def resolve_spec(spec: object, *, what: str = "spec") -> KVCacheSpec:
    """``spec`` itself if it is a :class:`KVCacheSpec`, the preset of that name if it is a
    string; ``ValueError`` (unknown preset, listing them) or ``TypeError`` otherwise."""
    if isinstance(spec, KVCacheSpec):
        return spec
    if isinstance(spec, str):
        return preset(spec)
    raise TypeError(
        f"{what} must be a KVCacheSpec or a preset name ({', '.join(PRESETS)}), got "
        f"{type(spec).__name__} {spec!r}"
    )
