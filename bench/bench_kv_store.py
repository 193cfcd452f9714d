"""GPU benchmark of the KV-cache record kernels (kernels/kv_store): store_main, store_indexer, load_main,
load_indexer at decode batch sizes (one entry per sequence) and one prefill-sized batch.

Prints per shape: time (triton.testing.do_bench, median), bytes moved (inputs + records + slots),
achieved GB/s, and the ratio to a plain streaming-copy Triton kernel measured in the same run, both
at its peak (256 MiB) and at the same byte count (small batches are launch-bound, so that is the
fair floor). `--sweep` times every (BLOCK_N, num_warps) pair to retune `kv_store.kernel.tile_config`.

    python bench/bench_kv_store.py [--sweep] [--batches 1,16,64,128,4096]

Needs a CUDA GPU; without one it says so and exits (status 0). On CPU the kernels are tested with the
Triton interpreter instead: `pytest kernels/kv_store`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from v4_kernels.kv_store import kernel as K
from v4_plugin.cache import records
from v4_plugin.checkpoint.config import preset_config
from v4_plugin.cache.layout import IndexerCache, indexer_entry_bytes, main_entry_bytes

if __package__:  # imported as bench.bench_kv_store
    from . import common
else:  # run as a script: bench/ is sys.path[0]
    import common

NUM_SLOTS = 1 << 16  # cache rows; slots are scattered over them


def _ops(cfg, n: int):
    """(name, fn, bytes moved, check) for each op at batch n."""
    g = torch.Generator(device="cuda").manual_seed(n)
    hd, rope, di = cfg.head_dim, cfg.qk_rope_head_dim, cfg.index_head_dim
    slots = torch.randperm(NUM_SLOTS, device="cuda", generator=g)[:n]
    kv = torch.randn(n, hd, device="cuda", generator=g).to(torch.bfloat16)
    keys = torch.randn(n, di, device="cuda", generator=g).to(torch.bfloat16)
    main = torch.zeros(NUM_SLOTS, main_entry_bytes(cfg), dtype=torch.uint8, device="cuda")
    idx = {f: torch.zeros(NUM_SLOTS, indexer_entry_bytes(cfg, f), dtype=torch.uint8, device="cuda")
           for f in IndexerCache}
    rb, sb = main_entry_bytes(cfg), 8 * n
    ops = [("store_main", lambda: K.store_main(kv, main, slots, rope_dim=rope), n * (2 * hd + rb) + sb,
            lambda: torch.equal(main[slots], records.pack_main(kv, cfg))),
           ("load_main", lambda: K.load_main(main, slots, rope_dim=rope), n * (rb + 4 * hd) + sb,
            lambda: torch.equal(K.load_main(main, slots, rope_dim=rope), records.unpack_main(main[slots], cfg)))]
    for f in IndexerCache:
        ib = indexer_entry_bytes(cfg, f)
        ops.append((f"store_indexer_{f.value}", lambda f=f: K.store_indexer(keys, idx[f], slots, f),
                    n * (2 * di + ib) + sb, lambda f=f: torch.equal(idx[f][slots], records.pack_indexer(keys, cfg, f))))
        ops.append((f"load_indexer_{f.value}", lambda f=f: K.load_indexer(idx[f], slots, f), n * (ib + 4 * di) + sb,
                    lambda f=f: torch.equal(K.load_indexer(idx[f], slots, f),
                                            records.unpack_indexer(idx[f][slots], cfg, f))))
    return ops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16,64,128,4096")
    ap.add_argument("--sweep", action="store_true", help="time every (BLOCK_N, num_warps) pair")
    args = ap.parse_args()
    if common.cuda_missing("bench_kv_store", "kernels/kv_store"):
        return 0
    batches = common.int_list(args.batches)
    peak = common.print_copy_peak()
    common.print_header(f"{'model':6s} {'op':18s} {'N':>6s} {common.COPY_HEADER}  check")
    for model in ("flash", "pro"):
        cfg = preset_config(model)
        for n in batches:
            for name, fn, nbytes, check in _ops(cfg, n):
                fn()
                ok = "ok" if check() else "MISMATCH"
                ms = common.time_ms(fn)
                print(f"{model:6s} {name:18s} {n:6d} {common.vs_copy(nbytes, ms, peak)}  {ok}")
                if args.sweep:
                    common.sweep_tiles(fn, K, [{"BLOCK_N": block_n, "num_warps": warps}
                                               for block_n in (1, 2, 4, 8, 16, 32) for warps in (1, 2, 4, 8)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
