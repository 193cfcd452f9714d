"""The tensor inventory of an official DeepSeek-V4 checkpoint: every name, shape and on-disk format (spec §9).

One function, `checkpoint_tensors`, is the single source for the loader's checks, the tiny-checkpoint
writer and parameter counts. Quantized linears appear once, as a `TensorSpec` whose `format` says
how the file stores them (`.weight` plus a `.scale` tensor); `file_entries` expands them to the
exact (name, shape, dtype) entries found in the safetensors files.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from v4_plugin.checkpoint.config import FP4_BLOCK, WEIGHT_BLOCK, LayerType, V4Config


class Format(enum.Enum):
    """How one logical tensor is stored."""

    FP8 = "fp8"  # .weight F8_E4M3 [out, in] + .scale F8_E8M0 [ceil(out/128), ceil(in/128)]
    FP4 = "fp4"  # .weight I8 [out, in/2] (two e2m1 codes, low nibble first) + .scale F8_E8M0 [out, in/32]
    BF16 = "bf16"
    FP32 = "fp32"
    I64 = "i64"
    FLOAT = "float"  # an unquantized checkpoint's linear: .weight only, in any float dtype

# In an unquantized checkpoint (transformers' dialect) BF16 and FP32 tensors may be stored in any
# float dtype; the loader relaxes its dtype check accordingly.


@dataclass(frozen=True)
class TensorSpec:
    """One logical tensor: `name` is its full file name, except that linears omit `.weight`/`.scale`."""

    name: str
    shape: tuple[int, ...]  # logical (dequantized) shape
    format: Format

    @property
    def is_linear(self) -> bool:
        return self.format in (Format.FP8, Format.FP4, Format.FLOAT)

    @property
    def key(self) -> str:
        """The name of the loaded (dequantized) tensor: `<name>.weight` for linears, else the file name."""
        return f"{self.name}.weight" if self.is_linear else self.name


_DTYPES = {Format.BF16: torch.bfloat16, Format.FP32: torch.float32, Format.I64: torch.int64}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def file_entries(spec: TensorSpec) -> list[tuple[str, tuple[int, ...], torch.dtype | None]]:
    """The (name, shape, dtype) entries one logical tensor occupies in the files; dtype None = any float."""
    if spec.format is Format.FP8:
        out, inp = spec.shape
        return [(f"{spec.name}.weight", spec.shape, torch.float8_e4m3fn),
                (f"{spec.name}.scale", (_ceil(out, WEIGHT_BLOCK), _ceil(inp, WEIGHT_BLOCK)), torch.float8_e8m0fnu)]
    if spec.format is Format.FP4:
        out, inp = spec.shape
        return [(f"{spec.name}.weight", (out, inp // 2), torch.int8),
                (f"{spec.name}.scale", (out, inp // FP4_BLOCK), torch.float8_e8m0fnu)]
    if spec.format is Format.FLOAT:
        return [(f"{spec.name}.weight", spec.shape, None)]
    return [(spec.name, spec.shape, _DTYPES[spec.format])]


def element_bytes(dtype: torch.dtype | None) -> int:
    """Bytes of one element of a file entry of `dtype` (None, any float: counted as bf16)."""
    return torch.empty(0, dtype=dtype or torch.bfloat16).element_size()


def stored_bytes(spec: TensorSpec) -> int:
    """Bytes of one logical tensor's file entries as stored (an unquantized linear counted as bf16)."""
    return sum(math.prod(shape) * element_bytes(dtype) for _, shape, dtype in file_entries(spec))


def _block_tensors(cfg: V4Config, p: str, layer_id: int, lin: Format, experts: Format) -> list[TensorSpec]:
    bf16 = Format.BF16
    d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    mix, hc_dim = cfg.hc_mix_dim, cfg.hc_mult * cfg.hidden_size
    inter, n_exp = cfg.moe_intermediate_size, cfg.n_routed_experts
    t = [
        TensorSpec(f"{p}.hc_attn_fn", (mix, hc_dim), Format.FP32),
        TensorSpec(f"{p}.hc_ffn_fn", (mix, hc_dim), Format.FP32),
        TensorSpec(f"{p}.hc_attn_base", (mix,), Format.FP32),
        TensorSpec(f"{p}.hc_ffn_base", (mix,), Format.FP32),
        TensorSpec(f"{p}.hc_attn_scale", (3,), Format.FP32),
        TensorSpec(f"{p}.hc_ffn_scale", (3,), Format.FP32),
        TensorSpec(f"{p}.attn_norm.weight", (d,), bf16),
        TensorSpec(f"{p}.ffn_norm.weight", (d,), bf16),
        TensorSpec(f"{p}.attn.attn_sink", (h,), Format.FP32),
        TensorSpec(f"{p}.attn.wq_a", (cfg.q_lora_rank, d), lin),
        TensorSpec(f"{p}.attn.q_norm.weight", (cfg.q_lora_rank,), bf16),
        TensorSpec(f"{p}.attn.wq_b", (h * hd, cfg.q_lora_rank), lin),
        TensorSpec(f"{p}.attn.wkv", (hd, d), lin),
        TensorSpec(f"{p}.attn.kv_norm.weight", (hd,), bf16),
        TensorSpec(f"{p}.attn.wo_a", (cfg.o_groups * cfg.o_lora_rank, h * hd // cfg.o_groups), lin),
        TensorSpec(f"{p}.attn.wo_b", (d, cfg.o_groups * cfg.o_lora_rank), lin),
        TensorSpec(f"{p}.ffn.gate.weight", (n_exp, d), bf16),
    ]
    kind = cfg.layer_type(layer_id)
    if kind is not LayerType.SWA:
        width = (2 if kind is LayerType.CSA else 1) * hd
        t += _compressor(f"{p}.attn.compressor", kind.ratio, width, hd, d)
    if kind is LayerType.CSA:
        di, hi = cfg.index_head_dim, cfg.index_n_heads
        t += [TensorSpec(f"{p}.attn.indexer.wq_b", (hi * di, cfg.q_lora_rank), lin),
              TensorSpec(f"{p}.attn.indexer.weights_proj.weight", (hi, d), bf16)]
        t += _compressor(f"{p}.attn.indexer.compressor", kind.ratio, 2 * di, di, d)
    if layer_id < cfg.num_hidden_layers and cfg.is_hash_layer(layer_id):
        t.append(TensorSpec(f"{p}.ffn.gate.tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok), Format.I64))
    else:
        t.append(TensorSpec(f"{p}.ffn.gate.bias", (n_exp,), Format.FP32))
    for w, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
        t.append(TensorSpec(f"{p}.ffn.shared_experts.{w}", shape, lin))
    for e in range(n_exp):
        for w, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
            t.append(TensorSpec(f"{p}.ffn.experts.{e}.{w}", shape, experts))
    return t


def _compressor(p: str, ratio: int, width: int, entry: int, d: int) -> list[TensorSpec]:
    # wkv / wgate are stored bf16 (and used in fp32).
    return [TensorSpec(f"{p}.wkv.weight", (width, d), Format.BF16), TensorSpec(f"{p}.wgate.weight", (width, d), Format.BF16),
            TensorSpec(f"{p}.ape", (ratio, width), Format.FP32), TensorSpec(f"{p}.norm.weight", (entry,), Format.BF16)]


def checkpoint_tensors(cfg: V4Config, include_mtp: bool = True) -> list[TensorSpec]:
    """Every logical tensor of the checkpoint `cfg` describes, in file order (globals, layers, MTP)."""
    lin = Format.FP8 if cfg.quantized else Format.FLOAT
    experts = {"fp4": Format.FP4, "fp8": Format.FP8}.get(cfg.expert_dtype, Format.FLOAT)
    bf16 = Format.BF16
    d, v, hc = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult
    out = [TensorSpec("embed.weight", (v, d), bf16)]
    for i in range(cfg.num_hidden_layers):
        out += _block_tensors(cfg, f"layers.{i}", i, lin, experts)
    out += [TensorSpec("norm.weight", (d,), bf16), TensorSpec("head.weight", (v, d), bf16),
            TensorSpec("hc_head_fn", (hc, hc * d), Format.FP32), TensorSpec("hc_head_base", (hc,), Format.FP32),
            TensorSpec("hc_head_scale", (1,), Format.FP32)]
    if include_mtp and cfg.dspark is not None:
        out += _dspark_tensors(cfg, lin, experts)
    elif include_mtp:
        for k in range(cfg.num_nextn_predict_layers):
            p = f"mtp.{k}"
            out += _block_tensors(cfg, p, cfg.num_hidden_layers + k, lin, experts)
            out += [TensorSpec(f"{p}.e_proj", (d, d), lin), TensorSpec(f"{p}.h_proj", (d, d), lin),
                    TensorSpec(f"{p}.enorm.weight", (d,), bf16), TensorSpec(f"{p}.hnorm.weight", (d,), bf16),
                    TensorSpec(f"{p}.norm.weight", (d,), bf16), TensorSpec(f"{p}.hc_head_fn", (hc, hc * d), Format.FP32),
                    TensorSpec(f"{p}.hc_head_base", (hc,), Format.FP32),
                    TensorSpec(f"{p}.hc_head_scale", (1,), Format.FP32)]
    return out


def _dspark_tensors(cfg: V4Config, lin: Format, experts: Format) -> list[TensorSpec]:
    """The DSpark drafter of a refresh checkpoint, stored as `mtp.0 ... mtp.{S-1}`.

    Every stage is an SWA-only decoder block; stage 0 also holds `main_proj` (the S target layers'
    stream means, concatenated, -> D) and `main_norm`; the last stage holds the output head stack
    (norm, hc_head, the Markov head's two rank-R tables and the confidence head).
    """
    d, v, hc = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult
    stages, rank = cfg.dspark.num_stages, cfg.dspark.markov_rank
    out: list[TensorSpec] = []
    for k in range(stages):
        p = f"mtp.{k}"
        out += _block_tensors(cfg, p, cfg.num_hidden_layers + k, lin, experts)
        if k == 0:
            out += [TensorSpec(f"{p}.main_proj", (d, stages * d), lin),
                    TensorSpec(f"{p}.main_norm.weight", (d,), Format.BF16)]
        if k == stages - 1:
            out += [TensorSpec(f"{p}.norm.weight", (d,), Format.BF16),
                    TensorSpec(f"{p}.hc_head_fn", (hc, hc * d), Format.FP32),
                    TensorSpec(f"{p}.hc_head_base", (hc,), Format.FP32),
                    TensorSpec(f"{p}.hc_head_scale", (1,), Format.FP32),
                    TensorSpec(f"{p}.markov_head.markov_w1.weight", (v, rank), Format.BF16),
                    TensorSpec(f"{p}.markov_head.markov_w2.weight", (v, rank), Format.BF16),
                    TensorSpec(f"{p}.confidence_head.proj.weight", (1, d + rank), Format.BF16)]
    return out
