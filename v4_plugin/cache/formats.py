"""The cache formats a server may choose: how window and compressed KV entries and indexer keys are
stored, what each layer type allocates per entry, and the quantization simulation that makes the
model's values equal what those caches hold."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from v4_plugin.cache.layout import IndexerCache, indexer_entry_bytes, main_entry_bytes
from v4_plugin.checkpoint.config import LayerType, V4Config
from v4_plugin.checkpoint.quant import QuantSim


class KVStorage(enum.Enum):
    """How window and compressed KV entries are stored."""

    FLOAT = "float"  # the compute dtype, unquantized (exact mode)
    FP8 = "fp8"  # the 584-byte records of `v4_plugin.cache.records.pack_main`


@dataclass(frozen=True)
class CacheFormat:
    """How a server stores KV entries and indexer keys (FP8 records and FP8 keys by default)."""

    kv: KVStorage = KVStorage.FP8
    indexer: IndexerCache | None = IndexerCache.FP8  # None: float indexer keys

    def quant_sim(self, activations: bool) -> QuantSim:
        """The quantization simulation matching this storage: quantized caches hold simulated values."""
        return QuantSim(activations=activations, kv_cache=self.kv is KVStorage.FP8, indexer=self.indexer is not None)


EXACT = CacheFormat(KVStorage.FLOAT, None)

COMPRESSED_CACHES = ("compressed", "index_keys")  # one entry per m positions; the other caches, one per position


def cache_entry(cfg: V4Config, kind: LayerType, fmt: CacheFormat,
                dtype: torch.dtype) -> dict[str, tuple[int, torch.dtype]]:
    """Per cache of one layer type: (elements per entry, element dtype) to allocate."""
    if fmt.kv is KVStorage.FP8:
        main = (main_entry_bytes(cfg), torch.uint8)
    else:
        main = (cfg.head_dim, dtype)
    out = {"window": main}
    if kind is LayerType.SWA:
        return out
    c = 2 if kind is LayerType.CSA else 1
    out["state"] = (2 * c * cfg.head_dim, torch.float32)
    out["compressed"] = main
    if kind is LayerType.CSA:
        di = cfg.index_head_dim
        out["index_state"] = (2 * 2 * di, torch.float32)
        out["index_keys"] = (di, dtype) if fmt.indexer is None else (indexer_entry_bytes(cfg, fmt.indexer), torch.uint8)
    return out
