"""Byte formats of the quantized KV caches: one record per entry, as the paged caches store them (spec §5).

Main record (window and compressed entries), `main_entry_bytes(cfg)` bytes (584 for V4):

    [0, nope)                  e4m3 values of dims [0, nope)                  (448 B)
    [nope, nope + 2*rope)      bf16 values of the rope dims, little endian    (128 B)
    [data, data + nope/64)     E8M0 scale of each 64-value FP8 block          (7 B)
    the rest                   zero padding to a multiple of 8                 (1 B)

Indexer record, `indexer_entry_bytes(cfg, fmt)` bytes:

    FP8 (132 B): e4m3 values of the index_head_dim dims, then one fp32 scale (power of two)
    FP4 (68 B):  packed e2m1 pairs (low nibble = even dim), then one E8M0 scale per 32 dims

Records are written from the model's simulated values, which already lie on these grids (FP8 with
power-of-two scales per 64, rope dims rounded to bf16, indexer keys FP4 with power-of-two scales
per 32), so `unpack(pack(x)) == x` bit for bit and a quantized cache changes nothing.
"""

from __future__ import annotations

import torch

from v4_plugin.checkpoint.config import FP4_BLOCK, FP8_KV_BLOCK, V4Config
from v4_plugin.cache.layout import IndexerCache, indexer_entry_bytes, main_entry_bytes
from v4_plugin.checkpoint.quant import (dequantize_fp4, dequantize_fp8, e8m0_to_float, float_to_e8m0, pack_fp4, quantize_fp4,
                    quantize_fp8, unpack_fp4)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """View a tensor's last dim as raw bytes: [..., n] of any dtype -> uint8 [..., n * itemsize]."""
    if t.numel() == 0:  # (an empty tensor's strides may not allow the view)
        return torch.empty(*t.shape[:-1], t.shape[-1] * t.element_size(), dtype=torch.uint8, device=t.device)
    return t.contiguous().view(torch.uint8)


def pack_main(kv: torch.Tensor, cfg: V4Config) -> torch.Tensor:
    """KV entries [N, head_dim] (float) -> main records uint8 [N, main_entry_bytes(cfg)]."""
    nope = cfg.nope_head_dim
    q, scale = quantize_fp8(kv[:, :nope].float(), FP8_KV_BLOCK)
    parts = [_bytes(q), _bytes(kv[:, nope:].to(torch.bfloat16)), _bytes(float_to_e8m0(scale))]
    out = torch.zeros(kv.shape[0], main_entry_bytes(cfg), dtype=torch.uint8, device=kv.device)
    filled = torch.cat(parts, dim=1)
    out[:, : filled.shape[1]] = filled
    return out


def unpack_main(records: torch.Tensor, cfg: V4Config, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Main records uint8 [N, main_entry_bytes(cfg)] -> KV entries [N, head_dim] in `dtype`."""
    nope, rope = cfg.nope_head_dim, cfg.qk_rope_head_dim
    q = records[:, :nope].contiguous().view(torch.float8_e4m3fn)
    rope_vals = records[:, nope : nope + 2 * rope].contiguous().view(torch.bfloat16)
    start = nope + 2 * rope
    scale = e8m0_to_float(records[:, start : start + nope // FP8_KV_BLOCK])
    return torch.cat((dequantize_fp8(q, scale, FP8_KV_BLOCK), rope_vals.float()), dim=1).to(dtype)


def pack_indexer(keys: torch.Tensor, cfg: V4Config, fmt: IndexerCache) -> torch.Tensor:
    """Indexer keys [N, index_head_dim] -> records uint8 [N, indexer_entry_bytes(cfg, fmt)]."""
    if fmt is IndexerCache.FP8:
        q, scale = quantize_fp8(keys.float(), keys.shape[1])  # one scale for the whole key
        return torch.cat((_bytes(q), _bytes(scale.float())), dim=1)
    codes, scale = quantize_fp4(keys.float(), FP4_BLOCK)
    out = torch.cat((pack_fp4(codes).view(torch.uint8), _bytes(float_to_e8m0(scale))), dim=1)
    assert out.shape[1] == indexer_entry_bytes(cfg, fmt)
    return out


def unpack_indexer(records: torch.Tensor, cfg: V4Config, fmt: IndexerCache,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Indexer records uint8 [N, indexer_entry_bytes(cfg, fmt)] -> keys [N, index_head_dim] in `dtype`."""
    d = cfg.index_head_dim
    if fmt is IndexerCache.FP8:
        q = records[:, :d].contiguous().view(torch.float8_e4m3fn)
        scale = records[:, d : d + 4].contiguous().view(torch.float32)
        return dequantize_fp8(q, scale, d).to(dtype)
    codes = unpack_fp4(records[:, : d // 2].contiguous().view(torch.int8))
    scale = e8m0_to_float(records[:, d // 2 : d // 2 + d // FP4_BLOCK])
    return dequantize_fp4(codes, scale, FP4_BLOCK).to(dtype)
