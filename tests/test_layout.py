"""Cache-layout math and the `v4-plugin kv-plan` command (spec §5, test point 38)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest

from v4_plugin.cli import main, parse_bytes
from v4_plugin.checkpoint.config import LayerType, parse_config, preset_config
from v4_plugin.cache.layout import (IndexerCache, checkpoint_bytes, compressor_state_bytes, indexer_entry_bytes,
                              main_entry_bytes, page_layout, plan)
from v4_plugin.checkpoint.tiny import TINY_PRESETS


def kv_plan(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["kv-plan", *args, "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.mark.parametrize("model,fmt,per_token", [
    ("flash", "fp8", 3850.25), ("flash", "fp4", 3514.25), ("pro", "fp8", 5511.4375), ("pro", "fp4", 5031.4375),
])
def test_cli_bytes_per_token(model, fmt, per_token):
    p = kv_plan("--model", model, "--indexer-cache", fmt, "--context", "1M")
    assert p["bytes_per_token"] == per_token
    assert p["kv_bytes_at_context"] == per_token * 2**20  # 2^20 is a multiple of every ratio


def test_cli_v32_and_ratio():
    v32 = kv_plan("--model", "v3.2", "--context", "128K")
    assert v32["bytes_per_token"] == 61 * (656 + 132) == 48068
    pro = kv_plan("--model", "pro", "--indexer-cache", "fp4")
    assert 9.5 < v32["bytes_per_token"] / pro["bytes_per_token"] < 9.6  # "about a tenth of V3.2"


def test_cli_accepts_a_config_path_and_memory(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(preset_config("flash").to_dict()))
    p = kv_plan("--model", str(path), "--context", "131072", "--gpu-memory", "640")
    assert p["bytes_per_token"] == 3850.25
    expected = (640 * 2**30 - checkpoint_bytes(preset_config("flash"))) // p["total_bytes_at_context"]
    assert p["sequences_fitting"] == expected > 0


def test_cli_reports_bad_config_cleanly(tmp_path):
    """Through the installed entry point, as a user runs it: a one-line error, exit status 2."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v4"}))
    res = subprocess.run([sys.executable, "-m", "v4_plugin", "kv-plan", "--model", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "missing field" in res.stderr and "Traceback" not in res.stderr
    table = subprocess.run([sys.executable, "-m", "v4_plugin", "kv-plan", "--model", "flash"],
                           check=True, capture_output=True, text=True).stdout
    assert "3,850.2500 B" in table and "21 CSA" in table


@pytest.mark.parametrize("text,nbytes", [
    ("85899345920", 80 * 2**30), ("80G", 80 * 2**30), ("80GiB", 80 * 2**30), ("80g", 80 * 10**9),
    ("80GB", 80 * 10**9), ("1.5g", 1_500_000_000), ("512M", 512 * 2**20),
])
def test_kv_cache_memory_reads_like_vllm(text, nbytes):
    assert parse_bytes(text) == nbytes


def test_cli_vllm_mode_table_and_clear_errors(capsys):
    """The table ends with the line vLLM logs; --block-size is overridden; misuse is a one-line error."""
    base = ["kv-plan", "--framework", "vllm", "--model", "pro", "--kv-cache-memory", "80G"]
    assert main([*base, "--max-num-batched-tokens", "2K", "--block-size", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("GPU KV cache size: ") and "tokens per request: " in out[-1]
    assert "1,048,576 tokens per request" in out[-1]  # default --max-model-len: max_position_embeddings
    assert any("256 tokens" in line and "--block-size 16 is overridden" in line for line in out)
    for args, message in [
        (base, "needs --max-num-batched-tokens"),
        ([*base, "--max-num-batched-tokens", "2048", "--indexer-cache", "fp4"], "applies to FP8 KV caches"),
        ([*base, "--max-num-batched-tokens", "2048", "--context", "1M"], "--context is for the framework-free plan"),
        (["kv-plan", "--framework", "vllm", "--max-num-batched-tokens", "2048"], "needs --kv-cache-memory"),
        (["kv-plan", "--kv-cache-memory", "80G"], "--kv-cache-memory needs --framework"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)


def test_entry_formats_from_dims():
    cfg = preset_config("flash")
    assert main_entry_bytes(cfg) == 448 + 64 * 2 + 7 + 1 == 584
    assert indexer_entry_bytes(cfg, IndexerCache.FP8) == 128 + 4
    assert indexer_entry_bytes(cfg, IndexerCache.FP4) == 64 + 4


def test_fixed_state_per_sequence():
    cfg = preset_config("flash")
    assert compressor_state_bytes(cfg, LayerType.CSA) == 64 * 1024
    assert compressor_state_bytes(cfg, LayerType.CSA, indexer=True) == 16 * 1024
    assert compressor_state_bytes(cfg, LayerType.HCA) == 512 * 1024
    p = plan(cfg, context=1)
    assert p.fixed_bytes_per_sequence == 43 * 128 * 584 + 21 * 80 * 1024 + 20 * 512 * 1024
    assert p.draft_fixed_bytes_per_sequence == 128 * 584  # the MTP layer's window, reported apart


@pytest.mark.parametrize("context", [1, 3, 4, 127, 128, 129, 513])
def test_entries_count_complete_blocks_only(context):
    cfg = preset_config("flash")
    p = plan(cfg, context=context, indexer_cache=IndexerCache.FP4)
    assert p.kv_bytes_at_context == 21 * (context // 4) * (584 + 68) + 20 * (context // 128) * 584


@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_tiny_presets(preset):
    cfg = parse_config(TINY_PRESETS[preset])
    main = main_entry_bytes(cfg)
    assert main == cfg.nope_head_dim + 2 * cfg.qk_rope_head_dim + 8  # one scale byte, padded to 8
    n_csa, n_hca = cfg.count(LayerType.CSA), cfg.count(LayerType.HCA)
    expected = n_csa * (main + indexer_entry_bytes(cfg, IndexerCache.FP8)) / 4 + n_hca * main / 128
    assert plan(cfg, context=1024).bytes_per_token == expected


def test_pages_per_block():
    cfg = preset_config("flash")
    csa = page_layout(cfg, LayerType.CSA, 256, alignment=576)
    assert [(p.name, p.entries_per_block, p.page_bytes) for p in csa] == [("compressed", 64, 37440), ("indexer", 64, 8640)]
    hca = page_layout(cfg, LayerType.HCA, 256, alignment=576)
    assert [(p.entries_per_block, p.page_bytes) for p in hca] == [(2, 1728)]
    assert page_layout(cfg, LayerType.SWA, 256) == []
    with pytest.raises(ValueError, match="whole ratio-128 entries"):
        page_layout(cfg, LayerType.HCA, 64)
