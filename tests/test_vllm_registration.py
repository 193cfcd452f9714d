"""vLLM registration: the entry point, the default (our class serves DeepseekV4ForCausalLM), the
switch (V4_PLUGIN_DISABLE=1 hands it back to vLLM's native code) and the config fix-ups vLLM keys
on the architecture name / model_type (config class, quantization, block size, chunked prefill and
prefix caching on CPU). No engine is started here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm")

ARCH = "DeepseekV4ForCausalLM"


@pytest.fixture(scope="module")
def tiny_flash(tmp_path_factory):
    from v4_plugin.checkpoint.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("vllm-reg") / "flash", preset="flash", seed=0)


def test_entry_point_is_declared_and_loads():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "deepseek_v4"]
    assert len(eps) == 1, "the project's vllm.general_plugins entry point is not installed"
    assert eps[0].value == "vllm_backend.plugin:register"
    from vllm_backend.plugin import register

    assert eps[0].load() is register


def test_default_registers_our_class_and_config_hook():
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.plugins import load_general_plugins

    from vllm_backend.plugin import register

    load_general_plugins()
    register()  # idempotent: a second call changes nothing
    for arch in (ARCH, "DeepseekV4PluginForCausalLM"):
        entry = ModelRegistry.models[arch]
        assert getattr(entry, "module_name", None) == "vllm_backend.model", entry
        assert entry.class_name == "DeepseekV4ForCausalLM"
        assert MODELS_CONFIG_MAP[arch].__name__ == "DeepseekV4PluginConfig"
    from vllm_backend.model import DeepseekV4ForCausalLM

    assert ModelRegistry._try_load_model_cls(ARCH) is DeepseekV4ForCausalLM


_PROBE = """
import json
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.model_executor.models import ModelRegistry
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
native = ModelRegistry.models["DeepseekV4ForCausalLM"]
ab = ModelRegistry.models.get("DeepseekV4PluginForCausalLM")
print(json.dumps({
    "module": getattr(native, "module_name", None), "class": getattr(native, "class_name", None),
    "config_hook": MODELS_CONFIG_MAP["DeepseekV4ForCausalLM"].__name__,
    "ab_module": getattr(ab, "module_name", None),
}))
"""


def test_switch_hands_deepseek_v4_back_to_vllm():
    """V4_PLUGIN_DISABLE=1 (inherited by every vLLM process) leaves vLLM's native registration and
    config hook in place; the A/B name stays ours. Registry state is per process: run a fresh one."""
    env = {**os.environ, "V4_PLUGIN_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["module"].startswith("vllm.models.deepseek_v4"), probe
    assert probe["class"] == ARCH
    assert probe["config_hook"] == "DeepseekV4ForCausalLMConfig"  # vLLM's own (fp8 -> deepseek_v4_fp8)
    assert probe["ab_module"] == "vllm_backend.model"


def _engine_config(model_dir, **kw):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=str(model_dir), dtype="float32", max_model_len=1024, enforce_eager=True,
                distributed_executor_backend="uni")
    args.update(kw)
    return EngineArgs(**args).create_engine_config()


def test_config_fixups_keyed_on_name_and_model_type(tiny_flash):
    config = _engine_config(tiny_flash)
    mc = config.model_config
    assert mc.architectures == [ARCH]
    # model_type deepseek_v4 -> vLLM's DeepseekV4Config (kept: tokenizer, parsers), and use_mla is on.
    from vllm.transformers_utils.configs.deepseek_v4 import DeepseekV4Config

    assert isinstance(mc.hf_config, DeepseekV4Config)
    assert mc.use_mla
    # The checkpoint's quantization_config (fp8) is the core loader's business, not a vLLM method.
    assert mc.quantization is None
    assert json.loads((tiny_flash / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert config.cache_config.block_size == 256
    # vLLM turns both off for MLA models on CPUs without AMX; ours keeps them on (on every CPU).
    assert config.scheduler_config.enable_chunked_prefill is True
    assert config.cache_config.enable_prefix_caching is True


def test_block_size_is_forced_to_256(tiny_flash):
    config = _engine_config(tiny_flash, block_size=64, enable_prefix_caching=False)
    assert config.cache_config.block_size == 256
    assert config.cache_config.enable_prefix_caching is False  # a user's explicit choice is kept


def test_broken_checkpoint_is_refused_when_vllm_builds_its_config(tiny_flash, tmp_path):
    """The index names a tensor its shard does not hold: refused while vLLM builds its config (no model
    is constructed, no weight is read), naming the shard and the tensor (vLLM wraps the plugin's
    CheckpointError in its config's pydantic ValidationError)."""
    import shutil

    from v4_plugin.checkpoint.loader import INDEX_FILE

    model_dir = shutil.copytree(tiny_flash, tmp_path / "broken")
    index = json.loads((model_dir / INDEX_FILE).read_text())
    shard = index["weight_map"]["norm.weight"]
    index["weight_map"]["layers.0.not_stored.weight"] = shard
    (model_dir / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{shard}: tensor 'layers.0.not_stored.weight' is missing"):
        _engine_config(model_dir)


def test_unsupported_kv_cache_dtype_is_refused(tiny_flash):
    with pytest.raises(Exception, match="kv-cache-dtype"):
        _engine_config(tiny_flash, kv_cache_dtype="fp8_e5m2")


@pytest.mark.parametrize("dialect", ["official", "transformers"])
def test_model_class_loads_weights_through_core_loader(tiny_flash, tmp_path, dialect):
    """The vLLM model class loads every checkpoint the core accepts (official FP8/FP4 format, and the
    dialect transformers' save_pretrained writes), under the official parameter names: FP8 / FP4 linears as
    stored, the rest in --dtype."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from vllm.config import set_current_vllm_config

    from v4_plugin.checkpoint import hf_config, hf_tensors
    from v4_plugin.checkpoint.loader import load_checkpoint

    from vllm_backend.model import DeepseekV4ForCausalLM

    official = load_checkpoint(tiny_flash, dtype=torch.float32, include_mtp=False)
    model_dir = tiny_flash
    if dialect == "transformers":
        model_dir = tmp_path / "hf"
        model_dir.mkdir()
        raw = json.loads((tiny_flash / "config.json").read_text())
        transformers_config = hf_config.config_to_transformers(raw)
        (model_dir / "config.json").write_text(json.dumps(transformers_config))
        save_file({k: v.contiguous() for k, v in hf_tensors.state_dict_to_transformers(official, raw).items()},
                  model_dir / "model.safetensors")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_flash / name, model_dir / name)
    config = _engine_config(model_dir)
    assert config.model_config.quantization is None
    with set_current_vllm_config(config):
        model = DeepseekV4ForCausalLM(vllm_config=config)
    loaded = model.load_weights(iter(()))
    stored = load_checkpoint(model_dir, dtype=torch.float32, include_mtp=False, keep_quantized=True)
    assert loaded == set(stored)  # FP8 / FP4 entries as stored, with their scales
    params = dict(model.named_parameters())
    for name, t in stored.items():
        got = params[name].data
        assert got.dtype == t.dtype and torch.equal(*(x.view(torch.uint8) if x.element_size() == 1 else x
                                                      for x in (got, t))), name

