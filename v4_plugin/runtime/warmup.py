"""Kernel warm-up: compile and autotune the Triton kernels for a served model's decode shapes at
startup, so that first requests do not stall on compilation."""

from __future__ import annotations

import logging
import os
import time
from typing import Collection

import torch

from v4_plugin.cache.formats import CacheFormat, KVStorage
from v4_plugin.cache.layout import indexer_entry_bytes, main_entry_bytes
from v4_plugin.checkpoint.config import V4Config
from v4_plugin.checkpoint.schema import Format, checkpoint_tensors
from v4_plugin.runtime import dispatch
from v4_plugin.runtime.model import V4Model

logger = logging.getLogger(__name__)

WARMUP_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # decode batch sizes: the GEMMs' M buckets, attention's query buckets
WARMUP_CONTEXTS = (4096, 32768, 131072)  # the indexer's key-count buckets (context / 4 keys)


def warm_up(model: V4Model, fmt: CacheFormat, batch_sizes: Collection[int] = WARMUP_BATCHES,
           contexts: Collection[int] = WARMUP_CONTEXTS) -> float:
    """Compile and autotune the kernels for the decode shapes of `model` (a `V4Model` on its device)
    with caches in `fmt` , so that first requests do not stall on compilation:
    every distinct kept-FP8 linear, the MoE and mHC at each batch size in `batch_sizes`, paged attention
    over a window, window + top-k and window + a long HCA slot list, the indexer scores of paged keys at
    each of `contexts` and its top-k. Runs on dummy inputs, writes no model state; logs and returns its time in seconds (0 where
    the kernels do not serve the model's device, or with V4_PLUGIN_WARMUP=off). Inside `use_kernels_on_cpu`
    it also runs on the CPU (tests)."""
    if "embed.weight" not in model.w:  # a drafter's model (its own blocks only): the main model warms the kernels
        return 0.0
    device = model.w("embed.weight").device
    if not dispatch.kernels_serve(device) or os.environ.get("V4_PLUGIN_WARMUP", "on") == "off":
        return 0.0
    start = time.perf_counter()
    cfg, dtype = model.cfg, model.dtype
    act_q = model.quant.activations and cfg.quantized
    linears = {}
    for spec in checkpoint_tensors(cfg, include_mtp=False):
        name = f"{spec.name}.weight"
        if spec.format is Format.FP8 and ".experts." not in name and name in model.w:
            weight = model.w.linear(name)
            if weight.fp8 is not None:
                linears.setdefault((tuple(weight.fp8[0].shape), weight.fp8[1].dtype), weight)
    moe_layer = f"layers.{cfg.num_hidden_layers - 1}.ffn"  # a score-routed layer; every MoE layer has its shapes
    experts = model.w.moe(moe_layer, cfg.n_routed_experts)
    h, d, window = model.blocks[0].heads, cfg.head_dim, cfg.sliding_window  # heads: this rank's
    kv_rows = 4096 + window
    if fmt.kv is KVStorage.FP8:
        kv = torch.zeros(kv_rows, main_entry_bytes(cfg), dtype=torch.uint8, device=device)
    else:
        kv = torch.zeros(kv_rows, d, dtype=dtype, device=device)
    sink = torch.zeros(h, device=device)
    with torch.inference_mode():
        for m in batch_sizes:
            x = torch.zeros(m, cfg.hidden_size, dtype=dtype, device=device)
            for weight in linears.values():
                dispatch.linear(torch.zeros(m, weight.fp8[0].shape[1], dtype=dtype, device=device), weight, act_q)
            ids = torch.arange(m * cfg.num_experts_per_tok, device=device).view(m, -1) % cfg.n_routed_experts
            routing = torch.full(ids.shape, 1.0 / ids.shape[1], device=device)
            if experts.packed is not None:  # (dense experts have no kernel; warming would dequantize them all)
                dispatch.moe(x, routing, ids, experts, limit=cfg.swiglu_limit, quantize_input=act_q)
            q = torch.zeros(m, h, d, dtype=dtype, device=device)
            slots = lambda s: torch.zeros(m, s, dtype=torch.long, device=device)  # noqa: E731
            for compressed in (None, cfg.index_topk, 1024):  # SWA, CSA and an HCA layer at 128K
                extra = None if compressed is None else (kv, slots(compressed))
                dispatch.attention_paged(q, (kv, slots(window)), extra, sink, d**-0.5, cfg, fmt.kv is KVStorage.FP8)
            _warm_indexer(cfg, fmt, m, contexts, dtype, device)
            _warm_mhc(model, m, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    logger.info(
        "deepseek-v4-plugin: kernel warm-up for decode batches %s: %d FP8 linear shapes, MoE, attention, "
        "indexer in %.1f s", list(batch_sizes), len(linears), seconds)
    return seconds


def _warm_mhc(model: V4Model, m: int, device: torch.device) -> None:
    """hc_pre, hc_post and hc_head on m tokens' zero streams with layer 0's and the head's parameters."""
    cfg = model.cfg
    streams = torch.zeros(m, cfg.hc_mult, cfg.hidden_size, dtype=model.dtype, device=device)
    params = lambda prefix: [model.w(f"{prefix}_{p}", keep_dtype=True) for p in ("fn", "scale", "base")]  # noqa: E731
    u, post, comb = dispatch.hc_pre(streams, *params("layers.0.hc_attn"), norm_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps,
                           sinkhorn_iters=cfg.hc_sinkhorn_iters)
    dispatch.hc_post(u, streams, post, comb)
    dispatch.hc_head(streams, *params("hc_head"), norm_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps)


def _warm_indexer(cfg: V4Config, fmt: CacheFormat, m: int, contexts: Collection[int], dtype: torch.dtype,
                  device: torch.device) -> None:
    """The indexer's score kernel at `contexts` (context / 4 keys) and its top-k: m sequences of one query."""
    hi, di = cfg.index_n_heads, cfg.index_head_dim
    q = torch.zeros(m, hi, di, dtype=dtype, device=device)
    weights = torch.zeros(m, hi, device=device)
    seqs = torch.arange(m + 1, device=device)
    for context in contexts:
        n = context // 4
        if fmt.indexer is None:
            keys = torch.zeros(n, di, dtype=dtype, device=device)
        else:
            keys = torch.zeros(n, indexer_entry_bytes(cfg, fmt.indexer), dtype=torch.uint8, device=device)
        slots = torch.arange(n, device=device).expand(m, n)
        scores = dispatch.index_scores_paged(q, weights, keys, slots, seqs.to(torch.int32), seqs[:-1],
                                             torch.full((m,), n, device=device), cfg, fmt.indexer)
    dispatch.select_topk(scores, torch.full((m,), scores.shape[1], device=device), cfg.index_topk)
