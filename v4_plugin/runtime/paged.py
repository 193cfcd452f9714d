"""Paged execution: `V4Model` over caches that a serving framework allocates and pages.

The adapters pass, per step, a `BatchPlan` (the position and block-table row of every token) and per
layer a `LayerCaches` of `PagedCache` views over the tensors the framework allocated (the cache
interface and its layout: `v4_plugin.runtime.batch`). The functions here are the adapters' entry
points: the main layers (`streams_paged`), the MTP block (`mtp_streams_paged`) and the DSpark
drafter's context and blocks; they run `V4Model.run` / `run_mtp`, whose `Block.attention` takes every
sequence of the step through each op.
"""

from __future__ import annotations

from typing import Sequence

import torch

from v4_plugin.cache.formats import CacheFormat
from v4_plugin.runtime.batch import BatchPlan, KVCodec, LayerCaches, PagedCache
from v4_plugin.runtime.drafting import DSparkDraft, DSparkHead
from v4_plugin.runtime.model import ModelOutput, V4Model

__all__ = ["BatchPlan", "LayerCaches", "PagedCache", "streams_paged", "forward_paged", "mtp_streams_paged",
           "dspark_context_paged", "dspark_draft_paged", "dspark_blocks_paged"]


@torch.no_grad()  # not inference_mode: frameworks update the returned tensors in place (temperature)
def streams_paged(model: V4Model, token_ids: torch.Tensor, plan: BatchPlan, caches: list[LayerCaches],
                  fmt: CacheFormat, capture: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One step of a batch of sequences over paged caches (one `LayerCaches` per main layer), up to the
    head: the last layer's pre-hc_head streams [T, hc, D] (the MTP input; `model.logits` finishes them)
    and the output streams of the main layers named in `capture`."""
    return model.run(token_ids, plan, caches, KVCodec(model.cfg, fmt, model.dtype), capture)


@torch.no_grad()
def forward_paged(model: V4Model, token_ids: torch.Tensor, plan: BatchPlan, caches: list[LayerCaches],
                  fmt: CacheFormat, capture: Sequence[int] = ()) -> ModelOutput:
    """`streams_paged` and the logits of every token: the form the tests compare with `V4Model.step` and
    `V4Model.forward`. The adapters call `streams_paged` and run `model.logits` on the rows they sample."""
    x, captured = streams_paged(model, token_ids, plan, caches, fmt, capture)
    return ModelOutput(model.logits(x), x, captured)


@torch.no_grad()
def mtp_streams_paged(model: V4Model, streams: torch.Tensor, next_ids: torch.Tensor, plan: BatchPlan,
                      caches: LayerCaches, fmt: CacheFormat, depth: int = 0) -> torch.Tensor:
    """MTP block `depth` (spec §10) over a batch step, its window cache paged like a main SWA layer's.

    Row i (position plan.positions[i]) reads the main model's (or, for later drafts, the MTP's own)
    pre-hc_head streams [T, hc, D] at that position and `next_ids[i]`, the token one position later.
    Returns the MTP's pre-hc_head streams [T, hc, D]; `model.logits(out, f"mtp.{depth}.")` gives the
    draft logits for two positions ahead. Rows are indexed by position, so rejected drafts need no
    rollback: the next step writes over them.
    """
    return model.run_mtp(streams, next_ids, plan, caches, KVCodec(model.cfg, fmt, model.dtype), depth)


@torch.no_grad()
def dspark_context_paged(head: DSparkHead, features: torch.Tensor, plan: BatchPlan, caches: list[LayerCaches],
                         fmt: CacheFormat) -> None:
    """Write every DSpark stage's context KV for this step's target rows into that stage's window cache
    (one `LayerCaches` per stage). `features`: the rows' `drafting.dspark_features` [T, S*D] (from the
    `head.capture` streams of `streams_paged`). Rows are position-indexed: rejected ones are overwritten."""
    codec = KVCodec(head.cfg, fmt, head.model.dtype)
    for cache, kv in zip(caches, head.context_kv(features, plan.positions)):
        codec.store_main(cache.window, plan.seq_ids, plan.positions, kv)


def _dspark_contexts(head: DSparkHead, row: int, position: int, caches: list[LayerCaches],
                     codec: KVCodec) -> list[torch.Tensor]:
    """Per stage, the context entries [n, d] of the window before `position` of block-table row `row`."""
    window = torch.arange(max(0, position - head.cfg.sliding_window), position, device=caches[0].window.data.device)
    return [codec.read_main(c.window, torch.full_like(window, row), window) for c in caches]


@torch.no_grad()
def dspark_draft_paged(head: DSparkHead, anchors: Sequence[int], positions: Sequence[int], rows: Sequence[int],
                       caches: list[LayerCaches], fmt: CacheFormat, k: int) -> list[DSparkDraft]:
    """One DSpark block per sequence: `anchors[i]`, the token at `positions[i]` of block-table row `rows[i]`,
    drafted over the context that `dspark_context_paged` wrote for the positions before it."""
    codec = KVCodec(head.cfg, fmt, head.model.dtype)
    return [head.draft(anchor, p, _dspark_contexts(head, row, p, caches, codec), k)
            for anchor, p, row in zip(anchors, positions, rows)]


@torch.no_grad()
def dspark_blocks_paged(head: DSparkHead, anchors: Sequence[int], positions: Sequence[int], rows: Sequence[int],
                        caches: list[LayerCaches], fmt: CacheFormat, k: int) -> torch.Tensor:
    """`dspark_draft_paged`'s blocks before the Markov head: their hc_head outputs [n, k, D], for a framework
    that picks the drafts itself one step at a time (`DSparkHead.markov_logits` per step)."""
    codec = KVCodec(head.cfg, fmt, head.model.dtype)
    return torch.stack([head.block_hidden(anchor, p, _dspark_contexts(head, row, p, caches, codec), k)
                        for anchor, p, row in zip(anchors, positions, rows)])
