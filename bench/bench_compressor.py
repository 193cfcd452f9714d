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
import triton
import triton.language as tl

from v4_kernels.compressor import kernel as C
from v4_plugin import kvcache
from v4_plugin.config import LayerType, preset_config
from v4_plugin.layout import IndexerCache, indexer_entry_bytes, main_entry_bytes
from v4_plugin.ops.compressor import finish_entries, pool_blocks
from v4_plugin.ops.rope import Rope

NUM_SLOTS = 1 << 14
PREFILL_TOKENS = 8192
MAX_POSITIONS = 1 << 19


def _rope_table(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = Rope.for_layer(cfg, LayerType.CSA).cos_sin(torch.arange(MAX_POSITIONS, device="cuda"))
    return cos.contiguous(), sin.contiguous()


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def copy_time_ms(nbytes: int) -> float:
    """Time of a streaming copy reading and writing nbytes / 2 each (so nbytes are moved)."""
    n = max(1, nbytes // 8)
    src = torch.empty(n, dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    block = 4096
    return triton.testing.do_bench(lambda: _copy_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block))


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
        recs = kvcache.pack_indexer(ref, cfg, fmt_) if indexer else kvcache.pack_main(ref, cfg)
        return (cache[slots] == recs).float().mean().item()

    return fn, nbytes, check


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--sweep", action="store_true", help="time (BLOCK_N, TOK, num_warps) choices")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_compressor: no CUDA device found; this benchmark needs a GPU. "
              "(On CPU the kernel is tested with the Triton interpreter: pytest kernels/compressor.)")
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    peak_ms = copy_time_ms(256 << 20)
    peak = (256 << 20) / peak_ms / 1e6
    print(f"device: {torch.cuda.get_device_name()}; streaming copy peak {peak:.0f} GB/s (256 MiB moved)")
    header = f"{'model':6s} {'compressor':16s} {'shape':>13s} {'bytes':>10s} {'time us':>9s} {'GB/s':>8s} " \
             f"{'copy us':>8s} {'x copy(same B)':>14s} {'% copy peak':>11s}  same bytes"
    print(header)
    print("-" * len(header))
    kinds = [("csa_main", None), ("csa_indexer", IndexerCache.FP4), ("csa_indexer", IndexerCache.FP8), ("hca", None)]
    original = C.tile_config
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
                ms = triton.testing.do_bench(fn)
                cms = copy_time_ms(nbytes)
                print(f"{model:6s} {label:16s} {shape:>13s} {nbytes:10d} {ms * 1e3:9.2f} {nbytes / ms / 1e6:8.1f} "
                      f"{cms * 1e3:8.2f} {ms / cms:14.2f} {100 * nbytes / ms / 1e6 / peak:10.1f}%  {same:.4f}")
                if args.sweep:
                    results = []
                    for block_n in (1, 2, 4):
                        for tok in sorted({min(m, t) for t in (2, 4, 8, 16, 32)}):
                            for warps in (2, 4, 8):
                                C.tile_config = lambda *a, _b=block_n, _t=tok, _w=warps, **k: \
                                    {"BLOCK_N": _b, "TOK": _t, "num_warps": _w}
                                try:
                                    results.append((triton.testing.do_bench(fn), block_n, tok, warps))
                                except Exception as exc:  # a config the compiler rejects
                                    print(f"    BLOCK_N={block_n} TOK={tok} num_warps={warps}: {type(exc).__name__}")
                                finally:
                                    C.tile_config = original
                    results.sort()
                    best = ", ".join(f"BLOCK_N={b} TOK={t} w={w}: {x * 1e3:.2f} us" for x, b, t, w in results[:3])
                    print(f"    sweep best: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
