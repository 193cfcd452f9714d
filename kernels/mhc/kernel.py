"""Fused mHC (manifold-constrained hyper-connections) kernels, spec §6.

References (the core functions these wrappers replace, same signatures and return values):

* `hc_pre`  -> `v4_plugin.runtime.ops.mhc.hc_pre`
* `hc_post` -> `v4_plugin.runtime.ops.mhc.hc_post`
* `hc_head` -> `v4_plugin.runtime.ops.mhc.hc_head`
* `hc_post_pre(y, x, post, comb, fn, scale, base, ...)` == `hc_pre(hc_post(y, x, post, comb), fn, scale, base, ...)`
  with the two kernels fused: the next site's norm/mix accumulation runs on the fresh streams while
  they are still in registers, so the streams are read once less.

Two kernels do an hc_pre:

1. `_hc_mix_kernel`: one pass over X flattened to [T, hc*D]: the squared norm and the (2+hc)*hc
   mixes as a GEMV (`tl.dot` against fn, fp32 accumulation). For small T the K dimension is split
   over programs (split-K) so that decode fills the GPU; every split writes its own partial sums
   (deterministic, no atomics).
2. `_hc_pre_finish_kernel`: sums the partials, applies the RMS factor, sigmoid / 2*sigmoid and the
   Sinkhorn iterations in registers (a [BLOCK_T, hc, hc] tile), then u = sum_i pre_i X_i for one
   block of D. Every D block recomputes the (tiny) Sinkhorn for its tokens; block 0 writes post
   and comb.

All math is fp32; only u / X' are stored in the streams' dtype. hc must be a power of two (4).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from v4_kernels.fp8_linear.kernel import round_to, store_rounded  # bf16 to nearest even, also in the interpreter

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- tile sizes: the one place that picks them ------------------------------------------------
def _tiles(kind: str, t: int, k: int, d: int, gpu: bool | None = None) -> dict:
    """Tile sizes and launch options for `kind` in {"mix", "finish", "post", "post_fused"}.

    Interpreter (CPU): the largest legal tiles, since each interpreted op costs about a millisecond.
    GPU: small token blocks (decode is the common case), split-K for the mix GEMV so that about
    256 programs run. `tl.dot` needs BLOCK_T >= 16. `gpu` overrides the choice (tests run the GPU
    tiles in the interpreter).
    """
    if gpu is None:
        gpu = not _INTERPRET and torch.cuda.is_available()
    if not gpu:
        big_t = min(max(triton.next_power_of_2(t), 16), 64)
        big_k = min(triton.next_power_of_2(k), 4096)
        big_d = min(triton.next_power_of_2(d), 4096)
        return {
            "mix": dict(BLOCK_T=big_t, BLOCK_K=big_k, SPLIT=1, num_warps=4),
            "finish": dict(BLOCK_T=big_t, BLOCK_D=big_d, num_warps=4),
            "post": dict(BLOCK_T=big_t, BLOCK_D=big_d, num_warps=4),
            "post_fused": dict(BLOCK_T=big_t, BLOCK_D=big_d, num_warps=4),
        }[kind]
    if kind == "mix":  # prefill: 64-token blocks re-read fn from L2 four times less often
        block_t, block_k, warps = (16, 256, 4) if t <= 1024 else (64, 128, 8)
        k_blocks = triton.cdiv(k, block_k)
        split = max(1, min(k_blocks, 256 // triton.cdiv(t, block_t)))
        return dict(BLOCK_T=block_t, BLOCK_K=block_k, SPLIT=split, num_warps=warps)
    if kind == "finish":
        return dict(BLOCK_T=4, BLOCK_D=256, num_warps=4)
    if kind == "post":
        return dict(BLOCK_T=4, BLOCK_D=256, num_warps=4)
    return dict(BLOCK_T=16, BLOCK_D=64, num_warps=4)  # post_fused: tl.dot needs 16 tokens


# fp32 tl.dot: "ieee" in the interpreter (exact fp32), three-pass TF32 on GPU (fp32-level accuracy
# on tensor cores; plain "tf32" would round fn to 10 mantissa bits).
_DOT_PRECISION = "ieee" if _INTERPRET else "tf32x3"


# ---- kernels ----------------------------------------------------------------------------------
@triton.jit
def _load_streams(x_ptr, offs_t, offs_i, offs_d, stride_xt, D, mask):
    """The hc streams X[t, i, d] of a (token, D) block as fp32 [BLOCK_T, HC, BLOCK_D]; mask [BLOCK_T, 1, BLOCK_D]."""
    return tl.load(x_ptr + offs_t[:, None, None] * stride_xt + offs_i[None, :, None] * D + offs_d[None, None, :],
                   mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_partials(mix_ptr, sq_ptr, split, T, offs_t, t_mask, acc, sq, MIX_PAD: tl.constexpr):
    """Split `split` of the partial mixes [SPLIT, T, MIX_PAD] and squared norms [SPLIT, T] that
    `_hc_pre_finish_kernel` sums."""
    offs_r = tl.arange(0, MIX_PAD)
    tl.store(mix_ptr + (split * T + offs_t[:, None]) * MIX_PAD + offs_r[None, :], acc, mask=t_mask[:, None])
    tl.store(sq_ptr + split * T + offs_t, sq, mask=t_mask)


@triton.jit
def _hc_mix_kernel(
    x_ptr, fn_ptr, mix_ptr, sq_ptr,
    T, K, stride_xt, k_per_split,
    MIX: tl.constexpr, MIX_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partial mixes and squared norms: mix[s, t, r] = sum_{k in split s} x[t, k] fn[r, k]; sq[s, t] likewise."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, MIX_PAD)
    t_mask = offs_t < T
    r_mask = offs_r < MIX

    acc = tl.zeros((BLOCK_T, MIX_PAD), dtype=tl.float32)
    sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    k_begin = pid_s * k_per_split  # k_per_split is a multiple of BLOCK_K
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :],
                     mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        f = tl.load(fn_ptr + offs_r[:, None] * K + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(f), acc, input_precision=DOT_PRECISION)
        sq += tl.sum(xt * xt, axis=1)

    _store_partials(mix_ptr, sq_ptr, pid_s, T, offs_t, t_mask, acc, sq, MIX_PAD)


@triton.jit
def _sinkhorn(logits, iters, eps):
    """[BLOCK_T, n, n] logits (axis 1 = source stream i, axis 2 = j) -> approximately doubly stochastic.

    Row softmax + eps, one column normalization, then iters - 1 row/column passes (spec §6.1).
    """
    c = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    c = c / tl.sum(c, axis=2)[:, :, None] + eps
    c = c / (tl.sum(c, axis=1)[:, None, :] + eps)
    for _ in range(iters - 1):
        c = c / (tl.sum(c, axis=2)[:, :, None] + eps)
        c = c / (tl.sum(c, axis=1)[:, None, :] + eps)
    return c


@triton.jit
def _hc_pre_finish_kernel(
    x_ptr, mix_ptr, sq_ptr, scale_ptr, base_ptr, u_ptr, post_ptr, comb_ptr,
    T, D, n_split, stride_xt, n_elem, norm_eps, hc_eps, sinkhorn_iters,
    HC: tl.constexpr, MIX_PAD: tl.constexpr, HEAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Mixes -> pre (and post, Sinkhorn comb unless HEAD) -> u[t, d] = sum_i pre[t, i] x[t, i, d] for one D block."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_i = tl.arange(0, HC)
    t_mask = offs_t < T
    row = offs_t[:, None] * MIX_PAD  # [BLOCK_T, 1]

    # Sum the split-K partials.
    sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    m_pre = tl.zeros((BLOCK_T, HC), dtype=tl.float32)
    m_post = tl.zeros((BLOCK_T, HC), dtype=tl.float32)
    m_comb = tl.zeros((BLOCK_T, HC, HC), dtype=tl.float32)
    comb_cols = 2 * HC + offs_i[:, None] * HC + offs_i[None, :]  # [HC, HC]: column of comb[i, j] in the mixes
    for s in range(n_split):
        part = mix_ptr + s * T * MIX_PAD
        sq += tl.load(sq_ptr + s * T + offs_t, mask=t_mask, other=0.0)
        m_pre += tl.load(part + row + offs_i[None, :], mask=t_mask[:, None], other=0.0)
        if not HEAD:
            m_post += tl.load(part + row + HC + offs_i[None, :], mask=t_mask[:, None], other=0.0)
            m_comb += tl.load(part + row[:, :, None] + comb_cols[None, :, :], mask=t_mask[:, None, None], other=0.0)

    # RMS factor over all hc*D elements, applied after the matmul.
    rsqrt = 1.0 / tl.sqrt_rn(tl.div_rn(sq, n_elem) + norm_eps)
    s0 = tl.load(scale_ptr)
    pre = tl.sigmoid(m_pre * rsqrt[:, None] * s0 + tl.load(base_ptr + offs_i)[None, :]) + hc_eps

    if not HEAD:
        if pid_d == 0:
            s1 = tl.load(scale_ptr + 1)
            s2 = tl.load(scale_ptr + 2)
            post = 2.0 * tl.sigmoid(m_post * rsqrt[:, None] * s1 + tl.load(base_ptr + HC + offs_i)[None, :])
            logits = m_comb * rsqrt[:, None, None] * s2 + tl.load(base_ptr + comb_cols)[None, :, :]
            comb = _sinkhorn(logits, sinkhorn_iters, hc_eps)
            tl.store(post_ptr + offs_t[:, None] * HC + offs_i[None, :], post, mask=t_mask[:, None])
            comb_offs = offs_t[:, None, None] * (HC * HC) + offs_i[None, :, None] * HC + offs_i[None, None, :]
            tl.store(comb_ptr + comb_offs, comb, mask=t_mask[:, None, None])

    # u = sum_i pre_i X_i for this block of D.
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    x3 = _load_streams(x_ptr, offs_t, offs_i, offs_d, stride_xt, D, t_mask[:, None, None] & d_mask[None, None, :])
    store_rounded(u_ptr + offs_t[:, None] * D + offs_d[None, :], tl.sum(pre[:, :, None] * x3, axis=1),
                  t_mask[:, None] & d_mask[None, :], INTERPRET)


@triton.jit
def _hc_post_kernel(
    y_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, fn_ptr, mix_ptr, sq_ptr,
    T, D, stride_yt, stride_xt,
    HC: tl.constexpr, MIX: tl.constexpr, MIX_PAD: tl.constexpr, FUSE_MIX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """X'[t, j, d] = post[t, j] y[t, d] + sum_i comb[t, i, j] X[t, i, d] for one (token, D) block.

    With FUSE_MIX the block's share of the next hc_pre's mixes and squared norm (over the stored,
    rounded X') goes to split `pid_d` of the partial buffers, for `_hc_pre_finish_kernel`.
    """
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_i = tl.arange(0, HC)
    t_mask = offs_t < T
    d_mask = offs_d < D
    td_mask = t_mask[:, None] & d_mask[None, :]

    y = tl.load(y_ptr + offs_t[:, None] * stride_yt + offs_d[None, :], mask=td_mask, other=0.0).to(tl.float32)
    x3 = _load_streams(x_ptr, offs_t, offs_i, offs_d, stride_xt, D, td_mask[:, None, :])
    if FUSE_MIX:
        offs_r = tl.arange(0, MIX_PAD)
        acc = tl.zeros((BLOCK_T, MIX_PAD), dtype=tl.float32)
        sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(HC):
        post_j = tl.load(post_ptr + offs_t * HC + j, mask=t_mask, other=0.0)  # [BLOCK_T]
        comb_j = tl.load(comb_ptr + offs_t[:, None] * (HC * HC) + offs_i[None, :] * HC + j,
                         mask=t_mask[:, None], other=0.0)  # [BLOCK_T, HC]: comb[t, i, j]
        out_j = round_to(post_j[:, None] * y + tl.sum(comb_j[:, :, None] * x3, axis=1), out_ptr.dtype.element_ty,
                         INTERPRET)  # fp32 holding exactly what is stored
        tl.store(out_ptr + offs_t[:, None] * (HC * D) + j * D + offs_d[None, :], out_j.to(out_ptr.dtype.element_ty),
                 mask=td_mask)
        if FUSE_MIX:
            o = out_j  # the next hc_pre sees the stored (rounded) streams
            f = tl.load(fn_ptr + offs_r[:, None] * (HC * D) + j * D + offs_d[None, :],
                        mask=(offs_r < MIX)[:, None] & d_mask[None, :], other=0.0)
            acc = tl.dot(o, tl.trans(f), acc, input_precision=DOT_PRECISION)
            sq += tl.sum(o * o, axis=1)
    if FUSE_MIX:
        _store_partials(mix_ptr, sq_ptr, pid_d, T, offs_t, t_mask, acc, sq, MIX_PAD)


# ---- wrappers ---------------------------------------------------------------------------------
def _check_streams(x: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"streams must be [T, hc, D], got {tuple(x.shape)}")
    t, hc, d = x.shape
    if hc & (hc - 1):
        raise ValueError(f"hc must be a power of two, got {hc}")
    return t, hc, d


def _streams(x: torch.Tensor) -> torch.Tensor:
    """[T, hc, D] with the inner [hc, D] contiguous (the token stride may be anything)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def _mix(x: torch.Tensor, fn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch `_hc_mix_kernel`: partial mixes [SPLIT, T, MIX_PAD] and squared norms [SPLIT, T], fp32."""
    t, hc, d = x.shape
    k = hc * d
    mix_rows = fn.shape[0]
    mix_pad = max(16, triton.next_power_of_2(mix_rows))
    cfg = _tiles("mix", t, k, d)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg["SPLIT"]), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = triton.cdiv(k, k_per_split)
    mix = torch.empty((split, t, mix_pad), dtype=torch.float32, device=x.device)
    sq = torch.empty((split, t), dtype=torch.float32, device=x.device)
    _hc_mix_kernel[(triton.cdiv(t, cfg["BLOCK_T"]), split)](
        x, fn, mix, sq, t, k, x.stride(0), k_per_split,
        MIX=mix_rows, MIX_PAD=mix_pad, BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"],
        DOT_PRECISION=_DOT_PRECISION, num_warps=cfg["num_warps"],
    )
    return mix, sq


def _finish(x, mix, sq, scale, base, *, norm_eps, hc_eps, sinkhorn_iters, head):
    t, hc, d = x.shape
    u = torch.empty((t, d), dtype=x.dtype, device=x.device)
    post = torch.empty((t, hc), dtype=torch.float32, device=x.device)
    comb = torch.empty((t, hc, hc), dtype=torch.float32, device=x.device)
    cfg = _tiles("finish", t, hc * d, d)
    grid = (triton.cdiv(t, cfg["BLOCK_T"]), triton.cdiv(d, cfg["BLOCK_D"]))
    _hc_pre_finish_kernel[grid](
        x, mix, sq, scale.float().contiguous(), base.float().contiguous(), u, post, comb,
        t, d, mix.shape[0], x.stride(0), float(hc * d), float(norm_eps), float(hc_eps), int(sinkhorn_iters),
        HC=hc, MIX_PAD=mix.shape[2], HEAD=head, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"],
        INTERPRET=_INTERPRET, num_warps=cfg["num_warps"],
    )
    return u, post, comb


def hc_pre(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
    norm_eps: float, hc_eps: float, sinkhorn_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `v4_plugin.runtime.ops.mhc.hc_pre`: x [T, hc, D] -> (u [T, D] x.dtype, post [T, hc], comb [T, hc, hc] fp32)."""
    t, hc, d = _check_streams(x)
    if fn.shape != ((2 + hc) * hc, hc * d):
        raise ValueError(f"fn must be [{(2 + hc) * hc}, {hc * d}], got {tuple(fn.shape)}")
    if t == 0:
        f32 = dict(dtype=torch.float32)
        return x.new_empty((0, d)), x.new_empty((0, hc), **f32), x.new_empty((0, hc, hc), **f32)
    x = _streams(x)
    mix, sq = _mix(x, fn.float().contiguous())
    return _finish(x, mix, sq, scale, base, norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters, head=False)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
            norm_eps: float, hc_eps: float) -> torch.Tensor:
    """Triton `v4_plugin.runtime.ops.mhc.hc_head`: x [T, hc, D], fn [hc, hc*D] -> [T, D] x.dtype."""
    t, hc, d = _check_streams(x)
    if fn.shape != (hc, hc * d):
        raise ValueError(f"fn must be [{hc}, {hc * d}], got {tuple(fn.shape)}")
    if t == 0:
        return x.new_empty((0, d))
    x = _streams(x)
    mix, sq = _mix(x, fn.float().contiguous())
    u, _, _ = _finish(x, mix, sq, scale, base, norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn_iters=0, head=True)
    return u


def _post(y, x, post, comb, fn):
    t, hc, d = x.shape
    fused = fn is not None
    cfg = _tiles("post_fused" if fused else "post", t, hc * d, d)
    out = torch.empty((t, hc, d), dtype=y.dtype, device=y.device)
    n_d = triton.cdiv(d, cfg["BLOCK_D"])
    if fused:
        mix_rows = fn.shape[0]
        mix_pad = max(16, triton.next_power_of_2(mix_rows))
        mix = torch.empty((n_d, t, mix_pad), dtype=torch.float32, device=y.device)
        sq = torch.empty((n_d, t), dtype=torch.float32, device=y.device)
    else:
        mix_rows, mix_pad, mix, sq, fn = 1, 16, out, out, out  # unused pointers
    if y.stride(-1) != 1:
        y = y.contiguous()
    _hc_post_kernel[(triton.cdiv(t, cfg["BLOCK_T"]), n_d)](
        y, x, post.float().contiguous(), comb.float().contiguous(), out, fn, mix, sq,
        t, d, y.stride(0), x.stride(0),
        HC=hc, MIX=mix_rows, MIX_PAD=mix_pad, FUSE_MIX=fused, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"],
        DOT_PRECISION=_DOT_PRECISION, INTERPRET=_INTERPRET, num_warps=cfg["num_warps"],
    )
    return out, (mix, sq) if fused else None


def hc_post(y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Triton `v4_plugin.runtime.ops.mhc.hc_post`: X'_j = post_j y + sum_i comb[i, j] X_i; [T, hc, D] in y.dtype."""
    t, hc, d = _check_streams(x)
    if t == 0:
        return torch.empty((0, hc, d), dtype=y.dtype, device=y.device)
    out, _ = _post(y, _streams(x), post, comb, None)
    return out


def hc_post_pre(
    y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
    fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
    norm_eps: float, hc_eps: float, sinkhorn_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hc_post of one site fused with hc_pre of the next: returns (X' [T, hc, D], u, post', comb').

    Equals `x2 = hc_post(y, x, post, comb); (x2, *hc_pre(x2, fn, scale, base, ...))`.
    """
    t, hc, d = _check_streams(x)
    if fn.shape != ((2 + hc) * hc, hc * d):
        raise ValueError(f"fn must be [{(2 + hc) * hc}, {hc * d}], got {tuple(fn.shape)}")
    if t == 0:
        x2 = torch.empty((0, hc, d), dtype=y.dtype, device=y.device)
        return (x2, *hc_pre(x2, fn, scale, base, norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters))
    x2, (mix, sq) = _post(y, _streams(x), post, comb, fn.float().contiguous())
    u, post2, comb2 = _finish(x2, mix, sq, scale, base, norm_eps=norm_eps, hc_eps=hc_eps,
                              sinkhorn_iters=sinkhorn_iters, head=False)
    return x2, u, post2, comb2
