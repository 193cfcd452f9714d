"""`LLM.generate` through the plugin == the core's reference model (greedy tokens and logprobs),
on both tiny presets, for prompt lengths around the compression boundaries (4, 128) and blocks (256,
512). Exact mode on both sides: `--kv-cache-dtype auto` and V4_PLUGIN_QUANT_SIM=off, fp32.

One in-process engine at a time (module-scoped, parametrized by preset)."""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm")

import re

from vllm_harness import (KV_LOGGER, PLUGIN_LOGGER, EnvPatch, LogCapture, compare_with_reference,
                          make_llm, random_prompt, reference_model, sampled_logprobs)

LENGTHS = [1, 3, 4, 5, 127, 128, 129, 511, 513]
NEW_TOKENS = 6


@pytest.fixture(scope="module", params=["flash", "pro"])
def engine(request, tmp_path_factory):
    from v4_plugin.checkpoint.tiny import make_tiny

    model_dir = make_tiny(tmp_path_factory.mktemp(f"vllm-gen-{request.param}") / request.param,
                          preset=request.param, seed=1)
    with EnvPatch(V4_PLUGIN_QUANT_SIM="off"), LogCapture(PLUGIN_LOGGER, KV_LOGGER) as logs:
        llm = make_llm(model_dir)
    llm.model_dir = model_dir
    yield llm, reference_model(model_dir), logs
    del llm
    gc.collect()


def test_startup_log_proves_the_plugin_serves(engine):
    _, _, logs = engine
    lines = logs.startup_lines()
    assert len(lines) == 1, logs.lines
    assert lines[0].startswith("deepseek-v4-plugin 0.1.0: serving DeepseekV4ForCausalLM with the "
                               "DEEPSEEK_V4_PLUGIN_PAGED attention backend (")
    assert lines[0].endswith("(torch)") or lines[0].endswith("(triton)")


def test_greedy_tokens_and_logprobs_equal_reference(engine):
    from vllm import SamplingParams

    llm, ref, _ = engine
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=1, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    failures = []
    for n, prompt, out in zip(LENGTHS, prompts, outputs):
        completion = out.outputs[0]
        assert len(completion.token_ids) == NEW_TOKENS
        cmp = compare_with_reference(ref, prompt, list(completion.token_ids), sampled_logprobs(completion))
        if not cmp.tokens_equal or cmp.max_logprob_error > 2e-4:
            failures.append(f"prompt length {n}: {cmp}")
    assert not failures, "\n".join(failures)


def test_logged_kv_capacity_equals_planner_model(engine):
    """vLLM's startup line "KV cache size: N tokens, Maximum concurrency for L tokens per request: C"
    == what `v4-plugin kv-plan --framework vllm` predicts for the engine's budget and flags (the
    planner's model of vLLM, window/state reserves per request included) within 1 %."""
    from test_layout import kv_plan

    llm, _, logs = engine
    lines = [line for line in logs.lines if "KV cache size" in line]
    assert len(lines) == 1, logs.lines
    m = re.search(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x",
                  lines[0])
    tokens, max_len, concurrency = int(m[1].replace(",", "")), int(m[2].replace(",", "")), float(m[3])
    config = llm.llm_engine.vllm_config
    want = kv_plan("--framework", "vllm", "--model", str(llm.model_dir), "--device", "cpu",
                   "--kv-cache-memory", str(config.cache_config.kv_cache_memory_bytes), "--max-model-len", str(max_len),
                   "--max-num-batched-tokens", str(config.scheduler_config.max_num_batched_tokens),
                   "--kv-cache-dtype", "auto", "--dtype", "float32")
    assert abs(tokens - want["kv_cache_size_tokens"]) <= 0.01 * want["kv_cache_size_tokens"], (lines[0], want)
    assert abs(concurrency - want["max_concurrency"]) <= 0.01 * want["max_concurrency"], (lines[0], want)
    assert want["log_line"] == lines[0]  # the very line vLLM printed
