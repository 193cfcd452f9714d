"""Tests of kernels/kv_store against the core byte format (`v4_plugin.cache.records`).

Tolerance: none. The kernels round with integer arithmetic on fp32 bit patterns (not with the
interpreter's round-toward-zero casts), so every record must be byte-identical to
`records.pack_main` / `pack_indexer` on any finite input, and every load bit-identical to
`unpack_main` / `unpack_indexer`. Untouched cache rows must keep their bytes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # read when @triton.jit decorates, so before the kernel import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from v4_kernels.kv_store.kernel import (indexer_record_bytes, load_indexer, load_main, main_record_bytes,  # noqa: E402
                                        store_indexer, store_main)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from v4_kernels.formats import e2m1_value, e4m3_value, e8m0_value  # noqa: E402
from v4_kernels.testing import DEVICES, on_device, run_compile_check, sm90_compile_check  # noqa: E402
from v4_plugin.cache import records  # noqa: E402
from v4_plugin.checkpoint import quant  # noqa: E402
from v4_plugin.checkpoint.config import parse_config, preset_config  # noqa: E402
from v4_plugin.cache.layout import IndexerCache, indexer_entry_bytes, main_entry_bytes  # noqa: E402
from v4_plugin.runtime.ops.compressor import simulate_kv_storage  # noqa: E402
from v4_plugin.checkpoint.quant import fake_quant_fp4, hadamard  # noqa: E402
from v4_plugin.checkpoint.tiny import TINY_PRESETS  # noqa: E402

# CPU-built inputs (caches written in place come back)
store_main, store_indexer, load_main, load_indexer = map(on_device, (store_main, store_indexer, load_main,
                                                                      load_indexer))

CFGS = {"tiny": parse_config(TINY_PRESETS["flash"]), "flash": preset_config("flash")}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _raw(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Arbitrary fp32 rows: wide dynamic range per row and per block, zeros, tiny values, negative zero."""
    x = torch.randn(n, d, generator=g) * torch.exp2(torch.randint(-30, 30, (n, 1), generator=g).float())
    x = x * torch.exp2(torch.randint(-8, 8, (n, d // 32), generator=g).float()).repeat_interleave(32, 1)
    x[:, 1::7] *= 1e-6
    if n > 2:
        x[1] = 0.0
        x[2, : d // 2] = -0.0
        x[2, d // 2 :] = 1e-30
    return x


def _slots(n: int, num_slots: int, g: torch.Generator) -> torch.Tensor:
    """Distinct slots with gaps, in random order, about one in five skipped (-1)."""
    s = torch.randperm(num_slots, generator=g)[:n]
    s[torch.rand(n, generator=g) < 0.2] = -1
    return s


def _check_written(cache: torch.Tensor, before: torch.Tensor, slots: torch.Tensor, ref: torch.Tensor) -> None:
    keep = slots >= 0
    assert torch.equal(cache[slots[keep].long()], ref[keep]), "records differ from the reference bytes"
    untouched = torch.ones(cache.shape[0], dtype=torch.bool)
    untouched[slots[keep].long()] = False
    assert torch.equal(cache[untouched], before[untouched]), "rows outside the slot list changed"


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical fp32 (signed zeros included), any NaN matching any NaN (random bytes decode to NaN)."""
    nan = a.isnan()
    assert torch.equal(nan, b.isnan())
    assert torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


def _cache(num_slots: int, record_bytes: int, g: torch.Generator, device: str) -> torch.Tensor:
    return torch.randint(0, 256, (num_slots, record_bytes), generator=g, dtype=torch.uint8).to(device)


# ---- main records ---------------------------------------------------------------------------------
def test_record_sizes_match_layout():
    for cfg in CFGS.values():
        assert main_record_bytes(cfg.head_dim, cfg.qk_rope_head_dim) == main_entry_bytes(cfg)
        for fmt in IndexerCache:
            assert indexer_record_bytes(cfg.index_head_dim, fmt) == indexer_entry_bytes(cfg, fmt)
    assert main_entry_bytes(CFGS["flash"]) == 584


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg_name,n,kind", [
    ("tiny", 1, "grid"), ("tiny", 3, "raw"), ("tiny", 5, "bf16"), ("tiny", 127, "grid"),
    ("flash", 1, "raw"), ("flash", 3, "grid"), ("flash", 5, "bf16"), ("flash", 127, "raw"),
])
def test_store_main_matches_pack_main(cfg_name, n, kind, device):
    cfg = CFGS[cfg_name]
    g = _gen(n * 7 + len(kind))
    x = _raw(n, cfg.head_dim, g)
    if kind == "grid":  # what the model stores: already on the FP8 / bf16 grid
        x = simulate_kv_storage(torch.randn(n, cfg.head_dim, generator=g) * 3, cfg.qk_rope_head_dim)
    elif kind == "bf16":
        x = x.to(torch.bfloat16)
    slots = _slots(n, 2 * n + 3, g)
    cache = _cache(2 * n + 3, main_entry_bytes(cfg), g, device)
    before = cache.clone()
    out = store_main(x.to(device), cache, slots.to(device), rope_dim=cfg.qk_rope_head_dim)
    assert out is cache
    _check_written(cache.cpu(), before.cpu(), slots, records.pack_main(x, cfg))


def _e4m3_edge_values() -> torch.Tensor:
    """Every positive e4m3 value, every midpoint between neighbours, and the fp32 values just around
    each midpoint (ties to even, the subnormal range, the largest value 448)."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 ... 448
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = torch.nextafter(mids, torch.tensor(1e9)), torch.nextafter(mids, torch.tensor(0.0))
    vals = torch.cat((grid, mids, up, down))
    return torch.cat((vals, -vals))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 448 * 2^e probes may overflow to inf
def test_store_main_rounding_edges():
    """Crafted blocks whose max is 448 x 2^k (scale exactly 2^k): every e4m3 tie, subnormal and
    midpoint neighbour, plus block maxima just above 448 x 2^k (scale 2^(k+1)) and all-zero blocks."""
    cfg = CFGS["flash"]
    nope = cfg.nope_head_dim
    vals = _e4m3_edge_values()
    per_block = 63
    blocks = -(-vals.numel() // per_block)
    vals = torch.cat((vals, torch.zeros(blocks * per_block - vals.numel())))
    body = vals.view(blocks, per_block)
    g = _gen(1)
    k = torch.randint(-20, 20, (blocks, 1), generator=g).float()
    top = torch.full((blocks, 1), 448.0)
    top[1::3] = torch.nextafter(torch.tensor(448.0), torch.tensor(1e9))  # amax just above 448 * 2^k
    flat = (torch.cat((top, body), 1) * torch.exp2(k)).flatten()
    per_row = nope
    rows = -(-flat.numel() // per_row)
    nope_part = torch.cat((flat, torch.zeros(rows * per_row - flat.numel()))).view(rows, nope)
    rope_part = torch.randn(rows, cfg.qk_rope_head_dim, generator=g)
    rope_part[0, :8] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-140, -0.0, 0.0, 1e38, 3e38])
    x = torch.cat((nope_part, rope_part), 1)
    cache = torch.zeros(rows, main_entry_bytes(cfg), dtype=torch.uint8)
    slots = torch.arange(rows)
    store_main(x, cache, slots)
    assert torch.equal(cache, records.pack_main(x, cfg))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg_name", ["tiny", "flash"])
def test_load_main_round_trip(cfg_name, device):
    cfg = CFGS[cfg_name]
    g = _gen(3)
    n = 127
    x = simulate_kv_storage(torch.randn(n, cfg.head_dim, generator=g), cfg.qk_rope_head_dim)
    cache = _cache(n + 9, main_entry_bytes(cfg), g, device)
    slots = _slots(n, n + 9, g)
    store_main(x.to(device), cache, slots.to(device), rope_dim=cfg.qk_rope_head_dim)
    # a gather with repeats, gaps and -1, reading also rows holding random bytes
    gather = torch.cat((slots, torch.tensor([-1, 0, 0, n + 8]), torch.randperm(n + 9, generator=g)[:5]))
    got = load_main(cache, gather.to(device), rope_dim=cfg.qk_rope_head_dim).cpu()
    keep = gather >= 0
    ref = records.unpack_main(cache.cpu()[gather[keep].long()], cfg)
    _assert_same_bits(got[keep], ref)
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))
    stored = slots >= 0
    assert torch.equal(got[: n][stored], x[stored])  # lossless: the record holds the simulated values


# ---- indexer records ------------------------------------------------------------------------------
def _e2m1_edge_values() -> torch.Tensor:
    """e2m1 grid values, all midpoints and their fp32 neighbours, with 6 as block max (scale 1)."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = torch.nextafter(mids, torch.tensor(1e9)), torch.nextafter(mids, torch.tensor(0.0))
    vals = torch.cat((grid, mids, up, down, torch.tensor([7.0, 100.0])))
    return torch.cat((vals, -vals))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", list(IndexerCache))
@pytest.mark.parametrize("cfg_name,n,kind", [
    ("tiny", 1, "grid"), ("tiny", 5, "raw"), ("flash", 3, "raw"), ("flash", 127, "grid"), ("flash", 4, "edges"),
])
def test_store_indexer_matches_pack_indexer(cfg_name, n, kind, fmt, device):
    cfg = CFGS[cfg_name]
    d = cfg.index_head_dim
    g = _gen(n * 11 + len(kind))
    if kind == "grid":  # what the model stores: Hadamard-rotated, FP4-simulated keys
        x = fake_quant_fp4(hadamard(torch.randn(n, d, generator=g)))
    elif kind == "raw":
        x = _raw(n, d, g)
    else:
        e = _e2m1_edge_values()
        x = torch.zeros(n, d)
        x.view(-1)[: e.numel()] = e
        x[:, ::32] = 6.0  # block max 6: FP4 scale 1
        x[-1] *= 2.0**-126  # scale at the FP4 amax floor; FP8 scale floor (amax 1e-4)
        x[-2] = x[-2] * 1e-30
    rb = indexer_entry_bytes(cfg, fmt)
    cache = _cache(3 * n + 1, rb, g, device)
    before = cache.clone()
    slots = _slots(n, 3 * n + 1, g).to(torch.int32 if fmt is IndexerCache.FP8 else torch.int64)
    store_indexer(x.to(device), cache, slots.to(device), fmt)
    _check_written(cache.cpu(), before.cpu(), slots.long(), records.pack_indexer(x, cfg, fmt))
    got = load_indexer(cache, slots.to(device), fmt).cpu()
    keep = slots >= 0
    ref = records.unpack_indexer(cache.cpu()[slots[keep].long()], cfg, fmt)
    _assert_same_bits(got[keep], ref)
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))


# ---- argument checks ------------------------------------------------------------------------------
def test_rejects_wrong_record_size_and_slots():
    x = torch.randn(2, 512)
    with pytest.raises(ValueError):
        store_main(x, torch.zeros(4, 576, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        store_main(x, torch.zeros(4, 584, dtype=torch.uint8), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        store_indexer(torch.randn(2, 128), torch.zeros(4, 132, dtype=torch.uint8), torch.tensor([0, 1]),
                      IndexerCache.FP4)
    empty = torch.zeros(4, 584, dtype=torch.uint8)
    store_main(torch.zeros(0, 512), empty, torch.zeros(0, dtype=torch.long))
    assert load_main(empty, torch.zeros(0, dtype=torch.long)).shape == (0, 512)


# ---- GPU legality without a GPU -------------------------------------------------------------------
_COMPILE = """
    from v4_kernels.kv_store import kernel as K
    from v4_kernels.testing import compile_for_sm90 as compile_

    st = {"x_ptr": "*bf16", "x_stride": "i32", "cache_ptr": "*u8", "cache_stride": "i32", "slots_ptr": "*i64",
          "n": "i32"}
    compile_(K._store_main_kernel, st, dict(HEAD_DIM=512, NOPE=448, ROPE=64, SCALE_BYTES=8, SCALE_P2=8, BLOCK_N=2))
    compile_(K._store_indexer_kernel, st, dict(D=128, FP8=True, BLOCK_N=4))
    compile_(K._store_indexer_kernel, st, dict(D=128, FP8=False, BLOCK_N=4))
    ld = {"out_ptr": "*fp32", "cache_ptr": "*u8", "cache_stride": "i32", "slots_ptr": "*i32", "n": "i32"}
    compile_(K._load_main_kernel, ld, dict(HEAD_DIM=512, NOPE=448, ROPE=64, BLOCK_N=4))
    compile_(K._load_indexer_kernel, ld, dict(D=128, FP8=False, BLOCK_N=8))
"""


@sm90_compile_check
def test_kernels_compile_for_sm90():
    """The interpreter accepts tiles a GPU compiler rejects: compile every kernel for sm_90 (no GPU needed)."""
    run_compile_check(_COMPILE)


# ---- the shared decoders of `v4_kernels.formats`, exhaustively -------------------------------------
@triton.jit
def _decode_all(codes_ptr, out_ptr, FORMAT: tl.constexpr):
    offs = tl.arange(0, 256)
    code = tl.load(codes_ptr + offs).to(tl.int32)
    if FORMAT == 0:
        v = e8m0_value(code)
    elif FORMAT == 1:
        v = e4m3_value(code)
    else:
        v = e2m1_value(code & 0xF)
    tl.store(out_ptr + offs, v)


@pytest.mark.parametrize("device", DEVICES)
def test_decoders_match_the_core_for_every_code(device):
    """E8M0 (0 -> 2^-127, 255 -> NaN), e4m3fn (NaN codes included) and e2m1 (-0 kept) for all 256 bytes,
    bit for bit against torch's / the core's decoders."""
    codes = torch.arange(256, dtype=torch.uint8)
    want = {
        0: quant.e8m0_to_float(codes),
        1: codes.view(torch.float8_e4m3fn).float(),
        2: quant.e2m1_decode((codes & 0xF).long()),
    }
    for fmt, expected in want.items():
        out = torch.empty(256, device=device)
        _decode_all[(1,)](codes.to(device), out, FORMAT=fmt)
        got = out.cpu()
        assert torch.equal(torch.isnan(got), torch.isnan(expected)), fmt
        ok = ~torch.isnan(expected)
        assert torch.equal(got[ok].view(torch.int32), expected[ok].view(torch.int32)), fmt  # signs of zeros too

