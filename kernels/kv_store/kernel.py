"""Quantized KV-cache records: store (quantize + scatter) and load (gather + dequantize), spec §5.

References (core functions these kernels replace; same byte format, bit for bit):

* `store_main(kv, cache, slots)`     <- `cache[slots] = v4_plugin.cache.records.pack_main(kv, cfg)`
* `store_indexer(keys, cache, slots, fmt)` <- `cache[slots] = v4_plugin.cache.records.pack_indexer(keys, cfg, fmt)`
* `load_main(cache, slots)`          <- `v4_plugin.cache.records.unpack_main(cache[slots], cfg)` (fp32)
* `load_indexer(cache, slots, fmt)`  <- `v4_plugin.cache.records.unpack_indexer(cache[slots], cfg, fmt)` (fp32)

Negative slots are skipped by the stores and give zero rows from the loads.

Record formats (see `v4_plugin/cache/records.py`):

* main, 584 B for V4: e4m3 of dims [0, nope) | bf16 rope dims (little endian) | one E8M0 byte per
  64 FP8 values | zero pad to a multiple of 8;
* indexer FP8, 132 B: e4m3 of all dims | fp32 power-of-two scale;
* indexer FP4, 68 B: packed e2m1 (low nibble = even dim) | one E8M0 byte per 32 dims.

Exactness. Every rounding is done in integer arithmetic on the fp32 bit pattern, never with a
float cast: e4m3 round-to-nearest-even (with the e4m3fn subnormals), e2m1 exactly as
`quant.e2m1_codes` (the same midpoint comparisons), bf16 round-to-nearest-even, and power-of-two
scales 2^ceil(log2(amax / max)) found from the exponent bits and then corrected with exact
comparisons (so an approximate fp32 division on the GPU cannot move a scale). The records are
therefore byte-identical to the torch reference on any finite input, in the Triton interpreter (whose
fp32->fp8/bf16 casts round toward zero) and on the GPU alike. (One theoretical exception on a GPU
that flushes fp32 subnormals: an FP4 block made only of subnormal values.)

Layout in registers. Entries are handled as (even dim, odd dim) pairs: `ev[.., p]` = dim 2p and
`od[.., p]` = dim 2p+1. A pair is what RoPE rotates, what one FP4 byte packs, and two e4m3 codes
make one 16-bit store; the quantization blocks (64 dims = 32 pairs, 32 dims = 16 pairs) are a
reshape of the pair axis. The `@triton.jit` helpers `write_main_record`, `write_indexer_record`,
`load_main_tile` and `load_indexer_tile` are the building blocks that other kernels (the fused
compressor, attention, indexer) call on register tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4_plugin.checkpoint import quant
from v4_plugin.checkpoint.config import FP4_BLOCK, FP8_KV_BLOCK
from v4_plugin.cache.layout import BF16_BYTES, FP32_BYTES, SCALE_SECTION_ALIGN, IndexerCache

from ..formats import bf16_bits, e2m1_code, e2m1_value, e4m3_code, e4m3_value, e8m0_value, exp2i, pow2_ceil_exp

__all__ = [
    "store_main", "store_indexer", "load_main", "load_indexer", "tile_config", "next_pow2", "main_record_bytes",
    "indexer_record_bytes", "records_view", "write_main_record", "write_indexer_record", "load_main_tile",
    "load_indexer_tile",
]

# The quantizer constants of `v4_plugin.checkpoint.quant`, as constexprs the kernels can read.
FP8_MAX = tl.constexpr(quant.FP8_MAX)
FP4_MAX = tl.constexpr(quant.FP4_MAX)
FP8_AMAX_FLOOR = tl.constexpr(quant.FP8_AMAX_FLOOR)
FP4_AMAX_FLOOR = tl.constexpr(quant.FP4_AMAX_FLOOR)


# ---- sizes ---------------------------------------------------------------------------------------
def main_record_bytes(head_dim: int, rope_dim: int) -> int:
    """Bytes of a main record (584 for head_dim 512, rope 64); same rule as `layout.main_entry_bytes`."""
    nope = head_dim - rope_dim
    scales = -(-(nope // FP8_KV_BLOCK) // SCALE_SECTION_ALIGN) * SCALE_SECTION_ALIGN
    return nope + BF16_BYTES * rope_dim + scales


def indexer_record_bytes(index_head_dim: int, fmt: IndexerCache) -> int:
    """Bytes of an indexer record (132 FP8 / 68 FP4 for dim 128); same rule as `layout.indexer_entry_bytes`."""
    if fmt is IndexerCache.FP8:
        return index_head_dim + FP32_BYTES
    return index_head_dim // 2 + index_head_dim // FP4_BLOCK


def _main_dims(record_bytes: int, rope_dim: int) -> tuple[int, int]:
    """(head_dim, nope) of a main record of `record_bytes` bytes."""
    for nope in range(FP8_KV_BLOCK, record_bytes + 1, FP8_KV_BLOCK):
        if main_record_bytes(nope + rope_dim, rope_dim) == record_bytes:
            return nope + rope_dim, nope
    raise ValueError(f"no main record layout with rope_dim {rope_dim} has {record_bytes} bytes")


def _indexer_dim(record_bytes: int, fmt: IndexerCache) -> int:
    d = record_bytes - FP32_BYTES if fmt is IndexerCache.FP8 else record_bytes * FP4_BLOCK // (FP4_BLOCK // 2 + 1)
    if d <= 0 or indexer_record_bytes(d, fmt) != record_bytes:
        raise ValueError(f"no {fmt.value} indexer record has {record_bytes} bytes")
    return d


def _check_head_dim(head_dim: int, rope_dim: int) -> None:
    if head_dim & (head_dim - 1) or head_dim < FP8_KV_BLOCK:
        raise ValueError(f"head_dim must be a power of two >= {FP8_KV_BLOCK} (register tiles), got {head_dim}")
    if (head_dim - rope_dim) % FP8_KV_BLOCK or rope_dim % 2 or rope_dim <= 0:
        raise ValueError(f"head_dim - rope_dim must be a multiple of {FP8_KV_BLOCK}, got {head_dim} - {rope_dim}")


def _check_index_dim(d: int) -> None:
    if d & (d - 1) or d < FP4_BLOCK:
        raise ValueError(f"index_head_dim must be a power of two >= {FP4_BLOCK}, got {d}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ---- tile sizes: the one place that picks them ---------------------------------------------------
def tile_config(op: str, n: int, head_dim: int, device: torch.device) -> dict:
    """BLOCK_N (entries per program) and num_warps for `op` in {"store_main", "store_indexer",
    "load_main", "load_indexer"} on `n` entries.

    Interpreter (CPU): as many entries per program as reasonable (each interpreted op costs about
    0.1-1 ms whatever its size). GPU: a few entries per program so that a decode batch still
    spreads over many SMs; `bench/bench_kv_store.py` sweeps these values (untuned defaults until
    it has been run on the target GPU).
    """
    if device.type != "cuda":
        return {"BLOCK_N": min(next_pow2(max(n, 1)), 128), "num_warps": 1}
    if op.startswith("store"):
        block_n = 1 if n <= 256 else 4
    else:
        block_n = 4 if n <= 256 else 8
    return {"BLOCK_N": block_n if head_dim >= 256 else block_n * 4, "num_warps": 4}


# ---- block quantization of pair tiles ------------------------------------------------------------
@triton.jit
def _pair_block_scale(ev, od, AMAX_FLOOR: tl.constexpr, MAXV: tl.constexpr):
    """Power-of-two scale of each block of pair tiles [BN, NB, G] (2G values per [b, k]): (int32 exponents
    e [BN, NB] of 2^ceil(log2(max(amax, AMAX_FLOOR) / MAXV)), 2^-e broadcastable to the tiles)."""
    amax = tl.maximum(tl.max(tl.maximum(tl.abs(ev), tl.abs(od)), axis=2), AMAX_FLOOR)
    e = pow2_ceil_exp(amax, MAXV)
    return e, exp2i(-e)[:, :, None]


@triton.jit
def _e4m3_scaled(v, inv):
    """e4m3 codes of v * inv saturated to +-448 (inv: the inverse power-of-two scale)."""
    return e4m3_code(tl.minimum(tl.maximum(v * inv, -FP8_MAX), FP8_MAX))


@triton.jit
def fp8_quant_pairs(ev, od):
    """ev, od [BN, NB, G] fp32 (one FP8 block of 2G values per [b, k]) ->
    (e4m3 codes of ev, of od, int32 scale exponents [BN, NB]); as `quant.quantize_fp8`."""
    e, inv = _pair_block_scale(ev, od, FP8_AMAX_FLOOR, FP8_MAX)
    return _e4m3_scaled(ev, inv), _e4m3_scaled(od, inv), e


@triton.jit
def fp8_fake_pairs(ev, od):
    """`quant.fake_quant_fp8` on pair tiles [BN, NB, G] (blocks of 2G values): values on the FP8 grid."""
    cev, cod, e = fp8_quant_pairs(ev, od)
    s = exp2i(e)[:, :, None]
    return e4m3_value(cev) * s, e4m3_value(cod) * s


@triton.jit
def fp4_quant_pairs(ev, od):
    """ev, od [BN, NB, G] fp32 (one FP4 block of 2G values per [b, k]) ->
    (e2m1 codes of ev, of od, int32 scale exponents [BN, NB]); as `quant.quantize_fp4`."""
    e, inv = _pair_block_scale(ev, od, FP4_AMAX_FLOOR, FP4_MAX)
    return e2m1_code(ev * inv), e2m1_code(od * inv), e


@triton.jit
def fp4_fake_pairs(ev, od):
    """`quant.fake_quant_fp4` on pair tiles [BN, NB, G] (blocks of 2G values)."""
    cev, cod, e = fp4_quant_pairs(ev, od)
    s = exp2i(e)[:, :, None]
    return e2m1_value(cev) * s, e2m1_value(cod) * s


# ---- record writers / readers on register tiles --------------------------------------------------
@triton.jit
def write_main_record(rec, ok, ev, od, NOPE: tl.constexpr, ROPE: tl.constexpr, SCALE_BYTES: tl.constexpr,
                      SCALE_P2: tl.constexpr):
    """Write main records: `rec` [BN] uint8 pointers (record starts, 4-byte aligned), `ok` [BN] mask,
    ev / od fp32 [BN, NB, 32]: dims 2p / 2p+1 of pair p = k*32 + g, head_dim = 64 * NB.

    Blocks holding rope pairs are quantized too and their codes dropped (cheaper than masking).
    """
    NB: tl.constexpr = ev.shape[1]
    G: tl.constexpr = ev.shape[2]
    pair = tl.arange(0, NB)[None, :, None] * G + tl.arange(0, G)[None, None, :]
    okk = ok[:, None, None]
    cev, cod, e = fp8_quant_pairs(ev, od)
    words16 = (cev | (cod << 8)).to(tl.uint16)
    p16 = rec.to(tl.pointer_type(tl.uint16))[:, None, None]
    tl.store(p16 + pair, words16, mask=okk & (pair < NOPE // 2))
    words32 = (bf16_bits(ev) | (bf16_bits(od) << 16)).to(tl.uint32)
    p32 = rec.to(tl.pointer_type(tl.uint32))[:, None, None]
    tl.store(p32 + (NOPE // 4 - NOPE // 2) + pair, words32, mask=okk & (pair >= NOPE // 2))
    # scale section: E8M0 of each FP8 block, then zero pad
    k = tl.arange(0, SCALE_P2)
    blk = tl.arange(0, NB)
    sel = tl.sum(tl.where(k[None, :, None] == blk[None, None, :], e[:, None, :], 0), axis=2)
    byte = tl.where(k[None, :] < NOPE // (2 * G), sel + 127, 0).to(tl.uint8)
    tl.store(rec[:, None] + (NOPE + 2 * ROPE) + k[None, :], byte, mask=ok[:, None] & (k[None, :] < SCALE_BYTES))


@triton.jit
def write_indexer_record(rec, ok, ev, od, FP8: tl.constexpr):
    """Write indexer records: `rec` [BN] uint8 pointers (4-byte aligned for FP8), `ok` [BN] mask,
    ev / od fp32 [BN, NB, 16] (dims 2p / 2p+1, pair p = k*16 + g; index_head_dim = 32 * NB)."""
    NB: tl.constexpr = ev.shape[1]
    G: tl.constexpr = ev.shape[2]
    D: tl.constexpr = 2 * NB * G
    pair = tl.arange(0, NB)[None, :, None] * G + tl.arange(0, G)[None, None, :]
    okk = ok[:, None, None]
    if FP8:  # one scale for the whole key
        amax = tl.maximum(tl.max(tl.max(tl.maximum(tl.abs(ev), tl.abs(od)), axis=2), axis=1), FP8_AMAX_FLOOR)
        e = pow2_ceil_exp(amax, FP8_MAX)
        inv = exp2i(-e)[:, None, None]
        cev, cod = _e4m3_scaled(ev, inv), _e4m3_scaled(od, inv)
        p16 = rec.to(tl.pointer_type(tl.uint16))[:, None, None]
        tl.store(p16 + pair, (cev | (cod << 8)).to(tl.uint16), mask=okk)
        p32 = rec.to(tl.pointer_type(tl.uint32))
        tl.store(p32 + D // 4, ((e + 127) << 23).to(tl.uint32), mask=ok)
    else:
        cev, cod, e = fp4_quant_pairs(ev, od)
        tl.store(rec[:, None, None] + pair, (cev | (cod << 4)).to(tl.uint8), mask=okk)
        blk = tl.arange(0, NB)
        tl.store(rec[:, None] + D // 2 + blk[None, :], (e + 127).to(tl.uint8), mask=ok[:, None])


@triton.jit
def load_main_tile(rec, ok, HEAD_DIM: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr):
    """Gather + dequantize main records: `rec` [BN] uint8 pointers, `ok` [BN] -> fp32 [BN, HEAD_DIM]
    (zeros where not ok). As `kvcache.unpack_main`."""
    d = tl.arange(0, HEAD_DIM)[None, :]
    r = rec[:, None]
    okd = ok[:, None]
    nope = d < NOPE
    code = tl.load(r + d, mask=okd & nope, other=0).to(tl.int32)
    sbyte = tl.load(r + (NOPE + 2 * ROPE) + d // 64, mask=okd & nope, other=127).to(tl.int32)
    word = tl.load(rec.to(tl.pointer_type(tl.uint16))[:, None] + (d - NOPE // 2), mask=okd & (d >= NOPE),
                   other=0).to(tl.int32)
    rope = (word << 16).to(tl.float32, bitcast=True)
    return tl.where(okd, tl.where(nope, e4m3_value(code) * e8m0_value(sbyte), rope), 0.0)


@triton.jit
def load_indexer_tile(rec, ok, D: tl.constexpr, FP8: tl.constexpr):
    """Gather + dequantize indexer records -> fp32 [BN, D] (zeros where not ok). As `kvcache.unpack_indexer`."""
    d = tl.arange(0, D)[None, :]
    r = rec[:, None]
    okd = ok[:, None]
    if FP8:
        code = tl.load(r + d, mask=okd, other=0).to(tl.int32)
        scale = tl.load(rec.to(tl.pointer_type(tl.float32)) + D // 4, mask=ok, other=1.0)
        val = e4m3_value(code) * scale[:, None]
    else:
        byte = tl.load(r + d // 2, mask=okd, other=0).to(tl.int32)
        code = (byte >> ((d % 2) * 4)) & 0xF
        sbyte = tl.load(r + D // 2 + d // 32, mask=okd, other=127).to(tl.int32)
        val = e2m1_value(code) * e8m0_value(sbyte)
    return tl.where(okd, val, 0.0)


# ---- kernels -------------------------------------------------------------------------------------
@triton.jit
def _rows(slots_ptr, n, cache_ptr, cache_stride, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < n
    slot = tl.load(slots_ptr + rows, mask=in_range, other=-1).to(tl.int64)
    ok = in_range & (slot >= 0)
    rec = cache_ptr + tl.where(ok, slot, 0) * cache_stride
    return rows.to(tl.int64), ok, rec


@triton.jit
def _load_pairs(x_ptr, x_stride, rows, ok, NB: tl.constexpr, G: tl.constexpr):
    """Rows of x (2 * NB * G values each) as fp32 pair tiles ev, od [BN, NB, G] (zeros where not ok)."""
    pair = tl.arange(0, NB)[None, :, None] * G + tl.arange(0, G)[None, None, :]
    src = x_ptr + rows[:, None, None] * x_stride + 2 * pair
    okk = ok[:, None, None]
    return tl.load(src, mask=okk, other=0.0).to(tl.float32), tl.load(src + 1, mask=okk, other=0.0).to(tl.float32)


@triton.jit
def _write_rows(out_ptr, rows, n, val, WIDTH: tl.constexpr):
    """out[rows] = val [BN, WIDTH] for the rows < n."""
    tl.store(out_ptr + rows[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :], val, mask=(rows < n)[:, None])


@triton.jit
def _store_main_kernel(x_ptr, x_stride, cache_ptr, cache_stride, slots_ptr, n,
                       HEAD_DIM: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr,
                       SCALE_BYTES: tl.constexpr, SCALE_P2: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, ok, rec = _rows(slots_ptr, n, cache_ptr, cache_stride, BLOCK_N)
    ev, od = _load_pairs(x_ptr, x_stride, rows, ok, HEAD_DIM // 64, 32)
    write_main_record(rec, ok, ev, od, NOPE, ROPE, SCALE_BYTES, SCALE_P2)


@triton.jit
def _store_indexer_kernel(x_ptr, x_stride, cache_ptr, cache_stride, slots_ptr, n,
                          D: tl.constexpr, FP8: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, ok, rec = _rows(slots_ptr, n, cache_ptr, cache_stride, BLOCK_N)
    ev, od = _load_pairs(x_ptr, x_stride, rows, ok, D // 32, 16)
    write_indexer_record(rec, ok, ev, od, FP8)


@triton.jit
def _load_main_kernel(out_ptr, cache_ptr, cache_stride, slots_ptr, n,
                      HEAD_DIM: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, ok, rec = _rows(slots_ptr, n, cache_ptr, cache_stride, BLOCK_N)
    _write_rows(out_ptr, rows, n, load_main_tile(rec, ok, HEAD_DIM, NOPE, ROPE), HEAD_DIM)


@triton.jit
def _load_indexer_kernel(out_ptr, cache_ptr, cache_stride, slots_ptr, n,
                         D: tl.constexpr, FP8: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, ok, rec = _rows(slots_ptr, n, cache_ptr, cache_stride, BLOCK_N)
    _write_rows(out_ptr, rows, n, load_indexer_tile(rec, ok, D, FP8), D)


# ---- Python wrappers (signatures mirror the core functions) --------------------------------------
def records_view(cache: torch.Tensor, record_bytes: int | None = None, align: int = 4) -> torch.Tensor:
    """The cache as a 2-D uint8 view [num_slots, record_bytes] sharing its storage.

    Records written with 16/32-bit stores (main, FP8 indexer) must start at 4-byte aligned addresses;
    FP4 indexer records (byte stores only) need `align` = 1.
    """
    if cache.dtype != torch.uint8:
        raise TypeError(f"cache must be uint8, got {cache.dtype}")
    rb = cache.shape[-1] if record_bytes is None else record_bytes
    if cache.shape[-1] != rb:
        raise ValueError(f"cache records are {cache.shape[-1]} B, expected {rb}")
    c = cache.view(-1, rb)
    if c.stride(1) != 1 or c.stride(0) % align or c.data_ptr() % align:
        raise ValueError(f"cache records must be contiguous bytes starting at {align}-byte aligned addresses")
    return c


def _slots(slots: torch.Tensor, n: int) -> torch.Tensor:
    if slots.shape != (n,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be int32/int64 [{n}], got {slots.dtype} {tuple(slots.shape)}")
    return slots.contiguous()


def _rows2d(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"expected [N, {width}], got {tuple(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def store_main(kv: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, *, rope_dim: int = 64) -> torch.Tensor:
    """Quantize KV entries kv [N, head_dim] (fp32/bf16/fp16) into main records written at
    cache[slots[i]] (uint8 [num_slots, record_bytes]); slots < 0 are skipped. Returns `cache`.

    Same bytes as `cache[slots] = kvcache.pack_main(kv, cfg)`.
    """
    head_dim = kv.shape[-1]
    _check_head_dim(head_dim, rope_dim)
    nope = head_dim - rope_dim
    rb = main_record_bytes(head_dim, rope_dim)
    recs = records_view(cache, rb)
    x = _rows2d(kv, head_dim)
    n = x.shape[0]
    s = _slots(slots, n)
    if n == 0:
        return cache
    cfg = tile_config("store_main", n, head_dim, x.device)
    scale_bytes = rb - nope - 2 * rope_dim
    _store_main_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x, x.stride(0), recs, recs.stride(0), s, n, HEAD_DIM=head_dim, NOPE=nope, ROPE=rope_dim,
        SCALE_BYTES=scale_bytes, SCALE_P2=next_pow2(scale_bytes), BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return cache


def store_indexer(keys: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, fmt: IndexerCache) -> torch.Tensor:
    """Quantize indexer keys [N, index_head_dim] into FP8 (d + 4 B) or FP4 (d/2 + d/32 B) records at
    cache[slots[i]]; slots < 0 are skipped. Returns `cache`.

    Same bytes as `cache[slots] = kvcache.pack_indexer(keys, cfg, fmt)`.
    """
    d = keys.shape[-1]
    _check_index_dim(d)
    recs = records_view(cache, indexer_record_bytes(d, fmt), 4 if fmt is IndexerCache.FP8 else 1)
    x = _rows2d(keys, d)
    n = x.shape[0]
    s = _slots(slots, n)
    if n == 0:
        return cache
    cfg = tile_config("store_indexer", n, d, x.device)
    _store_indexer_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x, x.stride(0), recs, recs.stride(0), s, n, D=d, FP8=fmt is IndexerCache.FP8,
        BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return cache


def load_main(cache: torch.Tensor, slots: torch.Tensor, *, rope_dim: int = 64) -> torch.Tensor:
    """Gather and dequantize main records -> fp32 [N, head_dim]; rows of negative slots are 0.

    Same values as `kvcache.unpack_main(cache[slots], cfg)` (exact: e4m3 x power of two, bf16 -> fp32).
    """
    head_dim, nope = _main_dims(cache.shape[-1], rope_dim)
    _check_head_dim(head_dim, rope_dim)
    recs = records_view(cache)
    n = slots.shape[0]
    s = _slots(slots, n)
    out = torch.empty(n, head_dim, dtype=torch.float32, device=cache.device)
    if n == 0:
        return out
    cfg = tile_config("load_main", n, head_dim, cache.device)
    _load_main_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        out, recs, recs.stride(0), s, n, HEAD_DIM=head_dim, NOPE=nope, ROPE=rope_dim,
        BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return out


def load_indexer(cache: torch.Tensor, slots: torch.Tensor, fmt: IndexerCache) -> torch.Tensor:
    """Gather and dequantize indexer records -> fp32 [N, index_head_dim]; rows of negative slots are 0.

    Same values as `kvcache.unpack_indexer(cache[slots], cfg, fmt)`.
    """
    d = _indexer_dim(cache.shape[-1], fmt)
    _check_index_dim(d)
    recs = records_view(cache, align=4 if fmt is IndexerCache.FP8 else 1)
    n = slots.shape[0]
    s = _slots(slots, n)
    out = torch.empty(n, d, dtype=torch.float32, device=cache.device)
    if n == 0:
        return out
    cfg = tile_config("load_indexer", n, d, cache.device)
    _load_indexer_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        out, recs, recs.stride(0), s, n, D=d, FP8=fmt is IndexerCache.FP8,
        BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return out
