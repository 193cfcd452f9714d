"""GPU benchmark: sparse attention over 584-B FP8 records (v4_kernels.sparse_attention), decode.

One query per sequence, Flash (64 heads, top-k 512) and Pro (128 heads, top-k 1024), the two
compressed layer kinds at 4K / 32K / 128K / 1M context and batch 1 / 16 / 64 / 128:

* CSA: 128 window slots + min(top-k, ctx/4) selected entries (random within the sequence's own
  compressed entries);
* HCA: 128 window slots + all ctx/128 visible entries, in order.

Bytes = gathered records (S * 584 B per sequence) + slots + q + output (bf16); the split-K
partials stay in L2 and are not counted. Each row also times a plain streaming-read Triton kernel
over the same number of bytes in the same run; `vs stream` = t_stream / t_kernel (1.0 = as fast
as streaming those bytes contiguously). `1 split` re-times the kernel without split-K.
Needs CUDA; without it the script says so and exits with status 0.

    python bench/bench_sparse_attention.py [--models flash,pro] [--kinds csa,hca]
        [--batches 1,16,64,128] [--contexts 4K,32K,128K,1M] [--pool-gb 4]
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from v4_kernels.sparse_attention.kernel import attention_tiles, main_record_layout, sparse_attention

MODELS = {"flash": (64, 512), "pro": (128, 1024)}  # heads, index_topk
HEAD_DIM, ROPE, WINDOW = 512, 64, 128


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


def _case(model: str, kind: str, batch: int, ctx: int, pool_gb: float, g: torch.Generator):
    heads, topk = MODELS[model]
    n_comp = ctx // 4 if kind == "csa" else ctx // 128
    picked = min(topk, n_comp) if kind == "csa" else n_comp
    S = WINDOW + picked
    per_seq = WINDOW + n_comp  # window ring + compressed entries of one sequence
    rec_bytes = main_record_layout(HEAD_DIM, ROPE)[2]
    pool = max(per_seq, min(batch * per_seq, int(pool_gb * 2**30) // rec_bytes))
    slots = torch.empty(batch, S, dtype=torch.int32)
    for b in range(batch):
        base = (b * per_seq) % max(1, pool - per_seq + 1)
        win = base + torch.arange(WINDOW)
        if kind == "csa":
            comp = base + WINDOW + torch.randint(0, n_comp, (picked,), generator=g)
        else:
            comp = base + WINDOW + torch.arange(n_comp)
        slots[b] = torch.cat((win, comp)).to(torch.int32)
    records = torch.randint(0, 120, (pool, rec_bytes), dtype=torch.uint8, device="cuda")  # finite e4m3, sane scales
    records[:, 576:583] = 120
    q = torch.randn(batch, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    sink = torch.randn(heads, device="cuda")
    nbytes = batch * S * (rec_bytes + 4) + 2 * q.numel() * 2
    return q, records, slots.cuda(), sink, S, nbytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="flash,pro")
    p.add_argument("--kinds", default="csa,hca")
    p.add_argument("--batches", default="1,16,64,128")
    p.add_argument("--contexts", default="4K,32K,128K,1M")
    p.add_argument("--pool-gb", type=float, default=4.0, help="cap on the record pool (slots wrap inside it)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sparse_attention: no CUDA device; this benchmark runs on a GPU only. Nothing measured.")
        return 0

    from triton.testing import do_bench

    g = torch.Generator().manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [_parse_ctx(c) for c in args.contexts.split(",")]
    streamer = Streamer(1 << 30)
    peak = (1 << 30) / (streamer.time_ms(1 << 30) * 1e-3) / 1e9
    print(f"# {torch.cuda.get_device_name()}: streaming read of 1 GiB = {peak:,.0f} GB/s (plain Triton kernel)")
    hdr = (f"{'model':>5} {'kind':>4} {'batch':>5} {'ctx':>6} {'S':>6} {'splits':>6} {'time_us':>9} {'GB/s':>8} "
           f"{'stream_us':>9} {'vs stream':>9} {'1 split us':>10}")
    print(hdr)
    print("-" * len(hdr))
    for model in args.models.split(","):
        for kind in args.kinds.split(","):
            for ctx in contexts:
                for batch in batches:
                    q, records, slots, sink, S, nbytes = _case(model, kind, batch, ctx, args.pool_gb, g)
                    scale = HEAD_DIM**-0.5
                    splits = attention_tiles(batch, q.shape[1], S, HEAD_DIM, q.device)["splits"]
                    fn = lambda: sparse_attention(q, records, slots, sink, scale)  # noqa: E731
                    fn1 = lambda: sparse_attention(q, records, slots, sink, scale, num_splits=1)  # noqa: E731
                    t = do_bench(fn, warmup=10, rep=50, return_mode="median")
                    t1 = do_bench(fn1, warmup=10, rep=50, return_mode="median")
                    ts = streamer.time_ms(nbytes)
                    label = f"{ctx // 1024}K" if ctx < 2**20 else f"{ctx // 2**20}M"
                    print(f"{model:>5} {kind:>4} {batch:>5} {label:>6} {S:>6} {splits:>6} {t * 1e3:>9.1f} "
                          f"{nbytes / (t * 1e-3) / 1e9:>8.0f} {ts * 1e3:>9.1f} {ts / t:>9.2f} {t1 * 1e3:>10.1f}",
                          flush=True)
                    del q, records, slots
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
