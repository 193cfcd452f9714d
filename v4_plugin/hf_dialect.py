"""Convert between the official DeepSeek-V4 checkpoint format and the transformers dialect.

transformers (``model_type == "deepseek_v4"``, checked against 5.19.0) uses its own config keys
(``layer_types``, ``compress_rates``, ``mlp_layer_types``, nested ``rope_parameters``) and its own
tensor names (``model.layers.{i}.self_attn.q_a_proj.weight``...), with the routed experts of a layer
fused into two 3-D tensors. This module maps both to the official format of the spec (§2.1, §9)
and back. Only unquantized tensors are handled (any float dtype; ``tid2eid`` stays int64). Tensor
dtypes are never changed; no tensor is transposed or reshaped except the fused experts:

* ``model.layers.{i}.mlp.experts.gate_up_proj`` [E, 2I, D] = per expert ``cat([w1, w3], 0)``
* ``model.layers.{i}.mlp.experts.down_proj``    [E, D, I]  = per expert ``w2``

transformers has no MTP block, so official ``mtp.*`` tensors are dropped on the way out and the
official config produced here has ``num_nextn_predict_layers = 0``.

``state_dict_from_transformers`` accepts both the in-memory ``DeepseekV4ForCausalLM.state_dict()``
names and the names that ``save_pretrained`` writes to disk (transformers reverses its own
conversion mapping there: ``model.layers.{i}.attn.wq_a.weight``, per-expert
``model.layers.{i}.ffn.experts.{e}.w1.weight``, ``head.weight``, and ``model.layers.{i}.attn.norm.weight``
for the attention ``kv_norm``). ``state_dict_to_transformers`` writes the in-memory names, which
``DeepseekV4ForCausalLM.load_state_dict`` and ``from_pretrained`` both accept.
See docs/transformers-deepseek-v4.md for the full map and the semantic differences.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping

import torch

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

# Global tensors: transformers in-memory name -> official name.
_GLOBAL = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}
# The same, looked up after stripping a leading "model." (also covers DeepseekV4Model names).
_GLOBAL_STRIPPED = {k.removeprefix("model."): v for k, v in _GLOBAL.items()}
# Per-layer tensors (after ``model.layers.{i}.`` / ``layers.{i}.``): transformers -> official.
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn",
    "attn_hc.base": "hc_attn_base",
    "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn",
    "ffn_hc.base": "hc_ffn_base",
    "ffn_hc.scale": "hc_ffn_scale",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
}
_GLOBAL_INV = {v: k for k, v in _GLOBAL.items()}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_GATE_UP, _DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")


# --------------------------------------------------------------------------- config


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


def _as_official(config: Mapping) -> Mapping:
    return config_from_transformers(config) if is_transformers_dialect(config) else config


# --------------------------------------------------------------------------- tensors


def _official_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Every official main-model tensor name (no MTP, no ``.scale``) -> unquantized shape, from the schema."""
    from .config import parse_config
    from .schema import checkpoint_tensors

    cfg = parse_config(_as_official(config), "config")
    return {spec.key: spec.shape for spec in checkpoint_tensors(cfg, include_mtp=False)}


def _check(
    out: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple], strict: bool, what: str, origin: Mapping | None = None
) -> None:
    origin = origin or {}
    for name, t in out.items():
        src = f"{origin[name]!r} (official {name!r})" if origin.get(name, name) != name else repr(name)
        if name not in shapes:
            raise ValueError(f"{what}: unexpected tensor {src} for this config (wrong layer type or unknown name)")
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{what}: {src} has shape {tuple(t.shape)}, expected {shapes[name]}")
    if strict:
        missing = sorted(set(shapes) - set(out))
        if missing:
            raise ValueError(f"{what}: {len(missing)} tensors missing, e.g. {missing[:5]}")


def state_dict_from_transformers(
    tensors: Mapping[str, torch.Tensor], config: Mapping, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """transformers-named tensors -> official-named tensors (same dtypes; expert tensors are views).

    Accepts the in-memory ``DeepseekV4ForCausalLM.state_dict()`` names and the on-disk names of
    ``save_pretrained``. Fused ``gate_up_proj`` [E, 2I, D] becomes ``w1`` = [:, :I] and ``w3`` =
    [:, I:], each [I, D]; ``down_proj`` [E, D, I] becomes ``w2`` [D, I]. ``config`` may be in either
    dialect. Every produced name and shape is checked against the schema (`v4_plugin.schema`);
    with ``strict`` every expected tensor must be present. Raises ValueError naming the tensor.
    """
    cfg = _as_official(config)
    shapes = _official_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}

    def put(name: str, t: torch.Tensor, src: str) -> None:
        if name in out:
            raise ValueError(f"{src!r} maps to {name!r}, which {origin[name]!r} already produced")
        out[name], origin[name] = t, src

    for src, t in tensors.items():
        name = src.removeprefix("model.")
        if name in _GLOBAL_STRIPPED:
            put(_GLOBAL_STRIPPED[name], t, src)
            continue
        if name in _GLOBAL_INV:  # official global names (save_pretrained writes head.weight)
            put(name, t, src)
            continue
        m = _LAYER_RE.match(name)
        if m is None:
            raise ValueError(f"unexpected tensor {src!r}")
        i, rest = int(m.group(1)), m.group(2)
        p = f"layers.{i}."
        if rest in (_GATE_UP, _DOWN):
            E, inter = int(cfg["n_routed_experts"]), int(cfg["moe_intermediate_size"])
            D = int(cfg["hidden_size"])
            want = (E, 2 * inter, D) if rest == _GATE_UP else (E, D, inter)
            if tuple(t.shape) != want:
                raise ValueError(f"{src!r} has shape {tuple(t.shape)}, expected {want}")
            for e in range(E):
                if rest == _GATE_UP:
                    put(f"{p}ffn.experts.{e}.w1.weight", t[e, :inter], src)
                    put(f"{p}ffn.experts.{e}.w3.weight", t[e, inter:], src)
                else:
                    put(f"{p}ffn.experts.{e}.w2.weight", t[e], src)
        elif rest in _LAYER:
            put(p + _LAYER[rest], t, src)
        elif rest == "attn.norm.weight":  # save_pretrained's reversed name for self_attn.kv_norm
            put(p + "attn.kv_norm.weight", t, src)
        else:  # official suffix under model.layers.{i}. (save_pretrained) or layers.{i}.
            put(p + rest, t, src)
    if "head.weight" not in out and cfg.get("tie_word_embeddings") and "embed.weight" in out:
        out["head.weight"] = out["embed.weight"]
    _check(out, shapes, strict, "state_dict_from_transformers", origin)
    return out


def state_dict_to_transformers(
    tensors: Mapping[str, torch.Tensor], config: Mapping, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Official-named unquantized tensors -> ``DeepseekV4ForCausalLM.state_dict()`` names.

    ``mtp.*`` tensors are dropped. Per-expert ``w1``/``w3`` [I, D] are fused into
    ``mlp.experts.gate_up_proj`` [E, 2I, D] (``cat([w1, w3], 0)`` per expert) and ``w2`` [D, I]
    into ``mlp.experts.down_proj`` [E, D, I]. Quantized inputs (a ``.scale`` tensor, float8 or
    int8 weights) raise ValueError, as does any name or shape not in the schema (`v4_plugin.schema`).
    """
    cfg = _as_official(config)
    shapes = _official_shapes(cfg)
    kept: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith("mtp."):
            continue
        if name.endswith(".scale"):
            raise ValueError(f"{name!r}: quantized checkpoints are not supported, dequantize first")
        if t.dtype in (torch.int8, torch.uint8) or (t.is_floating_point() and t.element_size() == 1):
            raise ValueError(f"{name!r} has dtype {t.dtype}: dequantize first")
        kept[name] = t
    _check(kept, shapes, strict, "state_dict_to_transformers")

    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, dict[int, torch.Tensor]]] = {}
    for name, t in kept.items():
        if name in _GLOBAL_INV:
            out[_GLOBAL_INV[name]] = t
            continue
        i, rest = _LAYER_RE.match(name).groups()
        m = _EXPERT_RE.match(rest)
        if m:
            experts.setdefault(int(i), {}).setdefault(m.group(2), {})[int(m.group(1))] = t
        else:
            out[f"model.layers.{i}.{_LAYER_INV[rest]}"] = t
    E = int(cfg["n_routed_experts"])
    for i, w in sorted(experts.items()):
        if any(len(w.get(k, {})) != E for k in ("w1", "w2", "w3")):
            raise ValueError(f"layers.{i}.ffn.experts: all {E} experts need w1, w2 and w3 to fuse them")
        out[f"model.layers.{i}.{_GATE_UP}"] = torch.stack([torch.cat([w["w1"][e], w["w3"][e]], 0) for e in range(E)])
        out[f"model.layers.{i}.{_DOWN}"] = torch.stack([w["w2"][e] for e in range(E)])
    return out
