"""Mixture of experts: sqrt-softplus gate, hash routing, clamped SwiGLU experts (spec §7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from v4_plugin.runtime.ops.invariant import silu, softplus, times_weight
from v4_plugin.runtime.ops.linear import linear


def route(
    x: torch.Tensor, gate_weight: torch.Tensor, *, top_k: int, scaling: float,
    bias: torch.Tensor | None = None, tid2eid: torch.Tensor | None = None, token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick experts for each token.

    x [T, D]; gate_weight [E, D]. Scores = sqrt(softplus(x @ W^T)) in fp32. Score-routed layers
    select the top-k of scores + bias (bias only selects); hash layers take `tid2eid[token_ids]`
    [T, k]. Weights are the unbiased scores of the chosen experts, normalized to sum 1, times
    `scaling`. Returns (weights fp32 [T, k], expert ids int64 [T, k]).
    """
    scores = softplus(times_weight(x.float(), gate_weight)).sqrt()
    if tid2eid is not None:
        ids = tid2eid[token_ids].long()
    else:
        ids = (scores + bias.float()).topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    return weights / weights.sum(-1, keepdim=True) * scaling, ids


@dataclass
class ExpertWeights:
    """One SwiGLU expert: w1 (gate) and w3 (up) [I, D], w2 (down) [D, I]; dequantized values."""

    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor


@dataclass(frozen=True)
class MoEWeights:
    """One MoE layer's experts, as `dispatch.moe` takes them.

    `dense()` gives (routed experts [E], shared expert) as dequantized values in the compute dtype.
    `packed()` (None unless the checkpoint was loaded with `keep_quantized`) gives them in checkpoint
    format, each as (w1, w1_scale, w2, w2_scale, w3, w3_scale): the routed ones stacked over E, FP4
    (packed int8 [E, out, in/2], E8M0 [E, out, in/32]) or FP8 (`-Base` checkpoints: e4m3 [E, out, in],
    E8M0 or fp32 [E, ceil(out/128), ceil(in/128)]), the shared one FP8 (e4m3 [out, in], E8M0
    [ceil(out/128), ceil(in/128)]).

    Under tensor parallelism these are one rank's: routed expert i (of `dense()`, row i of the stacks) is the
    global expert `first + i` (expert parallelism: the rank's range), or every expert with a slice of its
    intermediate dimension (`first` 0); the shared expert is the rank's slice of it.
    """

    dense: Callable[[], tuple[list[ExpertWeights], ExpertWeights]]
    packed: Callable[[], tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] | None = None
    first: int = 0


def expert(x: torch.Tensor, w: ExpertWeights, *, limit: float, quantize_input: bool,
           weight: torch.Tensor | None = None) -> torch.Tensor:
    """Clamped SwiGLU: silu(min(g, limit)) * clamp(u, -limit, limit), times the routing weight before w2.

    x [T, D]; weight [T, 1] fp32 or None (shared expert). Returns [T, D] in x.dtype.
    """
    gate = linear(x, w.w1, quantize_input).float()
    up = linear(x, w.w3, quantize_input).float()
    if limit > 0:
        up = up.clamp(-limit, limit)
        gate = gate.clamp(max=limit)
    h = silu(gate) * up
    if weight is not None:
        h = h * weight
    return linear(h.to(x.dtype), w.w2, quantize_input)


def moe(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: list[ExpertWeights],
    shared: ExpertWeights, *, limit: float, quantize_input: bool, first: int = 0,
) -> torch.Tensor:
    """Sum of the routed experts (fp32 accumulation) plus the shared expert; x [T, D] -> [T, D] x.dtype.

    `experts[i]` is global expert `first + i`; slots routed to an expert outside the list add nothing (under
    expert parallelism another rank computes them)."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        if not first <= e < first + len(experts):
            continue
        rows, slot = torch.where(ids == e)
        out = expert(x[rows], experts[e - first], limit=limit, quantize_input=quantize_input,
                     weight=weights[rows, slot, None])
        y.index_add_(0, rows, out.float())
    y += expert(x, shared, limit=limit, quantize_input=quantize_input).float()
    return y.to(x.dtype)
