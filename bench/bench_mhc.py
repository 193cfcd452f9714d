"""Benchmark the fused mHC kernels against the PyTorch core on a GPU.

    python bench/bench_mhc.py [--tokens 1,16,128,1024,8192]

For Flash (D = 4096) and Pro (D = 7168), hc = 4, bf16 streams, prints per token count:
hc_pre, hc_post and the fused hc_post + next hc_pre, each as Triton time, effective GB/s (bytes that
must move: streams, fn, outputs) and the speed-up over the eager PyTorch reference measured in the
same run; for the fused kernel also the speed-up over the two unfused Triton kernels.
GPU only: without CUDA it says so and exits (status 0) without measuring anything.
"""

from __future__ import annotations

import argparse
import sys

import torch

from v4_kernels.mhc import kernel as K
from v4_plugin.runtime.ops import mhc as ref

if __package__:  # imported as bench.bench_mhc
    from . import common
else:  # run as a script: bench/ is sys.path[0]
    import common

HC = 4
KW = dict(norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20)

DEVICE = "cuda"  # module-level so a dry run can point it elsewhere


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,16,128,1024,8192")
    args = parser.parse_args(argv)
    if common.cuda_missing("bench_mhc", "kernels/mhc"):
        return 0

    dev = DEVICE
    print(f"device: {torch.cuda.get_device_name()}; bf16 streams, hc = {HC}, Sinkhorn 20 iterations")
    header = (f"{'model':<6} {'T':>6} | {'pre us':>8} {'GB/s':>7} {'vs torch':>8} | {'post us':>8} {'GB/s':>7} "
              f"{'vs torch':>8} | {'fused us':>8} {'vs split':>8} {'vs torch':>8}")
    common.print_header(header)
    for name, d in (("flash", 4096), ("pro", 7168)):
        gen = torch.Generator(device=dev).manual_seed(0)
        fn = torch.randn((2 + HC) * HC, HC * d, device=dev, generator=gen) / (HC * d) ** 0.5
        scale = torch.rand(3, device=dev, generator=gen) + 0.5
        base = torch.randn((2 + HC) * HC, device=dev, generator=gen) * 0.5
        for t in common.int_list(args.tokens):
            x = torch.randn(t, HC, d, device=dev, generator=gen).bfloat16()
            y = torch.randn(t, d, device=dev, generator=gen).bfloat16()
            _, post, comb = K.hc_pre(x, fn, scale, base, **KW)

            pre_us = common.time_us(lambda: K.hc_pre(x, fn, scale, base, **KW))
            pre_ref = common.time_us(lambda: ref.hc_pre(x, fn, scale, base, **KW))
            post_us = common.time_us(lambda: K.hc_post(y, x, post, comb))
            post_ref = common.time_us(lambda: ref.hc_post(y, x, post, comb))
            fused_us = common.time_us(lambda: K.hc_post_pre(y, x, post, comb, fn, scale, base, **KW))
            split_us = common.time_us(lambda: K.hc_pre(K.hc_post(y, x, post, comb), fn, scale, base, **KW))
            fused_ref = common.time_us(lambda: ref.hc_pre(ref.hc_post(y, x, post, comb), fn, scale, base, **KW))

            stream = t * HC * d * 2
            pre_bytes = stream + fn.numel() * 4 + t * d * 2 + t * (2 + HC) * HC * 4
            post_bytes = t * d * 2 + 2 * stream + t * (HC + HC * HC) * 4
            print(f"{name:<6} {t:>6} | {pre_us:>8.1f} {pre_bytes / pre_us / 1e3:>7.0f} {pre_ref / pre_us:>7.1f}x | "
                  f"{post_us:>8.1f} {post_bytes / post_us / 1e3:>7.0f} {post_ref / post_us:>7.1f}x | "
                  f"{fused_us:>8.1f} {split_us / fused_us:>7.2f}x {fused_ref / fused_us:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
