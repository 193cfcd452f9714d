"""KV compressor ("gated pooling") of CSA and HCA layers (spec §4.5).

Every m tokens become one entry. Per token s (fp32): values k_s = wkv x_s and gate logits
z_s = wgate x_s + ape[s mod m], each c*e wide (c = 2 for the overlapping CSA compressor, else 1).
Per channel, a softmax over the block's tokens weights the values. The overlapping compressor
(m = 4) pools 2m candidates: the first halves ("A", dims [0, e)) of the previous block's tokens and
the second halves ("B", dims [e, 2e)) of the current block's. Pooled entries are then normalized,
rotated at the block's first position and quantization-simulated (`finish_entries`).
"""

from __future__ import annotations

import torch

from v4_plugin.checkpoint.config import FP4_BLOCK, FP8_KV_BLOCK
from v4_plugin.checkpoint.quant import fake_quant_fp4, fake_quant_fp8, hadamard
from v4_plugin.runtime.ops.invariant import times_weight
from v4_plugin.runtime.ops.norm import rms_norm
from v4_plugin.runtime.ops.rope import Rope


def project(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values and raw gate logits in fp32: x [T, D] -> (kv, gate) each [T, c*e]."""
    xf = x.float()
    return times_weight(xf, wkv), times_weight(xf, wgate)


def pool(kv: torch.Tensor, score: torch.Tensor, overlap: bool,
         before_kv: torch.Tensor | None = None, before_score: torch.Tensor | None = None) -> torch.Tensor:
    """Pool n blocks, each with its own preceding block.

    kv, score: fp32 [n, m, c*e] (`score` includes ape). before_kv, before_score: [n, m, 2e], the block
    before each one (overlap only; a block without one has before_score -inf, so its A-slots get
    weight 0). Returns fp32 [n, e].
    """
    if not overlap:
        return (kv * torch.softmax(score, dim=1)).sum(1)
    e = kv.shape[-1] // 2
    cand_kv = torch.cat((before_kv[..., :e], kv[..., e:]), dim=1)  # [n, 2m, e]
    cand_score = torch.cat((before_score[..., :e], score[..., e:]), dim=1)
    return (cand_kv * torch.softmax(cand_score, dim=1)).sum(1)


def pool_blocks(
    kv: torch.Tensor, score: torch.Tensor, overlap: bool,
    prev_kv: torch.Tensor | None = None, prev_score: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool consecutive complete blocks.

    kv, score: fp32 [nb, m, c*e]; `score` includes ape. prev_kv, prev_score: [m, 2e] of the block
    before the first one (overlap only; None for block 0). Returns fp32 [nb, e].
    """
    if not overlap:
        return pool(kv, score, False)
    if kv.shape[0] == 0:
        return kv.new_zeros(0, kv.shape[-1] // 2)
    if prev_kv is None:
        prev_kv = torch.zeros_like(kv[0])
        prev_score = torch.full_like(score[0], float("-inf"))
    before_kv = torch.cat((prev_kv[None], kv[:-1]))  # block j-1 for each block j
    before_score = torch.cat((prev_score[None], score[:-1]))
    return pool(kv, score, True, before_kv, before_score)


def finish_entries(
    pooled: torch.Tensor, block_ids: torch.Tensor, *, ratio: int, norm_weight: torch.Tensor, eps: float,
    rope: Rope, dtype: torch.dtype, indexer: bool, simulate_quant: bool,
) -> torch.Tensor:
    """Turn pooled fp32 [N, e] entries into cache entries [N, e] of `dtype`.

    In order: cast, RMSNorm with weight, RoPE on the tail at the block's first position j*m, then
    the quantization the model was trained with: FP8 on the non-rope dims in blocks of 64 and bf16
    rope dims (main KV, `simulate_kv_storage`), or a Hadamard rotation of the whole vector then FP4
    in blocks of 32 (indexer keys).
    """
    y = rms_norm(pooled.to(dtype), norm_weight, eps)
    y = rope.rotate(y, block_ids * ratio)
    if indexer:
        y = hadamard(y)
        return fake_quant_fp4(y, FP4_BLOCK) if simulate_quant else y
    return simulate_kv_storage(y, rope.dim) if simulate_quant else y


def simulate_kv_storage(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Round KV entries [..., d] onto what the 584-byte cache record holds: FP8 with power-of-two
    scales per 64 on the non-rope dims, bf16 on the rope dims (a no-op for bf16 models)."""
    nope = kv.shape[-1] - rope_dim
    rope_part = kv[..., nope:].to(torch.bfloat16).to(kv.dtype)
    return torch.cat((fake_quant_fp8(kv[..., :nope], FP8_KV_BLOCK), rope_part), dim=-1)


def compress_sequence(kv: torch.Tensor, gate: torch.Tensor, ape: torch.Tensor, overlap: bool) -> torch.Tensor:
    """Pool every complete block of a sequence that starts at position 0 (the prefill form).

    kv, gate fp32 [T, c*e]; ape [m, c*e]. Returns fp32 [T div m, e]; the tail tokens are not pooled.
    """
    m = ape.shape[0]
    complete = kv.shape[0] // m * m
    score = gate[:complete].unflatten(0, (-1, m)) + ape
    return pool_blocks(kv[:complete].unflatten(0, (-1, m)), score, overlap)
