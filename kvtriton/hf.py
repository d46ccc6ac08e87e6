"""A :class:`~kvtriton.spec.KVCacheSpec` from a Hugging Face ``transformers`` model config.

(Over 600 lines on purpose: one job, but most of it is the table of per-family config
conventions and the messages naming why a layer cannot be mapped, which read best together.)

No network and no weights: the input is a config object, a plain dict, a local
``config.json`` (or a directory holding one), a Hugging Face Hub id (``"org/name"``) whose
``config.json`` the local Hugging Face cache already holds (read offline, never downloaded),
or the name of a ``transformers`` config class (instantiated with its defaults, e.g.
``"Gemma3TextConfig"``) or ``model_type`` (``"gpt_oss"``).

A dict or ``config.json`` goes through its ``transformers`` config class
(``CONFIG_MAPPING[model_type].from_dict``), which fills every field the file leaves to the
class defaults, a multimodal checkpoint's nested ``text_config`` included. A flat
``config.json`` that sets every field the mapping reads (see ``_JSON_FAMILIES``: Llama,
Mistral, Qwen2/3, GPT-OSS, Gemma-2/3 ... with heads, head_dim and the layer layout given) is
read alone, without importing ``transformers`` (and torch): about 0.2 s instead of 5 s.
Without ``transformers`` installed, a dict is read as is.

Fields are checked before use: a size that is zero, not an int or past kvtriton's bounds
(``num_hidden_layers <= 4096``, heads and head_dim ``<= 65536``, windows ``<= 2**40``), a
flag that is not a bool, or an ``overrides`` key that neither the config nor its class has
(:class:`UnknownFieldError`, with the closest field names) is a ``ValueError`` naming the
field and the expected value. A spec built from a class's defaults whose KV shape is a
preset's is named after it, e.g. ``"gpt_oss (gpt-oss-120b)"``.

Mapping (per decoder layer ``i``, in this order of precedence):

* ``layer_types[i]`` (or the older ``layers_block_type``): ``full_attention`` -> full,
  ``sliding_attention`` -> sliding, ``linear_attention`` / ``mamba`` -> state,
  ``mlp`` / ``moe`` (no token mixer) -> attention-free (no group);
* without ``layer_types``: Jamba's ``attn_layer_period`` / ``attn_layer_offset`` (attention iff
  ``i % period == offset``, else Mamba), Bamba's ``attn_layer_indices``, Qwen3-Next's
  ``full_attention_interval``, Mamba / Mamba-2 models (all state), Gemma-2 (even layers
  sliding), ``sliding_window_pattern = N`` (Gemma-3 / Cohere-2 / EXAONE-4: layer ``i`` is
  sliding iff ``(i + 1) % N != 0``), Qwen2-style ``use_sliding_window`` +
  ``max_window_layers`` (layers ``i >= max_window_layers`` slide), and finally Mistral's
  convention: a non-null global ``sliding_window`` makes **every** layer sliding;
* the last ``num_kv_shared_layers`` layers (Gemma-3n / Gemma-4) reuse an earlier layer's KV
  and hold no cache of their own: attention-free here.

Shapes: ``num_key_value_heads`` (default ``num_attention_heads``) x ``head_dim`` (default
``hidden_size // num_attention_heads``), per-layer ``per_layer_config`` overrides of
``head_dim`` / ``num_key_value_heads`` / ``sliding_window`` honoured. MLA (DeepSeek-V2/V3,
``kv_lora_rank`` set): one latent of ``kv_lora_rank + qk_rope_head_dim`` elements, 1 head,
``kv_factor = 1``, group name ``"mla"``. The multi-token-prediction layers
(``num_nextn_predict_layers``) are not decoder layers of the config and are left out.

**Sliding windows.** ``transformers`` masks a sliding layer with
``kv_idx > q_idx - sliding_window`` (``masking_utils.sliding_window_overlay``; the
flash-attention path uses ``window_size=(W - 1, W - 1)``): a query at ``q`` attends the
``W`` keys ``(q - W, q]``, itself included. That is exactly kvtriton's window ``W``
(DESIGN.md §1), so ``sliding_window`` is taken as is for every causal model, Gemma-2/3 and
GPT-OSS included (their original reference code also keeps ``W`` keys). Mistral's original
``mistral-src`` reference mask kept ``W + 1`` keys (``[q - W, q]``); transformers (and
kvtriton) use ``W``. ``use_bidirectional_attention`` (EmbeddingGemma, PaliGemma's prefix-LM)
is refused: a position's KV then depends on later prompt tokens, so prefixes cannot be reused.
Multimodal configs map through their text (decoder) config; encoders, encoder-decoders and
models transformers cannot generate text with are refused with the reason.

**State groups** hold one state per request and layer, ``state_shape[0]`` = the heads (or
channels) tensor parallelism splits. The convolution state is folded into the same tensor as
extra elements per head so that one state tensor per layer moves whole (pass
``include_conv_state=False`` for the recurrent state alone). The conv state is the
``d_conv - 1`` previous inputs (vLLM's convention; ``transformers`` keeps ``d_conv`` slots):

* gated DeltaNet / KDA (Qwen3-Next, Qwen3.5, Kimi-Linear): ``(Hv, Dk*Dv + C)`` with
  ``C = (2*Hk*Dk + Hv*Dv) * (K - 1) / Hv`` (the q, k, v conv channels apportioned evenly over
  the ``Hv`` value heads);
* Mamba-2 (Bamba, Granite-4 hybrid, Nemotron-H, Mamba2): ``(H, P*N + C)`` with
  ``C = (H*P + 2*G*N) * (K - 1) / H`` (``H`` heads of ``P`` dims, ``N`` state size,
  ``G`` groups). Exact for the model; under TP, vLLM replicates B/C groups when ``G < tp``,
  so per-rank state bytes are then slightly under-counted;
* Mamba-1 (Jamba, Mamba): ``(E, N + K - 1)`` with ``E = expand * hidden_size`` channels.

The state dtype is ``state_dtype`` if given, else the config's ``mamba_ssm_cache_dtype``,
else the spec's dtype. The spec dtype is ``dtype`` if given, else the config's ``dtype`` /
``torch_dtype``, else ``bfloat16``.

Groups come in the order full (or ``mla``), sliding by increasing window, state; names are
``"full"``, ``f"sliding{W}"``, ``"state"`` (with a ``_{heads}x{head_dim}`` suffix only if one
kind holds layers of different shapes).
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvtriton.ranges import MAX_TOKENS
from kvtriton.spec import (
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_LAYERS,
    PRESETS,
    GroupKind,
    KVCacheSpec,
    LayerGroup,
    canonical_dtype,
    preset,
)

__all__ = [
    "HF_CONFIG_CHOICES",
    "UnknownFieldError",
    "check_config_fields",
    "hf_config_choices",
    "hf_layer_kinds",
    "layer_attention_shapes",
    "spec_from_hf_config",
]

#: ``hidden_size`` at most this (it only derives a missing head_dim or Mamba-1 channels)
MAX_HIDDEN_SIZE = 2**20

#: Config classes the CLI offers (each is mapped in tests/test_hf.py with its defaults).
HF_CONFIG_CHOICES: tuple[str, ...] = (
    "BambaConfig",
    "Cohere2Config",
    "DeepseekV2Config",
    "DeepseekV3Config",
    "Exaone4Config",
    "Gemma2Config",
    "Gemma3Config",
    "Gemma3TextConfig",
    "GptOssConfig",
    "GraniteMoeHybridConfig",
    "JambaConfig",
    "LlamaConfig",
    "Mamba2Config",
    "MambaConfig",
    "MistralConfig",
    "MixtralConfig",
    "NemotronHConfig",
    "Olmo3Config",
    "Phi3Config",
    "Qwen2Config",
    "Qwen3Config",
    "Qwen3NextConfig",
)

_FULL, _SLIDING, _STATE, _NONE = GroupKind.FULL, GroupKind.SLIDING, GroupKind.STATE, None
#: a chunked-attention layer mapped to a window of ``attention_chunk_size`` (not a GroupKind)
_CHUNKED = "chunked"
#: group order in a spec made from a config: full attention, sliding windows, states
_KIND_ORDER = {GroupKind.FULL: 0, GroupKind.SLIDING: 1, GroupKind.STATE: 2}

_LAYER_TYPE_KINDS: dict[str, GroupKind | None] = {
    "full_attention": _FULL,
    "attention": _FULL,
    "global": _FULL,
    "sliding_attention": _SLIDING,
    "local": _SLIDING,
    "linear_attention": _STATE,
    "mamba": _STATE,
    "mamba2": _STATE,
    "mlp": _NONE,
    "moe": _NONE,
    "dense": _NONE,
    "sparse": _NONE,
}

_UNSUPPORTED_LAYER_TYPES: dict[str, str] = {
    "chunked_attention": "chunked attention (a query attends its own chunk only) is not a "
    "sliding window; pass chunked_as_sliding=True to map it to a window of "
    "attention_chunk_size (an over-estimate of what is needed)",
    "hybrid": "a layer running attention and a recurrent state in parallel would need two "
    "groups for one layer id",
    "hybrid_sliding": "a layer running sliding attention and a recurrent state in parallel "
    "would need two groups for one layer id",
    "window_attention": "non-overlapping (ViT-style) windows are not causal decoder attention",
    "conv": "short-convolution layers (LFM2) have no mapping to a state shape yet",
}


def hf_config_choices() -> tuple[str, ...]:
    """Class names accepted by ``--hf-config`` that are known to map (tested with defaults).

    Any other ``transformers`` config class name, ``model_type`` or ``config.json`` path is
    also accepted by :func:`spec_from_hf_config`; it raises ``ValueError`` if it cannot map.
    """
    return HF_CONFIG_CHOICES


class _View:
    """Uniform read access to a config object or dict (``None`` for missing keys)."""

    def __init__(self, source: Any, label: str, parent: _View | None = None) -> None:
        self.source = source
        self.label = label
        self.parent = parent

    def _serialized(self) -> Mapping[str, Any]:
        if not hasattr(self, "_dict"):
            to_dict = getattr(self.source, "to_dict", None)
            self._dict: Mapping[str, Any] = to_dict() if callable(to_dict) else {}
        return self._dict

    def get(self, key: str, default: Any = None) -> Any:
        if isinstance(self.source, Mapping):
            value = self.source.get(key, default)
        elif key == "per_layer_config":  # the serialized form is a plain {layer: overrides}
            value = self._serialized().get(key, default)
        else:
            try:
                value = getattr(self.source, key)
            except Exception:
                # Missing, or a per-layer attribute that transformers refuses to read globally
                # (heterogeneous configs): the serialized global value, overridden per layer.
                value = self._serialized().get(key, default)
        return default if value is None else value

    def has(self, key: str) -> bool:
        if isinstance(self.source, Mapping):
            return key in self.source
        try:
            getattr(self.source, key)
        except Exception:
            return key in self._serialized()
        return True

    @property
    def model_type(self) -> str:
        return str(self.get("model_type", "") or "")


# -- field validation ------------------------------------------------------------------------

#: Config fields kvtriton reads whose value must be an int in ``[low, high]`` when set (not
#: null): a zero, a string or a huge number names the field instead of being skipped.
_INT_FIELDS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, MAX_HEADS),
    "num_key_value_heads": (1, MAX_HEADS),
    "head_dim": (1, MAX_HEAD_DIM),
    "hidden_size": (1, MAX_HIDDEN_SIZE),
    "sliding_window": (1, MAX_TOKENS),
    "sliding_window_pattern": (1, MAX_LAYERS),
    "_sliding_window_pattern": (1, MAX_LAYERS),
    "attention_chunk_size": (1, MAX_TOKENS),
    "full_attention_interval": (1, MAX_LAYERS),
    "attn_layer_period": (1, MAX_LAYERS),
    "attn_layer_offset": (0, MAX_LAYERS - 1),
    "max_window_layers": (0, MAX_LAYERS),
    "num_kv_shared_layers": (0, MAX_LAYERS),
    "kv_lora_rank": (0, MAX_HEAD_DIM),
    "qk_rope_head_dim": (0, MAX_HEAD_DIM),
    "linear_num_value_heads": (1, MAX_HEADS),
    "linear_num_key_heads": (1, MAX_HEADS),
    "linear_num_heads": (1, MAX_HEADS),
    "linear_key_head_dim": (1, MAX_HEAD_DIM),
    "linear_value_head_dim": (1, MAX_HEAD_DIM),
    "linear_head_dim": (1, MAX_HEAD_DIM),
    "linear_conv_kernel_dim": (1, 1024),
    "mamba_n_heads": (1, MAX_HEADS),
    "mamba_num_heads": (1, MAX_HEADS),
    "mamba_d_state": (1, MAX_HEAD_DIM),
    "ssm_state_size": (1, MAX_HEAD_DIM),
    "state_size": (1, MAX_HEAD_DIM),
    "mamba_n_groups": (1, MAX_HEADS),
    "n_groups": (1, MAX_HEADS),
    "mamba_d_conv": (1, 1024),
    "conv_kernel": (1, 1024),
}
#: fields that must be true/false when set
_BOOL_FIELDS = ("use_sliding_window", "use_bidirectional_attention", "is_encoder_decoder")
#: fields that may also take the string "auto" (Granite-4 hybrid: mamba_d_head = "auto")
_AUTO_FIELDS = {"mamba_d_head": (1, MAX_HEAD_DIM), "mamba_head_dim": (1, MAX_HEAD_DIM)}
#: Every field this module reads (a --hf-set key outside these and the config's own fields is
#: looked up in the config class before it is called unknown).
_READ_FIELDS = frozenset(
    {
        *_INT_FIELDS,
        *_BOOL_FIELDS,
        *_AUTO_FIELDS,
        "layer_types",
        "layers_block_type",
        "attn_layer_indices",
        "per_layer_config",
        "model_type",
        "dtype",
        "torch_dtype",
        "mamba_ssm_cache_dtype",
        "mamba_expand",
        "expand",
        "is_decoder",
        "text_config",
        "num_heads",
    }
)


def _expected(low: int, high: int) -> str:
    return f"an int in [{low}, {high:,}]"


def check_config_fields(fields: Mapping[str, Any], where: str) -> None:
    """``ValueError`` naming the first field of ``fields`` (a config dict, overrides or one
    layer's ``per_layer_config`` entry) whose value is not what a KV-cache spec can use:
    a non-int, zero or out-of-bounds size, a non-bool flag, a ``layer_types`` that is not a
    list of strings. Missing and null fields are left to the defaults."""
    for key, (low, high) in {**_INT_FIELDS, **_AUTO_FIELDS}.items():
        value = fields.get(key)
        if value is None or (key in _AUTO_FIELDS and value == "auto"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{where}: {key} must be {_expected(low, high)}, got {value!r}")
    for key in _BOOL_FIELDS:
        value = fields.get(key)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
    for key in ("layer_types", "layers_block_type"):
        value = fields.get(key)
        if value is None:
            continue
        if (
            isinstance(value, (str, bytes, Mapping))
            or not isinstance(value, Sequence)
            or not all(isinstance(t, str) for t in value)
        ):
            raise ValueError(f"{where}: {key} must be a list of layer type strings, got {value!r}")
        if len(value) > MAX_LAYERS:
            raise ValueError(
                f"{where}: {key} has {len(value):,} entries (kvtriton's bound: {MAX_LAYERS} layers)"
            )
    per_layer = fields.get("per_layer_config")
    if isinstance(per_layer, Mapping):
        for layer, layer_fields in per_layer.items():
            if isinstance(layer_fields, Mapping):
                check_config_fields(layer_fields, f"{where}: per_layer_config[{layer!r}]")


# -- loading ---------------------------------------------------------------------------------

#: Fields from which a config class derives ``layer_types``: overriding one of them (and not
#: ``layer_types`` itself) drops a stale ``layer_types`` of a dict or config.json.
_LAYOUT_FIELDS = frozenset(
    {
        "num_hidden_layers",
        "sliding_window_pattern",
        "_sliding_window_pattern",
        "full_attention_interval",
        "max_window_layers",
        "use_sliding_window",
        "attn_layer_period",
        "attn_layer_offset",
        "attn_layer_indices",
    }
)

#: Families whose flat ``config.json`` answers alone (no ``transformers`` import) when it sets
#: the fields below: model_type -> (the class derives a missing head_dim as
#: hidden_size // num_attention_heads, alternative sets of layout fields one of which must be
#: set). Other configs, and these when a field is missing, go through the config class, which
#: fills the defaults. tests/test_hf.py checks each entry against its config class.
_JSON_FAMILIES: dict[str, tuple[bool, tuple[tuple[str, ...], ...]]] = {
    "llama": (True, ((),)),
    "mistral": (True, (("layer_types",), ("sliding_window",))),
    "mixtral": (True, (("layer_types",), ("sliding_window",))),
    "phi3": (True, (("sliding_window",),)),
    "qwen2": (
        True,
        (("layer_types",), ("use_sliding_window", "sliding_window", "max_window_layers")),
    ),
    "qwen3": (
        False,
        (("layer_types",), ("use_sliding_window", "sliding_window", "max_window_layers")),
    ),
    "gpt_oss": (False, (("layer_types", "sliding_window"),)),
    "gemma2": (False, (("layer_types", "sliding_window"), ("sliding_window",))),
    "gemma3_text": (
        False,
        (("layer_types", "sliding_window"), ("sliding_window_pattern", "sliding_window")),
    ),
    "cohere2": (False, (("layer_types", "sliding_window"),)),
    "olmo3": (True, (("layer_types", "sliding_window"),)),
}


def _json_answers(data: Mapping[str, Any]) -> bool:
    """Whether a flat config dict alone gives the spec its config class would (see
    :data:`_JSON_FAMILIES`): no ``transformers`` import needed."""
    family = _JSON_FAMILIES.get(str(data.get("model_type")))
    if family is None or "text_config" in data or "per_layer_config" in data:
        return False
    derived_head_dim, layouts = family

    def present(key: str) -> bool:
        return key in data and (data[key] is not None or key == "sliding_window")

    base = ["num_hidden_layers", "num_attention_heads", "num_key_value_heads"]
    base += ["hidden_size"] if derived_head_dim and data.get("head_dim") is None else ["head_dim"]
    if not all(present(k) for k in base):
        return False
    if not any(all(present(k) for k in keys) for keys in layouts):
        return False
    types = data.get("layer_types")
    if types is not None:
        if len(types) != data["num_hidden_layers"]:
            return False  # let the class (or the mapping) say what is wrong
        if any(_LAYER_TYPE_KINDS.get(t, _CHUNKED) not in (_FULL, _SLIDING, _NONE) for t in types):
            return False
    return True


def _hf_cache_dir() -> str | None:
    """The Hugging Face hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``; None: the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


def _hub_config(repo_id: str) -> Path:
    """The cached ``config.json`` of Hub model ``repo_id`` (``org/name``), found offline in
    the local Hugging Face cache; ``ValueError`` saying how to get it otherwise."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise ValueError(
            f"{repo_id!r} is not a local file; reading it as a Hugging Face Hub id needs "
            "huggingface_hub (pip install 'kvtriton[hf]')"
        ) from None
    cache = _hf_cache_dir()
    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)
    except Exception as exc:  # an invalid repo id
        raise ValueError(f"{repo_id!r} is not a local file nor a Hub model id: {exc}") from None
    if not isinstance(found, str):
        where = cache or "the default Hugging Face cache (~/.cache/huggingface/hub)"
        raise ValueError(
            f"{repo_id!r} is not a local file, and as a Hugging Face Hub id it is not in "
            f"{where}; kvtriton never downloads: fetch it first (e.g. "
            f"`hf download {repo_id} config.json`) or pass the path of a config.json"
        )
    return Path(found)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {str(path)!r} as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


class UnknownFieldError(ValueError):
    """An override names a field that the config does not have (``key`` is the field)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _unknown_field(key: str, known: set[str], owner: str) -> UnknownFieldError:
    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.75)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return UnknownFieldError(key, f"{owner} has no field {key!r}{hint}")


def _class_fields(cls: Any) -> set[str]:
    """The field names a transformers config class knows (its defaults, __init__ parameters,
    attribute aliases and sub-configs)."""
    names: set[str] = set(getattr(cls, "attribute_map", {}) or {})
    names |= set(getattr(cls, "sub_configs", {}) or {})
    try:
        names |= set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    except (TypeError, ValueError):
        pass
    try:
        names |= set(cls().to_dict())
    except Exception:
        pass
    for sub in (getattr(cls, "sub_configs", {}) or {}).values():
        if isinstance(sub, type):
            names |= _class_fields(sub)
    return names


def _config_class(model_type: Any) -> Any:
    """The transformers config class of ``model_type``; None without transformers or when
    transformers does not know it."""
    if not isinstance(model_type, str) or not model_type:
        return None
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        return None
    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        return None


def _check_override_keys(
    overrides: Mapping[str, Any], known: set[str], cls: Any, owner: str
) -> None:
    """``UnknownFieldError`` for an override key that neither the config nor its class has."""
    for key in overrides:
        if key in known or key in _READ_FIELDS:
            continue
        if cls is None:
            raise _unknown_field(key, known | _READ_FIELDS, owner)
        fields = _class_fields(cls)
        if key not in fields:
            raise _unknown_field(key, fields | known, owner)


def _apply_overrides(
    data: dict[str, Any], overrides: Mapping[str, Any], label: str
) -> dict[str, Any]:
    """``data`` with ``overrides`` applied to its text part (checked: known keys, valid values);
    a ``layer_types`` that an overridden layout field made stale is dropped (the config class
    or the conventions of this module derive it again)."""
    nested = isinstance(data.get("text_config"), Mapping)
    text = dict(data["text_config"]) if nested else dict(data)
    cls = _config_class(text.get("model_type") or (None if nested else data.get("model_type")))
    owner = f"{label} ({cls.__name__})" if cls is not None else label
    _check_override_keys(overrides, set(text), cls, owner)
    if "layer_types" in text and "layer_types" not in overrides and _LAYOUT_FIELDS & set(overrides):
        del text["layer_types"]
    text.update(overrides)
    if nested:
        return {**data, "text_config": text}
    return text


def _from_dict(data: dict[str, Any], label: str) -> Any:
    """A flat dict that answers alone as is; else the config class's object built from it
    (``from_dict`` fills the fields the dict leaves to the class defaults, nested
    ``text_config`` included); the dict itself without transformers or an unknown type."""
    check_config_fields(data, label)
    if isinstance(data.get("text_config"), Mapping):
        check_config_fields(data["text_config"], f"{label}: text_config")
    if _json_answers(data):
        return data
    cls = _config_class(data.get("model_type"))
    if cls is None:
        return data
    decode = getattr(cls, "_decode_special_floats", None)  # {"__float__": "Infinity"} -> inf
    try:
        return cls.from_dict(decode(data) if callable(decode) else data)
    except Exception as exc:  # transformers validates fields with its own exception types
        raise ValueError(f"{label}: {cls.__name__} rejects this config: {exc}") from None


def _load(config_or_path: Any, overrides: Mapping[str, Any] | None = None) -> tuple[Any, str, bool]:
    """The config source (object or dict), a default spec name and whether that name is
    generic (a model_type, not a directory), ``overrides`` applied."""
    if overrides is not None and (
        not isinstance(overrides, Mapping) or not all(isinstance(k, str) for k in overrides)
    ):
        raise TypeError(f"overrides must map field names to values, got {overrides!r}")
    overrides = dict(overrides or {})
    if overrides:
        check_config_fields(overrides, "overrides")
    if isinstance(config_or_path, Mapping):
        data, name, generic = dict(config_or_path), None, True
    elif isinstance(config_or_path, (str, os.PathLike)):
        text = os.fspath(config_or_path)
        path = Path(text).expanduser()
        if path.is_dir():
            path = path / "config.json"
            if not path.is_file():
                raise ValueError(f"directory {text!r} holds no config.json")
        if path.is_file():
            data = _read_json(path)
            name = path.parent.name if path.name == "config.json" else path.stem
            generic = not name
        elif _HUB_ID.fullmatch(text) and not text.endswith(".json"):
            data = _read_json(_hub_config(text))
            name, generic = text.rsplit("/", 1)[-1], False
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", text):
            source, model_type = _from_transformers_name(text, overrides)
            return source, model_type, True
        else:
            raise ValueError(
                f"{text!r} is neither a config.json file, a directory holding one, a "
                "Hugging Face Hub id in the local cache (org/name), nor a transformers config "
                "class name or model_type"
            )
    elif hasattr(config_or_path, "to_dict") or hasattr(config_or_path, "model_type"):
        if not overrides:
            name = str(getattr(config_or_path, "model_type", "") or "hf-config")
            return config_or_path, name, True
        data, name, generic = config_or_path.to_dict(), None, True
    else:
        raise TypeError(
            "spec_from_hf_config takes a transformers config object, a dict, a config.json "
            f"path, a Hub id or a config class name, got {type(config_or_path).__name__}"
        )
    if not isinstance(data.get("model_type", ""), str):
        raise ValueError(f"model_type must be a string, got {data['model_type']!r}")
    if name is None:
        name = str(data.get("model_type") or "hf-config")
    label = f"config {name!r}"
    if overrides:
        data = _apply_overrides(data, overrides, label)
    return _from_dict(data, label), name, generic


def _from_transformers_name(text: str, overrides: dict[str, Any]) -> tuple[Any, str]:
    try:
        import transformers
    except ImportError:
        raise ValueError(
            f"{text!r} is not a file; a config class name or model_type needs transformers "
            "(pip install 'kvtriton[hf]')"
        ) from None
    base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
    cls = getattr(transformers, text, None)
    if not (isinstance(cls, type) and issubclass(cls, base) and cls is not base):
        cls = _config_class(text)
        if cls is None:
            raise ValueError(
                f"{text!r} is not a file, nor a transformers config class (e.g. "
                f"'Gemma3TextConfig') nor a model_type (e.g. 'gpt_oss') known to transformers "
                f"{transformers.__version__}; known to map: {', '.join(HF_CONFIG_CHOICES)}"
            )
    _check_override_keys(overrides, set(), cls, cls.__name__)
    kwargs: dict[str, Any] = dict(overrides)
    subs = getattr(cls, "sub_configs", {}) or {}
    if "text_config" in subs:  # a multimodal class: the overrides edit its text config
        top = set(inspect.signature(cls.__init__).parameters)
        text_kwargs = {k: v for k, v in kwargs.items() if k not in top}
        kwargs = {k: v for k, v in kwargs.items() if k in top}
        if text_kwargs:
            kwargs["text_config"] = text_kwargs
    try:
        config = cls(**kwargs)
    except Exception as exc:  # transformers validates fields with its own exception types
        raise ValueError(f"{cls.__name__} rejects the overrides {overrides}: {exc}") from None
    return config, str(getattr(config, "model_type", "") or text)


def _text_view(source: Any, label: str) -> _View:
    """The decoder (text) part of a config, refusing encoders and non-generative configs."""
    top = _View(source, label)
    if top.get("is_encoder_decoder", False):
        raise ValueError(
            f"{label}: encoder-decoder models (model_type {top.model_type!r}) are not supported: "
            "kvtriton maps decoder-only KV caches (self-attention of a causal LM)"
        )
    text: Any = None
    if isinstance(source, Mapping):
        if isinstance(source.get("text_config"), Mapping):
            text = source["text_config"]
    elif hasattr(source, "get_text_config"):
        candidate = source.get_text_config(decoder=True)
        if candidate is not source:
            text = candidate
    _check_generative(top, label)
    view = _View(text, label, parent=top) if text is not None else top
    if not isinstance(view.source, Mapping):  # a config object: its fields, as serialized
        check_config_fields(view._serialized(), label)
    _check_causal(view, label)
    return view


def _generative_types() -> tuple[set[str], set[str], set[str]] | None:
    """(causal LM, generative multimodal, masked LM) model types, or None without transformers."""
    try:
        from transformers.models.auto import modeling_auto as auto
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return None
    causal = set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    multimodal: set[str] = set()
    for table in (
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
        "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    ):
        multimodal |= set(getattr(auto, table, {}))
    known = set(CONFIG_MAPPING_NAMES)
    return causal | multimodal, known, set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def _check_generative(top: _View, label: str) -> None:
    """Refuse a top-level config that transformers knows and cannot generate text with."""
    model_type = top.model_type
    if not model_type or model_type in _JSON_FAMILIES:  # causal LMs (no transformers import)
        return
    types = _generative_types()
    if types is None:
        return
    generative, known, _ = types
    if model_type in known and model_type not in generative:
        raise ValueError(
            f"{label}: model_type {model_type!r} is not a generative language model "
            "(transformers has no *ForCausalLM / image-text-to-text model for it); "
            "kvtriton maps decoder KV caches"
        )


def _check_causal(view: _View, label: str) -> None:
    model_type = view.model_type
    if view.get("use_bidirectional_attention", False):
        raise ValueError(
            f"{label}: use_bidirectional_attention=True ({model_type!r} as an encoder or a "
            "prefix-LM): a position's KV depends on later prompt tokens, so there is no causal "
            "prefix cache to reuse"
        )
    types = None if model_type in _JSON_FAMILIES else _generative_types()
    if types is not None and model_type in types[2] and not view.get("is_decoder", False):
        raise ValueError(
            f"{label}: model_type {model_type!r} is a bidirectional encoder (masked-LM "
            "family, is_decoder=False): it has no decode-time KV cache; kvtriton maps "
            "causal decoder configs (e.g. LlamaConfig, GptOssConfig)"
        )
    if (
        not view.get("num_hidden_layers")
        and not view.get("layer_types")
        and not view.get("layers_block_type")
    ):
        raise ValueError(
            f"{label}: no num_hidden_layers / layer_types: not a decoder language-model config"
        )


def _kind_of(layer_type: Any, label: str, chunked_as_sliding: bool) -> GroupKind | str | None:
    text = str(layer_type)
    if text in _LAYER_TYPE_KINDS:
        return _LAYER_TYPE_KINDS[text]
    if text == "chunked_attention" and chunked_as_sliding:
        return _CHUNKED
    why = _UNSUPPORTED_LAYER_TYPES.get(text, "unknown layer type")
    raise ValueError(f"{label}: cannot map layer type {text!r}: {why}")


def hf_layer_kinds(
    config_or_path: Any, *, chunked_as_sliding: bool = False
) -> list[GroupKind | None]:
    """Per decoder layer: a :class:`~kvtriton.spec.GroupKind` (``"full"``, ``"sliding"``,
    ``"state"``) or ``None`` (no KV, no state).

    Applies the precedence rules of this module's docstring; a chunked-attention layer reads
    ``"sliding"`` when ``chunked_as_sliding`` (else ``ValueError``).
    """
    source, name, _ = _load(config_or_path)
    view = _text_view(source, _label(source, name))
    kinds = _layer_kinds(view, view.label, chunked_as_sliding)
    return [_SLIDING if k == _CHUNKED else k for k in kinds]  # type: ignore[misc]


def _label(source: Any, name: str) -> str:
    if isinstance(source, Mapping):
        return f"config {name!r}"
    return type(source).__name__


def _int(view: _View, key: str, label: str, value: Any = None, where: str = "") -> int:
    """``view``'s ``key`` (or ``value`` read from ``where``) as an int inside its bounds."""
    value = view.get(key) if value is None else value
    low, high = _INT_FIELDS.get(key, (1, MAX_TOKENS))
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{label}: {where}{key} must be {_expected(low, high)}, got {value!r}")
    return value


def _layer_kinds(view: _View, label: str, chunked_as_sliding: bool) -> list[GroupKind | str | None]:
    types = view.get("layer_types") or view.get("layers_block_type")
    n_cfg = view.get("num_hidden_layers")
    if types is not None and not isinstance(types, str) and isinstance(types, Sequence):
        kinds = [_kind_of(t, label, chunked_as_sliding) for t in types]
        if n_cfg is not None and n_cfg != len(kinds) and not view.has("layers_block_type"):
            raise ValueError(
                f"{label}: num_hidden_layers={n_cfg} but layer_types has {len(kinds)} entries"
            )
    else:
        n = _int(view, "num_hidden_layers", label)
        kinds = _derived_kinds(view, n, label)
    shared = view.get("num_kv_shared_layers", 0) or 0
    if shared:
        if not 0 < shared <= len(kinds):
            raise ValueError(f"{label}: num_kv_shared_layers={shared} outside [0, {len(kinds)}]")
        kinds[len(kinds) - shared :] = [_NONE] * shared
    return kinds


def _derived_kinds(view: _View, n: int, label: str) -> list[GroupKind | str | None]:
    model_type = view.model_type
    period, offset = view.get("attn_layer_period"), view.get("attn_layer_offset")
    if period is not None and offset is not None:  # Jamba
        return [_FULL if i % period == offset else _STATE for i in range(n)]
    if model_type == "bamba" or view.has("attn_layer_indices"):
        indices = set(view.get("attn_layer_indices") or ())
        return [_FULL if i in indices else _STATE for i in range(n)]
    interval = view.get("full_attention_interval")
    if interval:  # Qwen3-Next before layer_types
        return [_FULL if (i + 1) % interval == 0 else _STATE for i in range(n)]
    if model_type in ("mamba", "mamba2", "falcon_mamba"):
        return [_STATE] * n
    window = view.get("sliding_window")
    pattern = view.get("sliding_window_pattern") or view.get("_sliding_window_pattern")
    if model_type == "gemma2":
        return [_SLIDING if i % 2 == 0 else _FULL for i in range(n)]
    if pattern and window is not None:
        return [_SLIDING if (i + 1) % pattern else _FULL for i in range(n)]
    if view.has("use_sliding_window"):  # Qwen2 / Qwen3 convention
        if not view.get("use_sliding_window", False) or window is None:
            return [_FULL] * n
        first = view.get("max_window_layers", 0)
        return [_SLIDING if i >= first else _FULL for i in range(n)]
    if window is not None:  # Mistral convention: one global window for every layer
        return [_SLIDING] * n
    return [_FULL] * n


def _attention_shape(view: _View, layer: int, label: str) -> tuple[int, int, int]:
    """``(num_kv_heads, head_dim, kv_factor)`` of attention layer ``layer``."""
    rank = view.get("kv_lora_rank")
    if rank:
        rope = view.get("qk_rope_head_dim")
        if not isinstance(rope, int) or rope < 0:
            raise ValueError(f"{label}: MLA (kv_lora_rank={rank}) needs qk_rope_head_dim")
        return 1, rank + rope, 1
    override = _override(view, layer)
    # A layer's own value wins over the global one; a missing (null) value falls back, an
    # invalid one (0, a string) is an error naming the field.
    where = f"per_layer_config[{layer}]."
    if override.get("num_key_value_heads") is not None:
        heads = _int(view, "num_key_value_heads", label, override["num_key_value_heads"], where)
    elif view.get("num_key_value_heads") is not None:
        heads = _int(view, "num_key_value_heads", label)
    elif view.get("num_attention_heads") is not None:
        heads = _int(view, "num_attention_heads", label)
    else:
        raise ValueError(
            f"{label}: num_key_value_heads and num_attention_heads are both missing "
            "(expected an int >= 1)"
        )
    if override.get("head_dim") is not None:
        head_dim = _int(view, "head_dim", label, override["head_dim"], where)
    elif view.get("head_dim") is not None:
        head_dim = _int(view, "head_dim", label)
    else:
        hidden = _int(view, "hidden_size", label)
        q_heads = _int(view, "num_attention_heads", label)
        if hidden % q_heads:
            raise ValueError(
                f"{label}: head_dim unset and hidden_size {hidden} is not a multiple "
                f"of num_attention_heads {q_heads}"
            )
        head_dim = hidden // q_heads
    return heads, head_dim, 2


def _override(view: _View, layer: int) -> Mapping[str, Any]:
    per_layer = view.get("per_layer_config")
    if not isinstance(per_layer, Mapping):
        return {}
    for key, value in per_layer.items():
        try:
            if int(key) == layer and isinstance(value, Mapping):
                return value
        except (TypeError, ValueError):
            continue
    return {}


def _first(view: _View, *keys: str) -> Any:
    for key in keys:
        value = view.get(key)
        if value is not None:
            return value
    return None


def _state_shape(view: _View, label: str, include_conv: bool) -> tuple[int, ...]:
    """Per-layer state shape of a linear-attention / Mamba layer (see the module docstring)."""
    hv = _first(view, "linear_num_value_heads", "linear_num_heads")
    if hv is not None:  # gated DeltaNet / KDA
        hk = _first(view, "linear_num_key_heads", "linear_num_heads")
        dk = _first(view, "linear_key_head_dim", "linear_head_dim")
        dv = _first(view, "linear_value_head_dim", "linear_head_dim")
        kernel = _first(view, "linear_conv_kernel_dim")
        if None in (hk, dk, dv, kernel):
            raise ValueError(
                f"{label}: linear attention needs linear_num_key_heads, "
                "linear_key_head_dim, linear_value_head_dim, linear_conv_kernel_dim"
            )
        if not include_conv:
            return (hv, dk, dv)
        return (hv, dk * dv + _per_head(2 * hk * dk + hv * dv, kernel - 1, hv, label))
    heads = _first(view, "mamba_n_heads", "mamba_num_heads")
    if heads is None and view.model_type == "mamba2":
        heads = view.get("num_heads")
    d_state = _first(view, "mamba_d_state", "ssm_state_size", "state_size")
    d_conv = _first(view, "mamba_d_conv", "conv_kernel")
    if heads is not None:  # Mamba-2
        head_dim = _first(view, "mamba_d_head", "mamba_head_dim")
        if head_dim is None and view.model_type == "mamba2":
            head_dim = view.get("head_dim")
        groups = _first(view, "mamba_n_groups", "n_groups")
        if None in (head_dim, d_state, d_conv, groups) or head_dim == "auto":
            raise ValueError(
                f"{label}: Mamba-2 layers need head dim, state size, groups and "
                f"conv kernel (got {head_dim!r}, {d_state!r}, {groups!r}, {d_conv!r})"
            )
        if not include_conv:
            return (heads, head_dim * d_state)
        conv_dim = heads * head_dim + 2 * groups * d_state
        return (heads, head_dim * d_state + _per_head(conv_dim, d_conv - 1, heads, label))
    expand = _first(view, "mamba_expand", "expand")
    if d_state is not None and d_conv is not None and expand is not None:  # Mamba-1
        channels = int(expand * _int(view, "hidden_size", label))
        return (channels, d_state + (d_conv - 1 if include_conv else 0))
    raise ValueError(
        f"{label}: cannot determine the recurrent state shape of model_type {view.model_type!r} "
        "(expected linear_num_value_heads/... (gated DeltaNet), mamba_n_heads/... (Mamba-2) or "
        "mamba_d_state + mamba_expand + mamba_d_conv (Mamba-1))"
    )


def _per_head(channels: int, taps: int, heads: int, label: str) -> int:
    if channels * taps % heads:
        raise ValueError(
            f"{label}: {channels} conv channels x {taps} taps do not split evenly "
            f"over {heads} state heads; pass include_conv_state=False"
        )
    return channels * taps // heads


def _dtype_of(view: _View, dtype: Any) -> str:
    if dtype is not None:
        return canonical_dtype(dtype)
    for v in (view, view.parent):
        if v is None:
            continue
        keys = ("dtype", "torch_dtype") if isinstance(v.source, Mapping) else ("dtype",)
        value = _first(v, *keys)
        if value is not None and str(value) != "auto":
            return canonical_dtype(value)
    return "bfloat16"


def spec_from_hf_config(
    config_or_path: Any,
    *,
    tokens_per_block: int = 16,
    dtype: Any = None,
    name: str | None = None,
    state_dtype: Any = None,
    include_conv_state: bool = True,
    chunked_as_sliding: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> KVCacheSpec:
    """The KV-cache spec of a ``transformers`` model config (see the module docstring).

    Args:
        config_or_path: a config object, a dict, a ``config.json`` path or a directory holding
            one, or a ``transformers`` config class name / ``model_type``.
        tokens_per_block: positions per paged block.
        dtype: pool dtype (default: the config's ``dtype``/``torch_dtype``, else bfloat16).
        name: spec label (default: the config's directory name or ``model_type``).
        state_dtype: element dtype of state groups (default: ``mamba_ssm_cache_dtype`` if the
            config sets one, else the spec dtype).
        include_conv_state: fold the ``d_conv - 1`` convolution inputs into the state.
        chunked_as_sliding: map chunked attention (Llama-4) to a sliding window of
            ``attention_chunk_size`` keys (a superset of what a chunk needs) instead of failing.
        overrides: config fields to change first, e.g. ``{"sliding_window": 1024}``: a class
            name is instantiated with them (transformers recomputes derived fields such as
            ``layer_types``); a dict, ``config.json`` or config object is updated as a dict
            (a stale ``layer_types`` is not recomputed: override it too if needed).

    Raises:
        ValueError: the config is not a causal decoder or has a layer kvtriton cannot map
            (the message names the config, the field and why).
    """
    source, default_name, generic = _load(config_or_path, overrides)
    label = _label(source, default_name)
    view = _text_view(source, label)
    kinds = _layer_kinds(view, label, chunked_as_sliding)
    spec_dtype = _dtype_of(view, dtype)
    if state_dtype is None:
        cache_dtype = view.get("mamba_ssm_cache_dtype")
        state_dtype = cache_dtype if cache_dtype not in (None, "auto") else None
    state_dt = canonical_dtype(state_dtype) if state_dtype is not None else None

    # key -> layer ids; key = (order, kind, window, heads, head_dim, kv_factor, state_shape)
    buckets: dict[tuple[Any, ...], list[int]] = {}
    state_shape: tuple[int, ...] | None = None
    for layer, marker in enumerate(kinds):
        if marker is None:
            continue
        chunked = marker == _CHUNKED
        kind = _SLIDING if chunked else GroupKind(marker)
        if kind.has_state:
            if state_shape is None:
                state_shape = _state_shape(view, label, include_conv_state)
            key: tuple[Any, ...] = (_KIND_ORDER[kind], kind, 0, 1, 1, 2, state_shape)
        else:
            heads, head_dim, kv_factor = _attention_shape(view, layer, label)
            window = _window(view, layer, label, chunked) if kind.has_window else 0
            key = (_KIND_ORDER[kind], kind, window, heads, head_dim, kv_factor, None)
        buckets.setdefault(key, []).append(layer)
    if not buckets:
        raise ValueError(f"{label}: no layer holds a KV cache or a recurrent state")

    base_names = {key: _base_name(key) for key in buckets}
    groups = []
    for key in sorted(buckets, key=lambda k: (k[0], k[2], k[3], k[4])):
        _, kind, window, heads, head_dim, kv_factor, shape = key
        group_name = base_names[key]
        if list(base_names.values()).count(group_name) > 1:
            group_name += (
                f"_{heads}x{head_dim}" if shape is None else "_" + "x".join(map(str, shape))
            )
        ids = tuple(buckets[key])
        if kind.has_state:
            groups.append(
                LayerGroup(group_name, kind, ids, state_shape=shape, state_dtype=state_dt)
            )
        else:
            groups.append(
                LayerGroup(
                    group_name,
                    kind,
                    ids,
                    num_kv_heads=heads,
                    head_dim=head_dim,
                    window=window if kind.has_window else None,
                    kv_factor=kv_factor,
                )
            )
    spec = KVCacheSpec(
        tuple(groups),
        tokens_per_block=tokens_per_block,
        dtype=spec_dtype,
        name=name or default_name,
    )
    if name is None and generic:  # say which size a class's defaults are
        same = _same_preset(spec)
        if same is not None:
            spec = replace(spec, name=f"{default_name} ({same})")
    return spec


def _same_preset(spec: KVCacheSpec) -> str | None:
    """The preset whose KV shape ``spec`` has (same groups, layers, heads, dtypes), if any."""
    digest = spec.model_digest()
    for name in PRESETS:
        if preset(name).model_digest() == digest:
            return name
    return None


def layer_attention_shapes(
    config_or_path: Any, *, chunked_as_sliding: bool = False
) -> list[tuple[int, int, int] | None]:
    """Per decoder layer, ``(num_kv_heads, head_dim, kv_factor)`` of an attention layer
    (``per_layer_config`` overrides applied, as :func:`spec_from_hf_config` reads them), or
    ``None`` for a state layer or a layer with no cache."""
    source, name, _ = _load(config_or_path)
    view = _text_view(source, _label(source, name))
    kinds = _layer_kinds(view, view.label, chunked_as_sliding)
    return [
        _attention_shape(view, layer, view.label) if kind is not None and kind != _STATE else None
        for layer, kind in enumerate(kinds)
    ]


def _window(view: _View, layer: int, label: str, chunked: bool) -> int:
    """The window of sliding layer ``layer`` (a chunked layer's chunk size)."""
    if chunked:
        window, what = view.get("attention_chunk_size"), "attention_chunk_size"
    else:
        window = _override(view, layer).get("sliding_window") or view.get("sliding_window")
        what = "sliding_window"
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(
            f"{label}: layer {layer} is sliding but {what} is {window!r} (expected an int >= 1)"
        )
    return window


def _base_name(key: tuple[Any, ...]) -> str:
    _, kind, window, _heads, _head_dim, kv_factor, _shape = key
    if kind.has_state:
        return "state"
    name = f"sliding{window}" if kind.has_window else "full"
    if kv_factor != 1:
        return name
    return "mla" if not kind.has_window else f"mla_{name}"
