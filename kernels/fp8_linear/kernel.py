"""Block-scaled FP8 linear layers (spec §8, §9.1).

References (the core functions these wrappers replace):

* `fp8_linear(x, weight, scale, quantize_input)` -> `v4_plugin.runtime.ops.linear.linear(x, W, quantize_input)`
  with W = `v4_plugin.checkpoint.quant.dequantize_weight_fp8(weight, scale)`: the weight stays in its
  checkpoint format (e4m3 [out, in] + E8M0 [ceil(out/128), ceil(in/128)], partial edge blocks
  allowed) and is never dequantized in memory. Returns x.dtype, like the core.
* `act_quant(x)` -> `v4_plugin.checkpoint.quant.quantize_fp8(x, 128)`: e4m3 per token per 128 channels with
  the power-of-two scale 2^ceil(log2(amax / 448)), amax >= 1e-4.
* `fake_quant_act(x)` -> `v4_plugin.checkpoint.quant.fake_quant_fp8(x, 128)`.

Two GEMMs:

* W8A8 (`_w8a8_kernel`, GPUs with FP8 tensor cores, SM89+): the activation is quantized by
  `_act_quant_kernel`, then each 128-wide K step is one FP8 `tl.dot` scaled by the activation scale
  of the row and the weight block scale of the column, and added to an fp32 accumulator.
  Accumulation mode (`FP8_FAST_ACCUM`, on by default): Hopper's FP8 MMA may accumulate with fewer
  than fp32's bits ("fast accumulation", Triton's default on sm_90). Each K step is its own dot of
  128 products whose result is promoted to the fp32 accumulator, so the reduced precision spans at
  most 128 products (the DeepSeek-V3 / DeepGEMM recipe); `fast_accum=False` asks for full fp32
  accumulation inside the MMA (max_num_imprecise_acc = 0). SM89 and the interpreter accumulate in
  fp32 either way. Tolerances: kernels/fp8_linear/test_fp8_linear.py.
* W8A16 (`_w8a16_kernel`, any GPU, SM80 included): the weight tile is loaded as bytes and decoded
  to 16-bit floats in registers (e4m3 bits shifted into an fp16, exact), multiplied in bf16/fp16
  (fp32 activations: fp32) with fp32 accumulation, and the block scale is applied to the partial
  product. `quantize_input=True` without FP8 tensor cores runs the same activation rounding first
  (`fake_quant_act`, exact in bf16) and then W8A16, which is the W8A8 result up to summation order.

Per arch: `act_quant` writes its e4m3 codes from their bits into bytes (SM80 cannot compile an FP8
store); W8A8 needs FP8 tensor cores (SM89+, `fp8_dot_supported`); SM80 takes W8A16 throughout.

Exactness: every product of the reference GEMM is exact in fp32 here as well, so results differ
only by summation order. The activation quantization is bit-exact (scales and codes): the scale is
built from the exponent bits of amax and the e4m3 rounding (nearest, ties to even) is done in fp32
arithmetic, which also sidesteps the interpreter's round-toward-zero fp8 cast. Stores to bf16 are
rounded to nearest even in fp32 first for the same reason (`round_to`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from v4_kernels.formats import e4m3_code, e8m0_value, round_bf16

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ACT_BLOCK = 128  # activation quantization block along K; also the weight scale block
WEIGHT_BLOCK = 128
FP8_FAST_ACCUM = True  # W8A8 default: fast accumulation within each 128-wide K step (see above)

_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


# ---- number-format helpers (also used by the FP4 MoE kernels) ---------------------------------
@triton.jit
def e4m3_scale(amax):
    """2^ceil(log2(amax / 448)) for fp32 amax >= 1e-4, bit-exact with the fp32 division torch does.

    amax = 1.f * 2^e, so amax / 448 = (1.f / 1.75) * 2^(e - 8) with 1.f / 1.75 in (0.57, 1.15): the
    ceiling is 2^(e - 8) when 1.f <= 1.75 (fraction bits <= 0x600000), else 2^(e - 7). fp32 rounding of
    the quotient cannot cross a power of two here, so this equals pow2_ceil(amax / 448) exactly.
    """
    bits = amax.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    return (exponent << 23).to(tl.float32, bitcast=True)


@triton.jit
def round_e4m3(v):
    """fp32 values with |v| <= 448 -> the nearest float8 e4m3fn value (ties to even), as fp32.

    The e4m3 grid step in the binade of v is 2^(e - 3) (e = exponent of |v|, at least -6, the subnormal
    step being 2^-9); v / step is rounded to an integer with the 1.5 * 2^23 trick, exact for |v / step| < 16.
    """
    e = tl.maximum((v.to(tl.int32, bitcast=True) >> 23) & 0xFF, 127 - 6)
    step = ((e - 3) << 23).to(tl.float32, bitcast=True)
    inv_step = ((254 - (e - 3)) << 23).to(tl.float32, bitcast=True)
    r = ((v * inv_step + 12582912.0) - 12582912.0) * step
    sign = (v.to(tl.int32, bitcast=True) >> 31) << 31  # keep the sign of values that round to zero
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def round_to(v, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Round fp32 v to DTYPE's grid (nearest even), result still fp32: what a store to DTYPE keeps.

    On GPU the cast does it. The interpreter truncates fp32 -> bf16, so there the rounding is done on
    the bits (NaN/inf not expected).
    """
    if DTYPE == tl.float32:
        return v
    elif DTYPE == tl.bfloat16 and INTERPRET:
        return round_bf16(v)
    else:
        return v.to(DTYPE).to(tl.float32)


@triton.jit
def quant_rows_e4m3(x):
    """fp32 tile [R, C] -> (e4m3 values as fp32 [R, C], pow2 scales [R]) with one scale per row:
    scale = 2^ceil(log2(max(amax, 1e-4) / 448)), values = e4m3(x / scale); as `quant.quantize_fp8` on
    a 128-wide block."""
    scale = e4m3_scale(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4))
    inv_scale = ((254 - ((scale.to(tl.int32, bitcast=True) >> 23) & 0xFF)) << 23).to(tl.float32, bitcast=True)
    return round_e4m3(tl.minimum(tl.maximum(x * inv_scale[:, None], -448.0), 448.0)), scale


@triton.jit
def store_rounded(ptrs, v, mask, INTERPRET: tl.constexpr):
    """Store fp32 v at ptrs in their dtype, rounded to nearest even also in the interpreter (`round_to`)."""
    ty = ptrs.dtype.element_ty
    tl.store(ptrs, round_to(v, ty, INTERPRET).to(ty), mask=mask)


@triton.jit
def e4m3_bits_to_f16(byte):
    """float8 e4m3fn bytes -> fp16 holding value * 2^-8, exactly (subnormals included).

    The 7 exponent/mantissa bits go to the low end of an fp16's exponent field and the top of its
    mantissa: the fp16 has exponent bias 15 against e4m3's 7, so it reads 2^-8 times the e4m3 value
    (subnormals map to subnormals). Needs no FP8 support (SM80).
    """
    b = byte.to(tl.int32) & 0xFF
    h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    return h.to(tl.int16).to(tl.float16, bitcast=True)


# ---- tile sizes: the one place that picks them ------------------------------------------------
def _tiles(kind: str, m: int, n: int, k: int, gpu: bool | None = None) -> dict:
    """Fixed tiles for `kind` in {"act_quant", "w8a8", "w8a16"} (the GEMMs are autotuned on GPU instead).

    Interpreter: as large as the problem allows (each interpreted op costs about a millisecond).
    """
    if gpu is None:
        gpu = not _INTERPRET and torch.cuda.is_available()
    if kind == "act_quant":
        return dict(BLOCK_M=min(max(triton.next_power_of_2(m), 1), 64 if not gpu else 8), num_warps=4)
    if not gpu:
        return dict(BLOCK_M=min(max(triton.next_power_of_2(m), 16), 128),
                    BLOCK_N=min(max(triton.next_power_of_2(n), 16), 256), BLOCK_K=128, num_warps=4)
    if kind == "w8a8":
        return dict(BLOCK_M=64 if m > 32 else 16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64 if m > 32 else 16, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)


def _gpu_configs(kind: str) -> list[triton.Config]:
    configs = []
    for bm in (16, 32, 64, 128):
        for bn in (64, 128):
            for bk in ((128,) if kind == "w8a8" else (64, 128)):
                for stages in (3, 4):
                    configs.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                                                 num_warps=4 if bm <= 64 else 8, num_stages=stages))
    return configs


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Only the M tile that fits the batch bucket and the next smaller one: 4 (W8A8) / 8 (W8A16) configs
    for decode (M <= 16), 8 / 16 above, instead of all 16 / 32 (each new shape benchmarks them all)."""
    fit = min(max(named_args["M_BUCKET"], 16), 128)
    return [c for c in configs if c.kwargs["BLOCK_M"] in (fit, max(16, fit // 2))] or configs


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 4096)


# ---- kernels ----------------------------------------------------------------------------------
@triton.jit
def _mn_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows and columns of this program's output tile (grid axes 0 and 1) and their bounds masks."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _weight_scales(ws_ptr, offs_n, n_mask, kb, n_kb, SCALE_E8M0: tl.constexpr):
    """fp32 block scales ws[n // 128, kb] of the columns offs_n (E8M0 bytes decoded, or fp32 as stored)."""
    w_scale = tl.load(ws_ptr + (offs_n // 128) * n_kb + kb, mask=n_mask, other=0)
    return e8m0_value(w_scale) if SCALE_E8M0 else w_scale


@triton.jit
def _act_quant_kernel(
    x_ptr, out_ptr, scale_ptr, M, K, stride_xm, n_kb,
    DEQUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One [BLOCK_M, 128] block: amax per row -> pow2 scale -> e4m3 codes (or their dequantized values)."""
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    q, scale = quant_rows_e4m3(x)
    if DEQUANT:  # exact for bf16/fp32
        store_rounded(out_ptr + offs_m[:, None] * K + offs_k[None, :], q * scale[:, None], mask, INTERPRET)
    else:
        # codes built from the bits into a uint8 view: no fp8 store, which SM80 cannot compile
        tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], e4m3_code(q).to(tl.uint8), mask=mask)
        tl.store(scale_ptr + offs_m * n_kb + kb, scale, mask=offs_m < M)


@triton.jit
def _w8a8_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, n_kb, stride_ym, M_BUCKET,
    SCALE_E8M0: tl.constexpr, FAST_ACCUM: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = sum over K steps of (xq . wq^T) * xs[:, kb] * ws[n // 128, kb], kb = k // 128.

    FAST_ACCUM: the MMA may accumulate a K step's BLOCK_K products imprecisely (sm_90); else in fp32.

    xq [M, K] e4m3 with xs [M, n_kb] fp32; wq [N, K] e4m3 with ws E8M0 (or fp32) [ceil(N/128), n_kb].
    """
    tl.static_assert(128 % BLOCK_K == 0, "a K step must not straddle a 128-wide scale block")
    offs_m, offs_n, m_mask, n_mask = _mn_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        kb = k0 // 128
        a = tl.load(xq_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        a_scale = tl.load(xs_ptr + offs_m * n_kb + kb, mask=m_mask, other=0.0)
        w_scale = _weight_scales(ws_ptr, offs_n, n_mask, kb, n_kb, SCALE_E8M0)
        if FAST_ACCUM:
            part = tl.dot(a, tl.trans(b), input_precision="tf32", max_num_imprecise_acc=BLOCK_K)
        else:
            part = tl.dot(a, tl.trans(b), input_precision="tf32", max_num_imprecise_acc=0)
        acc += part * a_scale[:, None] * w_scale[None, :]  # (input_precision: no effect on FP8 operands)
    store_rounded(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc, m_mask[:, None] & n_mask[None, :],
                  INTERPRET)


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, n_kb, stride_xm, stride_ym, M_BUCKET,
    SCALE_E8M0: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = x . W^T with W decoded from e4m3 bytes in registers; the block scale multiplies each partial product."""
    tl.static_assert(128 % BLOCK_K == 0, "a K step must not straddle a 128-wide scale block")
    offs_m, offs_n, m_mask, n_mask = _mn_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        kb = k0 // 128
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w_bytes = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                          other=0)
        w = e4m3_bits_to_f16(w_bytes)  # 2^-8 * W / scale, exact
        w_scale = _weight_scales(ws_ptr, offs_n, n_mask, kb, n_kb, SCALE_E8M0) * 256.0  # undo the 2^-8
        part = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        acc += part * w_scale[None, :]
    store_rounded(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc, m_mask[:, None] & n_mask[None, :],
                  INTERPRET)


# Autotuned launchers exist only with a GPU (the interpreter has no driver to tune on).
_TUNED: dict[str, object] = {}


def _launcher(kind: str):
    if _INTERPRET or not torch.cuda.is_available():
        return None
    if kind not in _TUNED:
        kernel = _w8a8_kernel if kind == "w8a8" else _w8a16_kernel
        _TUNED[kind] = triton.autotune(configs=_gpu_configs(kind), key=["M_BUCKET", "N", "K"],
                                       prune_configs_by={"early_config_prune": _prune_configs})(kernel)
    return _TUNED[kind]


# ---- wrappers ---------------------------------------------------------------------------------
def fp8_dot_supported(device: torch.device) -> bool:
    """FP8 tensor cores (SM89+); the interpreter emulates them."""
    if _INTERPRET or device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _act_quant(x2: torch.Tensor, dequant: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    m, k = x2.shape
    n_kb = triton.cdiv(k, ACT_BLOCK)
    if dequant:
        out, scale = torch.empty_like(x2), None
    else:
        out = torch.empty((m, k), dtype=torch.uint8, device=x2.device)
        scale = torch.empty((m, n_kb), dtype=torch.float32, device=x2.device)
    codes = out if dequant else out.view(torch.float8_e4m3fn)
    if m == 0 or k == 0:
        return codes, scale
    cfg = _tiles("act_quant", m, 0, k)
    _act_quant_kernel[(triton.cdiv(m, cfg["BLOCK_M"]), n_kb)](
        x2, out, out if scale is None else scale, m, k, x2.stride(0), n_kb,
        DEQUANT=dequant, BLOCK_M=cfg["BLOCK_M"], BLOCK=ACT_BLOCK, INTERPRET=_INTERPRET, num_warps=cfg["num_warps"],
    )
    return codes, scale


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `v4_plugin.checkpoint.quant.quantize_fp8(x, 128)`: (e4m3 [..., K], fp32 pow2 scales [..., ceil(K/128)])."""
    q, s = _act_quant(_rows(x), dequant=False)
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """Triton `v4_plugin.checkpoint.quant.fake_quant_fp8(x, 128)` for bf16 / fp32 x (exact: e4m3 x pow2 fits both)."""
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"fake_quant_act needs bf16 or fp32 input, got {x.dtype}")
    out, _ = _act_quant(_rows(x), dequant=True)
    return out.view(x.shape)


def _weight_views(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    out_f, in_f = weight.shape
    expect = (triton.cdiv(out_f, WEIGHT_BLOCK), triton.cdiv(in_f, WEIGHT_BLOCK))
    if tuple(scale.shape) != expect:
        raise ValueError(f"scale must be {list(expect)} for a [{out_f}, {in_f}] weight, got {list(scale.shape)}")
    if weight.dtype not in (torch.float8_e4m3fn, torch.uint8, torch.int8):
        raise ValueError(f"weight must be float8_e4m3fn (or its bytes), got {weight.dtype}")
    e8m0 = scale.dtype in (torch.float8_e8m0fnu, torch.uint8)
    scale = scale.view(torch.uint8) if e8m0 else scale.float()
    return weight.contiguous(), scale.contiguous(), e8m0


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, quantize_input: bool, *,
    fp8_dot: bool | None = None, fast_accum: bool = FP8_FAST_ACCUM,
) -> torch.Tensor:
    """Triton `v4_plugin.runtime.ops.linear.linear(x, dequantize_weight_fp8(weight, scale), quantize_input)`.

    x [..., in] (bf16, fp16 or fp32); weight e4m3 [out, in]; scale E8M0 (or fp32) [ceil(out/128), ceil(in/128)].
    Returns [..., out] in x.dtype. `fp8_dot` picks W8A8 (True) or W8A16 (False); default: W8A8 when
    `quantize_input` and the GPU has FP8 tensor cores. `fast_accum`: W8A8's accumulation mode (module docstring).
    """
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} input features, weight {in_f}")
    w, ws, e8m0 = _weight_views(weight, scale)
    x2 = _rows(x)
    m = x2.shape[0]
    y = torch.empty((m, out_f), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], out_f)
    n_kb = triton.cdiv(in_f, WEIGHT_BLOCK)
    if fp8_dot is None:
        fp8_dot = quantize_input and fp8_dot_supported(x.device)

    if quantize_input and fp8_dot:
        xq, xs = _act_quant(x2, dequant=False)
        w = w.view(torch.float8_e4m3fn)
        args = (xq, xs, w, ws, y, m, out_f, in_f, n_kb, y.stride(0), _m_bucket(m))
        meta = dict(SCALE_E8M0=e8m0, FAST_ACCUM=bool(fast_accum), INTERPRET=_INTERPRET)
        kind = "w8a8"
    else:
        if quantize_input:
            x2 = fake_quant_act(x2 if x2.dtype != torch.float16 else x2.float())
        dot_dtype = _TL_DTYPE[x2.dtype] if not _INTERPRET else tl.float32  # bf16 tl.dot is garbage in the interpreter
        args = (x2, w.view(torch.uint8), ws, y, m, out_f, in_f, n_kb, x2.stride(0), y.stride(0), _m_bucket(m))
        precision = "ieee" if dot_dtype == tl.float32 else "tf32"  # only matters for fp32 operands
        meta = dict(SCALE_E8M0=e8m0, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, INTERPRET=_INTERPRET)
        kind = "w8a16"

    tuned = _launcher(kind)
    if tuned is not None:
        grid = lambda meta_: (triton.cdiv(m, meta_["BLOCK_M"]), triton.cdiv(out_f, meta_["BLOCK_N"]))  # noqa: E731
        tuned[grid](*args, **meta)
    else:
        cfg = _tiles(kind, m, out_f, in_f)
        kernel = _w8a8_kernel if kind == "w8a8" else _w8a16_kernel
        kernel[(triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(out_f, cfg["BLOCK_N"]))](*args, **meta, **cfg)
    return y.view(*x.shape[:-1], out_f)
