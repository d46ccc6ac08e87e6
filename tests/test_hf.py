"""kvtriton.hf: KVCacheSpec from transformers configs (classes, dicts, config.json)."""

from __future__ import annotations

import json

import pytest

from kvtriton.hf import hf_config_choices, hf_layer_kinds, spec_from_hf_config
from kvtriton.ranges import needed_range
from kvtriton.spec import PRESET_CONFIGS, PRESETS, GroupKind, preset


def _tf():
    return pytest.importorskip("transformers")


def _shape(spec):
    """Everything but the label: for comparing specs built from different sources."""
    out = spec.to_dict()
    out.pop("name")
    return out


def _ids(spec, name):
    return spec.group(name).layer_ids


# -- the configs the README names ---------------------------------------------------------------


def test_gpt_oss_alternates_sliding128_and_full():
    tf = _tf()
    spec = spec_from_hf_config(tf.GptOssConfig())
    assert spec.group_names == ("full", "sliding128")
    assert _ids(spec, "full") == tuple(range(1, 36, 2))
    assert _ids(spec, "sliding128") == tuple(range(0, 36, 2))
    g = spec.group("sliding128")
    assert (g.kind, g.window, g.num_kv_heads, g.head_dim, g.kv_factor) == ("sliding", 128, 8, 64, 2)
    assert spec.dtype == "bfloat16" and spec.tokens_per_block == 16
    # Same KV shape as the hand-written presets (36 layers = 120b, 24 layers = 20b).
    assert spec.model_digest() == preset("gpt-oss-120b").model_digest()
    small = spec_from_hf_config(tf.GptOssConfig(num_hidden_layers=24))
    assert small.model_digest() == preset("gpt-oss-20b").model_digest()


def test_gemma3_text_five_sliding_to_one_full():
    tf = _tf()
    spec = spec_from_hf_config("Gemma3TextConfig")
    assert spec.group_names == ("full", "sliding4096")
    assert _ids(spec, "full") == (5, 11, 17, 23)
    assert len(_ids(spec, "sliding4096")) == 22
    g4b = tf.Gemma3TextConfig(
        num_hidden_layers=34, sliding_window=1024, num_key_value_heads=4, head_dim=256
    )
    assert spec_from_hf_config(g4b).model_digest() == preset("gemma-3-4b").model_digest()
    # The multimodal wrapper maps through its text config.
    assert _shape(spec_from_hf_config(tf.Gemma3Config())) == _shape(spec)


def test_qwen3_next_linear_attention_state_with_conv():
    tf = _tf()
    cfg = tf.Qwen3NextConfig()
    spec = spec_from_hf_config(cfg)
    assert spec.group_names == ("full", "state")
    assert _ids(spec, "full") == tuple(range(3, 48, 4))
    state = spec.group("state")
    assert len(state.layer_ids) == 36
    hv, hk, dk, dv, k = 32, 16, 128, 128, 4
    conv_per_head = (2 * hk * dk + hv * dv) * (k - 1) // hv
    assert state.state_shape == (hv, dk * dv + conv_per_head) == (32, 17152)
    assert spec.state_bytes("state") == 36 * 32 * 17152 * 2
    # The preset is the same model, in the same numbers (conv state included, bfloat16).
    assert spec.model_digest() == preset("qwen3-next-80b").model_digest()
    assert spec.name == "qwen3_next (qwen3-next-80b)"  # which size the defaults are
    # Without the conv state and in fp32: the recurrent state alone.
    bare = spec_from_hf_config(cfg, include_conv_state=False, state_dtype="float32")
    assert bare.group("state").state_shape == (32, 128, 128)
    assert bare.state_bytes("state") == 36 * 32 * 128 * 128 * 4
    # state_shape[0] (value heads) splits over TP.
    shard = spec.shard(1, 4)
    assert shard.group("state").local_state_shape == (8, 17152)
    assert shard.group("full").local_heads == 1


def test_jamba_mamba_layers_by_period_and_offset(tmp_path):
    tf = _tf()
    cfg = tf.JambaConfig()
    spec = spec_from_hf_config(cfg)
    assert _ids(spec, "full") == (4, 12, 20, 28)
    state = spec.group("state")
    assert state.layer_ids == tuple(i for i in range(32) if i % 8 != 4)
    assert state.state_shape == (2 * 4096, 16 + 4 - 1)
    assert spec.group("full").num_kv_heads == 8 and spec.group("full").head_dim == 128
    # Jamba's layer_types is a property: config.json lacks it and the period rule rebuilds it.
    cfg.save_pretrained(tmp_path)
    assert "layer_types" not in json.loads((tmp_path / "config.json").read_text())
    assert _shape(spec_from_hf_config(tmp_path)) == _shape(spec)


def test_llama_is_all_full_attention():
    tf = _tf()
    spec = spec_from_hf_config(tf.LlamaConfig(num_key_value_heads=8))
    assert spec.group_names == ("full",)
    assert spec.model_digest() == preset("llama-3-8b").model_digest()
    mha = spec_from_hf_config(tf.LlamaConfig(num_key_value_heads=None, head_dim=None))
    assert (mha.group("full").num_kv_heads, mha.group("full").head_dim) == (32, 128)


def test_mistral_global_sliding_window_makes_every_layer_slide():
    tf = _tf()
    spec = spec_from_hf_config(tf.MistralConfig(sliding_window=4096))
    assert spec.group_names == ("sliding4096",)
    assert _ids(spec, "sliding4096") == tuple(range(32))
    assert spec_from_hf_config(tf.MistralConfig(sliding_window=None)).group_names == ("full",)


def test_deepseek_v3_mla_is_one_latent():
    tf = _tf()
    spec = spec_from_hf_config(tf.DeepseekV3Config(), tokens_per_block=64)
    g = spec.group("mla")
    assert (g.kind, g.num_kv_heads, g.head_dim, g.kv_factor) == ("full", 1, 512 + 64, 1)
    assert spec.model_digest() == preset("deepseek-v3").model_digest()
    assert spec.bytes_per_token("mla") == 61 * 576 * 2


def test_multimodal_configs_map_through_their_text_config():
    tf = _tf()
    vl = tf.Qwen2VLConfig()
    spec = spec_from_hf_config(vl)
    text = vl.get_text_config(decoder=True)
    assert spec.group_names == ("full",) and spec.num_layers == text.num_hidden_layers
    assert spec.group("full").num_kv_heads == text.num_key_value_heads
    # A dict with a text_config (a multimodal config.json) maps the same way.
    assert _shape(spec_from_hf_config(vl.to_dict())) == _shape(spec)


def test_nemotron_h_moe_and_mlp_layers_hold_nothing():
    tf = _tf()
    spec = spec_from_hf_config(tf.NemotronHConfig())
    # layers_block_type = [mamba, moe, attention, mlp]
    assert _ids(spec, "state") == (0,) and _ids(spec, "full") == (2,)
    assert spec.group("state").state_dtype == "float32"  # mamba_ssm_cache_dtype
    assert hf_layer_kinds(tf.NemotronHConfig()) == ["state", None, "full", None]


def test_overrides_recompute_derived_fields_for_class_names():
    tf = _tf()
    spec = spec_from_hf_config(
        "Gemma3TextConfig", overrides={"sliding_window": 1024, "num_hidden_layers": 12}
    )
    assert spec.group_names == ("full", "sliding1024") and _ids(spec, "full") == (5, 11)
    # Objects and dicts are updated as dicts.
    mistral = spec_from_hf_config(tf.MistralConfig(), overrides={"sliding_window": 512})
    assert mistral.group_names == ("sliding512",)
    qwen_vl = spec_from_hf_config(tf.Qwen2VLConfig(), overrides={"num_key_value_heads": 4})
    assert qwen_vl.group("full").num_kv_heads == 4
    with pytest.raises(
        ValueError, match=r"num_hidden_layers must be an int in \[1, 4,096\], got 'x'"
    ):
        spec_from_hf_config("GptOssConfig", overrides={"num_hidden_layers": "x"})
    with pytest.raises(TypeError, match="overrides must map"):
        spec_from_hf_config("GptOssConfig", overrides={1: 2})


# -- every advertised choice maps and round-trips through config.json -------------------------


@pytest.mark.parametrize("class_name", hf_config_choices())
def test_every_choice_maps_and_round_trips_through_config_json(class_name, tmp_path):
    tf = _tf()
    cfg = getattr(tf, class_name)()
    spec = spec_from_hf_config(class_name, tokens_per_block=32)
    assert spec.tokens_per_block == 32
    assert spec.num_layers > 0
    directory = tmp_path / "my-model"
    cfg.save_pretrained(directory)
    from_dir = spec_from_hf_config(directory, tokens_per_block=32)
    from_file = spec_from_hf_config(directory / "config.json", tokens_per_block=32)
    assert from_dir.name == from_file.name == "my-model"
    assert _shape(from_dir) == _shape(from_file) == _shape(spec)


def test_model_type_name_and_name_override():
    _tf()
    spec = spec_from_hf_config("gpt_oss", name="oss")
    assert spec.name == "oss" and spec.group_names == ("full", "sliding128")


# -- legacy config.json conventions (plain dicts: no transformers needed) ---------------------

_BASE = {
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_hidden_layers": 12,
}


def test_dict_gemma3_sliding_window_pattern():
    spec = spec_from_hf_config(
        {
            **_BASE,
            "model_type": "gemma3_text",
            "sliding_window": 512,
            "sliding_window_pattern": 6,
            "head_dim": 256,
        }
    )
    assert _ids(spec, "full") == (5, 11)
    assert spec.group("sliding512").head_dim == 256


def test_dict_gemma2_alternates_even_sliding():
    gemma2 = {**_BASE, "model_type": "gemma2", "sliding_window": 4096}
    spec = spec_from_hf_config({**gemma2, "head_dim": 64})
    assert _ids(spec, "sliding4096") == (0, 2, 4, 6, 8, 10)
    assert spec.group("full").head_dim == 64
    # Without head_dim, Gemma2Config's default (256), not hidden_size // num_attention_heads.
    _tf()
    assert spec_from_hf_config(gemma2).group("full").head_dim == 256


@pytest.mark.parametrize(
    ("use", "window", "expect_sliding"),
    [(False, 4096, ()), (True, None, ()), (True, 4096, tuple(range(9, 12)))],
)
def test_dict_qwen2_use_sliding_window_and_max_window_layers(use, window, expect_sliding):
    spec = spec_from_hf_config(
        {
            **_BASE,
            "model_type": "qwen2",
            "use_sliding_window": use,
            "sliding_window": window,
            "max_window_layers": 9,
        }
    )
    sliding = [g for g in spec.groups if g.kind is GroupKind.SLIDING]
    assert (sliding[0].layer_ids if sliding else ()) == expect_sliding


def test_dict_mistral_global_window_and_dtype_fields():
    spec = spec_from_hf_config(
        {**_BASE, "model_type": "mistral", "sliding_window": 4096, "torch_dtype": "float16"}
    )
    assert spec.group_names == ("sliding4096",) and spec.dtype == "float16"
    assert spec_from_hf_config({**_BASE, "dtype": "float32"}).dtype == "float32"
    assert spec_from_hf_config({**_BASE, "dtype": "float32"}, dtype="fp8").dtype == "float8_e4m3fn"
    assert spec_from_hf_config({**_BASE, "torch_dtype": "auto"}).dtype == "bfloat16"


def test_dict_several_windows_make_several_sliding_groups():
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    spec = spec_from_hf_config(
        {
            **_BASE,
            "num_hidden_layers": 4,
            "layer_types": types,
            "sliding_window": 128,
            "per_layer_config": {"1": {"sliding_window": 1024}, "2": {"head_dim": 128}},
        }
    )
    assert spec.group_names == ("full", "sliding128", "sliding1024")
    assert _ids(spec, "sliding128") == (0, 3) and _ids(spec, "sliding1024") == (1,)
    assert spec.group("full").head_dim == 128 and spec.group("sliding128").head_dim == 64


def test_dict_same_kind_different_shapes_get_suffixed_names():
    types = ["full_attention"] * 3
    spec = spec_from_hf_config(
        {
            **_BASE,
            "num_hidden_layers": 3,
            "layer_types": types,
            "per_layer_config": {"02": {"num_key_value_heads": 4}},
        }
    )
    assert spec.group_names == ("full_2x64", "full_4x64")


def test_dict_mamba2_state_shape():
    spec = spec_from_hf_config(
        {
            **_BASE,
            "model_type": "bamba",
            "attn_layer_indices": [3, 7],
            "mamba_n_heads": 16,
            "mamba_d_head": 64,
            "mamba_d_state": 32,
            "mamba_n_groups": 2,
            "mamba_d_conv": 4,
        }
    )
    assert _ids(spec, "full") == (3, 7)
    conv = (16 * 64 + 2 * 2 * 32) * 3 // 16
    assert spec.group("state").state_shape == (16, 64 * 32 + conv)


# -- window semantics against transformers' own mask ------------------------------------------


@pytest.mark.parametrize("window", [1, 4, 128])
def test_sliding_window_matches_transformers_mask(window):
    _tf()
    import torch
    from transformers.masking_utils import sliding_window_causal_mask_function

    mask = sliding_window_causal_mask_function(window)
    spec = spec_from_hf_config({**_BASE, "model_type": "mistral", "sliding_window": window})
    group = spec.group(f"sliding{window}")
    zero = torch.tensor(0)
    for p in (1, window - 1, window, window + 1, 3 * window + 5):
        if p < 1:
            continue
        needed = needed_range(group, p)
        attended = {
            k for k in range(p + 1) if bool(mask(zero, zero, torch.tensor(p), torch.tensor(k)))
        }
        # The new query at q = P attends the cached positions `needed` plus itself.
        assert attended == set(needed) | {p}


# -- errors --------------------------------------------------------------------------------------


def test_encoder_and_non_lm_configs_are_refused_with_a_reason():
    tf = _tf()
    with pytest.raises(ValueError, match="bidirectional encoder"):
        spec_from_hf_config(tf.BertConfig())
    with pytest.raises(ValueError, match="encoder-decoder"):
        spec_from_hf_config("T5Config")
    with pytest.raises(ValueError, match="not a generative language model"):
        spec_from_hf_config("ViTConfig")
    with pytest.raises(ValueError, match="not a generative language model"):
        spec_from_hf_config("CLIPConfig")
    with pytest.raises(ValueError, match="depends on later prompt tokens"):
        spec_from_hf_config(tf.Gemma3TextConfig(use_bidirectional_attention=True))


def test_unmappable_layers_are_refused_with_a_reason():
    tf = _tf()
    with pytest.raises(ValueError, match="chunked attention"):
        spec_from_hf_config("Llama4TextConfig")
    spec = spec_from_hf_config("Llama4TextConfig", chunked_as_sliding=True)
    assert spec.group(f"sliding{tf.Llama4TextConfig().attention_chunk_size}").num_layers == 36
    with pytest.raises(ValueError, match="'hybrid'"):
        spec_from_hf_config("FalconH1Config")


def test_bad_inputs_name_what_was_wrong(tmp_path):
    with pytest.raises(ValueError, match="sliding_window is None"):
        spec_from_hf_config({**_BASE, "layer_types": ["sliding_attention"] * 12})
    with pytest.raises(ValueError, match="layer_types has 2 entries"):
        spec_from_hf_config({**_BASE, "layer_types": ["full_attention"] * 2})
    with pytest.raises(ValueError, match="cannot map layer type 'bogus'"):
        spec_from_hf_config({**_BASE, "layer_types": ["bogus"] * 12})
    with pytest.raises(ValueError, match="no num_hidden_layers"):
        spec_from_hf_config({"model_type": "whatever"})
    with pytest.raises(ValueError, match=r"holds no config\.json"):
        spec_from_hf_config(tmp_path)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        spec_from_hf_config(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"neither a config\.json"):
        spec_from_hf_config(str(tmp_path / "missing" / "config.json"))
    with pytest.raises(TypeError, match="got int"):
        spec_from_hf_config(3)
    _tf()
    with pytest.raises(ValueError, match="NoSuchConfig"):
        spec_from_hf_config("NoSuchConfig")


def test_choices_are_transformers_config_classes():
    tf = _tf()
    choices = hf_config_choices()
    assert list(choices) == sorted(choices)
    for name in choices:
        assert isinstance(getattr(tf, name), type), name


# -- real config.json files: class defaults, nested text configs, the Hub cache ----------------

#: google/gemma-3-4b-it's config.json as published: a multimodal wrapper whose text_config sets
#: only what differs from Gemma3TextConfig's defaults (heads, head_dim, the 5:1 pattern).
GEMMA3_4B_IT = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}


def _write_config(directory, data):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(data))
    return directory


def test_multimodal_config_json_fills_the_text_config_class_defaults(tmp_path):
    _tf()
    directory = _write_config(tmp_path / "gemma-3-4b-it", GEMMA3_4B_IT)
    spec = spec_from_hf_config(directory)
    assert spec.name == "gemma-3-4b-it"
    assert spec.model_digest() == preset("gemma-3-4b").model_digest()
    # --hf-set edits the text config; the 5:1 pattern is recomputed for the new layer count.
    short = spec_from_hf_config(directory, overrides={"num_hidden_layers": 12})
    assert _ids(short, "full") == (5, 11)
    assert spec_from_hf_config(dict(GEMMA3_4B_IT)).model_digest() == spec.model_digest()


def test_flat_config_json_with_fields_left_to_the_class_defaults(tmp_path):
    _tf()
    # GptOssConfig's defaults fill heads, head_dim, the window and the alternation.
    spec = spec_from_hf_config(
        _write_config(tmp_path / "oss", {"model_type": "gpt_oss", "num_hidden_layers": 24})
    )
    assert spec.model_digest() == preset("gpt-oss-20b").model_digest()
    # Qwen3's head_dim default (128) is not hidden_size // num_attention_heads (2048 // 32).
    qwen3 = {
        "model_type": "qwen3",
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "num_hidden_layers": 4,
    }
    assert spec_from_hf_config(qwen3).group("full").head_dim == 128


def test_a_hub_id_resolves_from_the_local_cache_offline(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    repo = cache / "models--google--gemma-3-4b-it"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    _write_config(repo / "snapshots" / "0123abcd", GEMMA3_4B_IT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tf()
    spec = spec_from_hf_config("google/gemma-3-4b-it")
    assert spec.name == "gemma-3-4b-it"
    assert spec.model_digest() == preset("gemma-3-4b").model_digest()
    with pytest.raises(ValueError, match=r"not in .*never downloads.*hf download google/nope"):
        spec_from_hf_config("google/nope")


def test_a_plain_config_json_is_read_without_importing_transformers(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "llama" / "config.json"
    path.parent.mkdir()
    path.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 4096,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "num_hidden_layers": 32,
                "torch_dtype": "bfloat16",
            }
        )
    )
    probe = (
        "import sys\n"
        "from kvtriton.hf import spec_from_hf_config\n"
        f"spec = spec_from_hf_config({str(path)!r})\n"
        "print(spec.model_digest())\n"
        "assert 'transformers' not in sys.modules, 'imported transformers'\n"
        "assert 'torch' not in sys.modules, 'imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == preset("llama-3-8b").model_digest()


def test_json_families_read_alone_give_what_their_config_class_gives():
    """Each family the JSON fast path reads alone: its defaults as a config.json, and a
    minimal config.json (the fields the fast path requires), agree with the config class."""
    _tf()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from kvtriton import hf

    for model_type, (derived, layouts) in hf._JSON_FAMILIES.items():
        cls = CONFIG_MAPPING[model_type]
        full = cls().to_dict()
        keep = {"model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"}
        keep |= {"hidden_size"} if derived else {"head_dim"}
        keep |= set(next(keys for keys in reversed(layouts) if all(k in full for k in keys)))
        minimal = {k: full[k] for k in keep if k in full}
        for data in (full, minimal):
            assert hf._json_answers(data), (model_type, sorted(data))
            alone = spec_from_hf_config(data)
            via_class = spec_from_hf_config(cls.from_dict(data))
            assert _shape(alone) == _shape(via_class), model_type
        assert not hf._json_answers(
            {k: v for k, v in minimal.items() if k != "num_key_value_heads"}
        )


# -- --hf-set keys and field values --------------------------------------------------------------


def test_unknown_override_keys_are_errors_naming_the_key(tmp_path):
    from kvtriton.hf import UnknownFieldError

    flat = {**_BASE, "model_type": "mistral", "sliding_window": 64}
    with pytest.raises(UnknownFieldError, match=r"no field 'sliding_windw'.*'sliding_window'"):
        spec_from_hf_config(flat, overrides={"sliding_windw": 1024})
    _tf()
    with pytest.raises(
        UnknownFieldError, match=r"GptOssConfig has no field 'num_key_value_head'; did you mean"
    ):
        spec_from_hf_config("GptOssConfig", overrides={"num_key_value_head": 1})
    directory = _write_config(tmp_path / "g", GEMMA3_4B_IT)
    with pytest.raises(UnknownFieldError) as info:
        spec_from_hf_config(directory, overrides={"sliding_windw": 1024})
    assert info.value.key == "sliding_windw" and "Gemma3TextConfig" in str(info.value)
    # A real field that kvtriton does not read is not unknown.
    spec_from_hf_config("GptOssConfig", overrides={"vocab_size": 1000})
    spec_from_hf_config(flat, overrides={"vocab_size": 1000})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_key_value_heads": 0}, r"num_key_value_heads must be an int in \[1, 65,536\], got 0"),
        ({"head_dim": 0}, r"head_dim must be an int in \[1, 65,536\], got 0"),
        (
            {"num_hidden_layers": 1e9},
            r"num_hidden_layers must be an int in \[1, 4,096\], got 1000000000.0",
        ),
        ({"num_hidden_layers": 10**9}, r"num_hidden_layers must be an int in \[1, 4,096\]"),
        (
            {"sliding_window": 8, "sliding_window_pattern": "6"},
            r"sliding_window_pattern must be an int in \[1, 4,096\], got '6'",
        ),
        ({"sliding_window": 0}, r"sliding_window must be an int in \[1, "),
        ({"use_sliding_window": "yes"}, r"use_sliding_window must be true or false, got 'yes'"),
        ({"layer_types": "full_attention"}, r"layer_types must be a list of layer type strings"),
        (
            {"per_layer_config": {"3": {"head_dim": 0}}},
            r"per_layer_config\['3'\]: head_dim must be an int in \[1, 65,536\], got 0",
        ),
    ],
)
def test_invalid_fields_are_errors_naming_the_field_and_the_expected_value(fields, message):
    with pytest.raises(ValueError, match=message):
        spec_from_hf_config({**_BASE, **fields})
    with pytest.raises(ValueError, match=message):
        spec_from_hf_config({**_BASE, "model_type": "llama"}, overrides=fields)


def test_a_huge_layer_count_is_refused_before_a_config_class_builds_it():
    _tf()
    with pytest.raises(ValueError, match=r"num_hidden_layers must be an int in \[1, 4,096\]"):
        spec_from_hf_config("Gemma3TextConfig", overrides={"num_hidden_layers": 10**9})
    with pytest.raises(ValueError, match=r"num_key_value_heads must be an int"):
        spec_from_hf_config("GptOssConfig", overrides={"num_key_value_heads": 0})


# -- presets and config classes agree ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESET_CONFIGS))
def test_every_preset_with_a_config_class_gives_the_same_numbers(name):
    _tf()
    class_name, overrides = PRESET_CONFIGS[name]
    expected = preset(name)
    spec = spec_from_hf_config(
        class_name, overrides=overrides, tokens_per_block=expected.tokens_per_block
    )
    assert _shape(spec) == _shape(expected)
    for group in expected.groups:
        assert spec.bytes_per_token(group.name) == expected.bytes_per_token(group)
        assert spec.state_bytes(group.name) == expected.state_bytes(group)
    # and the class's own defaults say which size they are
    if not overrides:
        assert spec.name.endswith(f"({name})"), spec.name


def test_presets_without_a_config_class_are_the_synthetic_ones():
    assert set(PRESETS) - set(PRESET_CONFIGS) == {"tiny-hybrid"}
