"""A token's result does not depend on what shares its step, with the quantization simulation on.

The default serving mode simulates the trained-in FP8 activation quantization, which turns a
last-ulp difference into a different FP8 rounding and, tokens later, a different greedy token. So
a speculative verify step (k + 1 rows of a sequence), a plain decode step (one row) and a batch of
other requests must give each row bit-identical logits: `ops.matmul` keeps every token-dimension
product row-invariant (issue 16: drafting changed vLLM's greedy output in the default mode).
"""

from __future__ import annotations

import random

import pytest
import torch

from paged_engine import TinyEngine
from v4_plugin.checkpoint.config import parse_config
from v4_plugin.runtime.model import V4Model
from v4_plugin.checkpoint.quant import QuantSim
from v4_plugin.runtime.ops.invariant import matmul, rows_times_transposed
from v4_plugin.cache.formats import CacheFormat
from v4_plugin.checkpoint.tiny import TINY_PRESETS, random_weights

ROW_COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 31, 40, 128, 129, 513]


@pytest.mark.parametrize("k,n", [(64, 24), (128, 384), (448, 512), (4096, 1024)])
def test_matmul_rows_do_not_depend_on_the_row_count(k, n):
    """On the running CPU's BLAS: each row of an M-row product equals that row in a 600-row product."""
    gen = torch.Generator().manual_seed(k + n)
    x, w = torch.randn(600, k, generator=gen), torch.randn(n, k, generator=gen)
    want = rows_times_transposed(x, w)
    for m in ROW_COUNTS:
        assert torch.equal(rows_times_transposed(x[-m:], w), want[-m:]), f"{m} rows, K={k}, N={n}"
    groups = torch.randn(4, k, n, generator=gen)  # the grouped output projection's batched form
    batched = matmul(x.unflatten(0, (4, -1)), groups)
    for m in ROW_COUNTS[:12]:
        assert torch.equal(matmul(x.unflatten(0, (4, -1))[:, :m], groups), batched[:, :m]), f"{m} rows, batched"


@pytest.fixture(scope="module", params=["flash", "pro"])
def model(request) -> V4Model:
    cfg = parse_config(TINY_PRESETS[request.param], f"tiny-{request.param}")
    return V4Model(cfg, random_weights(cfg, seed=0), quant=QuantSim())


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 383, (n,), generator=torch.Generator().manual_seed(seed))


def _stepped(model: V4Model, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    cache, out, done = model.new_cache(), [], 0
    for size in chunks:
        out.append(model.step(ids[done : done + size], cache).logits)
        done += size
    return torch.cat(out)


def test_verify_chunks_equal_single_steps(model):
    """Default quantization: after a 125-token prefill, chunks of k + 1 = 4 and 6 rows (a verify step)
    give the logits of one-token steps bit for bit, across the 4- and 128-token block edges, and so do
    random chunkings of the whole sequence."""
    ids = _ids(270, seed=3)
    single = _stepped(model, ids, [125] + [1] * 145)
    for k in (3, 5):
        assert torch.equal(_stepped(model, ids, [125] + [k + 1] * (145 // (k + 1)) + [145 % (k + 1)]), single)
    rng = random.Random(0)
    chunks = []
    while sum(chunks) < len(ids):
        chunks.append(min(rng.choice([1, 2, 3, 7, 17, 64]), len(ids) - sum(chunks)))
    whole = _stepped(model, ids, chunks)
    assert torch.equal(whole[125:], single[125:])


def test_a_neighbour_in_the_batch_changes_nothing(model):
    """Paged execution, FP8 caches and FP4 indexer keys: a sequence decoded alone, and the same sequence
    decoded beside two others (one prefilling in chunks, one decoding), gets bit-identical logits."""
    fmt = CacheFormat()
    seqs = [_ids(n, seed=n) for n in (140, 90, 30)]
    alone, together = TinyEngine(model, fmt, 1, 160), TinyEngine(model, fmt, 3, 160)
    want = [alone.step([(0, seqs[0][:130], 0)])[0][-1:]]
    got = [together.step([(0, seqs[0][:130], 0), (1, seqs[1][:60], 0), (2, seqs[2][:1], 0)])[0][-1:]]
    for p in range(130, 140):
        want.append(alone.step([(0, seqs[0][p : p + 1], p)])[0])
        neighbours = [(1, seqs[1][60 + 3 * (p - 130) : 63 + 3 * (p - 130)], 60 + 3 * (p - 130)),
                      (2, seqs[2][p - 129 : p - 128], p - 129)]
        got.append(together.step([(0, seqs[0][p : p + 1], p), *neighbours])[0])
    assert torch.equal(torch.cat(got), torch.cat(want))
