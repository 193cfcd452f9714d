"""Kernel dispatch: the one call site of every hot op, Triton on GPUs and the torch reference elsewhere.

CPU serving never runs the Triton interpreter: a kernel is used only for CUDA tensors, and only
when Triton imports. `V4_PLUGIN_KERNELS=torch` forces the reference ops everywhere (for A/B checks);
`V4_PLUGIN_KERNELS=triton` makes the kernels mandatory on CUDA (an import failure then raises).
Tests without a GPU run CPU tensors through the interpreted kernels inside `use_kernels_on_cpu()`.
Each function here states the core op it stands for; the kernel wrappers in `v4_kernels` have the
core op's signature, or (KV stores, compressor) take the cache rows and slots their reference writes,
or (GEMMs: linear, MoE) take the weights in checkpoint format, which only a model loaded with
`keep_quantized` holds.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections import Counter
from types import ModuleType
from typing import Callable, Collection, Iterator

import torch

from v4_plugin.checkpoint.config import V4Config
from v4_plugin.cache.records import pack_indexer, pack_main, unpack_indexer, unpack_main
from v4_plugin.cache.layout import IndexerCache
from v4_plugin.runtime.ops import attention as attn_ops
from v4_plugin.runtime.ops import compressor as comp_ops
from v4_plugin.runtime.ops import indexer as index_ops
from v4_plugin.runtime.ops import linear as linear_ops
from v4_plugin.runtime.ops import mhc as mhc_ops
from v4_plugin.runtime.ops import moe as moe_ops
from v4_plugin.runtime.ops.rope import Rope

logger = logging.getLogger(__name__)

_cpu_kernel_calls: Counter[str] | None = None  # kernel calls per op inside `use_kernels_on_cpu`
_cpu_kernel_ops: frozenset[str] | None = None  # the ops it runs on kernels (None: all)
_counted: tuple[Counter[str], Counter[str]] | None = None  # inside `count_calls`: (kernel, torch) calls per op


@functools.cache
def _kernel_modules() -> dict[str, ModuleType]:
    """The Triton kernel modules by folder, imported on first use: Triton is optional, and each kernel
    fixes interpreter or compiled mode (TRITON_INTERPRET) when it is imported."""
    from v4_kernels.compressor import kernel as compressor
    from v4_kernels.fp4_moe import kernel as fp4_moe
    from v4_kernels.fp8_linear import kernel as fp8_linear
    from v4_kernels.indexer import kernel as indexer
    from v4_kernels.kv_store import kernel as kv_store
    from v4_kernels.mhc import kernel as mhc
    from v4_kernels.sparse_attention import kernel as sparse_attention

    return {"compressor": compressor, "fp4_moe": fp4_moe, "fp8_linear": fp8_linear, "indexer": indexer,
            "kv_store": kv_store, "mhc": mhc, "sparse_attention": sparse_attention}


def _kernel(module: str, name: str) -> Callable | None:
    """The Triton wrapper `v4_kernels.<module>.kernel.<name>`, or None when Triton cannot load."""
    try:
        return getattr(_kernel_modules()[module], name)
    except ImportError:
        if os.environ.get("V4_PLUGIN_KERNELS") == "triton":
            raise
        return None


def kernels_serve(device: torch.device) -> bool:
    """Whether the kernels run tensors on `device`: CUDA with Triton, or the CPU inside `use_kernels_on_cpu`."""
    return backend_name(device) == "triton" or (device.type == "cpu" and _cpu_kernel_calls is not None)


def backend_name(device: torch.device | str) -> str:
    """'triton' or 'torch': what serves a tensor on this device (the startup log line names it)."""
    mode = os.environ.get("V4_PLUGIN_KERNELS", "auto")
    if mode == "torch" or torch.device(device).type != "cuda":
        return "torch"
    return "triton" if _kernel("sparse_attention", "sparse_attention") is not None else "torch"


def keep_quantized(device: torch.device | str) -> bool:
    """Whether a served model on `device` loads its FP8 / FP4 linears as checkpoint entries
    (`load_checkpoint(..., keep_quantized=True)`): everywhere. The GEMM kernels read them on GPUs; the
    torch ops dequantize a tile (`ops.linear.linear_stored`) or an expert a step uses at a time."""
    return True


@contextlib.contextmanager
def use_kernels_on_cpu(ops: Collection[str] | None = None) -> Iterator[Counter[str]]:
    """Test-only: inside, CPU tensors also run the Triton kernels (in the interpreter, TRITON_INTERPRET=1
    set before any kernel module is imported): those of the ops named in `ops` (function names of this
    module), or of all. Yields the count of kernel calls per op name."""
    global _cpu_kernel_calls, _cpu_kernel_ops
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("dispatch.use_kernels_on_cpu needs TRITON_INTERPRET=1 (CPU serving never interprets)")
    previous = _cpu_kernel_calls, _cpu_kernel_ops
    _cpu_kernel_calls, _cpu_kernel_ops = Counter(), None if ops is None else frozenset(ops)
    try:
        yield _cpu_kernel_calls
    finally:
        _cpu_kernel_calls, _cpu_kernel_ops = previous


@contextlib.contextmanager
def count_calls() -> Iterator[tuple[Counter[str], Counter[str]]]:
    """Test-only: inside, every op of this module is counted as it runs, on any device: yields (kernel
    calls, torch reference calls) per op name, so a test sees a silent fallback (an MoE over experts the
    kernel does not take counts as a torch `moe`)."""
    global _counted
    previous, _counted = _counted, (Counter(), Counter())
    try:
        yield _counted
    finally:
        _counted = previous


def _count(op: str, kernel: Callable | None) -> Callable | None:
    if _counted is not None:
        _counted[0 if kernel is not None else 1][op] += 1
    return kernel


def _kernel_for(t: torch.Tensor, module: str, name: str, op: str | None = None) -> Callable | None:
    """The kernel `v4_kernels.<module>.kernel.<name>` for tensors like `t`, or None: use the torch reference.
    `op`: the function of this module it serves (`use_kernels_on_cpu` names and counts ops), default `name`."""
    op = op or name
    if os.environ.get("V4_PLUGIN_KERNELS", "auto") == "torch":
        return _count(op, None)
    if t.is_cuda:
        return _count(op, _kernel(module, name))
    if _cpu_kernel_calls is None or (_cpu_kernel_ops is not None and op not in _cpu_kernel_ops):
        return _count(op, None)
    kernel = _kernel(module, name)
    if kernel is None:
        raise RuntimeError(f"dispatch.use_kernels_on_cpu: v4_kernels.{module} does not import")
    _cpu_kernel_calls[op] += 1
    return _count(op, kernel)


def _pick(t: torch.Tensor, module: str, name: str, reference: Callable) -> Callable:
    return _kernel_for(t, module, name) or reference


def linear(x: torch.Tensor, weight: linear_ops.LinearWeight, quantize_input: bool) -> torch.Tensor:
    """`ops.linear.linear(x, weight.dense(), quantize_input)`: x [..., in] -> [..., out] in x.dtype; a weight
    kept in FP8 goes to the FP8 GEMM kernel, or to `ops.linear.linear_stored` (never dequantized whole)."""
    if weight.fp8 is None:
        return linear_ops.linear(x, weight.dense(), quantize_input)
    kernel = _kernel_for(x, "fp8_linear", "fp8_linear", op="linear")
    if kernel is None:
        return linear_ops.linear_stored(x, *weight.fp8, quantize_input)
    return kernel(x, *weight.fp8, quantize_input)


def moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: moe_ops.MoEWeights, *,
        limit: float, quantize_input: bool) -> torch.Tensor:
    """`ops.moe.moe(x, weights, ids, *experts.dense(), ...)`: x [T, D], routing weights fp32 [T, k] and
    expert ids [T, k] -> [T, D] in x.dtype; experts kept quantized (`experts.packed`: FP4, or FP8 in the
    `-Base` checkpoints) go to the grouped MoE kernel (the shared expert to the FP8 GEMM). Ids are global;
    a rank holding experts `first ...` only (expert parallelism) adds nothing for the others."""
    kernel = _count("moe", None) if experts.packed is None else _kernel_for(x, "fp4_moe", "fp4_moe", op="moe")
    if kernel is None:
        return moe_ops.moe(x, weights, ids, *experts.dense(), limit=limit, quantize_input=quantize_input,
                           first=experts.first)
    routed, shared = experts.packed()
    stack = "FP8Experts" if routed[0].dtype == torch.float8_e4m3fn else "FP4Experts"
    local = ids - experts.first if experts.first else ids  # the kernel skips ids outside its stack
    return kernel(x, weights, local, _kernel("fp4_moe", stack)(*routed), _kernel("fp4_moe", "FP8Expert")(*shared),
                  limit=limit, quantize_input=quantize_input)


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """`ops.attention.sparse_attention` (q [T, H, d], kv [N, d], indices [T, S], -1 = skip)."""
    return _pick(q, "sparse_attention", "sparse_attention", attn_ops.sparse_attention)(q, kv, indices, sink, scale)


def index_scores(q: torch.Tensor, head_weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`ops.indexer.index_scores`: fp32 [T, N]."""
    return _pick(q, "indexer", "index_scores", index_ops.index_scores)(q, head_weights, keys)


def select_topk(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """`ops.indexer.select_topk`: int64 [T, min(k, N)], ties to the lower index, invisible -> -1."""
    return _pick(scores, "indexer", "select_topk", index_ops.select_topk)(scores, visible, k)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
           norm_eps: float, hc_eps: float, sinkhorn_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ops.mhc.hc_pre`."""
    return _pick(x, "mhc", "hc_pre", mhc_ops.hc_pre)(x, fn, scale, base, norm_eps=norm_eps, hc_eps=hc_eps,
                                                      sinkhorn_iters=sinkhorn_iters)


def hc_post(y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """`ops.mhc.hc_post`."""
    return _pick(x, "mhc", "hc_post", mhc_ops.hc_post)(y, x, post, comb)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
            norm_eps: float, hc_eps: float) -> torch.Tensor:
    """`ops.mhc.hc_head`."""
    return _pick(x, "mhc", "hc_head", mhc_ops.hc_head)(x, fn, scale, base, norm_eps=norm_eps, hc_eps=hc_eps)


def flat_rows(data: torch.Tensor) -> torch.Tensor:
    """Paged storage data [num_blocks, block_size, width] (any block and entry strides, e.g. padded pages)
    as the rows [n, width] that kernels address by slot, sharing its memory: rows step by u = gcd of the
    two strides (in elements), so the slot of (block b, offset o) is (b*stride0 + o*stride1) / u."""
    s0, s1 = data.stride(0), data.stride(1)
    u = math.gcd(s0, s1)
    n = ((data.shape[0] - 1) * s0 + (data.shape[1] - 1) * s1) // u + 1
    return data.as_strided((n, data.shape[2]), (u, 1))


def flat_slots(data: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The slots in `flat_rows(data)` of entries (blocks, offsets)."""
    s0, s1 = data.stride(0), data.stride(1)
    u = math.gcd(s0, s1)
    return blocks * (s0 // u) + offsets * (s1 // u)


def attention_paged(q: torch.Tensor, window: tuple[torch.Tensor, torch.Tensor],
                    compressed: tuple[torch.Tensor, torch.Tensor] | None, sink: torch.Tensor, scale: float,
                    cfg: V4Config, kv_fp8: bool) -> torch.Tensor:
    """`ops.attention.sparse_attention` over the entries the window and compressed caches hold, read where
    they lie: each source (rows [n, width] of `flat_rows`, slots int64 [T, S] into them, -1 = skip) holds
    main records (`kv_fp8`) or entries in the compute dtype. One softmax over both sources."""
    sources = [window] if compressed is None else [window, compressed]
    kernel = _kernel_for(q, "sparse_attention", "sparse_attention", op="attention_paged")
    if kernel is not None:
        second = {} if compressed is None else dict(kv2=compressed[0], indices2=compressed[1])
        return kernel(q, *window, sink, scale, rope_dim=cfg.qk_rope_head_dim, **second)
    return attn_ops.attention_over_slots(q, sources, sink, scale, _records_decoder(cfg, q.dtype) if kv_fp8 else None)


def _records_decoder(cfg: V4Config, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """Main records uint8 [..., 584] -> KV entries [..., head_dim] in `dtype` (`records.unpack_main`)."""
    return lambda rows: unpack_main(rows.flatten(0, -2), cfg, dtype).unflatten(0, rows.shape[:-1])


def index_scores_paged(q: torch.Tensor, head_weights: torch.Tensor, keys: torch.Tensor, slots: torch.Tensor,
                       query_start: torch.Tensor, token_seq: torch.Tensor, visible: torch.Tensor, cfg: V4Config,
                       fmt: IndexerCache | None) -> torch.Tensor:
    """`ops.indexer.index_scores` of each query against its own sequence's keys, read where they lie: keys
    [n, width] (`flat_rows` of the indexer cache: records of `fmt`, or keys in the compute dtype when
    None), slots int64 [B, N] (sequence b's entries 0 ... N-1), query_start int32 [B + 1] and token_seq
    int64 [T] (the queries of each sequence), visible int64 [T]. Returns fp32 [T, N], -inf where
    j >= visible[t]."""
    kernel = _kernel_for(q, "indexer", "index_scores", op="index_scores_paged")
    if kernel is not None:
        return kernel(q, head_weights, keys, slots=slots, visible=visible, query_start=query_start)
    rows = keys[slots.clamp(min=0)]
    decoded = rows if fmt is None else unpack_indexer(rows.flatten(0, 1), cfg, fmt, q.dtype).unflatten(0, slots.shape)
    return index_ops.index_scores_per_sequence(q, head_weights, decoded, token_seq, visible)


def store_main(kv: torch.Tensor, data: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
               cfg: V4Config) -> None:
    """`data[blocks, offsets] = kvcache.pack_main(kv, cfg)`: KV entries kv [N, head_dim] as main records
    into paged storage data uint8 [num_blocks, block_size, main_entry_bytes(cfg)] (blocks, offsets [N])."""
    kernel = _kernel_for(kv, "kv_store", "store_main")
    if kernel is None:
        data[blocks, offsets] = pack_main(kv, cfg)
    else:
        kernel(kv, flat_rows(data), flat_slots(data, blocks, offsets), rope_dim=cfg.qk_rope_head_dim)


def store_indexer(keys: torch.Tensor, data: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
                  cfg: V4Config, fmt: IndexerCache) -> None:
    """`data[blocks, offsets] = kvcache.pack_indexer(keys, cfg, fmt)`: keys [N, index_head_dim] into
    paged storage data uint8 [num_blocks, block_size, indexer_entry_bytes(cfg, fmt)]."""
    kernel = _kernel_for(keys, "kv_store", "store_indexer")
    if kernel is None:
        data[blocks, offsets] = pack_indexer(keys, cfg, fmt)
    else:
        kernel(keys, flat_rows(data), flat_slots(data, blocks, offsets), fmt)


def _pool_finish(kv: torch.Tensor, score: torch.Tensor, overlap: bool, before_kv: torch.Tensor | None,
                 before_score: torch.Tensor | None, *, block_ids: torch.Tensor, **finish) -> torch.Tensor:
    return comp_ops.finish_entries(comp_ops.pool(kv, score, overlap, before_kv, before_score), block_ids, **finish)


def pool_finish(kv: torch.Tensor, score: torch.Tensor, overlap: bool, before_kv: torch.Tensor | None,
                before_score: torch.Tensor | None, *, block_ids: torch.Tensor, ratio: int, norm_weight: torch.Tensor,
                eps: float, rope: Rope, dtype: torch.dtype, indexer: bool, simulate_quant: bool) -> torch.Tensor:
    """`ops.compressor.finish_entries(ops.compressor.pool(kv, score, overlap, before_kv, before_score),
    block_ids, ...)`: the entries [n, e] in `dtype` of n complete blocks (kv, score fp32 [n, m, c*e];
    before_* [n, m, 2e], each block's own previous block, or None without overlap)."""
    return _pick(kv, "compressor", "pool_finish", _pool_finish)(
        kv, score, overlap, before_kv, before_score, block_ids=block_ids, ratio=ratio, norm_weight=norm_weight,
        eps=eps, rope=rope, dtype=dtype, indexer=indexer, simulate_quant=simulate_quant)


def pool_finish_store(kv: torch.Tensor, score: torch.Tensor, overlap: bool, before_kv: torch.Tensor | None,
                      before_score: torch.Tensor | None, *, block_ids: torch.Tensor, ratio: int,
                      norm_weight: torch.Tensor, eps: float, rope: Rope, dtype: torch.dtype, indexer: bool,
                      data: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, cfg: V4Config,
                      fmt: IndexerCache | None) -> None:
    """`pool_finish(..., simulate_quant=True)` stored at data[blocks, offsets]: as `store_indexer`
    (format `fmt`) for the indexer compressor, else as `store_main`."""
    finish = dict(block_ids=block_ids, ratio=ratio, norm_weight=norm_weight, eps=eps, rope=rope, dtype=dtype,
                  indexer=indexer)
    kernel = _kernel_for(kv, "compressor", "pool_finish_store")
    if kernel is not None:
        kernel(kv, score, overlap, before_kv, before_score, **finish, cache=flat_rows(data),
               slots=flat_slots(data, blocks, offsets), fmt=fmt)
        return
    entries = _pool_finish(kv, score, overlap, before_kv, before_score, **finish, simulate_quant=True)
    data[blocks, offsets] = pack_indexer(entries, cfg, fmt) if indexer else pack_main(entries, cfg)
