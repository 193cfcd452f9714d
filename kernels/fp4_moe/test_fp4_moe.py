"""Grouped FP4-expert MoE vs the core `moe(...)` over the dequantized experts.

The experts' FP4 values and E8M0 scales decode exactly, every product is exact in fp32, and the
kernel rounds where the core does (gate/up/expert outputs to x.dtype, h to x.dtype before w2), so
the only differences are summation order:
* fp32 x: rtol 1e-5, atol 1e-5 * max |reference|;
* bf16 x: within one bf16 step (rtol 2^-7, same atol) and at least 97 % bit-identical (an fp32
  difference in the last bit can flip a bf16 rounding of gate, up or h, and that spreads).
quantize_input=False is the W4A16 semantics the kernel is for; quantize_input=True (the reference's
FP8 activations, rounded in registers) is checked with the same tolerances, except that on sm_90 the
shared expert then runs W8A8 with fast accumulation (atol 2^-9 * max |reference|, as
kernels/fp8_linear/test_fp8_linear.py states). FP8 routed experts (`-Base` checkpoints, W8A16) decode
exactly too (E8M0 scales; fp32 scales are rounded to x.dtype with the value, as the core's dequantize
does): same tolerances.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from v4_kernels.fp4_moe import kernel as K  # noqa: E402
from v4_kernels.testing import DEVICE, ON_GPU, assert_close, dtype_id, gpu_only  # noqa: E402
from v4_kernels.testing import one_cpu_thread  # noqa: E402, F401  # autouse: importing it applies it here
from v4_plugin.checkpoint import quant  # noqa: E402
from v4_plugin.runtime.ops.moe import ExpertWeights, moe, route  # noqa: E402


def _fp4(out_f: int, in_f: int, gen: torch.Generator, std: float):
    """Packed FP4 weight with scales varying per 32-group (catches group-index mistakes)."""
    groups = torch.exp2(torch.randint(-2, 3, (out_f, in_f // 32), generator=gen).float()).repeat_interleave(32, 1)
    return quant.quantize_weight_fp4(torch.randn(out_f, in_f, generator=gen) * std * groups)


def _fp8(out_f: int, in_f: int, gen: torch.Generator, std: float):
    return quant.quantize_weight_fp8(torch.randn(out_f, in_f, generator=gen) * std)


def _model(d: int, inter: int, n_experts: int, gen: torch.Generator):
    """(FP4Experts, FP8Expert, dequantized experts, dequantized shared); gate/up reach past the clamp at 10."""
    std1, std2 = 3.0 / d**0.5, 1.0 / inter**0.5
    raw = [(*_fp4(inter, d, gen, std1), *_fp4(d, inter, gen, std2), *_fp4(inter, d, gen, std1))
           for _ in range(n_experts)]
    deq = [ExpertWeights(*(quant.dequantize_weight_fp4(e[i], e[i + 1]) for i in (0, 2, 4))) for e in raw]
    sh = [_fp8(inter, d, gen, std1), _fp8(d, inter, gen, std2), _fp8(inter, d, gen, std1)]
    shared = K.FP8Expert(*(t.to(DEVICE) for pair in sh for t in pair))
    shared_deq = ExpertWeights(*(quant.dequantize_weight_fp8(*pair) for pair in sh))
    experts = K.FP4Experts.stack([tuple(t.to(DEVICE) for t in e) for e in raw])
    return experts, shared, deq, shared_deq


def _model_fp8(d: int, inter: int, n_experts: int, gen: torch.Generator, fp32_scales: bool = False):
    """As `_model` with FP8 routed experts (`-Base`): (FP8Experts, FP8Expert, dequantized, dequantized shared)."""
    std1, std2 = 3.0 / d**0.5, 1.0 / inter**0.5
    raw = [(*_fp8(inter, d, gen, std1), *_fp8(d, inter, gen, std2), *_fp8(inter, d, gen, std1))
           for _ in range(n_experts)]
    if fp32_scales:
        raw = [tuple(quant.e8m0_to_float(t) * 1.25 if i % 2 else t for i, t in enumerate(e)) for e in raw]
    deq = [ExpertWeights(*(quant.dequantize_weight_fp8(e[i], e[i + 1]) for i in (0, 2, 4))) for e in raw]
    _, shared, _, shared_deq = _model(d, inter, 1, gen)
    return K.FP8Experts.stack([tuple(t.to(DEVICE) for t in e) for e in raw]), shared, deq, shared_deq


FAST_ACCUM_HW = ON_GPU and torch.cuda.get_device_capability() == (9, 0)


def _check(actual: torch.Tensor, expected: torch.Tensor, w8a8_shared: bool = False) -> None:
    """w8a8_shared: quantize_input=True, whose shared expert runs W8A8 (fast accumulation on sm_90)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol = 2**-7 if expected.dtype == torch.bfloat16 else 1e-5
    accum = 2**-9 if w8a8_shared and FAST_ACCUM_HW else 1e-5
    assert_close(actual, expected, rtol=rtol, atol=accum * expected.double().abs().max().item())
    if expected.dtype == torch.bfloat16 and accum <= 1e-5:
        assert (actual != expected).float().mean() <= 0.03


TINY = dict(d=128, inter=96, n_experts=8, top_k=2)  # tiny preset: partial 128 block along I
WIDE = dict(d=128, inter=96, n_experts=16, top_k=6)


CASES = [(1, TINY, torch.float32), (3, TINY, torch.float32), (17, TINY, torch.float32), (1, TINY, torch.bfloat16),
         (17, TINY, torch.bfloat16), (3, WIDE, torch.float32), (17, WIDE, torch.bfloat16)]


def _id(v):
    return f"e{v['n_experts']}k{v['top_k']}" if isinstance(v, dict) else dtype_id(v)


@pytest.mark.parametrize("t,dims,dtype", CASES, ids=_id)
def test_fp4_moe_w4a16(t, dims, dtype):
    gen = torch.Generator().manual_seed(t * 100 + dims["n_experts"])
    experts, shared, deq, shared_deq = _model(dims["d"], dims["inter"], dims["n_experts"], gen)
    x = torch.randn(t, dims["d"], generator=gen).to(dtype)
    weights, ids = route(x, torch.randn(dims["n_experts"], dims["d"], generator=gen), top_k=dims["top_k"],
                         scaling=1.5, bias=torch.zeros(dims["n_experts"]))
    if t == 17:  # leave some experts without tokens while others get many
        ids = torch.stack([torch.randperm(dims["top_k"] + 1, generator=gen)[: dims["top_k"]] for _ in range(t)]) * 2
    assert ids.unique().numel() < dims["n_experts"]
    y = K.fp4_moe(x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE), experts, shared, limit=10.0)
    _check(y.cpu(), moe(x, weights, ids, deq, shared_deq, limit=10.0, quantize_input=False))


@pytest.mark.parametrize("t,dtype", [(3, torch.float32), (17, torch.bfloat16)], ids=_id)
def test_fp4_moe_fp8_activations(t, dtype):
    """quantize_input=True: x and h rounded through FP8 per 128 channels, as the reference GEMMs do."""
    gen = torch.Generator().manual_seed(77 + t)
    experts, shared, deq, shared_deq = _model(128, 96, 8, gen)
    x = torch.randn(t, 128, generator=gen).to(dtype)
    weights, ids = route(x, torch.randn(8, 128, generator=gen), top_k=2, scaling=1.5, bias=torch.zeros(8))
    y = K.fp4_moe(x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE), experts, shared, limit=10.0, quantize_input=True)
    _check(y.cpu(), moe(x, weights, ids, deq, shared_deq, limit=10.0, quantize_input=True), w8a8_shared=True)


@pytest.mark.parametrize("t,dtype,quantize_input,fp32_scales", [
    (3, torch.float32, False, False), (17, torch.bfloat16, False, False), (5, torch.float32, True, False),
    (4, torch.float32, False, True)], ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else None)
def test_fp8_experts(t, dtype, quantize_input, fp32_scales):
    """FP8 routed experts (`-Base`), W8A16; a partial 128 block along I; E8M0 or fp32 block scales."""
    gen = torch.Generator().manual_seed(31 + t)
    experts, shared, deq, shared_deq = _model_fp8(128, 96, 8, gen, fp32_scales)
    x = torch.randn(t, 128, generator=gen).to(dtype)
    weights, ids = route(x, torch.randn(8, 128, generator=gen), top_k=2, scaling=1.5, bias=torch.zeros(8))
    y = K.fp4_moe(x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE), experts, shared, limit=10.0,
                  quantize_input=quantize_input)
    _check(y.cpu(), moe(x, weights, ids, deq, shared_deq, limit=10.0, quantize_input=quantize_input),
           w8a8_shared=quantize_input)


def test_rejects_mismatched_experts():
    gen = torch.Generator().manual_seed(3)
    experts, shared, _, _ = _model_fp8(128, 96, 2, gen)
    bad = K.FP8Experts(experts.w1, experts.w1_scale[:, :, :0], experts.w2, experts.w2_scale, experts.w3,
                       experts.w3_scale)
    x, weights, ids = torch.zeros(1, 128), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="FP8Experts"):
        K.fp4_moe(x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE), bad, shared, limit=10.0)


def test_no_clamp_and_no_shared():
    """limit 0 disables the clamps (core: `if limit > 0`); shared=None is the routed sum alone."""
    gen = torch.Generator().manual_seed(5)
    experts, _, deq, _ = _model(128, 96, 8, gen)
    x = torch.randn(5, 128, generator=gen)
    weights, ids = route(x, torch.randn(8, 128, generator=gen), top_k=2, scaling=1.5, bias=torch.zeros(8))
    zero = ExpertWeights(torch.zeros(96, 128), torch.zeros(128, 96), torch.zeros(96, 128))
    y = K.fp4_moe(x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE), experts, None, limit=0.0)
    _check(y.cpu(), moe(x, weights, ids, deq, zero, limit=0.0, quantize_input=False))


def test_expert_parallel_rank():
    """A rank holding experts 4 ... 7 (ids shifted by its first expert; the others' ids fall outside its
    stack) computes the core's `moe(..., first=4)`: its experts' share plus the shared expert."""
    gen = torch.Generator().manual_seed(6)
    experts, shared, deq, shared_deq = _model(128, 96, 8, gen)
    held = K.FP4Experts(*(t[4:] for t in (experts.w1, experts.w1_scale, experts.w2, experts.w2_scale,
                                          experts.w3, experts.w3_scale)))
    x = torch.randn(7, 128, generator=gen)
    weights, ids = route(x, torch.randn(8, 128, generator=gen), top_k=2, scaling=1.5, bias=torch.zeros(8))
    assert (ids < 4).any() and (ids >= 4).any()
    y = K.fp4_moe(x.to(DEVICE), weights.to(DEVICE), (ids - 4).to(DEVICE), held, shared, limit=10.0)
    _check(y.cpu(), moe(x, weights, ids, deq[4:], shared_deq, limit=10.0, quantize_input=False, first=4))


def test_gpu_tiles_in_interpreter(monkeypatch):
    """GPU tiles on bigger dims: several I tiles (64), two K steps per GEMM, a partial last I block."""
    real_tiles = K._tiles
    monkeypatch.setattr(K, "_tiles", lambda *a, gpu=None, **kw: real_tiles(*a, gpu=True, **kw))
    gen = torch.Generator().manual_seed(8)
    experts, shared, deq, shared_deq = _model(256, 160, 4, gen)
    x = torch.randn(9, 256, generator=gen)
    weights, ids = route(x, torch.randn(4, 256, generator=gen), top_k=2, scaling=1.5, bias=torch.zeros(4))
    y = K.fp4_moe(x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE), experts, shared, limit=10.0)
    _check(y.cpu(), moe(x, weights, ids, deq, shared_deq, limit=10.0, quantize_input=False))


@triton.jit
def _decode_fp4(codes_ptr, scales_ptr, out_ptr):
    offs = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
    tl.store(out_ptr + offs, K.e2m1_to_f32(tl.load(codes_ptr + offs), tl.load(scales_ptr + offs)))


def test_e2m1_decode():
    """In-kernel decode == e2m1 table x 2^(s - 127) for all 16 codes over scale bytes 2 .. 250."""
    codes = torch.arange(16, dtype=torch.int32).repeat(16)
    scales = torch.linspace(2, 250, 16).round().to(torch.int32).repeat_interleave(16)
    out = torch.empty(256, device=DEVICE)
    _decode_fp4[(1,)](codes.to(DEVICE), scales.to(DEVICE), out)
    expected = quant.e2m1_decode(codes) * quant.e8m0_to_float(scales.to(torch.uint8))
    assert torch.equal(out.cpu(), expected)


def test_align_layout():
    """Every (token, slot) pair lands in exactly one block of its expert; idle blocks are marked -1."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 6, (23, 3), generator=gen)
    ids[:, 1] = (ids[:, 0] + 1) % 6
    ids[:, 2] = (ids[:, 0] + 2) % 6
    slots, block_expert = K._align(ids, 10, 16)
    n_slots = ids.numel()
    real = slots[slots < n_slots].long()
    assert torch.equal(real.sort().values, torch.arange(n_slots))
    owner = block_expert.long().repeat_interleave(16)
    assert torch.equal(owner[slots < n_slots], ids.reshape(-1)[real])
    assert (block_expert[block_expert >= 0].diff() >= 0).all()
    # ids of another rank's experts (outside 0 ... 9) land in idle blocks only
    other = torch.where(ids % 2 == 0, ids, ids + 20)
    slots, block_expert = K._align(other, 10, 16)
    owner = block_expert.long().repeat_interleave(16)
    placed = slots < n_slots
    assert torch.equal(owner[placed & (owner >= 0)], other.reshape(-1)[slots[placed & (owner >= 0)].long()])
    assert sorted(slots[placed & (owner >= 0)].tolist()) == torch.nonzero(other.reshape(-1) < 10).flatten().tolist()


@gpu_only
@pytest.mark.parametrize("t", [1, 16, 128])
@pytest.mark.parametrize("preset,experts_fmt", [("flash", "fp4"), ("pro", "fp4"), ("flash", "fp8")])
def test_gpu_real_shapes_bf16(t, preset, experts_fmt):
    """Real expert dims (Flash 4096/2048, Pro 7168/3072), 16 experts so the CPU reference stays small; FP8
    experts (Flash-Base) at Flash dims."""
    d, inter = (4096, 2048) if preset == "flash" else (7168, 3072)
    gen = torch.Generator().manual_seed(t)
    experts, shared, deq, shared_deq = (_model if experts_fmt == "fp4" else _model_fp8)(d, inter, 16, gen)
    x = torch.randn(t, d, generator=gen).to(torch.bfloat16)
    weights, ids = route(x, torch.randn(16, d, generator=gen), top_k=6, scaling=1.5, bias=torch.zeros(16))
    y = K.fp4_moe(x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE), experts, shared, limit=10.0)
    expected = moe(x, weights, ids, deq, shared_deq, limit=10.0, quantize_input=False)
    assert_close(y.cpu(), expected, rtol=2**-6, atol=1e-3 * expected.double().abs().max())
