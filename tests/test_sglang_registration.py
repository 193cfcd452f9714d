"""M1: SGLang finds our DeepSeek-V4 through its plugin mechanisms, and the switch hands V4 back.

Each check runs in a fresh interpreter, as an SGLang process would: `load_plugins()` runs the
`sglang.srt.plugins` entry points (ours included, from the installed distribution's metadata), then
SGLang's own config loader and model registry decide which class serves the checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("sglang")

from v4_plugin.checkpoint.tiny import make_tiny  # noqa: E402

PROBE = r"""
import json, os, sys
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.utils.hf_transformers import config as hf_config_mod
cfg = hf_config_mod.get_config(sys.argv[1], trust_remote_code=False)
from sglang.srt.models.registry import ModelRegistry
cls, arch = ModelRegistry.resolve_model_cls(cfg.architectures)
out = {
    "external_package": os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE"),
    "architectures": list(cfg.architectures),
    "resolved": f"{cls.__module__}.{cls.__qualname__}",
    "has_quantization_config": getattr(cfg, "quantization_config", None) is not None,
    "backend_choice": "v4_plugin" in ATTENTION_BACKEND_CHOICES,
    "backend_registered": "v4_plugin" in ATTENTION_BACKENDS,
}
if out["backend_choice"]:
    import argparse
    from sglang.srt.server_args import ServerArgs
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(["--model-path", sys.argv[1], "--attention-backend", "v4_plugin"])
    out["cli_attention_backend"] = ns.attention_backend
if out["external_package"]:
    # The checkpoint's own name also resolves to ours: the external package wins a name clash.
    native_cls, _ = ModelRegistry.resolve_model_cls(["DeepseekV4ForCausalLM"])
    out["native_name_resolved"] = f"{native_cls.__module__}.{native_cls.__qualname__}"
print("PROBE" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("sgl-reg") / "flash", "flash", seed=0))


def _start_probe(model_dir: str, **env) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_EXTERNAL_MODEL_PACKAGE", "V4_PLUGIN_DISABLE")}
    full_env.update(env)
    return subprocess.Popen([sys.executable, "-c", PROBE, model_dir], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=400)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("PROBE")]
    assert proc.returncode == 0 and lines, f"probe failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return json.loads(lines[-1][len("PROBE"):])


@pytest.fixture(scope="module")
def probes(tiny_dir):
    """Both probes run at once (each is mostly SGLang's import time)."""
    procs = {"default": _start_probe(tiny_dir), "disabled": _start_probe(tiny_dir, V4_PLUGIN_DISABLE="1")}
    try:
        yield {name: _result(p) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


def test_model_module_imports_cleanly():
    # SGLang swallows import errors of model modules (and would then fall back silently): import it here.
    from sglang_backend.models import deepseek_v4_plugin as mod

    names = [c.__name__ for c in mod.EntryClass]
    assert names == ["DeepseekV4PluginForCausalLM", "DeepseekV4ForCausalLM"]


def test_plugin_serves_deepseek_v4_by_default(probes):
    out = probes["default"]
    assert out["external_package"] == "sglang_backend.models"
    assert out["architectures"] == ["DeepseekV4PluginForCausalLM"]
    assert out["resolved"] == "sglang_backend.models.deepseek_v4_plugin.DeepseekV4PluginForCausalLM"
    assert out["native_name_resolved"] == "sglang_backend.models.deepseek_v4_plugin.DeepseekV4ForCausalLM"
    assert not out["has_quantization_config"]  # the core loader dequantizes; SGLang builds no FP8 layers
    assert out["backend_choice"] and out["backend_registered"]
    assert out["cli_attention_backend"] == "v4_plugin"


def test_switch_hands_v4_back_to_sglang(probes):
    out = probes["disabled"]
    assert out["external_package"] is None
    assert out["architectures"] == ["DeepseekV4ForCausalLM"]
    assert out["resolved"] == "sglang.srt.models.deepseek_v4.DeepseekV4ForCausalLM"
    assert out["has_quantization_config"]
    assert not out["backend_choice"] and not out["backend_registered"]
