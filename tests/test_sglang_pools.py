"""The SGLang pools' sizing: the formula SGLang's pool configurator uses (`pools.token_capacity`)
against the bytes the pool really allocates, and its compressed part against `v4_plugin.layout`."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang")

from sglang_backend import pools  # noqa: E402
from v4_plugin.config import LayerType, parse_config, preset_config  # noqa: E402
from v4_plugin.layout import IndexerCache, plan  # noqa: E402
from v4_plugin.tiny import TINY_PRESETS  # noqa: E402

PAGE = 128


def _storages():
    return [pools.StorageChoice(True, None, torch.float32), pools.StorageChoice(True, None, torch.bfloat16),
            pools.StorageChoice(False, IndexerCache.FP8, torch.bfloat16),
            pools.StorageChoice(False, IndexerCache.FP4, torch.bfloat16)]


@pytest.mark.parametrize("preset", ["flash", "pro"])
@pytest.mark.parametrize("st", _storages(), ids=lambda s: f"{'float' if s.float_kv else s.indexer.value}-{s.dtype}")
def test_pool_bytes_match_the_formula_within_one_percent(preset, st):
    cfg = parse_config(TINY_PRESETS[preset])
    memory = 256 * 2**20
    tokens = pools.token_capacity(cfg, memory, page_size=PAGE, float_kv=st.float_kv, dtype=st.dtype,
                                  indexer=st.indexer or IndexerCache.FP8)
    assert tokens % PAGE == 0 and tokens > 0
    pool = pools._pool_class()(cfg, st, size=tokens, page_size=PAGE, device="cpu")
    allocated = sum(t.numel() * t.element_size() for layer in pool.layers for t in layer.values())
    usable = allocated * (pool.num_pages - 1) / pool.num_pages  # SGLang's padding page 0 is not usable
    assert usable <= memory
    assert usable >= 0.99 * memory  # the formula wastes < 1 % (page rounding: < 1 page of ~25k+ slots)
    # shapes: per-token caches P rows per page, compressed caches P/m rows per page
    for kind, layer in zip(cfg.layer_types, pool.layers):
        assert layer["window"].shape[:2] == (pool.num_pages, PAGE)
        if kind is not LayerType.SWA:
            assert layer["compressed"].shape[:2] == (pool.num_pages, PAGE // kind.ratio)


@pytest.mark.parametrize("model", ["flash", "pro"])
@pytest.mark.parametrize("fmt", [IndexerCache.FP8, IndexerCache.FP4])
def test_compressed_part_equals_the_planner(model, fmt):
    """With FP8 records, the compressed entries + indexer keys a token slot pays for are exactly the
    planner's bytes per token; the rest of a slot is the window entry and compressor rows, which the
    planner counts per sequence (the pool keeps them per token: see the README's limits)."""
    cfg = preset_config(model)
    st = pools.StorageChoice(False, fmt, torch.bfloat16)
    compressed = 0.0
    for kind in cfg.layer_types:
        spec = pools.entry_specs(cfg, kind, st)
        for name in pools.PER_ENTRY:
            if name in spec:
                compressed += pools._bytes(spec[name]) / kind.ratio
    assert compressed == pytest.approx(plan(cfg, context=2**20, indexer_cache=fmt).bytes_per_token, rel=1e-12)
