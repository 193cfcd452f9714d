"""DeepSeek-V4 configuration: parse and validate a Hugging Face `config.json` into one typed object.

The official checkpoints (Flash, Pro and their -Base variants) and the tiny test checkpoints use the
same keys (spec §2.1). Checkpoints written by transformers' `save_pretrained` use another dialect;
`load_config` translates it first (see `v4_plugin.checkpoint.hf_config`). Every validation error is a `ConfigError` that
names the file and the field, so a bad checkpoint fails at startup with a message a user can act on.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from v4_plugin.checkpoint import hf_config

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS = ("flash", "pro", "flash-0731", "pro-0813")
ARCHITECTURE = "DeepseekV4ForCausalLM"
MODEL_TYPE = "deepseek_v4"

FP8_KV_BLOCK = 64  # the non-rope KV dims are FP8-quantized in blocks of 64 (spec §4.3)
FP4_BLOCK = 32  # FP4 (e2m1) values share one power-of-two scale per 32 elements (spec §4.6, §9.1)
WEIGHT_BLOCK = 128  # FP8 weights carry one scale per 128 x 128 block (spec §9.1)


class ConfigError(ValueError):
    """A `config.json` that does not describe a model this plugin can run; the message names the field."""


class LayerType(enum.Enum):
    """Attention type of one layer, keyed by its compress ratio (spec §2.3)."""

    SWA = 0  # sliding window only
    CSA = 4  # + overlapping 4x compressed stream, lightning-indexer top-k
    HCA = 128  # + non-overlapping 128x compressed stream, attended densely

    @property
    def ratio(self) -> int:
        return self.value


@dataclass(frozen=True)
class YarnScaling:
    """YaRN frequency interpolation used by the compressed (ratio > 0) layers; no mscale (spec §4.8)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float


@dataclass(frozen=True)
class DSparkConfig:
    """The DSpark drafter of the -0731 / -0813 refreshes: SWA-only stages stored as `mtp.0..S-1`."""

    block_size: int  # tokens drafted per proposal
    noise_token_id: int  # the mask token that fills the draft block after the anchor
    target_layer_ids: tuple[int, ...]  # main layers whose outputs condition the drafter (one per stage)
    markov_rank: int  # rank of the Markov head's token-to-token bias

    @property
    def num_stages(self) -> int:
        return len(self.target_layer_ids)


@dataclass(frozen=True)
class V4Config:
    """Hyperparameters of one DeepSeek-V4 model, with names from the HF `config.json` (spec §2.1)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_nextn_predict_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple[int, ...]
    rope_theta: float
    compress_rope_theta: float
    rope_scaling: YarnScaling | None
    max_position_embeddings: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    routed_scaling_factor: float
    num_hash_layers: int
    swiglu_limit: float
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    bos_token_id: int
    eos_token_id: int
    quantized: bool  # FP8 block-scaled linears (official format) vs plain float weights
    expert_dtype: str  # "fp4" (packed e2m1) | "fp8" | "float" (unquantized checkpoint)
    dspark: DSparkConfig | None = None  # the refreshes' drafter; None for the 04-24 release (MTP)
    source: str = field(default="<dict>", compare=False)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        """Non-rope dims of the 512-d head (448 for the real models), FP8 in the KV cache."""
        return self.head_dim - self.qk_rope_head_dim

    @property
    def num_draft_layers(self) -> int:
        """Layers after the main model: the MTP block(s) of 04-24, or the DSpark stages of a refresh."""
        return len(self.compress_ratios) - self.num_hidden_layers

    @property
    def has_mtp(self) -> bool:
        """True when `mtp.*` holds MTP blocks (e_proj/h_proj/enorm/hnorm), not DSpark stages."""
        return self.dspark is None and self.num_nextn_predict_layers > 0

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.o_groups

    @property
    def hc_mix_dim(self) -> int:
        """Width of the mHC mix vector: pre (hc) + post (hc) + comb (hc * hc)."""
        return (2 + self.hc_mult) * self.hc_mult

    def layer_type(self, layer_id: int) -> LayerType:
        """Attention type of a main layer (0 <= id < n) or an MTP layer (id >= n)."""
        return LayerType(self.compress_ratios[layer_id])

    @property
    def layer_types(self) -> tuple[LayerType, ...]:
        """Attention types of the main layers, MTP excluded."""
        return tuple(LayerType(r) for r in self.compress_ratios[: self.num_hidden_layers])

    def count(self, kind: LayerType) -> int:
        """Number of main layers of one attention type."""
        return sum(t is kind for t in self.layer_types)

    def is_hash_layer(self, layer_id: int) -> bool:
        """Hash-routed MoE: token id -> experts through `tid2eid` (main layers < num_hash_layers)."""
        return layer_id < min(self.num_hash_layers, self.num_hidden_layers)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "<dict>") -> "V4Config":
        return parse_config(raw, source)

    def to_dict(self) -> dict[str, Any]:
        """The official-format `config.json` content for this model."""
        out: dict[str, Any] = dict(_PUBLISHED_CONSTANTS)
        for name in _FIELDS:
            out[name] = getattr(self, name)
        out["rope_theta"], out["compress_rope_theta"] = _plain(self.rope_theta), _plain(self.compress_rope_theta)
        out["compress_ratios"] = list(self.compress_ratios)
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"type": "yarn", **{k: _plain(v) for k, v in self.rope_scaling.__dict__.items()}}
        if self.quantized:
            out["quantization_config"] = dict(_QUANTIZATION_CONFIG)
            out["expert_dtype"] = self.expert_dtype
        if self.dspark is not None:
            out.update(dspark_block_size=self.dspark.block_size, dspark_noise_token_id=self.dspark.noise_token_id,
                       dspark_target_layer_ids=list(self.dspark.target_layer_ids),
                       dspark_markov_rank=self.dspark.markov_rank)
        return dict(sorted(out.items()))


def _plain(value: Any) -> Any:
    """Integral rope floats back to ints, as the published config.json writes them (rope_theta 10000)."""
    return int(value) if isinstance(value, float) and value.is_integer() and value >= 1 else value


# Keys of the published config.json that every V4 checkpoint has with these values.
_PUBLISHED_CONSTANTS: dict[str, Any] = {
    "architectures": [ARCHITECTURE],
    "model_type": MODEL_TYPE,
    "num_key_value_heads": 1,
    "hidden_act": "silu",
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "transformers_version": "4.57.1",
}

_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [WEIGHT_BLOCK, WEIGHT_BLOCK],
}

# Required keys and their Python types, in dataclass order.
_FIELDS: dict[str, type] = {
    "vocab_size": int,
    "hidden_size": int,
    "num_hidden_layers": int,
    "num_nextn_predict_layers": int,
    "num_attention_heads": int,
    "head_dim": int,
    "qk_rope_head_dim": int,
    "q_lora_rank": int,
    "o_groups": int,
    "o_lora_rank": int,
    "sliding_window": int,
    "compress_ratios": list,
    "rope_theta": float,
    "compress_rope_theta": float,
    "max_position_embeddings": int,
    "index_n_heads": int,
    "index_head_dim": int,
    "index_topk": int,
    "moe_intermediate_size": int,
    "n_routed_experts": int,
    "n_shared_experts": int,
    "num_experts_per_tok": int,
    "routed_scaling_factor": float,
    "num_hash_layers": int,
    "swiglu_limit": float,
    "hc_mult": int,
    "hc_sinkhorn_iters": int,
    "hc_eps": float,
    "rms_norm_eps": float,
    "bos_token_id": int,
    "eos_token_id": int,
}
_DEFAULTS: dict[str, Any] = {"num_nextn_predict_layers": 0, "bos_token_id": 0, "eos_token_id": 1}


def _refuse_other_variants(raw: Mapping[str, Any], where: str) -> None:
    """Recognise DeepSeek checkpoints that look like V4 but are not the model this plugin runs."""
    model_type = raw.get("model_type")
    ratios = raw.get("compress_ratios") or []
    if model_type == "deepseek_v41" or "kv_source_layer_ids" in raw or any(
        k.startswith("engram") for k in raw
    ) or any(r in (1, 2) for r in ratios if isinstance(r, int)):
        raise ConfigError(
            f"{where}: this is a DeepSeek-V4.1 checkpoint (model_type {model_type!r}, ratio-2/1 or engram "
            "layers): a different architecture, not supported by deepseek-v4-plugin"
        )
    if any(k.startswith("vision") for k in raw):
        raise ConfigError(
            f"{where}: this is a DeepSeek-V4 Vision checkpoint (vision_* keys: a vision tower, image-routed "
            "experts); it is not supported: deepseek-v4-plugin serves the text-only V4 models"
        )


def _typed(raw: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    if name not in raw:
        if name in _DEFAULTS:
            return _DEFAULTS[name]
        raise ConfigError(f"{where}: missing field '{name}'")
    value = raw[name]
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    if not ok:
        raise ConfigError(f"{where}: field '{name}' must be {kind.__name__}, got {value!r}")
    return value


def _check(cond: bool, where: str, name: str, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: field '{name}' {rule}")


def parse_config(raw: Mapping[str, Any], source: str = "<dict>") -> V4Config:
    """Validate an official-format config dict (spec §2.1) and return the typed config."""
    where = source
    archs = raw.get("architectures") or [ARCHITECTURE]
    _refuse_other_variants(raw, where)
    _check(raw.get("model_type", MODEL_TYPE) == MODEL_TYPE, where, "model_type", f"must be '{MODEL_TYPE}'")
    _check(ARCHITECTURE in archs, where, "architectures", f"must contain '{ARCHITECTURE}', got {archs!r}")

    v = {name: _typed(raw, name, kind, where) for name, kind in _FIELDS.items()}
    ratios = v["compress_ratios"]
    n, n_mtp = v["num_hidden_layers"], v["num_nextn_predict_layers"]

    positive = [
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
        "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
        "index_n_heads", "index_head_dim", "index_topk", "moe_intermediate_size", "n_routed_experts",
        "num_experts_per_tok", "hc_mult", "hc_sinkhorn_iters", "max_position_embeddings",
    ]
    for name in positive:
        _check(v[name] > 0, where, name, f"must be > 0, got {v[name]}")
    for name in ("num_nextn_predict_layers", "num_hash_layers", "swiglu_limit", "hc_eps", "rms_norm_eps"):
        _check(v[name] >= 0, where, name, f"must be >= 0, got {v[name]}")

    dspark = _parse_dspark(raw, n, v["vocab_size"], where)
    if dspark is None:
        n_draft, rule = n_mtp, f"num_hidden_layers + num_nextn_predict_layers = {n} + {n_mtp}"
    else:  # a refresh: num_nextn_predict_layers is stale; one SWA-only entry per DSpark stage follows
        n_draft, rule = dspark.num_stages, f"num_hidden_layers + len(dspark_target_layer_ids) = {n} + {dspark.num_stages}"
    _check(len(ratios) == n + n_draft, where, "compress_ratios",
           f"must have {rule} = {n + n_draft} entries, got {len(ratios)}")
    for i, r in enumerate(ratios):
        _check(r in (0, 4, 128), where, f"compress_ratios[{i}]", f"must be 0 (SWA), 4 (CSA) or 128 (HCA), got {r!r}")
    for i in range(n, n + n_draft):
        _check(ratios[i] == 0, where, f"compress_ratios[{i}]", "(a draft layer) must be 0: MTP/DSpark layers are SWA-only")

    _check(raw.get("num_key_value_heads", 1) == 1, where, "num_key_value_heads", "must be 1 (one shared K=V vector)")
    _check(v["n_shared_experts"] == 1, where, "n_shared_experts", f"must be 1, got {v['n_shared_experts']}")
    _check(raw.get("scoring_func", "sqrtsoftplus") == "sqrtsoftplus", where, "scoring_func", "must be 'sqrtsoftplus'")
    _check(
        v["qk_rope_head_dim"] < v["head_dim"] and v["qk_rope_head_dim"] % 2 == 0, where, "qk_rope_head_dim",
        f"must be even and smaller than head_dim ({v['head_dim']}), got {v['qk_rope_head_dim']}",
    )
    _check(
        (v["head_dim"] - v["qk_rope_head_dim"]) % FP8_KV_BLOCK == 0, where, "head_dim",
        f"minus qk_rope_head_dim must be a multiple of {FP8_KV_BLOCK} (FP8 KV blocks), "
        f"got {v['head_dim']} - {v['qk_rope_head_dim']}",
    )
    _check(
        v["num_attention_heads"] % v["o_groups"] == 0, where, "num_attention_heads",
        f"({v['num_attention_heads']}) must be divisible by o_groups ({v['o_groups']})",
    )
    idx = v["index_head_dim"]
    _check(
        idx & (idx - 1) == 0 and idx % FP4_BLOCK == 0 and idx >= v["qk_rope_head_dim"], where, "index_head_dim",
        f"must be a power of two, a multiple of {FP4_BLOCK} and >= qk_rope_head_dim (Hadamard + FP4), got {idx}",
    )
    _check(
        v["num_experts_per_tok"] <= v["n_routed_experts"], where, "num_experts_per_tok",
        f"({v['num_experts_per_tok']}) must be <= n_routed_experts ({v['n_routed_experts']})",
    )
    _check(v["num_hash_layers"] <= n, where, "num_hash_layers", f"must be <= num_hidden_layers ({n})")
    for name in ("hidden_size", "moe_intermediate_size"):
        _check(v[name] % FP4_BLOCK == 0, where, name, f"must be a multiple of {FP4_BLOCK} (FP4 expert scales)")
    for name in ("bos_token_id", "eos_token_id"):
        _check(0 <= v[name] < v["vocab_size"], where, name, f"must be a token id < vocab_size, got {v[name]}")

    yarn = _parse_rope_scaling(raw.get("rope_scaling"), where)
    quantized, expert_dtype = _parse_quantization(raw, where)
    v["compress_ratios"] = tuple(ratios)
    return V4Config(**v, rope_scaling=yarn, quantized=quantized, expert_dtype=expert_dtype, dspark=dspark,
                    source=source)


def _parse_dspark(raw: Mapping[str, Any], n_layers: int, vocab: int, where: str) -> DSparkConfig | None:
    keys = ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank")
    if not any(k in raw for k in keys):
        return None
    for k in keys:
        _check(k in raw, where, k, "is missing (a DSpark checkpoint has all four dspark_* keys)")
    ids = raw["dspark_target_layer_ids"]
    _check(isinstance(ids, list) and len(ids) > 0 and all(isinstance(i, int) and 0 <= i < n_layers for i in ids),
           where, "dspark_target_layer_ids", f"must be a non-empty list of main layer ids < {n_layers}, got {ids!r}")
    for k in ("dspark_block_size", "dspark_markov_rank"):
        _check(isinstance(raw[k], int) and raw[k] > 0, where, k, f"must be a positive int, got {raw[k]!r}")
    noise = raw["dspark_noise_token_id"]
    _check(isinstance(noise, int) and 0 <= noise < vocab, where, "dspark_noise_token_id", f"must be a token id < {vocab}")
    return DSparkConfig(raw["dspark_block_size"], noise, tuple(ids), raw["dspark_markov_rank"])


def _parse_rope_scaling(rs: Any, where: str) -> YarnScaling | None:
    if rs is None:
        return None
    _check(isinstance(rs, dict), where, "rope_scaling", "must be an object")
    kind = rs.get("type", rs.get("rope_type"))
    _check(kind == "yarn", where, "rope_scaling.type", f"must be 'yarn', got {kind!r}")
    try:
        return YarnScaling(
            factor=float(rs["factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            beta_fast=float(rs.get("beta_fast", 32)),
            beta_slow=float(rs.get("beta_slow", 1)),
        )
    except KeyError as e:
        raise ConfigError(f"{where}: field 'rope_scaling.{e.args[0]}' is missing") from None


def _parse_quantization(raw: Mapping[str, Any], where: str) -> tuple[bool, str]:
    qc = raw.get("quantization_config")
    if qc is None:
        return False, "float"
    for key, want in (("quant_method", "fp8"), ("fmt", "e4m3"), ("scale_fmt", "ue8m0")):
        _check(qc.get(key, want) == want, where, f"quantization_config.{key}", f"must be {want!r}, got {qc.get(key)!r}")
    block = list(qc.get("weight_block_size", [WEIGHT_BLOCK, WEIGHT_BLOCK]))
    _check(block == [WEIGHT_BLOCK, WEIGHT_BLOCK], where, "quantization_config.weight_block_size", f"must be [128, 128], got {block}")
    expert_dtype = raw.get("expert_dtype") or "fp4"  # vLLM and DeepSeek's code default a missing value to fp4
    _check(expert_dtype in ("fp4", "fp8"), where, "expert_dtype", f"must be 'fp4' or 'fp8', got {expert_dtype!r}")
    return True, expert_dtype


def load_config(path: str | Path) -> V4Config:
    """Load `config.json` (or a checkpoint directory holding one), in either dialect."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    if hf_config.is_transformers_dialect(raw):
        raw = hf_config.config_from_transformers(raw)
    return parse_config(raw, str(path))


def preset_config(name: str) -> V4Config:
    """The published config of a real model: `flash`, `pro`, `flash-0731` or `pro-0813`."""
    path = PRESET_DIR / f"deepseek-v4-{name}.config.json"
    if not path.exists():
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}, or pass a config.json path")
    return load_config(path)

