"""A stand-in block manager for tests of the core's paged execution (`v4_plugin.runtime.paged`)."""

from __future__ import annotations

import torch

from v4_plugin.runtime.model import V4Model
from v4_plugin.runtime.paged import BatchPlan, LayerCaches, PagedCache, forward_paged
from v4_plugin.cache.formats import CacheFormat, cache_entry

BLOCK_TOKENS = 16  # entries per block of every cache (ratio 128 entries waste most of their block: fine here)


class TinyEngine:
    """Allocates paged caches and block tables the way a block manager would, for `forward_paged`."""

    def __init__(self, model: V4Model, fmt: CacheFormat, num_seqs: int, max_tokens: int):
        self.model, self.fmt = model, fmt
        self.gen = torch.Generator().manual_seed(5)
        self.max_blocks = max_tokens // BLOCK_TOKENS + 1
        self.num_blocks = num_seqs * self.max_blocks + 3
        self.num_seqs = num_seqs
        self.caches = [self._allocate(block) for block in model.blocks]
        self.mtp_caches = [self._allocate(block) for block in model.mtp_blocks]  # the MTP blocks' window caches

    def _allocate(self, block) -> LayerCaches:
        layer = {}
        for name, (width, dtype) in cache_entry(self.model.cfg, block.kind, self.fmt, self.model.dtype).items():
            data = torch.full((self.num_blocks, BLOCK_TOKENS, width), 7, dtype=dtype)  # garbage until written
            table = torch.randperm(self.num_blocks, generator=self.gen)[: self.num_seqs * self.max_blocks]
            layer[name] = PagedCache(data, table.view(self.num_seqs, -1))
        return LayerCaches(**layer)

    def share_prefix(self, src: int, dst: int, tokens: int) -> None:
        """Point dst's blocks for the first `tokens` positions (and their entries) at src's blocks."""
        for block, layer in zip(self.model.blocks, self.caches):
            for name in ("window", "state", "compressed", "index_state", "index_keys"):
                cache = getattr(layer, name)
                if cache is None:
                    continue
                entries = tokens // block.ratio if name in ("compressed", "index_keys") else tokens
                full = entries // BLOCK_TOKENS
                cache.block_table[dst, :full] = cache.block_table[src, :full]
                if entries % BLOCK_TOKENS:  # a partly filled block is copied, as copy-on-write would
                    cache.data[cache.block_table[dst, full]] = cache.data[cache.block_table[src, full]]

    @staticmethod
    def plan(chunks: list[tuple[int, torch.Tensor, int]]) -> BatchPlan:
        """The `BatchPlan` of chunks (sequence, token ids, first position)."""
        positions = torch.cat([torch.arange(p, p + len(t)) for _, t, p in chunks])
        seq_ids = torch.cat([torch.full((len(t),), s) for s, t, _ in chunks])
        return BatchPlan(positions, seq_ids)

    def step(self, chunks: list[tuple[int, torch.Tensor, int]]) -> list[torch.Tensor]:
        """chunks: (sequence, token ids, first position); returns the logits of each chunk."""
        ids = torch.cat([c[1] for c in chunks])
        logits = forward_paged(self.model, ids, self.plan(chunks), self.caches, self.fmt).logits
        return list(logits.split([len(c[1]) for c in chunks]))
