"""`--kv-cache-dtype fp8` with FP4 indexer keys (V4_PLUGIN_INDEXER_CACHE=fp4): vLLM allocates the
584-byte main records and 68-byte MXFP4 key records, and generation equals the reference model with
its quantization simulation on (the stored records hold exactly the simulated values)."""

from __future__ import annotations

import gc

import pytest
import torch

pytest.importorskip("vllm")

from vllm_harness import EnvPatch, compare_with_reference, make_llm, random_prompt, sampled_logprobs


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from v4_plugin.checkpoint.loader import load_checkpoint
    from v4_plugin.checkpoint.config import load_config
    from v4_plugin.runtime.model import V4Model
    from v4_plugin.checkpoint.quant import QuantSim
    from v4_plugin.checkpoint.tiny import make_tiny

    model_dir = make_tiny(tmp_path_factory.mktemp("vllm-fp8") / "flash", preset="flash", seed=5)
    with EnvPatch(V4_PLUGIN_QUANT_SIM="on", V4_PLUGIN_INDEXER_CACHE="fp4"):
        llm = make_llm(model_dir, kv_cache_dtype="fp8", max_model_len=512)
    cfg = load_config(model_dir)
    ref = V4Model(cfg, load_checkpoint(model_dir, cfg, dtype=torch.float32, include_mtp=False),
                         dtype=torch.float32, quant=QuantSim())
    yield llm, ref
    del llm
    gc.collect()


def test_caches_hold_fp8_records_and_fp4_keys(engine):
    from vllm_harness import engine_core

    from v4_plugin.cache.layout import IndexerCache, indexer_entry_bytes, main_entry_bytes

    llm, ref = engine
    model = engine_core(llm).model_executor.driver_worker.worker.model_runner.model
    layer = {c.prefix: c for c in model.caches.layers}
    main, keys = main_entry_bytes(ref.cfg), indexer_entry_bytes(ref.cfg, IndexerCache.FP4)
    assert (main, keys) == (200, 34)  # tiny dims (head 128, rope 64, index 64); 584 / 68 for the real models
    csa, hca = "model.layers.2.attn", "model.layers.3.attn"  # tiny Flash: ratios 0, 0, 4, 128, 4
    for name, entries, width in ((f"{csa}.window", 64, main), (f"{csa}.compressed", 64, main),
                                 (f"{csa}.index_keys", 64, keys), (f"{hca}.compressed", 2, main)):
        assert layer[name].kv_cache.dtype == torch.uint8, name
        assert tuple(layer[name].kv_cache.shape[1:]) == (entries, width), name
    assert layer[f"{csa}.state"].kv_cache.dtype == torch.float32


def test_generation_equals_reference_with_quantization_simulation(engine):
    from vllm import SamplingParams

    llm, ref = engine
    prompts = [random_prompt(n, seed=n + 3) for n in (4, 129)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=5, temperature=0.0, logprobs=1, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        cmp = compare_with_reference(ref, p, list(o.outputs[0].token_ids), sampled_logprobs(o.outputs[0]))
        assert cmp.tokens_equal and cmp.max_logprob_error < 2e-4, (len(p), cmp)
