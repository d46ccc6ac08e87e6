"""Hugging Face ``transformers`` KV caches to and from paged kvtriton pools.

(Over 600 lines on purpose: one library bridge in sections -- cache-layer introspection,
gated-DeltaNet state layers, spec <-> model checks, cache -> pools, pools -> cache, tiny
seeded models -- that share private helpers on transformers' layer classes; splitting it
would turn those helpers into an API.)

What is supported (``transformers`` 5.x ``DynamicCache``, batch size 1 = one request):

* full-attention layers (``DynamicLayer``): the layer holds positions ``[0, T)``;
* sliding-window layers (``DynamicSlidingWindowLayer``): the layer holds the **last**
  ``min(T, W - 1)`` positions, ``[T - held, T)`` with ``T = cumulative_length`` (more while
  ``record_past`` is on). ``transformers`` masks a sliding layer with
  ``kv_idx > q_idx - sliding_window``: a query at ``q`` attends ``(q - W, q]`` -- exactly
  kvtriton's window ``W`` (DESIGN.md §1), so ``sliding_window`` maps to ``window`` unchanged
  and the ``W - 1`` positions a layer keeps are exactly ``needed(g, P) = [P + 1 - W, P)``;
* layers without a cache of their own (``DummyLayer``: attention-free or KV-sharing layers)
  are not in the spec and are skipped;
* gated-DeltaNet linear-attention layers (``LinearAttentionLayer``, Qwen3-Next family) as
  kvtriton **state** groups: one state per request and layer that summarises ``[0, P)`` and
  moves whole. ``kvtriton.hf`` folds the convolution state into the recurrent one:
  ``state[h] = [recurrent[h] (Dk*Dv) | conv chunk h (C)]`` with ``Hv`` value heads and
  ``C = conv_dim * (K - 1) / Hv`` -- the ``K - 1`` newest conv inputs, flattened channel-major
  and cut into ``Hv`` equal chunks. ``transformers`` keeps ``K`` conv slots, but its
  single-token and chunked updates never read the oldest one (a causal conv of width ``K``
  sees ``K - 1`` previous inputs), so it is rebuilt as zeros and decoding stays exact.
  This packing is not a tensor-parallel split of the conv channels: state groups move only
  between unsharded (``tp = 1``) specs.

Not supported (a clear ``ValueError``): other recurrent layers (Mamba/Mamba-2 caches,
short convolutions), hybrid layers that hold attention and a state in one layer, chunked
attention (Llama-4: its mask is not a sliding window), static / quantized / offloaded
caches, rebuilding a batch of more than one sequence (export picks one with
``batch_index``), and MLA caches whose layout differs from
``[batch, heads, tokens, head_dim]`` keys and values.

Two directions:

* :func:`cache_to_pools` -- copy the positions a model's cache holds (or a sub-range) into
  each group's pool at the request's :class:`~kvtriton.ranges.BlockSpan` (sender side after a
  prefill; receiver side after decoding, to commit the new tokens);
* :func:`pools_to_cache` -- build a ``DynamicCache`` from the pools that lets the model
  continue at position ``P``: full layers hold ``[0, P)``, sliding layers exactly
  ``needed(g, P)`` (``W - 1`` positions once ``P >= W - 1``), with ``cumulative_length = P``.

Attention groups go through :mod:`kvtriton.kernels` (``scatter`` / ``gather``, one call per
group); states are copied slot by slot with torch indexing. :func:`forward` calls a model with
a cache under the argument name its ``transformers`` version takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvtriton.ranges import BlockSpan, TokenRange, needed_range
from kvtriton.spec import GroupKind, KVCacheSpec, LayerGroup

if TYPE_CHECKING:
    import torch

__all__ = [
    "TINY_EXTRA_MODELS",
    "TINY_MODELS",
    "StateLayout",
    "cache_layer_kind",
    "cache_to_pools",
    "check_spec",
    "forward",
    "held_positions",
    "held_ranges",
    "layer_kv_shape",
    "pools_to_cache",
    "spec_for_model",
    "state_layout",
    "tiny_config",
    "tiny_model",
]

PoolsLike = Any  # Mapping[str, torch.Tensor] or kvtriton.cache.CachePools (both index by group)


# ------------------------------------------------------------------------------------------
# cache layer introspection
# ------------------------------------------------------------------------------------------


#: Oldest ``transformers`` major version whose cache layout this module follows (developed
#: and tested against 5.24: per-layer ``Cache.layers``, ``DynamicSlidingWindowLayer`` keeping
#: ``W - 1`` entries with ``cumulative_length``, ``LinearAttentionLayer``).
MIN_TRANSFORMERS = (5, 0)


def _cache_utils() -> Any:
    try:
        import transformers
        from transformers import cache_utils
    except ImportError as exc:  # pragma: no cover - the hf extra is missing
        raise ImportError(
            "kvtriton.integrations.transformers needs the transformers package "
            "(pip install 'kvtriton[hf]')"
        ) from exc
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    if major_minor < MIN_TRANSFORMERS:
        raise ImportError(
            f"kvtriton.integrations.transformers needs transformers >= "
            f"{'.'.join(map(str, MIN_TRANSFORMERS))} (its per-layer DynamicCache); found "
            f"{transformers.__version__}"
        )
    return cache_utils


def cache_layer_kind(layer: object) -> GroupKind | None:
    """The :class:`~kvtriton.spec.GroupKind` of a cache layer (``None``: nothing cached).

    Raises ``ValueError`` for layer classes this module cannot move (hybrid attention+state
    layers, static, quantized or indexed layers, anything unknown), naming the class.
    """
    cu = _cache_utils()
    cls = type(layer)
    name = cls.__name__
    # Optional classes (not in every 5.x release): a missing one matches nothing.
    if isinstance(layer, getattr(cu, "DummyLayer", ())):
        return None
    if cls is getattr(cu, "LinearAttentionLayer", None):
        return GroupKind.STATE
    if isinstance(layer, getattr(cu, "LinearAttentionCacheLayerMixin", ())):
        raise ValueError(
            f"cache layer {name} holds attention KV and a recurrent state in one layer: not "
            "supported (kvtriton would need two groups for one layer id)"
        )
    # Exact classes: subclasses (quantized, indexed, offloaded variants) keep extra tensors
    # this module would silently drop.
    if cls is cu.DynamicSlidingWindowLayer:
        return GroupKind.SLIDING
    if cls is cu.DynamicLayer:
        return GroupKind.FULL
    raise ValueError(
        f"cache layer {name} is not supported: expected DynamicLayer (full attention), "
        "DynamicSlidingWindowLayer (sliding window), LinearAttentionLayer (gated DeltaNet "
        "state) or DummyLayer (no cache) of a DynamicCache"
    )


def held_positions(cache: Any, layer_idx: int) -> TokenRange:
    """Absolute positions ``[start, end)`` whose K/V cache layer ``layer_idx`` holds.

    Full layers hold ``[0, T)``; a sliding layer holds its last ``held`` entries,
    ``[cumulative_length - held, cumulative_length)``. An uninitialised layer holds ``[0, 0)``.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"expected a transformers Cache with .layers, got {type(cache).__name__}")
    if not 0 <= layer_idx < len(layers):
        raise ValueError(f"layer {layer_idx} is outside the cache's {len(layers)} layers")
    layer = layers[layer_idx]
    kind = cache_layer_kind(layer)
    if kind is None or not kind.pages_tokens:
        raise ValueError(f"layer {layer_idx} ({type(layer).__name__}) holds no per-token KV")
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        end = int(getattr(layer, "cumulative_length", 0)) if kind.has_window else 0
        return TokenRange(end, end)
    held = int(layer.keys.shape[-2])
    if not kind.has_window:  # full attention holds every position from 0
        return TokenRange(0, held)
    total = int(layer.cumulative_length)
    if held > total:
        raise ValueError(
            f"sliding layer {layer_idx} holds {held} entries but has only seen {total} positions"
        )
    return TokenRange(total - held, total)


def held_ranges(
    cache: Any, spec: KVCacheSpec, layers: Iterable[int] | None = None
) -> dict[str, TokenRange]:
    """``{attention group: positions every layer of the group holds}`` (the intersection).

    Layers of one group normally hold the same range; a mismatch means the cache was built for
    another spec and raises ``ValueError`` naming the layers. ``layers``: look at these global
    layers only (a prefill in progress has written the first layers and not yet the rest).
    """
    wanted = None if layers is None else set(layers)
    ranges: dict[str, TokenRange] = {}
    for group in spec.groups:
        if group.is_state:
            continue
        ids = [i for i in group.layer_ids if wanted is None or i in wanted]
        if not ids:
            continue
        per_layer = {layer: held_positions(cache, layer) for layer in ids}
        distinct = set(per_layer.values())
        if len(distinct) != 1:
            raise ValueError(
                f"group {group.name!r}: its layers hold different positions "
                f"({ {k: str(v) for k, v in per_layer.items()} }); expected one range per group"
            )
        ranges[group.name] = distinct.pop()
    return ranges


def forward(model: Any, tokens: Any, cache: Any) -> Any:
    """``model(tokens, <cache>=cache, use_cache=True)`` for a batch of one sequence.

    ``tokens``: token ids (a sequence of ints or a ``[1, T]`` tensor). Newer ``transformers``
    name the cache argument ``cache`` (``past_key_values`` is deprecated); older ones only
    know ``past_key_values`` and would silently ignore ``cache``, so the name is read from
    the model's signature.
    """
    import inspect

    import torch

    if not isinstance(tokens, torch.Tensor):
        device = next(model.parameters()).device
        tokens = torch.tensor([[int(t) for t in tokens]], dtype=torch.long, device=device)
    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"
    return model(tokens, use_cache=True, **{key: cache})


# ------------------------------------------------------------------------------------------
# recurrent state layers (gated DeltaNet)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateLayout:
    """How one gated-DeltaNet layer's cache maps to one kvtriton state ``[heads, elements]``.

    Attributes:
        heads: value heads ``Hv`` (``state_shape[0]``).
        key_dim, value_dim: ``Dk`` and ``Dv`` per head (recurrent state ``[Hv, Dk, Dv]``).
        conv_channels: channels of the causal conv (``2*Hk*Dk + Hv*Dv``).
        conv_kernel: its width ``K``; ``K - 1`` inputs are kept.
    """

    heads: int
    key_dim: int
    value_dim: int
    conv_channels: int
    conv_kernel: int

    @property
    def conv_elements(self) -> int:
        """Conv elements per head, ``conv_channels * (K - 1) / heads``."""
        return self.conv_channels * (self.conv_kernel - 1) // self.heads

    @property
    def state_shape(self) -> tuple[int, int]:
        return (self.heads, self.key_dim * self.value_dim + self.conv_elements)

    def pack(self, conv: Any, recurrent: Any) -> Any:
        """``[conv_channels, K]`` conv and ``[Hv, Dk, Dv]`` recurrent -> ``[Hv, E]``."""
        import torch

        kept = conv[:, 1:].reshape(self.heads, self.conv_elements)
        return torch.cat((recurrent.reshape(self.heads, -1), kept.to(recurrent.dtype)), dim=1)

    def unpack(self, state: Any, conv_dtype: Any) -> tuple[Any, Any]:
        """``[Hv, E]`` -> (``[1, conv_channels, K]`` with a zero oldest slot,
        ``[1, Hv, Dk, Dv]``), both contiguous."""
        import torch

        rec = (
            state[:, : self.key_dim * self.value_dim]
            .reshape(1, self.heads, self.key_dim, self.value_dim)
            .contiguous()
        )
        conv = torch.zeros(
            (1, self.conv_channels, self.conv_kernel), dtype=conv_dtype, device=state.device
        )
        conv[0, :, 1:] = state[:, self.key_dim * self.value_dim :].reshape(
            self.conv_channels, self.conv_kernel - 1
        )
        return conv, rec


def state_layout(config: Any) -> StateLayout:
    """The :class:`StateLayout` of a gated-DeltaNet config (Qwen3-Next family).

    Raises ``ValueError`` for other recurrent layers (Mamba, short convolutions ...).
    """
    text = _text_config(config)
    hv = getattr(text, "linear_num_value_heads", None)
    if hv is None:
        raise ValueError(
            f"{type(text).__name__}: only gated-DeltaNet state layers (linear_num_value_heads, "
            "Qwen3-Next family) are supported; Mamba-style and convolution states are not"
        )
    hk = text.linear_num_key_heads
    dk, dv, k = text.linear_key_head_dim, text.linear_value_head_dim, text.linear_conv_kernel_dim
    channels = 2 * hk * dk + hv * dv
    if channels * (k - 1) % hv:
        raise ValueError(
            f"{type(text).__name__}: {channels} conv channels x {k - 1} taps do not "
            f"split over {hv} value heads"
        )
    return StateLayout(hv, dk, dv, channels, k)


# ------------------------------------------------------------------------------------------
# spec <-> model
# ------------------------------------------------------------------------------------------


def _text_config(config: Any) -> Any:
    config = getattr(config, "config", config)  # a model -> its config
    if hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config


def _model_dtype(model_or_config: Any) -> str | None:
    dtype = getattr(model_or_config, "dtype", None)
    if dtype is None:
        return None
    text = str(dtype).removeprefix("torch.")
    return None if text == "auto" else text


def spec_for_model(
    model_or_config: Any,
    *,
    tokens_per_block: int = 16,
    dtype: Any = None,
    name: str | None = None,
) -> KVCacheSpec:
    """The kvtriton spec of a ``transformers`` model (or config), checked against the model.

    Uses :func:`kvtriton.hf.spec_from_hf_config`; ``dtype`` defaults to the model's parameter
    dtype (the dtype its cache holds), so pools and cache tensors match bit for bit.
    """
    from kvtriton.hf import spec_from_hf_config

    config = _text_config(model_or_config)
    if dtype is None and hasattr(model_or_config, "parameters"):
        dtype = _model_dtype(model_or_config)
    spec = spec_from_hf_config(config, tokens_per_block=tokens_per_block, dtype=dtype, name=name)
    check_spec(spec, config)
    return spec


def _config_layer_kinds(config: Any) -> list[GroupKind | None]:
    """Per layer, what ``DynamicCache(config=...)`` builds: full / sliding / None (no KV)."""
    cu = _cache_utils()
    text = _text_config(config)
    cache = cu.DynamicCache(config=text)
    if not cache.layers:
        raise ValueError(
            f"{type(text).__name__}: DynamicCache(config=...) built no layers; kvtriton needs a "
            "config with layer_types or sliding_window information"
        )
    types = getattr(text, "layer_types", None) or []
    for i, layer_type in enumerate(types):
        if layer_type == "chunked_attention":
            raise ValueError(
                f"{type(text).__name__}: layer {i} uses chunked attention; its mask is not a "
                "sliding window and is not supported"
            )
    return [cache_layer_kind(layer) for layer in cache.layers]


def check_spec(spec: KVCacheSpec, config: Any) -> None:
    """Check that ``spec`` (the model spec, or a TP/PP shard of it) describes ``config``'s cache.

    Every layer with a cache must sit in a group of the same kind, a sliding group's window
    must equal the layer's ``sliding_window``, heads/head_dim must match the config and a
    state group's ``state_shape`` must be :func:`state_layout`'s. Raises ``ValueError``
    naming the first mismatch.
    """
    cu = _cache_utils()
    text = _text_config(config)
    root = spec.root
    kinds = _config_layer_kinds(text)
    cache_layers = cu.DynamicCache(config=text).layers
    by_layer: dict[int, LayerGroup] = {}
    for group in root.groups:
        for layer in group.layer_ids:
            by_layer[layer] = group
    for layer, kind in enumerate(kinds):
        group = by_layer.pop(layer, None)
        if kind is None:
            if group is not None:
                raise ValueError(
                    f"group {group.name!r} lists layer {layer}, which holds no KV "
                    f"in {type(text).__name__}"
                )
            continue
        if group is None:
            raise ValueError(
                f"layer {layer} ({kind}) of {type(text).__name__} is in no group "
                f"of spec {spec.name!r}"
            )
        if group.kind != kind:
            raise ValueError(
                f"layer {layer} is {kind} in {type(text).__name__} but group "
                f"{group.name!r} is {group.kind}"
            )
        if kind.has_window:
            window = int(cache_layers[layer].sliding_window)
            if group.window != window:
                raise ValueError(
                    f"group {group.name!r}: window {group.window} but layer {layer} has "
                    f"sliding_window={window} (a query at q attends (q - W, q] in both)"
                )
    if by_layer:
        raise ValueError(
            f"spec {spec.name!r} lists layers {sorted(by_layer)} that "
            f"{type(text).__name__} does not have ({len(kinds)} layers)"
        )
    for group in root.groups:
        if group.is_state:
            expected = state_layout(text).state_shape
            if tuple(group.state_shape or ()) != expected:
                raise ValueError(
                    f"group {group.name!r}: state_shape {group.state_shape} but the model's "
                    f"gated-DeltaNet state packs to {expected} (recurrent + K-1 conv inputs)"
                )
            continue
        for layer in group.layer_ids:
            heads, head_dim = layer_kv_shape(text, layer)
            if (group.num_kv_heads, group.head_dim, group.kv_factor) != (heads, head_dim, 2):
                raise ValueError(
                    f"group {group.name!r}: {group.num_kv_heads} kv heads x {group.head_dim} "
                    f"(kv_factor {group.kv_factor}) but layer {layer} of the model caches "
                    f"{heads} x {head_dim} K and V"
                )


def layer_kv_shape(config: Any, layer: int) -> tuple[int, int]:
    """``(num_key_value_heads, head_dim)`` that layer ``layer`` of ``config`` caches.

    A heterogeneous config (Gemma 4: ``per_layer_config`` overrides ``head_dim`` / kv heads
    of some layers) is read through transformers' own per-layer view,
    ``config.per_layer_config[layer]``, as :mod:`kvtriton.hf` reads the overrides; a missing
    kv-head count is ``num_attention_heads`` and a missing head_dim
    ``hidden_size // num_attention_heads``.
    """
    text = _text_config(config)
    layer_config = (
        text.per_layer_config[layer] if getattr(text, "is_heterogeneous", False) else text
    )
    heads = getattr(layer_config, "num_key_value_heads", None) or layer_config.num_attention_heads
    head_dim = getattr(layer_config, "head_dim", None) or (
        layer_config.hidden_size // layer_config.num_attention_heads
    )
    return int(heads), int(head_dim)


# ------------------------------------------------------------------------------------------
# cache -> pools
# ------------------------------------------------------------------------------------------


def _check_layer_tensor(
    what: str, t: Any, group: LayerGroup, dtype: Any, device: Any, batch_index: int
) -> None:
    if t is None or t.dim() != 4:
        shape = None if t is None else tuple(t.shape)
        raise ValueError(f"{what}: expected [batch, heads, tokens, head_dim], got {shape}")
    batch, heads, _, head_dim = t.shape
    if not 0 <= batch_index < batch:
        raise ValueError(f"{what}: batch_index {batch_index} outside batch size {batch}")
    if (heads, head_dim) != (group.num_kv_heads, group.head_dim):
        raise ValueError(
            f"{what}: {heads} heads x {head_dim} but group {group.name!r} has "
            f"{group.num_kv_heads} x {group.head_dim}"
        )
    if t.dtype != dtype:
        raise ValueError(
            f"{what}: dtype {t.dtype} but the pool holds {dtype} (build the spec "
            "with the model's dtype: copies are bit-exact, never casts)"
        )
    if t.device != device:
        raise ValueError(f"{what}: on {t.device} but the pool is on {device}")


def _state_tensors(layer: Any, layer_idx: int, batch_index: int) -> tuple[Any, Any]:
    """The (conv ``[C, K]``, recurrent ``[Hv, Dk, Dv]``) of one sequence of a state layer."""
    if getattr(layer, "number_of_states", 1) != 1:
        raise ValueError(
            f"state layer {layer_idx} holds {layer.number_of_states} conv/recurrent "
            "states; one is supported"
        )
    conv, rec = layer.conv_states.get(0), layer.recurrent_states.get(0)
    if conv is None or rec is None or not layer.has_previous_state.get(0, False):
        raise ValueError(f"state layer {layer_idx} has no state yet (run a forward first)")
    if getattr(layer, "record_past", False):
        raise ValueError(
            f"state layer {layer_idx} records its past (record_past=True); "
            "expected a plain DynamicCache layer"
        )
    if not 0 <= batch_index < conv.shape[0]:
        raise ValueError(
            f"state layer {layer_idx}: batch_index {batch_index} outside batch size {conv.shape[0]}"
        )
    return conv[batch_index], rec[batch_index]


def _check_state_group(spec: KVCacheSpec, group: LayerGroup) -> None:
    root = spec.root.group(group.name)
    assert root.state_shape is not None
    lo, hi = group.held_heads
    if (lo, hi) != (0, root.state_shape[0]):
        raise ValueError(
            f"group {group.name!r}: a gated-DeltaNet state moves only whole (tp = 1); this shard "
            f"holds state heads [{lo}, {hi}) of "
            f"{root.state_shape[0]} (the conv packing is not a tensor-parallel split)"
        )


def cache_to_pools(
    cache: Any,
    spec: KVCacheSpec,
    pools: PoolsLike,
    spans: Mapping[str, BlockSpan],
    tokens: Mapping[str, TokenRange] | None = None,
    *,
    state_slots: Mapping[str, int] | None = None,
    config: Any = None,
    batch_index: int = 0,
    backend: str = "auto",
    layers: Iterable[int] | None = None,
) -> dict[str, TokenRange]:
    """Copy K/V of ``cache`` at positions ``tokens[g]`` into ``pools[g]`` through ``spans[g]``.

    Args:
        cache: a ``DynamicCache`` (see the module docstring for the layers supported).
        spec: the local spec (TP/PP shards allowed for attention: only the shard's layers and
            heads move; state groups need ``tp = 1``).
        pools: ``{group: 6-D pool view, state group: [layers, slots, *state_shape]}`` or a
            :class:`kvtriton.cache.CachePools`.
        spans: ``{group: BlockSpan}`` covering the positions written.
        tokens: ``{attention group: half-open positions}``; groups left out write nothing.
            Default: every position each attention group holds (:func:`held_ranges`).
        state_slots: ``{state group: slot}``: write the group's current state (it summarises
            every position the cache has seen) into that slot. Groups left out write nothing.
        config: the model config (needed only to write state groups).
        batch_index: which sequence of the cache's batch to copy.
        backend: kernel backend (see :mod:`kvtriton.kernels`).
        layers: global layer ids to copy (default every layer): a prefill streams layer by
            layer, copying each as soon as its forward wrote the cache.

    Returns:
        the ranges written, per attention group. Everything is validated before the first write.
    """
    import torch

    from kvtriton import kernels

    held = held_ranges(cache, spec, layers)
    if tokens is None:
        tokens = {name: rng for name, rng in held.items() if not rng.is_empty}
    attention = sorted(g.name for g in spec.groups if g.is_attention)
    unknown = sorted(set(tokens) - set(attention))
    if unknown:
        raise ValueError(
            f"tokens names {unknown}, which are not attention groups of spec "
            f"{spec.name!r} ({attention})"
        )
    state_slots = dict(state_slots or {})
    states = [g.name for g in spec.groups if g.is_state]
    unknown = sorted(set(state_slots) - set(states))
    if unknown:
        raise ValueError(
            f"state_slots names {unknown}, which are not state groups of spec "
            f"{spec.name!r} ({states})"
        )
    wanted = None if layers is None else set(layers)
    jobs: list[tuple[LayerGroup, TokenRange, torch.Tensor, BlockSpan, list[int]]] = []
    state_jobs: list[tuple[LayerGroup, torch.Tensor, int, StateLayout, list[int]]] = []
    for group in spec.groups:
        picked = [i for i, lid in enumerate(group.layer_ids) if wanted is None or lid in wanted]
        if not picked:
            continue
        if group.is_state:
            if group.name not in state_slots:
                continue
            if config is None:
                raise ValueError(f"group {group.name!r}: writing a state needs config=")
            _check_state_group(spec, group)
            layout = state_layout(config)
            pool = pools[group.name]
            slot = state_slots[group.name]
            if (
                pool.dim() != 4
                or tuple(pool.shape[2:]) != layout.state_shape
                or not (0 <= slot < pool.shape[1])
                or pool.shape[0] != group.num_layers
            ):
                raise ValueError(
                    f"group {group.name!r}: state pool {tuple(pool.shape)} / slot "
                    f"{slot} do not fit {group.num_layers} layers x "
                    f"{layout.state_shape}"
                )
            for layer in (group.layer_ids[i] for i in picked):
                if cache_layer_kind(cache.layers[layer]) is not GroupKind.STATE:
                    raise ValueError(f"layer {layer} of the cache is not a state layer")
                conv, rec = _state_tensors(cache.layers[layer], layer, batch_index)
                if tuple(conv.shape) != (layout.conv_channels, layout.conv_kernel) or tuple(
                    rec.shape
                ) != (layout.heads, layout.key_dim, layout.value_dim):
                    raise ValueError(
                        f"state layer {layer}: conv {tuple(conv.shape)} / recurrent "
                        f"{tuple(rec.shape)} do not match {layout}"
                    )
                if rec.dtype != pool.dtype or rec.device != pool.device:
                    raise ValueError(
                        f"state layer {layer}: recurrent state {rec.dtype} on "
                        f"{rec.device}, pool {pool.dtype} on {pool.device}"
                    )
            state_jobs.append((group, pool, slot, layout, picked))
            continue
        rng = tokens.get(group.name)
        if rng is None or rng.is_empty:
            continue
        have = held[group.name]
        if not (have.start <= rng.start and rng.end <= have.end):
            raise ValueError(
                f"group {group.name!r}: the cache holds positions {have}, which do "
                f"not cover the requested {rng}"
            )
        if group.name not in spans:
            raise ValueError(f"no block span for group {group.name!r}")
        span = spans[group.name]
        span.check_covers(rng, spec.tokens_per_block, group=group.name, side="destination")
        pool = pools[group.name]
        for layer in (group.layer_ids[i] for i in picked):
            entry = cache.layers[layer]
            for what, t in (("keys", entry.keys), ("values", entry.values)):
                _check_layer_tensor(
                    f"cache layer {layer} {what}",
                    t,
                    _unsharded(spec, group),
                    pool.dtype,
                    pool.device,
                    batch_index,
                )
        jobs.append((group, rng, pool, span, picked))
    for group, rng, pool, span, picked in jobs:
        lo, hi = group.held_heads
        rows = []
        for layer in (group.layer_ids[i] for i in picked):
            entry = cache.layers[layer]
            first = held[group.name].start
            sel = slice(rng.start - first, rng.end - first)
            k = entry.keys[batch_index, lo:hi, sel]  # [H, T, D]
            v = entry.values[batch_index, lo:hi, sel]
            rows.append(torch.stack((k, v)).transpose(1, 2))  # [kv, T, H, D]
        packed = torch.stack(rows).contiguous()  # [L, kv, T, H, D]
        kernels.scatter(packed, pool, span, rng, layers=picked, backend=backend)
    for group, pool, slot, layout, picked in state_jobs:
        for local in picked:
            layer = group.layer_ids[local]
            conv, rec = _state_tensors(cache.layers[layer], layer, batch_index)
            pool[local, slot] = layout.pack(conv, rec)
    return {group.name: rng for group, rng, _, _, _ in jobs}


def _unsharded(spec: KVCacheSpec, group: LayerGroup) -> LayerGroup:
    """The model's version of ``group`` (the cache holds every head of every layer)."""
    return spec.root.group(group.name)


# ------------------------------------------------------------------------------------------
# pools -> cache
# ------------------------------------------------------------------------------------------


def _fill_layer(layer: Any, keys: Any, values: Any, num_tokens: int, kind: GroupKind) -> None:
    """Install ``keys``/``values`` ([1, H, T, D]) into a fresh cache layer resuming at ``P``."""
    layer.lazy_initialization(keys, values)
    layer.keys = keys
    layer.values = values
    if kind.has_window:
        if getattr(layer, "record_past", False):
            raise ValueError(
                "sliding cache layer records its past (record_past=True); expected a "
                "fresh DynamicCache layer"
            )
        layer.cumulative_length = num_tokens


def _fill_state_layer(layer: Any, conv: Any, rec: Any) -> None:
    """Install a conv ``[1, C, K]`` and recurrent ``[1, Hv, Dk, Dv]`` state (after a prefill)."""
    layer.lazy_initialization(
        conv_states=conv, recurrent_states=rec, state_idx=0, conv_kernel_size=int(conv.shape[-1])
    )
    layer.conv_states[0].copy_(conv)
    layer.recurrent_states[0].copy_(rec)
    layer.has_previous_state[0] = True


def pools_to_cache(
    spec: KVCacheSpec,
    pools: PoolsLike,
    spans: Mapping[str, BlockSpan],
    num_tokens: int,
    config: Any,
    *,
    state_slots: Mapping[str, int] | None = None,
    backend: str = "auto",
) -> Any:
    """A ``DynamicCache`` holding what ``config``'s model needs to continue at position ``P``.

    For each attention group ``g`` it gathers ``needed(g, P)`` from ``pools[g]`` through
    ``spans[g]``: full layers get ``[0, P)``; sliding layers exactly ``[max(0, P + 1 - W), P)``
    -- the ``W - 1`` keys ``DynamicSlidingWindowLayer`` keeps -- and ``cumulative_length = P``,
    so the next forward places its first query at position ``P`` with the right mask. Each
    state group's layers get the state in ``state_slots[g]`` (which must summarise
    ``[0, P)``).

    Args:
        spec: the model spec (not a TP/PP shard: the cache needs every layer and head).
        pools: ``{group: pool tensor}`` or a :class:`kvtriton.cache.CachePools`.
        spans: ``{attention group: BlockSpan}`` covering ``needed(g, P)``.
        num_tokens: ``P >= 1``, the number of positions already processed.
        config: the model's config (or the model); decides the cache layer classes.
        state_slots: ``{state group: slot}`` (every state group of the spec).
        backend: kernel backend (see :mod:`kvtriton.kernels`).
    """
    from kvtriton import kernels

    if spec.tp_size != 1 or spec.pp_size != 1:
        raise ValueError(
            f"pools_to_cache needs the whole model's spec; {spec.name!r} is a shard "
            f"(tp {spec.tp_rank}/{spec.tp_size}, pp {spec.pp_rank}/{spec.pp_size})"
        )
    text = _text_config(config)
    check_spec(spec, text)
    cu = _cache_utils()
    state_slots = dict(state_slots or {})
    ranges: dict[str, TokenRange] = {}
    for group in spec.groups:
        pool = pools[group.name]
        if group.is_state:
            if group.name not in state_slots:
                raise ValueError(f"no state slot for state group {group.name!r}")
            slot = state_slots[group.name]
            if (
                pool.dim() < 3
                or pool.shape[0] != group.num_layers
                or not (0 <= slot < pool.shape[1])
            ):
                raise ValueError(
                    f"state pool of group {group.name!r} ({tuple(pool.shape)}) has "
                    f"no slot {slot} for {group.num_layers} layers"
                )
            continue
        ranges[group.name] = needed_range(group, num_tokens)
        if group.name not in spans:
            raise ValueError(f"no block span for group {group.name!r}")
        spans[group.name].check_covers(
            ranges[group.name], spec.tokens_per_block, group=group.name, side="source"
        )
        if pool.dim() != 6 or pool.shape[0] != group.num_layers:
            raise ValueError(
                f"pool of group {group.name!r}: expected a 6-D view with "
                f"{group.num_layers} layers, got shape {tuple(pool.shape)}"
            )
    cache = cu.DynamicCache(config=text)
    for group in spec.groups:
        if group.is_state:
            layout = state_layout(text)
            pool = pools[group.name]
            for local, layer in enumerate(group.layer_ids):
                conv, rec = layout.unpack(pool[local, state_slots[group.name]], pool.dtype)
                _fill_state_layer(cache.layers[layer], conv, rec)
            continue
        rng = ranges[group.name]
        packed = kernels.gather(pools[group.name], spans[group.name], rng, backend=backend)
        for local, layer in enumerate(group.layer_ids):
            # [kv, T, H, D] -> K, V as [1, H, T, D] contiguous (what torch.cat would produce).
            kv = packed[local].transpose(1, 2).unsqueeze(1)
            _fill_layer(
                cache.layers[layer], kv[0].contiguous(), kv[1].contiguous(), num_tokens, group.kind
            )
    return cache


# ------------------------------------------------------------------------------------------
# tiny seeded models (tests, notebooks, demos): real config classes, no downloads
# ------------------------------------------------------------------------------------------

#: Model families :func:`tiny_model` builds (the chat demo's choices).
TINY_MODELS: tuple[str, ...] = ("gemma3", "gpt-oss", "mistral", "qwen3-next")

#: Further families :func:`tiny_model` builds when the installed transformers has them.
TINY_EXTRA_MODELS: tuple[str, ...] = ("gemma4",)


def tiny_config(kind: str, *, window: int = 6, attn_implementation: str = "eager") -> Any:
    """A small real ``transformers`` config: 4-6 layers, hidden 32, 2 kv heads x 8, vocab 96.

    * ``"gemma3"``: ``Gemma3TextConfig``, layers sliding, sliding, full, sliding, sliding, full;
    * ``"gpt-oss"``: ``GptOssConfig``, sliding/full alternating (4 layers), 4 experts, top-2;
    * ``"mistral"``: ``MistralConfig`` with ``sliding_window`` (every layer slides, 3 layers);
    * ``"qwen3-next"``: ``Qwen3NextConfig``, 3 gated-DeltaNet layers then 1 full attention
      (4 value / 2 key heads x 8, conv width 4), 4 experts, top-2 (``window`` is unused);
    * ``"gemma4"``: ``Gemma4TextConfig`` laid out as ``"gemma3"``, whose full-attention
      layers override the global shape per layer (``per_layer_config``: 1 kv head x 16, as
      Gemma 4's global layers use a wider head_dim), so groups differ in shape.
    """
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=96,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=window,
        attn_implementation=attn_implementation,
        max_position_embeddings=512,
        initializer_range=0.2,
    )
    if kind == "gemma3":
        types = [
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ]
        return tf.Gemma3TextConfig(
            intermediate_size=64,
            num_hidden_layers=len(types),
            layer_types=types,
            query_pre_attn_scalar=8,
            **common,
        )
    if kind == "gpt-oss":
        common["max_position_embeddings"] = 131072  # = yarn factor 32 x original 4096
        return tf.GptOssConfig(
            intermediate_size=32,
            num_hidden_layers=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            **common,
        )
    if kind == "mistral":
        return tf.MistralConfig(intermediate_size=64, num_hidden_layers=3, **common)
    if kind == "gemma4":
        if not hasattr(tf, "Gemma4TextConfig"):
            raise ValueError(f"transformers {tf.__version__} has no Gemma4TextConfig")
        types = ["sliding_attention", "sliding_attention", "full_attention"] * 2
        wide = {"head_dim": 16, "num_key_value_heads": 1}
        return tf.Gemma4TextConfig(
            intermediate_size=64,
            num_hidden_layers=len(types),
            layer_types=types,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=96,
            per_layer_config={str(i): dict(wide) for i, t in enumerate(types) if t[0] == "f"},
            **common,
        )
    if kind == "qwen3-next":
        del common["sliding_window"]
        return tf.Qwen3NextConfig(
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_hidden_layers=4,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
            num_experts=4,
            num_experts_per_tok=2,
            **common,
        )
    raise ValueError(
        f"unknown tiny model {kind!r}; expected one of {TINY_MODELS + TINY_EXTRA_MODELS}"
    )


def tiny_model(
    kind: str, *, seed: int = 0, window: int = 6, attn_implementation: str = "eager"
) -> Any:
    """A randomly initialised float32 causal LM from :func:`tiny_config`, in eval mode.

    Weights come from ``torch.manual_seed(seed)`` then the model's own init, so the same
    ``(kind, seed, window)`` gives the same model in every process.
    """
    import torch
    import transformers as tf

    config = tiny_config(kind, window=window, attn_implementation=attn_implementation)
    classes = {
        "gemma3": tf.Gemma3ForCausalLM,
        "gpt-oss": tf.GptOssForCausalLM,
        "mistral": tf.MistralForCausalLM,
        "qwen3-next": tf.Qwen3NextForCausalLM,
        "gemma4": getattr(tf, "Gemma4ForCausalLM", None),
    }
    torch.manual_seed(seed)
    model = classes[kind](config)
    return model.to(torch.float32).eval()
