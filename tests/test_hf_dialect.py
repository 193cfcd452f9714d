"""v4_plugin.checkpoint.hf_config and hf_tensors against the installed transformers ``deepseek_v4`` implementation."""

import copy
import json
import re

import pytest
import torch

from safetensors.torch import load_file, save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from v4_plugin.checkpoint import hf_config as HC, hf_tensors as HT
from v4_plugin.checkpoint.config import parse_config
from v4_plugin.checkpoint.schema import checkpoint_tensors

SWA, CSA, HCA = HC.SWA, HC.CSA, HC.HCA
LAYER_TYPES = [SWA, SWA, CSA, HCA, CSA]  # Flash-like: ratios 0, 0, 4, 128, 4
RATIOS = [0, 0, 4, 128, 4]
N_EXPERTS, TOPK, VOCAB = 8, 2, 256

# Official DeepSeek-V4-Flash config.json (spec §2.1).
FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "expert_dtype": "fp4", "hc_eps": 1e-6, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "head_dim": 512, "hidden_act": "silu", "hidden_size": 4096,
    "index_head_dim": 128, "index_n_heads": 64, "index_topk": 512, "initializer_range": 0.02,
    "max_position_embeddings": 1048576, "model_type": "deepseek_v4", "moe_intermediate_size": 2048,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 64,
    "num_experts_per_tok": 6, "num_hidden_layers": 43, "num_hash_layers": 3, "num_key_value_heads": 1,
    "num_nextn_predict_layers": 1, "o_groups": 8, "o_lora_rank": 1024, "q_lora_rank": 1024,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-6,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                     "original_max_position_embeddings": 65536, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus",
    "sliding_window": 128, "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.57.1", "use_cache": True, "vocab_size": 129280,
    "compress_rope_theta": 160000, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}


def tiny_config() -> DeepseekV4Config:
    return DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=128, moe_intermediate_size=64, num_hidden_layers=5,
        num_attention_heads=4, head_dim=128, partial_rotary_factor=0.5, q_lora_rank=64,
        o_groups=2, o_lora_rank=32, n_routed_experts=N_EXPERTS, num_experts_per_tok=TOPK,
        index_n_heads=4, index_head_dim=64, index_topk=4, sliding_window=8, layer_types=LAYER_TYPES,
        mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 2,
        rope_parameters={"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
    )


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(model, transformers config dict as written by save_pretrained, save directory)."""
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(tiny_config()).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # randomise everything, so swapped or misrouted tensors are detectable
        for t in model.state_dict().values():  # persistent tensors only (not the rope inv_freq buffers)
            if t.dtype == torch.int64:
                t.copy_(torch.randint(0, N_EXPERTS, t.shape, generator=g))
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    return model, config, path


def test_save_pretrained_config_is_transformers_dialect(hf):
    _, config, _ = hf
    assert HC.is_transformers_dialect(config)
    assert not HC.is_transformers_dialect(FLASH)
    assert not HC.is_transformers_dialect(HC.config_from_transformers(config))
    assert HC.is_transformers_dialect(HC.config_to_transformers(FLASH))


def test_config_from_transformers_values(hf):
    off = HC.config_from_transformers(hf[1])
    assert off["compress_ratios"] == RATIOS  # n_layers entries, no MTP entry
    assert off["num_nextn_predict_layers"] == 0 and off["num_hash_layers"] == 3
    assert off["qk_rope_head_dim"] == 64 and off["head_dim"] == 128
    assert off["rope_theta"] == 10000 and off["compress_rope_theta"] == 160000
    assert off["rope_scaling"] == {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                                   "beta_fast": 32, "beta_slow": 1}
    assert not set(off) & {"layer_types", "compress_rates", "mlp_layer_types", "rope_parameters", "dtype"}


def _rope_view(cfg: DeepseekV4Config) -> dict:
    keys = ("rope_type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
            "beta_fast", "beta_slow", "attention_factor")
    return {kind: {k: cfg.rope_parameters[kind].get(k) for k in keys} for kind in ("main", "compress")}


FIELDS = ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "q_lora_rank", "num_experts_per_tok", "n_routed_experts",
          "n_shared_experts", "scoring_func", "norm_topk_prob", "routed_scaling_factor", "hc_mult",
          "hc_sinkhorn_iters", "hc_eps", "swiglu_limit", "sliding_window", "o_groups", "o_lora_rank",
          "index_n_heads", "index_head_dim", "index_topk", "rms_norm_eps", "max_position_embeddings",
          "tie_word_embeddings", "hidden_act", "qk_rope_head_dim", "layer_types", "mlp_layer_types",
          "compress_rates", "partial_rotary_factor")


def _assert_same_hf_config(a: DeepseekV4Config, b: DeepseekV4Config):
    for f in FIELDS:
        assert getattr(a, f) == getattr(b, f), f
    assert _rope_view(a) == _rope_view(b)


def test_config_round_trip_transformers(hf):
    config = hf[1]
    back = HC.config_to_transformers(HC.config_from_transformers(config))
    _assert_same_hf_config(DeepseekV4Config.from_dict(config), DeepseekV4Config.from_dict(back))
    assert back["num_nextn_predict_layers"] == 0  # the only intended change: no MTP in either file


def test_config_round_trip_official_flash():
    hf_cfg = HC.config_to_transformers(FLASH)
    # transformers reads the official config.json itself; our conversion must mean the same model.
    # (DeepseekV4Config.from_dict mutates nested dicts of its argument, hence the deep copies.)
    _assert_same_hf_config(DeepseekV4Config.from_dict(copy.deepcopy(FLASH)),
                           DeepseekV4Config.from_dict(copy.deepcopy(hf_cfg)))
    back = HC.config_from_transformers(hf_cfg)
    dropped = {"quantization_config", "expert_dtype", "compress_ratios", "num_nextn_predict_layers"}
    for k, v in FLASH.items():
        if k not in dropped:
            assert back[k] == v, k
    assert back["compress_ratios"] == FLASH["compress_ratios"][:43]
    assert back["num_nextn_predict_layers"] == 0


def test_state_dict_round_trip_exact(hf):
    model, config, _ = hf
    sd = model.state_dict()
    off = HT.state_dict_from_transformers(sd, config)
    back = HT.state_dict_to_transformers(off, HC.config_from_transformers(config))
    assert set(back) == set(sd)
    for k, t in sd.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


def test_official_names_follow_spec_section_9(hf):
    model, config, _ = hf
    off = HT.state_dict_from_transformers(model.state_dict(), config)
    glob = {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"}
    common = {"hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale",
              "attn_norm.weight", "ffn_norm.weight", "attn.attn_sink", "attn.wq_a.weight", "attn.q_norm.weight",
              "attn.wq_b.weight", "attn.wkv.weight", "attn.kv_norm.weight", "attn.wo_a.weight",
              "attn.wo_b.weight", "ffn.gate.weight", "ffn.shared_experts.w1.weight",
              "ffn.shared_experts.w2.weight", "ffn.shared_experts.w3.weight"}
    comp = {f"attn.compressor.{s}" for s in ("wkv.weight", "wgate.weight", "ape", "norm.weight")}
    idx = {"attn.indexer.wq_b.weight", "attn.indexer.weights_proj.weight"} | {
        f"attn.indexer.compressor.{s}" for s in ("wkv.weight", "wgate.weight", "ape", "norm.weight")}
    experts = {f"ffn.experts.{e}.w{j}.weight" for e in range(N_EXPERTS) for j in (1, 2, 3)}
    assert glob <= set(off)
    for i, ratio in enumerate(RATIOS):
        got = {re.sub(rf"^layers\.{i}\.", "", k) for k in off if k.startswith(f"layers.{i}.")}
        want = common | experts | {"ffn.gate.tid2eid" if i < 3 else "ffn.gate.bias"}
        want |= comp if ratio > 0 else set()
        want |= idx if ratio == 4 else set()
        assert got == want, (i, got ^ want)
    assert set(off) == glob | {k for k in off if k.startswith("layers.")}
    # §9 shapes that depend on the layer type (c = 2 for ratio 4).
    assert off["layers.2.attn.compressor.ape"].shape == (4, 2 * 128)
    assert off["layers.2.attn.compressor.wkv.weight"].shape == (2 * 128, 128)
    assert off["layers.3.attn.compressor.ape"].shape == (128, 128)
    assert off["layers.4.attn.indexer.compressor.ape"].shape == (4, 2 * 64)
    assert off["layers.4.attn.indexer.wq_b.weight"].shape == (4 * 64, 64)
    assert off["layers.0.ffn.gate.tid2eid"].shape == (VOCAB, TOPK)
    assert off["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert off["layers.3.ffn.gate.bias"].shape == (N_EXPERTS,)
    assert off["layers.1.attn.wo_a.weight"].shape == (2 * 32, 4 * 128 // 2)
    assert off["layers.4.ffn.experts.7.w1.weight"].shape == (64, 128)
    assert off["layers.4.ffn.experts.7.w2.weight"].shape == (128, 64)
    cfg = parse_config(HC.config_from_transformers(config))
    assert set(off) == {spec.key for spec in checkpoint_tensors(cfg, include_mtp=False)}


def test_expert_split_order(hf):
    model, config, _ = hf
    off = HT.state_dict_from_transformers(model.state_dict(), config)
    gate_up = model.model.layers[3].mlp.experts.gate_up_proj
    assert torch.equal(off["layers.3.ffn.experts.5.w1.weight"], gate_up[5, :64])  # gate = first half
    assert torch.equal(off["layers.3.ffn.experts.5.w3.weight"], gate_up[5, 64:])  # up = second half


def test_save_pretrained_file_names_convert_identically(hf):
    """save_pretrained writes transformers' reverse-mapped names; they must give the same tensors."""
    model, config, path = hf
    on_disk = load_file(path / "model.safetensors")
    assert "model.layers.2.attn.norm.weight" in on_disk and "head.weight" in on_disk  # the hybrid names
    a = HT.state_dict_from_transformers(model.state_dict(), config)
    b = HT.state_dict_from_transformers(on_disk, config)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_written_checkpoint_loads_in_transformers(hf, tmp_path):
    model, config, _ = hf
    off_cfg = HC.config_from_transformers(config)
    off = HT.state_dict_from_transformers(model.state_dict(), config)
    off["mtp.0.e_proj.weight"] = torch.zeros(128, 128)  # dropped on the way out
    save_file(HT.state_dict_to_transformers(off, off_cfg), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(HC.config_to_transformers(off_cfg)))
    loaded = DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for k, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], t), k
    # from_pretrained leaves these tensors memory-mapped at arbitrary alignments, which changes CPU
    # GEMM rounding (~1e-7) and can flip near-tied router / indexer top-k picks; re-materialise them.
    with torch.no_grad():
        for prm in loaded.parameters():
            prm.data = prm.data.clone()
    ids = torch.randint(0, VOCAB, (1, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, loaded(ids, use_cache=False).logits)


def test_errors_name_the_offending_tensor_or_key(hf):
    model, config, _ = hf
    sd = dict(model.state_dict())
    off_cfg = HC.config_from_transformers(config)
    off = HT.state_dict_from_transformers(sd, config)

    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.bogus"):
        HT.state_dict_from_transformers({**sd, "model.layers.0.self_attn.bogus": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.compressor\.ape"):  # SWA layer has no compressor
        HT.state_dict_to_transformers({**off, "layers.0.attn.compressor.ape": torch.zeros(4, 256)}, off_cfg)
    with pytest.raises(ValueError, match=r"layers\.3\.attn\.indexer\.wq_b\.weight"):  # HCA has no indexer
        HT.state_dict_to_transformers({**off, "layers.3.attn.indexer.wq_b.weight": torch.zeros(256, 64)}, off_cfg)
    with pytest.raises(ValueError, match=r"layers\.3\.ffn\.gate\.tid2eid"):  # not a hash layer
        HT.state_dict_to_transformers({**off, "layers.3.ffn.gate.tid2eid": torch.zeros(VOCAB, TOPK)}, off_cfg)
    with pytest.raises(ValueError, match=r"gate_up_proj"):
        bad = {**sd, "model.layers.1.mlp.experts.gate_up_proj": torch.zeros(N_EXPERTS, 128, 64)}
        HT.state_dict_from_transformers(bad, config)
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.wq_a\.scale"):
        HT.state_dict_to_transformers({**off, "layers.1.attn.wq_a.scale": torch.ones(1, 1)}, off_cfg)
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.wkv\.weight"):
        fp8 = {**off, "layers.1.attn.wkv.weight": off["layers.1.attn.wkv.weight"].to(torch.float8_e4m3fn)}
        HT.state_dict_to_transformers(fp8, off_cfg)
    with pytest.raises(ValueError, match=r"missing"):
        HT.state_dict_from_transformers({k: v for k, v in sd.items() if k != "lm_head.weight"}, config)
    partial = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    assert "head.weight" not in HT.state_dict_from_transformers(partial, config, strict=False)

    with pytest.raises(ValueError, match=r"attention_factor"):  # nested yarn without it = mscale 1.277
        rp = {"main": {"rope_type": "default", "rope_theta": 1e4},
              "compress": {"rope_type": "yarn", "rope_theta": 1.6e5, "factor": 16,
                           "original_max_position_embeddings": 65536}}
        HC.config_from_transformers({**config, "rope_parameters": rp})
    with pytest.raises(ValueError, match=r"mlp_layer_types"):
        HC.config_from_transformers({**config, "mlp_layer_types": ["moe", "hash_moe", "moe", "moe", "moe"]})
    with pytest.raises(ValueError, match=r"compress_rates"):
        HC.config_from_transformers({**config, "compress_rates": {CSA: 8, HCA: 128}})
    with pytest.raises(ValueError, match=r"layer_types\[1\]"):
        HC.config_from_transformers({**config, "layer_types": [SWA, "full_attention", CSA, HCA, CSA]})
    with pytest.raises(ValueError, match=r"compress_ratios"):
        HC.config_to_transformers({**FLASH, "compress_ratios": [0, 0, 4, 128, 64] + [4] * 39})
