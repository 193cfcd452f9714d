"""The reference model's two entry points agree: whole-sequence forward == chunked steps, at every position.

Compared in fp32 with the quantization simulation off (`QuantSim.off()`): with it on, a last-ulp
difference between two summation orders can flip one FP8 rounding and move a tiny random model's
logits by tenths, so only op-level checks on identical inputs run with it on (see
`test_compressor_state_matches_prefill_with_quantization`).
"""

from __future__ import annotations

import pytest
import torch

from v4_plugin.cache.formats import EXACT
from v4_plugin.checkpoint.config import LayerType, parse_config
from v4_plugin.runtime.batch import KVCodec
from v4_plugin.runtime.model import SequenceCache, V4Model
from v4_plugin.checkpoint.quant import QuantSim
from v4_plugin.runtime.ops import compressor as comp_ops
from v4_plugin.checkpoint.tiny import TINY_PRESETS, random_weights

LENGTHS = [1, 3, 4, 5, 127, 128, 129, 511, 513]
TOL = dict(atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module", params=["flash", "pro"])
def case(request):
    cfg = parse_config(TINY_PRESETS[request.param], f"tiny-{request.param}")
    model = V4Model(cfg, random_weights(cfg, seed=0), quant=QuantSim.off())
    ids = torch.randint(0, cfg.vocab_size, (max(LENGTHS),), generator=torch.Generator().manual_seed(7))
    return model, ids, model.forward(ids).logits


def _stepped(model: V4Model, ids: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    cache, outs, start = model.new_cache(), [], 0
    for end in sorted(set(cuts) | {len(ids)}):
        if end > start:
            outs.append(model.step(ids[start:end], cache).logits)
            start = end
    assert cache.num_tokens == len(ids)
    return torch.cat(outs)


@pytest.mark.parametrize("length", LENGTHS)
def test_forward_is_causal(case, length):
    """Logits at t depend only on tokens <= t: a prefix forward equals the longer forward's rows."""
    model, ids, full = case
    torch.testing.assert_close(model.forward(ids[:length]).logits, full[:length], **TOL)


@pytest.mark.parametrize("length", LENGTHS)
def test_prefill_then_decode(case, length):
    """Prefill L-1 tokens, then one decode step, then one more chunk: every position matches."""
    model, ids, full = case
    torch.testing.assert_close(_stepped(model, ids[:length], [length - 1]), full[:length], **TOL)


@pytest.mark.parametrize("length", LENGTHS)
def test_random_chunkings(case, length):
    model, ids, full = case
    gen = torch.Generator().manual_seed(length)
    for _ in range(2):
        cuts = torch.randint(1, length + 1, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen).tolist()
        torch.testing.assert_close(_stepped(model, ids[:length], cuts), full[:length], **TOL)


def test_chunks_at_block_and_window_edges(case):
    """Chunk boundaries on and around every 4-, 128- and window-edge, and single tokens there."""
    model, ids, full = case
    cuts = [1, 2, 3, 4, 5, 7, 8, 9, 126, 127, 128, 129, 130, 255, 256, 257, 383, 384, 385, 511, 512]
    torch.testing.assert_close(_stepped(model, ids, cuts), full, **TOL)


def test_token_by_token(case):
    """Pure decode from the first token: the ring, the partial blocks and the CSA carry at every step."""
    model, ids, full = case
    torch.testing.assert_close(_stepped(model, ids, list(range(1, len(ids)))), full, **TOL)


def test_selection_is_exercised(case):
    """The longest prompt has more visible CSA entries than index_topk, so top-k really selects."""
    model, ids, _ = case
    assert len(ids) // 4 > 2 * model.cfg.index_topk


def test_separate_sequences_do_not_share_state(case):
    """A fresh cache starts from empty compressor state: a second sequence is unaffected by the first."""
    model, ids, full = case
    other = model.new_cache()
    model.step(ids.flip(0)[:200], other)
    torch.testing.assert_close(_stepped(model, ids[:200], [37, 150]), full[:200], **TOL)


@pytest.mark.parametrize("kind", [LayerType.CSA, LayerType.HCA])
def test_compressor_rows_reproduce_prefill_pooling_bitwise(kind):
    """The compressor rows a step leaves in the state cache, fed in uneven chunks, pool exactly the entries
    the prefill form pools (main and indexer compressors).

    Bitwise equality is what lets the quantization simulation that follows (FP8 / FP4 rounding of
    each entry) agree between prefill and decode with the simulation on.
    """
    cfg = parse_config(TINY_PRESETS["flash"])
    model = V4Model(cfg, random_weights(cfg, seed=2), quant=QuantSim.off())
    block = next(b for b in model.blocks if b.kind is kind)
    m, t = block.ratio, 3 * block.ratio + 3
    x = torch.randn(t, cfg.hidden_size, generator=torch.Generator().manual_seed(m))
    cache, codec = SequenceCache(cfg, [kind], model.dtype, "cpu"), KVCodec(cfg, EXACT, model.dtype)
    start = 0
    for end in (1, m - 1, m, m + 2, 2 * m + 1, t):
        block.attention(x[start:end], cache.plan(end - start), cache.layers[0], codec)
        cache.num_tokens, start = end, end
    caches = [("compressed", False)] + ([("index_keys", True)] if kind is LayerType.CSA else [])
    for name, indexer in caches:
        kv, gate, ape = block._projections(x, indexer)
        want = comp_ops.finish_entries(comp_ops.compress_sequence(kv, gate, ape, kind is LayerType.CSA),
                                       torch.arange(t // m), **block.finish_args(indexer))
        assert torch.equal(getattr(cache.layers[0], name).data[0, : t // m], want), name
