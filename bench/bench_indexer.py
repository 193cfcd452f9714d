"""GPU benchmark: lightning-indexer scores over cached keys + exact top-k (v4_kernels.indexer), decode.

One query per sequence (64 index heads x 128 dims), each sequence with its own slot list of
N = ctx/4 compressed keys (all visible), at 4K / 32K / 128K / 1M context and batch 1 / 16 / 64 / 128;
top-k 512 (Flash) and 1024 (Pro); FP8 (132 B) and FP4 (68 B) key records.

Bytes: scores = key records + slots + fp32 scores written (+ q); top-k = scores read; total = both.
Each row also times a plain streaming-read Triton kernel over the same number of bytes in the
same run; `vs stream` = t_stream / t_kernel (1.0 = as fast as streaming those bytes).
Needs CUDA; without it the script says so and exits with status 0.

    python bench/bench_indexer.py [--models flash,pro] [--formats fp8,fp4]
        [--batches 1,16,64,128] [--contexts 4K,32K,128K,1M] [--pool-gb 4]
"""

from __future__ import annotations

import argparse
import sys

import torch

from v4_kernels.indexer.kernel import index_scores, select_topk

if __package__:  # imported as bench.bench_indexer
    from . import common
else:  # run as a script: bench/ is sys.path[0]
    import common

MODELS = {"flash": 512, "pro": 1024}  # index_topk
INDEX_HEADS, INDEX_DIM = 64, 128
RECORD_BYTES = {"fp8": INDEX_DIM + 4, "fp4": INDEX_DIM // 2 + INDEX_DIM // 32}


def _case(fmt: str, batch: int, ctx: int, pool_gb: float):
    n = ctx // 4
    rb = RECORD_BYTES[fmt]
    pool = max(n, min(batch * n, int(pool_gb * 2**30) // rb))
    starts = (torch.arange(batch) * n) % max(1, pool - n + 1)
    slots = (starts[:, None] + torch.arange(n)[None, :]).to(torch.int32).cuda()
    records = torch.randint(0, 120, (pool, rb), dtype=torch.uint8, device="cuda")
    if fmt == "fp8":
        records[:, INDEX_DIM:] = torch.tensor([0, 0, 0x80, 0x3C], dtype=torch.uint8, device="cuda")  # fp32 2^-6
    else:
        records[:, INDEX_DIM // 2:] = 124  # E8M0 2^-3
    q = torch.randn(batch, INDEX_HEADS, INDEX_DIM, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(batch, INDEX_HEADS, device="cuda") * (INDEX_DIM**-0.5 * INDEX_HEADS**-0.5)
    visible = torch.full((batch,), n, dtype=torch.int32, device="cuda")
    query_start = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    score_bytes = batch * n * (rb + 4 + 4) + q.numel() * 2
    topk_bytes = batch * n * 4
    return q, w, records, slots, visible, query_start, score_bytes, topk_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="flash,pro")
    p.add_argument("--formats", default="fp8,fp4")
    p.add_argument("--batches", default="1,16,64,128")
    p.add_argument("--contexts", default="4K,32K,128K,1M")
    p.add_argument("--pool-gb", type=float, default=4.0, help="cap on the key pool (slot lists wrap inside it)")
    args = p.parse_args(argv)
    if common.cuda_missing("bench_indexer", "kernels/indexer"):
        return 0

    batches = common.int_list(args.batches)
    contexts = [common.parse_ctx(c) for c in args.contexts.split(",")]
    streamer = common.Streamer(1 << 30)
    streamer.print_peak()
    hdr = (f"{'model':>5} {'fmt':>4} {'batch':>5} {'ctx':>6} {'N':>7} {'k':>5} {'scores_us':>9} {'GB/s':>7} "
           f"{'vs stream':>9} {'topk_us':>8} {'GB/s':>7} {'vs stream':>9} {'total_us':>9}")
    common.print_header(hdr)
    for model in args.models.split(","):
        k = MODELS[model]
        for fmt in args.formats.split(","):
            for ctx in contexts:
                for batch in batches:
                    q, w, records, slots, visible, qs, sbytes, tbytes = _case(fmt, batch, ctx, args.pool_gb)
                    scores = index_scores(q, w, records, slots=slots, visible=visible, query_start=qs, max_queries=1)
                    f_scores = lambda: index_scores(q, w, records, slots=slots, visible=visible,  # noqa: E731
                                                    query_start=qs, max_queries=1)
                    f_topk = lambda: select_topk(scores, visible, k)  # noqa: E731
                    f_all = lambda: select_topk(f_scores(), visible, k)  # noqa: E731
                    ts = common.median_ms(f_scores)
                    tk = common.median_ms(f_topk)
                    ta = common.median_ms(f_all)
                    ss, sk = streamer.time_ms(sbytes), streamer.time_ms(tbytes)
                    label = common.ctx_label(ctx)
                    print(f"{model:>5} {fmt:>4} {batch:>5} {label:>6} {slots.shape[1]:>7} {min(k, slots.shape[1]):>5} "
                          f"{ts * 1e3:>9.1f} {sbytes / (ts * 1e-3) / 1e9:>7.0f} {ss / ts:>9.2f} "
                          f"{tk * 1e3:>8.1f} {tbytes / (tk * 1e-3) / 1e9:>7.0f} {sk / tk:>9.2f} {ta * 1e3:>9.1f}",
                          flush=True)
                    del q, w, records, slots, scores
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
