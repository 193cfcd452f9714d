"""KV size through vLLM's own KV-cache config code, for the real Flash and Pro configs (no weights):
our per-layer specs -> vLLM's grouping/packing (`get_kv_cache_configs`) -> bytes per block and the
capacity vLLM would log. (a) bytes per token within 2 % of the planner (here: exact, no page padding);
(b) the closed-form planner model of vLLM's capacity (`v4_plugin.capacity.vllm_planned_capacity`)
equals vLLM's within 1 %. The live engines' logged capacity is checked in test_vllm_generate.py."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

from v4_plugin.config import preset_config
from v4_plugin.layout import IndexerCache, plan

from v4_plugin.capacity import vllm_planned_capacity
from vllm_backend.kv_specs import vllm_capacity
from vllm_backend.kv_specs import model_kv_specs

PLANNER = {  # spec §5.5 / issue 5: bytes per token, FP8 / FP4 indexer keys
    ("flash", IndexerCache.FP8): 3850.25, ("flash", IndexerCache.FP4): 3514.25,
    ("pro", IndexerCache.FP8): 5511.4375, ("pro", IndexerCache.FP4): 5031.4375,
}
MEMORY = 80 << 30  # an H100's worth of KV space


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """VllmConfig per (preset, max_model_len, max_num_batched_tokens), built by vLLM from config.json."""
    from vllm.engine.arg_utils import EngineArgs

    cache = {}

    def get(name: str, max_model_len: int, batched: int):
        key = (name, max_model_len, batched)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"cfg-{name}")
            (d / "config.json").write_text(json.dumps(preset_config(name).to_dict()))
            cache[key] = EngineArgs(
                model=str(d), kv_cache_dtype="fp8_ds_mla", dtype="bfloat16", max_model_len=max_model_len,
                max_num_batched_tokens=batched, skip_tokenizer_init=True, enforce_eager=True,
            ).create_engine_config()
        return cache[key]

    return get


@pytest.mark.parametrize("name", ["flash", "pro"])
@pytest.mark.parametrize("indexer", [IndexerCache.FP8, IndexerCache.FP4])
def test_bytes_per_token_through_vllm_grouping(configs, name, indexer):
    cfg = preset_config(name)
    vc = configs(name, 65536, 8192)
    assert vc.cache_config.block_size == 256
    got = vllm_capacity(vc, model_kv_specs(cfg, "fp8_ds_mla", torch.bfloat16, indexer), MEMORY)
    planner = plan(cfg, context=1 << 20, indexer_cache=indexer).bytes_per_token
    assert planner == PLANNER[(name, indexer)]
    assert abs(got.bytes_per_token - planner) <= 0.02 * planner, (got, planner)
    assert got.bytes_per_token == planner  # no page padding at all: the slab is exactly the entries


@pytest.mark.parametrize("name", ["flash", "pro"])
@pytest.mark.parametrize("max_model_len,batched", [(65536, 8192), (1 << 20, 4096), (4096, 256)])
def test_planner_capacity_model_matches_vllm(configs, name, max_model_len, batched):
    cfg = preset_config(name)
    vc = configs(name, max_model_len, batched)
    for indexer in IndexerCache:
        got = vllm_capacity(vc, model_kv_specs(cfg, "fp8_ds_mla", torch.bfloat16, indexer), MEMORY)
        want = vllm_planned_capacity(cfg, MEMORY, max_model_len=max_model_len, max_num_batched_tokens=batched,
                                fp8=True, indexer=indexer)
        assert got.num_blocks == want.num_blocks
        assert abs(got.tokens - want.tokens) <= 0.01 * want.tokens, (got, want)
