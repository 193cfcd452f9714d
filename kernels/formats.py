"""Bit-exact number formats for the kernels: bf16, float8 e4m3fn, E8M0 and FP4 e2m1.

Every rounding is integer arithmetic on the fp32 bit pattern, never a float cast, so results equal
`v4_plugin.checkpoint.quant` bit for bit in the Triton interpreter (whose fp32 -> fp8/bf16 casts round toward
zero) and on any GPU. Decoders accept codes in int32; `e4m3_to_f32` may use the hardware convert.
"""

from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def exp2i(e):
    """2^e as fp32 for int32 e in [-126, 127], built from the exponent bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def pow2_ceil_exp(amax, MAXV: tl.constexpr):
    """int32 e = ceil(log2(amax / MAXV)) exactly: the smallest e with MAXV * 2^e >= amax.

    amax must be positive, finite and >= MAXV * 2^-126. Equal to `quant.pow2_ceil(amax / MAXV)`: the
    first guess comes from the exponent bits of the (possibly inexact) quotient and is corrected with
    exact comparisons (MAXV * 2^e is exact in fp32).
    """
    t = amax / MAXV
    bits = t.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.where((bits & 0x7FFFFF) != 0, e + 1, e)
    e = tl.where(exp2i(tl.maximum(e - 1, -126)) * MAXV >= amax, e - 1, e)
    e = tl.where(exp2i(e) * MAXV < amax, e + 1, e)
    return tl.maximum(e, -126)


@triton.jit
def bf16_bits(x):
    """fp32 -> bf16 bit pattern (int32 in [0, 65535]), round to nearest even; NaN -> 0x7FC0 (as torch)."""
    b = x.to(tl.uint32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int32)
    return tl.where(x != x, 0x7FC0, r)


@triton.jit
def round_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), returned as fp32."""
    return (bf16_bits(x) << 16).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_code(y):
    """fp32 y with |y| <= 448 -> float8_e4m3fn code (int32 0..255), round to nearest even.

    Normal results round the 23-bit mantissa to 3 bits; below 2^-6 (e4m3 subnormals, step 2^-9)
    adding 2^14 makes the fp32 adder round to a multiple of 2^-9 (ties to even). Sign kept (-0 -> 0x80).
    """
    sign = ((y.to(tl.uint32, bitcast=True) >> 24) & 0x80).to(tl.int32)
    a = tl.abs(y)
    ab = a.to(tl.int32, bitcast=True)
    r = ab + 0x7FFFF + ((ab >> 20) & 1)
    normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)
    sub = (a + 16384.0).to(tl.int32, bitcast=True) - 0x46800000
    return tl.where(a < 0.015625, sub, normal) | sign


@triton.jit
def e4m3_value(code):
    """float8_e4m3fn code (int32 0..255) -> fp32 (0x7F / 0xFF -> NaN)."""
    ex = (code >> 3) & 0xF
    mt = code & 7
    normal = ((ex + 120) << 23) | (mt << 20)
    sub = (mt.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)
    bits = tl.where(ex == 0, sub, normal) | ((code & 0x80) << 24)  # sign by bit: -x would turn -0 into +0
    return tl.where((code & 0x7F) == 0x7F, float("nan"), bits.to(tl.float32, bitcast=True))


@triton.jit
def e4m3_to_f32(raw, FP8_HW: tl.constexpr):
    """e4m3fn bytes (any int dtype) -> fp32: the hardware convert (FP8_HW, sm89+) or `e4m3_value` (any target)."""
    if FP8_HW:
        v = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        v = e4m3_value(raw.to(tl.int32) & 0xFF)
    return v


@triton.jit
def e8m0_value(byte):
    """E8M0 bytes (any integer dtype holding 0..255) -> 2^(byte - 127) as fp32; 255 -> NaN, 0 -> 2^-127."""
    byte = byte.to(tl.int32) & 0xFF
    v = tl.where(byte == 0, 0x00400000, byte << 23).to(tl.float32, bitcast=True)  # 2^-127 is subnormal
    return tl.where(byte == 255, float("nan"), v)


@triton.jit
def e2m1_code(y):
    """fp32 y -> e2m1 code (int32 0..15) exactly as `quant.e2m1_codes`: |y| clamped to 6, nearest,
    ties to even, sign in bit 3, no negative zero."""
    a = tl.minimum(tl.abs(y), 6.0)
    m = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
         + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
    return tl.where(m == 0, 0, m | ((y < 0).to(tl.int32) << 3))


@triton.jit
def e2m1_value(code):
    """e2m1 code (int32 0..15) -> fp32: 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives (code 8 -> -0.0)."""
    mag = code & 7
    big = ((mag + 252) << 22).to(tl.float32, bitcast=True)  # mag >= 2: 2^((mag >> 1) - 1) * (1 + (mag & 1) / 2)
    v = tl.where(mag < 2, mag.to(tl.float32) * 0.5, big)
    return (v.to(tl.int32, bitcast=True) | ((code & 8) << 28)).to(tl.float32, bitcast=True)
