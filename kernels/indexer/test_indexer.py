"""Indexer kernels vs the core: `unpack_indexer` + `index_scores` + `select_topk`.

Fresh random inputs each run (seeded per test). Tolerances: scores atol = rtol = 1e-5 (fp32
accumulation in a different order; scores are O(1)); invisible entries must be exactly -inf.
Top-k must be identical (torch.equal) to `select_topk` on the same scores, and the fused
indexer -> top-k is compared exactly on crafted inputs whose scores are exact in fp32 (dyadic q,
FP4 keys, power-of-two weights), so ties (equal scores, zero scores from relu) are real ties.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # tests/conftest.py does not cover kernels/; read when @triton.jit decorates
    os.environ.setdefault("TRITON_INTERPRET", "1")

from v4_kernels.indexer.kernel import index_scores, index_topk, indexer_record_format, select_topk
from v4_kernels.testing import assert_close, gpu_only, on_device
from v4_plugin.checkpoint.config import parse_config, preset_config
from v4_plugin.cache.records import pack_indexer, unpack_indexer
from v4_plugin.cache.layout import IndexerCache, indexer_entry_bytes
from v4_plugin.runtime.ops.indexer import index_scores as core_index_scores
from v4_plugin.runtime.ops.indexer import select_topk as core_select_topk
from v4_plugin.checkpoint.tiny import TINY_PRESETS

index_scores, index_topk, select_topk = map(on_device, (index_scores, index_topk, select_topk))  # CPU-built inputs
ATOL = RTOL = 1e-5
TINY = parse_config(TINY_PRESETS["flash"])
TINY_PRO = parse_config(TINY_PRESETS["pro"])
FLASH = preset_config("flash")
PRO = preset_config("pro")
FMTS = [IndexerCache.FP8, IndexerCache.FP4, None]  # None: unquantized fp32 keys (exact mode)


def _keys(cfg, num_slots, fmt, g):
    """(cache as the kernel reads it, keys as the core sees them: unpack_indexer of the records)."""
    keys = torch.randn(num_slots, cfg.index_head_dim, generator=g)
    if fmt is None:
        return keys, keys
    records = pack_indexer(keys, cfg, fmt)
    assert records.shape[1] == indexer_entry_bytes(cfg, fmt)
    return records, unpack_indexer(records, cfg, fmt)


def _qw(cfg, T, g):
    hi, di = cfg.index_n_heads, cfg.index_head_dim
    q = torch.randn(T, hi, di, generator=g)
    w = torch.randn(T, hi, generator=g) * (di**-0.5 * hi**-0.5)
    return q, w


def _ref_scores_per_query(q, w, keys_f, slots, visible):
    """Core scores of each query over its own slot row; -inf where invisible or slot -1."""
    T, n = slots.shape
    out = torch.empty(T, n)
    for t in range(T):
        out[t] = core_index_scores(q[t : t + 1], w[t : t + 1], keys_f[slots[t].clamp(min=0)])[0]
    j = torch.arange(n)
    return out.masked_fill((j[None, :] >= visible[:, None]) | (slots < 0), float("-inf"))


def _check_scores(out, ref):
    inv = ref == float("-inf")
    assert torch.equal(out == float("-inf"), inv)
    assert_close(out[~inv], ref[~inv], atol=ATOL, rtol=RTOL)


def test_record_formats():
    for cfg in (TINY, FLASH):
        for fmt, code in ((IndexerCache.FP8, 1), (IndexerCache.FP4, 2)):
            assert indexer_record_format(indexer_entry_bytes(cfg, fmt), cfg.index_head_dim) == code
    assert indexer_entry_bytes(FLASH, IndexerCache.FP8) == 132 and indexer_entry_bytes(FLASH, IndexerCache.FP4) == 68


@pytest.mark.parametrize("fmt", FMTS, ids=["fp8", "fp4", "float"])
@pytest.mark.parametrize("n", [1, 3, 129, 300])
def test_scores_per_query_slots(fmt, n):
    g = torch.Generator().manual_seed(n)
    T = 3
    cache, keys_f = _keys(TINY, 400, fmt, g)
    q, w = _qw(TINY, T, g)
    slots = torch.randint(0, 400, (T, n), generator=g)
    slots[torch.rand(T, n, generator=g) < 0.1] = -1
    visible = torch.tensor([n, n // 2, 0])
    out = index_scores(q, w, cache, slots=slots, visible=visible)
    _check_scores(out, _ref_scores_per_query(q, w, keys_f, slots, visible))


@pytest.mark.parametrize("fmt", FMTS, ids=["fp8", "fp4", "float"])
def test_scores_key_rows_match_core(fmt):
    """Without slots the kernel is the core's index_scores over key rows (prefill chunk, one sequence)."""
    g = torch.Generator().manual_seed(3)
    cache, keys_f = _keys(TINY_PRO, 200, fmt, g)
    q, w = _qw(TINY_PRO, 7, g)
    assert_close(index_scores(q, w, cache), core_index_scores(q, w, keys_f), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("fmt", [IndexerCache.FP8, IndexerCache.FP4], ids=["fp8", "fp4"])
def test_scores_per_sequence_slot_lists(fmt):
    """Per-sequence slot lists + visibility counts: decode (1 query) and prefill chunks (several)."""
    g = torch.Generator().manual_seed(9)
    cache, keys_f = _keys(TINY, 500, fmt, g)
    counts = [1, 5, 2, 1]
    T, n = sum(counts), 150
    q, w = _qw(TINY, T, g)
    seq_slots = torch.stack([torch.randperm(500, generator=g)[:n] for _ in counts])
    query_start = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    visible = torch.tensor([150, 40, 41, 42, 43, 44, 0, 1, 77])
    per_query = torch.cat([seq_slots[b : b + 1].expand(c, n) for b, c in enumerate(counts)])
    ref = _ref_scores_per_query(q, w, keys_f, per_query, visible)
    out = index_scores(q, w, cache, slots=seq_slots, visible=visible, query_start=query_start)
    _check_scores(out, ref)
    out2 = index_scores(q, w, cache, slots=seq_slots, visible=visible, query_start=query_start, max_queries=5)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("cfg,fmt", [(FLASH, IndexerCache.FP8), (PRO, IndexerCache.FP4)], ids=["flash-fp8", "pro-fp4"])
def test_scores_real_dims(cfg, fmt):
    """64 heads x 128 dims, 132 / 68-B records; one decode query over ~2K keys and a 2-query chunk."""
    g = torch.Generator().manual_seed(1)
    cache, keys_f = _keys(cfg, 2100, fmt, g)
    q, w = _qw(cfg, 3, g)
    slots = torch.randperm(2100, generator=g)[:2048][None]
    query_start = torch.tensor([0, 1], dtype=torch.int32)
    out = index_scores(q[:1], w[:1], cache, slots=slots, visible=torch.tensor([2000]), query_start=query_start)
    _check_scores(out, _ref_scores_per_query(q[:1], w[:1], keys_f, slots, torch.tensor([2000])))
    out = index_scores(q[1:], w[1:], cache[:300])
    assert_close(out, core_index_scores(q[1:], w[1:], keys_f[:300]), atol=ATOL, rtol=RTOL)


def _tie_scores(T, n, g):
    """Scores with heavy ties: few distinct values, +0 / -0, -inf, large magnitudes."""
    vals = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.5, 1e30, -1e30, float("-inf"), 3.0, 3.0])
    s = vals[torch.randint(0, len(vals), (T, n), generator=g)]
    s[:, ::7] = torch.randn(T, len(range(0, n, 7)), generator=g)
    return s


@pytest.mark.parametrize("n,k,chunk", [(1, 16, None), (5, 16, None), (16, 16, None), (300, 16, None),
                                       (300, 32, 64), (1000, 32, 128), (2500, 512, None)])
def test_topk_exact(n, k, chunk):
    g = torch.Generator().manual_seed(n + k)
    T = 6
    scores = _tie_scores(T, n, g)
    visible = torch.tensor([n, 0, 1, max(0, n - 3), min(n, 7), n // 2])  # empty, k > visible, ...
    if k >= 512:  # real top-k sizes: fewer rows (interpreter time)
        scores, visible = scores[[0, 4]], visible[[0, 4]]
    elif chunk is not None:  # multi-pass: many small programs
        scores, visible = scores[[0, 1, 3, 4]], visible[[0, 1, 3, 4]]
    ref = core_select_topk(scores, visible, k)
    out = select_topk(scores, visible, k, chunk=chunk)
    assert out.dtype == torch.int64 and torch.equal(out, ref)


def test_topk_nan_and_random_rows():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 700, generator=g)
    scores[0, 5] = float("nan")
    scores[1] = 0.0
    scores[1, 100:200] = -0.0
    visible = torch.tensor([700, 650, 400])
    for chunk in (None, 128):
        assert torch.equal(select_topk(scores, visible, 32, chunk=chunk), core_select_topk(scores, visible, 32))


def test_topk_real_k_multipass():
    """k = 1024 (Pro) over 5000 entries, ties included, in passes of 2048 keys."""
    g = torch.Generator().manual_seed(4)
    scores = (torch.randn(2, 5000, generator=g) * 4).round() / 4  # many equal scores
    visible = torch.tensor([5000, 900])
    assert torch.equal(select_topk(scores, visible, 1024, chunk=2048), core_select_topk(scores, visible, 1024))


def _dyadic_inputs(cfg, T, n, g):
    """q on a 1/4 grid, FP4 keys, power-of-two weights: every product and sum is exact in fp32."""
    hi, di = cfg.index_n_heads, cfg.index_head_dim
    q = torch.randint(-4, 5, (T, hi, di), generator=g).float() / 4
    q[:, :, di // 2 :] = 0.0  # fewer distinct scores: more ties
    w = 2.0 ** torch.randint(-3, 1, (T, hi), generator=g).float()
    w[:, 0] = -w[:, 0]  # negative weights: -0.0 scores from relu zeros
    keys = torch.randint(-2, 3, (n, di), generator=g).float()
    keys[n // 3 :: 5] = -keys[n // 3 :: 5].abs() - 1  # some keys with all-negative dots: zero scores
    records = pack_indexer(keys, cfg, IndexerCache.FP4)
    return q, w, records, unpack_indexer(records, cfg, IndexerCache.FP4)


@pytest.mark.parametrize("T,n,k", [(4, 40, 16), (3, 300, 32)])
def test_fused_indexer_topk_exact(T, n, k):
    cfg = TINY if k == 16 else TINY_PRO
    g = torch.Generator().manual_seed(T * n)
    q, w, records, keys_f = _dyadic_inputs(cfg, T, n, g)
    visible = torch.tensor([n, 0, n // 3, k - 1][:T])
    ref_scores = core_index_scores(q, w, keys_f)
    assert (ref_scores[:, None, :] == ref_scores[:, :, None]).sum() > T * n  # there are ties
    out_scores = index_scores(q, w, records, visible=visible)
    vis = torch.arange(n)[None, :] < visible[:, None]
    assert torch.equal(out_scores[vis], ref_scores[vis])  # exact
    assert torch.equal(index_topk(q, w, records, visible, k), core_select_topk(ref_scores, visible, k))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled kernels, bf16 tensor-core dots)")
@pytest.mark.parametrize("fmt", [IndexerCache.FP8, IndexerCache.FP4], ids=["fp8", "fp4"])
def test_gpu_decode_and_topk(fmt):
    g = torch.Generator().manual_seed(0)
    cache, keys_f = _keys(FLASH, 70000, fmt, g)
    q, w = _qw(FLASH, 4, g)
    slots = torch.randperm(70000, generator=g)[:65536].reshape(1, -1).expand(4, -1).contiguous()
    visible = torch.tensor([65536, 30000, 100, 0])
    ref = _ref_scores_per_query(q, w, keys_f, slots, visible)
    dev = torch.device("cuda")
    qs = torch.arange(5, dtype=torch.int32, device=dev)
    out = index_scores(q.bfloat16().to(dev), w.to(dev), cache.to(dev), slots=slots.to(dev),
                       visible=visible.to(dev), query_start=qs, max_queries=1).cpu()
    inv = ref == float("-inf")
    assert torch.equal(out == float("-inf"), inv)
    assert_close(out[~inv], ref[~inv], atol=5e-2, rtol=2e-2)  # q rounded to bf16
    assert torch.equal(select_topk(out.to(dev), visible.to(dev), 512).cpu(), core_select_topk(out, visible, 512))


@gpu_only
@pytest.mark.parametrize("fmt", [IndexerCache.FP8, IndexerCache.FP4], ids=["fp8", "fp4"])
@pytest.mark.parametrize("context", [4096, 32768, 131072], ids=lambda c: f"{c // 1024}k")
@pytest.mark.parametrize("cfg", [FLASH, PRO], ids=["flash", "pro"])
def test_gpu_real_contexts(cfg, context, fmt):
    """Decode at real contexts: 4 queries of one sequence over its context / 4 compressed entries (per-sequence
    slot list), scores within bf16 q rounding, then the model's top-k (512 Flash, 1024 Pro) exactly on them."""
    g = torch.Generator().manual_seed(context)
    n = context // 4
    cache, keys_f = _keys(cfg, n + 100, fmt, g)
    q, w = _qw(cfg, 4, g)
    slots = torch.randperm(n + 100, generator=g)[:n].reshape(1, -1)
    visible = torch.tensor([n, n - 1, n // 2, 3])
    ref = _ref_scores_per_query(q, w, keys_f, slots.expand(4, -1), visible)
    out = index_scores(q.bfloat16(), w, cache, slots=slots, visible=visible,
                       query_start=torch.tensor([0, 4], dtype=torch.int32), max_queries=4)
    inv = ref == float("-inf")
    assert torch.equal(out == float("-inf"), inv)
    assert_close(out[~inv], ref[~inv], atol=5e-2, rtol=2e-2)  # q rounded to bf16
    assert torch.equal(select_topk(out, visible, cfg.index_topk), core_select_topk(out, visible, cfg.index_topk))
