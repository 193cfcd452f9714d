"""Row-invariant primitives: a token's result never depends on how many tokens share the op.

Serving batches tokens differently from step to step: a decode step holds one row per sequence, a
speculative verify step k + 1 rows per sequence, a chunked prefill whatever the scheduler packed. On
the CPU two things make a row's fp32 result move by an ulp with the batch:

* BLAS picks its kernel by the row count (MKL's sgemm: a GEMV for one row, small-M kernels below
  about eight rows), and those accumulate in another order. `matmul` pads small products to
  `MIN_ROWS` rows, which keeps every row on the GEMM kernel whose per-element accumulation order
  does not depend on the row count.
* ATen computes `sigmoid`, `silu` and `softplus` with SIMD code and the tail of a tensor (the last
  elements that do not fill a vector) with the scalar libm formula, so an element's value depends
  on where the tensor ends. `sigmoid`, `silu` and `softplus` here are written with `exp` and
  `log1p` (vectorized with partial vectors, the same for every element) and correctly rounded
  arithmetic.

With the trained-in FP8 activation quantization simulated, one ulp can flip an FP8 rounding and then
a greedy token: drafting or a neighbour's request would change a sequence's output. The properties
are tested on the running CPU (tests/test_row_invariance.py); other devices run their own kernels.
"""

from __future__ import annotations

from typing import Callable

import torch

MIN_ROWS = 16  # padded row count of small products on the CPU
SOFTPLUS_THRESHOLD = 20.0  # softplus(x) = x above it, as torch's


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., M, K] @ w [K, N] (or a batch [..., K, N]) in x's dtype, each of the M rows computed as
    in a product of at least `MIN_ROWS` rows on the CPU."""
    m = x.shape[-2]
    if x.device.type != "cpu" or m >= MIN_ROWS:
        return x @ w
    padded = torch.nn.functional.pad(x, (0, 0, 0, MIN_ROWS - m))
    return (padded @ w)[..., :m, :]


def rows_times_transposed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [N, K].T -> [..., N]: every leading index of x is one row of a row-invariant product."""
    return matmul(x.reshape(-1, x.shape[-1]), w.T).reshape(*x.shape[:-1], w.shape[0])


TILE_ROWS = 2048  # weight rows converted to fp32 at once by `times_weight`


def times_weight(x: torch.Tensor, weight: torch.Tensor | None = None, *,
                 rows: Callable[[int, int], torch.Tensor] | None = None, n: int | None = None,
                 tile_rows: int = TILE_ROWS) -> torch.Tensor:
    """fp32 x [..., K] @ W.T -> fp32 [..., N], W [N, K] read `tile_rows` rows at a time: `weight` (any float
    dtype, each tile converted to fp32), or `rows(lo, hi)` giving rows lo ... hi-1 in fp32 (a weight kept as
    stored, dequantized tile by tile) and `n` its row count. No fp32 copy of the whole weight is made;
    each output column is the same row-invariant product as `rows_times_transposed`'s."""
    if weight is not None:
        rows, n = (lambda lo, hi: weight[lo:hi].float()), weight.shape[0]
    tiles = [rows_times_transposed(x, rows(lo, min(lo + tile_rows, n))) for lo in range(0, n, tile_rows)]
    return torch.cat(tiles, dim=-1) if len(tiles) != 1 else tiles[0]


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """1 / (1 + e^-x), elementwise, the same wherever an element sits in its tensor."""
    return torch.reciprocal(1 + torch.exp(-x))


def silu(x: torch.Tensor) -> torch.Tensor:
    """x / (1 + e^-x), elementwise, the same wherever an element sits in its tensor."""
    return x / (1 + torch.exp(-x))


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) (x itself above 20, as torch's), elementwise, the same wherever an element sits."""
    return torch.where(x > SOFTPLUS_THRESHOLD, x, torch.log1p(torch.exp(x.clamp(max=SOFTPLUS_THRESHOLD))))
