"""Fused mHC kernels vs the core (`v4_plugin.runtime.ops.mhc`) on fresh random inputs.

Tolerances: fp32 streams: rtol = atol = 1e-5 on u, X', post and comb (the kernels differ from the core
only in summation order; observed errors are a few 1e-7 to 5e-6). bf16 streams: u and X' within one
bf16 step of the core (rtol 2^-7, atol 1e-5 for results that cancel) and fewer than 1 % of them not
bit-identical (an fp32 difference of one ulp can land on the other side of a rounding boundary);
post and comb stay fp32 (1e-5).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

import pytest  # noqa: E402

from v4_kernels.mhc import kernel as K  # noqa: E402
from v4_kernels.testing import DEVICE, assert_close, dtype_id  # noqa: E402
from v4_kernels.testing import one_cpu_thread  # noqa: E402, F401  # autouse: importing it applies it here
from v4_plugin.runtime.ops import mhc as ref  # noqa: E402

HC = 4
EPS = dict(norm_eps=1e-6, hc_eps=1e-6)
PRE = dict(EPS, sinkhorn_iters=20)
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def _params(d: int, gen: torch.Generator, rows: int = (2 + HC) * HC):
    """fn scaled so the mixes are O(1): the sigmoids and the Sinkhorn see realistic logits."""
    fn = torch.randn(rows, HC * d, generator=gen) / (HC * d) ** 0.5
    scale = torch.rand(3, generator=gen) + 0.5
    base = torch.randn(rows, generator=gen) * 0.5
    return fn.to(DEVICE), scale.to(DEVICE), base.to(DEVICE)


def _streams(t: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(t, HC, d, generator=gen) * 2).to(dtype).to(DEVICE)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if expected.dtype == torch.bfloat16:
        assert_close(actual, expected, rtol=2**-7, atol=1e-5)
        assert (actual != expected).float().mean() < 0.01  # almost all bit-identical
    else:
        assert_close(actual, expected, **FP32_TOL)


def _post_comb(t: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    post = 2 * torch.rand(t, HC, generator=gen)
    comb = torch.softmax(torch.randn(t, HC, HC, generator=gen), -1)  # not symmetric: direction matters
    return post.to(DEVICE), comb.to(DEVICE)


CASES = [(t, d, torch.float32) for d in (128, 4096) for t in (1, 3, 5, 127)] + [(5, 7168, torch.bfloat16)]


@pytest.mark.parametrize("t,d,dtype", CASES, ids=dtype_id)
def test_hc_pre(t, d, dtype):
    gen = torch.Generator().manual_seed(1000 * t + d)
    x = _streams(t, d, dtype, gen)
    fn, scale, base = _params(d, gen)
    u, post, comb = K.hc_pre(x, fn, scale, base, **PRE)
    u_ref, post_ref, comb_ref = ref.hc_pre(x, fn, scale, base, **PRE)
    assert u.dtype == dtype and post.dtype == comb.dtype == torch.float32
    _close(u, u_ref)
    assert_close(post, post_ref, **FP32_TOL)
    assert_close(comb, comb_ref, **FP32_TOL)


@pytest.mark.parametrize("t,d,dtype", CASES, ids=dtype_id)
def test_hc_post(t, d, dtype):
    gen = torch.Generator().manual_seed(7 + 1000 * t + d)
    x = _streams(t, d, dtype, gen)
    y = torch.randn(t, d, generator=gen).to(dtype).to(DEVICE)
    post, comb = _post_comb(t, gen)
    out = K.hc_post(y, x, post, comb)
    assert out.dtype == dtype and out.shape == x.shape
    _close(out, ref.hc_post(y, x, post, comb))


@pytest.mark.parametrize("t,d,dtype", [(1, 128, torch.float32), (5, 4096, torch.float32), (127, 128, torch.float32),
                                       (3, 7168, torch.bfloat16)], ids=dtype_id)
def test_hc_post_pre_fused(t, d, dtype):
    """Fused hc_post + next hc_pre == hc_post, then hc_pre of the streams the kernel stored."""
    gen = torch.Generator().manual_seed(11 + t + d)
    x = _streams(t, d, dtype, gen)
    y = torch.randn(t, d, generator=gen).to(dtype).to(DEVICE)
    post, comb = _post_comb(t, gen)
    fn, scale, base = _params(d, gen)
    x2, u, post2, comb2 = K.hc_post_pre(y, x, post, comb, fn, scale, base, **PRE)
    _close(x2, ref.hc_post(y, x, post, comb))
    u_ref, post_ref, comb_ref = ref.hc_pre(x2, fn, scale, base, **PRE)
    _close(u, u_ref)
    assert_close(post2, post_ref, **FP32_TOL)
    assert_close(comb2, comb_ref, **FP32_TOL)


@pytest.mark.parametrize("t,d,dtype", [(1, 128, torch.float32), (127, 4096, torch.float32), (3, 7168, torch.bfloat16)],
                         ids=dtype_id)
def test_hc_head(t, d, dtype):
    gen = torch.Generator().manual_seed(23 + t + d)
    x = _streams(t, d, dtype, gen)
    fn, scale, base = _params(d, gen, rows=HC)
    _close(K.hc_head(x, fn, scale[:1], base, **EPS), ref.hc_head(x, fn, scale[:1], base, **EPS))


def test_gpu_tiles_in_interpreter(monkeypatch):
    """The GPU tile choice (split-K mix, 4-token finish blocks, 64-wide fused post blocks) on partial tiles."""
    real_tiles = K._tiles
    monkeypatch.setattr(K, "_tiles", lambda kind, t, k, d, gpu=None: real_tiles(kind, t, k, d, gpu=True))
    assert K._tiles("mix", 5, HC * 320, 320)["SPLIT"] > 1
    gen = torch.Generator().manual_seed(5)
    t, d = 5, 320
    x = _streams(t, d, torch.float32, gen)
    fn, scale, base = _params(d, gen)
    for got, want in zip(K.hc_pre(x, fn, scale, base, **PRE), ref.hc_pre(x, fn, scale, base, **PRE)):
        assert_close(got, want, **FP32_TOL)
    y = torch.randn(t, d, generator=gen).to(DEVICE)
    post, comb = _post_comb(t, gen)
    x2, u, post2, comb2 = K.hc_post_pre(y, x, post, comb, fn, scale, base, **PRE)
    assert_close(x2, ref.hc_post(y, x, post, comb), **FP32_TOL)
    for got, want in zip((u, post2, comb2), ref.hc_pre(x2, fn, scale, base, **PRE)):
        assert_close(got, want, **FP32_TOL)


def test_non_contiguous_token_stride():
    gen = torch.Generator().manual_seed(3)
    big = _streams(6, 128, torch.float32, gen)
    x = big[::2]  # token stride 2 * hc * D, inner [hc, D] contiguous
    fn, scale, base = _params(128, gen)
    for got, want in zip(K.hc_pre(x, fn, scale, base, **PRE), ref.hc_pre(x, fn, scale, base, **PRE)):
        assert_close(got, want, **FP32_TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels, real shapes)")
@pytest.mark.parametrize("t", [1, 64, 1024])
@pytest.mark.parametrize("d", [4096, 7168])
def test_gpu_real_shapes_bf16(t, d):
    gen = torch.Generator().manual_seed(t + d)
    x = _streams(t, d, torch.bfloat16, gen)
    fn, scale, base = _params(d, gen)
    u, post, comb = K.hc_pre(x, fn, scale, base, **PRE)
    u_ref, post_ref, comb_ref = ref.hc_pre(x, fn, scale, base, **PRE)
    assert_close(u.float(), u_ref.float(), rtol=2**-7, atol=1e-3)  # tf32x3 dot: ~fp32, not bitwise
    assert_close(post, post_ref, rtol=1e-4, atol=1e-4)
    assert_close(comb, comb_ref, rtol=1e-4, atol=1e-4)
    y = torch.randn(t, d, generator=gen).to(torch.bfloat16).to(DEVICE)
    x2, u2, _, _ = K.hc_post_pre(y, x, post, comb, fn, scale, base, **PRE)
    assert_close(x2.float(), ref.hc_post(y, x, post, comb).float(), rtol=2**-7, atol=1e-3)
