"""Fused KV compressor ("gated pooling") of CSA / HCA layers, written straight into the cache (spec §4.5).

References (core functions these kernels replace):

* `pool_finish(...)`       <- `v4_plugin.runtime.ops.compressor.finish_entries(pool_blocks(kv, score, overlap,
                              prev_kv, prev_score), block_ids, ...)`: pooled, normed, rotated (and,
                              with simulate_quant, quantization-simulated) entries [nb, e];
* `pool_finish_store(...)` <- the same with simulate_quant=True, then `v4_plugin.cache.records.pack_main`
                              (main compressor) or `pack_indexer` (indexer compressor) and
                              `cache[slots] = records`. Nothing but the records is written to memory.

Inputs are what `pool_blocks` takes: values `kv` and ape-biased gate logits `score`, fp32
[nb, m, c*e] for nb consecutive complete blocks, and for the overlapping compressor (m = 4, c = 2)
the block before the first one (`prev_kv`, `prev_score` [m, 2e]; None for block 0, whose A-slots get
gate -inf and value 0). `compress_sequence` is `pool_finish` on `gate[:complete] + ape` blocks.
Extension for batched decode: `prev_kv`, `prev_score` may also be [nb, m, 2e], each block's own
previous block (the "previous block" half of each sequence's running state; a sequence still at its
first block passes score -inf there), so the nb blocks may come from nb different sequences.

Per entry (one program handles BLOCK_N entries, each a whole e-wide vector held as (even dim, odd dim)
pairs, see `kv_store/kernel.py`):

1. Per-channel softmax over the block's tokens (2m candidates for the overlap: B-halves [e, 2e) of
   the block's own tokens first, then A-halves [0, e) of the previous block's) and the weighted sum,
   as an online softmax over TOK tokens per step (fp32; exp with a running max).
2. Cast to `dtype` (bf16 rounding done bit-exactly, to nearest even), RMSNorm with weight
   (x * 1/sqrt(mean(x^2) + eps) * w, fp32, IEEE sqrt and division), cast.
3. RoPE on the last rope dims (interleaved pairs) at position j*m from a cos/sin table, cast.
4. Main: FP8 simulation of dims [0, nope) in blocks of 64, bf16 rope dims, then the 584-B record.
   Indexer: normalized Hadamard of the whole vector (as a +-1 product on the pairs:
   H_e = [[H, H], [H, -H]] over (even, odd)), cast, FP4 simulation in blocks of 32, then the
   FP4 (68 B) or FP8 (132 B) record.

Numerics vs the torch reference: the quantizers and bf16 casts are bit-exact (integer arithmetic),
but reductions (softmax sums, the RMS mean, the Hadamard sums) add in a different order and the
GPU's exp is approximate, so pre-quantization values agree to a few fp32 ulps; a value that lands
within that distance of a rounding midpoint can quantize one step differently. Tests state the
tolerances.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4_plugin.checkpoint.config import FP8_KV_BLOCK
from v4_plugin.cache.layout import IndexerCache

from ..formats import round_bf16
from ..kv_store.kernel import (fp4_fake_pairs, fp8_fake_pairs, indexer_record_bytes, main_record_bytes, next_pow2,
                               records_view, write_indexer_record, write_main_record)

__all__ = ["pool_finish", "pool_finish_store", "tile_config"]

OUT_ENTRIES, OUT_MAIN, OUT_INDEXER_FP8, OUT_INDEXER_FP4 = 0, 1, 2, 3


# ---- tile sizes: the one place that picks them ---------------------------------------------------
def tile_config(nb: int, m: int, e: int, device: torch.device) -> dict:
    """BLOCK_N (entries per program), TOK (tokens per softmax step) and num_warps.

    Interpreter (CPU): many entries and a whole block of tokens per program (each interpreted op
    costs about 0.1-1 ms whatever its size). GPU: one or two entries per program and 8 tokens per
    step, so that a program holds about 2 x 8 x e fp32 values; untuned defaults until
    `bench/bench_compressor.py` has been run on the target GPU.
    """
    if device.type != "cuda":
        per_entry = m * e  # fp32 values of one block's tile
        return {"BLOCK_N": min(next_pow2(max(nb, 1)), max(1, 65536 // per_entry), 32), "TOK": m, "num_warps": 1}
    return {"BLOCK_N": 1 if e >= 256 else 2, "TOK": min(m, 8), "num_warps": 4}


# ---- kernel --------------------------------------------------------------------------------------
@triton.jit
def _online_softmax_step(mx, l, acc, z, v):
    """Fold TOK candidates z, v [BN, TOK, P] into the running max / sum / weighted sum [BN, P]."""
    m_new = tl.maximum(mx, tl.max(z, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all candidates so far empty
    alpha = tl.exp(mx - m_use)
    pz = tl.exp(z - m_use[:, None, :])
    return m_new, l * alpha + tl.sum(pz, axis=1), acc * alpha + tl.sum(pz * v, axis=1)


@triton.jit
def _compress_kernel(
    kv_ptr, score_ptr, prev_kv_ptr, prev_score_ptr,
    w_ptr, cos_ptr, sin_ptr, bid_ptr,
    out_ptr, cache_ptr, cache_stride, slots_ptr,
    nb, eps,
    M: tl.constexpr, E: tl.constexpr, ROPE: tl.constexpr, OVERLAP: tl.constexpr, PREV: tl.constexpr,
    ROUND_BF16: tl.constexpr, INDEXER: tl.constexpr, SIMULATE: tl.constexpr, OUT: tl.constexpr,
    SCALE_BYTES: tl.constexpr, SCALE_P2: tl.constexpr, HSCALE: tl.constexpr, TABLE_BY_POSITION: tl.constexpr,
    TOK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    P: tl.constexpr = E // 2
    W: tl.constexpr = 2 * E if OVERLAP else E
    NOPE: tl.constexpr = E - ROPE
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rok = rows < nb
    rows = rows.to(tl.int64)
    p = tl.arange(0, P)
    t = tl.arange(0, TOK)
    rok3 = rok[:, None, None]

    # ---- 1. gated pooling: online softmax per channel -------------------------------------------
    m_ev = tl.full([BLOCK_N, P], float("-inf"), tl.float32)
    m_od = tl.full([BLOCK_N, P], float("-inf"), tl.float32)
    l_ev = tl.zeros([BLOCK_N, P], tl.float32)
    l_od = tl.zeros([BLOCK_N, P], tl.float32)
    a_ev = tl.zeros([BLOCK_N, P], tl.float32)
    a_od = tl.zeros([BLOCK_N, P], tl.float32)
    B0: tl.constexpr = E if OVERLAP else 0  # own block: B-halves for the overlap, all channels otherwise
    for t0 in range(0, M, TOK):
        offs = rows[:, None, None] * (M * W) + (t0 + t)[None, :, None] * W + (B0 + 2 * p)[None, None, :]
        z = tl.load(score_ptr + offs, mask=rok3, other=0.0).to(tl.float32)
        v = tl.load(kv_ptr + offs, mask=rok3, other=0.0).to(tl.float32)
        m_ev, l_ev, a_ev = _online_softmax_step(m_ev, l_ev, a_ev, z, v)
        z = tl.load(score_ptr + offs + 1, mask=rok3, other=0.0).to(tl.float32)
        v = tl.load(kv_ptr + offs + 1, mask=rok3, other=0.0).to(tl.float32)
        m_od, l_od, a_od = _online_softmax_step(m_od, l_od, a_od, z, v)
    if OVERLAP:  # A-halves [0, e) of the previous block
        # PREV 0/1: block rows-1 of this batch; for row 0 nothing (gate -inf) / the block `prev`.
        # PREV 2: every entry's own previous block, prev[rows] (batched decode over sequences).
        in_batch = (rok & (rows >= 1) & (PREV != 2))[:, None, None]
        use_prev = (rok & ((rows == 0) | (PREV == 2)))[:, None, None]
        if PREV == 2:
            prev_row = rows * (M * W)
        else:
            prev_row = rows * 0
        for t0 in range(0, M, TOK):
            tok = (t0 + t)[None, :, None] * W + (2 * p)[None, None, :]
            offs = (rows - 1)[:, None, None] * (M * W) + tok
            for half in tl.static_range(2):
                if PREV != 2:
                    z = tl.load(score_ptr + offs + half, mask=in_batch, other=float("-inf")).to(tl.float32)
                    v = tl.load(kv_ptr + offs + half, mask=in_batch, other=0.0).to(tl.float32)
                if PREV != 0:
                    poffs = prev_row[:, None, None] + tok + half
                    zp = tl.load(prev_score_ptr + poffs, mask=use_prev, other=float("-inf")).to(tl.float32)
                    vp = tl.load(prev_kv_ptr + poffs, mask=use_prev, other=0.0).to(tl.float32)
                    if PREV == 2:
                        z = zp
                        v = vp
                    else:
                        z = tl.where(use_prev, zp, z)
                        v = tl.where(use_prev, vp, v)
                if half == 0:
                    m_ev, l_ev, a_ev = _online_softmax_step(m_ev, l_ev, a_ev, z, v)
                else:
                    m_od, l_od, a_od = _online_softmax_step(m_od, l_od, a_od, z, v)
    ev = a_ev / l_ev
    od = a_od / l_od
    if ROUND_BF16:
        ev = round_bf16(ev)
        od = round_bf16(od)

    # ---- 2. RMSNorm with weight ------------------------------------------------------------------
    ms = (tl.sum(ev * ev, axis=1) + tl.sum(od * od, axis=1)) / E
    r = tl.math.div_rn(1.0, tl.math.sqrt_rn(ms + eps))[:, None]
    ev = ev * r * tl.load(w_ptr + 2 * p).to(tl.float32)[None, :]
    od = od * r * tl.load(w_ptr + 2 * p + 1).to(tl.float32)[None, :]
    if ROUND_BF16:
        ev = round_bf16(ev)
        od = round_bf16(od)

    # ---- 3. RoPE on the last ROPE dims at the block's first position -----------------------------
    rp = p - NOPE // 2
    is_rope = (rp >= 0)[None, :]
    if TABLE_BY_POSITION:  # a cos/sin table over positions: row j*m
        pos = tl.load(bid_ptr + rows, mask=rok, other=0).to(tl.int64) * M
    else:  # one cos/sin row per entry
        pos = rows
    cs_off = pos[:, None] * (ROPE // 2) + rp[None, :]
    cs_mask = rok[:, None] & is_rope
    c = tl.load(cos_ptr + cs_off, mask=cs_mask, other=1.0)
    s = tl.load(sin_ptr + cs_off, mask=cs_mask, other=0.0)
    rev = ev * c - od * s
    rod = ev * s + od * c
    ev = tl.where(is_rope, rev, ev)
    od = tl.where(is_rope, rod, od)
    if ROUND_BF16:
        ev = round_bf16(ev)
        od = round_bf16(od)

    # ---- 4. Hadamard (indexer) and quantization -------------------------------------------------
    if INDEXER:
        # (x H_e)[2q] = sum_p (x[2p] + x[2p+1]) H[p, q],  (x H_e)[2q+1] = sum_p (x[2p] - x[2p+1]) H[p, q]
        bits = p[:, None] & p[None, :]
        bits = bits ^ (bits >> 4)
        bits = bits ^ (bits >> 2)
        bits = bits ^ (bits >> 1)
        h = (1 - 2 * (bits & 1)).to(tl.float32)[None, :, :]
        u = ev + od
        w = ev - od
        ev = tl.sum(u[:, :, None] * h, axis=1) * HSCALE
        od = tl.sum(w[:, :, None] * h, axis=1) * HSCALE
        if ROUND_BF16:
            ev = round_bf16(ev)
            od = round_bf16(od)
        G: tl.constexpr = 16  # FP4 block: 32 dims
    else:
        G: tl.constexpr = 32  # FP8 KV block: 64 dims
    NBK: tl.constexpr = P // G
    ev = tl.reshape(ev, (BLOCK_N, NBK, G))
    od = tl.reshape(od, (BLOCK_N, NBK, G))
    pair = tl.arange(0, NBK)[None, :, None] * G + tl.arange(0, G)[None, None, :]
    if SIMULATE:
        if INDEXER:
            ev, od = fp4_fake_pairs(ev, od)
        else:
            fev, fod = fp8_fake_pairs(ev, od)
            rope3 = pair >= NOPE // 2
            ev = tl.where(rope3, round_bf16(ev), fev)
            od = tl.where(rope3, round_bf16(od), fod)

    if OUT == 0:
        dst = out_ptr + rows[:, None, None] * E + 2 * pair
        tl.store(dst, ev, mask=rok3)
        tl.store(dst + 1, od, mask=rok3)
    else:
        slot = tl.load(slots_ptr + rows, mask=rok, other=-1).to(tl.int64)
        ok = rok & (slot >= 0)
        rec = cache_ptr + tl.where(ok, slot, 0) * cache_stride
        if OUT == 1:
            write_main_record(rec, ok, ev, od, NOPE, ROPE, SCALE_BYTES, SCALE_P2)
        else:
            write_indexer_record(rec, ok, ev, od, OUT == 2)


# ---- Python wrappers (signatures mirror the core functions) --------------------------------------
def _cos_sin(rope, block_ids: torch.Tensor, ratio: int) -> tuple[torch.Tensor, torch.Tensor, bool, int]:
    """(cos, sin, indexed by position?, rope dim) from a rope (`v4_plugin.runtime.ops.rope.Rope`, or any object
    with its `cos_sin(positions)` and `dim`: rows computed here, one per entry) or
    a (cos, sin) table [max_position, rope_dim / 2] read at row j*m in the kernel (no host work; the
    table must cover every position: not checked, to keep the launch free of device syncs)."""
    if not isinstance(rope, tuple):
        cos, sin = rope.cos_sin(block_ids.to(torch.int64) * ratio)
        return cos.float().contiguous(), sin.float().contiguous(), False, rope.dim
    cos, sin = rope
    if cos.shape != sin.shape or cos.dim() != 2:
        raise ValueError("the cos / sin tables must both be [max_position, rope_dim / 2]")
    return cos.float().contiguous(), sin.float().contiguous(), True, 2 * cos.shape[1]


def _launch(kv, score, overlap, prev_kv, prev_score, block_ids, ratio, norm_weight, eps, rope, dtype, indexer,
            simulate_quant, out_mode, out, cache, slots):
    if kv.dim() != 3 or score.shape != kv.shape:
        raise ValueError(f"kv and score must both be [nb, m, c*e], got {tuple(kv.shape)} and {tuple(score.shape)}")
    nb, m, width = kv.shape
    if m != ratio:
        raise ValueError(f"blocks of {m} tokens but ratio {ratio}")
    if m & (m - 1):
        raise ValueError(f"ratio must be a power of two, got {m}")
    e = width // 2 if overlap else width
    if e & (e - 1) or e < 64:
        raise ValueError(f"entry width must be a power of two >= 64, got {e}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    if norm_weight.shape != (e,):
        raise ValueError(f"norm weight must be [{e}], got {tuple(norm_weight.shape)}")
    device = kv.device
    if block_ids.shape != (nb,) or block_ids.device != device or block_ids.is_floating_point():
        raise ValueError(f"block_ids must be an integer tensor [{nb}] on {device}, got {tuple(block_ids.shape)}")
    cos, sin, by_position, rope_dim = _cos_sin(rope, block_ids, ratio)
    if rope_dim % 2 or rope_dim > e or (not indexer and (e - rope_dim) % FP8_KV_BLOCK):
        raise ValueError(f"rope dim {rope_dim} does not fit entries of {e}")
    prev_mode = 0
    if overlap and prev_kv is not None:
        if prev_score is None or prev_score.shape != prev_kv.shape:
            raise ValueError("prev_kv and prev_score must have the same shape")
        if prev_kv.shape == (m, width):
            prev_mode = 1
        elif prev_kv.shape == (nb, m, width):
            prev_mode = 2
        else:
            raise ValueError(f"prev_kv / prev_score must be [{m}, {width}] or [{nb}, {m}, {width}], "
                             f"got {tuple(prev_kv.shape)}")
    kv, score = kv.contiguous(), score.contiguous()
    prev_kv = prev_kv.contiguous() if prev_mode else kv
    prev_score = prev_score.contiguous() if prev_mode else score
    scale_bytes = 1
    if out_mode == OUT_MAIN:
        scale_bytes = main_record_bytes(e, rope_dim) - e - rope_dim
    cfg = tile_config(nb, m, e, device)
    block_ids = block_ids.contiguous()
    # the unused one of (entries out, records) gets a placeholder pointer the kernel never touches
    out_arg, cache_arg = (out, out) if cache is None else (cache, cache)
    _compress_kernel[(triton.cdiv(nb, cfg["BLOCK_N"]),)](
        kv, score, prev_kv, prev_score, norm_weight.contiguous(), cos, sin, block_ids,
        out_arg, cache_arg, 0 if cache is None else cache.stride(0), block_ids if slots is None else slots,
        nb, float(eps),
        M=m, E=e, ROPE=rope_dim, OVERLAP=bool(overlap), PREV=prev_mode, ROUND_BF16=dtype == torch.bfloat16,
        INDEXER=bool(indexer), SIMULATE=bool(simulate_quant), OUT=out_mode, SCALE_BYTES=scale_bytes,
        SCALE_P2=next_pow2(scale_bytes), HSCALE=e**-0.5, TABLE_BY_POSITION=by_position,
        TOK=cfg["TOK"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])


def pool_finish(
    kv: torch.Tensor, score: torch.Tensor, overlap: bool,
    prev_kv: torch.Tensor | None = None, prev_score: torch.Tensor | None = None, *,
    block_ids: torch.Tensor, ratio: int, norm_weight: torch.Tensor, eps: float, rope, dtype: torch.dtype,
    indexer: bool, simulate_quant: bool,
) -> torch.Tensor:
    """Pooled, normed, rotated entries [nb, e] in `dtype`:
    `finish_entries(pool_blocks(kv, score, overlap, prev_kv, prev_score), block_ids, ratio=..., ...)`.

    kv, score fp32 [nb, m, c*e] (score ape-biased); prev_kv / prev_score (overlap only): [m, 2e], the
    block before the first, or None at the sequence start; or [nb, m, 2e], each block's own previous
    block (batched decode over sequences; score -inf where a sequence has none);
    `rope` a `Rope` or a (cos, sin) table [max_position, rope_dim/2] indexed by position j*m;
    dtype float32 or bfloat16.
    """
    nb, _, width = kv.shape
    e = width // 2 if overlap else width
    out = torch.empty(nb, e, dtype=torch.float32, device=kv.device)
    if nb:
        _launch(kv, score, overlap, prev_kv, prev_score, block_ids, ratio, norm_weight, eps, rope, dtype, indexer,
                simulate_quant, OUT_ENTRIES, out, None, None)
    return out.to(dtype)


def pool_finish_store(
    kv: torch.Tensor, score: torch.Tensor, overlap: bool,
    prev_kv: torch.Tensor | None = None, prev_score: torch.Tensor | None = None, *,
    block_ids: torch.Tensor, ratio: int, norm_weight: torch.Tensor, eps: float, rope, dtype: torch.dtype,
    indexer: bool, cache: torch.Tensor, slots: torch.Tensor, fmt: IndexerCache = IndexerCache.FP4,
) -> torch.Tensor:
    """Pool, finish and write the records of nb complete blocks at cache[slots[i]] (slots < 0 skipped).

    Same bytes as `cache[slots] = pack(finish_entries(pool_blocks(...), ..., simulate_quant=True))` with
    `pack` = `kvcache.pack_main(., cfg)` (main, uint8 [num_slots, 584]) or `kvcache.pack_indexer(., cfg,
    fmt)` (indexer, [num_slots, 68 | 132]), up to the rounding-order tolerance in the module docstring.
    Returns `cache`.
    """
    nb, _, width = kv.shape
    e = width // 2 if overlap else width
    if indexer:
        rb, mode = indexer_record_bytes(e, fmt), (OUT_INDEXER_FP8 if fmt is IndexerCache.FP8 else OUT_INDEXER_FP4)
    else:
        rope_dim = 2 * rope[0].shape[1] if isinstance(rope, tuple) else rope.dim
        rb, mode = main_record_bytes(e, rope_dim), OUT_MAIN
    recs = records_view(cache, rb, 1 if mode == OUT_INDEXER_FP4 else 4)
    if slots.shape != (nb,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be int32/int64 [{nb}]")
    if nb:
        _launch(kv, score, overlap, prev_kv, prev_score, block_ids, ratio, norm_weight, eps, rope, dtype, indexer,
                True, mode, None, recs, slots.contiguous())
    return cache
