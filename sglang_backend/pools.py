"""SGLang memory pools holding DeepSeek-V4's caches in the core's layout, sized by `sglang_backend.capacity`.

The plugin opts the model into SGLang's hybrid-SWA memory (`is_hybrid_swa` on the HF config, set by
`plugin.rename_architecture`), so SGLang builds a `SWATokenToKVPoolAllocator`: every token of a
request holds a slot `loc` of the *full* pool and, while it is within the sliding window (or in the
step being computed), a slot of the *SWA* pool at `full_to_swa[loc]`. SGLang frees SWA slots leaving
the window, a page at a time, and its SWA-aware radix cache only matches prefixes whose window is
still resident. Slots come in pages of P = 128 k tokens, page-aligned in both pools (a token at
position p sits at offset p % P of its page in both), so:

* full pool (`V4TokenToKVPool.full_kv_pool`): compressed entries and indexer keys. Entry j of a
  request covers positions j*m ... j*m+m-1, all in one page, stored at data[page, j % (P/m)]; a
  page holds P/m entries. Block table: the request's full page ids, `req_to_token[req, ::P] // P`.
* SWA pool (`swa_kv_pool`): one row per position for the window entry and the compressor rows of
  the main and indexer compressors, at data[swa_page, p % P]. Block table: `full_to_swa[...] // P`
  of the same page-start slots; pages SGLang already evicted map to the padding page 0, which the
  core never reads (it reads the window of the last `sliding_window` positions and compressor rows
  of the last c*m <= 128 positions, all within the window SGLang keeps: eviction stops
  `sliding_window` positions before a step's first token).

Bytes per slot and pool sizes come from `sglang_backend.capacity.sglang_planned_capacity`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from sglang.srt.mem_cache.base_swa_memory_pool import BaseSWAKVPool
from sglang.srt.mem_cache.memory_pool import KVCache
from sglang.srt.model_executor.pool_configurator import (
    MemoryPoolConfig,
    MemoryPoolConfigurator,
    compute_swa_request_cap,
)

from v4_plugin.cache.formats import COMPRESSED_CACHES, EXACT, CacheFormat, KVStorage, cache_entry
from v4_plugin.cache.layout import IndexerCache
from v4_plugin.checkpoint.config import LayerType, V4Config, load_config
from v4_plugin.runtime.drafting import draft_layer_types
from v4_plugin.runtime.paged import LayerCaches, PagedCache
from v4_plugin.serving.settings import Settings, cache_format, resolve_model_dir

from .capacity import SglangCapacity, sglang_planned_capacity

logger = logging.getLogger(__name__)

SWA_CACHES = ("window", "state", "index_state")  # one row per position: SWA pool (the rest: the full pool)


# ---- formats ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StorageChoice:
    """What one served model stores: float entries (exact mode) or FP8 records (+ FP8/FP4 indexer keys)."""

    float_kv: bool
    indexer: IndexerCache | None  # None with float_kv
    dtype: torch.dtype  # element dtype of float entries (the model dtype)

    def cache_format(self) -> CacheFormat:
        return EXACT if self.float_kv else CacheFormat(kv=KVStorage.FP8, indexer=self.indexer)

    def capacity(self, cfg: V4Config, memory_bytes: int | None, **kwargs) -> SglangCapacity:
        """`sglang_planned_capacity` for this storage (kwargs: page_size and the SWA sizing mode)."""
        return sglang_planned_capacity(cfg, memory_bytes, fp8=not self.float_kv, indexer=self.indexer,
                                       dtype_bytes=torch.empty(0, dtype=self.dtype).element_size(), **kwargs)


def storage_choice(kv_cache_dtype: str | None, model_dtype: torch.dtype,
                   settings: Settings | None = None) -> StorageChoice:
    """What SGLang's `--kv-cache-dtype` stores (`v4_plugin.serving.settings.cache_format`; settings: default
    `Settings.from_env()`), float entries in the model dtype."""
    fmt = cache_format(kv_cache_dtype, settings)
    return StorageChoice(fmt.kv is KVStorage.FLOAT, fmt.indexer, model_dtype)


def v4_config_of(model_config) -> V4Config:
    """The checkpoint's config (`model_config`: SGLang's model config, or a view of its server arguments);
    a hub id's config.json is the one SGLang downloaded."""
    return load_config(resolve_model_dir(model_config.model_path, getattr(model_config, "revision", None),
                                         config_only=True, local_files_only=True))


# ---- the pool configurator (sizing) --------------------------------------------------------------
class V4PoolConfigurator(MemoryPoolConfigurator):
    """SGLang's pool configurator for our architecture: full and SWA token counts from
    `sglang_planned_capacity`, in SGLang's SWA sizing mode (see `sglang_backend.capacity`):

    * request cap, as SGLang's DSV4 configurator: `--max-running-requests` given, no explicit
      `--swa-full-tokens-ratio`, chunked prefill on. SWA tokens = `compute_swa_request_cap` plus,
      with the radix cache on, `--swa-prefix-tails` (default 4 per request) windows of cached prefixes;
    * ratio otherwise: SGLang's effective `--swa-full-tokens-ratio` (fallback 0.8).
    """

    def __init__(self, kvc):
        from sglang.srt.runtime_context import get_memory, get_schedule

        self.cfg = v4_config_of(kvc.model_config)
        self.st = storage_choice(kvc.kv_cache_dtype_str, kvc.model_dtype)
        self.window = self.cfg.sliding_window
        # EAGLE (MTP or the plugin's DSpark draft): the draft worker's pool (`build_token_pool`) holds the
        # drafter's windows on the same slots.
        drafting = kvc.spec_algorithm.is_eagle() and not kvc.is_draft_worker
        self.draft_layers = len(draft_layer_types(self.cfg)) if drafting else 0
        schedule = get_schedule()
        self.swa_cap_tokens: int | None = None
        self.swa_full_tokens_ratio: float | None = None
        if (schedule.max_running_requests is not None and not schedule._swa_full_tokens_ratio_explicitly_set
                and (schedule.chunked_prefill_size or 0) > 0):
            requests = max(1, schedule.max_running_requests // kvc.attn_dp_size)
            cap = compute_swa_request_cap(page_size=kvc.page_size, window=self.window,
                                          attn_dp_size=kvc.attn_dp_size)
            tails = 0 if get_memory().disable_radix_cache else (
                schedule.swa_prefix_tails if schedule.swa_prefix_tails is not None else 4 * requests)
            self.swa_cap_tokens = cap + tails * (self.window + kvc.page_size)
        else:
            self.swa_full_tokens_ratio = schedule.swa_full_tokens_ratio

    def _sizes(self, memory_bytes: int | None, page_size: int, max_full_tokens: int | None = None) -> SglangCapacity:
        cap = self.st.capacity(self.cfg, memory_bytes, page_size=page_size, max_full_tokens=max_full_tokens,
                               swa_full_tokens_ratio=self.swa_full_tokens_ratio, swa_tokens=self.swa_cap_tokens,
                               draft_layers=self.draft_layers)
        if cap.swa_tokens <= self.window + page_size:
            raise ValueError(f"deepseek-v4-plugin: an SWA pool of {cap.swa_tokens} tokens cannot hold one request "
                             f"(window {self.window} + page {page_size}); raise --swa-full-tokens-ratio, "
                             "--max-total-tokens or the cache memory")
        return cap

    def _config(self, cap: SglangCapacity, what: str) -> MemoryPoolConfig:
        mode = (f"ratio {self.swa_full_tokens_ratio}" if self.swa_cap_tokens is None
                else f"request cap {self.swa_cap_tokens}")
        logger.info("deepseek-v4-plugin: %s -> full %d token slots (%.2f B each), SWA %d (%d B each; %s)",
                    what, cap.full_tokens, cap.full_bytes_per_token, cap.swa_tokens, cap.swa_bytes_per_token, mode)
        return MemoryPoolConfig(max_total_num_tokens=cap.full_tokens, full_max_total_num_tokens=cap.full_tokens,
                                swa_max_total_num_tokens=cap.swa_tokens)

    def calculate_pool_sizes(self, available_bytes: int, page_size: int) -> MemoryPoolConfig:
        return self._config(self._sizes(available_bytes, page_size), f"{available_bytes} B of cache memory")

    def calculate_pool_sizes_from_max_tokens(self, max_total_num_tokens: int, page_size: int) -> MemoryPoolConfig:
        # A token cap below what the byte budget holds (SGLang sized that first): only the cap binds.
        cap = self._sizes(None, page_size, max_full_tokens=max_total_num_tokens)
        return self._config(cap, f"--max-total-tokens {max_total_num_tokens}")


# ---- the pool -----------------------------------------------------------------------------------
class _NoRawKV:
    """SGLang's raw K/V interface (abstract in `KVCache`): our caches are read and written by the
    core's `streams_paged` only."""

    def get_key_buffer(self, layer_id: int):
        raise NotImplementedError("v4_plugin: the caches have no SGLang K/V buffers")

    get_value_buffer = get_key_buffer
    get_kv_buffer = get_key_buffer

    def set_kv_buffer(self, *args, **kwargs):
        raise NotImplementedError("v4_plugin: caches are written by the core's streams_paged")


class V4CacheBuffers(_NoRawKV, KVCache):
    """One side (full or SWA) of the pool: per main layer, its caches [pages, rows per page, width],
    paged by SGLang's page id of that side (page 0 is SGLang's padding page)."""

    def __init__(self, specs: list[dict[str, tuple[int, int, torch.dtype]]], *, size: int, page_size: int,
                 dtype: torch.dtype, device, label: str):
        """specs: per main layer, cache name -> (rows per page, entry width, element dtype)."""
        super().__init__(size, page_size, dtype, len(specs), device, False, allocation_label=label)
        self.num_pages = size // page_size + 1
        self.layers: list[dict[str, torch.Tensor]] = [
            {name: torch.zeros((self.num_pages, rows, width), dtype=dt, device=device)
             for name, (rows, width, dt) in layer.items()}
            for layer in specs]
        self._finalize_allocation_log(size)

    def get_kv_size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())


class V4TokenToKVPool(_NoRawKV, BaseSWAKVPool):
    """All caches of all main layers, as SGLang's hybrid-SWA pool: compressed entries and indexer keys
    in `full_kv_pool`, window and compressor rows in `swa_kv_pool` (addressed via SGLang's full->SWA
    slot mapping). SGLang's own attention paths never touch it: the model reads and writes it through
    the core's `streams_paged`, with the `LayerCaches` of `layer_caches`."""

    def __init__(self, cfg: V4Config, st: StorageChoice, *, size: int, size_swa: int, page_size: int, device,
                 layer_types: tuple[LayerType, ...] | None = None):
        """layer_types: the layers whose caches this pool holds (default: the main layers; a draft
        model's pool: its draft blocks, `draft_layer_types`)."""
        if page_size % LayerType.HCA.ratio or page_size % LayerType.CSA.ratio:
            raise ValueError(f"v4_plugin: --page-size {page_size} must be a multiple of 128 "
                             "(every compressed block must lie inside one page)")
        layer_types = cfg.layer_types if layer_types is None else layer_types
        super().__init__(size, page_size, st.dtype, len(layer_types), device, False)
        self.cfg, self.st, self.size_swa = cfg, st, size_swa
        full_specs, swa_specs = [], []
        for kind in layer_types:
            entries = cache_entry(cfg, kind, st.cache_format(), st.dtype)
            full_specs.append({name: (page_size // kind.ratio, *entries[name]) for name in COMPRESSED_CACHES
                               if name in entries})
            swa_specs.append({name: (page_size, *entries[name]) for name in SWA_CACHES if name in entries})
        self.full_kv_pool = V4CacheBuffers(full_specs, size=size, page_size=page_size, dtype=st.dtype,
                                           device=device, label="V4 full (compressed)")
        self.swa_kv_pool = V4CacheBuffers(swa_specs, size=size_swa, page_size=page_size, dtype=st.dtype,
                                          device=device, label="V4 SWA (window + compressor rows)")
        self.full_to_swa_index_mapping: torch.Tensor | None = None
        self.mem_usage = self.get_kv_size_bytes() / 2**30
        logger.info("deepseek-v4-plugin: KV pool of %d full / %d SWA token slots (page %d): %.4f GiB",
                    size, size_swa, page_size, self.mem_usage)

    def get_kv_size_bytes(self) -> int:
        return self.full_kv_pool.get_kv_size_bytes() + self.swa_kv_pool.get_kv_size_bytes()

    # ---- BaseSWAKVPool -----------------------------------------------------------------------------
    def register_mapping(self, full_to_swa_index_mapping: torch.Tensor) -> None:
        self.full_to_swa_index_mapping = full_to_swa_index_mapping

    def translate_loc_from_full_to_swa(self, kv_indices: torch.Tensor) -> torch.Tensor:
        if self.full_to_swa_index_mapping is None:
            raise RuntimeError("v4_plugin: the SWA allocator has not registered its full->SWA mapping")
        return self.full_to_swa_index_mapping[kv_indices]

    def get_state_buf_infos(self):
        raise NotImplementedError("v4_plugin: PD disaggregation (SWA state transfer) is not supported")

    # ---- the core's view -----------------------------------------------------------------------------
    def layer_caches(self, page_starts: torch.Tensor) -> list[LayerCaches]:
        """Per main layer, the core's `LayerCaches` for a batch.

        page_starts: int64 [num_seqs, pages], the full-pool slot of the first position of each page of
        each sequence (`req_to_token[req, ::P]`). Full-pool block table: slot // P; SWA block table:
        full_to_swa[slot] // P (0, the padding page, for pages SGLang already evicted).
        """
        full_pages = torch.div(page_starts, self.page_size, rounding_mode="floor")
        swa_pages = torch.div(self.translate_loc_from_full_to_swa(page_starts), self.page_size, rounding_mode="floor")
        return [LayerCaches(**{name: PagedCache(buf, full_pages) for name, buf in full.items()},
                            **{name: PagedCache(buf, swa_pages) for name, buf in swa.items()})
                for full, swa in zip(self.full_kv_pool.layers, self.swa_kv_pool.layers)]


def build_token_pool(kvc, *, sizes, **_) -> V4TokenToKVPool:
    """AROUND `KVCacheConfigurator._build_token_to_kv_pool` for our architecture. A draft worker's
    pool holds its draft blocks' caches on the slots of the target's allocator (same sizes)."""
    from sglang.srt.runtime_context import get_schedule

    if sizes.swa_max_total_num_tokens is None:
        raise RuntimeError("v4_plugin: SGLang did not size an SWA pool (is_hybrid_swa is off for the model)")
    cfg = v4_config_of(kvc.model_config)
    return V4TokenToKVPool(cfg, storage_choice(kvc.kv_cache_dtype_str, kvc.model_dtype),
                           size=sizes.full_max_total_num_tokens, size_swa=sizes.swa_max_total_num_tokens,
                           page_size=get_schedule().page_size, device=kvc.device,
                           layer_types=draft_layer_types(cfg) if kvc.is_draft_worker else None)
