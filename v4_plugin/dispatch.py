"""Kernel dispatch: the one call site of every hot op, Triton on GPUs and the torch reference elsewhere.

CPU serving never runs the Triton interpreter: a kernel is used only for CUDA tensors, and only
when Triton imports. `V4_PLUGIN_KERNELS=torch` forces the reference ops everywhere (for A/B checks);
`V4_PLUGIN_KERNELS=triton` makes the kernels mandatory on CUDA (an import failure then raises).
Each kernel wrapper in `v4_kernels` has the signature of the core op it replaces.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch

from .ops import attention as attn_ops
from .ops import indexer as index_ops
from .ops import mhc as mhc_ops


@functools.cache
def _kernel(module: str, name: str) -> Callable | None:
    """The Triton wrapper `v4_kernels.<module>.kernel.<name>`, or None when Triton cannot load."""
    try:
        return getattr(importlib.import_module(f"v4_kernels.{module}.kernel"), name)
    except ImportError:
        if os.environ.get("V4_PLUGIN_KERNELS") == "triton":
            raise
        return None


def backend_name(device: torch.device | str) -> str:
    """'triton' or 'torch': what serves a tensor on this device (the startup log line names it)."""
    mode = os.environ.get("V4_PLUGIN_KERNELS", "auto")
    if mode == "torch" or torch.device(device).type != "cuda":
        return "torch"
    return "triton" if _kernel("sparse_attention", "sparse_attention") is not None else "torch"


def _pick(t: torch.Tensor, module: str, name: str, reference: Callable) -> Callable:
    if t.is_cuda and os.environ.get("V4_PLUGIN_KERNELS", "auto") != "torch":
        kernel = _kernel(module, name)
        if kernel is not None:
            return kernel
    return reference


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
