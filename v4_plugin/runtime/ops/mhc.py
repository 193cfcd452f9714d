"""mHC, manifold-constrained hyper-connections: 4 residual streams mixed around each sub-layer (spec §6).

All math in fp32; streams are stored in the model's compute dtype.
"""

from __future__ import annotations

import torch

from v4_plugin.runtime.ops.invariant import rows_times_transposed, sigmoid


def _mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, hc, D] -> (flat x fp32 [T, hc*D], mixes fp32 [T, rows of fn]).

    The RMS factor over all hc*D elements (no weight) multiplies the matmul result, which equals
    normalizing x first.
    """
    flat = x.flatten(1).float()
    rsqrt = torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    return flat, rows_times_transposed(flat, fn.float()) * rsqrt


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """[..., n, n] logits -> approximately doubly stochastic matrix (row index = source stream).

    Row softmax + eps, one column normalization, then `iters - 1` row/column passes (spec §6.1).
    """
    c = torch.softmax(logits, dim=-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def hc_pre(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
    norm_eps: float, hc_eps: float, sinkhorn_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduce the streams to one sub-layer input.

    x [T, hc, D]; fn [(2+hc)*hc, hc*D], scale [3], base [(2+hc)*hc], all fp32.
    Returns u [T, D] (x.dtype), post [T, hc] fp32 and comb [T, hc, hc] fp32 (comb[i, j]: source i -> j).
    """
    hc = x.shape[1]
    _, mix = _mixes(x, fn, norm_eps)
    scale, base = scale.float(), base.float()
    pre = sigmoid(mix[:, :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2 * sigmoid(mix[:, hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
    comb_logits = (mix[:, 2 * hc :] * scale[2] + base[2 * hc :]).unflatten(-1, (hc, hc))
    comb = sinkhorn(comb_logits, sinkhorn_iters, hc_eps)
    u = (pre.unsqueeze(-1) * x.float()).sum(1)
    return u.to(x.dtype), post, comb


def hc_post(y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Expand the sub-layer output back into the streams: X'_j = post_j * y + sum_i comb[i, j] * X_i.

    y [T, D]; x [T, hc, D]; post [T, hc]; comb [T, hc, hc]. Returns [T, hc, D] in y.dtype.
    """
    mixed = torch.einsum("tij,tid->tjd", comb, x.float())
    return (post.unsqueeze(-1) * y.float().unsqueeze(1) + mixed).to(y.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
            norm_eps: float, hc_eps: float) -> torch.Tensor:
    """Final stream reduction before the output norm: sigmoid weights + eps, no Sinkhorn (spec §6.3).

    x [T, hc, D]; fn [hc, hc*D]; scale [1]; base [hc]. Returns [T, D] in x.dtype.
    """
    _, mix = _mixes(x, fn, norm_eps)
    pre = sigmoid(mix * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(1).to(x.dtype)
