"""One step of a batch and the paged caches it reads and writes: the cache interface of `Block.attention`.

A serving framework's block manager hands out fixed-size blocks; its adapter passes, per layer and
cache, a `PagedCache` (the storage plus one block-table row per sequence) and one `BatchPlan` per step
(the position and block-table row of every token). The reference `V4Model.step` runs the same path
over a `SequenceCache`: one sequence in one growing block. Everything a layer keeps is indexed by
position or by compressed-entry number, so chunked prefill, mixed prefill/decode batches, prefix-cache
hits, recomputation after preemption and rejected drafts all reduce to "these entries are in the cache"
(a rejected row is written over by the next step; nothing is rolled back):

* window: the raw KV of position p (the adapter may free blocks older than the window);
* state: the compressor's per-token rows [value | ape-biased gate] of position p, fp32 (only the
  last c*m positions are ever read: they are the carried partial blocks);
* compressed / index_keys: entry j, written when position (j+1)*m - 1 arrives;
* index_state: the indexer compressor's per-token rows (CSA).

Entries are stored as floats in the compute dtype (`KVStorage.FLOAT`, exact) or as the byte records
of `v4_plugin.cache.records` (`KVStorage.FP8`; indexer keys FP8 or FP4); `KVCodec` writes them and
the attention and indexer ops read them where they lie, through slots (`PagedCache.slots`). With the
matching `QuantSim` (kv_cache on for FP8 storage, indexer on for FP4 keys) the stored values are
exactly the simulated ones, so every storage reproduces the float one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from v4_plugin.cache.formats import CacheFormat, KVStorage
from v4_plugin.cache.records import unpack_main
from v4_plugin.checkpoint.config import V4Config
from v4_plugin.runtime import dispatch


@dataclass
class PagedCache:
    """One paged cache of one layer: entry e of the sequence in block-table row r is
    data[block_table[r, e // block_size], e % block_size]."""

    data: torch.Tensor  # [num_blocks, block_size, width]
    block_table: torch.Tensor  # [num_rows, max_blocks] block ids into data

    def locate(self, rows: torch.Tensor, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of each (block-table row, entry) pair; int64 index tensors of one shape."""
        bs = self.data.shape[1]
        return self.block_table[rows, entries // bs].long(), entries % bs

    def slots(self, rows: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """The slots in `flat()` of (row, entry) pairs (broadcast); entries < 0 give slot -1."""
        blocks, offsets = self.locate(rows, entries.clamp(min=0))
        return torch.where(entries >= 0, dispatch.flat_slots(self.data, blocks, offsets), -1)

    def flat(self) -> torch.Tensor:
        """The storage as rows [n, width] that `slots` address, sharing its memory."""
        return dispatch.flat_rows(self.data)

    def read(self, rows: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """Rows [*entries.shape, width] for matching (block-table row, entry) index tensors."""
        return self.data[self.locate(rows, entries)]

    def write(self, rows: torch.Tensor, entries: torch.Tensor, values: torch.Tensor) -> None:
        self.data[self.locate(rows, entries)] = values.to(self.data.dtype)


@dataclass
class LayerCaches:
    """The caches of one layer (`cache.formats.cache_entry` names them per layer type)."""

    window: PagedCache
    state: PagedCache | None = None
    compressed: PagedCache | None = None
    index_state: PagedCache | None = None
    index_keys: PagedCache | None = None


@dataclass(frozen=True)
class StepLayout:
    """The sequences of a step: derived once per step from its `BatchPlan`, or given by an adapter from its
    framework's host-side metadata (`from_lengths`), so that finding them needs no host sync."""

    token_seq: torch.Tensor  # int64 [T]: the sequence (0 ... B-1, batch order) of each token
    query_start: torch.Tensor  # int32 [B + 1]: first token of each sequence, then T
    rows: torch.Tensor  # int64 [B]: each sequence's block-table row
    max_len: int  # the longest sequence's length after the step (positions + 1)

    @classmethod
    def from_lengths(cls, query_lens: list[int], seq_lens: list[int], rows: torch.Tensor) -> "StepLayout":
        """From host-side counts: tokens of each sequence in the step and its length after it; rows [B] on
        the compute device."""
        device = rows.device
        start = [0]
        for n in query_lens:
            start.append(start[-1] + n)
        counts = torch.tensor(query_lens, device=device)
        token_seq = torch.repeat_interleave(torch.arange(len(query_lens), device=device), counts,
                                            output_size=start[-1])
        return cls(token_seq, torch.tensor(start, dtype=torch.int32, device=device), rows.long(),
                   max(seq_lens, default=0))


@dataclass(eq=False)
class BatchPlan:
    """The tokens of one step: a chunk per sequence, contiguous in the batch and in position."""

    positions: torch.Tensor  # int64 [T]
    seq_ids: torch.Tensor  # int64 [T]: block-table row of each token's sequence
    known_layout: StepLayout | None = None  # the adapter's (`StepLayout.from_lengths`), else derived
    _completing: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def layout(self) -> StepLayout:
        """The step's sequences: the adapter's, or derived on first use (one host sync per step, none per layer)."""
        if self.known_layout is not None:
            return self.known_layout
        pos, ids = self.positions, self.seq_ids
        new = torch.ones_like(ids, dtype=torch.bool)
        new[1:] = ids[1:] != ids[:-1]
        starts = new.nonzero().squeeze(1)
        ends = torch.cat((starts[1:], starts.new_tensor([len(ids)])))
        return StepLayout(token_seq=new.cumsum(0) - 1, query_start=torch.cat((starts, ends[-1:])).to(torch.int32),
                          rows=ids[starts], max_len=int(pos[ends - 1].max()) + 1 if len(ids) else 0)

    def completing(self, ratio: int) -> torch.Tensor:
        """The tokens (indices into the step, int64 [n]) whose position completes a compressor block of
        `ratio` (once per step and ratio)."""
        if ratio not in self._completing:
            self._completing[ratio] = ((self.positions + 1) % ratio == 0).nonzero().squeeze(1)
        return self._completing[ratio]


class KVCodec:
    """Writes entries into a layer's paged caches in a `CacheFormat`; quantized stores and the
    compressor's pooling go through `dispatch` (the KV-store and fused compressor kernels on GPUs,
    which write the records at the caches' slots directly)."""

    def __init__(self, cfg: V4Config, fmt: CacheFormat, dtype: torch.dtype):
        self.cfg, self.fmt, self.dtype = cfg, fmt, dtype

    def store_main(self, cache: PagedCache, rows: torch.Tensor, entries: torch.Tensor, kv: torch.Tensor) -> None:
        """Write KV entries kv [N, head_dim] (window or compressed) at (rows, entries) of `cache`."""
        if self.fmt.kv is KVStorage.FP8:
            dispatch.store_main(kv, cache.data, *cache.locate(rows, entries), self.cfg)
        else:
            cache.write(rows, entries, kv)

    def store_keys(self, cache: PagedCache, rows: torch.Tensor, entries: torch.Tensor, keys: torch.Tensor) -> None:
        """Write indexer keys [N, index_head_dim] at (rows, entries) of `cache`."""
        if self.fmt.indexer is None:
            cache.write(rows, entries, keys)
        else:
            dispatch.store_indexer(keys, cache.data, *cache.locate(rows, entries), self.cfg, self.fmt.indexer)

    def store_pooled(self, cache: PagedCache, rows: torch.Tensor, block_ids: torch.Tensor, pooling: tuple,
                     finish: dict) -> None:
        """Pool, finish and store complete compressor blocks as entries (rows, block_ids) of `cache`.

        `pooling`: (kv, score, overlap, before_kv, before_score) as `ops.compressor.pool` takes them;
        `finish`: the keywords of `ops.compressor.finish_entries` (`Block.finish_args`).
        Quantization-simulated entries of a quantized cache take the fused pool + finish + store.
        """
        indexer = finish["indexer"]
        quantized = self.fmt.indexer is not None if indexer else self.fmt.kv is KVStorage.FP8
        if quantized and finish["simulate_quant"]:
            blocks, offsets = cache.locate(rows, block_ids)
            fused = {k: v for k, v in finish.items() if k != "simulate_quant"}
            dispatch.pool_finish_store(*pooling, block_ids=block_ids, **fused, data=cache.data, blocks=blocks,
                                       offsets=offsets, cfg=self.cfg, fmt=self.fmt.indexer)
            return
        entries = dispatch.pool_finish(*pooling, block_ids=block_ids, **finish)
        (self.store_keys if indexer else self.store_main)(cache, rows, block_ids, entries)

    def read_main(self, cache: PagedCache, rows: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """KV entries [N, head_dim] at (rows, entries) [N] in the compute dtype, decoded from their records."""
        data = cache.read(rows, entries)
        return unpack_main(data, self.cfg, self.dtype) if self.fmt.kv is KVStorage.FP8 else data
