"""Lightning indexer of CSA layers: scores every visible compressed entry, keeps the top k (spec §4.6)."""

from __future__ import annotations

import torch

from v4_plugin.checkpoint.config import FP4_BLOCK
from v4_plugin.checkpoint.quant import fake_quant_fp4, hadamard
from v4_plugin.runtime.ops.attention import GATHER_BUDGET
from v4_plugin.runtime.ops.invariant import rows_times_transposed
from v4_plugin.runtime.ops.rope import Rope


def index_queries(q: torch.Tensor, positions: torch.Tensor, rope: Rope, simulate_quant: bool) -> torch.Tensor:
    """Indexer queries q [T, Hi, di] (from wq_b of c_q): RoPE at t, Hadamard rotation, FP4 simulation."""
    q = hadamard(rope.rotate(q, positions))
    return fake_quant_fp4(q, FP4_BLOCK) if simulate_quant else q


def index_scores(q: torch.Tensor, head_weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """I[t, j] = sum_h w[t, h] * relu(q[t, h] . k_j), fp32 accumulation.

    q [T, Hi, di]; head_weights [T, Hi] (already scaled by di^-1/2 * Hi^-1/2); keys [N, di].
    Returns fp32 [T, N].
    """
    dots = rows_times_transposed(q.float(), keys.float()).relu()
    return torch.einsum("thn,th->tn", dots, head_weights.float())


def index_scores_per_sequence(q: torch.Tensor, head_weights: torch.Tensor, keys: torch.Tensor,
                              token_seq: torch.Tensor, visible: torch.Tensor,
                              budget: int = GATHER_BUDGET) -> torch.Tensor:
    """`index_scores` of every query against its own sequence's keys: keys [B, N, di] (sequence b's
    entries 0 ... N-1), token_seq int64 [T] (each query's sequence), visible int64 [T]. Returns fp32
    [T, N], -inf at entries j >= visible[t]. Queries go in chunks of about `budget` gathered values."""
    t, n = q.shape[0], keys.shape[1]
    chunk = max(1, budget // max(1, n * keys.shape[2]))
    out = []
    for lo in range(0, t, chunk):
        k = keys[token_seq[lo:lo + chunk]].float()  # [c, N, di]
        dots = torch.einsum("thd,tnd->thn", q[lo:lo + chunk].float(), k).relu()
        out.append(torch.einsum("thn,th->tn", dots, head_weights[lo:lo + chunk].float()))
    scores = torch.cat(out) if out else q.new_zeros(0, n, dtype=torch.float32)
    entry = torch.arange(n, device=q.device)
    return scores.masked_fill(entry[None, :] >= visible[:, None], float("-inf"))


def select_topk(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k visible entries per query; scores fp32 [T, N], visible int64 [T] (entries j < visible[t]).

    Keeps min(k, N) picks per row; a pick that lands on an invisible entry becomes -1. Ties go to
    the lower entry index (a stable descending sort), so every implementation selects the same set.
    Returns int64 [T, min(k, N)].
    """
    n = scores.shape[1]
    entry = torch.arange(n, device=scores.device)
    masked = scores.masked_fill(entry[None, :] >= visible[:, None], float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, : min(k, n)]
    return torch.where(order < visible[:, None], order, torch.full_like(order, -1))
