"""Sparse attention kernel vs the core: `unpack_main` + `v4_plugin.runtime.ops.attention.sparse_attention`.

Fresh random inputs each run (seeded per test for reproducibility of failures). Tolerances:
fp32 q (fp32 dots in the interpreter): atol = rtol = 2e-5 on outputs of magnitude ~1; bf16 q: the
kernel's output is compared in fp32 after a bf16 store, which rounds toward zero in the
interpreter, so one bf16 step (rtol 1e-2, atol 1e-2). GPU-only tests skip without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # tests/conftest.py does not cover kernels/; read when @triton.jit decorates
    os.environ.setdefault("TRITON_INTERPRET", "1")

from v4_kernels.sparse_attention.kernel import main_record_layout, sparse_attention
from v4_kernels.testing import assert_close, gpu_only, on_device
from v4_plugin.checkpoint.config import parse_config, preset_config
from v4_plugin.cache.records import pack_main, unpack_main
from v4_plugin.cache.layout import main_entry_bytes
from v4_plugin.runtime.ops.attention import attention_over_slots
from v4_plugin.runtime.ops.attention import sparse_attention as core_sparse_attention
from v4_plugin.checkpoint.tiny import TINY_PRESETS

sparse_attention = on_device(sparse_attention)  # CPU-built inputs and references
ATOL = RTOL = 2e-5
CFGS = {
    "tiny-flash": parse_config(TINY_PRESETS["flash"]),
    "tiny-pro": parse_config(TINY_PRESETS["pro"]),
    "flash": preset_config("flash"),
    "pro": preset_config("pro"),
}


def _cache(cfg, num_slots: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random KV rows on the cache grid: (records uint8 [N, 584-ish], unpacked fp32 [N, head_dim])."""
    kv = torch.randn(num_slots, cfg.head_dim, generator=g) * 1.5
    records = pack_main(kv, cfg)
    return records, unpack_main(records, cfg)


def _slots(T: int, S: int, num_slots: int, g: torch.Generator, holes: float = 0.2) -> torch.Tensor:
    """Random slots with duplicates and holes (-1); row 0 also gets a trailing run of -1."""
    idx = torch.randint(0, num_slots, (T, S), generator=g)
    idx[torch.rand(T, S, generator=g) < holes] = -1
    if S > 4:
        idx[0, S - S // 3:] = -1
    return idx


def _inputs(cfg, T: int, S: int, seed: int, num_slots: int = 300, q_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    H, d = cfg.num_attention_heads, cfg.head_dim
    records, kv = _cache(cfg, num_slots, g)
    q = (torch.randn(T, H, d, generator=g) * 2.0).to(q_dtype)
    sink = torch.randn(H, generator=g)
    return q, records, kv, _slots(T, S, num_slots, g), sink, d**-0.5


def _check(out, ref, atol=ATOL, rtol=RTOL):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any()
    assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def test_record_layout_matches_core():
    for cfg in CFGS.values():
        assert main_record_layout(cfg.head_dim, cfg.qk_rope_head_dim)[2] == main_entry_bytes(cfg)
    assert main_record_layout(512, 64) == (448, 576, 584)


@pytest.mark.parametrize("S", [1, 3, 128, 129, 144, 641])
def test_tiny_fp8_cache(S):
    cfg = CFGS["tiny-flash"]
    q, records, kv, idx, sink, scale = _inputs(cfg, T=3, S=S, seed=S)
    ref = core_sparse_attention(q, kv, idx, sink, scale)
    _check(sparse_attention(q, records, idx, sink, scale), ref)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_split_k_counts(num_splits):
    """S = 128 + 513 (HCA-like), one decode query, forced split counts incl. a ragged last split."""
    cfg = CFGS["tiny-pro"]
    q, records, kv, idx, sink, scale = _inputs(cfg, T=1, S=641, seed=10 + num_splits)
    ref = core_sparse_attention(q, kv, idx, sink, scale)
    _check(sparse_attention(q, records, idx, sink, scale, num_splits=num_splits), ref)


def test_empty_rows_duplicates_and_padded_heads():
    cfg = CFGS["tiny-flash"]
    q, records, kv, idx, sink, scale = _inputs(cfg, T=4, S=144, seed=7)
    idx[1] = -1  # all slots empty: output 0 (sink only)
    idx[2] = 5  # one entry 144 times: counted 144 times, no dedup
    idx[3, :72] = idx[3, 72:]  # every entry twice
    sink[-2:] = float("-inf")  # padded heads, as vLLM pads to 64/128 heads
    q[:, -2:] = 0.0
    ref = core_sparse_attention(q, kv, idx, sink, scale)
    for splits in (1, 2):
        out = sparse_attention(q, records, idx, sink, scale, num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))  # (the reference is NaN in the -inf sink heads)
        keep = [0, 2, 3]
        _check(out[keep], ref[keep])
    # the duplicated row is not the deduplicated one
    dedup = core_sparse_attention(q[2:3], kv, idx[2:3, :1], sink, scale)
    assert not torch.allclose(ref[2:3], dedup, atol=1e-3)


def test_all_empty_row_with_minus_inf_sink_is_zero():
    """The torch reference gives NaN (0/0) for an all-empty row whose sink is -inf; the kernel gives 0."""
    cfg = CFGS["tiny-flash"]
    q, records, kv, idx, sink, scale = _inputs(cfg, T=2, S=3, seed=3)
    idx[0] = -1
    sink[:] = float("-inf")
    for splits in (1, 2):
        out = sparse_attention(q, records, idx, sink, scale, num_splits=splits)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        _check(out[1:], core_sparse_attention(q[1:], kv, idx[1:], sink, scale))


def test_prefill_many_queries_int32_slots():
    cfg = CFGS["tiny-flash"]
    q, records, kv, idx, sink, scale = _inputs(cfg, T=16, S=144, seed=11)
    ref = core_sparse_attention(q, kv, idx, sink, scale)
    _check(sparse_attention(q, records, idx.to(torch.int32), sink, scale), ref)


@pytest.mark.parametrize("fp8_hw", [False, True])
def test_fp8_decode_paths(fp8_hw):
    """Integer e4m3 decode and the hardware convert agree with `unpack_main` bit for bit (via outputs)."""
    cfg = CFGS["tiny-flash"]
    g = torch.Generator().manual_seed(5)
    kv = torch.randn(64, cfg.head_dim, generator=g) * torch.logspace(-3, 2, 64)[:, None]  # subnormals too
    records = pack_main(kv, cfg)
    rows = unpack_main(records, cfg)
    H, d = cfg.num_attention_heads, cfg.head_dim
    # one-hot slot per query and a sink of -inf: the output is exactly that row
    idx = torch.arange(64)[:, None]
    q = torch.zeros(64, H, d)
    out = sparse_attention(q, records, idx, torch.full((H,), float("-inf")), d**-0.5, num_splits=1, fp8_hw=fp8_hw)
    assert torch.equal(out, rows[:, None, :].expand(64, H, d))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_float_cache_exact_mode(cache_dtype):
    cfg = CFGS["tiny-pro"]
    q, _, kv, idx, sink, scale = _inputs(cfg, T=2, S=129, seed=21)
    kv = kv.to(cache_dtype)
    q = q.to(cache_dtype) if cache_dtype != torch.float32 else q
    ref = core_sparse_attention(q, kv, idx, sink, scale)
    tol = dict(atol=ATOL, rtol=RTOL) if cache_dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    _check(sparse_attention(q, kv, idx, sink, scale), ref, **tol)


def test_bf16_queries():
    cfg = CFGS["tiny-flash"]
    q, records, kv, idx, sink, scale = _inputs(cfg, T=2, S=144, seed=4, q_dtype=torch.bfloat16)
    ref32 = core_sparse_attention(q.float(), kv, idx, sink, scale)
    out = sparse_attention(q, records, idx, sink, scale)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref32, atol=1e-2, rtol=1e-2)  # one bf16 step (round-to-zero store)


@pytest.mark.parametrize("name,S,splits", [("flash", 144, 2), ("pro", 129, 1)])
def test_real_dims(name, S, splits):
    """Real head_dim 512 / rope 64 / 584-B records and 64 / 128 heads; few, small cases."""
    cfg = CFGS[name]
    q, records, kv, idx, sink, scale = _inputs(cfg, T=1, S=S, seed=S, num_slots=200)
    assert records.shape[1] == 584
    ref = core_sparse_attention(q, kv, idx, sink, scale)
    _check(sparse_attention(q, records, idx, sink, scale, num_splits=splits), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled kernels, bf16 tensor-core dots)")
@pytest.mark.parametrize("name,T,S", [("flash", 1, 640), ("pro", 1, 1152), ("flash", 64, 640), ("pro", 3, 128 + 8193)])
def test_gpu_bf16(name, T, S):
    cfg = CFGS[name]
    q, records, kv, idx, sink, scale = _inputs(cfg, T=T, S=S, seed=1, num_slots=20000, q_dtype=torch.bfloat16)
    ref = core_sparse_attention(q.float(), kv, idx, sink, scale)
    dev = torch.device("cuda")
    out = sparse_attention(q.to(dev), records.to(dev), idx.to(dev), sink.to(dev), scale)
    assert_close(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)
    out32 = sparse_attention(q.float().to(dev), kv.to(dev), idx.to(dev), sink.to(dev), scale)
    assert_close(out32.cpu(), ref, atol=1e-4, rtol=1e-4)


CONTEXTS = (4096, 32768, 131072)


@gpu_only
@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("layer", ["csa", "hca"])
@pytest.mark.parametrize("context", CONTEXTS, ids=lambda c: f"{c // 1024}k")
@pytest.mark.parametrize("name", ["flash", "pro"])
def test_gpu_real_contexts(name, context, layer, T):
    """Real heads (Flash 64, Pro 128) and slot lists of a `context`-token sequence: CSA = top-k compressed
    entries + the 128-token window, HCA = every context / 128 entry + the window; the cache holds
    context / 4 compressed entries + the window. bf16 q, FP8 records."""
    cfg = CFGS[name]
    S = (cfg.index_topk if layer == "csa" else context // 128) + 128
    q, records, kv, idx, sink, scale = _inputs(cfg, T=T, S=S, seed=context + T, num_slots=context // 4 + 128,
                                               q_dtype=torch.bfloat16)
    ref = core_sparse_attention(q.float(), kv, idx, sink, scale)
    assert_close(sparse_attention(q, records, idx, sink, scale).float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8-records", "float-rows"])
@pytest.mark.parametrize("cfg_name,S1,S2,splits", [("tiny-flash", 5, 3, None), ("tiny-flash", 128, 513, 4),
                                                   ("tiny-pro", 3, 0, None), ("flash", 128, 129, None)])
def test_two_sources_match_the_core(cfg_name, fp8, S1, S2, splits):
    """A window cache and a compressed cache read in one softmax (the serving path): the kernel equals
    `attention_over_slots`; tiles straddle the two slot lists (S1 not a multiple of the tile), and the
    split-K path cuts across them too."""
    cfg = CFGS[cfg_name]
    g = torch.Generator().manual_seed(S1 * 1000 + S2)
    T, H, d = 3, cfg.num_attention_heads, cfg.head_dim
    (rec1, kv1), (rec2, kv2) = _cache(cfg, 200, g), _cache(cfg, 90, g)
    q, sink = torch.randn(T, H, d, generator=g) * 2.0, torch.randn(H, generator=g)
    idx1, idx2 = _slots(T, S1, 200, g), _slots(T, S2, 90, g)
    src1, src2 = (rec1, rec2) if fp8 else (kv1, kv2)
    out = sparse_attention(q, src1, idx1, sink, d**-0.5, kv2=src2, indices2=idx2, rope_dim=cfg.qk_rope_head_dim,
                           num_splits=splits)
    decode = (lambda rows: unpack_main(rows.flatten(0, -2), cfg).unflatten(0, rows.shape[:-1])) if fp8 else None
    ref = attention_over_slots(q, [(src1, idx1), (src2, idx2)], sink, d**-0.5, decode)
    _check(out, ref)
    together = core_sparse_attention(q, torch.cat((kv1, kv2)), torch.cat((idx1, torch.where(idx2 >= 0, idx2 + 200, -1)), 1),
                                     sink, d**-0.5)
    assert_close(ref, together, atol=ATOL, rtol=RTOL)


def test_two_sources_refuse_a_mismatched_second_cache():
    cfg = CFGS["tiny-flash"]
    g = torch.Generator().manual_seed(0)
    (rec, kv) = _cache(cfg, 10, g)
    q, sink = torch.randn(2, cfg.num_attention_heads, cfg.head_dim), torch.zeros(cfg.num_attention_heads)
    with pytest.raises(ValueError, match="second source"):
        sparse_attention(q, rec, _slots(2, 3, 10, g), sink, 1.0, kv2=kv, indices2=_slots(2, 3, 10, g))
