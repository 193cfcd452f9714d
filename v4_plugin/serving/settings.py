"""The serving decisions both adapters make the same way: the plugin's environment switches, the
`--kv-cache-dtype` spellings, cache format and quantization simulation, the model directory, and the
registration of checkpoint tensors on a framework's model object. No framework is imported here;
neither adapter reads a variable of ours itself.

Every `V4_PLUGIN_*` switch of the project, and where it is read:

| variable                           | values (default first)        | read by                                          |
|------------------------------------|-------------------------------|--------------------------------------------------|
| `V4_PLUGIN_DISABLE`                | unset/0 / 1                   | here (`Settings.disabled`): both adapters' plugin registration and config hooks |
| `V4_PLUGIN_QUANT_SIM`              | on / off                      | here (`Settings.simulate_quantization`, `quant_sim`): both model classes |
| `V4_PLUGIN_INDEXER_CACHE`          | unset (fp8) / fp8 / fp4       | here (`Settings.indexer_cache`, `cache_format`): both adapters' cache formats |
| `V4_PLUGIN_EFFORT_PROFILE`         | unset (the checkpoint's) / preview / refresh | `v4_plugin.text.chat.detect_profile` (the adapters' chat encodings call it) |
| `V4_PLUGIN_SPECIAL_TOKENS_IN_TEXT` | control / plain               | `v4_plugin.text.chat.special_tokens_in_text` (through `encode_request_ids`) |
| `V4_PLUGIN_KERNELS`                | auto / torch / triton         | `v4_plugin.runtime.dispatch` (every op, also outside serving) |
| `V4_PLUGIN_WARMUP`                 | on / off                      | `v4_plugin.runtime.warmup.warm_up` |

The last four belong to rooms below this one (text, runtime) and are read there, where the core
uses them outside serving too.

"Read once": `Settings.from_env()` parses each distinct set of values once (the switches are looked
up, parsing and validation are cached), so every model, pool and hook of a process agrees on one
`Settings`, and a test that changes the environment between two in-process engines gets the new
values. An adapter reads the settings when it builds its model or pool and keeps them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from v4_plugin.cache.formats import EXACT, CacheFormat, KVStorage
from v4_plugin.cache.layout import IndexerCache
from v4_plugin.checkpoint.quant import QuantSim

DISABLE_ENV = "V4_PLUGIN_DISABLE"  # 1: hand DeepSeek-V4 back to the framework's native implementation
QUANT_SIM_ENV = "V4_PLUGIN_QUANT_SIM"  # on (default) | off: the trained-in quantization simulation
INDEXER_CACHE_ENV = "V4_PLUGIN_INDEXER_CACHE"  # fp8 (default) | fp4: CSA indexer keys of an FP8 KV cache
ENV_NAMES = (DISABLE_ENV, QUANT_SIM_ENV, INDEXER_CACHE_ENV)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A switch with a value the plugin does not accept; the message names the variable."""


def _flag(name: str, raw: str | None, default: bool) -> bool:
    value = (raw or "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r}: use one of {', '.join(_TRUE)} or {', '.join(_FALSE)}")


def _indexer(raw: str | None) -> IndexerCache | None:
    value = (raw or "").strip().lower()
    if not value:
        return None
    try:
        return IndexerCache(value)
    except ValueError:
        raise SettingsError(f"{INDEXER_CACHE_ENV}={raw!r}: use one of "
                            f"{', '.join(f.value for f in IndexerCache)}") from None


@dataclass(frozen=True)
class Settings:
    """The plugin's serving switches (`ENV_NAMES`), parsed."""

    disabled: bool = False  # V4_PLUGIN_DISABLE: the framework's native DeepSeek-V4 serves
    simulate_quantization: bool = True  # V4_PLUGIN_QUANT_SIM (off: the exact mode)
    indexer_cache: IndexerCache | None = None  # V4_PLUGIN_INDEXER_CACHE; None: not set (a framework flag, else FP8)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings of `environ` (default: this process's environment); `SettingsError` names a bad
        variable. Parsed once per distinct set of values."""
        env = os.environ if environ is None else environ
        return _parse(tuple(env.get(name) for name in ENV_NAMES))


@lru_cache(maxsize=None)
def _parse(raw: tuple[str | None, ...]) -> Settings:
    disable, quant, indexer = raw
    return Settings(disabled=_flag(DISABLE_ENV, disable, False),
                    simulate_quantization=_flag(QUANT_SIM_ENV, quant, True),
                    indexer_cache=_indexer(indexer))


# ---- --kv-cache-dtype ------------------------------------------------------------------------------
KV_CACHE_DTYPES: dict[str, KVStorage] = {
    # float entries in the model dtype (exact): the frameworks' `auto` and the float spellings
    "auto": KVStorage.FLOAT, "bfloat16": KVStorage.FLOAT, "bf16": KVStorage.FLOAT, "float16": KVStorage.FLOAT,
    "fp16": KVStorage.FLOAT, "float32": KVStorage.FLOAT, "fp32": KVStorage.FLOAT, "float": KVStorage.FLOAT,
    # 584-byte FP8 records (e4m3 values): vLLM's fp8 names, SGLang's fp8_e4m3, torch's name
    "fp8": KVStorage.FP8, "fp8_e4m3": KVStorage.FP8, "fp8_ds_mla": KVStorage.FP8, "float8_e4m3fn": KVStorage.FP8,
}
"""Every `--kv-cache-dtype` either adapter serves (any case), and what it stores."""

FLOAT_CACHE_DTYPES = tuple(k for k, v in KV_CACHE_DTYPES.items() if v is KVStorage.FLOAT)
FP8_CACHE_DTYPES = tuple(k for k, v in KV_CACHE_DTYPES.items() if v is KVStorage.FP8)


def kv_storage(kv_cache_dtype: str | None) -> KVStorage:
    """How a `--kv-cache-dtype` (None: `auto`) stores KV entries; a ValueError names the flag otherwise."""
    value = (kv_cache_dtype or "auto").strip().lower()
    try:
        return KV_CACHE_DTYPES[value]
    except KeyError:
        raise ValueError(
            f"deepseek-v4-plugin: --kv-cache-dtype {kv_cache_dtype!r} is not supported; use 'auto' (entries in "
            f"the model dtype, exact; also {', '.join(FLOAT_CACHE_DTYPES[1:])}) or one of "
            f"{', '.join(FP8_CACHE_DTYPES)} (584-byte FP8 records)") from None


def cache_format(kv_cache_dtype: str | None, settings: Settings | None = None) -> CacheFormat:
    """`--kv-cache-dtype` -> the core's `CacheFormat`: float entries (`EXACT`, float indexer keys) or FP8
    records with the indexer keys of `settings.indexer_cache` (FP8 when not set). settings: default
    `Settings.from_env()`."""
    if kv_storage(kv_cache_dtype) is KVStorage.FLOAT:
        return EXACT
    settings = Settings.from_env() if settings is None else settings
    return CacheFormat(KVStorage.FP8, settings.indexer_cache or IndexerCache.FP8)


def quant_sim(fmt: CacheFormat, settings: Settings | None = None) -> QuantSim:
    """The quantization simulation a model serving caches in `fmt` runs with: every trained-in
    quantization (`QuantSim()`) with V4_PLUGIN_QUANT_SIM on, whatever the storage; off, the exact mode
    where the caches are exact (`EXACT`: `QuantSim.off()`), else only what the caches themselves
    quantize (`CacheFormat.quant_sim`: a quantized cache holds simulated values, so storing never rounds
    twice). settings: default `Settings.from_env()`."""
    settings = Settings.from_env() if settings is None else settings
    if settings.simulate_quantization:
        return QuantSim()
    return fmt.quant_sim(activations=False)


# ---- the model directory ---------------------------------------------------------------------------
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")  # what serving reads of a hub repo


def resolve_model_dir(model: str | os.PathLike, revision: str | None = None, *, config_only: bool = False,
                      local_files_only: bool = False) -> Path:
    """A local checkpoint directory for a framework's model argument: the directory itself, or the
    huggingface_hub snapshot of a hub id (config, tokenizer and safetensors; `config_only`: config.json
    alone). `local_files_only`: only what the framework already downloaded (no network)."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # a dependency of tokenizers, needed for hub ids only
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    patterns = ["config.json"] if config_only else list(CHECKPOINT_FILES)
    try:
        return Path(snapshot_download(str(model), revision=revision, allow_patterns=patterns,
                                      local_files_only=local_files_only))
    except HFValidationError:
        raise FileNotFoundError(f"model {str(model)!r}: no such directory, and not a hub id") from None
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:
        where = "no downloaded snapshot of it" if local_files_only else "the hub has no such repository or revision"
        raise FileNotFoundError(f"model {str(model)!r}: not a local checkpoint directory, and {where} "
                                f"({type(e).__name__})") from e


# ---- tensors on a framework's model object ----------------------------------------------------------
def register_tensors(root: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Register each checkpoint tensor under its official dotted name (`layers.3.attn.wq_a.weight`, ...)
    as a frozen parameter of `root`, creating the intermediate modules, so that `root.named_parameters()`
    yields the official names and the very tensors (integer ones such as hash-MoE tables included)."""
    for name, tensor in tensors.items():
        module = root
        *path, leaf = name.split(".")
        for part in path:
            child = module._modules.get(part)
            if child is None:
                child = nn.Module()
                module.add_module(part, child)
            module = child
        module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
