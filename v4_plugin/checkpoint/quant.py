"""Number formats of DeepSeek-V4: FP8 e4m3 and FP4 e2m1 with power-of-two (E8M0) block scales.

Two uses share these functions: the on-disk weight formats (FP8 128 x 128 blocks, packed FP4 experts,
spec §9.1) and the quantization the model simulates at run time (per-128 activation quantization in
every FP8/FP4 linear, FP8 KV entries in blocks of 64, FP4 indexer q/k in blocks of 32; spec §4, §8).
Scales are always powers of two, computed as in DeepSeek's reference kernels: scale = 2^ceil(log2(amax / max))
with amax clamped from below, so a value stored in a quantized cache dequantizes bit-exactly to the
simulated one (spec §5.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_MAX = 448.0  # largest finite float8 e4m3fn
FP4_MAX = 6.0  # largest e2m1
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6.0 * 2.0**-126
E8M0_NAN = 255

# The 8 non-negative e2m1 values, indexed by the 3 magnitude bits of a code; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ---- power-of-two scales -----------------------------------------------------------------------
def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x, exactly (x > 0, fp32)."""
    mantissa, exponent = torch.frexp(x.float())  # x = m * 2^e, m in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(mantissa), exponent)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 scales (a `float8_e8m0fnu` or uint8 tensor) to fp32: 2^(byte - 127), byte 255 = NaN."""
    byte = scale.view(torch.uint8).to(torch.int32)
    value = torch.ldexp(torch.ones(byte.shape, dtype=torch.float32, device=byte.device), byte - 127)
    return torch.where(byte == E8M0_NAN, torch.full_like(value, float("nan")), value)


def float_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Encode power-of-two fp32 scales as `float8_e8m0fnu` (exact for 2^-127 ... 2^127)."""
    mantissa, exponent = torch.frexp(scale.float())
    if not bool((mantissa == 0.5).all()):
        raise ValueError("E8M0 holds powers of two only; round the scale first (pow2_ceil)")
    return (exponent - 1 + 127).clamp(0, 254).to(torch.uint8).view(torch.float8_e8m0fnu)


# ---- rounding onto the element grids -----------------------------------------------------------
def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (|x| <= 448) to the nearest float8 e4m3fn value, ties to even; returns fp32."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (|x| <= 6) to e2m1 codes (uint8 in 0..15), to nearest, ties to even.

    The midpoints between consecutive grid values alternate between rounding down (the lower
    neighbour has an even mantissa) and up: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
    3.5 -> 4, 5 -> 4.
    """
    a = x.float().abs().clamp(max=FP4_MAX)
    magnitude = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    midpoints = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
    for mid, tie_rounds_up in midpoints:
        magnitude += (a >= mid if tie_rounds_up else a > mid).to(torch.uint8)
    sign = (x < 0).to(torch.uint8) << 3
    return torch.where(magnitude == 0, magnitude, magnitude | sign)  # no negative zero


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Decode e2m1 codes (0..15) to fp32."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack e2m1 codes [..., K] (K even) into int8 [..., K/2]: low nibble = even k, high nibble = odd k."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`: int8 [..., K/2] -> codes uint8 [..., K]."""
    b = packed.view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


# ---- block quantization along the last dimension -----------------------------------------------
def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """View x [..., K] as [..., ceil(K/block), block], zero-padding a partial last block."""
    k = x.shape[-1]
    pad = (-k) % block
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    return xf.unflatten(-1, (-1, block)), k


def quantize_fp8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 with one power-of-two scale per `block` elements of the last dim.

    Returns (q [..., K] float8_e4m3fn, scale [..., ceil(K/block)] fp32 powers of two).
    """
    xb, k = _blocks(x, block)
    scale = pow2_ceil(xb.abs().amax(-1, keepdim=True).clamp_min(FP8_AMAX_FLOOR) / FP8_MAX)
    q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2)[..., :k], scale.squeeze(-1)


def quantize_fp4(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 e2m1 (MXFP4) with one power-of-two scale per `block` elements of the last dim.

    Returns (codes [..., K] uint8 0..15, scale [..., ceil(K/block)] fp32 powers of two).
    """
    xb, k = _blocks(x, block)
    scale = pow2_ceil(xb.abs().amax(-1, keepdim=True).clamp_min(FP4_AMAX_FLOOR) / FP4_MAX)
    codes = e2m1_codes(xb / scale)
    return codes.flatten(-2)[..., :k], scale.squeeze(-1)


def _expand(scale: torch.Tensor, block: int, k: int) -> torch.Tensor:
    return scale.repeat_interleave(block, dim=-1)[..., :k]


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of `quantize_fp8`; fp32 out."""
    return q.float() * _expand(scale.float(), block, q.shape[-1])


def dequantize_fp4(codes: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Inverse of `quantize_fp4`; fp32 out."""
    return e2m1_decode(codes) * _expand(scale.float(), block, codes.shape[-1])


def fake_quant_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """Round x through FP8 with per-`block` power-of-two scales (QAT simulation); same dtype out."""
    q, s = quantize_fp8(x, block)
    return dequantize_fp8(q, s, block).to(x.dtype)


def fake_quant_fp4(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Round x through FP4 e2m1 with per-`block` power-of-two scales (QAT simulation); same dtype out."""
    codes, s = quantize_fp4(x, block)
    return dequantize_fp4(codes, s, block).to(x.dtype)


# ---- weight formats (spec §9.1) ----------------------------------------------------------------
def quantize_weight_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled FP8 weight: w [out, in] -> (e4m3 [out, in], E8M0 scale [ceil(out/128), ceil(in/128)])."""
    out_f, in_f = w.shape
    pad_o, pad_i = (-out_f) % block, (-in_f) % block
    wp = torch.nn.functional.pad(w.float(), (0, pad_i, 0, pad_o))
    tiles = wp.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # [O/b, b, I/b, b]
    amax = tiles.abs().amax(dim=(1, 3))
    scale = pow2_ceil(amax.clamp_min(FP8_AMAX_FLOOR) / FP8_MAX)  # [O/b, I/b]
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(2).flatten(0, 1)[:out_f, :in_f].contiguous(), float_to_e8m0(scale)


def dequantize_weight_fp8(w: torch.Tensor, scale: torch.Tensor, block: int = 128,
                          offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Inverse of `quantize_weight_fp8`, handling partial edge blocks; fp32 [out, in].

    `offset` (row, column): where w starts inside the first block `scale` covers, for a slice of a stored
    weight that does not start on a block edge (`scale`: the scales of every block the slice touches)."""
    s = e8m0_to_float(scale) if scale.dtype in (torch.float8_e8m0fnu, torch.uint8) else scale.float()
    (out_f, in_f), (r0, c0) = w.shape, offset
    full = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[r0:r0 + out_f, c0:c0 + in_f]
    return w.float() * full


def quantize_weight_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed FP4 expert weight: w [out, in] -> (int8 [out, in/2], E8M0 scale [out, in/32])."""
    codes, scale = quantize_fp4(w, block)
    return pack_fp4(codes), float_to_e8m0(scale)


def dequantize_weight_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Inverse of `quantize_weight_fp4`; fp32 [out, in]."""
    s = e8m0_to_float(scale) if scale.dtype in (torch.float8_e8m0fnu, torch.uint8) else scale.float()
    return dequantize_fp4(unpack_fp4(packed), s, block)


# ---- Hadamard rotation -------------------------------------------------------------------------
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform along the last dim (a power of two), scale n^-1/2; fp32 math."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    y = x.float()
    h = 1
    while h < n:  # butterfly: pairs (i, i + h) within blocks of 2h
        y = y.unflatten(-1, (-1, 2, h))
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2).flatten(-3)
        h *= 2
    return (y * n**-0.5).to(x.dtype)


@dataclass(frozen=True)
class QuantSim:
    """Which trained-in quantizations the model simulates (all on by default; `off()`: the exact mode)."""

    activations: bool = True  # FP8 per-128 activation quantization in FP8/FP4 linears
    kv_cache: bool = True  # window and compressed entries as the 584-B record stores them (FP8 + bf16 rope)
    indexer: bool = True  # Hadamard + FP4 (blocks of 32) on indexer queries and keys

    @classmethod
    def off(cls) -> "QuantSim":
        return cls(False, False, False)
