"""SGLang memory pools holding DeepSeek-V4's caches in the core's layout, sized by `v4_plugin.layout`.

SGLang allocates token slots `loc` in pages of `page_size` P = 128 k slots, so every 4- and 128-token
block of a request lies inside one page (upstream DSV4 relies on the same fact). Every cache of a
layer is paged by SGLang's page id `loc // P`:

* window, compressor state, indexer compressor state: one row per token, at data[loc // P, loc % P];
* compressed entries (CSA, HCA) and indexer keys (CSA): entry j of a request covers positions
  j*m ... j*m+m-1, all in page (j*m) // P, at data[page, j % (P/m)]: P/m entries per page.

So one block table serves every cache of a request: its page ids, `req_to_token[req, ::P] // P`.
Token slots SGLang frees, retracts or shares through the radix cache carry all their state with them,
which is what makes prefix reuse, chunked prefill and retraction exact.

`token_capacity` is the sizing formula (bytes per token slot); the pool configurator uses it, and it
is the function to move into `v4_plugin.layout`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from v4_plugin.config import LayerType, V4Config, load_config
from v4_plugin.layout import IndexerCache
from v4_plugin.paged import cache_entry

from . import settings

logger = logging.getLogger(__name__)

FP32 = 4


# ---- formats ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StorageChoice:
    """What one served model stores: float entries (exact mode) or FP8 records (+ FP8/FP4 indexer keys)."""

    float_kv: bool
    indexer: IndexerCache | None  # None with float_kv
    dtype: torch.dtype  # element dtype of float entries (the model dtype)

    def cache_format(self):
        from v4_plugin.paged import CacheFormat, KVStorage

        if self.float_kv:
            return CacheFormat(kv=KVStorage.FLOAT, indexer=None)
        return CacheFormat(kv=KVStorage.FP8, indexer=self.indexer)


def storage_choice(kv_cache_dtype: str | None, model_dtype: torch.dtype) -> StorageChoice:
    if settings.is_float_kv(kv_cache_dtype):
        return StorageChoice(True, None, model_dtype)
    return StorageChoice(False, settings.indexer_cache(), model_dtype)


def entry_specs(cfg: V4Config, kind: LayerType, st: StorageChoice) -> dict[str, tuple[int, torch.dtype]]:
    """Per cache name: (entry width, element dtype), as the core states it (`v4_plugin.paged.cache_entry`)."""
    return dict(cache_entry(cfg, kind, st.cache_format(), st.dtype))


def _bytes(spec: tuple[int, torch.dtype]) -> int:
    width, dtype = spec
    return width * torch.empty(0, dtype=dtype).element_size()


PER_TOKEN = ("window", "state", "index_state")  # one row per token position
PER_ENTRY = ("compressed", "index_keys")  # one row per compressed entry (m positions)


# ---- sizing -------------------------------------------------------------------------------------
def bytes_per_token_slot(cfg: V4Config, st: StorageChoice) -> float:
    """Cache bytes one SGLang token slot costs over all main layers: the per-token rows (window entry,
    compressor rows) plus the compressed entries and indexer keys amortised over their ratio (exact:
    a page of P slots holds P/m entries)."""
    total = 0.0
    for kind in cfg.layer_types:
        for name, spec in entry_specs(cfg, kind, st).items():
            total += _bytes(spec) / (kind.ratio if name in PER_ENTRY else 1)
    return total


def token_capacity(cfg: V4Config, memory_bytes: int, *, page_size: int, float_kv: bool,
                   dtype: torch.dtype = torch.bfloat16, indexer: IndexerCache | None = IndexerCache.FP8) -> int:
    """Token slots (SGLang's max_total_num_tokens) that `memory_bytes` of cache memory holds:
    memory / bytes_per_token_slot, floored to whole pages of `page_size`. (To move into v4_plugin.layout.)"""
    st = StorageChoice(float_kv, None if float_kv else indexer, dtype)
    tokens = int(max(0, memory_bytes) // bytes_per_token_slot(cfg, st))
    return tokens // page_size * page_size


def _model_dir(model_config) -> Path:
    path = Path(model_config.model_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model_config.model_path), revision=getattr(model_config, "revision", None),
                                  allow_patterns=["*.json"], local_files_only=True))


def v4_config_of(model_config) -> V4Config:
    return load_config(_model_dir(model_config))


# ---- the pool configurator (sizing) --------------------------------------------------------------
class V4PoolConfigurator:
    """SGLang `MemoryPoolConfigurator` for our architecture: tokens from bytes via `token_capacity`."""

    def __init__(self, kvc):
        from sglang.srt.runtime_context import get_schedule

        self.kvc = kvc
        self.cfg = v4_config_of(kvc.model_config)
        self.st = storage_choice(kvc.kv_cache_dtype_str, kvc.model_dtype)

    def calculate_pool_sizes(self, available_bytes: int, page_size: int):
        from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

        tokens = token_capacity(self.cfg, available_bytes, page_size=page_size, float_kv=self.st.float_kv,
                                dtype=self.st.dtype, indexer=self.st.indexer)
        logger.info("deepseek-v4-plugin: %d B of cache memory -> %d token slots (%.2f B per token slot)",
                    available_bytes, tokens, bytes_per_token_slot(self.cfg, self.st))
        return MemoryPoolConfig(max_total_num_tokens=tokens)

    def calculate_pool_sizes_from_max_tokens(self, max_total_num_tokens: int, page_size: int):
        from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

        return MemoryPoolConfig(max_total_num_tokens=max_total_num_tokens // page_size * page_size)

    def finalize_with_max_running_requests(self, config):
        return config

    @staticmethod
    def validate_swa_pool_size(*args, **kwargs) -> None:
        return None


# ---- the pool -----------------------------------------------------------------------------------
def _kv_cache_base():
    from sglang.srt.mem_cache.memory_pool import KVCache

    return KVCache


def build_token_pool(kvc, *, sizes, req_to_token_pool, **_):
    """AROUND `KVCacheConfigurator._build_token_to_kv_pool` for our architecture."""
    from sglang.srt.runtime_context import get_schedule

    page_size = get_schedule().page_size
    cfg = v4_config_of(kvc.model_config)
    st = storage_choice(kvc.kv_cache_dtype_str, kvc.model_dtype)
    cls = _pool_class()
    return cls(cfg, st, size=sizes.max_total_num_tokens, page_size=page_size, device=kvc.device)


_POOL_CLASS: list = []


def _pool_class():
    if _POOL_CLASS:
        return _POOL_CLASS[0]
    KVCache = _kv_cache_base()

    class V4TokenToKVPool(KVCache):
        """All caches of all main layers. SGLang's own attention paths never touch it: the model reads
        and writes it through the core's `forward_paged` with block tables built by the backend."""

        def __init__(self, cfg: V4Config, st: StorageChoice, *, size: int, page_size: int, device):
            ratios = {LayerType.CSA.ratio, LayerType.HCA.ratio}
            if any(page_size % r for r in ratios):
                raise ValueError(f"v4_plugin: --page-size {page_size} must be a multiple of 128 "
                                 "(every compressed block must lie inside one page)")
            super().__init__(size, page_size, st.dtype, cfg.num_hidden_layers, device, False)
            self.cfg, self.st = cfg, st
            self.num_pages = size // page_size + 1  # SGLang's pages are 1 ... size / page_size; 0 pads
            self.layers: list[dict[str, torch.Tensor]] = []
            for kind in cfg.layer_types:
                bufs = {}
                for name, (width, dtype) in entry_specs(cfg, kind, st).items():
                    rows = page_size // kind.ratio if name in PER_ENTRY else page_size
                    bufs[name] = torch.zeros((self.num_pages, rows, width), dtype=dtype, device=device)
                self.layers.append(bufs)
            self.mem_usage = sum(t.numel() * t.element_size() for b in self.layers for t in b.values()) / 2**30
            logger.info("deepseek-v4-plugin: KV pool of %d token slots (page %d): %.4f GiB",
                        size, page_size, self.mem_usage)

        # SGLang's KVCache interface: raw K/V buffers do not exist here.
        def get_key_buffer(self, layer_id: int):
            return self.layers[layer_id]["window"]

        def get_value_buffer(self, layer_id: int):
            return self.layers[layer_id]["window"]

        def get_kv_buffer(self, layer_id: int):
            return self.get_key_buffer(layer_id), self.get_value_buffer(layer_id)

        def set_kv_buffer(self, *args, **kwargs):
            raise NotImplementedError("v4_plugin: caches are written by the core's forward_paged")

        def get_kv_size_bytes(self):
            return int(self.mem_usage * 2**30)

    V4TokenToKVPool.__module__ = __name__
    _POOL_CLASS.append(V4TokenToKVPool)
    return V4TokenToKVPool
