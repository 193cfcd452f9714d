"""Linear layers with the activation quantization of DeepSeek's reference code (spec §8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from v4_plugin.checkpoint.config import WEIGHT_BLOCK
from v4_plugin.checkpoint.quant import dequantize_weight_fp4, dequantize_weight_fp8, fake_quant_fp8
from v4_plugin.runtime.ops.invariant import times_weight

ACT_BLOCK = 128  # activations are FP8-quantized per token per 128 input channels


def linear(x: torch.Tensor, weight: torch.Tensor, quantize_input: bool) -> torch.Tensor:
    """y = x @ weight.T in fp32, returned in x.dtype.

    x [..., in]; weight [out, in] holds the dequantized values of an FP8 or FP4 checkpoint weight.
    With `quantize_input` the activation is first rounded through FP8 e4m3 with one power-of-two
    scale per 128 channels, as DeepSeek's reference FP8/FP4 GEMMs do; the product of the two dequantized
    operands in fp32 equals those GEMMs up to accumulation order.
    """
    return times_weight(_input(x, quantize_input), weight).to(x.dtype)


def _input(x: torch.Tensor, quantize_input: bool) -> torch.Tensor:
    return fake_quant_fp8(x.float(), ACT_BLOCK) if quantize_input else x.float()


def stored_rows(weight: torch.Tensor, scale: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows lo ... hi-1 of a weight kept as stored, dequantized to fp32 [hi - lo, in]: FP8 (e4m3 [out, in],
    one scale per 128 x 128 block) or FP4 (packed int8 [out, in/2], one scale per row and 32 columns)."""
    if weight.dtype == torch.int8:
        return dequantize_weight_fp4(weight[lo:hi], scale[lo:hi])
    blocks = scale[lo // WEIGHT_BLOCK : -(-hi // WEIGHT_BLOCK)]
    return dequantize_weight_fp8(weight[lo:hi], blocks, WEIGHT_BLOCK, (lo % WEIGHT_BLOCK, 0))


def linear_stored(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, quantize_input: bool) -> torch.Tensor:
    """`linear` of a weight kept as stored (`stored_rows`' formats), dequantized a tile of output rows at a
    time (`invariant.times_weight`): never held dequantized, each output column the same product as `linear`'s."""
    rows = lambda lo, hi: stored_rows(weight, scale, lo, hi)  # noqa: E731
    return times_weight(_input(x, quantize_input), rows=rows, n=weight.shape[0]).to(x.dtype)


@dataclass(frozen=True)
class LinearWeight:
    """One linear layer's weight [out, in], as `dispatch.linear` takes it.

    `fp8` holds the checkpoint entries (e4m3 [out, in], E8M0 [ceil(out/128), ceil(in/128)]) when the
    checkpoint was loaded with `keep_quantized` (the GEMM kernel, or `linear_stored`, reads them); else
    `dense()` gives the values in the compute dtype.
    """

    dense: Callable[[], torch.Tensor]
    fp8: tuple[torch.Tensor, torch.Tensor] | None = None
