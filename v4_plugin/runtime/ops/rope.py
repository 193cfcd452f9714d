"""Rotary position embedding of DeepSeek-V4 (spec §4.8).

Interleaved pairs (GPT-J style) on the last `rope_dim` dims of a vector. Compressed layers use
base `compress_rope_theta` with YaRN frequency interpolation (no attention-temperature factor);
SWA-only layers and MTP use plain `rope_theta`.
"""

from __future__ import annotations

import math

import torch

from v4_plugin.checkpoint.config import LayerType, V4Config, YarnScaling


def yarn_correction_range(dim: int, base: float, yarn: YarnScaling) -> tuple[int, int]:
    """Frequency indices [low, high] between which YaRN ramps from unscaled to scaled (15, 25 for V4)."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(correction_dim(yarn.beta_fast))
    high = math.ceil(correction_dim(yarn.beta_slow))
    return max(low, 0), min(high, dim - 1)


def rope_frequencies(dim: int, base: float, yarn: YarnScaling | None) -> torch.Tensor:
    """Angular frequency of each of the dim/2 rotated pairs, fp32 [dim/2]."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn is not None:
        low, high = yarn_correction_range(dim, base, yarn)
        span = max(high - low, 1e-3)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / span).clamp(0, 1)
        freqs = freqs * (1 - ramp) + (freqs / yarn.factor) * ramp
    return freqs


class Rope:
    """The rope of one layer: `rotate(x, positions)` turns the tail `dim` channels of x."""

    def __init__(self, dim: int, base: float, yarn: YarnScaling | None):
        self.dim = dim
        self.freqs = rope_frequencies(dim, base, yarn)

    @classmethod
    def for_layer(cls, cfg: V4Config, layer_type: LayerType) -> "Rope":
        if layer_type is LayerType.SWA:
            return cls(cfg.qk_rope_head_dim, cfg.rope_theta, None)
        return cls(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of position * freq, fp32 [len(positions), dim/2] (fp32 outer product, as DeepSeek's code)."""
        if self.freqs.device != positions.device:  # moved once, to where the model runs (no copy per call)
            self.freqs = self.freqs.to(positions.device)
        angles = torch.outer(positions.to(torch.float32), self.freqs)
        return torch.cos(angles), torch.sin(angles)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate the last `dim` channels of x [T, ..., d] by positions [T] (or by -positions if inverse).

        Pairs (d - dim + 2i, d - dim + 2i + 1) are rotated by angle position * freq_i. Math in fp32,
        result in x.dtype; the other channels are returned unchanged.
        """
        cos, sin = self.cos_sin(positions)
        if inverse:
            sin = -sin
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (self.dim // 2,)
        cos, sin = cos.view(shape), sin.view(shape)
        head, tail = x[..., : -self.dim], x[..., -self.dim :].float()
        even, odd = tail[..., 0::2], tail[..., 1::2]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
        return torch.cat((head, rotated.to(x.dtype)), dim=-1)
