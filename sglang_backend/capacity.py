"""SGLang's side of `v4-plugin kv-plan --framework sglang`, importable without SGLang: the plugin's page
size, SGLang's names of the DeepSeek-V4 drafters, and the sizes of the plugin's hybrid-SWA pools for a
cache budget, from `v4_plugin.cache.layout`'s bytes alone. The pools (`sglang_backend.pools`) are
sized with it and the CLI plans with it.

## The pool model

SGLang (0.5.23) has no block manager: its allocator hands out token slots in pages of P tokens
(P a multiple of 128, so every compressed block lies inside one page). With hybrid-SWA memory
(`SWATokenToKVPoolAllocator`), every token of a request holds a slot of the *full* pool and, while
it is among the last `sliding_window` positions (or in the step being computed), a slot of the
*SWA* pool; SGLang frees SWA slots leaving the window, a page at a time.

* full slot: the compressed entries and indexer keys, amortised over their ratio (a page of P
  slots holds P/m entries): exactly `layout.plan(cfg).bytes_per_token` for FP8 records;
* SWA slot: the raw window entry of every layer and the compressor rows of that position
  ([value | ape-biased gate], fp32), which the core's paged execution keeps per position.

SGLang sizes the SWA pool in one of two ways, and the plugin's pool configurator follows it:

* ratio (default): swa_tokens = full_tokens * swa_full_tokens_ratio (SGLang's
  `--swa-full-tokens-ratio`, fallback 0.8), both floored to whole pages, and
  full_tokens = memory / (full_bytes + ratio * swa_bytes);
* request cap (`--max-running-requests` given, ratio not given, chunked prefill on): a fixed
  swa_tokens, SGLang's own worst case for that many requests (`compute_swa_request_cap`:
  window + eviction interval + 2 pages per request, plus the prefill chunks in flight), and
  full_tokens = (memory - swa_tokens * swa_bytes) / full_bytes.

max_total_num_tokens, what SGLang reports, is full_tokens. SGLang's padding page 0 of each pool
is not budgeted (as in SGLang's own configurators).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from v4_plugin.cache.formats import KVStorage
from v4_plugin.cache.layout import IndexerCache, compressor_state_bytes, indexer_entry_bytes, main_entry_bytes
from v4_plugin.checkpoint.config import LayerType, V4Config
from v4_plugin.runtime.drafting import (Method, SpeculativeConfigError, SpeculativePlan, draft_layer_types,
                                        plan_speculation)
from v4_plugin.serving.settings import FP8_CACHE_DTYPES, kv_storage

PAGE_SIZE = 128  # the plugin's default --page-size: a multiple of every compress ratio (4, 128)
SWA_RATIO = 0.8  # SGLang's fallback --swa-full-tokens-ratio

GIB = 1 << 30


# ---- drafter names -----------------------------------------------------------------------------------
ALGORITHMS: dict[str, Method] = {"nextn": Method.MTP, "eagle": Method.MTP, "dspark": Method.DSPARK}
"""SGLang's `--speculative-algorithm` names (any case) of the DeepSeek-V4 drafters: NEXTN and EAGLE run the
MTP block for DeepSeek models, DSPARK the refreshes' DSpark stages."""
FLAGS: dict[Method, str] = {Method.MTP: "--speculative-algorithm NEXTN or EAGLE",
                            Method.DSPARK: "--speculative-algorithm DSPARK"}


def plan_sglang_speculation(cfg: V4Config, algorithm: str,
                            num_speculative_tokens: int | None = None) -> SpeculativePlan:
    """`plan_speculation` for SGLang's `--speculative-algorithm`; `SpeculativeConfigError` (naming the
    SGLang flag of the drafter the checkpoint carries) for an algorithm without a V4 drafter or a
    drafter the checkpoint does not carry."""
    chosen = ALGORITHMS.get(algorithm.lower())
    if chosen is None:
        raise SpeculativeConfigError(
            f"speculative algorithm {algorithm!r} is not available for DeepSeek-V4; use NEXTN or EAGLE (04-24 "
            "checkpoints: the MTP block) or DSPARK (-0731/-0813 checkpoints)")
    try:
        return plan_speculation(cfg, chosen, num_speculative_tokens)
    except SpeculativeConfigError as e:
        if e.suggested is None:
            raise
        raise SpeculativeConfigError(f"{e} (SGLang: {FLAGS[e.suggested]})", e.suggested) from None


# ---- the pool model ----------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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


# ---- kv-plan --framework sglang ----------------------------------------------------------------------
def kv_plan(args: argparse.Namespace, cfg: V4Config, name: str) -> tuple[dict, list[tuple[str, str]], str]:
    """`v4-plugin kv-plan --framework sglang`: SGLang's pool sizes for our hybrid-SWA pools
    (`sglang_planned_capacity`) from the parsed flags -> (JSON fields, table rows, the line to compare)."""
    fp8 = kv_storage(args.kv_cache_dtype) is KVStorage.FP8
    if args.indexer_cache is not None and not fp8:
        raise ValueError(f"--indexer-cache applies to FP8 KV caches (--kv-cache-dtype {'|'.join(FP8_CACHE_DTYPES)})")
    if args.swa_tokens is not None and args.swa_full_tokens_ratio is not None:
        raise ValueError("give --swa-full-tokens-ratio or --swa-tokens, not both")
    page = args.page_size or PAGE_SIZE
    indexer = IndexerCache(args.indexer_cache or "fp8") if fp8 else None
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    ratio = None if args.swa_tokens is not None else (args.swa_full_tokens_ratio or SWA_RATIO)
    draft_layers = 0
    if args.speculative_algorithm is not None:
        plan_sglang_speculation(cfg, args.speculative_algorithm)  # the checkpoint carries this drafter
        draft_layers = len(draft_layer_types(cfg))  # the drafter's windows on each SWA slot
    cap = sglang_planned_capacity(cfg, args.kv_cache_memory, page_size=page, swa_full_tokens_ratio=ratio,
                                  swa_tokens=args.swa_tokens, max_full_tokens=args.max_total_tokens, fp8=fp8,
                                  indexer=indexer, dtype_bytes=getattr(torch, dtype).itemsize,
                                  draft_layers=draft_layers)
    line = f"max_total_num_tokens={cap.full_tokens}, SWA pool {cap.swa_tokens} tokens"
    mode = f"--swa-tokens {args.swa_tokens}" if ratio is None else f"--swa-full-tokens-ratio {ratio:g}"
    fields = {
        "framework": "sglang", "model": name, "kv_cache_memory_bytes": args.kv_cache_memory, "page_size": page,
        "kv_cache_dtype": args.kv_cache_dtype, "indexer_cache": indexer.value if indexer else "float",
        "dtype": dtype, "swa_full_tokens_ratio": ratio, "full_bytes_per_token": cap.full_bytes_per_token,
        "swa_bytes_per_token": cap.swa_bytes_per_token, "max_total_num_tokens": cap.full_tokens,
        "swa_tokens": cap.swa_tokens, "draft_layers": draft_layers, "log_line": line,
    }
    rows = [
        ("model", name),
        ("framework", "SGLang 0.5.23 with deepseek-v4-plugin's hybrid-SWA pools"),
        ("KV cache memory", f"{args.kv_cache_memory:,} B ({args.kv_cache_memory / GIB:,.2f} GiB)"),
        ("page size", f"{page} tokens"),
        ("SWA sizing", mode),
        ("full slot", f"{cap.full_bytes_per_token:,.4f} B (compressed entries + indexer keys)"),
        ("SWA slot", f"{cap.swa_bytes_per_token:,} B (window entries + compressor rows"
                     f"{_drafter_windows(cfg, draft_layers)})"),
    ]
    return fields, rows, line


def _drafter_windows(cfg: V4Config, n: int) -> str:
    if not n:
        return ""
    return " + the MTP draft window" if cfg.dspark is None else f" + {n} DSpark stage windows"
