"""Paged execution: `V4Model` over caches that a serving framework allocates and pages.

A framework's block manager hands out fixed-size blocks; the adapter passes, per layer and cache, a
`PagedCache` (the storage plus one block-table row per sequence) and a `BatchPlan` (the position and
sequence of every token of the step). Everything a layer keeps is indexed by position or by
compressed-entry number, so chunked prefill, mixed prefill/decode batches, prefix-cache hits and
recomputation after preemption all reduce to "these entries are in the cache":

* window: the raw KV of position p (the adapter may free blocks older than the window);
* state: the compressor's per-token rows [value | ape-biased gate] of position p, fp32 (only the
  last c*m positions are ever read: they are the carried partial blocks);
* compressed / index_keys: entry j, written when position (j+1)*m - 1 arrives;
* index_state: the indexer compressor's per-token rows (CSA).

Entries are stored as floats in the compute dtype (`KVStorage.FLOAT`, exact) or as the byte records
of `v4_plugin.cache.records` (`KVStorage.FP8`; indexer keys FP8 or FP4). With the matching `QuantSim`
(kv_cache on for FP8 storage, indexer on for FP4 keys) the stored values are exactly the simulated
ones, so paged execution reproduces `V4Model.step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from v4_plugin.runtime import dispatch
from v4_plugin.checkpoint.config import LayerType, V4Config
from v4_plugin.runtime.drafting import DSparkDraft, DSparkHead
from v4_plugin.cache.records import unpack_indexer, unpack_main
from v4_plugin.cache.formats import CacheFormat, KVStorage
from v4_plugin.runtime.model import Block, ModelOutput, V4Model
from v4_plugin.runtime.ops import attention as attn_ops


@dataclass
class PagedCache:
    """One paged cache of one layer: entry e of sequence s is data[block_table[s, e // bs], e % bs]."""

    data: torch.Tensor  # [num_blocks, block_size, width]
    block_table: torch.Tensor  # [num_seqs, max_blocks] block ids into data

    def _where(self, seq_ids: torch.Tensor, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.data.shape[1]
        blocks = self.block_table[seq_ids, entries // bs].long()
        return blocks, entries % bs

    def read(self, seq_ids: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """Rows [*entries.shape, width] for matching (sequence, entry) index tensors."""
        return self.data[self._where(seq_ids, entries)]

    def write(self, seq_ids: torch.Tensor, entries: torch.Tensor, rows: torch.Tensor) -> None:
        self.data[self._where(seq_ids, entries)] = rows.to(self.data.dtype)


@dataclass
class LayerCaches:
    window: PagedCache
    state: PagedCache | None = None
    compressed: PagedCache | None = None
    index_state: PagedCache | None = None
    index_keys: PagedCache | None = None


@dataclass
class BatchPlan:
    """The tokens of one step: a chunk per sequence, contiguous in the batch and in position."""

    positions: torch.Tensor  # int64 [T]
    seq_ids: torch.Tensor  # int64 [T]: block-table row of each token's sequence

    def sequences(self) -> list[tuple[int, slice, int, int]]:
        """(block-table row, token slice, first position, last position) of each sequence."""
        ids = self.seq_ids.tolist()
        out, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[start]:
                out.append((ids[start], slice(start, i), int(self.positions[start]), int(self.positions[i - 1])))
                start = i
        return out


class _Codec:
    """Store entries into a layer's paged caches in their storage format, and decode what is read back.

    Quantized stores and the compressor's pooling go through `dispatch` (the KV-store and fused
    compressor kernels on GPUs, which write the records at the caches' slots directly).
    """

    def __init__(self, cfg: V4Config, fmt: CacheFormat, dtype: torch.dtype):
        self.cfg, self.fmt, self.dtype = cfg, fmt, dtype

    def store_main(self, cache: PagedCache, seq_ids: torch.Tensor, entries: torch.Tensor, kv: torch.Tensor) -> None:
        """Write KV entries kv [N, head_dim] (window or compressed) at (seq_ids, entries) of `cache`."""
        if self.fmt.kv is KVStorage.FP8:
            dispatch.store_main(kv, cache.data, *cache._where(seq_ids, entries), self.cfg)
        else:
            cache.write(seq_ids, entries, kv)

    def get_main(self, rows: torch.Tensor) -> torch.Tensor:
        return unpack_main(rows, self.cfg, self.dtype) if self.fmt.kv is KVStorage.FP8 else rows

    def store_keys(self, cache: PagedCache, seq_ids: torch.Tensor, entries: torch.Tensor, keys: torch.Tensor) -> None:
        """Write indexer keys [N, index_head_dim] at (seq_ids, entries) of `cache`."""
        if self.fmt.indexer is None:
            cache.write(seq_ids, entries, keys)
        else:
            dispatch.store_indexer(keys, cache.data, *cache._where(seq_ids, entries), self.cfg, self.fmt.indexer)

    def get_keys(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.fmt.indexer is None else unpack_indexer(rows, self.cfg, self.fmt.indexer, self.dtype)

    def store_pooled(self, cache: PagedCache, seq_ids: torch.Tensor, block_ids: torch.Tensor, pooling: tuple,
                     finish: dict) -> None:
        """Pool, finish and store complete compressor blocks as entries (seq_ids, block_ids) of `cache`.

        `pooling`: (kv, score, overlap, before_kv, before_score) as `ops.compressor.pool` takes them;
        `finish`: the keywords of `ops.compressor.finish_entries` (`Block.finish_args`).
        Quantization-simulated entries of a quantized cache take the fused pool + finish + store.
        """
        indexer = finish["indexer"]
        quantized = self.fmt.indexer is not None if indexer else self.fmt.kv is KVStorage.FP8
        if quantized and finish["simulate_quant"]:
            blocks, offsets = cache._where(seq_ids, block_ids)
            fused = {k: v for k, v in finish.items() if k != "simulate_quant"}
            dispatch.pool_finish_store(*pooling, block_ids=block_ids, **fused, data=cache.data, blocks=blocks,
                                       offsets=offsets, cfg=self.cfg, fmt=self.fmt.indexer)
            return
        entries = dispatch.pool_finish(*pooling, block_ids=block_ids, **finish)
        (self.store_keys if indexer else self.store_main)(cache, seq_ids, block_ids, entries)


def _emit_entries(block: Block, x: torch.Tensor, plan: BatchPlan, state: PagedCache, out: PagedCache,
                  indexer: bool, codec: _Codec) -> None:
    """Write this step's compressor rows, then pool and store every block they complete."""
    m, overlap = block.ratio, block.kind is LayerType.CSA
    kv, gate, ape = block._projections(x, indexer)
    pos, seq = plan.positions, plan.seq_ids
    state.write(seq, pos, torch.cat((kv, gate + ape[pos % m]), dim=1))
    done = (pos + 1) % m == 0
    if not bool(done.any()):
        return
    seq_j, block_j = seq[done], pos[done] // m
    offsets = torch.arange(m, device=pos.device)
    rows = state.read(seq_j[:, None], block_j[:, None] * m + offsets).float()  # [n, m, 2*c*e]
    cur_kv, cur_score = rows.chunk(2, dim=-1)
    before_kv = before_score = None
    if overlap:
        has_prev = (block_j > 0)[:, None, None]
        prev = state.read(seq_j[:, None], ((block_j - 1).clamp(min=0) * m)[:, None] + offsets).float()
        prev_kv, prev_score = prev.chunk(2, dim=-1)
        before_kv = torch.where(has_prev, prev_kv, torch.zeros_like(prev_kv))
        before_score = torch.where(has_prev, prev_score, torch.full_like(prev_score, float("-inf")))
    codec.store_pooled(out, seq_j, block_j, (cur_kv, cur_score, overlap, before_kv, before_score),
                       block.finish_args(indexer))


def attention_paged(block: Block, x: torch.Tensor, plan: BatchPlan, caches: LayerCaches,
                    codec: _Codec) -> torch.Tensor:
    """One layer's attention for a batch step over paged caches: x [T, D] -> [T, D]."""
    cfg, win = block.cfg, block.cfg.sliding_window
    pos, seq = plan.positions, plan.seq_ids
    c_q, q = block._query(x, pos)
    codec.store_main(caches.window, seq, pos, block._window_kv(x, pos))
    if block.kind is not LayerType.SWA:
        _emit_entries(block, x, plan, caches.state, caches.compressed, False, codec)
        if block.kind is LayerType.CSA:
            _emit_entries(block, x, plan, caches.index_state, caches.index_keys, True, codec)

    outputs = []
    for row, tokens, first, last in plan.sequences():
        positions = pos[tokens]
        lo = max(0, first - win + 1)
        window_pos = torch.arange(lo, last + 1, device=pos.device)
        kv = codec.get_main(caches.window.read(torch.full_like(window_pos, row), window_pos))
        wp = attn_ops.window_positions(positions, win)
        indices = torch.where(wp >= 0, wp - lo, wp)
        if block.kind is not LayerType.SWA:
            entries = torch.arange((last + 1) // block.ratio, device=pos.device)
            rows = torch.full_like(entries, row)
            compressed = codec.get_main(caches.compressed.read(rows, entries))
            keys = codec.get_keys(caches.index_keys.read(rows, entries)) if block.kind is LayerType.CSA else None
            chosen = block._compressed_indices(x[tokens], c_q[tokens], positions, len(entries), keys)
            indices = torch.cat((indices, torch.where(chosen >= 0, chosen + kv.shape[0], chosen)), dim=1)
            kv = torch.cat((kv, compressed))
        outputs.append(block._attend(q[tokens], kv, indices, positions))
    return torch.cat(outputs)


@torch.no_grad()  # not inference_mode: frameworks update the returned tensors in place (temperature)
def streams_paged(model: V4Model, token_ids: torch.Tensor, plan: BatchPlan, caches: list[LayerCaches],
                  fmt: CacheFormat, capture: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One step of a batch of sequences over paged caches (one `LayerCaches` per main layer), up to the
    head: the last layer's pre-hc_head streams [T, hc, D] (the MTP input; `model.logits` finishes them)
    and the output streams of the main layers named in `capture`."""
    codec = _Codec(model.cfg, fmt, model.dtype)
    x, captured = model._streams(token_ids), {}
    for i, (block, layer_caches) in enumerate(zip(model.blocks, caches)):
        x = block.forward(x, token_ids, lambda u, b=block, c=layer_caches: attention_paged(b, u, plan, c, codec))
        if i in capture:
            captured[i] = x
    return x, captured


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
    model._require_mtp()
    block = model.mtp_blocks[depth]
    codec = _Codec(model.cfg, fmt, model.dtype)
    x = model._mtp_input(streams, next_ids, depth)
    return block.forward(x, next_ids, lambda u: attention_paged(block, u, plan, caches, codec))


@torch.no_grad()
def dspark_context_paged(head: DSparkHead, features: torch.Tensor, plan: BatchPlan, caches: list[LayerCaches],
                         fmt: CacheFormat) -> None:
    """Write every DSpark stage's context KV for this step's target rows into that stage's window cache
    (one `LayerCaches` per stage). `features`: the rows' `drafting.dspark_features` [T, S*D] (from the
    `head.capture` streams of `streams_paged`). Rows are position-indexed: rejected ones are overwritten."""
    codec = _Codec(head.cfg, fmt, head.model.dtype)
    for cache, kv in zip(caches, head.context_kv(features, plan.positions)):
        codec.store_main(cache.window, plan.seq_ids, plan.positions, kv)


def _dspark_contexts(head: DSparkHead, row: int, position: int, caches: list[LayerCaches],
                     codec: _Codec) -> list[torch.Tensor]:
    """Per stage, the context entries [n, d] of the window before `position` of block-table row `row`."""
    window = torch.arange(max(0, position - head.cfg.sliding_window), position, device=caches[0].window.data.device)
    return [codec.get_main(c.window.read(torch.full_like(window, row), window)) for c in caches]


@torch.no_grad()
def dspark_draft_paged(head: DSparkHead, anchors: Sequence[int], positions: Sequence[int], rows: Sequence[int],
                       caches: list[LayerCaches], fmt: CacheFormat, k: int) -> list[DSparkDraft]:
    """One DSpark block per sequence: `anchors[i]`, the token at `positions[i]` of block-table row `rows[i]`,
    drafted over the context that `dspark_context_paged` wrote for the positions before it."""
    codec = _Codec(head.cfg, fmt, head.model.dtype)
    return [head.draft(anchor, p, _dspark_contexts(head, row, p, caches, codec), k)
            for anchor, p, row in zip(anchors, positions, rows)]


@torch.no_grad()
def dspark_blocks_paged(head: DSparkHead, anchors: Sequence[int], positions: Sequence[int], rows: Sequence[int],
                        caches: list[LayerCaches], fmt: CacheFormat, k: int) -> torch.Tensor:
    """`dspark_draft_paged`'s blocks before the Markov head: their hc_head outputs [n, k, D], for a framework
    that picks the drafts itself one step at a time (`DSparkHead.markov_logits` per step)."""
    codec = _Codec(head.cfg, fmt, head.model.dtype)
    return torch.stack([head.block_hidden(anchor, p, _dspark_contexts(head, row, p, caches, codec), k)
                        for anchor, p, row in zip(anchors, positions, rows)])
