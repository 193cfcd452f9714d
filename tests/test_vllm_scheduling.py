"""Continuous batching and prefix caching through vLLM's scheduler and block manager:

* 32 concurrent mixed-length requests give exactly what each gives alone;
* a request sharing a long prefix with an earlier one gets prefix-cache hits (vLLM's own counters)
  and the same tokens as without them (and as the reference model).

Exact mode (auto KV, V4_PLUGIN_QUANT_SIM=off, fp32); one in-process engine for the module."""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm")

from vllm_harness import (EnvPatch, compare_with_reference, counters, make_llm, random_prompt,
                          reference_model, sampled_logprobs)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from v4_plugin.checkpoint.tiny import make_tiny

    model_dir = make_tiny(tmp_path_factory.mktemp("vllm-sched") / "flash", preset="flash", seed=2)
    with EnvPatch(V4_PLUGIN_QUANT_SIM="off"):
        llm = make_llm(model_dir, enable_prefix_caching=True)
    yield llm, reference_model(model_dir)
    del llm
    gc.collect()


def _greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, ignore_eos=True)


def test_32_concurrent_requests_equal_each_alone(engine):
    llm, ref = engine
    lengths = [1 + (37 * i) % 260 for i in range(32)]  # 1 ... 260, mixed
    prompts = [random_prompt(n, seed=1000 + i) for i, n in enumerate(lengths)]
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(4), use_tqdm=False)
    alone = []
    for p in prompts:
        llm.reset_prefix_cache()  # "alone" means computed alone, not served from the batch's blocks
        alone.append(llm.generate([{"prompt_token_ids": p}], _greedy(4), use_tqdm=False)[0])
    for n, a, b in zip(lengths, together, alone):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids), f"prompt length {n}"
        lp_a, lp_b = sampled_logprobs(a.outputs[0]), sampled_logprobs(b.outputs[0])
        assert max(abs(x - y) for x, y in zip(lp_a, lp_b)) < 1e-4, f"prompt length {n}"
    # and both are the model's own greedy continuation
    for i in (0, 7, 31):
        cmp = compare_with_reference(ref, prompts[i], list(together[i].outputs[0].token_ids),
                                     sampled_logprobs(together[i].outputs[0]))
        assert cmp.tokens_equal and cmp.max_logprob_error < 2e-4, cmp


def test_shared_prefix_gets_cache_hits_and_identical_output(engine):
    llm, ref = engine
    prefix = random_prompt(600, seed=77)
    first = prefix + random_prompt(20, seed=78)
    second = prefix + random_prompt(25, seed=79)

    llm.reset_prefix_cache()
    cold = llm.generate([{"prompt_token_ids": second}], _greedy(6), use_tqdm=False)[0]
    llm.reset_prefix_cache()
    before = counters(llm)
    llm.generate([{"prompt_token_ids": first}], _greedy(6), use_tqdm=False)
    warm = llm.generate([{"prompt_token_ids": second}], _greedy(6), use_tqdm=False)[0]
    after = counters(llm)

    hits = after.get("vllm:prefix_cache_hits", 0) - before.get("vllm:prefix_cache_hits", 0)
    # Hits land on whole 256-token blocks of every cache group: 600 shared tokens -> 512 reused.
    assert hits >= 512, (before, after)
    assert warm.num_cached_tokens >= 512
    assert list(warm.outputs[0].token_ids) == list(cold.outputs[0].token_ids)
    lp_w, lp_c = sampled_logprobs(warm.outputs[0]), sampled_logprobs(cold.outputs[0])
    assert max(abs(x - y) for x, y in zip(lp_w, lp_c)) < 1e-4
    cmp = compare_with_reference(ref, second, list(warm.outputs[0].token_ids), lp_w)
    assert cmp.tokens_equal and cmp.max_logprob_error < 2e-4, cmp
