"""Grouped MoE over quantized experts for SM80+ (spec §7, §9.1): packed FP4 (MXFP4) routed experts,
or FP8 ones (the `-Base` checkpoints).

Reference: `fp4_moe(x, weights, ids, experts, shared, limit=..., quantize_input=...)` ->
`v4_plugin.runtime.ops.moe.moe(x, weights, ids, experts_dequantized, shared_dequantized, limit=..., quantize_input=...)`,
with the routed experts in their checkpoint format, stacked over experts: `FP4Experts` (int8 [out, in/2]
e2m1 pairs, low nibble = even k, E8M0 per 32 along k) or `FP8Experts` (e4m3 [out, in], E8M0 or fp32
scales per 128x128 block); the shared expert in FP8 128x128 blocks (`FP8Expert`). Returns x.dtype like the core.

Per arch: both formats are decoded from their bits in registers (no FP4 / FP8 hardware convert), so the
same W4A16 / W8A16 GEMMs run on SM80, SM89 and SM90 (bf16 tensor-core dots, fp32 accumulation); the
shared expert's `fp8_linear` takes W8A8 where FP8 tensor cores exist (SM89+) with quantize_input, else W8A16.

Flow:

1. `_align` (torch, no host sync): the T*k (token, slot) pairs are sorted by expert and each expert's
   run is padded to a multiple of BLOCK_M; `block_expert[b]` names the expert of M-block b (-1: idle
   block). The grid has an upper bound of blocks, so experts without tokens cost nothing.
2. `_moe_gate_up_kernel`: per (M-block, I-block): g = x w1^T and u = x w3^T with the FP4 / FP8 weight
   tiles decoded to fp32 values in registers (W4A16 / W8A16: bf16 tensor-core dot on GPU), then the
   clamped SwiGLU h = silu(min(g, L)) * clamp(u, -L, L) times the routing weight, rounded to x.dtype
   (and, with quantize_input, rounded through FP8 per 128 channels as the core's w2 linear does).
   h goes to a [T*k, I] buffer.
3. `_moe_down_kernel`: per (M-block, D-block): h w2^T, rounded to x.dtype (the core sums expert
   outputs that `linear` returned in x.dtype), scatter-added into an fp32 [T, D] accumulator.
4. The shared expert runs through `fp8_linear` (W8A8 or W8A16) and is added in fp32; one cast at the end.

The core rounds gate and up to x.dtype too (its `linear` returns x.dtype); the kernel does the same.
quantize_input=True (the reference's FP8 activations) rounds x through FP8 first (`fake_quant_act`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from v4_kernels.formats import e8m0_value
from v4_kernels.fp8_linear.kernel import e4m3_bits_to_f16, fake_quant_act, fp8_linear, quant_rows_e4m3, round_to

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FP4_BLOCK = 32  # E8M0 scale group along K
_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@dataclass
class _StackedExperts:
    """Routed experts stacked over E in checkpoint format (w1, w1_scale, w2, w2_scale, w3, w3_scale)."""

    w1: torch.Tensor
    w1_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    w3: torch.Tensor
    w3_scale: torch.Tensor

    @classmethod
    def stack(cls, experts: list[tuple[torch.Tensor, ...]]):
        """From per-expert (w1, w1_scale, w2, w2_scale, w3, w3_scale) tuples."""
        return cls(*(torch.stack([e[i] for e in experts]).contiguous() for i in range(6)))


class FP4Experts(_StackedExperts):
    """Packed FP4 experts: w1/w3 int8 [E, I, D/2] with scales [E, I, D/32]; w2 int8 [E, D, I/2] with scales
    [E, D, I/32]; scales E8M0 (float8_e8m0fnu or uint8)."""


class FP8Experts(_StackedExperts):
    """Routed FP8 experts (the `-Base` checkpoints): w1/w3 e4m3 [E, I, D] with scales [E, ceil(I/128),
    ceil(D/128)]; w2 e4m3 [E, D, I] with scales [E, ceil(D/128), ceil(I/128)]; scales E8M0
    (float8_e8m0fnu or uint8) or fp32."""


@dataclass
class FP8Expert:
    """The shared expert, FP8 e4m3 weights with E8M0 128x128 block scales: w1/w3 [I, D], w2 [D, I]."""

    w1: torch.Tensor
    w1_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    w3: torch.Tensor
    w3_scale: torch.Tensor


# ---- tile sizes: the one place that picks them ------------------------------------------------
def _tiles(n_slots: int, n_experts: int, d: int, i: int, quant_h: bool, gpu: bool | None = None,
           w_fp8: bool = False) -> dict:
    """BLOCK_M (tokens per expert block) and the N/K tiles of both GEMMs.

    K tiles are multiples of 32 (one E8M0 scale per 32 for FP4) and, for FP8 experts, divide 128 (one
    block scale per tile row). With quantize_input the gate/up I-tile is exactly 128 wide, so the FP8
    rounding of h per 128 channels happens in registers.
    """
    if gpu is None:
        gpu = not _INTERPRET and torch.cuda.is_available()
    if not gpu:
        k_cap = 128 if w_fp8 else 512
        return dict(BLOCK_M=16, BLOCK_N1=128, BLOCK_K1=min(max(triton.next_power_of_2(d), 32), k_cap),
                    BLOCK_N2=min(max(triton.next_power_of_2(d), 16), 512),
                    BLOCK_K2=min(max(triton.next_power_of_2(i), 32), k_cap), num_warps=4, num_stages=1)
    per_expert = n_slots / max(1, min(n_experts, n_slots))
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64
    return dict(BLOCK_M=block_m, BLOCK_N1=128 if quant_h else 64, BLOCK_K1=128, BLOCK_N2=128, BLOCK_K2=128,
                num_warps=4, num_stages=3)


# ---- kernels ----------------------------------------------------------------------------------
@triton.jit
def e2m1_to_f32(code, scale_byte):
    """e2m1 codes (0..15, sign = bit 3) with E8M0 scale bytes -> the exact fp32 value code * 2^(byte - 127).

    Built on the bits: magnitudes 0.5 (code 1) -> 2^(s-128); 1, 1.5, 2, 3, 4, 6 (codes 2..7) -> exponent
    (code >> 1) - 1 and one mantissa bit (code & 1). Valid for scale bytes 2..250 (real scales are far inside).
    """
    s = scale_byte.to(tl.int32) & 0xFF
    mag = code & 7
    bits = tl.where(mag < 2, mag * ((s - 1) << 23), (((mag >> 1) + s - 1) << 23) | ((mag & 1) << 22))
    return (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _fp4_tile(w_ptr, s_ptr, offs_n, k0, K, mask_n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[offs_n, k0 : k0 + BLOCK_K] of one FP4 matrix (bytes [N, K/2], E8M0 scales [N, K/32]) as exact fp32.

    k0 and BLOCK_K are multiples of 32 (K too), so scale groups never straddle a tile; columns past K
    and masked rows load code 0 and decode to 0.
    """
    tl.static_assert(BLOCK_K % 32 == 0, "K tiles hold whole E8M0 groups of 32")
    offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    offs_g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    packed = tl.load(w_ptr + offs_n[:, None] * (K // 2) + offs_p[None, :],
                     mask=mask_n[:, None] & (offs_p < K // 2)[None, :], other=0).to(tl.int32)
    codes = tl.interleave(packed & 0xF, (packed >> 4) & 0xF)  # [BLOCK_N, BLOCK_K]: even k = low nibble
    scales = tl.load(s_ptr + offs_n[:, None] * (K // 32) + offs_g[None, :],
                     mask=mask_n[:, None] & (offs_g < K // 32)[None, :], other=127)
    scales = tl.reshape(tl.broadcast_to(scales[:, :, None], (BLOCK_N, BLOCK_K // 32, 32)), (BLOCK_N, BLOCK_K))
    return e2m1_to_f32(codes, scales)


@triton.jit
def _fp8_tile(w_ptr, s_ptr, offs_n, k0, K, mask_n, SCALE_E8M0: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """W[offs_n, k0 : k0 + BLOCK_K] of one FP8 matrix (e4m3 bytes [N, K], block scales [ceil(N/128),
    ceil(K/128)], E8M0 bytes or fp32) as fp32: e4m3 decoded from its bits (exact; SM80 has no FP8
    convert) times the scale. BLOCK_K divides 128, so the tile lies in one K block."""
    tl.static_assert(128 % BLOCK_K == 0, "an FP8 K tile must not straddle a 128-wide scale block")
    offs_k = k0 + tl.arange(0, BLOCK_K)
    b = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
                mask=mask_n[:, None] & (offs_k < K)[None, :], other=0)
    s = tl.load(s_ptr + (offs_n // 128) * tl.cdiv(K, 128) + k0 // 128, mask=mask_n, other=0)
    if SCALE_E8M0:
        s = e8m0_value(s)
    return e4m3_bits_to_f16(b).to(tl.float32) * (s * 256.0)[:, None]  # the decode holds value * 2^-8


@triton.jit
def _weight_tile(w_ptr, s_ptr, offs_n, k0, K, mask_n, W_FP8: tl.constexpr, SCALE_E8M0: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """An expert's weight tile [BLOCK_N, BLOCK_K] as fp32, FP8 or FP4 (`_fp8_tile`, `_fp4_tile`)."""
    if W_FP8:
        return _fp8_tile(w_ptr, s_ptr, offs_n, k0, K, mask_n, SCALE_E8M0, BLOCK_N, BLOCK_K)
    else:
        return _fp4_tile(w_ptr, s_ptr, offs_n, k0, K, mask_n, BLOCK_N, BLOCK_K)


@triton.jit
def _expert_weights(w_ptr, s_ptr, expert, N, K, W_FP8: tl.constexpr):
    """Expert `expert`'s matrix in a stack over E: pointers to its bytes and scales (FP4: [N, K/2] and
    [N, K/32]; FP8: [N, K] and [ceil(N/128), ceil(K/128)])."""
    e = expert.to(tl.int64)
    if W_FP8:
        return w_ptr + e * N * K, s_ptr + e * tl.cdiv(N, 128) * tl.cdiv(K, 128)
    else:
        return w_ptr + e * N * (K // 2), s_ptr + e * N * (K // 32)


@triton.jit
def _block_slots(slot_ptr, pid_m, n_slots, top_k, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """M-block pid_m of the aligned layout and this program's N tile (grid axis 1): (slots, slot mask
    (False for padding), tokens (0 for padding), offs_n, n mask (< N))."""
    slots = tl.load(slot_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_mask = slots < n_slots
    tokens = tl.where(m_mask, slots // top_k, 0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return slots, m_mask, tokens, offs_n, offs_n < N


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, slot_ptr, block_expert_ptr, route_w_ptr, h_ptr,
    n_slots, D, I, top_k, stride_xt, limit,
    QUANT_H: tl.constexpr, W_FP8: tl.constexpr, SCALE_E8M0: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h[slot, n] = w_slot * silu(min(g, L)) * clamp(u, -L, L) for the slots of one expert block."""
    tl.static_assert(not QUANT_H or BLOCK_N == 128, "h is FP8-rounded per 128 channels: one I tile per group")
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    slots, m_mask, tokens, offs_n, n_mask = _block_slots(slot_ptr, pid_m, n_slots, top_k, I, BLOCK_M, BLOCK_N)
    w1_e, s1_e = _expert_weights(w1_ptr, s1_ptr, expert, I, D, W_FP8)
    w3_e, s3_e = _expert_weights(w3_ptr, s3_ptr, expert, I, D, W_FP8)

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        a = tl.load(x_ptr + tokens[:, None] * stride_xt + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0).to(DOT_DTYPE)
        w1 = _weight_tile(w1_e, s1_e, offs_n, k0, D, n_mask, W_FP8, SCALE_E8M0, BLOCK_N, BLOCK_K)
        acc_g = tl.dot(a, tl.trans(w1.to(DOT_DTYPE)), acc_g, input_precision=DOT_PRECISION)
        w3 = _weight_tile(w3_e, s3_e, offs_n, k0, D, n_mask, W_FP8, SCALE_E8M0, BLOCK_N, BLOCK_K)
        acc_u = tl.dot(a, tl.trans(w3.to(DOT_DTYPE)), acc_u, input_precision=DOT_PRECISION)

    out_ty = h_ptr.dtype.element_ty
    gate = round_to(acc_g, out_ty, INTERPRET)  # the core's linear returns x.dtype
    up = round_to(acc_u, out_ty, INTERPRET)
    if limit > 0:
        up = tl.minimum(tl.maximum(up, -limit), limit)
        gate = tl.minimum(gate, limit)
    route_w = tl.load(route_w_ptr + slots, mask=m_mask, other=0.0)
    h = gate * tl.sigmoid(gate) * up * route_w[:, None]
    h = round_to(h, out_ty, INTERPRET)
    if QUANT_H:  # the w2 linear's activation quantization: per row per 128 channels (BLOCK_N == 128)
        q, scale = quant_rows_e4m3(tl.where(n_mask[None, :], h, 0.0))
        h = q * scale[:, None]
    tl.store(h_ptr + slots[:, None].to(tl.int64) * I + offs_n[None, :], h.to(out_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr, w2_ptr, s2_ptr, slot_ptr, block_expert_ptr, y_ptr,
    n_slots, D, I, top_k,
    OUT_DTYPE: tl.constexpr, W_FP8: tl.constexpr, SCALE_E8M0: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[token, n] += round_{x.dtype}(h[slot] . w2[n]) for the slots of one expert block (fp32 atomics)."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    slots, m_mask, tokens, offs_n, n_mask = _block_slots(slot_ptr, pid_m, n_slots, top_k, D, BLOCK_M, BLOCK_N)
    w2_e, s2_e = _expert_weights(w2_ptr, s2_ptr, expert, D, I, W_FP8)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < I
        a = tl.load(h_ptr + slots[:, None].to(tl.int64) * I + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w2 = _weight_tile(w2_e, s2_e, offs_n, k0, I, n_mask, W_FP8, SCALE_E8M0, BLOCK_N, BLOCK_K)
        acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w2.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
    out = round_to(acc, OUT_DTYPE, INTERPRET)
    tl.atomic_add(y_ptr + tokens[:, None].to(tl.int64) * D + offs_n[None, :], out,
                  mask=m_mask[:, None] & n_mask[None, :])


# ---- routing layout ---------------------------------------------------------------------------
def _align(ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs by expert, padding each expert's run to a multiple of block_m.

    Returns (slots int32 [n_blocks * block_m]: flat slot index t*k + j, or n_slots for padding;
    block_expert int32 [n_blocks]: expert of each block, -1 for blocks past the end). No host sync:
    n_blocks is the upper bound for min(E, T*k) non-empty experts. Ids outside 0 ... E-1 (experts another
    rank holds, under expert parallelism) gather in a trailing run of idle (-1) blocks: never computed.
    """
    flat = ids.reshape(-1).long()
    flat = torch.where((flat >= 0) & (flat < n_experts), flat, n_experts)
    n_slots = flat.numel()
    dev = flat.device
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    first = counts.cumsum(0) - counts
    dest = starts[sorted_e] + torch.arange(n_slots, device=dev) - first[sorted_e]
    n_blocks = triton.cdiv(n_slots, block_m) + min(n_experts + 1, n_slots)
    slots = torch.full((n_blocks * block_m,), n_slots, dtype=torch.int32, device=dev)
    slots[dest] = order.to(torch.int32)
    block_start = torch.arange(n_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return slots, block_expert


# ---- wrapper ----------------------------------------------------------------------------------
def _check(experts: FP4Experts | FP8Experts, d: int) -> tuple[int, int]:
    """(E, I) of the routed experts; raises ValueError naming the mismatch."""
    fp8 = isinstance(experts, FP8Experts)
    e, i, k = experts.w1.shape
    if fp8:
        scale = (e, triton.cdiv(i, 128), triton.cdiv(d, 128))
        ok = (k == d and tuple(experts.w2.shape) == (e, d, i) and tuple(experts.w1_scale.shape) == scale
              and tuple(experts.w2_scale.shape) == (e, scale[2], scale[1]))
    else:
        ok = k * 2 == d and tuple(experts.w2.shape) == (e, d, i // 2)
    if not ok or experts.w3.shape != experts.w1.shape or experts.w3_scale.shape != experts.w1_scale.shape:
        raise ValueError(f"{type(experts).__name__}: w1 {tuple(experts.w1.shape)}, w2 {tuple(experts.w2.shape)}, "
                         f"w1_scale {tuple(experts.w1_scale.shape)} do not fit D = {d}")
    if not fp8 and (d % FP4_BLOCK or i % FP4_BLOCK):
        raise ValueError(f"D ({d}) and I ({i}) must be multiples of {FP4_BLOCK}")
    return e, i


def _scales(scale: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A scale tensor as the kernels read it: (E8M0 bytes as uint8, True) or (fp32, False)."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return scale.view(torch.uint8), True
    return scale.float().contiguous(), False


def _shared(x: torch.Tensor, shared: FP8Expert, limit: float, quantize_input: bool) -> torch.Tensor:
    """The core's `expert(x, shared)` with FP8 linears: clamped SwiGLU, no routing weight; x.dtype out."""
    gate = fp8_linear(x, shared.w1, shared.w1_scale, quantize_input).float()
    up = fp8_linear(x, shared.w3, shared.w3_scale, quantize_input).float()
    if limit > 0:
        up = up.clamp(-limit, limit)
        gate = gate.clamp(max=limit)
    h = torch.nn.functional.silu(gate) * up
    return fp8_linear(h.to(x.dtype), shared.w2, shared.w2_scale, quantize_input)


def fp4_moe(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: FP4Experts | FP8Experts,
    shared: FP8Expert | None, *, limit: float, quantize_input: bool = False,
) -> torch.Tensor:
    """Triton `v4_plugin.runtime.ops.moe.moe`: x [T, D] (bf16/fp32), weights fp32 [T, k], ids [T, k] -> [T, D] x.dtype.

    Routed experts: packed FP4 (`FP4Experts`, W4A16) or FP8 (`FP8Experts`, W8A16). `quantize_input=True`
    gives the reference's FP8 activation rounding (x per 128 of D, h per 128 of I). `shared=None` skips
    the shared expert. Slots whose id is outside 0 ... E-1 add nothing (expert parallelism: `ids` minus the
    rank's first expert, the others' experts out of range).
    """
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"x must be bf16 or fp32, got {x.dtype}")
    t, d = x.shape
    n_experts, inter = _check(experts, d)
    y = torch.zeros((t, d), dtype=torch.float32, device=x.device)
    top_k = ids.shape[1] if ids.dim() == 2 else 1
    n_slots = ids.numel()
    if n_slots:
        w_fp8 = isinstance(experts, FP8Experts)
        if not w_fp8 and experts.w1_scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
            raise ValueError(f"FP4Experts scales must be E8M0, got {experts.w1_scale.dtype}")
        cfg = _tiles(n_slots, n_experts, d, inter, quantize_input, w_fp8=w_fp8)
        slots, block_expert = _align(ids, n_experts, cfg["BLOCK_M"])
        xa = fake_quant_act(x) if quantize_input else x
        if xa.stride(-1) != 1:
            xa = xa.contiguous()
        route_w = weights.reshape(-1).float().contiguous()
        h = torch.empty((n_slots, inter), dtype=x.dtype, device=x.device)
        dot_dtype = tl.float32 if _INTERPRET else _TL_DTYPE[x.dtype]  # bf16 tl.dot is garbage in the interpreter
        precision = "ieee" if dot_dtype == tl.float32 else "tf32"  # fp32 x: true fp32 products (no TF32)
        n_blocks = block_expert.numel()
        (s1, e8m0), (s2, _), (s3, _) = _scales(experts.w1_scale), _scales(experts.w2_scale), _scales(experts.w3_scale)
        w1, w2, w3 = (w.view(torch.uint8) for w in (experts.w1, experts.w2, experts.w3))
        fmt = dict(W_FP8=w_fp8, SCALE_E8M0=e8m0)
        _moe_gate_up_kernel[(n_blocks, triton.cdiv(inter, cfg["BLOCK_N1"]))](
            xa, w1, s1, w3, s3, slots, block_expert, route_w, h, n_slots, d, inter, top_k, xa.stride(0), float(limit),
            QUANT_H=quantize_input, **fmt, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, INTERPRET=_INTERPRET,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N1"], BLOCK_K=cfg["BLOCK_K1"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        _moe_down_kernel[(n_blocks, triton.cdiv(d, cfg["BLOCK_N2"]))](
            h, w2, s2, slots, block_expert, y, n_slots, d, inter, top_k,
            OUT_DTYPE=_TL_DTYPE[x.dtype], **fmt, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, INTERPRET=_INTERPRET,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N2"], BLOCK_K=cfg["BLOCK_K2"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    if shared is not None and t:
        y += _shared(x, shared, limit, quantize_input).float()
    return y.to(x.dtype)
