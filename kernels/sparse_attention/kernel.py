"""Sparse attention over a slot list of KV entries, read straight from the cache (spec §4.7, §5.3).

Reference: `v4_plugin.runtime.ops.attention.sparse_attention` (with `v4_plugin.cache.records.unpack_main` for the
FP8 cache). `sparse_attention` below has the same signature and meaning; `kv` may be

* the quantized cache, uint8 [num_slots, main_entry_bytes] (584-B records: e4m3 of dims [0, nope),
  bf16 rope dims, one E8M0 scale per 64 FP8 values, zero pad), dequantized in registers, or
* an unquantized cache [num_slots, head_dim] in the compute dtype (the exact mode).

`indices` [T, S] are cache slots (-1 = skip); window entries and selected / visible compressed
entries are all just slots, and duplicates are counted as often as they appear (no dedup). Every
head shares the one KV row, which is both key and value (K = V).

Design. Program (t, head block, split) streams its share of the slot list in tiles of BLOCK_N
rows: gather the rows, dequantize in registers, s = q . k (fp32 accumulate), online softmax in
base 2, acc += p . k. Nothing gathered is written back to memory.

* Prefill / large batch: one split; the program folds in the sink and writes the output.
* Decode (few queries): split-K over the slot list. Each split writes its normalized partial
  output and log-sum-exp (fp32); a second pass `_combine_kernel` merges the splits and the sink
  (o = sum_s 2^(lse_s - M) o_s / (sum_s 2^(lse_s - M) + 2^(sink - M))). The split count targets
  about two waves of SMs, so batch 1 fills the GPU instead of running one program per sequence.

Numerics: scores, softmax and accumulators are fp32. On GPU with bf16/fp16 q, both tl.dot operands
are cast to q's dtype (dequantized FP8 values and bf16 rope dims are exact in bf16; P is rounded
to bf16 before the PV product as in the reference kernel). Under the Triton interpreter, and for
fp32 q, the dots run in fp32 (`input_precision="ieee"`). A query whose slots are all empty returns
0, also when its sink is -inf (the torch reference returns NaN there: 0/0).

GPU status: every autotune config compiles for sm90 and sm80 (triton.compile with a GPUTarget, no
spills; two configs exceed sm80's shared memory and are skipped by the autotuner); not yet run on
a GPU. Benchmark: bench/bench_sparse_attention.py.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from v4_kernels.formats import e4m3_to_f32, e8m0_value
from v4_plugin.checkpoint.config import FP8_KV_BLOCK
from v4_plugin.cache.layout import BF16_BYTES, SCALE_SECTION_ALIGN

LOG2E = 1.4426950408889634

__all__ = ["sparse_attention", "main_record_layout", "attention_tiles"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def main_record_layout(head_dim: int, rope_dim: int) -> tuple[int, int, int]:
    """(nope, offset of the scale bytes, record bytes) of a main record; 448 / 576 / 584 for V4."""
    nope = head_dim - rope_dim
    if nope <= 0 or nope % FP8_KV_BLOCK:
        raise ValueError(f"head_dim - rope_dim must be a positive multiple of {FP8_KV_BLOCK}, got {nope}")
    scale_off = nope + BF16_BYTES * rope_dim
    nblocks = nope // FP8_KV_BLOCK
    return nope, scale_off, scale_off + -(-nblocks // SCALE_SECTION_ALIGN) * SCALE_SECTION_ALIGN


# ---- dequantization helpers (fp32 out) ---------------------------------------------------------
@triton.jit
def _load_kv_tile(kv_ptr, slot, valid, stride_kv,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NOPE: tl.constexpr, SCALE_OFF: tl.constexpr,
                  KV_FP8: tl.constexpr, FP8_HW: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows `slot` [BLOCK_N] of the cache as fp32 [BLOCK_N, D_PAD]; invalid rows, padded columns 0.

    FP8 records are read as [BLOCK_N, D_PAD / 64, 64]: the e4m3 bytes of the nope blocks, one E8M0
    byte per block and (rope = 64 dims, as in V4) one [BLOCK_N, 64] bf16 load broadcast into the
    rope block, so every byte is loaded once. ROW_ALIGN (a power of two dividing the row stride,
    8 for 584-B records) lets the compiler vectorize the gathers: such strides are not specialized.
    """
    row = tl.multiple_of(slot.to(tl.int64) * stride_kv, ROW_ALIGN)
    if KV_FP8:
        NB: tl.constexpr = D_PAD // 64
        blk = tl.arange(0, NB)
        i = tl.arange(0, 64)
        col3 = blk[None, :, None] * 64 + i[None, None, :]
        is_nope = (blk < NOPE // 64)[None, :, None]
        is_rope = ((blk * 64 >= NOPE) & (blk * 64 < HEAD_DIM))[None, :, None]
        ok3 = valid[:, None, None]
        v8 = e4m3_to_f32(tl.load(kv_ptr + row[:, None, None] + col3, mask=ok3 & is_nope, other=0), FP8_HW)
        sc = e8m0_value(tl.load(kv_ptr + row[:, None] + SCALE_OFF + blk[None, :],
                                mask=valid[:, None] & (blk < NOPE // 64)[None, :], other=127).to(tl.int32))
        rope_base = (kv_ptr + row + NOPE).to(tl.pointer_type(tl.bfloat16))
        if HEAD_DIM - NOPE == 64:
            rope = tl.load(rope_base[:, None] + i[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            rope = rope[:, None, :]
        else:
            rope = tl.load(rope_base[:, None, None] + (col3 - NOPE), mask=ok3 & is_rope, other=0.0).to(tl.float32)
        k3 = tl.where(is_nope, v8 * sc[:, :, None], tl.where(is_rope, rope, 0.0))
        k = tl.reshape(k3, [BLOCK_N, D_PAD])
    else:
        c = tl.arange(0, D_PAD)[None, :]
        k = tl.load(kv_ptr + row[:, None] + c, mask=valid[:, None] & (c < HEAD_DIM), other=0.0).to(tl.float32)
    return k


# ---- main kernel -------------------------------------------------------------------------------
@triton.jit
def _sparse_attn_kernel(
    q_ptr, kv_ptr, slots_ptr, kv2_ptr, slots2_ptr, sink_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    S, S1, H, chunk, num_splits, qk_scale,
    stride_qt, stride_qh, stride_kv, stride_st, stride_kv2, stride_st2, stride_ot, stride_oh, T_BUCKET, CHUNK_BUCKET,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NOPE: tl.constexpr, SCALE_OFF: tl.constexpr,
    KV_FP8: tl.constexpr, FP8_HW: tl.constexpr, DOT_F32: tl.constexpr, WRITE_FINAL: tl.constexpr,
    TWO_SOURCES: tl.constexpr, ROW_ALIGN: tl.constexpr, ROW_ALIGN2: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Query t, head block hb, split sp: the slots [sp*chunk, (sp+1)*chunk) of the query's slot list, which
    is slots[t, :S1] into kv followed (TWO_SOURCES) by slots2[t, :S - S1] into kv2."""
    t = tl.program_id(0)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    cols = tl.arange(0, D_PAD)
    cmask = cols < HEAD_DIM

    q = tl.load(q_ptr + t.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + cols[None, :],
                mask=hmask[:, None] & cmask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_PAD], tl.float32)

    start = sp * chunk
    end = tl.minimum(start + chunk, S)
    slot_row = slots_ptr + t.to(tl.int64) * stride_st
    slot_row2 = slots2_ptr + t.to(tl.int64) * stride_st2
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        first = offs < S1
        slot = tl.load(slot_row + offs, mask=first & (offs < end), other=-1)
        valid = slot >= 0
        k = _load_kv_tile(kv_ptr, slot, valid, stride_kv, HEAD_DIM, D_PAD, NOPE, SCALE_OFF, KV_FP8, FP8_HW,
                          ROW_ALIGN, BLOCK_N)
        if TWO_SOURCES:  # a tile may straddle the two lists: each row comes from one (the other loads 0)
            slot2 = tl.load(slot_row2 + (offs - S1), mask=(~first) & (offs < end), other=-1)
            valid2 = slot2 >= 0
            k += _load_kv_tile(kv2_ptr, slot2, valid2, stride_kv2, HEAD_DIM, D_PAD, NOPE, SCALE_OFF, KV_FP8,
                               FP8_HW, ROW_ALIGN2, BLOCK_N)
            valid = valid | valid2
        if DOT_F32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            k = k.to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision="tf32")  # 16-bit operands: the argument has no effect
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_F32:
            pv = tl.dot(p, k, input_precision="ieee")
        else:
            pv = tl.dot(p.to(k.dtype), k, input_precision="tf32")
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if WRITE_FINAL:
        sink = tl.load(sink_ptr + heads, mask=hmask, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        mx = tl.maximum(m_i, sink)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        alpha = tl.exp2(m_i - mx)
        denom = l_i * alpha + tl.exp2(sink - mx)
        denom = tl.where(denom == 0.0, 1.0, denom)
        o = acc * (alpha / denom)[:, None]
        o_ptrs = out_ptr + t.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + cols[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=hmask[:, None] & cmask[None, :])
    else:
        has = l_i > 0.0
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        row = (t.to(tl.int64) * num_splits + sp) * H + heads  # partials [T, splits, H, D_PAD]
        tl.store(part_lse_ptr + row, lse, mask=hmask)
        tl.store(part_o_ptr + row[:, None] * D_PAD + cols[None, :], o, mask=hmask[:, None])


@triton.jit
def _combine_kernel(
    part_o_ptr, part_lse_ptr, sink_ptr, out_ptr, num_splits, H, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Merge the split partials of (query t, head block) with the sink (online, one pass over splits)."""
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    cols = tl.arange(0, D_PAD)
    m = tl.load(sink_ptr + heads, mask=hmask, other=float("-inf")).to(tl.float32) * 1.4426950408889634
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.exp2(m - m_safe)  # the sink: a virtual key with zero value
    acc = tl.zeros([BLOCK_H, D_PAD], tl.float32)
    for sp in range(num_splits):
        row = (t.to(tl.int64) * num_splits + sp) * H + heads
        lse = tl.load(part_lse_ptr + row, mask=hmask, other=float("-inf"))
        o = tl.load(part_o_ptr + row[:, None] * D_PAD + cols[None, :], mask=hmask[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_new_safe)
        w = tl.exp2(lse - m_new_safe)
        den = den * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    den = tl.where(den == 0.0, 1.0, den)
    o_ptrs = out_ptr + t.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + cols[None, :]
    tl.store(o_ptrs, (acc / den[:, None]).to(out_ptr.dtype.element_ty),
             mask=hmask[:, None] & (cols < HEAD_DIM)[None, :])


# ---- launch configuration ----------------------------------------------------------------------
def _gpu_configs() -> list[triton.Config]:
    shapes = [(16, 32, 4, 2), (16, 64, 4, 2), (16, 32, 8, 2), (16, 16, 4, 1),
              (32, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 1), (64, 16, 8, 2)]
    return [triton.Config({"BLOCK_H": bh, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bh, bn, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    h = named_args["H"]
    cap = max(16, triton.next_power_of_2(h))
    kept = [c for c in configs if c.kwargs["BLOCK_H"] <= cap]
    return kept or configs[:1]


@functools.lru_cache(maxsize=None)
def _tuned_attn():
    """Tuned per head count, record format and shape bucket: queries (T_BUCKET) and slots per split
    (CHUNK_BUCKET), so a decode step and a prefill chunk each get their own config."""
    key = ["H", "HEAD_DIM", "KV_FP8", "DOT_F32", "WRITE_FINAL", "TWO_SOURCES", "T_BUCKET", "CHUNK_BUCKET"]
    return triton.autotune(_gpu_configs(), key=key, prune_configs_by={"early_config_prune": _prune})(
        _sparse_attn_kernel)


def shape_bucket(n: int, cap: int) -> int:
    """The autotune bucket of a count: the next power of two, at most `cap` (16 buckets or fewer)."""
    return min(triton.next_power_of_2(max(n, 1)), cap)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def attention_tiles(T: int, H: int, S: int, head_dim: int, device: torch.device,
                    num_splits: int | None = None) -> dict:
    """The one place that picks tiles and the split-K shape.

    Returns dict(splits, chunk, combine_block_h, block_h, block_n [None on GPU: autotuned]).
    GPU: aim for about 2 programs per SM counting nominal 16-head blocks; splits are a multiple of
    32 slots. CPU (interpreter): large tiles, few programs; decode still takes the split path.
    """
    on_gpu = device.type == "cuda" and not _interpreting()
    d_pad = triton.next_power_of_2(head_dim)
    if on_gpu:
        block_h = block_n = None
        target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        gran = 32
        head_blocks = triton.cdiv(H, 16)
        combine_h = 4
    else:
        block_h = min(64, max(16, triton.next_power_of_2(H)))
        block_n = 128 if d_pad <= 128 else 64
        target = 4
        gran = block_n
        head_blocks = triton.cdiv(H, block_h)
        combine_h = block_h
    units = max(1, triton.cdiv(S, gran))
    if num_splits is None:
        num_splits = triton.cdiv(target, T * head_blocks)
    num_splits = max(1, min(int(num_splits), units))
    chunk = triton.cdiv(units, num_splits) * gran
    return dict(splits=triton.cdiv(S, chunk) if S else 1, chunk=chunk, block_h=block_h, block_n=block_n,
                combine_block_h=combine_h)


def _row_align(stride: int) -> int:
    """Largest power of two (<= 16) dividing a row stride: the alignment hint of the row gathers."""
    return min(16, stride & -stride) if stride > 0 else 1


# ---- wrapper -----------------------------------------------------------------------------------
def sparse_attention(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, scale: float,
                     *, kv2: torch.Tensor | None = None, indices2: torch.Tensor | None = None, rope_dim: int = 64,
                     num_splits: int | None = None, fp8_hw: bool | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton `v4_plugin.runtime.ops.attention.sparse_attention`, reading KV from the cache by slot.

    q [T, H, d]; kv uint8 [num_slots, record_bytes] (FP8 main records, `rope_dim` bf16 dims) or
    float [num_slots, d]; indices int32/int64 [T, S] slots, -1 = skip; sink fp32 [H] (not scaled;
    -inf for padded heads); scale (d^-1/2). Returns [T, H, d] in q.dtype (or writes `out`).
    kv2 / indices2 [T, S2]: a second cache of the same format (a layer's compressed entries beside its
    window): one softmax over both slot lists (`ops.attention.attention_over_slots`).
    num_splits forces the split-K count (tests); fp8_hw picks the e4m3 decode (default: hardware
    convert on sm89+, integer decode elsewhere and in the interpreter).
    """
    T, H, d = q.shape
    two = kv2 is not None
    if two and (indices2 is None or indices2.shape[0] != T or kv2.dtype != kv.dtype or kv2.shape[1] != kv.shape[1]):
        raise ValueError(f"second source: kv2 {None if kv2 is None else tuple(kv2.shape)} must match kv "
                         f"{tuple(kv.shape)} in format, with indices2 [T={T}, S2]")
    S1 = indices.shape[1]
    S = S1 + (indices2.shape[1] if two else 0)
    if indices.shape[0] != T or sink.shape != (H,):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, indices {tuple(indices.shape)}, "
                         f"sink {tuple(sink.shape)}")
    kv_fp8 = kv.dtype == torch.uint8
    if kv_fp8:
        nope, scale_off, rec_bytes = main_record_layout(d, rope_dim)
        if kv.shape[1] != rec_bytes:
            raise ValueError(f"main records of head_dim {d}, rope {rope_dim} are {rec_bytes} B, got {kv.shape[1]}")
    else:
        nope, scale_off = d, 0
        if kv.shape[1] != d:
            raise ValueError(f"kv rows must be {d} wide, got {kv.shape[1]}")
    if out is None:
        out = torch.empty((T, H, d), dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    if S == 0:
        return out.zero_()

    q = q if q.stride(-1) == 1 else q.contiguous()
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    if two:
        kv2 = kv2 if kv2.stride(-1) == 1 else kv2.contiguous()
        indices2 = indices2 if indices2.stride(-1) == 1 else indices2.contiguous()
    else:
        kv2, indices2 = kv, indices  # not read
    sink = sink.float().contiguous()
    on_gpu = q.device.type == "cuda" and not _interpreting()
    dot_f32 = (not on_gpu) or q.dtype == torch.float32
    if fp8_hw is None:
        fp8_hw = on_gpu and torch.cuda.get_device_capability(q.device) >= (8, 9)
    d_pad = triton.next_power_of_2(d)
    cfg = attention_tiles(T, H, S, d, q.device, num_splits)
    splits, chunk = cfg["splits"], cfg["chunk"]
    final = splits == 1
    if final:
        part_o = part_lse = out  # unused
    else:
        part_o = torch.empty((T, splits, H, d_pad), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((T, splits, H), dtype=torch.float32, device=q.device)

    args = (q, kv, indices, kv2, indices2, sink, out, part_o, part_lse, S, S1, H, chunk, splits,
            float(scale) * LOG2E, q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), kv2.stride(0),
            indices2.stride(0), out.stride(0), out.stride(1), shape_bucket(T, 4096), shape_bucket(chunk, 1 << 17))
    consts = dict(HEAD_DIM=d, D_PAD=d_pad, NOPE=nope, SCALE_OFF=scale_off, KV_FP8=kv_fp8, FP8_HW=bool(fp8_hw),
                  DOT_F32=dot_f32, WRITE_FINAL=final, TWO_SOURCES=two, ROW_ALIGN=_row_align(kv.stride(0)),
                  ROW_ALIGN2=_row_align(kv2.stride(0)))
    if on_gpu:
        grid = lambda meta: (T, triton.cdiv(H, meta["BLOCK_H"]), splits)  # noqa: E731
        _tuned_attn()[grid](*args, **consts)
    else:
        grid = (T, triton.cdiv(H, cfg["block_h"]), splits)
        _sparse_attn_kernel[grid](*args, **consts, BLOCK_H=cfg["block_h"], BLOCK_N=cfg["block_n"],
                                  num_warps=4, num_stages=1)
    if not final:
        bh = cfg["combine_block_h"]
        _combine_kernel[(T, triton.cdiv(H, bh))](part_o, part_lse, sink, out, splits, H, out.stride(0), out.stride(1),
                                                 HEAD_DIM=d, D_PAD=d_pad, BLOCK_H=bh, num_warps=4)
    return out
