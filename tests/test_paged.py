"""Paged execution (the path both framework adapters run, through `streams_paged`) reproduces the whole-sequence oracle.

A small scheduler stands in for a framework: blocks come from a shuffled free list, several
sequences share each step (prefill chunks beside decode tokens), and one sequence starts from a
prefix another sequence computed (a prefix-cache hit: its block tables point at the same blocks).
"""

from __future__ import annotations

import pytest
import torch

from v4_plugin.checkpoint.config import LayerType, parse_config
from v4_plugin.cache.layout import IndexerCache
from v4_plugin.runtime import dispatch
from v4_plugin.runtime.batch import BatchPlan, StepLayout
from v4_plugin.runtime.model import V4Model
from v4_plugin.checkpoint.quant import QuantSim
from v4_plugin.cache.formats import EXACT, CacheFormat, KVStorage

from paged_engine import TinyEngine
from v4_plugin.checkpoint.tiny import TINY_PRESETS, random_weights

def _model(preset: str, quant: QuantSim) -> V4Model:
    cfg = parse_config(TINY_PRESETS[preset])
    return V4Model(cfg, random_weights(cfg, seed=0), quant=quant)


@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_mixed_batches_match_whole_sequence_forward(preset):
    """Exact mode: three sequences, interleaved prefill chunks and decode tokens, scrambled blocks."""
    model = _model(preset, EXACT.quant_sim(False))
    gen = torch.Generator().manual_seed(1)
    lengths = [300, 131, 9]
    seqs = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen) for n in lengths]
    engine = TinyEngine(model, EXACT, 3, max(lengths))
    done, got = [0, 0, 0], [[], [], []]
    schedule = [(0, 127), (1, 5), (2, 3)], [(0, 2), (1, 126), (2, 1)], [(0, 1), (1, 1), (2, 5)]
    steps = list(schedule) + [[(s, 1) for s in range(3)]] * 200
    for step in steps:
        chunks = [(s, seqs[s][done[s] : done[s] + n], done[s]) for s, n in step if done[s] < lengths[s]]
        if not chunks:
            break
        for (s, t, _), logits in zip(chunks, engine.step(chunks)):
            got[s].append(logits)
            done[s] += len(t)
    for s, ids in enumerate(seqs):
        torch.testing.assert_close(torch.cat(got[s]), model.forward(ids).logits, atol=2e-4, rtol=1e-4)


def test_prefix_hit_reuses_cached_entries():
    """Sequence 1 starts at position 200 on sequence 0's blocks and matches a full recompute."""
    model = _model("flash", EXACT.quant_sim(False))
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, model.cfg.vocab_size, (200,), generator=gen)
    tail = torch.randint(0, model.cfg.vocab_size, (60,), generator=gen)
    engine = TinyEngine(model, EXACT, 2, 300)
    engine.step([(0, prefix, 0)])
    engine.share_prefix(0, 1, 200)
    (logits,) = engine.step([(1, tail, 200)])
    expected = model.forward(torch.cat((prefix, tail))).logits[200:]
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("indexer", [IndexerCache.FP8, IndexerCache.FP4])
def test_quantized_records_match_the_simulating_reference(indexer):
    """FP8 records (and FP8/FP4 indexer keys) hold exactly what the reference simulates: with the
    same chunking, paged execution over byte records equals `step` with the matching QuantSim."""
    fmt = CacheFormat(KVStorage.FP8, indexer)
    quant = fmt.quant_sim(activations=True)
    model = _model("flash", quant)
    ids = torch.randint(0, model.cfg.vocab_size, (270,), generator=torch.Generator().manual_seed(3))
    engine = TinyEngine(model, fmt, 1, 300)
    cache = model.new_cache()
    for a, b in [(0, 130), (130, 131), (131, 270)]:
        (paged,) = engine.step([(0, ids[a:b], a)])
        torch.testing.assert_close(paged, model.step(ids[a:b], cache).logits, atol=1e-5, rtol=1e-5)
    assert model.cfg.layer_type(2) is LayerType.CSA
    assert engine.caches[2].compressed.data.dtype == torch.uint8  # really byte records


def test_a_decode_step_runs_the_same_ops_for_1_and_32_sequences():
    """Every op of a step takes all sequences at once: a decode step of 32 sequences (contexts 2 ... 129,
    on and off the 4- and 128-token edges, FP8 records and FP4 indexer keys) dispatches exactly the ops
    of a decode step of one, op by op; and the batched step's logits are each sequence's alone."""
    fmt = CacheFormat(KVStorage.FP8, IndexerCache.FP4)
    model = _model("flash", fmt.quant_sim(activations=True))
    gen = torch.Generator().manual_seed(4)
    lengths = [2 + 4 * i for i in range(32)]  # 2 ... 126 ...
    lengths[-1] = 129
    seqs = [torch.randint(0, model.cfg.vocab_size, (n + 1,), generator=gen) for n in lengths]
    engine = TinyEngine(model, fmt, 32, 140)
    engine.step([(s, ids[:-1], 0) for s, ids in enumerate(seqs)])
    decode = [(s, ids[-1:], len(ids) - 1) for s, ids in enumerate(seqs)]
    counts = {}
    for batch in (decode[:1], decode):
        with dispatch.count_calls() as (kernel, torch_ops):
            logits = engine.step(batch)
        counts[len(batch)] = kernel + torch_ops
    assert counts[1] == counts[32] and counts[1]["attention_paged"] == model.cfg.num_hidden_layers
    alone = TinyEngine(model, fmt, 1, 140)
    alone.step([(0, seqs[31][:-1], 0)])
    (expected,) = alone.step([(0, seqs[31][-1:], lengths[31])])
    torch.testing.assert_close(logits[31], expected, atol=1e-5, rtol=1e-5)


def test_an_adapters_layout_equals_the_derived_one():
    """`StepLayout.from_lengths` (from a framework's host-side counts, no sync) is what `BatchPlan` derives."""
    positions = torch.tensor([0, 1, 2, 7, 3, 4, 128])
    rows = torch.tensor([5, 5, 5, 2, 9, 9, 0])
    derived = BatchPlan(positions, rows).layout
    given = StepLayout.from_lengths([3, 1, 2, 1], [3, 8, 5, 129], torch.tensor([5, 2, 9, 0]))
    assert derived.max_len == given.max_len == 129
    for name in ("token_seq", "query_start", "rows"):
        assert torch.equal(getattr(derived, name), getattr(given, name)), name
    assert BatchPlan(positions, rows, given).layout is given
