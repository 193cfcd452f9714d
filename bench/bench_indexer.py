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
import triton
import triton.language as tl

from v4_kernels.indexer.kernel import index_scores, select_topk

MODELS = {"flash": 512, "pro": 1024}  # index_topk
INDEX_HEADS, INDEX_DIM = 64, 128
RECORD_BYTES = {"fp8": INDEX_DIM + 4, "fp4": INDEX_DIM // 2 + INDEX_DIM // 32}


@triton.jit
def _stream_read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Grid-stride read of n int32 values: the bandwidth a plain Triton kernel gets on this GPU."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


class Streamer:
    """Times streaming reads of a given byte count from one preallocated buffer."""

    def __init__(self, max_bytes: int):
        self.buf = torch.ones(max(1, max_bytes // 4), dtype=torch.int32, device="cuda")
        self.programs = 4 * torch.cuda.get_device_properties(0).multi_processor_count
        self.out = torch.empty(self.programs, dtype=torch.int32, device="cuda")

    def time_ms(self, nbytes: int) -> float:
        n = max(1, min(nbytes // 4, self.buf.numel()))
        grid = (min(self.programs, triton.cdiv(n, 4096)),)
        fn = lambda: _stream_read_kernel[grid](self.buf, self.out, n, BLOCK=4096, num_warps=8)  # noqa: E731
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def _parse_ctx(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1], 1)
    return int(s[:-1] if s[-1] in "KM" else s) * mult


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
    if not torch.cuda.is_available():
        print("bench_indexer: no CUDA device; this benchmark runs on a GPU only. Nothing measured.")
        return 0

    from triton.testing import do_bench

    batches = [int(b) for b in args.batches.split(",")]
    contexts = [_parse_ctx(c) for c in args.contexts.split(",")]
    streamer = Streamer(1 << 30)
    peak = (1 << 30) / (streamer.time_ms(1 << 30) * 1e-3) / 1e9
    print(f"# {torch.cuda.get_device_name()}: streaming read of 1 GiB = {peak:,.0f} GB/s (plain Triton kernel)")
    hdr = (f"{'model':>5} {'fmt':>4} {'batch':>5} {'ctx':>6} {'N':>7} {'k':>5} {'scores_us':>9} {'GB/s':>7} "
           f"{'vs stream':>9} {'topk_us':>8} {'GB/s':>7} {'vs stream':>9} {'total_us':>9}")
    print(hdr)
    print("-" * len(hdr))
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
                    ts = do_bench(f_scores, warmup=10, rep=50, return_mode="median")
                    tk = do_bench(f_topk, warmup=10, rep=50, return_mode="median")
                    ta = do_bench(f_all, warmup=10, rep=50, return_mode="median")
                    ss, sk = streamer.time_ms(sbytes), streamer.time_ms(tbytes)
                    label = f"{ctx // 1024}K" if ctx < 2**20 else f"{ctx // 2**20}M"
                    print(f"{model:>5} {fmt:>4} {batch:>5} {label:>6} {slots.shape[1]:>7} {min(k, slots.shape[1]):>5} "
                          f"{ts * 1e3:>9.1f} {sbytes / (ts * 1e-3) / 1e9:>7.0f} {ss / ts:>9.2f} "
                          f"{tk * 1e3:>8.1f} {tbytes / (tk * 1e-3) / 1e9:>7.0f} {sk / tk:>9.2f} {ta * 1e3:>9.1f}",
                          flush=True)
                    del q, w, records, slots, scores
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
