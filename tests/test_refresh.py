"""The -0731 / -0813 refreshes: same main model, a DSpark drafter in mtp.0..2; V4.1 and Vision refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from v4_plugin.checkpoint.loader import load_checkpoint
from v4_plugin.checkpoint.config import ConfigError, LayerType, load_config, preset_config
from v4_plugin.cache.layout import plan
from v4_plugin.runtime.model import V4Model
from v4_plugin.checkpoint.quant import QuantSim
from v4_plugin.checkpoint.schema import checkpoint_tensors, file_entries
from v4_plugin.checkpoint.tiny import make_tiny

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("refresh,base,targets", [("flash-0731", "flash", (40, 41, 42)), ("pro-0813", "pro", (58, 59, 60))])
def test_refresh_configs_keep_the_main_model(refresh, base, targets):
    new, old = preset_config(refresh), preset_config(base)
    assert new.num_hidden_layers == old.num_hidden_layers and new.layer_types == old.layer_types
    assert new.num_draft_layers == 3 and new.num_nextn_predict_layers == 1  # stale, as published
    assert new.dspark.target_layer_ids == targets and new.dspark.block_size == 5 and not new.has_mtp
    assert all(new.layer_type(i) is LayerType.SWA for i in range(new.num_hidden_layers, len(new.compress_ratios)))
    main = lambda cfg: [s for s in checkpoint_tensors(cfg) if not s.name.startswith("mtp.")]  # noqa: E731
    assert main(new) == main(old)


def test_flash_0731_inventory_matches_the_published_counts():
    entries = [e[0] for s in checkpoint_tensors(preset_config("flash-0731")) for e in file_entries(s)]
    assert len(entries) == 72317  # 67,612 main + 4,705 drafter tensors
    per_stage = [sum(name.startswith(f"mtp.{k}.") for name in entries) for k in range(3)]
    assert per_stage == [1568, 1565, 1572]


@pytest.mark.parametrize("fixture,what", [
    ("deepseek-v4.1-flash.config.json", "V4.1 checkpoint"), ("deepseek-v4-flash-vision-exp.config.json", "Vision"),
])
def test_v41_and_vision_are_refused(fixture, what):
    with pytest.raises(ConfigError, match=what) as err:
        load_config(FIXTURES / fixture)
    assert "not" in str(err.value) and fixture in str(err.value)


def test_kv_plan_reports_the_drafter_windows_apart():
    p = plan(preset_config("flash-0731"), context=1 << 20)
    assert p.bytes_per_token == 3850.25 and p.draft_kind == "DSpark stages"
    assert p.draft_fixed_bytes_per_sequence == 3 * 128 * 584


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("refresh")
    return make_tiny(root / "0424", "flash", seed=3), make_tiny(root / "0731", "flash-0731", seed=3)


def test_tiny_refresh_has_the_same_main_weights_and_a_drafter(tiny_pair, caplog):
    old_dir, new_dir = tiny_pair
    assert json.loads((new_dir / "config.json").read_text())["dspark_block_size"] == 5
    with caplog.at_level(logging.INFO, logger="v4_plugin.checkpoint.loader"):
        new = load_checkpoint(new_dir, include_mtp=False)
    assert "skipping the" in caplog.text and "DSpark drafter tensors" in caplog.text
    old = load_checkpoint(old_dir, include_mtp=False)
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old)
    full = load_checkpoint(new_dir)
    assert full["mtp.0.main_proj.weight"].shape == (128, 3 * 128) and "mtp.2.markov_head.markov_w1.weight" in full
    assert "mtp.0.e_proj.weight" not in full


def test_tiny_refresh_generates_like_the_04_24_model(tiny_pair):
    old_dir, new_dir = tiny_pair
    ids = torch.randint(0, 384, (140,), generator=torch.Generator().manual_seed(0))
    models = [V4Model(load_config(d), load_checkpoint(d, include_mtp=False), quant=QuantSim.off())
              for d in tiny_pair]
    assert torch.equal(models[0].forward(ids).logits, models[1].forward(ids).logits)
    with pytest.raises(ValueError, match="DSpark drafter stages"):
        models[1].mtp_forward(torch.zeros(3, 4, 128), ids[:3])
