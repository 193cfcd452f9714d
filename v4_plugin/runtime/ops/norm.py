"""RMSNorm as DeepSeek's reference code computes it: fp32 math, result in the input dtype."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., n] -> x * rsqrt(mean(x^2) + eps) (* weight), computed in fp32, returned in x.dtype.

    `weight` None gives the weightless per-head query norm (spec §4.2 step 3).
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)
