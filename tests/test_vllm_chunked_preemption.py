"""Chunked prefill at a small chunk size and preemption/recomputation under a tiny KV pool change no
token: one engine with `max_num_batched_tokens=64` (every prompt over 64 tokens is prefilled in
chunks, cutting compressor blocks and windows anywhere) and a block pool so small that concurrent
requests get preempted (vLLM's own counter says so). Outputs must equal the unconstrained result,
which is the reference model's (tests/test_vllm_generate.py shows the unconstrained engine equals it).

Exact mode (auto KV, V4_PLUGIN_QUANT_SIM=off, fp32); one in-process engine for the module."""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm")

from vllm_harness import (EnvPatch, compare_with_reference, counters, engine_core, make_llm,
                          random_prompt, reference_model, sampled_logprobs)

CHUNK = 64
BLOCKS = 72  # blocks of 256 tokens shared by all cache groups: room for about two running requests
NEW = 100  # tokens generated per request in the preemption test


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from v4_plugin.checkpoint.tiny import make_tiny

    model_dir = make_tiny(tmp_path_factory.mktemp("vllm-chunk") / "pro", preset="pro", seed=3)
    with EnvPatch(V4_PLUGIN_QUANT_SIM="off"):
        llm = make_llm(model_dir, max_model_len=640, max_num_batched_tokens=CHUNK, max_num_seqs=8,
                       enable_chunked_prefill=True, enable_prefix_caching=False,
                       num_gpu_blocks_override=BLOCKS)
    yield llm, reference_model(model_dir)
    del llm
    gc.collect()


def _greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, ignore_eos=True)


def _check(ref, prompts, outputs, new_tokens):
    failures = []
    for p, out in zip(prompts, outputs):
        completion = out.outputs[0]
        assert len(completion.token_ids) == new_tokens
        cmp = compare_with_reference(ref, p, list(completion.token_ids), sampled_logprobs(completion))
        if not cmp.tokens_equal or cmp.max_logprob_error > 2e-4:
            failures.append(f"prompt length {len(p)}: {cmp}")
    assert not failures, "\n".join(failures)


def test_engine_is_constrained(engine):
    llm, _ = engine
    config = llm.llm_engine.vllm_config
    assert config.scheduler_config.enable_chunked_prefill
    assert config.scheduler_config.max_num_batched_tokens == CHUNK
    assert engine_core(llm).scheduler.kv_cache_config.num_blocks == BLOCKS


def test_chunked_prefill_equals_unchunked(engine):
    llm, ref = engine
    prompts = [random_prompt(n, seed=n + 5) for n in (65, 129, 255, 300, 513)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(5), use_tqdm=False)
    _check(ref, prompts, outputs, 5)


def test_preemption_and_recompute_equal_unconstrained(engine):
    llm, ref = engine
    before = counters(llm).get("vllm:num_preemptions", 0)
    # Short prompts are admitted cheaply; while decoding, each request's window and compressor-state
    # groups grow to ~30 blocks, more than the pool holds for all of them: the scheduler preempts
    # (frees) running requests and later recomputes them from their tokens.
    prompts = [random_prompt(n, seed=n + 11) for n in (20, 33, 41, 17, 28, 36)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(NEW), use_tqdm=False)
    preemptions = counters(llm).get("vllm:num_preemptions", 0) - before
    assert preemptions > 0, "the KV pool was not small enough to force preemption"
    _check(ref, prompts, outputs, NEW)
