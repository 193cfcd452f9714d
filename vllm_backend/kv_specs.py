"""KV-cache specs: what vLLM's KV cache manager allocates for each DeepSeek-V4 layer.

Every layer owns up to five paged caches (the core's `LayerCaches`), each declared to vLLM with one
of upstream's own spec classes, so vLLM's grouping, packing, block managers and prefix caching
apply unchanged (no core patches, no spec registration):

| cache (`<layer>.attn.<name>`) | spec                     | block (tokens) | entries/block | kept            |
|-------------------------------|--------------------------|----------------|---------------|-----------------|
| window       (every layer)    | SlidingWindowMLASpec     | 64             | 64            | last 128 tokens |
| state        (CSA / HCA)      | SlidingWindowMLASpec     | 4 / 8          | 4 / 8         | last 8 / 128    |
| compressed   (CSA / HCA)      | MLAAttentionSpec, r=4/128| 256            | 64 / 2        | whole context   |
| index_state  (CSA)            | SlidingWindowMLASpec     | 4              | 4             | last 8          |
| index_keys   (CSA)            | MLAAttentionSpec, r=4    | 256            | 64            | whole context   |

Entry widths and element types come from the core (`v4_plugin.cache.formats.cache_entry`, which takes every
byte count from `v4_plugin.cache.layout`). Pages are not padded (`alignment=None`): our kernels need no
TMA-friendly strides, so a block of 256 tokens costs exactly the planner's bytes per token.
A block id always covers 256 logical tokens; a ratio-r cache stores 256/r entries per block
(`tokens_per_state=r`), so the scheduler never sees compression.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from v4_plugin.cache.formats import CacheFormat, cache_entry
from v4_plugin.cache.layout import IndexerCache
from v4_plugin.checkpoint.config import LayerType, V4Config
from v4_plugin.serving.settings import Settings, cache_format

from .capacity import BLOCK as BLOCK_SIZE
from .capacity import STATE_BLOCK, WINDOW_BLOCK, VllmCapacity

CACHE_NAMES = ("window", "state", "compressed", "index_state", "index_keys")


def indexer_cache_choice(vllm_config=None, settings: Settings | None = None) -> IndexerCache:
    """FP8 (132-B) or FP4 (68-B) indexer keys of an FP8 cache: V4_PLUGIN_INDEXER_CACHE=fp4|fp8 when set
    (`settings`, default `Settings.from_env()`), else vLLM's own flag
    `--attention-config '{"use_fp4_indexer_cache": true}'`, else FP8."""
    settings = Settings.from_env() if settings is None else settings
    if settings.indexer_cache is not None:
        return settings.indexer_cache
    attn = getattr(vllm_config, "attention_config", None) if vllm_config is not None else None
    if attn is not None and getattr(attn, "use_fp4_indexer_cache", False):
        return IndexerCache.FP4
    return IndexerCache.FP8


def serving_format(vllm_config, settings: Settings | None = None) -> CacheFormat:
    """The cache format vLLM serves with: `--kv-cache-dtype` (`v4_plugin.serving.settings.cache_format`)
    with the indexer keys of `indexer_cache_choice`."""
    settings = Settings.from_env() if settings is None else settings
    return cache_format(vllm_config.cache_config.cache_dtype,
                        replace(settings, indexer_cache=indexer_cache_choice(vllm_config, settings)))


@dataclass(frozen=True)
class CacheDecl:
    """One cache of one layer as vLLM sees it."""

    name: str  # window | state | compressed | index_state | index_keys
    width: int  # elements per entry
    dtype: torch.dtype  # element dtype
    block_size: int  # logical tokens per block id
    tokens_per_entry: int  # 1 for position-indexed caches, r for compressed ones
    window: int | None  # tokens kept behind the current position (sliding-window caches)


def layer_caches(cfg: V4Config, kind: LayerType, fmt: CacheFormat, dtype: torch.dtype) -> list[CacheDecl]:
    """The caches of one layer type, in `CACHE_NAMES` order."""
    entry = cache_entry(cfg, kind, fmt, dtype)
    c = 2 if kind is LayerType.CSA else 1
    out = []
    for name in CACHE_NAMES:
        if name not in entry:
            continue
        width, edtype = entry[name]
        if name == "window":
            out.append(CacheDecl(name, width, edtype, WINDOW_BLOCK, 1, cfg.sliding_window))
        elif name in ("state", "index_state"):
            out.append(CacheDecl(name, width, edtype, STATE_BLOCK[kind], 1, c * kind.ratio))
        else:
            out.append(CacheDecl(name, width, edtype, BLOCK_SIZE, kind.ratio, None))
    return out


def make_spec(decl: CacheDecl, cache_dtype_str: str):
    """The vLLM spec object of one cache."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec, SlidingWindowMLASpec

    common = dict(
        block_size=decl.block_size, num_kv_heads=1, max_tp_shards=1, head_size=decl.width, dtype=decl.dtype,
        cache_dtype_str=cache_dtype_str, model_version="deepseek_v4",
    )
    if decl.window is not None:
        return SlidingWindowMLASpec(sliding_window=decl.window, **common)
    return MLAAttentionSpec(tokens_per_state=decl.tokens_per_entry, **common)


def attn_prefix(layer_id: int) -> str:
    return f"model.layers.{layer_id}.attn"


def model_kv_specs(cfg: V4Config, cache_dtype: str = "auto", dtype: torch.dtype = torch.bfloat16,
                   indexer: IndexerCache = IndexerCache.FP8, draft_layers: int = 0) -> dict:
    """layer name -> spec for every cache of the main layers and of `draft_layers` drafter blocks (the
    MTP block or the DSpark stages: one window cache each), as the models' cache layers report them."""
    fmt = cache_format(cache_dtype, Settings(indexer_cache=indexer))  # `indexer` given: no switch applies
    specs = {}
    for i in range(cfg.num_hidden_layers + draft_layers):
        for decl in layer_caches(cfg, cfg.layer_type(i), fmt, dtype):
            specs[f"{attn_prefix(i)}.{decl.name}"] = make_spec(decl, cache_dtype)
    return specs


def vllm_capacity(vllm_config, specs: dict, memory_bytes: int | None = None) -> VllmCapacity:
    """What vLLM's own KV-cache config code makes of `specs` (layer name -> spec) for `memory_bytes`
    (default: `cache_config.kv_cache_memory_bytes`): grouping, packing, block count, capacity."""
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    from .backend import V4PagedBackend

    layouts = [[layout.name for layout in V4PagedBackend.supported_kv_cache_layouts()]]
    resolve_kv_cache_layout(vllm_config, layouts, list(specs.values()))
    memory = memory_bytes if memory_bytes is not None else vllm_config.cache_config.kv_cache_memory_bytes
    try:  # vLLM 0.33: planning moved to kv_cache_planning; the engine groups the layers first
        from vllm.v1.core.kv_cache_planning import (_pool_bytes_per_block, get_global_kv_cache_groups,
                                                    get_kv_cache_configs)

        groups = get_global_kv_cache_groups(vllm_config, [specs])
        config = get_kv_cache_configs(vllm_config, [specs], [memory], groups)[0]
    except ImportError:  # vLLM 0.32
        from vllm.v1.core.kv_cache_utils import _pool_bytes_per_block, get_kv_cache_configs

        config = get_kv_cache_configs(vllm_config, [specs], [memory])[0]
    tokens, concurrency = get_kv_cache_capacity(vllm_config, config)
    slab = _pool_bytes_per_block(vllm_config, config.kv_cache_groups)
    per_request = round(config.num_blocks / concurrency)
    return VllmCapacity(slab, config.num_blocks, per_request, concurrency, tokens)
