"""Config parsing and validation against the published Flash and Pro configs (spec §2, test points 1-3)."""

from __future__ import annotations

import json

import pytest

from v4_plugin.checkpoint.config import PRESET_DIR, ConfigError, LayerType, load_config, parse_config, preset_config


def _raw(name: str) -> dict:
    return json.loads((PRESET_DIR / f"deepseek-v4-{name}.config.json").read_text())


@pytest.mark.parametrize("name,counts,topk", [("flash", (2, 21, 20), 512), ("pro", (0, 30, 31), 1024)])
def test_published_schedules(name, counts, topk):
    cfg = preset_config(name)
    assert len(cfg.compress_ratios) == cfg.num_hidden_layers + 1
    assert cfg.layer_type(cfg.num_hidden_layers) is LayerType.SWA  # the MTP layer
    assert (cfg.count(LayerType.SWA), cfg.count(LayerType.CSA), cfg.count(LayerType.HCA)) == counts
    assert cfg.index_topk == topk and cfg.nope_head_dim == 448 and cfg.heads_per_group == 8
    assert cfg.quantized and cfg.expert_dtype == "fp4"  # Pro's missing expert_dtype defaults to fp4


def test_flash_and_pro_layer_kinds():
    flash, pro = preset_config("flash"), preset_config("pro")
    assert [flash.layer_type(i) for i in (0, 1, 2, 3, 42)] == [
        LayerType.SWA, LayerType.SWA, LayerType.CSA, LayerType.HCA, LayerType.CSA]
    assert [pro.layer_type(i) for i in (0, 1, 2, 3, 60)] == [
        LayerType.HCA, LayerType.HCA, LayerType.CSA, LayerType.HCA, LayerType.CSA]


def test_hash_layers_are_the_first_three():
    for cfg in (preset_config("flash"), preset_config("pro")):
        assert [cfg.is_hash_layer(i) for i in range(5)] == [True, True, True, False, False]


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_round_trip_through_to_dict(name):
    cfg = preset_config(name)
    assert parse_config(cfg.to_dict()) == cfg
    if name == "flash":  # the published file, key for key (Pro's omits expert_dtype)
        assert cfg.to_dict() == _raw(name)


BAD = [
    ({"compress_ratios": [0] * 43}, "compress_ratios", "43 + 1 = 44"),
    ({"compress_ratios": [0, 0] + [4, 64] * 20 + [4] + [0]}, "compress_ratios[3]", "0 (SWA), 4 (CSA) or 128"),
    ({"compress_ratios": [0, 0] + [4, 128] * 20 + [4] + [4]}, "compress_ratios[43]", "MTP"),
    ({"qk_rope_head_dim": 576}, "qk_rope_head_dim", "smaller than head_dim"),
    ({"index_topk": 0}, "index_topk", "> 0"),
    ({"o_groups": 7}, "num_attention_heads", "divisible by o_groups"),
    ({"num_key_value_heads": 8}, "num_key_value_heads", "must be 1"),
    ({"head_dim": 500}, "head_dim", "multiple of 64"),
    ({"index_head_dim": 96}, "index_head_dim", "power of two"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok", "n_routed_experts"),
    ({"hidden_size": "4096"}, "hidden_size", "must be int"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type", "yarn"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, "quantization_config.weight_block_size", "[128, 128]"),
    ({"model_type": "llama"}, "model_type", "deepseek_v4"),
]


@pytest.mark.parametrize("patch,field,rule", BAD)
def test_invalid_configs_name_field_and_rule(patch, field, rule):
    raw = _raw("flash") | patch
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "ckpt/config.json")
    assert "ckpt/config.json" in str(err.value) and f"'{field}'" in str(err.value) and rule in str(err.value)


def test_missing_field_is_named():
    raw = _raw("pro")
    del raw["index_n_heads"]
    with pytest.raises(ConfigError, match="missing field 'index_n_heads'"):
        parse_config(raw, "pro/config.json")


@pytest.mark.parametrize("patch,what", [
    ({"model_type": "deepseek_v41", "hidden_size": 5120}, "V4.1"),
    ({"kv_source_layer_ids": [0, 1]}, "V4.1"),
    ({"vision_config": {"hidden_size": 1024}}, "Vision"),
])
def test_other_variants_are_refused_clearly(patch, what):
    with pytest.raises(ConfigError, match=what):
        parse_config(_raw("flash") | patch, "x/config.json")


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        load_config(tmp_path)


# ---- validate_checkpoint: what the adapters check when their framework builds its config ---------------
@pytest.fixture(scope="module")
def tiny_flash(tmp_path_factory):
    from v4_plugin.checkpoint.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-flash"), "flash", seed=0)


@pytest.fixture()
def broken(tiny_flash, tmp_path):
    """A writable copy of the tiny flash checkpoint, and its index (a dict) for a test to break."""
    import shutil

    path = shutil.copytree(tiny_flash, tmp_path / "ckpt")
    return path, json.loads((path / "model.safetensors.index.json").read_text())


def _validation_error(path) -> str:
    from v4_plugin.checkpoint.loader import validate_checkpoint

    with pytest.raises(ValueError) as info:
        validate_checkpoint(path)
    return str(info.value)


def test_validate_checkpoint_accepts_the_tiny_checkpoint_and_its_config_alone(tiny_flash, tmp_path):
    from v4_plugin.checkpoint.loader import validate_checkpoint

    assert validate_checkpoint(tiny_flash) == load_config(tiny_flash)
    (tmp_path / "config.json").write_text((tiny_flash / "config.json").read_text())  # no weights yet
    assert validate_checkpoint(tmp_path) == load_config(tiny_flash)


def test_validate_checkpoint_names_the_config_file_and_field(broken):
    path, _ = broken
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(raw | {"compress_ratios": raw["compress_ratios"][:3]}))
    msg = _validation_error(path)
    assert str(path / "config.json") in msg and "'compress_ratios'" in msg


def test_validate_checkpoint_checks_the_index_against_the_shards(broken):
    path, index = broken
    index_path = path / "model.safetensors.index.json"
    name, shard = "norm.weight", index["weight_map"]["norm.weight"]
    index["weight_map"][name] = "model-00009-of-00009.safetensors"  # a shard that does not exist
    index_path.write_text(json.dumps(index))
    msg = _validation_error(path)
    assert "shard model-00009-of-00009.safetensors is missing" in msg and f"'{name}'" in msg
    index["weight_map"][name] = shard
    index["weight_map"]["layers.0.ffn.not_stored.weight"] = shard  # listed, but its shard does not hold it
    index_path.write_text(json.dumps(index))
    msg = _validation_error(path)
    assert f"{shard}: tensor 'layers.0.ffn.not_stored.weight' is missing" in msg
