"""Tiny random DeepSeek-V4 checkpoints in the real on-disk format, for tests and demos (a few MB).

`TINY_PRESETS` are official-format `config.json` dicts (spec §2.1) with the real schedule shape, hc,
RoPE/YaRN and quantization settings but small dims; 96-wide dims give partial 128 x 128 FP8 blocks on
purpose. `random_weights` draws a numerically healthy model and rounds it onto the file grids, and
`write_checkpoint` stores it exactly as DeepSeek ships V4: FP8 block-scaled linears, packed FP4
experts, bf16 / fp32 / int64 tensors, sharded safetensors with an index, config, generation config
and a tokenizer. `load_checkpoint` of the result gives back `random_weights` bit for bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from v4_plugin.text.chat import PREVIEW_PROFILE, REFRESH_PROFILE
from v4_plugin.checkpoint.loader import CONFIG_FILE, INDEX_FILE, decode_tensor
from v4_plugin.checkpoint.config import V4Config, parse_config
from v4_plugin.checkpoint.quant import quantize_weight_fp4, quantize_weight_fp8
from v4_plugin.checkpoint.schema import Format, TensorSpec, checkpoint_tensors, file_entries
from v4_plugin.text.tokenizer import build_tokenizer, write_tokenizer

_FLASH: dict[str, Any] = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "compress_ratios": [0, 0, 4, 128, 4, 0],
    "compress_rope_theta": 160000,
    "eos_token_id": 1,
    "expert_dtype": "fp4",
    "hc_eps": 1e-06,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 128,
    "index_head_dim": 64,
    "index_n_heads": 4,
    "index_topk": 16,
    "initializer_range": 0.02,
    "max_position_embeddings": 4096,
    "model_type": "deepseek_v4",
    "moe_intermediate_size": 96,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 8,
    "num_experts_per_tok": 2,
    "num_hash_layers": 3,
    "num_hidden_layers": 5,
    "num_key_value_heads": 1,
    "num_nextn_predict_layers": 1,
    "o_groups": 2,
    "o_lora_rank": 64,
    "q_lora_rank": 96,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1,
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus",
    "sliding_window": 128,
    "swiglu_limit": 10.0,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1",
    "use_cache": True,
    "vocab_size": 384,
}
_PRO_CHANGES: dict[str, Any] = {
    "compress_ratios": [128, 128, 4, 128, 4, 0],
    "num_attention_heads": 16,
    "o_groups": 4,
    "q_lora_rank": 128,
    "index_topk": 32,
    "routed_scaling_factor": 2.5,
}
_PRO: dict[str, Any] = {**_FLASH, **_PRO_CHANGES}


def _refresh(base: dict[str, Any], markov_rank: int) -> dict[str, Any]:
    """The -0731 / -0813 format of a preset: the same main model, three SWA-only DSpark stages
    conditioned on the last three main layers, a stale num_nextn_predict_layers = 1."""
    n = base["num_hidden_layers"]
    return {**base, "compress_ratios": base["compress_ratios"][:n] + [0, 0, 0], "dspark_block_size": 5,
            "dspark_noise_token_id": base["vocab_size"] - 1, "dspark_target_layer_ids": [n - 3, n - 2, n - 1],
            "dspark_markov_rank": markov_rank}


TINY_PRESETS: dict[str, dict[str, Any]] = {
    "flash": _FLASH, "pro": _PRO, "flash-0731": _refresh(_FLASH, 16), "pro-0813": _refresh(_PRO, 32),
}
"""Official-format config dicts of the tiny models: 5 layers + 1 MTP (or 3 DSpark stages), hidden 128, vocab 384.

A refresh preset draws the same main-model weights as its 04-24 preset for the same seed (the main
tensors come first in `checkpoint_tensors` order), as the real refreshes keep the main model."""

GENERATION_CONFIG_FILE = "generation_config.json"


# ---- random weights -----------------------------------------------------------------------------
def _random_value(spec: TensorSpec, cfg: V4Config, g: torch.Generator) -> torch.Tensor:
    """One fp32 tensor (int64 for `tid2eid`) of the logical shape; N(0, v) means variance v."""
    name, shape = spec.name, spec.shape
    leaf = name.rsplit(".", 1)[-1]

    def normal(variance: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * math.sqrt(variance)

    if spec.format is Format.I64:  # ffn.gate.tid2eid [vocab, k]: k distinct experts per token id
        return torch.rand((shape[0], cfg.n_routed_experts), generator=g).argsort(dim=1)[:, : shape[1]].contiguous()
    if name == "embed.weight":
        return normal(1.0)
    if name == "head.weight":
        return 2 * normal(1 / cfg.hidden_size)
    if name.endswith("norm.weight") or (leaf.startswith("hc_") and leaf.endswith("_scale")):
        return 1 + 0.1 * normal(1.0)
    if leaf.startswith("hc_") and leaf.endswith("_fn"):
        return normal(1 / (cfg.hc_mult * cfg.hidden_size))
    if leaf.startswith("hc_") and leaf.endswith("_base"):
        return normal(0.5)
    if leaf == "attn_sink":
        return normal(1.0)
    if leaf == "ape":
        return normal(0.5)
    if name.endswith("gate.bias"):
        return normal(0.1)
    if len(shape) == 2:  # every linear, quantized or bf16: N(0, 1 / fan_in)
        return normal(1 / shape[1])
    raise ValueError(f"no initializer for tensor '{name}' {list(shape)}")


def random_weights(cfg: V4Config, seed: int) -> dict[str, torch.Tensor]:
    """A deterministic random model under official names, as `load_checkpoint` returns it.

    Values are drawn in fp32 from a local generator seeded with `seed` (embed N(0, 1); linears
    N(0, 1/fan_in); norms and hc scales 1 + 0.1 N(0, 1); hc_*_fn N(0, 1/(hc D)); hc bases and ape
    N(0, 0.5); attn_sink N(0, 1); gate.bias N(0, 0.1); head 2 N(0, 1/D); variances), then rounded
    onto what the file stores (FP8 blocks, FP4 experts, bf16), so every value equals the loaded
    one exactly. Float tensors are fp32; `tid2eid` is int64 [vocab, k] with distinct experts per row.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in checkpoint_tensors(cfg):
        parts = encode_tensor(spec, _random_value(spec, cfg, g))
        out[spec.key] = decode_tensor(spec, list(parts.values()), torch.float32)
    return out


# ---- writing ------------------------------------------------------------------------------------
_ENCODERS: dict[Format, Callable[[torch.Tensor], tuple[torch.Tensor, ...]]] = {
    Format.FP8: quantize_weight_fp8,
    Format.FP4: quantize_weight_fp4,
    Format.BF16: lambda v: (v.to(torch.bfloat16),),
    Format.FLOAT: lambda v: (v.to(torch.bfloat16),),  # unquantized linears are written as bf16
    Format.FP32: lambda v: (v.to(torch.float32),),
    Format.I64: lambda v: (v.to(torch.int64),),
}


def encode_tensor(spec: TensorSpec, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The file entries (name -> contiguous tensor, `file_entries` order) that store `value` per `spec.format`."""
    names = [name for name, _, _ in file_entries(spec)]
    return {name: t.contiguous() for name, t in zip(names, _ENCODERS[spec.format](value), strict=True)}


def _check_tensors(cfg: V4Config, tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """The specs to write; `tensors` must hold exactly their official names with the logical shapes."""
    specs = checkpoint_tensors(cfg)
    names = [s.key for s in specs]
    missing, extra = set(names) - set(tensors), set(tensors) - set(names)
    if missing or extra:
        raise ValueError(f"tensors do not match the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")
    for spec, name in zip(specs, names):
        if tuple(tensors[name].shape) != spec.shape:
            raise ValueError(f"tensor '{name}' has shape {list(tensors[name].shape)}, expected {list(spec.shape)}")
    return specs


def _shard_of_groups(sizes: Sequence[int], num_shards: int) -> list[int]:
    """Assign consecutive groups (byte sizes) to `num_shards` non-empty shards of about equal bytes."""
    if not 1 <= num_shards <= len(sizes):
        raise ValueError(f"num_shards must be between 1 and {len(sizes)}, got {num_shards}")
    total, start, shard, out = sum(sizes), 0, 0, []
    for i, size in enumerate(sizes):
        by_bytes = (start + size / 2) * num_shards // total  # shard holding this group's midpoint
        lowest, highest = num_shards - (len(sizes) - i), min(shard + 1, i)  # leave no shard empty
        shard = int(min(max(by_bytes, lowest, shard), highest))
        out.append(shard)
        start += size
    return out


def _shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def write_checkpoint(
    cfg: V4Config, tensors: Mapping[str, torch.Tensor], out_dir: str | Path, *, num_shards: int = 3
) -> Path:
    """Write `tensors` (official names and logical shapes, any float dtype) as an official-format checkpoint.

    Each tensor is stored per its `Format` (FP8 e4m3 + E8M0 128 x 128 block scales, packed FP4 + E8M0
    per 32, bf16, fp32, int64) in `num_shards` shards `model-0000K-of-0000N.safetensors`, in schema
    order, a `.weight` always next to its `.scale`. Also writes `model.safetensors.index.json`
    (`total_size` = tensor bytes), `config.json` (`cfg.to_dict()`), `generation_config.json` and the
    test tokenizer. Raises ValueError for tensors that do not match `cfg` or a vocab_size smaller
    than the tokenizer's. Returns `out_dir`.
    """
    vocab = build_tokenizer().get_vocab_size()
    if cfg.vocab_size < vocab:
        raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than the test tokenizer's {vocab} tokens")
    groups = [encode_tensor(spec, tensors[spec.key]) for spec in _check_tensors(cfg, tensors)]
    sizes = [sum(t.nbytes for t in group.values()) for group in groups]
    assignment = _shard_of_groups(sizes, num_shards)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for k in range(num_shards):
        shard = {name: t for group, s in zip(groups, assignment) if s == k for name, t in group.items()}
        path = out / _shard_name(k, num_shards)
        save_file(shard, path, metadata={"format": "pt"})
        path.chmod(0o644)  # safetensors creates 0600 files; a checkpoint is read by other users too
        weight_map.update(dict.fromkeys(shard, _shard_name(k, num_shards)))
    _write_json(out / INDEX_FILE, {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})
    _write_json(out / CONFIG_FILE, cfg.to_dict())
    _write_json(out / GENERATION_CONFIG_FILE, {
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "do_sample": True, "temperature": 1.0, "top_p": 1.0,
    })
    write_tokenizer(out, REFRESH_PROFILE if cfg.dspark is not None else PREVIEW_PROFILE)
    return out


def make_tiny(out_dir: str | Path, preset: str = "flash", seed: int = 0,
              overrides: Mapping[str, Any] | None = None) -> Path:
    """Write the tiny `preset` checkpoint (see `TINY_PRESETS`) with `random_weights(cfg, seed)` to `out_dir`;
    `overrides`: config fields to change first (e.g. a wider `moe_intermediate_size` for tensor-parallel tests)."""
    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {sorted(TINY_PRESETS)}")
    where = f"tiny preset {preset!r}" + (f" with {dict(overrides)}" if overrides else "")
    cfg = parse_config({**TINY_PRESETS[preset], **(overrides or {})}, where)
    return write_checkpoint(cfg, random_weights(cfg, seed), out_dir)
