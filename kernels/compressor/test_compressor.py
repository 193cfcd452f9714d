"""Tests of the fused compressor kernel against the core: `pool_blocks` + `finish_entries` (+ `records.pack_*`).

Tolerances (fresh random inputs each case; measured rates are far below the bounds):

* Unquantized entries (`simulate_quant=False`), fp32: rtol = atol = 1e-5. The kernel sums the
  softmax, the RMS mean and the Hadamard in another order than torch (and the GPU's exp is
  approximate), so values differ by a few fp32 ulps (measured max abs error ~2e-6 on O(1) values).
* bf16 (`dtype=torch.bfloat16`, three bf16 roundings in the pipeline): at least 98 % of the values
  bit-identical, the rest within 2 bf16 steps (rtol 2^-6): a value an ulp from a bf16 midpoint
  rounds the other way and the next stage (RoPE) can carry that step.
* Quantized entries and cache records: at least 97 % of the bytes identical (typically all of
  them), and every dequantized value within one step of its format at the larger of the two block
  scales (e4m3: 2^(floor(log2 |v|/s) - 3) s, e2m1: 0.5 / 1 / 2 s, bf16 rope dims: as above). A
  near-midpoint value quantizes one step apart; a block whose amax sits on a power-of-two boundary
  can pick the neighbouring scale (then every code of that block differs but the values still agree
  to one step).

Exact checks (no tolerance): records decode bit-identically to the kernel's own simulated entries;
splitting a batch of blocks and passing the previous block explicitly changes nothing; a cos/sin table
gives the same bits as a `Rope`; slots < 0 and rows outside `slots` are not written.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():  # read when @triton.jit decorates, so before the kernel import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from v4_kernels.compressor.kernel import pool_finish, pool_finish_store  # noqa: E402
from v4_kernels.testing import DEVICES, assert_close, on_device, run_compile_check, sm90_compile_check  # noqa: E402
from v4_plugin.cache import records  # noqa: E402
from v4_plugin.checkpoint.config import LayerType, V4Config, parse_config, preset_config  # noqa: E402
from v4_plugin.cache.layout import IndexerCache, indexer_entry_bytes, main_entry_bytes  # noqa: E402
from v4_plugin.runtime.ops.compressor import finish_entries, pool_blocks  # noqa: E402
from v4_plugin.runtime.ops.rope import Rope  # noqa: E402
from v4_plugin.checkpoint.quant import e8m0_to_float  # noqa: E402
from v4_plugin.checkpoint.tiny import TINY_PRESETS  # noqa: E402

pool_finish, pool_finish_store = on_device(pool_finish), on_device(pool_finish_store)  # CPU-built inputs
CFGS = {"tiny": parse_config(TINY_PRESETS["flash"]), "flash": preset_config("flash")}


@dataclass(frozen=True)
class Case:
    cfg: str
    ratio: int  # 4: overlapping CSA compressor, 128: HCA
    indexer: bool
    nb: int  # complete blocks in the batch
    first: int  # block id of the first block; 0 = the sequence start (no previous block)

    @property
    def overlap(self) -> bool:
        return self.ratio == 4

    def __str__(self) -> str:
        kind = "idx" if self.indexer else ("csa" if self.overlap else "hca")
        return f"{self.cfg}-{kind}-nb{self.nb}-j{self.first}"


CASES = [
    Case("tiny", 4, False, 1, 0),  # the first block: A-slots empty
    Case("tiny", 4, False, 5, 7),  # many blocks after a previous one
    Case("tiny", 128, False, 1, 0),  # a single HCA block
    Case("tiny", 128, False, 3, 4),
    Case("tiny", 4, True, 3, 0),
    Case("flash", 4, False, 3, 2),
    Case("flash", 4, False, 1, 0),
    Case("flash", 128, False, 2, 5),
    Case("flash", 4, True, 3, 9),
    Case("flash", 4, True, 1, 0),
]


def _inputs(case: Case, dtype: torch.dtype, seed: int, device: str = "cpu") -> tuple[dict, dict, V4Config]:
    """Random pool inputs (values, ape-biased gate logits, the previous block) and finish arguments."""
    cfg = CFGS[case.cfg]
    e = cfg.index_head_dim if case.indexer else cfg.head_dim
    width = (2 if case.overlap else 1) * e
    g = torch.Generator().manual_seed(seed)
    m, nb = case.ratio, case.nb
    kv = torch.randn(nb, m, width, generator=g) * 0.5 + torch.randn(1, 1, width, generator=g)
    ape = torch.randn(m, width, generator=g)
    score = torch.randn(nb, m, width, generator=g) * 2 + ape
    prev_kv = prev_score = None
    if case.overlap and case.first > 0:
        prev_kv = torch.randn(m, width, generator=g)
        prev_score = torch.randn(m, width, generator=g) * 2 + ape
    weight = (1 + 0.2 * torch.randn(e, generator=g)).to(dtype)
    pool = dict(kv=kv, score=score, overlap=case.overlap, prev_kv=prev_kv, prev_score=prev_score)
    pool = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in pool.items()}
    finish = dict(block_ids=torch.arange(case.first, case.first + nb, device=device), ratio=m,
                  norm_weight=weight.to(device), eps=cfg.rms_norm_eps, rope=Rope.for_layer(cfg, LayerType.CSA),
                  dtype=dtype, indexer=case.indexer)
    return pool, finish, cfg


def _reference(pool: dict, finish: dict, simulate_quant: bool) -> torch.Tensor:
    p = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in pool.items()}
    f = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in finish.items()}
    return finish_entries(pool_blocks(**p), simulate_quant=simulate_quant, **f)


def _pack(entries: torch.Tensor, cfg: V4Config, indexer: bool, fmt: IndexerCache) -> torch.Tensor:
    return records.pack_indexer(entries, cfg, fmt) if indexer else records.pack_main(entries, cfg)


# ---- "within one quantization step" --------------------------------------------------------------
def _e4m3_gap(v: torch.Tensor) -> torch.Tensor:
    """Spacing of the e4m3 grid at |v| (v in units of the block scale)."""
    return torch.exp2(torch.floor(torch.log2(v.clamp_min(2.0**-6))) - 3)


def _e2m1_gap(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v < 2, 0.5, torch.where(v < 4, 1.0, 2.0))


def _bf16_gap(v: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(v.clamp_min(2.0**-126))) - 7)


def _scales(rec: torch.Tensor, cfg: V4Config, indexer: bool, fmt: IndexerCache) -> torch.Tensor:
    """Per-element scale of each record [N, e] (1 for the bf16 rope dims)."""
    if indexer:
        d = cfg.index_head_dim
        if fmt is IndexerCache.FP8:
            return rec[:, d : d + 4].contiguous().view(torch.float32).expand(-1, d)
        return e8m0_to_float(rec[:, d // 2 : d // 2 + d // 32]).repeat_interleave(32, 1)
    nope, r = cfg.nope_head_dim, cfg.qk_rope_head_dim
    s = e8m0_to_float(rec[:, nope + 2 * r : nope + 2 * r + nope // 64]).repeat_interleave(64, 1)
    return torch.cat((s, torch.ones(rec.shape[0], r)), 1)


def _assert_records_close(got: torch.Tensor, ref: torch.Tensor, cfg: V4Config, indexer: bool,
                          fmt: IndexerCache, min_same: float = 0.97) -> None:
    same = (got == ref).float().mean().item()
    assert same >= min_same, f"only {same:.4f} of the record bytes identical"
    unpack = ((lambda r: records.unpack_indexer(r, cfg, fmt)) if indexer else (lambda r: records.unpack_main(r, cfg)))
    a, b = unpack(got), unpack(ref)
    s = torch.maximum(_scales(got, cfg, indexer, fmt), _scales(ref, cfg, indexer, fmt))
    v = torch.maximum(a.abs(), b.abs()) / s
    if indexer:
        gap = (_e2m1_gap(v) if fmt is IndexerCache.FP4 else _e4m3_gap(v)) * s
    else:
        nope = cfg.nope_head_dim
        gap = torch.cat((_e4m3_gap(v[:, :nope]) * s[:, :nope], _bf16_gap(v[:, nope:])), 1)
    bad = (a - b).abs() > gap * (1 + 1e-6)
    assert not bad.any(), f"{int(bad.sum())} values more than one quantization step apart"


# ---- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_pool_finish_matches_reference(case, dtype):
    pool, finish, cfg = _inputs(case, dtype, seed=zlib.crc32(str(case).encode()) % 1000 + (dtype == torch.bfloat16))
    got = pool_finish(**pool, **finish, simulate_quant=False)
    ref = _reference(pool, finish, simulate_quant=False)
    assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
    if dtype == torch.float32:
        assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:
        assert (got == ref).float().mean() >= 0.98
        assert_close(got.float(), ref.float(), rtol=2**-6, atol=1e-6)
    # quantization-simulated entries: compare on the record grid
    got_q = pool_finish(**pool, **finish, simulate_quant=True)
    ref_q = _reference(pool, finish, simulate_quant=True)
    fmt = IndexerCache.FP4
    _assert_records_close(_pack(got_q, cfg, case.indexer, fmt), _pack(ref_q, cfg, case.indexer, fmt), cfg,
                          case.indexer, fmt)


STORE_CASES = [(c, f) for c in CASES for f in ([IndexerCache.FP4, IndexerCache.FP8] if c.indexer else [None])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,fmt", STORE_CASES,
                         ids=lambda x: str(x) if isinstance(x, Case) else getattr(x, "value", "main"))
def test_pool_finish_store_matches_pack(case, fmt, dtype, device):
    fmt = fmt or IndexerCache.FP4
    pool, finish, cfg = _inputs(case, dtype, seed=zlib.crc32(str(case).encode()) % 1000 + 17, device=device)
    rb = indexer_entry_bytes(cfg, fmt) if case.indexer else main_entry_bytes(cfg)
    g = torch.Generator().manual_seed(case.nb)
    num_slots = 2 * case.nb + 3
    slots = torch.randperm(num_slots, generator=g)[: case.nb]
    if case.nb > 2:
        slots[1] = -1
    cache = torch.randint(0, 256, (num_slots, rb), generator=g, dtype=torch.uint8)
    before = cache.clone()
    cache = cache.to(device)
    out = pool_finish_store(**pool, **finish, cache=cache, slots=slots.to(device), fmt=fmt)
    assert out is cache
    cache = cache.cpu()
    keep = slots >= 0
    ref = _pack(_reference(pool, finish, simulate_quant=True), cfg, case.indexer, fmt)
    _assert_records_close(cache[slots[keep]], ref[keep], cfg, case.indexer, fmt)
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert torch.equal(cache[untouched], before[untouched])
    # exact: the records hold the kernel's own simulated entries, bit for bit
    mine = pool_finish(**pool, **finish, simulate_quant=True).float().cpu()
    unpack = records.unpack_indexer(cache[slots[keep]], cfg, fmt) if case.indexer else \
        records.unpack_main(cache[slots[keep]], cfg)
    assert torch.equal(unpack, mine[keep])


@pytest.mark.parametrize("case", [Case("tiny", 4, False, 5, 3), Case("tiny", 4, True, 4, 0)], ids=str)
def test_split_batches_and_first_block_are_exact(case):
    """Blocks [0, k) and [k, nb) in two calls, passing block k-1 as the previous block, give the bits
    of one call; for the sequence start, prev None equals an explicit prev with gate -inf."""
    pool, finish, _ = _inputs(case, torch.float32, seed=5)
    whole = pool_finish(**pool, **finish, simulate_quant=False)
    k = 2
    kv, score = pool["kv"], pool["score"]
    head = dict(pool, kv=kv[:k], score=score[:k])
    tail = dict(pool, kv=kv[k:], score=score[k:], prev_kv=kv[k - 1], prev_score=score[k - 1])
    bid = finish["block_ids"]
    parts = torch.cat((pool_finish(**head, **dict(finish, block_ids=bid[:k]), simulate_quant=False),
                       pool_finish(**tail, **dict(finish, block_ids=bid[k:]), simulate_quant=False)))
    assert torch.equal(parts, whole)
    if pool["prev_kv"] is None:
        empty = dict(pool, prev_kv=torch.zeros_like(kv[0]), prev_score=torch.full_like(score[0], float("-inf")))
        assert torch.equal(pool_finish(**empty, **finish, simulate_quant=False), whole)


@pytest.mark.parametrize("case", [Case("tiny", 4, False, 3, 4), Case("flash", 4, True, 3, 1)], ids=str)
def test_per_entry_previous_blocks(case):
    """Batched decode form: blocks of different sequences, each with its own previous block
    (prev [nb, m, 2e]; the second sequence is at its first block: prev score -inf)."""
    pool, finish, cfg = _inputs(case, torch.bfloat16, seed=21)
    g = torch.Generator().manual_seed(3)
    prev_kv = torch.randn(pool["kv"].shape, generator=g)
    prev_score = torch.randn(pool["kv"].shape, generator=g) * 2
    prev_score[1] = float("-inf")
    block_ids = torch.tensor([5, 0, 17])
    got = pool_finish(**dict(pool, prev_kv=prev_kv, prev_score=prev_score),
                      **dict(finish, block_ids=block_ids), simulate_quant=False)
    for i in range(case.nb):
        one = dict(pool, kv=pool["kv"][i : i + 1], score=pool["score"][i : i + 1],
                   prev_kv=None if i == 1 else prev_kv[i], prev_score=None if i == 1 else prev_score[i])
        ref = _reference(one, dict(finish, block_ids=block_ids[i : i + 1]), simulate_quant=False)
        assert (got[i] == ref[0]).float().mean() >= 0.98
        assert_close(got[i].float(), ref[0].float(), rtol=2**-6, atol=1e-6)
    cache = torch.zeros(case.nb, indexer_entry_bytes(cfg, IndexerCache.FP8) if case.indexer else main_entry_bytes(cfg),
                        dtype=torch.uint8)
    pool_finish_store(**dict(pool, prev_kv=prev_kv, prev_score=prev_score), **dict(finish, block_ids=block_ids),
                      cache=cache, slots=torch.arange(case.nb), fmt=IndexerCache.FP8)
    mine = pool_finish(**dict(pool, prev_kv=prev_kv, prev_score=prev_score), **dict(finish, block_ids=block_ids),
                       simulate_quant=True).float()
    unpack = records.unpack_indexer(cache, cfg, IndexerCache.FP8) if case.indexer else records.unpack_main(cache, cfg)
    assert torch.equal(unpack, mine)


def test_rope_table_equals_rope():
    case = Case("flash", 4, False, 3, 6)
    pool, finish, cfg = _inputs(case, torch.bfloat16, seed=9)
    rope = finish["rope"]
    cos, sin = rope.cos_sin(torch.arange(0, 64))
    a = pool_finish(**pool, **finish, simulate_quant=True)
    b = pool_finish(**pool, **dict(finish, rope=(cos, sin)), simulate_quant=True)
    assert torch.equal(a, b)


def test_rejects_bad_shapes():
    pool, finish, _ = _inputs(Case("tiny", 4, False, 2, 0), torch.float32, seed=1)
    with pytest.raises(ValueError):
        pool_finish(**pool, **dict(finish, ratio=8), simulate_quant=False)
    with pytest.raises(ValueError):
        pool_finish(**dict(pool, score=pool["score"][:1]), **finish, simulate_quant=False)
    with pytest.raises(ValueError):
        pool_finish_store(**pool, **finish, cache=torch.zeros(4, 584, dtype=torch.uint8), slots=torch.tensor([0, 1]))


# ---- GPU legality without a GPU -------------------------------------------------------------------
_COMPILE = """
    import torch
    from v4_kernels.compressor import kernel as C
    from v4_kernels.testing import compile_for_sm90

    sig = {"kv_ptr": "*fp32", "score_ptr": "*fp32", "prev_kv_ptr": "*fp32", "prev_score_ptr": "*fp32",
           "w_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "bid_ptr": "*i64", "out_ptr": "*fp32",
           "cache_ptr": "*u8", "cache_stride": "i32", "slots_ptr": "*i64", "nb": "i32", "eps": "fp32"}
    for m, e, idx, out, prev in [(4, 512, False, 1, 1), (128, 512, False, 1, 0), (4, 128, True, 3, 2),
                                 (4, 128, True, 2, 0), (4, 512, False, 0, 2)]:
        cfg = C.tile_config(1, m, e, torch.device("cuda"))
        consts = dict(M=m, E=e, ROPE=64, OVERLAP=m == 4, PREV=prev, ROUND_BF16=True, INDEXER=idx, SIMULATE=True,
                      OUT=out, SCALE_BYTES=8, SCALE_P2=8, HSCALE=e**-0.5, TABLE_BY_POSITION=prev == 2,
                      TOK=cfg["TOK"], BLOCK_N=cfg["BLOCK_N"])
        compile_for_sm90(C._compress_kernel, sig, consts, num_warps=cfg["num_warps"])
"""


@sm90_compile_check
def test_kernel_compiles_for_sm90():
    """The interpreter accepts tiles a GPU compiler rejects: compile the variants for sm_90 (no GPU needed)."""
    run_compile_check(_COMPILE)
