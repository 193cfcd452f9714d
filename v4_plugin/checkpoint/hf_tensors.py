"""The transformers dialect of DeepSeek-V4 tensor names, to and from the official checkpoint format.

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

import re
from collections.abc import Mapping

import torch

from v4_plugin.checkpoint.config import parse_config
from v4_plugin.checkpoint.hf_config import as_official
from v4_plugin.checkpoint.schema import checkpoint_tensors

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


def _official_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Every official main-model tensor name (no MTP, no ``.scale``) -> unquantized shape, from the schema."""
    cfg = parse_config(as_official(config), "config")
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
    dialect. Every produced name and shape is checked against the schema (`v4_plugin.checkpoint.schema`);
    with ``strict`` every expected tensor must be present. Raises ValueError naming the tensor.
    """
    cfg = as_official(config)
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
    int8 weights) raise ValueError, as does any name or shape not in the schema (`v4_plugin.checkpoint.schema`).
    """
    cfg = as_official(config)
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
