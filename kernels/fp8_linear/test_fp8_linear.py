"""Block-scaled FP8 linear vs the core: `linear(x, dequantize_weight_fp8(w, s), quantize_input)`.

Tolerances:
* activation quantization (`act_quant`, `fake_quant_act`): bit-exact scales and e4m3 codes, also in
  the interpreter (the rounding is done in fp32 arithmetic, not by the interpreter's truncating cast);
* GEMM outputs, fp32 x: rtol 1e-5, atol 1e-5 * sum_k |x_k W_nk| (every product is exact; only the
  summation order differs), the same with quantize_input=True since the quantized activation is exact;
* bf16 x: within one bf16 step (rtol 2^-7, same atol) and at least 99 % bit-identical;
* W8A8 on sm_90 with fast accumulation (`K.FP8_FAST_ACCUM`, the default): the MMA keeps fewer bits
  within each 128-wide K step, so atol = 2^-9 * sum_k |x_k W_nk| (a bound chosen from the ~14 bits
  DeepSeek-V3 reports for H800 FP8 accumulation, not yet measured here) and no bit-identity check;
  `fast_accum=False` keeps the fp32 tolerances above. Elsewhere (interpreter, SM89) both modes are fp32.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from v4_kernels.fp8_linear import kernel as K  # noqa: E402
from v4_kernels.testing import DEVICE, ON_GPU, assert_close, dtype_id, gpu_only  # noqa: E402
from v4_kernels.testing import one_cpu_thread  # noqa: E402, F401  # autouse: importing it applies it here
from v4_plugin.checkpoint import quant  # noqa: E402
from v4_plugin.runtime.ops.linear import linear  # noqa: E402


FAST_ACCUM_HW = ON_GPU and torch.cuda.get_device_capability() == (9, 0)  # where fast accumulation is real


def _accum_tol(fp8_dot: bool, fast_accum: bool = K.FP8_FAST_ACCUM) -> float:
    """atol per unit of |x| @ |W|^T: 2^-9 for W8A8 with Hopper's fast accumulation, else 1e-5 (fp32)."""
    return 2**-9 if fp8_dot and fast_accum and FAST_ACCUM_HW else 1e-5


def _check(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, accum: float = 1e-5) -> None:
    """expected in x.dtype; magnitude = |x| @ |W|^T (the scale of the summation error); accum: `_accum_tol`."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol = 2**-7 if expected.dtype == torch.bfloat16 else 1e-5
    assert_close(actual, expected, rtol=rtol, atol=accum * magnitude.double())
    if expected.dtype == torch.bfloat16 and accum <= 1e-5:
        assert (actual != expected).float().mean() <= 0.01


def _weight(out_f: int, in_f: int, gen: torch.Generator):
    """Random FP8 weight whose 128x128 blocks have different scales (catches block-index mistakes)."""
    blocks = torch.randint(-3, 4, ((out_f + 127) // 128, (in_f + 127) // 128), generator=gen).float()
    mult = torch.exp2(blocks).repeat_interleave(128, 0).repeat_interleave(128, 1)[:out_f, :in_f]
    wq, ws = quant.quantize_weight_fp8(torch.randn(out_f, in_f, generator=gen) * 0.05 * mult)
    return wq.to(DEVICE), ws.to(DEVICE)


def _act(shape, dtype, gen):
    """Activations with a per-channel dynamic range of 1e-5 .. 1e2 (some e4m3 subnormals after scaling)."""
    ranges = torch.logspace(-5, 2, shape[-1])[torch.randperm(shape[-1], generator=gen)]
    return (torch.randn(*shape, generator=gen) * ranges).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_act_quant_bit_exact(dtype):
    gen = torch.Generator().manual_seed(1)
    x = _act((37, 300), dtype, gen)  # partial last block of 44 channels
    x[3] = 0  # amax floor 1e-4
    x[5, :128] = -x[5, :128].abs()  # negative values that round to -0
    q, s = K.act_quant(x)
    q_ref, s_ref = quant.quantize_fp8(x, 128)
    assert s.dtype == torch.float32 and torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(K.fake_quant_act(x), quant.fake_quant_fp8(x, 128))


def test_act_quant_rounding_ties_and_saturation():
    """Values exactly half-way between e4m3 neighbours (ties to even), on the 448 limit, and in the subnormals."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()  # 0 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    row = torch.cat((mids, -mids, torch.tensor([448.0, -448.0])))
    x = torch.zeros(2, 384)
    x[0, : row.numel()] = row  # amax 448: scale 1, so the values are rounded as they are
    x[1, :128] = torch.linspace(-1e-3, 1e-3, 128)
    q, s = K.act_quant(x.to(DEVICE))
    q_ref, s_ref = quant.quantize_fp8(x, 128)
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8))


SHAPES = [(1, 96, 96), (3, 200, 300), (17, 256, 384), (127, 200, 96)]  # (M, out, in): partial 128 blocks


@pytest.mark.parametrize("m,out_f,in_f", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("mode", ["w8a16", "w8a8", "w8a8_emulated"])
def test_fp8_linear(m, out_f, in_f, dtype, mode):
    gen = torch.Generator().manual_seed(m * 1000 + out_f + in_f)
    wq, ws = _weight(out_f, in_f, gen)
    w = quant.dequantize_weight_fp8(wq, ws)
    x = _act((m, in_f), dtype, gen)
    quantize_input = mode != "w8a16"
    y = K.fp8_linear(x, wq, ws, quantize_input, fp8_dot=mode == "w8a8")
    _check(y, linear(x, w, quantize_input), x.float().abs() @ w.abs().T, _accum_tol(mode == "w8a8"))


def test_fp8_linear_batched_input_and_fp32_scales():
    """x [..., in] keeps its leading dims; fp32 block scales (the "-Base" checkpoints) work like E8M0."""
    gen = torch.Generator().manual_seed(9)
    wq, ws = _weight(200, 300, gen)
    w = quant.dequantize_weight_fp8(wq, ws)
    x = _act((2, 3, 300), torch.float32, gen)
    for scale in (ws, quant.e8m0_to_float(ws)):
        for quantize_input in (False, True):
            y = K.fp8_linear(x, wq, scale, quantize_input)
            assert y.shape == (2, 3, 200)
            fp8_dot = quantize_input and K.fp8_dot_supported(x.device)
            _check(y, linear(x, w, quantize_input), x.abs() @ w.abs().T, _accum_tol(fp8_dot))


def test_small_k_tiles(monkeypatch):
    """GPU-sized tiles in the interpreter: 64-wide K steps (two per scale block), 64-wide N tiles across blocks."""
    small = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4)
    monkeypatch.setattr(K, "_tiles", lambda kind, m, n, k, gpu=None: small if kind != "act_quant" else
                        dict(BLOCK_M=8, num_warps=4))
    gen = torch.Generator().manual_seed(4)
    wq, ws = _weight(200, 300, gen)
    w = quant.dequantize_weight_fp8(wq, ws)
    x = _act((20, 300), torch.float32, gen)
    _check(K.fp8_linear(x, wq, ws, False), linear(x, w, False), x.abs() @ w.abs().T)
    _check(K.fp8_linear(x, wq, ws, True, fp8_dot=True), linear(x, w, True), x.abs() @ w.abs().T, _accum_tol(True))


def test_fp16_activations():
    gen = torch.Generator().manual_seed(10)
    wq, ws = _weight(96, 256, gen)
    w = quant.dequantize_weight_fp8(wq, ws)
    x = (torch.randn(5, 256, generator=gen)).half().to(DEVICE)
    for quantize_input in (False, True):
        y = K.fp8_linear(x, wq, ws, quantize_input, fp8_dot=False)
        expected = linear(x, w, quantize_input)
        assert y.dtype == torch.float16
        assert_close(y, expected, rtol=2**-10, atol=1e-5 * (x.float().abs() @ w.abs().T).double())


def test_e4m3_decode_all_bytes():
    """The SM80 weight decode (e4m3 bits -> fp16 * 2^-8) is exact for every finite byte."""
    b = torch.arange(256, dtype=torch.uint8)
    b[(b & 0x7F) == 0x7F] = 0  # the two NaN codes
    w = b.view(torch.float8_e4m3fn).reshape(2, 128)
    ws = torch.full((1, 1), 127, dtype=torch.uint8)  # scale 1
    x = torch.eye(128)
    y = K.fp8_linear(x.to(DEVICE), w.to(DEVICE), ws.to(DEVICE), False, fp8_dot=False)
    assert torch.equal(y.cpu(), w.float().T.contiguous())


@pytest.mark.parametrize("fast_accum", [True, False], ids=["fast-accum", "fp32-accum"])
@pytest.mark.parametrize("m", [1, 200])
def test_w8a8_accumulation_modes(m, fast_accum):
    """W8A8 over K = 7168 (56 scale blocks) in both accumulation modes, fp32 out: each within its stated
    tolerance (module docstring) of the exact product of the quantized operands."""
    gen = torch.Generator().manual_seed(m)
    wq, ws = _weight(256, 7168 if ON_GPU else 1024, gen)
    w = quant.dequantize_weight_fp8(wq, ws)
    x = _act((m, w.shape[1]), torch.float32, gen)
    y = K.fp8_linear(x, wq, ws, True, fp8_dot=True, fast_accum=fast_accum)
    _check(y, linear(x, w, True), x.abs() @ w.abs().T, _accum_tol(True, fast_accum))


@gpu_only
@pytest.mark.parametrize("m", [1, 16, 128, 1024])
@pytest.mark.parametrize("out_f,in_f", [(4096, 7168), (7168, 2048), (1536, 7168)])
@pytest.mark.parametrize("quantize_input", [False, True])
def test_gpu_real_shapes_bf16(m, out_f, in_f, quantize_input):
    gen = torch.Generator().manual_seed(m + out_f)
    wq, ws = _weight(out_f, in_f, gen)
    w = quant.dequantize_weight_fp8(wq, ws)
    x = _act((m, in_f), torch.bfloat16, gen)
    y = K.fp8_linear(x, wq, ws, quantize_input)
    accum = _accum_tol(quantize_input and K.fp8_dot_supported(y.device))
    assert_close(y, linear(x, w, quantize_input), rtol=2**-7, atol=accum * (x.float().abs() @ w.abs().T).double())
