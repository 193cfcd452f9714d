"""The SGLang pools' sizing: SGLang's own pool-configurator code path for our architecture against the
core's planner (`sglang_backend.capacity.sglang_planned_capacity`, `v4_plugin.cache.layout.plan`), and the
bytes the pool really allocates against the planned ones. No weights, no engine: the configurator
reads only the checkpoint's config.json (the real Flash / Pro configs from the presets)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sglang_backend import pools  # noqa: E402
from sglang_backend.capacity import sglang_planned_capacity  # noqa: E402
from v4_plugin.serving import settings  # noqa: E402
from v4_plugin.checkpoint.config import PRESET_DIR, LayerType, parse_config, preset_config  # noqa: E402
from v4_plugin.cache.layout import IndexerCache, plan  # noqa: E402
from v4_plugin.checkpoint.tiny import TINY_PRESETS  # noqa: E402

PAGE = 128
GIB = 2**30
# The planner's bytes per token (compressed entries + indexer keys; spec), per model and indexer format.
PLANNED = {("flash", IndexerCache.FP8): 3850.25, ("flash", IndexerCache.FP4): 3514.25,
           ("pro", IndexerCache.FP8): 5511.44, ("pro", IndexerCache.FP4): 5031.44}


@pytest.fixture(scope="module")
def sglang_args():
    """Install SGLang's runtime context for a parsed command line, as the scheduler does."""
    from sglang.srt.plugins import load_plugins

    load_plugins()  # the plugin's entry point and hooks, as in every SGLang process

    def install(model_dir, *extra: str):
        from sglang.srt.runtime_context import publish
        from sglang.srt.server_args import prepare_server_args

        args = prepare_server_args(["--model-path", str(model_dir), "--device", "cpu", "--skip-tokenizer-init",
                                    *extra])
        publish(args, role="scheduler")
        return args

    return install


def _model_dir(tmp_path, model: str):
    path = tmp_path / model
    path.mkdir()
    (path / "config.json").write_text((PRESET_DIR / f"deepseek-v4-{model}.config.json").read_text())
    return path


def _configurator(model_dir, kv_cache_dtype: str, speculative_algorithm: str | None = None):
    """SGLang's pool-configurator factory (hooked by the plugin) for our architecture (the target worker)."""
    from sglang.srt.model_executor.pool_configurator import create_memory_pool_configurator
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    hf = SimpleNamespace(architectures=["DeepseekV4PluginForCausalLM"])
    kvc = SimpleNamespace(model_config=SimpleNamespace(model_path=str(model_dir), hf_config=hf),
                          kv_cache_dtype_str=kv_cache_dtype, model_dtype=torch.bfloat16, page_size=PAGE, attn_dp_size=1,
                          spec_algorithm=SpeculativeAlgorithm.from_string(speculative_algorithm), is_draft_worker=False)
    return create_memory_pool_configurator(kvc)


@pytest.mark.parametrize("model,flag,windows",
                         [("flash", "NEXTN", 1), ("flash", "EAGLE", 1), ("flash-0731", "DSPARK", 3)])
def test_drafter_windows_are_charged_per_swa_slot(model, flag, windows, tmp_path, sglang_args):
    """With drafting the draft worker's pool keeps the drafter's windows on the target's SWA slots (the MTP
    block's; DSpark's three stages', served as EAGLE, which is what the configurator sees): SGLang's
    configurator path charges one more 584-B window entry per SWA slot and window, and fewer tokens fit;
    `kv-plan --speculative-algorithm` says the same."""
    from v4_plugin.cache.layout import main_entry_bytes

    model_dir = _model_dir(tmp_path, model)
    sglang_args(model_dir, "--kv-cache-dtype", "fp8_e4m3")
    memory = 64 * GIB
    plain = _configurator(model_dir, "fp8_e4m3")._sizes(memory, PAGE)
    drafting = _configurator(model_dir, "fp8_e4m3", "EAGLE" if flag == "DSPARK" else flag)._sizes(memory, PAGE)
    assert drafting.full_bytes_per_token == plain.full_bytes_per_token
    assert drafting.swa_bytes_per_token == plain.swa_bytes_per_token + windows * main_entry_bytes(preset_config(model))
    assert drafting.full_tokens < plain.full_tokens
    assert drafting == sglang_planned_capacity(preset_config(model), memory, page_size=PAGE,
                                               swa_full_tokens_ratio=0.8, draft_layers=windows)
    from test_layout import kv_plan

    cli = kv_plan("--framework", "sglang", "--model", model, "--kv-cache-memory", str(memory), "--kv-cache-dtype",
                  "fp8_e4m3", "--page-size", str(PAGE), "--speculative-algorithm", flag)
    assert (cli["max_total_num_tokens"], cli["swa_tokens"], cli["draft_layers"]) == \
        (drafting.full_tokens, drafting.swa_tokens, windows)


@pytest.mark.parametrize("model", ["flash", "pro"])
@pytest.mark.parametrize("fmt", [IndexerCache.FP8, IndexerCache.FP4])
def test_configurator_full_token_bytes_are_the_planners(model, fmt, tmp_path, sglang_args, monkeypatch):
    """Through SGLang's configurator factory, real configs, FP8 cache: the bytes one full-pool token
    costs are the planner's bytes per token (the window and compressor rows are in the SWA pool)."""
    monkeypatch.setenv(settings.INDEXER_CACHE_ENV, fmt.value)
    model_dir = _model_dir(tmp_path, model)
    sglang_args(model_dir, "--kv-cache-dtype", "fp8_e4m3")
    conf = _configurator(model_dir, "fp8_e4m3")
    assert isinstance(conf, pools.V4PoolConfigurator)
    memory = 64 * GIB
    config = conf.calculate_pool_sizes(memory, PAGE)
    full_bytes = conf._sizes(memory, PAGE).full_bytes_per_token
    assert full_bytes == pytest.approx(PLANNED[model, fmt], rel=0.01)
    assert full_bytes == pytest.approx(plan(preset_config(model), context=1, indexer_cache=fmt).bytes_per_token,
                                       rel=1e-12)
    # SGLang's default SWA sizing: ratio 0.8 of the full tokens
    assert config.swa_max_total_num_tokens == int(config.max_total_num_tokens * 0.8) // PAGE * PAGE
    planned = sglang_planned_capacity(preset_config(model), memory, page_size=PAGE, swa_full_tokens_ratio=0.8,
                                      indexer=fmt)
    assert config.max_total_num_tokens == planned.full_tokens
    assert 0.99 * memory <= planned.bytes <= memory  # the two pools spend the budget (page rounding only)


@pytest.mark.parametrize("model,ratio,fmt", [("flash", 0.1, IndexerCache.FP8), ("pro", 0.8, IndexerCache.FP4)])
def test_kv_plan_cli_predicts_sglangs_pool_sizes(model, ratio, fmt, tmp_path, sglang_args, monkeypatch, capsys):
    """`v4-plugin kv-plan --framework sglang` gives the full and SWA token counts SGLang's own
    configurator code path computes for the same budget and flags."""
    import json

    from v4_plugin.cli import main

    monkeypatch.setenv(settings.INDEXER_CACHE_ENV, fmt.value)
    model_dir = _model_dir(tmp_path, model)
    sglang_args(model_dir, "--kv-cache-dtype", "fp8_e4m3", "--swa-full-tokens-ratio", str(ratio))
    memory = 48 * GIB
    config = _configurator(model_dir, "fp8_e4m3").calculate_pool_sizes(memory, PAGE)
    assert main(["kv-plan", "--framework", "sglang", "--model", model, "--kv-cache-memory", str(memory),
                 "--kv-cache-dtype", "fp8_e4m3", "--indexer-cache", fmt.value,
                 "--swa-full-tokens-ratio", str(ratio), "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert predicted["max_total_num_tokens"] == pytest.approx(config.max_total_num_tokens, rel=0.01)
    assert predicted["swa_tokens"] == pytest.approx(config.swa_max_total_num_tokens, rel=0.01)


@pytest.mark.parametrize("radix", [False, True])
def test_configurator_request_cap_mode(radix, tmp_path, sglang_args):
    """--max-running-requests without --swa-full-tokens-ratio: SGLang's request cap sizes the SWA pool
    (its `compute_swa_request_cap`, plus 4 cached-prefix windows per request with the radix cache)
    and the rest of the budget goes to full tokens at the planner's bytes per token."""
    model_dir = _model_dir(tmp_path, "flash")
    extra = ["--max-running-requests", "16", "--chunked-prefill-size", "4096", "--kv-cache-dtype", "fp8_e4m3"]
    sglang_args(model_dir, *extra, *([] if radix else ["--disable-radix-cache"]))
    conf = _configurator(model_dir, "fp8_e4m3")
    memory = 64 * GIB
    config = conf.calculate_pool_sizes(memory, PAGE)
    from sglang.srt.runtime_context import get_schedule

    window, interval = 128, 128  # Flash's sliding window; SGLANG_SWA_EVICTION_INTERVAL's default
    # SGLang's request cap: per request the window, the eviction interval, a page of alignment and a
    # page of decode allocation; then the prefill chunks in flight (2 with the overlap schedule) + a page
    chunks = 1 if get_schedule().disable_overlap_schedule else 2
    swa = 16 * (window + interval + 2 * PAGE) + chunks * 4096 + PAGE + (4 * 16 * (window + PAGE) if radix else 0)
    assert config.swa_max_total_num_tokens == -(-swa // PAGE) * PAGE
    cfg = preset_config("flash")
    planned = sglang_planned_capacity(cfg, memory, page_size=PAGE, swa_tokens=swa)
    assert config.max_total_num_tokens == planned.full_tokens
    assert abs(config.max_total_num_tokens * plan(cfg, context=1).bytes_per_token
               + config.swa_max_total_num_tokens * planned.swa_bytes_per_token - memory) <= 0.01 * memory


@pytest.mark.parametrize("preset", ["flash", "pro"])
@pytest.mark.parametrize("st", [pools.StorageChoice(True, None, torch.float32),
                                pools.StorageChoice(False, IndexerCache.FP8, torch.bfloat16),
                                pools.StorageChoice(False, IndexerCache.FP4, torch.bfloat16)],
                         ids=lambda s: "float32" if s.float_kv else s.indexer.value)
def test_pool_allocates_the_planned_bytes(preset, st):
    """The pool's tensors hold exactly the planned bytes (plus SGLang's padding page 0 of each side),
    with P/m compressed rows and P window/compressor rows per page."""
    cfg = parse_config(TINY_PRESETS[preset])
    cap = st.capacity(cfg, 64 * 2**20, page_size=PAGE, swa_full_tokens_ratio=0.5)
    assert cap.full_tokens % PAGE == 0 and cap.swa_tokens % PAGE == 0 and cap.swa_tokens > 0
    pool = pools.V4TokenToKVPool(cfg, st, size=cap.full_tokens, size_swa=cap.swa_tokens, page_size=PAGE,
                                 device="cpu")
    full, swa = pool.full_kv_pool, pool.swa_kv_pool
    padding = PAGE * (cap.full_bytes_per_token + cap.swa_bytes_per_token)
    assert pool.get_kv_size_bytes() == pytest.approx(cap.bytes + padding, rel=1e-12)
    assert full.num_pages == cap.full_tokens // PAGE + 1 and swa.num_pages == cap.swa_tokens // PAGE + 1
    for kind, f, s in zip(cfg.layer_types, full.layers, swa.layers):
        assert s["window"].shape[:2] == (swa.num_pages, PAGE)
        if kind is LayerType.SWA:
            assert not f and set(s) == {"window"}
            continue
        assert f["compressed"].shape[:2] == (full.num_pages, PAGE // kind.ratio)
        assert s["state"].shape[:2] == (swa.num_pages, PAGE)
        assert ("index_keys" in f) == ("index_state" in s) == (kind is LayerType.CSA)
