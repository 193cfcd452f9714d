"""Attention of DeepSeek-V4: one softmax over a gathered set of KV entries plus a per-head sink (spec §4.7).

Every layer attends to the 128-token window of raw KV; CSA layers add the indexer's top-k compressed
entries, HCA layers all visible compressed entries. The same 512-d vector is key and value of
every head (K = V, one KV head). Indices address one KV tensor; -1 marks an empty slot.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from v4_plugin.runtime.ops.invariant import matmul
from v4_plugin.runtime.ops.linear import stored_rows

GATHER_BUDGET = 1 << 24  # values gathered at once by the torch ops over cache slots (64 MiB in fp32)


def window_positions(positions: torch.Tensor, window: int) -> torch.Tensor:
    """Raw positions each query attends to: t - window + 1 ... t, -1 where negative. int64 [T, window]."""
    offsets = torch.arange(-window + 1, 1, device=positions.device)
    pos = positions[:, None] + offsets[None, :]
    return torch.where(pos >= 0, pos, torch.full_like(pos, -1))


def visible_entries(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries visible to each query: entry j is visible iff (j+1)*m <= t+1."""
    return (positions + 1) // ratio


def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, scale: float,
) -> torch.Tensor:
    """o[t, h] = sum_j exp(s_thj) kv_j / (sum_j exp(s_thj) + exp(sink_h)), s = scale * q . kv_j.

    q [T, H, d]; kv [N, d]; indices int64 [T, S] into kv, -1 = skip; sink fp32 [H] (not scaled).
    Math in fp32; returns [T, H, d] in q.dtype. A query whose slots are all empty returns 0, also
    for a padded head whose sink is -inf.
    """
    return attend_gathered(q, kv[indices.clamp(min=0)], indices >= 0, sink, scale)


def attend_gathered(q: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """`sparse_attention` over each query's own gathered entries: q [T, H, d], kv [T, S, d], valid bool
    [T, S] (an invalid entry may hold anything, NaN included: it is never read)."""
    gathered = torch.where(valid[..., None], kv.float(), 0.0)
    scores = torch.einsum("thd,tsd->ths", q.float(), gathered) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    peak = torch.maximum(scores.amax(-1), sink.float()[None, :])  # running max includes the sink
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # nothing at all (padded head)
    p = torch.exp(scores - peak[..., None])
    denom = p.sum(-1) + torch.exp(sink.float()[None, :] - peak)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))  # empty: numerator 0, output 0
    return (torch.einsum("ths,tsd->thd", p, gathered) / denom[..., None]).to(q.dtype)


def attention_over_slots(q: torch.Tensor, sources: Sequence[tuple[torch.Tensor, torch.Tensor]], sink: torch.Tensor,
                         scale: float, decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         budget: int = GATHER_BUDGET) -> torch.Tensor:
    """`sparse_attention` over entries read from cache storages: one softmax over every source's slots.

    sources: (rows [n_i, width], slots int64 [T, S_i] into rows, -1 = skip) of the same record format;
    decode: records [..., width] -> entries [..., d] (None: the rows are entries). Tokens go in chunks of about `budget` gathered
    values (the count of chunks depends on the step's size, never on how many sequences share it).
    """
    slots = torch.cat([s for _, s in sources], dim=1)
    per_token = max(1, slots.shape[1] * q.shape[-1])
    chunk = max(1, budget // per_token)
    decode = decode or (lambda rows: rows)
    out = []
    for lo in range(0, q.shape[0], chunk):
        gathered = torch.cat([decode(rows[s[lo:lo + chunk].clamp(min=0)]) for rows, s in sources], dim=1)
        out.append(attend_gathered(q[lo:lo + chunk], gathered, slots[lo:lo + chunk] >= 0, sink, scale))
    return torch.cat(out) if out else q.new_zeros(q.shape)


def grouped_output_projection(o: torch.Tensor, wo_a: torch.Tensor, groups: int) -> torch.Tensor:
    """First half of the low-rank output projection (spec §4.10).

    o [T, H, d] (heads in order, H/G consecutive heads per group); wo_a [G*R, H*d/G], rows
    g*R ... (g+1)*R - 1 belonging to group g. Returns [T, G*R] in o.dtype (fp32 math).
    """
    t = o.shape[0]
    grouped = o.reshape(t, groups, -1).float().transpose(0, 1)  # [G, T, H*d/G]
    z = matmul(grouped, wo_a.float().unflatten(0, (groups, -1)).transpose(1, 2))  # [G, T, R]
    return z.transpose(0, 1).flatten(1).to(o.dtype)


def grouped_output_projection_stored(o: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                     groups: int) -> torch.Tensor:
    """`grouped_output_projection` of a wo_a kept as stored (FP8 entries, `linear.stored_rows`): one group's
    rows dequantized at a time."""
    rows = weight.shape[0] // groups
    heads = o.unflatten(1, (groups, -1))
    return torch.cat([grouped_output_projection(heads[:, g], stored_rows(weight, scale, g * rows, (g + 1) * rows), 1)
                      for g in range(groups)], dim=1)
