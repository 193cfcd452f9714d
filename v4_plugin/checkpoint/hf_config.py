"""The transformers dialect of a DeepSeek-V4 `config.json`, to and from the official format.

transformers (``model_type == "deepseek_v4"``, checked against 5.19.0) writes its own config keys
(``layer_types``, ``compress_rates``, ``mlp_layer_types``, nested ``rope_parameters``). This module
maps them to the official keys of the spec (§2.1) and back. transformers has no MTP block, so the
official config produced here has ``num_nextn_predict_layers = 0``. The tensor names are
`v4_plugin.checkpoint.hf_tensors`'; see docs/transformers-deepseek-v4.md for the full map.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
HASH_MOE, MOE = "hash_moe", "moe"
_DEFAULT_RATES = {CSA: 4, HCA: 128}
_DEFAULT_PARTIAL_ROTARY = 64 / 512  # transformers' DeepseekV4Config.default_partial_rotary_factor
_DEFAULT_HASH_LAYERS = 3  # transformers' DeepseekV4Config.default_num_hash_layers

# Config keys that exist only in the transformers dialect (consumed or dropped on the way in).
_HF_ONLY_KEYS = {
    "layer_types", "compress_rates", "mlp_layer_types", "rope_parameters", "partial_rotary_factor",
    "dtype", "mlp_bias", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "output_attentions", "output_hidden_states", "return_dict", "_name_or_path",
}
# Config keys that exist only in the official format (consumed or dropped on the way out).
_OFFICIAL_ONLY_KEYS = {
    "compress_ratios", "num_hash_layers", "rope_scaling", "topk_method", "torch_dtype",
    "quantization_config", "expert_dtype",
}

def is_transformers_dialect(config: Mapping) -> bool:
    """True for a ``deepseek_v4`` config.json written by transformers (``save_pretrained``).

    The official config has ``compress_ratios`` (and ``num_hash_layers``, ``rope_scaling``);
    transformers writes ``layer_types``, ``compress_rates``, ``mlp_layer_types`` and a nested
    ``rope_parameters`` instead, and never writes ``compress_ratios``.
    """
    if config.get("model_type", "deepseek_v4") != "deepseek_v4" or "compress_ratios" in config:
        return False
    return any(k in config for k in ("layer_types", "compress_rates", "mlp_layer_types", "rope_parameters"))


def _nested_rope(config: Mapping) -> tuple[dict, dict]:
    """(main, compress) rope dicts, normalised the way ``DeepseekV4Config.__post_init__`` does."""
    rp = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    prf = config.get("partial_rotary_factor")
    if prf is None and config.get("qk_rope_head_dim"):  # what __post_init__ does with the legacy key
        prf = config["qk_rope_head_dim"] / config.get("head_dim", 512)
    prf = prf or _DEFAULT_PARTIAL_ROTARY
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, comp = dict(rp["main"]), dict(rp["compress"])
    else:  # flat dict = the compress-rope scaling parameters
        main = {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)}
        comp = {k: v for k, v in rp.items() if k not in ("main", "compress")}
        comp["rope_theta"] = config.get("compress_rope_theta", 160000.0)
        comp["rope_type"] = comp.get("rope_type", comp.get("type", "default"))
        if comp["rope_type"] == "yarn":
            comp.setdefault("attention_factor", 1.0)
    for d in (main, comp):
        d.setdefault("partial_rotary_factor", prf)
        d["rope_type"] = d.get("rope_type", d.get("type", "default"))
    return main, comp


def config_from_transformers(config: Mapping) -> dict:
    """transformers ``deepseek_v4`` config dict -> official config dict (§2.1 keys).

    ``compress_ratios`` gets ``num_hidden_layers`` entries (no MTP entry) and
    ``num_nextn_predict_layers`` is 0, because transformers has no MTP weights.
    ``rope_scaling`` is ``{"type": "yarn", factor, original_max_position_embeddings, beta_fast,
    beta_slow}`` or None. No ``quantization_config`` is produced: the weights are plain floats.
    Unknown keys are passed through. Raises ValueError for anything the official format cannot
    express (a CSA rate other than 4, hash layers that are not a prefix, YaRN with mscale, ...).
    """
    if not is_transformers_dialect(config):
        raise ValueError("config is not in the transformers deepseek_v4 dialect")
    if config.get("quantization_config"):
        raise ValueError("quantization_config: only unquantized transformers checkpoints are supported")
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias=True has no official equivalent")
    n = int(config["num_hidden_layers"])
    head_dim = int(config.get("head_dim", 512))

    layer_types = config.get("layer_types")
    if layer_types is None:
        raise ValueError("layer_types is missing (transformers' default schedule is not a released model)")
    if len(layer_types) < n:
        raise ValueError(f"layer_types has {len(layer_types)} entries, num_hidden_layers is {n}")
    rates = {**_DEFAULT_RATES, **(config.get("compress_rates") or {})}
    if rates[CSA] != 4:
        raise ValueError(f"compress_rates[{CSA!r}]={rates[CSA]}: the official model requires 4 (overlap + indexer)")
    if rates[HCA] <= 0 or rates[HCA] == 4:
        raise ValueError(f"compress_rates[{HCA!r}]={rates[HCA]}: must be > 0 and != 4")
    ratios = []
    for i, t in enumerate(layer_types[:n]):
        if t not in (SWA, CSA, HCA):
            raise ValueError(f"layer_types[{i}]={t!r} is not a DeepSeek-V4 layer type")
        ratios.append(0 if t == SWA else int(rates[t]))

    n_default = min(n, _DEFAULT_HASH_LAYERS)
    mlp = config.get("mlp_layer_types") or [HASH_MOE] * n_default + [MOE] * (n - n_default)
    mlp = list(mlp[:n])
    bad = [(i, t) for i, t in enumerate(mlp) if t not in (HASH_MOE, MOE)]
    if bad:
        raise ValueError(f"mlp_layer_types entries {bad} are not 'hash_moe' / 'moe'")
    n_hash = next((i for i, t in enumerate(mlp) if t != HASH_MOE), len(mlp))
    if HASH_MOE in mlp[n_hash:]:
        raise ValueError(f"mlp_layer_types {mlp}: hash_moe layers must be a prefix (official num_hash_layers)")

    main, comp = _nested_rope(config)
    if main["rope_type"] != "default":
        raise ValueError(f"rope_parameters['main'] has rope_type {main['rope_type']!r}; official SWA rope is plain")
    if main["partial_rotary_factor"] != comp["partial_rotary_factor"]:
        raise ValueError("rope_parameters: main and compress partial_rotary_factor differ")
    if comp["rope_type"] == "default":
        rope_scaling = None
    elif comp["rope_type"] == "yarn":
        if float(comp.get("attention_factor", -1.0)) != 1.0:
            raise ValueError(
                "rope_parameters['compress']['attention_factor'] must be 1.0 (missing means transformers "
                "applies the YaRN mscale 0.1*ln(factor)+1, which DeepSeek-V4 does not use)"
            )
        rope_scaling = {
            "type": "yarn",
            "factor": comp["factor"],
            "original_max_position_embeddings": comp["original_max_position_embeddings"],
            "beta_fast": comp.get("beta_fast") or 32,
            "beta_slow": comp.get("beta_slow") or 1,
        }
    else:
        raise ValueError(f"rope_parameters['compress'] has unsupported rope_type {comp['rope_type']!r}")

    out = {k: copy.deepcopy(v) for k, v in config.items() if k not in _HF_ONLY_KEYS}
    if out.get("pad_token_id", 0) is None:
        del out["pad_token_id"]
    out.update(
        model_type="deepseek_v4",
        compress_ratios=ratios,
        num_hash_layers=n_hash,
        num_nextn_predict_layers=0,
        qk_rope_head_dim=round(head_dim * main["partial_rotary_factor"]),
        rope_theta=main["rope_theta"],
        compress_rope_theta=comp["rope_theta"],
        rope_scaling=rope_scaling,
    )
    out.setdefault("topk_method", "noaux_tc")
    if config.get("dtype") is not None:
        out["torch_dtype"] = config["dtype"]
    return out


def _official_schedule(config: Mapping) -> tuple[int, list[int], int]:
    """(n_layers, compress ratio per main layer, num_hash_layers) of an official config."""
    for key in ("num_hidden_layers", "compress_ratios", "num_hash_layers"):
        if key not in config:
            raise ValueError(f"official config lacks {key!r}")
    n = int(config["num_hidden_layers"])
    ratios = [int(r) for r in config["compress_ratios"]]
    if len(ratios) < n:
        raise ValueError(f"compress_ratios has {len(ratios)} entries, num_hidden_layers is {n}")
    return n, ratios[:n], int(config["num_hash_layers"])


def config_to_transformers(config: Mapping) -> dict:
    """Official config dict -> transformers ``deepseek_v4`` config dict (what ``save_pretrained`` writes).

    MTP entries of ``compress_ratios`` are dropped and ``num_nextn_predict_layers`` is set to 0
    (the written checkpoint carries no MTP). ``quantization_config`` / ``expert_dtype`` are dropped:
    write only dequantized tensors with it. The compress rope always gets ``attention_factor: 1.0``.
    """
    if is_transformers_dialect(config):
        raise ValueError("config is already in the transformers dialect")
    n, ratios, n_hash = _official_schedule(config)
    hca_rates = {r for r in ratios if r not in (0, 4)}
    if any(r < 0 for r in ratios) or len(hca_rates) > 1:
        raise ValueError(f"compress_ratios {ratios}: transformers allows 0, 4 and one HCA ratio")
    head_dim = int(config.get("head_dim", 512))
    prf = int(config.get("qk_rope_head_dim", 64)) / head_dim
    main = {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0), "partial_rotary_factor": prf}
    comp = {"rope_type": "default", "rope_theta": config.get("compress_rope_theta", 160000.0), "partial_rotary_factor": prf}
    rs = config.get("rope_scaling")
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "yarn":
            raise ValueError(f"rope_scaling type {kind!r} is not supported (DeepSeek-V4 uses yarn)")
        comp.update(
            rope_type="yarn",
            factor=rs["factor"],
            original_max_position_embeddings=rs["original_max_position_embeddings"],
            beta_fast=rs.get("beta_fast", 32),
            beta_slow=rs.get("beta_slow", 1),
            attention_factor=1.0,
        )
    out = {k: copy.deepcopy(v) for k, v in config.items() if k not in _OFFICIAL_ONLY_KEYS}
    out.update(
        model_type="deepseek_v4",
        architectures=["DeepseekV4ForCausalLM"],
        layer_types=[SWA if r == 0 else CSA if r == 4 else HCA for r in ratios],
        compress_rates={CSA: 4, HCA: hca_rates.pop() if hca_rates else 128},
        mlp_layer_types=[HASH_MOE if i < n_hash else MOE for i in range(n)],
        rope_parameters={"main": main, "compress": comp},
        partial_rotary_factor=prf,
        qk_rope_head_dim=int(config.get("qk_rope_head_dim", 64)),
        num_nextn_predict_layers=0,
    )
    if config.get("torch_dtype") is not None:
        out["dtype"] = config["torch_dtype"]
    return out


def as_official(config: Mapping) -> Mapping:
    """The official form of a config in either dialect."""
    return config_from_transformers(config) if is_transformers_dialect(config) else config
