"""Decode step time of the paged path against context length and batch size (CPU or GPU), one run.

    python bench/bench_decode.py [--preset flash] [--contexts 1K,4K,16K] [--batches 1,8,32]
                                 [--fmt fp8|exact] [--steps 5] [--dtype float32]

A tiny checkpoint's model (`v4_plugin.checkpoint.tiny`, random weights) over paged caches laid out as a
framework's block manager would (blocks of 64 entries): one sequence is prefilled to the longest context
in chunks, and every sequence of a batch reads that sequence's blocks (a shared prefix), so B sequences
at context C cost one prefill. A decode step is `streams_paged` for one token per sequence at position
C - 1 plus the head on those rows, exactly what an adapter runs; the step is repeated at the same
position (every cache is position-indexed, so a step rewrites what the previous wrote), after two
warm-up steps; the time of a configuration is its fastest of `--steps` (the least disturbed by other work on
the machine). Prints ms per step and per token and the growth of the per-step time from the shortest context.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

if __package__:  # imported as bench.bench_decode
    from . import common
else:  # run as a script: bench/ is sys.path[0]
    import common

from v4_plugin.cache.formats import EXACT, CacheFormat, cache_entry
from v4_plugin.checkpoint.config import parse_config
from v4_plugin.checkpoint.tiny import TINY_PRESETS, random_weights
from v4_plugin.runtime.model import V4Model
from v4_plugin.runtime.paged import BatchPlan, LayerCaches, PagedCache, streams_paged

BLOCK = 64  # entries per block of every cache
PREFILL_CHUNK = 2048


def _caches(model: V4Model, fmt: CacheFormat, max_tokens: int, batch: int, device: str) -> list[LayerCaches]:
    """Per layer, caches holding one sequence of `max_tokens` positions, every one of `batch` block-table
    rows pointing at its blocks."""
    blocks = -(-max_tokens // BLOCK)
    table = torch.arange(blocks, device=device).expand(batch, blocks)
    out = []
    for block in model.blocks:
        caches = {name: PagedCache(torch.zeros(blocks, BLOCK, width, dtype=dtype, device=device), table)
                  for name, (width, dtype) in cache_entry(model.cfg, block.kind, fmt, model.dtype).items()}
        out.append(LayerCaches(**caches))
    return out


def _step(model: V4Model, caches: list[LayerCaches], fmt: CacheFormat, ids: torch.Tensor,
          positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    streams, _ = streams_paged(model, ids, BatchPlan(positions, rows), caches, fmt)
    return model.logits(streams)


def measure(model: V4Model, fmt: CacheFormat, contexts: list[int], batches: list[int], steps: int,
            device: str) -> list[tuple[int, int, float]]:
    """(context, batch, ms per decode step: the fastest of `steps`) for every pair."""
    vocab, longest = model.cfg.vocab_size, max(contexts)
    caches = _caches(model, fmt, longest, max(batches), device)
    ids = torch.randint(0, vocab, (longest,), generator=torch.Generator().manual_seed(0)).to(device)
    results, done = [], 0
    for context in sorted(contexts):
        while done < context - 1:  # prefill positions 0 ... context - 2 of row 0
            n = min(PREFILL_CHUNK, context - 1 - done)
            positions = torch.arange(done, done + n, device=device)
            _step(model, caches, fmt, ids[done:done + n], positions, torch.zeros_like(positions))
            done += n
        for batch in batches:
            positions = torch.full((batch,), context - 1, device=device)
            rows = torch.arange(batch, device=device)
            token = ids[context - 1].expand(batch)
            for _ in range(2):  # warm-up
                _step(model, caches, fmt, token, positions, rows)
            times = []
            for _ in range(steps):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                _step(model, caches, fmt, token, positions, rows)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            results.append((context, batch, min(times)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="flash", choices=sorted(TINY_PRESETS))
    parser.add_argument("--contexts", default="1K,4K,16K")
    parser.add_argument("--batches", default="1,8,32", type=common.int_list)
    parser.add_argument("--fmt", default="fp8", choices=["fp8", "exact"])
    parser.add_argument("--steps", default=5, type=int)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    contexts = [common.parse_ctx(c) for c in args.contexts.split(",")]
    torch.set_grad_enabled(False)
    cfg = parse_config(TINY_PRESETS[args.preset])
    dtype = getattr(torch, args.dtype)
    fmt = CacheFormat() if args.fmt == "fp8" else EXACT
    weights = {k: v.to(args.device) for k, v in random_weights(cfg, seed=0).items()}
    model = V4Model(cfg, weights, dtype=dtype, quant=fmt.quant_sim(activations=True))
    rows = measure(model, fmt, contexts, args.batches, args.steps, args.device)
    print(f"decode step, tiny {args.preset}, {args.fmt} caches, {args.dtype}, {args.device} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'context':>8} {'batch':>6} {'ms/step':>9} {'ms/token':>9} {'vs ' + common.ctx_label(min(contexts)):>8}")
    first = {b: ms for c, b, ms in rows if c == min(contexts)}
    for context, batch, ms in rows:
        print(f"{common.ctx_label(context):>8} {batch:>6} {ms:9.2f} {ms / batch:9.3f} {ms / first[batch]:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
