"""Cross-check of the reference model against transformers' independent `deepseek_v4` implementation.

The two agree where their semantics agree, and each difference is switched off on our side:

* FP8 activation quantization in FP8/FP4 linears and the FP8 simulation of KV entries: transformers
  has neither (it runs plain float weights), so the reference runs with `QuantSim.off()`.
* The indexer's Hadamard rotation + FP4 simulation (also absent in transformers): the rotation is
  orthogonal, so without the FP4 rounding it cannot change a score, and `QuantSim.off()` drops it.
* Top-k ties: ReLU makes many index scores exactly 0, and the two implementations break ties
  differently. With `index_topk` at least the number of visible entries every entry is selected,
  the selection no longer depends on the scores, and the comparison is exact up to fp32 rounding.
* MTP: transformers has none; only the main model is compared.

Both run in fp32. The tolerance covers summation-order differences (transformers#48721 reports
max |dlogit| 4.4e-5 for a reduced model against DeepSeek's reference).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from v4_plugin.checkpoint import hf_config, hf_tensors
from v4_plugin.checkpoint.loader import load_checkpoint
from v4_plugin.checkpoint.config import load_config, parse_config
from v4_plugin.runtime.model import V4Model
from v4_plugin.checkpoint.quant import QuantSim
from v4_plugin.checkpoint.tiny import TINY_PRESETS, random_weights

LENGTH = 300  # > 2 HCA blocks and 75 CSA entries


@pytest.fixture(scope="module", params=["flash", "pro"])
def pair(request):
    cfg = parse_config(TINY_PRESETS[request.param] | {"index_topk": LENGTH}, f"tiny-{request.param}")
    weights = random_weights(cfg, seed=11)
    transformers_config = DeepseekV4Config(**hf_config.config_to_transformers(cfg.to_dict()))
    transformers_config._attn_implementation = "eager"
    hf_model = DeepseekV4ForCausalLM(transformers_config).eval()
    hf_model.load_state_dict(hf_tensors.state_dict_to_transformers(weights, cfg.to_dict()), strict=True)
    return cfg, weights, hf_model


def test_logits_match_transformers(pair):
    cfg, weights, hf_model = pair
    ids = torch.randint(0, cfg.vocab_size, (LENGTH,), generator=torch.Generator().manual_seed(3))
    ours = V4Model(cfg, weights, quant=QuantSim.off()).forward(ids).logits
    with torch.no_grad():
        theirs = hf_model(ids[None], use_cache=False).logits[0].float()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)  # measured: 8e-6 (flash), 1.2e-5 (pro)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_save_pretrained_checkpoint_loads_into_the_reference(pair, tmp_path):
    """transformers' on-disk dialect (config keys, `model.`-prefixed names, fp32 weights) loads through
    our loader into the same weights, hence the same logits."""
    cfg, weights, hf_model = pair
    hf_model.save_pretrained(tmp_path)
    loaded_cfg = load_config(tmp_path)
    assert not loaded_cfg.quantized and loaded_cfg.num_nextn_predict_layers == 0
    assert loaded_cfg.layer_types == cfg.layer_types and loaded_cfg.index_topk == cfg.index_topk
    loaded = load_checkpoint(tmp_path, loaded_cfg)
    main = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    assert loaded.keys() == main.keys()
    assert all(torch.equal(loaded[k], main[k]) for k in main)
