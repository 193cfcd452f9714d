"""Linear layers with the activation quantization of DeepSeek's reference code (spec §8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from v4_plugin.checkpoint.quant import fake_quant_fp8
from v4_plugin.runtime.ops.invariant import rows_times_transposed

ACT_BLOCK = 128  # activations are FP8-quantized per token per 128 input channels


def linear(x: torch.Tensor, weight: torch.Tensor, quantize_input: bool) -> torch.Tensor:
    """y = x @ weight.T in fp32, returned in x.dtype.

    x [..., in]; weight [out, in] holds the dequantized values of an FP8 or FP4 checkpoint weight.
    With `quantize_input` the activation is first rounded through FP8 e4m3 with one power-of-two
    scale per 128 channels, as DeepSeek's reference FP8/FP4 GEMMs do; the product of the two dequantized
    operands in fp32 equals those GEMMs up to accumulation order.
    """
    xq = fake_quant_fp8(x.float(), ACT_BLOCK) if quantize_input else x.float()
    return rows_times_transposed(xq, weight.float()).to(x.dtype)


@dataclass(frozen=True)
class LinearWeight:
    """One linear layer's weight [out, in], as `dispatch.linear` takes it.

    `dense()` gives the values in the compute dtype (a kept-quantized weight is dequantized on the
    first call); `fp8` holds the checkpoint entries (e4m3 [out, in], E8M0 [ceil(out/128), ceil(in/128)])
    when the checkpoint was loaded with `keep_quantized`, else None.
    """

    dense: Callable[[], torch.Tensor]
    fp8: tuple[torch.Tensor, torch.Tensor] | None = None
