"""Token capacity of a cache budget under each serving framework's block manager, from
`v4_plugin.layout`'s bytes alone (no framework import): what `v4-plugin kv-plan` predicts and what the
adapters' tests hold the frameworks' own logged figures to.

## vLLM

vLLM (0.32/0.33, packed block-outermost layout) sizes one pool of `num_blocks` block ids; a block
id addresses one slab in every cache group. The slab is the largest group's bytes per block: the
compressed-KV group (every CSA/HCA `compressed` and CSA `index_keys` page of 256 tokens); the window
and compressor-state layers are split into as many groups as needed to fit in that slab. Startup
logs `KV cache size: T tokens, Maximum concurrency for L tokens per request: C`, with

    C = num_blocks / sum over groups of (blocks one request of L tokens may hold)
    T = int(C * L)

where a sliding-window group of block b and window w charges every request
`cdiv(min(w - 1 + I, L), b) + 1` blocks (I = tokens in flight per step = max_num_batched_tokens),
and the compressed group `cdiv(L, 256)`. Hence T is far below `num_blocks * 256` when I is large:
the window/state reserve is charged per request. Storage per token is `slab / 256` (no padding:
our specs declare no alignment).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import LayerType, V4Config
from .layout import IndexerCache, compressor_state_bytes, indexer_entry_bytes, main_entry_bytes

# The block sizes (tokens per block id) of the caches the vLLM adapter declares (`vllm_backend.kv_specs`).
BLOCK = 256  # compressed caches: a multiple of 128, so every block holds whole C128 entries
WINDOW_BLOCK = 64
STATE_BLOCK = {LayerType.CSA: 4, LayerType.HCA: 8}

# vLLM's --kv-cache-dtype values the adapter serves: `auto` stores entries in the model dtype (float
# indexer keys); the FP8 names store 584-B records and FP8 / FP4 indexer keys.
VLLM_FP8_CACHE_DTYPES = ("fp8", "fp8_e4m3", "fp8_ds_mla")
VLLM_CACHE_DTYPES = ("auto", *VLLM_FP8_CACHE_DTYPES)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class VllmCapacity:
    slab_bytes: int  # bytes per block id (256 tokens)
    num_blocks: int
    blocks_per_request: int  # for one request of max_model_len tokens, all groups
    max_concurrency: float
    tokens: int  # what vLLM logs as "KV cache size: N tokens"

    @property
    def bytes_per_token(self) -> float:
        return self.slab_bytes / BLOCK


def _approximate_gcd(values: list[int], lower_bound: int) -> int:
    """vLLM's choice of layer repeats per group: the d >= lower_bound with least padding (ties: larger d)."""
    best, best_pad = lower_bound, None
    for d in range(max(1, lower_bound), max(values) + 1):
        pad = sum((d - x % d) % d for x in values)
        if best_pad is None or pad < best_pad or (pad == best_pad and d > best):
            best, best_pad = d, pad
    return best


@dataclass
class _Bucket:
    pages: dict[int, int]  # page bytes -> layers with that page (insertion order = layer order)
    block: int
    window: int | None  # None: the compressed (full-attention) bucket

    def add(self, page: int) -> None:
        self.pages[page] = self.pages.get(page, 0) + 1

    @property
    def layers(self) -> int:
        return sum(self.pages.values())

    @property
    def balanced(self) -> bool:
        return len(set(self.pages.values())) == 1

    def widest(self, n: int) -> int:
        return sum(_cdiv(count, n) * page for page, count in self.pages.items())


def vllm_planned_capacity(cfg: V4Config, memory_bytes: int, *, max_model_len: int, max_num_batched_tokens: int,
                     fp8: bool = True, indexer: IndexerCache | None = IndexerCache.FP8,
                     dtype_bytes: int = 2, in_flight_batches: int = 1, draft_layers: int = 0) -> VllmCapacity:
    """Closed-form model of vLLM's KV capacity for our specs (the formula for the planner).

    fp8: 584-B records (`--kv-cache-dtype fp8*`) or entries of `dtype_bytes` per element (`auto`);
    indexer: key format for FP8 caches (None = float keys, the `auto` case). draft_layers: drafter
    blocks with a window cache each (`--speculative-config`: the MTP block, or the DSpark stages). Mirrors vLLM 0.32's
    `_get_packed_kv_cache_groups` (buckets by spec type/block/window, split into groups by a common
    number of layer repeats) and `get_max_concurrency_for_kv_cache_config`.
    """
    main = main_entry_bytes(cfg) if fp8 else cfg.head_dim * dtype_bytes
    idx = indexer_entry_bytes(cfg, indexer) if indexer is not None else cfg.index_head_dim * dtype_bytes
    L, I = max_model_len, max_num_batched_tokens * in_flight_batches

    # Buckets in the order vLLM meets the layers (per layer: window, state, compressed, index_state, index_keys).
    buckets: dict[tuple, _Bucket] = {}

    def bucket(block: int, window: int | None) -> _Bucket:
        return buckets.setdefault((block, window), _Bucket({}, block, window))

    for kind in (*cfg.layer_types, *[LayerType.SWA] * draft_layers):
        bucket(WINDOW_BLOCK, cfg.sliding_window).add(WINDOW_BLOCK * main)
        if kind is LayerType.SWA:
            continue
        c, m, b = (2 if kind is LayerType.CSA else 1), kind.ratio, STATE_BLOCK[kind]
        bucket(b, c * m).add(b * compressor_state_bytes(cfg, kind) // (c * m))
        bucket(BLOCK, None).add(BLOCK // m * main)
        if kind is LayerType.CSA:
            bucket(b, c * m).add(b * compressor_state_bytes(cfg, kind, indexer=True) // (c * m))
            bucket(BLOCK, None).add(BLOCK // m * idx)

    all_b = list(buckets.values())
    min_repeats = max((max(b.pages.values()) for b in all_b if b.balanced and len(b.pages) > 1), default=0)
    repeats = (_approximate_gcd([max(b.pages.values()) for b in all_b if b.balanced], min_repeats)
               if min_repeats else None)

    def num_groups(b: _Bucket) -> int:
        return _cdiv(max(b.pages.values()), repeats) if b.balanced and repeats is not None else 1

    def is_state(b: _Bucket) -> bool:
        return repeats is None and b.window is not None

    anchor = max(b.widest(b.layers if is_state(b) else num_groups(b)) for b in all_b)
    slab, per_request = 0, 0
    for b in all_b:
        n = num_groups(b)
        if anchor and is_state(b):
            n = max(n, _cdiv(b.layers, max(anchor // next(iter(b.pages)), 1)))
        slab = max(slab, b.widest(n))
        held = _cdiv(L, b.block) if b.window is None else _cdiv(min(b.window - 1 + I, L), b.block) + 1
        per_request += n * held
    num_blocks = memory_bytes // slab
    concurrency = num_blocks / per_request
    return VllmCapacity(slab, num_blocks, per_request, concurrency, int(concurrency * L))


# ---- SGLang --------------------------------------------------------------------------------------
#
# SGLang (0.5.23) has no block manager: its allocator hands out token slots in pages of P tokens
# (P a multiple of 128, so every compressed block lies inside one page). With hybrid-SWA memory
# (`SWATokenToKVPoolAllocator`), every token of a request holds a slot of the *full* pool and, while
# it is among the last `sliding_window` positions (or in the step being computed), a slot of the
# *SWA* pool; SGLang frees SWA slots leaving the window, a page at a time.
#
# * full slot: the compressed entries and indexer keys, amortised over their ratio (a page of P
#   slots holds P/m entries): exactly `layout.plan(cfg).bytes_per_token` for FP8 records;
# * SWA slot: the raw window entry of every layer and the compressor rows of that position
#   ([value | ape-biased gate], fp32), which the core's paged execution keeps per position.
#
# SGLang sizes the SWA pool in one of two ways, and the plugin's pool configurator follows it:
#
# * ratio (default): swa_tokens = full_tokens * swa_full_tokens_ratio (SGLang's
#   `--swa-full-tokens-ratio`, fallback 0.8), both floored to whole pages, and
#   full_tokens = memory / (full_bytes + ratio * swa_bytes);
# * request cap (`--max-running-requests` given, ratio not given, chunked prefill on): a fixed
#   swa_tokens, SGLang's own worst case for that many requests (`compute_swa_request_cap`:
#   window + eviction interval + 2 pages per request, plus the prefill chunks in flight), and
#   full_tokens = (memory - swa_tokens * swa_bytes) / full_bytes.
#
# max_total_num_tokens, what SGLang reports, is full_tokens. SGLang's padding page 0 of each pool
# is not budgeted (as in SGLang's own configurators).


@dataclass(frozen=True)
class SglangCapacity:
    full_bytes_per_token: float  # compressed entries + indexer keys per full-pool slot
    swa_bytes_per_token: int  # window entries + compressor rows per SWA-pool slot
    full_tokens: int  # max_total_num_tokens
    swa_tokens: int

    @property
    def bytes(self) -> float:
        """Cache bytes the two pools take (padding pages excluded)."""
        return self.full_tokens * self.full_bytes_per_token + self.swa_tokens * self.swa_bytes_per_token


def sglang_slot_bytes(cfg: V4Config, *, fp8: bool = True, indexer: IndexerCache | None = IndexerCache.FP8,
                      dtype_bytes: int = 2, draft_layers: int = 0) -> tuple[float, int]:
    """(bytes per full-pool slot, bytes per SWA-pool slot) over the main layers and `draft_layers`
    drafter blocks (EAGLE/NEXTN: the MTP block, whose window lives in the draft worker's pool on the
    target's SWA slots: one more window entry per SWA slot).

    fp8: 584-B records (`--kv-cache-dtype fp8*`), else float entries of `dtype_bytes` per element
    (`auto`, the model dtype); indexer: key format of FP8 caches (None = float keys).
    """
    main = main_entry_bytes(cfg) if fp8 else cfg.head_dim * dtype_bytes
    idx = indexer_entry_bytes(cfg, indexer) if indexer is not None else cfg.index_head_dim * dtype_bytes
    full, swa = 0.0, 0
    for kind in cfg.layer_types:
        swa += main
        if kind is LayerType.SWA:
            continue
        rows = 2 * kind.ratio if kind is LayerType.CSA else kind.ratio  # positions a compressor state spans
        full += main / kind.ratio
        swa += compressor_state_bytes(cfg, kind) // rows
        if kind is LayerType.CSA:
            full += idx / kind.ratio
            swa += compressor_state_bytes(cfg, kind, indexer=True) // rows
    return full, swa + draft_layers * main


def sglang_planned_capacity(cfg: V4Config, memory_bytes: int | None, *, page_size: int,
                            swa_full_tokens_ratio: float | None = None, swa_tokens: int | None = None,
                            max_full_tokens: int | None = None, fp8: bool = True,
                            indexer: IndexerCache | None = IndexerCache.FP8, dtype_bytes: int = 2,
                            draft_layers: int = 0) -> SglangCapacity:
    """SGLang's pool sizes for `memory_bytes` of cache memory (None: unbounded) and at most
    `max_full_tokens` full slots (`--max-total-tokens`), in ratio mode (`swa_full_tokens_ratio`) or
    request-cap mode (`swa_tokens`: SGLang's cap for --max-running-requests); give exactly one.
    `draft_layers`: drafter blocks whose windows share the SWA slots (`sglang_slot_bytes`)."""
    if (swa_full_tokens_ratio is None) == (swa_tokens is None):
        raise ValueError("sglang_planned_capacity: give swa_full_tokens_ratio or swa_tokens, not both")
    if page_size % LayerType.HCA.ratio:
        raise ValueError(f"page_size {page_size} is not a multiple of {LayerType.HCA.ratio}")
    if memory_bytes is None and max_full_tokens is None:
        raise ValueError("sglang_planned_capacity: give memory_bytes or max_full_tokens")
    full_b, swa_b = sglang_slot_bytes(cfg, fp8=fp8, indexer=indexer, dtype_bytes=dtype_bytes, draft_layers=draft_layers)
    swa = None if swa_tokens is None else _cdiv(swa_tokens, page_size) * page_size
    full = max_full_tokens if max_full_tokens is not None else memory_bytes
    if memory_bytes is not None:
        if swa is None:
            by_bytes = int(max(0, memory_bytes) // (full_b + swa_full_tokens_ratio * swa_b))
        else:
            by_bytes = int(max(0, memory_bytes - swa * swa_b) // full_b)
        full = by_bytes if max_full_tokens is None else min(by_bytes, max_full_tokens)
    full = full // page_size * page_size
    if swa is None:
        swa = int(full * swa_full_tokens_ratio) // page_size * page_size
    return SglangCapacity(full_b, swa_b, full, swa)
