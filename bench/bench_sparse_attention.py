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

from v4_kernels.sparse_attention.kernel import attention_tiles, main_record_layout, sparse_attention

if __package__:  # imported as bench.bench_sparse_attention
    from . import common
else:  # run as a script: bench/ is sys.path[0]
    import common

MODELS = {"flash": (64, 512), "pro": (128, 1024)}  # heads, index_topk
HEAD_DIM, ROPE, WINDOW = 512, 64, 128


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
    if common.cuda_missing("bench_sparse_attention", "kernels/sparse_attention"):
        return 0

    g = torch.Generator().manual_seed(0)
    batches = common.int_list(args.batches)
    contexts = [common.parse_ctx(c) for c in args.contexts.split(",")]
    streamer = common.Streamer(1 << 30)
    streamer.print_peak()
    hdr = (f"{'model':>5} {'kind':>4} {'batch':>5} {'ctx':>6} {'S':>6} {'splits':>6} {'time_us':>9} {'GB/s':>8} "
           f"{'stream_us':>9} {'vs stream':>9} {'1 split us':>10}")
    common.print_header(hdr)
    for model in args.models.split(","):
        for kind in args.kinds.split(","):
            for ctx in contexts:
                for batch in batches:
                    q, records, slots, sink, S, nbytes = _case(model, kind, batch, ctx, args.pool_gb, g)
                    scale = HEAD_DIM**-0.5
                    splits = attention_tiles(batch, q.shape[1], S, HEAD_DIM, q.device)["splits"]
                    fn = lambda: sparse_attention(q, records, slots, sink, scale)  # noqa: E731
                    fn1 = lambda: sparse_attention(q, records, slots, sink, scale, num_splits=1)  # noqa: E731
                    t = common.median_ms(fn)
                    t1 = common.median_ms(fn1)
                    ts = streamer.time_ms(nbytes)
                    label = common.ctx_label(ctx)
                    print(f"{model:>5} {kind:>4} {batch:>5} {label:>6} {S:>6} {splits:>6} {t * 1e3:>9.1f} "
                          f"{nbytes / (t * 1e-3) / 1e9:>8.0f} {ts * 1e3:>9.1f} {ts / t:>9.2f} {t1 * 1e3:>10.1f}",
                          flush=True)
                    del q, records, slots
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
