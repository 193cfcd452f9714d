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
import triton
import triton.language as tl

from v4_kernels.kv_store import kernel as K
from v4_plugin import kvcache
from v4_plugin.config import preset_config
from v4_plugin.layout import IndexerCache, indexer_entry_bytes, main_entry_bytes

NUM_SLOTS = 1 << 16  # cache rows; slots are scattered over them


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def copy_time_ms(nbytes: int) -> float:
    """Time of a streaming copy reading and writing nbytes / 2 each (so nbytes are moved)."""
    n = max(1, nbytes // 8)  # int32 elements per side
    src = torch.empty(n, dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    block = 4096
    return triton.testing.do_bench(lambda: _copy_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block))


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
            lambda: torch.equal(main[slots], kvcache.pack_main(kv, cfg))),
           ("load_main", lambda: K.load_main(main, slots, rope_dim=rope), n * (rb + 4 * hd) + sb,
            lambda: torch.equal(K.load_main(main, slots, rope_dim=rope), kvcache.unpack_main(main[slots], cfg)))]
    for f in IndexerCache:
        ib = indexer_entry_bytes(cfg, f)
        ops.append((f"store_indexer_{f.value}", lambda f=f: K.store_indexer(keys, idx[f], slots, f),
                    n * (2 * di + ib) + sb, lambda f=f: torch.equal(idx[f][slots], kvcache.pack_indexer(keys, cfg, f))))
        ops.append((f"load_indexer_{f.value}", lambda f=f: K.load_indexer(idx[f], slots, f), n * (ib + 4 * di) + sb,
                    lambda f=f: torch.equal(K.load_indexer(idx[f], slots, f),
                                            kvcache.unpack_indexer(idx[f][slots], cfg, f))))
    return ops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16,64,128,4096")
    ap.add_argument("--sweep", action="store_true", help="time every (BLOCK_N, num_warps) pair")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kv_store: no CUDA device found; this benchmark needs a GPU. "
              "(On CPU the kernels are tested with the Triton interpreter: pytest kernels/kv_store.)")
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    peak_ms = copy_time_ms(256 << 20)
    peak = (256 << 20) / peak_ms / 1e6
    print(f"device: {torch.cuda.get_device_name()}; streaming copy peak {peak:.0f} GB/s (256 MiB moved)")
    header = f"{'model':6s} {'op':18s} {'N':>6s} {'bytes':>10s} {'time us':>9s} {'GB/s':>8s} {'copy us':>8s} " \
             f"{'x copy(same B)':>14s} {'% copy peak':>11s}  check"
    print(header)
    print("-" * len(header))
    original = K.tile_config
    for model in ("flash", "pro"):
        cfg = preset_config(model)
        for n in batches:
            for name, fn, nbytes, check in _ops(cfg, n):
                fn()
                ok = "ok" if check() else "MISMATCH"
                ms = triton.testing.do_bench(fn)
                cms = copy_time_ms(nbytes)
                print(f"{model:6s} {name:18s} {n:6d} {nbytes:10d} {ms * 1e3:9.2f} {nbytes / ms / 1e6:8.1f} "
                      f"{cms * 1e3:8.2f} {ms / cms:14.2f} {100 * nbytes / ms / 1e6 / peak:10.1f}%  {ok}")
                if args.sweep:
                    results = []
                    for block_n in (1, 2, 4, 8, 16, 32):
                        for warps in (1, 2, 4, 8):
                            K.tile_config = lambda *a, _b=block_n, _w=warps, **k: {"BLOCK_N": _b, "num_warps": _w}
                            try:
                                results.append((triton.testing.do_bench(fn), block_n, warps))
                            except Exception as exc:  # a config the compiler rejects (e.g. registers)
                                print(f"    BLOCK_N={block_n} num_warps={warps}: {type(exc).__name__}")
                            finally:
                                K.tile_config = original
                    results.sort()
                    best = ", ".join(f"BLOCK_N={b} w={w}: {t * 1e3:.2f} us" for t, b, w in results[:3])
                    print(f"    sweep best: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
