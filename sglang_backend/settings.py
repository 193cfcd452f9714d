"""The plugin's environment switches, read in every SGLang process (children inherit the env)."""

from __future__ import annotations

import os

DISABLE_ENV = "V4_PLUGIN_DISABLE"  # 1: hand DeepSeek-V4 back to SGLang's native implementation
QUANT_SIM_ENV = "V4_PLUGIN_QUANT_SIM"  # on (default) | off: the reference's trained-in quantization simulation
INDEXER_CACHE_ENV = "V4_PLUGIN_INDEXER_CACHE"  # fp8 (default) | fp4: CSA indexer key records with an fp8 KV cache

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def disabled() -> bool:
    """True when the user handed DeepSeek-V4 back to SGLang's native implementation."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in _TRUE


def quant_sim():
    """The `QuantSim` the served model runs with (`V4_PLUGIN_QUANT_SIM=off|on`, default on)."""
    from v4_plugin.model import QuantSim

    value = os.environ.get(QUANT_SIM_ENV, "on").strip().lower()
    if value in _TRUE:
        return QuantSim()
    if value in _FALSE:
        return QuantSim.off()
    raise ValueError(f"{QUANT_SIM_ENV}={value!r}: use 'on' or 'off'")


def indexer_cache():
    """Indexer key records of an FP8 cache (`V4_PLUGIN_INDEXER_CACHE=fp8|fp4`, default fp8)."""
    from v4_plugin.layout import IndexerCache

    value = os.environ.get(INDEXER_CACHE_ENV, "fp8").strip().lower()
    try:
        return IndexerCache(value)
    except ValueError:
        raise ValueError(f"{INDEXER_CACHE_ENV}={value!r}: use 'fp8' or 'fp4'") from None


def is_float_kv(kv_cache_dtype: str | None) -> bool:
    """`--kv-cache-dtype auto` (or a float dtype) -> exact float entries; fp8 variants -> 584-B records."""
    value = (kv_cache_dtype or "auto").lower()
    if value.startswith("fp8") or value in ("float8_e4m3fn", "fp8_e4m3"):
        return False
    if value in ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32", "float"):
        return True
    raise ValueError(f"--kv-cache-dtype {kv_cache_dtype!r} is not supported by the v4_plugin backend; "
                     "use auto (exact float entries) or fp8_e4m3 (584-B FP8 records)")
