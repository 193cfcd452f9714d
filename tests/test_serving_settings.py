"""v4_plugin.serving.settings: the switches both adapters read through it, the one `--kv-cache-dtype`
table, cache format -> quantization simulation, the model directory and tensor registration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from v4_plugin.cache.formats import EXACT, CacheFormat, KVStorage
from v4_plugin.cache.layout import IndexerCache
from v4_plugin.checkpoint.quant import QuantSim
from v4_plugin.serving.settings import (DISABLE_ENV, INDEXER_CACHE_ENV, QUANT_SIM_ENV, Settings, SettingsError,
                                        cache_format, kv_storage, quant_sim, register_tensors, resolve_model_dir)


def test_defaults_and_spellings():
    assert Settings.from_env({}) == Settings(disabled=False, simulate_quantization=True, indexer_cache=None)
    for on in ("1", "true", "YES", " on "):
        assert Settings.from_env({DISABLE_ENV: on}).disabled
    for off in ("0", "false", "No", "off", ""):
        assert not Settings.from_env({DISABLE_ENV: off}).disabled
    assert not Settings.from_env({QUANT_SIM_ENV: "off"}).simulate_quantization
    assert Settings.from_env({INDEXER_CACHE_ENV: "FP4"}).indexer_cache is IndexerCache.FP4


@pytest.mark.parametrize("name, value", [(DISABLE_ENV, "2"), (QUANT_SIM_ENV, "maybe"), (INDEXER_CACHE_ENV, "fp16")])
def test_a_bad_value_names_the_variable(name, value):
    with pytest.raises(SettingsError, match=f"{name}='{value}'"):
        Settings.from_env({name: value})


def test_one_cache_dtype_table():
    for dtype in (None, "auto", "bfloat16", "BF16", "float32", "fp16"):
        assert kv_storage(dtype) is KVStorage.FLOAT
    for dtype in ("fp8", "fp8_e4m3", "FP8_DS_MLA", "float8_e4m3fn"):
        assert kv_storage(dtype) is KVStorage.FP8
    for dtype in ("fp8_e5m2", "int8", ""):
        with pytest.raises(ValueError, match="--kv-cache-dtype"):
            kv_storage(dtype or "x")


def test_cache_format_and_quant_sim():
    plain, fp4 = Settings(), Settings(indexer_cache=IndexerCache.FP4)
    assert cache_format("auto", fp4) is EXACT
    assert cache_format("fp8", plain) == CacheFormat(KVStorage.FP8, IndexerCache.FP8)
    assert cache_format("fp8_e4m3", fp4) == CacheFormat(KVStorage.FP8, IndexerCache.FP4)
    # on: every trained-in quantization, whatever the storage; off: exact where the caches are exact,
    # else only what the caches themselves round (storing never rounds twice)
    assert quant_sim(EXACT, plain) == quant_sim(cache_format("fp8", plain), plain) == QuantSim()
    exact = Settings(simulate_quantization=False)
    assert quant_sim(EXACT, exact) == QuantSim.off()
    assert quant_sim(cache_format("fp8", exact), exact) == QuantSim(activations=False, kv_cache=True, indexer=True)


def test_model_directory(tmp_path):
    assert resolve_model_dir(tmp_path) == tmp_path
    assert resolve_model_dir(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="model 'not-a-real-org/not-a-real-model': not a local checkpoint"):
        resolve_model_dir("not-a-real-org/not-a-real-model", local_files_only=True)
    with pytest.raises(FileNotFoundError, match="no such directory, and not a hub id"):
        resolve_model_dir(tmp_path / "missing" / "checkpoint")


def test_register_tensors_under_official_names():
    tensors = {"embed.weight": torch.randn(4, 2), "layers.0.attn.wq_a.weight": torch.randn(3, 2),
               "layers.0.ffn.gate.tid2eid": torch.arange(6).view(3, 2)}
    root = nn.Module()
    register_tensors(root, tensors)
    params = dict(root.named_parameters())
    assert params.keys() == tensors.keys()
    for name, t in tensors.items():
        assert params[name].data_ptr() == t.data_ptr() and not params[name].requires_grad
