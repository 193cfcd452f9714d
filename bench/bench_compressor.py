"""GPU benchmark of the fused compressor (kernels/compressor): gated pooling + RMSNorm + RoPE (+ Hadamard)
+ quantization, written straight into the cache records.

Shapes: decode batches (one completed block per sequence, each with its own previous block for the
overlapping CSA compressors) and one prefill of 8192 tokens of one sequence; CSA main (m = 4, e = 512),
CSA indexer (m = 4, e = 128; FP4 and FP8 records) and HCA main (m = 128, e = 512), for the Flash and
Pro configs, in bf16 (the serving dtype).

Prints per shape: time (triton.testing.do_bench, median), compulsory bytes (values + gate logits the
entries need, records written), achieved GB/s, and the ratio to a plain streaming-copy Triton kernel
measured in the same run, at its peak (256 MiB) and at the same byte count. `--sweep` times
(BLOCK_N, TOK, num_warps) choices to retune `compressor.kernel.tile_config`.

    python bench/bench_compressor.py [--sweep] [--batches 1,16,64,128]

Needs a CUDA GPU; without one it says so and exits (status 0). On CPU the kernel is tested with the
Triton interpreter instead: `pytest kernels/compressor`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from v4_kernels.compressor import kernel as C
from v4_plugin.cache import records
from v4_plugin.checkpoint.config import LayerType, preset_config
from v4_plugin.cache.layout import IndexerCache, indexer_entry_bytes, main_entry_bytes
from v4_plugin.runtime.ops.compressor import finish_entries, pool_blocks
from v4_plugin.runtime.ops.rope import Rope

if __package__:  # imported as bench.bench_compressor
    from . import common
else:  # run as a script: bench/ is sys.path[0]
    import common

NUM_SLOTS = 1 << 14
PREFILL_TOKENS = 8192
MAX_POSITIONS = 1 << 19


def _rope_table(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = Rope.for_layer(cfg, LayerType.CSA).cos_sin(torch.arange(MAX_POSITIONS, device="cuda"))
    return cos.contiguous(), sin.contiguous()


def _case(cfg, table, kind: str, fmt: IndexerCache | None, nb: int, decode: bool):
    """(fn, compulsory bytes, check) for one compressor launch over nb blocks."""
    g = torch.Generator(device="cuda").manual_seed(nb)
    indexer = kind == "csa_indexer"
    overlap = kind != "hca"
    m = 4 if overlap else 128
    e = cfg.index_head_dim if indexer else cfg.head_dim
    width = (2 if overlap else 1) * e
    kv = torch.randn(nb, m, width, device="cuda", generator=g)
    score = torch.randn(nb, m, width, device="cuda", generator=g)
    prev_kv = prev_score = None
    if overlap and decode:  # each sequence's own previous block
        prev_kv = torch.randn(nb, m, width, device="cuda", generator=g)
        prev_score = torch.randn(nb, m, width, device="cuda", generator=g)
    block_ids = torch.randint(0, MAX_POSITIONS // m, (nb,), device="cuda", generator=g) if decode else \
        torch.arange(nb, device="cuda")
    rb = indexer_entry_bytes(cfg, fmt) if indexer else main_entry_bytes(cfg)
    cache = torch.zeros(NUM_SLOTS, rb, dtype=torch.uint8, device="cuda")
    slots = torch.randperm(NUM_SLOTS, device="cuda", generator=g)[:nb]
    rope = table  # as served: a cos/sin table over positions, read at row j*m in the kernel
    kw = dict(block_ids=block_ids, ratio=m, norm_weight=torch.ones(e, device="cuda", dtype=torch.bfloat16),
              eps=cfg.rms_norm_eps, rope=rope, dtype=torch.bfloat16, indexer=indexer)
    fmt_ = fmt or IndexerCache.FP4

    def fn():
        C.pool_finish_store(kv, score, overlap, prev_kv, prev_score, cache=cache, slots=slots, fmt=fmt_, **kw)

    read = nb * m * width * 8 + (nb * m * e * 8 if prev_kv is not None else 0)  # fp32 values + gate logits
    nbytes = read + nb * (rb + 8 + 8)  # records, slots, block ids

    def check() -> float:
        """Fraction of record bytes equal to the torch reference (rounding-order flips allowed)."""
        fn()
        ref_kw = dict(kw, rope=Rope.for_layer(cfg, LayerType.CSA))
        if prev_kv is None:
            ref = finish_entries(pool_blocks(kv, score, overlap), simulate_quant=True, **ref_kw)
        else:
            ref = torch.cat([finish_entries(pool_blocks(kv[i : i + 1], score[i : i + 1], overlap, prev_kv[i],
                                                        prev_score[i]), simulate_quant=True,
                                            **dict(ref_kw, block_ids=block_ids[i : i + 1])) for i in range(nb)])
        recs = records.pack_indexer(ref, cfg, fmt_) if indexer else records.pack_main(ref, cfg)
        return (cache[slots] == recs).float().mean().item()

    return fn, nbytes, check


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--sweep", action="store_true", help="time (BLOCK_N, TOK, num_warps) choices")
    args = ap.parse_args()
    if common.cuda_missing("bench_compressor", "kernels/compressor"):
        return 0
    batches = common.int_list(args.batches)
    peak = common.print_copy_peak()
    common.print_header(f"{'model':6s} {'compressor':16s} {'shape':>13s} {common.COPY_HEADER}  same bytes")
    kinds = [("csa_main", None), ("csa_indexer", IndexerCache.FP4), ("csa_indexer", IndexerCache.FP8), ("hca", None)]
    for model in ("flash", "pro"):
        cfg = preset_config(model)
        table = _rope_table(cfg)
        for kind, fmt in kinds:
            label = kind + (f"_{fmt.value}" if fmt else "")
            m = 128 if kind == "hca" else 4
            shapes = [(b, True, f"decode b={b}") for b in batches] + \
                     [(PREFILL_TOKENS // m, False, f"prefill {PREFILL_TOKENS}")]
            for nb, decode, shape in shapes:
                fn, nbytes, check = _case(cfg, table, kind, fmt, nb, decode)
                same = check()
                ms = common.time_ms(fn)
                print(f"{model:6s} {label:16s} {shape:>13s} {common.vs_copy(nbytes, ms, peak)}  {same:.4f}")
                if args.sweep:
                    common.sweep_tiles(fn, C, [{"BLOCK_N": block_n, "TOK": tok, "num_warps": warps}
                                               for block_n in (1, 2, 4)
                                               for tok in sorted({min(m, t) for t in (2, 4, 8, 16, 32)})
                                               for warps in (2, 4, 8)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
