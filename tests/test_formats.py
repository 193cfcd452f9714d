"""The on-disk number formats (spec §9.1, §15 items 34-35), checked against arithmetic done by hand.

Every expected value here is computed from the bit fields of the format (sign / exponent / mantissa,
subnormals, E8M0 = 2^(byte - 127)) or from plain float64 math, never with `v4_plugin.checkpoint.quant` or
torch's float8 casts, so the tests pin the formats rather than restate the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from v4_plugin.checkpoint.quant import (
    dequantize_weight_fp4,
    dequantize_weight_fp8,
    e2m1_codes,
    e2m1_decode,
    e8m0_to_float,
    float_to_e8m0,
    pack_fp4,
    quantize_weight_fp4,
    quantize_weight_fp8,
    unpack_fp4,
)


# ---- hand decoders ------------------------------------------------------------------------------
def e4m3_value(byte: int) -> float:
    """float8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 = NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:  # subnormal: 0.m x 2^(1 - 7)
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def e8m0_value(byte: int) -> float:
    """E8M0: an exponent byte only, 2^(byte - 127); 255 is NaN."""
    return math.nan if byte == 255 else 2.0 ** (byte - 127)


def e2m1_value(code: int) -> float:
    """e2m1: 1 sign (bit 3), 2 exponent (bias 1), 1 mantissa bit; exponent 0 is subnormal (0.m x 2^0)."""
    sign = -1.0 if code & 0x8 else 1.0
    exponent, mantissa = (code >> 1) & 0x3, code & 0x1
    if exponent == 0:
        return sign * mantissa * 0.5
    return sign * (1 + mantissa / 2) * 2.0 ** (exponent - 1)


E4M3_TABLE = torch.tensor([e4m3_value(b) for b in range(256)], dtype=torch.float64)
FINITE_E4M3 = [b for b in range(256) if not math.isnan(e4m3_value(b))]


def nearest_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest finite e4m3 value, ties to the even byte (even mantissa), by brute force."""
    grid = E4M3_TABLE[FINITE_E4M3]
    dist = (x.double().reshape(-1, 1) - grid).abs()
    best = dist.min(dim=1, keepdim=True).values
    tied = dist == best
    even = torch.tensor([b % 2 == 0 for b in FINITE_E4M3])
    pick = torch.where(tied.sum(1) > 1, (tied & even).float().argmax(1), tied.float().argmax(1))
    return grid[pick].reshape(x.shape)


def fp8_blocks_expected(q_bytes: torch.Tensor, s_bytes: torch.Tensor) -> torch.Tensor:
    """W[i, j] = e4m3(q[i, j]) * 2^(s[i // 128, j // 128] - 127), element by element in float64."""
    out = torch.empty(q_bytes.shape, dtype=torch.float64)
    for i in range(q_bytes.shape[0]):
        for j in range(q_bytes.shape[1]):
            out[i, j] = e4m3_value(int(q_bytes[i, j])) * e8m0_value(int(s_bytes[i // 128, j // 128]))
    return out


def _bytes(values: list[int] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.uint8).view(dtype)


# ---- E8M0 and e4m3 decoding ---------------------------------------------------------------------
def test_e8m0_decodes_every_byte():
    got = e8m0_to_float(_bytes(list(range(256)), torch.float8_e8m0fnu)).double()
    want = torch.tensor([e8m0_value(b) for b in range(256)], dtype=torch.float64)
    assert torch.equal(got[:255], want[:255])
    assert got[0] == 2.0**-127 and got[127] == 1.0 and got[254] == 2.0**127
    assert math.isnan(got[255])


def test_e8m0_encoding_round_trips_every_power_of_two():
    scales = torch.tensor([2.0**e for e in range(-127, 128)], dtype=torch.float32)
    assert float_to_e8m0(scales).view(torch.uint8).tolist() == list(range(255))


def test_fp8_dequantizes_every_e4m3_byte():
    """All 256 byte patterns under unit scale: normals, subnormals (down to 2^-9), +-0 and NaN."""
    q = _bytes(torch.arange(256).reshape(2, 128), torch.float8_e4m3fn)
    got = dequantize_weight_fp8(q, _bytes([[127]], torch.float8_e8m0fnu)).double().flatten()
    nan = torch.isnan(E4M3_TABLE)
    assert nan.tolist() == [b in (0x7F, 0xFF) for b in range(256)]
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan], E4M3_TABLE[~nan])
    assert E4M3_TABLE[0x01] == 2.0**-9 and E4M3_TABLE[0x08] == 2.0**-6 and E4M3_TABLE[0x7E] == 448.0


def test_fp8_dequantize_partial_edge_blocks():
    """[200, 96] has 2 x 1 blocks: rows 128..199 and columns 0..95 are partial."""
    g = torch.Generator().manual_seed(0)
    q_bytes = torch.tensor(FINITE_E4M3)[torch.randint(0, len(FINITE_E4M3), (200, 96), generator=g)]
    s_bytes = torch.tensor([[120], [131]])
    got = dequantize_weight_fp8(_bytes(q_bytes, torch.float8_e4m3fn), _bytes(s_bytes, torch.float8_e8m0fnu))
    assert got.shape == (200, 96) and got.dtype == torch.float32
    assert torch.equal(got.double(), fp8_blocks_expected(q_bytes, s_bytes))


def test_fp8_dequantize_nan_scale():
    q = _bytes(torch.full((4, 130), 0x38), torch.float8_e4m3fn)  # 1.0
    got = dequantize_weight_fp8(q, _bytes([[127, 255]], torch.float8_e8m0fnu))
    assert torch.equal(got[:, :128], torch.ones(4, 128)) and torch.isnan(got[:, 128:]).all()


# ---- FP8 quantization ---------------------------------------------------------------------------
def _block_weight(shape: tuple[int, int], magnitudes: list[list[float]], seed: int) -> torch.Tensor:
    """Random weight whose 128 x 128 block (bi, bj) has values up to about magnitudes[bi][bj]."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for bi, row in enumerate(magnitudes):
        for bj, m in enumerate(row):
            w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128] *= m
    return w


def test_fp8_scale_is_pow2_ceil_of_amax_over_448():
    w = _block_weight((200, 300), [[1e-3, 3.0, 700.0], [0.02, 1e-9, 1.0]], seed=1)
    w[0:128, 256:300] = 0.0
    w[0, 0] = 448 * 2.0**-7  # an exact power-of-two ratio: scale 2^-7, not 2^-6
    w[0, 128] = 448 * 4.0
    _, scale = quantize_weight_fp8(w)
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (2, 3)
    for bi in range(2):
        for bj in range(3):
            amax = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128].abs().max().item()
            want = 127 + math.ceil(math.log2(max(amax, 1e-4) / 448))
            assert scale.view(torch.uint8)[bi, bj].item() == want, (bi, bj, amax)
    assert scale.view(torch.uint8)[0, 0].item() == 127 - 7 and scale.view(torch.uint8)[0, 1].item() == 129
    assert scale.view(torch.uint8)[1, 1].item() == 127 + math.ceil(math.log2(1e-4 / 448))  # amax floor


def test_fp8_quantize_rounds_to_nearest_even():
    w = _block_weight((200, 96), [[0.3], [50.0]], seed=2)
    q, scale = quantize_weight_fp8(w)
    s = torch.tensor([[e8m0_value(int(b))] for b in scale.view(torch.uint8).flatten()], dtype=torch.float64)
    s_full = s.repeat_interleave(128, 0)[:200]
    want = nearest_e4m3(w.double() / s_full)  # the ratio is exact: dividing by a power of two
    assert torch.equal(E4M3_TABLE[q.view(torch.uint8).long()], want)


def test_fp8_grid_values_survive_exactly():
    """A weight on the FP8 grid (block amax = 448 * 2^k) dequantizes back to itself, edge blocks included."""
    g = torch.Generator().manual_seed(3)
    q_bytes = torch.tensor(FINITE_E4M3)[torch.randint(0, len(FINITE_E4M3), (200, 96), generator=g)]
    q_bytes[0, 0], q_bytes[150, 95] = 0x7E, 0xFE  # +448 and -448: the blocks' scales are exactly 2^(s - 127)
    s_bytes = torch.tensor([[115], [140]])  # block amax 448 * 2^-12 stays above the 1e-4 floor
    w = fp8_blocks_expected(q_bytes, s_bytes).float()
    q, scale = quantize_weight_fp8(w)
    assert torch.equal(scale.view(torch.uint8).long(), s_bytes)
    assert torch.equal(E4M3_TABLE[q.view(torch.uint8).long()], E4M3_TABLE[q_bytes])
    assert torch.equal(dequantize_weight_fp8(q, scale), w)


# ---- FP4 ----------------------------------------------------------------------------------------
def test_e2m1_code_table():
    table = [e2m1_value(c) for c in range(16)]
    assert table[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert table[8:] == [-v for v in table[:8]]
    assert e2m1_decode(torch.arange(16)).tolist() == table


def test_fp4_unpack_hand_written_bytes():
    """Low nibble = even k, high nibble = odd k: 0x2F -> codes [15, 2] -> [-6.0, 1.0]."""
    packed = _bytes([[0x2F, 0x70, 0x9A]], torch.int8)
    assert unpack_fp4(packed).tolist() == [[15, 2, 0, 7, 10, 9]]
    assert pack_fp4(torch.tensor([[15, 2, 0, 7, 10, 9]])).view(torch.uint8).tolist() == [[0x2F, 0x70, 0x9A]]
    row = _bytes([[0x2F] * 16], torch.int8)  # 32 values, one scale
    got = dequantize_weight_fp4(row, _bytes([[127]], torch.float8_e8m0fnu))
    assert got.tolist() == [[-6.0, 1.0] * 16]
    got = dequantize_weight_fp4(row, _bytes([[125]], torch.float8_e8m0fnu))  # scale 2^-2
    assert got.tolist() == [[-1.5, 0.25] * 16]


def test_fp4_dequantize_matches_hand_decoding():
    g = torch.Generator().manual_seed(4)
    packed_bytes = torch.randint(0, 256, (3, 48), generator=g)  # [3, 96]: 3 scales per row
    s_bytes = torch.randint(100, 150, (3, 3), generator=g)
    got = dequantize_weight_fp4(_bytes(packed_bytes, torch.int8), _bytes(s_bytes, torch.float8_e8m0fnu))
    for i in range(3):
        for k in range(96):
            byte = int(packed_bytes[i, k // 2])
            code = byte & 0xF if k % 2 == 0 else byte >> 4
            assert got[i, k].item() == e2m1_value(code) * e8m0_value(int(s_bytes[i, k // 32]))


def test_e2m1_rounds_midpoints_to_even():
    """Every midpoint goes to the neighbour with mantissa bit 0; just off the midpoint goes to the nearest."""
    grid = [e2m1_value(c) for c in range(8)]
    for lo in range(7):
        mid = (grid[lo] + grid[lo + 1]) / 2
        even = lo if lo % 2 == 0 else lo + 1
        for sign, bit in ((1.0, 0), (-1.0, 8)):
            m = torch.tensor(mid)  # fp32 neighbours of the midpoint, one on each side
            below, above = torch.nextafter(m, torch.tensor(0.0)), torch.nextafter(m, torch.tensor(7.0))
            probes = torch.stack([m, below, above]) * sign
            want = [even | bit, lo | bit, (lo + 1) | bit]
            want = [0 if c == 8 else c for c in want]  # no negative zero
            assert e2m1_codes(probes).tolist() == want, (mid, sign)


def test_fp4_scale_is_pow2_ceil_of_amax_over_6_per_32():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 96, generator=g) * torch.tensor([1e-3, 1.0, 60.0]).repeat_interleave(32)
    w[1, 32:64] = 0.0
    w[2, 0:32] = 0.0
    w[2, 5] = 6 * 2.0**-3  # exact power-of-two ratio
    _, scale = quantize_weight_fp4(w)
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (4, 3)
    for i in range(4):
        for b in range(3):
            amax = w[i, b * 32:(b + 1) * 32].abs().max().item()
            want = 127 + math.ceil(math.log2(max(amax, 6 * 2.0**-126) / 6))
            assert scale.view(torch.uint8)[i, b].item() == want
    assert scale.view(torch.uint8)[2, 0].item() == 124 and scale.view(torch.uint8)[1, 1].item() == 1


def test_fp4_grid_values_survive_and_midpoints_tie_to_even():
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 16, (5, 64), generator=g)
    codes[:, 0], codes[:, 32] = 7, 15  # |6| in every block: the scale is exactly the block's power of two
    s_bytes = torch.randint(110, 140, (5, 2), generator=g)
    w = torch.tensor([[e2m1_value(int(codes[i, k])) * e8m0_value(int(s_bytes[i, k // 32])) for k in range(64)]
                      for i in range(5)])
    packed, scale = quantize_weight_fp4(w)
    assert torch.equal(scale.view(torch.uint8).long(), s_bytes)
    assert torch.equal(dequantize_weight_fp4(packed, scale), w)
    # midpoints under scale 1 (block amax 6): 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    mids = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4])
    back = dequantize_weight_fp4(*quantize_weight_fp4(mids))
    assert back[0, :8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize("k", [64, 96])
def test_fp4_pack_unpack_round_trip(k):
    codes = torch.randint(0, 16, (7, k), generator=torch.Generator().manual_seed(k)).to(torch.uint8)
    packed = pack_fp4(codes)
    assert packed.dtype == torch.int8 and packed.shape == (7, k // 2)
    assert torch.equal(unpack_fp4(packed), codes)
