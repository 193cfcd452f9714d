"""vLLM's side of `v4-plugin kv-plan --framework vllm`, importable without vLLM: the block sizes of the
caches the adapter declares, vLLM's names of the DeepSeek-V4 drafters, and the token capacity of a
cache budget under vLLM's block manager, from `v4_plugin.cache.layout`'s bytes alone. The CLI plans
with it; the adapter's tests hold vLLM's own logged figures to it.

## The capacity model

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

import argparse
from dataclasses import dataclass

import torch

from v4_plugin.cache.formats import KVStorage
from v4_plugin.cache.layout import IndexerCache, compressor_state_bytes, indexer_entry_bytes, main_entry_bytes
from v4_plugin.checkpoint.config import LayerType, V4Config
from v4_plugin.runtime.drafting import Method, SpeculativeConfigError, SpeculativePlan, plan_speculation
from v4_plugin.serving.settings import FP8_CACHE_DTYPES, kv_storage

# The block sizes (tokens per block id) of the caches the adapter declares (`vllm_backend.kv_specs`).
BLOCK = 256  # compressed caches: a multiple of 128, so every block holds whole C128 entries
WINDOW_BLOCK = 64
STATE_BLOCK = {LayerType.CSA: 4, LayerType.HCA: 8}

GIB = 1 << 30


# ---- drafter names -----------------------------------------------------------------------------------
METHODS: dict[str, Method] = {"mtp": Method.MTP, "deepseek_mtp": Method.MTP, "dspark": Method.DSPARK}
"""vLLM's `--speculative-config` methods that run a DeepSeek-V4 drafter ("deepseek_mtp" is vLLM's
deprecated alias of "mtp"); other methods (ngram, suffix, ...) involve no V4 drafter."""


def method_of(name: str | None) -> Method | None:
    """The V4 drafter a vLLM speculative `method` names, or None (not a V4 drafter)."""
    return METHODS.get(str(name).lower()) if name is not None else None


def plan_vllm_speculation(cfg: V4Config, method: str, num_speculative_tokens: int | None = None) -> SpeculativePlan:
    """`plan_speculation` for vLLM's `method` name; `SpeculativeConfigError` for a method without a V4 drafter."""
    chosen = method_of(method)
    if chosen is None:
        raise SpeculativeConfigError(
            f"speculative method {method!r} is not available for DeepSeek-V4; use 'mtp' (04-24 checkpoints; also "
            "'deepseek_mtp') or 'dspark' (-0731/-0813 checkpoints)")
    return plan_speculation(cfg, chosen, num_speculative_tokens)


# ---- the capacity model ------------------------------------------------------------------------------
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


# ---- kv-plan --framework vllm ------------------------------------------------------------------------
def kv_plan(args: argparse.Namespace, cfg: V4Config, name: str) -> tuple[dict, list[tuple[str, str]], str]:
    """`v4-plugin kv-plan --framework vllm`: vLLM's startup capacity for our KV specs
    (`vllm_planned_capacity`) from the parsed flags -> (JSON fields, table rows, the line vLLM logs)."""
    if args.max_num_batched_tokens is None:
        raise ValueError("--framework vllm needs --max-num-batched-tokens (vLLM's default depends on the device: "
                         "`vllm serve` uses 8192 on H100/H200, 16384 on GPUs of 160 GB or more, 2048 on CPU)")
    fp8 = kv_storage(args.kv_cache_dtype) is KVStorage.FP8
    if args.indexer_cache is not None and not fp8:
        raise ValueError(f"--indexer-cache applies to FP8 KV caches (--kv-cache-dtype "
                         f"{'|'.join(FP8_CACHE_DTYPES)}); with {args.kv_cache_dtype!r} the indexer keys are "
                         "stored in the model dtype")
    indexer = IndexerCache(args.indexer_cache or "fp8") if fp8 else None
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype  # every V4 checkpoint's torch_dtype
    max_model_len = args.max_model_len or cfg.max_position_embeddings
    for flag, value in (("--kv-cache-memory", args.kv_cache_memory), ("--max-model-len", max_model_len),
                        ("--max-num-batched-tokens", args.max_num_batched_tokens)):
        if value <= 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    async_scheduling = args.device == "gpu" if args.async_scheduling is None else args.async_scheduling
    in_flight = 2 if async_scheduling else 1  # VllmConfig.max_concurrent_batches without pipeline parallelism
    draft_layers, drafting = _drafting(args.speculative_config, cfg)
    cap = vllm_planned_capacity(cfg, args.kv_cache_memory, max_model_len=max_model_len,
                                max_num_batched_tokens=args.max_num_batched_tokens, fp8=fp8, indexer=indexer,
                                dtype_bytes=getattr(torch, dtype).itemsize, in_flight_batches=in_flight,
                                draft_layers=draft_layers)
    line = (f"{args.device.upper()} KV cache size: {cap.tokens:,} tokens, Maximum concurrency for "
            f"{max_model_len:,} tokens per request: {cap.max_concurrency:.2f}x")
    block_note = "fixed by the plugin"
    if args.block_size is not None and args.block_size != BLOCK:
        block_note += f"; --block-size {args.block_size} is overridden, as the plugin logs"
    fields = {
        "framework": "vllm", "model": name, "kv_cache_memory_bytes": args.kv_cache_memory, "block_size": BLOCK,
        "kv_cache_dtype": args.kv_cache_dtype, "indexer_cache": indexer.value if indexer else "float",
        "dtype": dtype, "max_model_len": max_model_len, "max_num_batched_tokens": args.max_num_batched_tokens,
        "async_scheduling": async_scheduling, "draft_layers": draft_layers, "bytes_per_block": cap.slab_bytes,
        "bytes_per_token": cap.bytes_per_token, "num_blocks": cap.num_blocks,
        "blocks_per_request": cap.blocks_per_request, "kv_cache_size_tokens": cap.tokens,
        "max_concurrency": cap.max_concurrency, "log_line": line,
    }
    entries = (f"{main_entry_bytes(cfg)}-B FP8 records, {indexer.value} indexer keys" if fp8
               else f"{dtype} entries and indexer keys")
    rows = [
        ("model", name),
        ("framework", "vLLM 0.32 / 0.33 with deepseek-v4-plugin's KV specs"),
        ("KV cache memory", f"{args.kv_cache_memory:,} B ({args.kv_cache_memory / GIB:,.2f} GiB)"),
        ("block size", f"{BLOCK} tokens ({block_note})"),
        ("KV cache dtype", f"{args.kv_cache_dtype} ({entries})"),
        ("speculative decoding", drafting),
        ("bytes per block", f"{cap.slab_bytes:,} B = {cap.bytes_per_token:,.4f} B per token"),
        ("blocks", f"{cap.num_blocks:,}"),
        ("blocks per request", f"{cap.blocks_per_request:,} (compressed caches of {max_model_len:,} tokens + "
                               f"window/state reserve for {in_flight} x {args.max_num_batched_tokens:,} tokens "
                               "in flight)"),
    ]
    return fields, rows, line


def _drafting(spec: dict | None, cfg: V4Config) -> tuple[int, str]:
    """--speculative-config -> (drafter blocks whose window caches vLLM allocates, a description)."""
    if spec is None:
        return 0, "off"
    if not isinstance(spec, dict) or "method" not in spec:
        raise ValueError(f"--speculative-config must be a JSON object with a 'method', got {spec!r}")
    plan = plan_vllm_speculation(cfg, str(spec["method"]), spec.get("num_speculative_tokens"))
    n = cfg.num_nextn_predict_layers if plan.method is Method.MTP else cfg.dspark.num_stages
    what = "MTP block" if plan.method is Method.MTP else "DSpark stage"
    return n, (f"{plan.method.value}, {plan.num_speculative_tokens} drafts per step (+{n} window cache{'s' * (n > 1)}, "
               f"one per {what})")
