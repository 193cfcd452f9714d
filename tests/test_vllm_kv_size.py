"""KV size through vLLM's own KV-cache config code, for the real Flash and Pro configs (no weights):
our per-layer specs -> vLLM's grouping/packing (`get_kv_cache_configs`) -> bytes per block and the
capacity vLLM would log. (a) bytes per token within 2 % of the planner (here: exact, no page padding);
(b) the closed-form planner model of vLLM's capacity (`vllm_backend.capacity.vllm_planned_capacity`) and
what `v4-plugin kv-plan --framework vllm` prints equal vLLM's within 1 %. The live engines' logged
capacity is checked in test_vllm_generate.py."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("vllm")

from test_layout import kv_plan
from vllm_backend.capacity import vllm_planned_capacity
from v4_plugin.checkpoint.config import preset_config
from v4_plugin.cache.layout import IndexerCache, plan
from vllm_backend.kv_specs import model_kv_specs, vllm_capacity

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

    def get(name: str, max_model_len: int, batched: int, speculative_config: dict | None = None):
        key = (name, max_model_len, batched, json.dumps(speculative_config))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"cfg-{name}")
            (d / "config.json").write_text(json.dumps(preset_config(name).to_dict()))
            cache[key] = EngineArgs(
                model=str(d), kv_cache_dtype="fp8_ds_mla", dtype="bfloat16", max_model_len=max_model_len,
                max_num_batched_tokens=batched, skip_tokenizer_init=True, enforce_eager=True,
                speculative_config=speculative_config,
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


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_mtp_window_cache_is_charged(configs, name):
    """With MTP drafting vLLM allocates the MTP block's window cache beside the main layers' (the draft
    model's cache layer): the planner and `kv-plan --speculative-config` charge exactly what vLLM does.
    (For Flash and Pro vLLM packs it into the window groups' padding: the capacity does not change.)"""
    cfg = preset_config(name)
    spec = {"method": "mtp", "num_speculative_tokens": 3}
    vc = configs(name, 65536, 8192, spec)
    assert vc.speculative_config is not None and vc.speculative_config.num_speculative_tokens == 3
    specs = model_kv_specs(cfg, "fp8_ds_mla", torch.bfloat16, IndexerCache.FP8, draft_layers=1)
    assert f"model.layers.{cfg.num_hidden_layers}.attn.window" in specs
    got = vllm_capacity(vc, specs, MEMORY)
    want = vllm_planned_capacity(cfg, MEMORY, max_model_len=65536, max_num_batched_tokens=8192, draft_layers=1)
    assert (got.slab_bytes, got.num_blocks) == (want.slab_bytes, want.num_blocks)
    assert abs(got.tokens - want.tokens) <= 0.01 * want.tokens, (got, want)
    cli = kv_plan("--framework", "vllm", "--model", name, "--device", "cpu", "--kv-cache-memory", "80G",
                  "--max-model-len", "64K", "--max-num-batched-tokens", "8192", "--kv-cache-dtype", "fp8_ds_mla",
                  "--speculative-config", json.dumps(spec))
    assert (cli["draft_layers"], cli["num_blocks"], cli["kv_cache_size_tokens"]) == (1, want.num_blocks, want.tokens)


# vLLM's engine-core line (kv_cache_utils.update_kv_cache_capacity), as the CLI must print it.
LOG_LINE = re.compile(r"(GPU|CPU) KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per "
                      r"request: (\d+\.\d\d)x")


@pytest.mark.parametrize("name", ["flash", "pro"])
@pytest.mark.parametrize("memory_flag,memory,max_model_len,batched", [
    ("80G", 80 << 30, 65536, 8192), ("141GiB", 141 << 30, 1 << 20, 2048), ("24GB", 24 * 10**9, 4096, 256),
])
def test_cli_prediction_matches_vllm(configs, name, memory_flag, memory, max_model_len, batched):
    """`v4-plugin kv-plan --framework vllm` == vLLM's own grouping and capacity code, for FP8 records with
    FP8 / FP4 indexer keys and for bf16 entries (`auto`); --block-size is accepted and overridden."""
    cfg = preset_config(name)
    vc = configs(name, max_model_len, batched)
    for cache_dtype, indexer in (("fp8_ds_mla", IndexerCache.FP8), ("fp8", IndexerCache.FP4), ("auto", None)):
        got = vllm_capacity(vc, model_kv_specs(cfg, cache_dtype, torch.bfloat16, indexer or IndexerCache.FP8),
                            memory)
        cli = kv_plan("--framework", "vllm", "--model", name, "--device", "cpu", "--kv-cache-memory", memory_flag,
                      "--max-model-len", str(max_model_len), "--max-num-batched-tokens", str(batched),
                      "--kv-cache-dtype", cache_dtype, "--block-size", "16",
                      *(["--indexer-cache", indexer.value] if indexer else []))
        where = f"{name} {cache_dtype} {indexer}: CLI {cli}, vLLM {got}"
        assert cli["kv_cache_memory_bytes"] == memory and cli["block_size"] == 256, where
        assert cli["bytes_per_block"] == got.slab_bytes and cli["num_blocks"] == got.num_blocks, where
        assert abs(cli["kv_cache_size_tokens"] - got.tokens) <= 0.01 * got.tokens, where
        assert abs(cli["max_concurrency"] - got.max_concurrency) <= 0.01 * got.max_concurrency, where
        m = LOG_LINE.fullmatch(cli["log_line"])
        assert m and m[1] == "CPU" and int(m[2].replace(",", "")) == cli["kv_cache_size_tokens"], where
        assert int(m[3].replace(",", "")) == max_model_len, where


def test_cli_async_scheduling_reserves_two_batches(configs):
    """With async scheduling (vLLM's GPU default) two batches are in flight: the window/state reserve
    doubles. vLLM's figure comes from a CPU config with the scheduler flag turned on afterwards (the CPU
    platform forces it off at construction; `VllmConfig.max_concurrent_batches` reads it live)."""
    cfg = preset_config("flash")
    vc = configs("flash", 65536, 8192)
    vc.scheduler_config.async_scheduling = True
    try:
        assert vc.max_in_flight_tokens == 2 * 8192
        got = vllm_capacity(vc, model_kv_specs(cfg, "fp8_ds_mla", torch.bfloat16), MEMORY)
    finally:
        vc.scheduler_config.async_scheduling = False
    cli = kv_plan("--framework", "vllm", "--model", "flash", "--kv-cache-memory", str(MEMORY),
                  "--max-model-len", "64K", "--max-num-batched-tokens", "8192", "--kv-cache-dtype", "fp8_ds_mla")
    assert cli["async_scheduling"] is True and cli["log_line"].startswith("GPU KV cache size: ")
    assert cli["num_blocks"] == got.num_blocks
    assert abs(cli["kv_cache_size_tokens"] - got.tokens) <= 0.01 * got.tokens, (cli, got)
    single = kv_plan("--framework", "vllm", "--model", "flash", "--kv-cache-memory", str(MEMORY),
                     "--max-model-len", "64K", "--max-num-batched-tokens", "8192", "--kv-cache-dtype", "fp8_ds_mla",
                     "--no-async-scheduling")
    assert single["kv_cache_size_tokens"] > cli["kv_cache_size_tokens"]
