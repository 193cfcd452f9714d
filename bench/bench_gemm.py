"""Benchmark the FP8 block-scaled linear and the grouped FP4 MoE on a GPU.

    python bench/bench_gemm.py [--part linear|moe|all] [--batch 1,16,64,128]

Part 1, FP8 linear, real DeepSeek-V4 layer shapes [out, in], bf16 activations, per batch M:
  * ours W8A8 (FP8 tensor cores, SM89+) and W8A16 (weight decoded in registers, the SM80 path);
  * torch._scaled_mm with per-tensor scales (cuBLAS FP8; not the block-scaled math, a speed reference;
    M padded to a multiple of 16) and, where this torch supports it, with the reference's 1x128 / 128x128
    block scales;
  * bf16 torch.matmul (cuBLAS) on the dequantized weight;
  * a streaming-read baseline: one pass over the FP8 weight bytes (the floor for small M).
  Printed: time (us), TFLOP/s and GB/s of ours, and ratios (other / ours, > 1 means ours is faster).

Part 2, grouped FP4 MoE (W4A16) with Flash (D 4096, I 2048, 256 experts) and Pro (D 7168, I 3072,
384 experts) dims, top-6, batch 1 / 16 / 64 / 128: routed experts alone and with the FP8 shared
expert; TFLOP/s of the routed GEMMs, GB/s over the touched experts' bytes, and the ratio to a
streaming read of those bytes.

GPU only: without CUDA it says so and exits (status 0) without measuring anything.
"""

from __future__ import annotations

import argparse
import sys

import torch

from v4_kernels.fp4_moe import kernel as moe_k
from v4_kernels.fp8_linear import kernel as lin_k
from v4_plugin.checkpoint import quant

if __package__:  # imported as bench.bench_gemm
    from . import common
else:  # run as a script: bench/ is sys.path[0]
    import common

LINEAR_SHAPES = [  # (name, out, in)
    ("flash wq_a", 1024, 4096), ("flash wo_b", 4096, 8192), ("flash shared w1", 2048, 4096),
    ("flash shared w2", 4096, 2048), ("pro wq_a", 1536, 7168), ("pro wq_b", 65536, 1536),
    ("pro wo_b", 7168, 16384), ("pro shared w2", 7168, 3072),
]
MOE_PRESETS = {"flash": (4096, 2048, 256), "pro": (7168, 3072, 384)}  # D, I, experts
TOP_K = 6


DEVICE = "cuda"  # module-level so a dry run can point it elsewhere


def _blockwise_scaled_mm(xq, xs, wq, ws):
    """torch._scaled_mm with the 1x128 activation and 128x128 weight scales, when this torch/GPU support it."""
    try:
        a_scale = xs.t().contiguous().t()  # [M, K/128], outer-dim-major as cuBLAS wants
        b_scale = ws.t().contiguous().t() if ws.dim() == 2 else ws
        fn = lambda: torch._scaled_mm(xq, wq.t(), scale_a=a_scale, scale_b=b_scale.t(),  # noqa: E731
                                      out_dtype=torch.bfloat16)
        fn()
        return fn
    except Exception:  # noqa: BLE001 - any failure means "not supported here"
        return None


def bench_linear(batches: list[int]) -> None:
    dev = DEVICE
    cap = torch.cuda.get_device_capability()
    fp8 = cap >= (8, 9)
    print(f"\n== FP8 block-scaled linear (bf16 activations); FP8 tensor cores: {'yes' if fp8 else 'no'} ==")
    head = (f"{'shape':<16} {'M':>5} | {'W8A8 us':>8} {'TFLOP/s':>7} {'GB/s':>6} | {'W8A16 us':>8} | "
            f"{'scaled_mm':>9} {'blk_mm':>7} {'bf16 mm':>7} {'stream':>7}   (time of other / W8A8)")
    common.print_header(head)
    sums = torch.empty(1024, dtype=torch.int64, device=dev)
    for name, n, k in LINEAR_SHAPES:
        gen = torch.Generator(device=dev).manual_seed(n + k)
        w = torch.randn(n, k, device=dev, generator=gen) * 0.02
        wq, ws = quant.quantize_weight_fp8(w)
        w_bf16 = quant.dequantize_weight_fp8(wq, ws).bfloat16()
        stream_us = common.time_us(common.stream_read(wq.view(torch.uint8), sums))
        for m in batches:
            x = torch.randn(m, k, device=dev, generator=gen).bfloat16()
            flops, wbytes = 2 * m * n * k, n * k + m * k * 2 + m * n * 2
            w8a16 = common.time_us(lambda: lin_k.fp8_linear(x, wq, ws, False))
            bf16 = common.time_us(lambda: x @ w_bf16.T)
            if fp8:
                w8a8 = common.time_us(lambda: lin_k.fp8_linear(x, wq, ws, True, fp8_dot=True))
                m16 = -(-m // 16) * 16
                xq = torch.randn(m16, k, device=dev, generator=gen).to(torch.float8_e4m3fn)
                one = torch.ones((), device=dev)
                scaled = common.time_us(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                                                 out_dtype=torch.bfloat16))
                xq_b, xs_b = lin_k.act_quant(torch.randn(m16, k, device=dev, generator=gen).bfloat16())
                blk_fn = _blockwise_scaled_mm(xq_b, xs_b, wq, quant.e8m0_to_float(ws))
                blk = f"{common.time_us(blk_fn) / w8a8:>6.2f}x" if blk_fn else f"{'n/a':>7}"
                print(f"{name:<16} {m:>5} | {w8a8:>8.1f} {flops / w8a8 / 1e6:>7.1f} {wbytes / w8a8 / 1e3:>6.0f} | "
                      f"{w8a16:>8.1f} | {scaled / w8a8:>8.2f}x {blk} {bf16 / w8a8:>6.2f}x {stream_us / w8a8:>6.2f}x")
            else:
                print(f"{name:<16} {m:>5} | {'-':>8} {flops / w8a16 / 1e6:>7.1f} {wbytes / w8a16 / 1e3:>6.0f} | "
                      f"{w8a16:>8.1f} | {'-':>9} {'-':>7} {bf16 / w8a16:>6.2f}x {stream_us / w8a16:>6.2f}x  (vs W8A16)")


def _random_fp4_experts(e: int, d: int, inter: int, dev: str, gen: torch.Generator) -> moe_k.FP4Experts:
    """Random codes and scales near 2^-8 (no need for meaningful weights to time the kernels)."""
    def packed(rows, cols):
        return torch.randint(-128, 128, (e, rows, cols // 2), dtype=torch.int8, device=dev, generator=gen)

    def scales(rows, cols):
        return torch.randint(117, 121, (e, rows, cols // 32), dtype=torch.uint8, device=dev, generator=gen)

    return moe_k.FP4Experts(packed(inter, d), scales(inter, d), packed(d, inter), scales(d, inter),
                            packed(inter, d), scales(inter, d))


def bench_moe(batches: list[int]) -> None:
    dev = DEVICE
    print(f"\n== Grouped FP4 MoE, W4A16, top-{TOP_K}, bf16 activations ==")
    head = (f"{'model':<6} {'T':>4} {'experts':>7} | {'routed us':>9} {'TFLOP/s':>7} {'GB/s':>6} {'stream':>7} | "
            f"{'+shared us':>10} {'shared share':>12}")
    common.print_header(head)
    sums = torch.empty(1024, dtype=torch.int64, device=dev)
    for name, (d, inter, n_exp) in MOE_PRESETS.items():
        gen = torch.Generator(device=dev).manual_seed(1)
        experts = _random_fp4_experts(n_exp, d, inter, dev, gen)
        sh = [quant.quantize_weight_fp8(torch.randn(*s, device=dev, generator=gen) * 0.02)
              for s in ((inter, d), (d, inter), (inter, d))]
        shared = moe_k.FP8Expert(sh[0][0], sh[0][1], sh[1][0], sh[1][1], sh[2][0], sh[2][1])
        per_expert = 3 * inter * d // 2 + 3 * inter * d // 32  # packed bytes + E8M0 scales
        scratch = torch.empty(n_exp * per_expert, dtype=torch.uint8, device=dev)  # for the streaming baseline
        for t in batches:
            x = torch.randn(t, d, device=dev, generator=gen).bfloat16()
            ids = torch.rand(t, n_exp, device=dev, generator=gen).topk(TOP_K, dim=-1).indices
            weights = torch.softmax(torch.randn(t, TOP_K, device=dev, generator=gen), -1)
            active = ids.unique().numel()
            routed = common.time_us(lambda: moe_k.fp4_moe(x, weights, ids, experts, None, limit=10.0))
            full = common.time_us(lambda: moe_k.fp4_moe(x, weights, ids, experts, shared, limit=10.0))
            touched = active * per_expert
            stream = common.time_us(common.stream_read(scratch[:touched], sums))
            flops = 2 * t * TOP_K * 3 * d * inter
            print(f"{name:<6} {t:>4} {active:>7} | {routed:>9.1f} {flops / routed / 1e6:>7.2f} "
                  f"{touched / routed / 1e3:>6.0f} {stream / routed:>6.2f}x | {full:>10.1f} "
                  f"{(full - routed) / full:>11.0%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("linear", "moe", "all"), default="all")
    parser.add_argument("--batch", default="1,16,64,128")
    args = parser.parse_args(argv)
    if common.cuda_missing("bench_gemm", "kernels/fp8_linear kernels/fp4_moe"):
        return 0
    batches = common.int_list(args.batch)
    print(f"device: {torch.cuda.get_device_name()}")
    if args.part in ("linear", "all"):
        bench_linear(batches)
    if args.part in ("moe", "all"):
        bench_moe(batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
