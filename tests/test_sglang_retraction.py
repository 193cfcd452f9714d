"""SGLang's hybrid-SWA memory under pressure (tiny flash, exact mode, one CPU engine for the module).

The pools are small on purpose: a full pool of 1024 token slots (8 pages) and an SWA pool of 640
(ratio 0.625: 5 pages), chunked prefill of 128.

* a request longer than the whole SWA pool completes with the reference tokens: SGLang must have
  freed the window slots it left behind, and kept the 127 positions before every prefill chunk and
  decode step resident;
* concurrent requests exhaust the pools during decode, so SGLang retracts some (its log says so)
  and recomputes them later: every request still gives the tokens it gives alone.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("sglang")

import sglang_harness as T  # noqa: E402
from v4_plugin.checkpoint.tiny import make_tiny  # noqa: E402

VOCAB = 384
PAGE = 128
FULL_TOKENS, SWA_RATIO = 1024, 0.625
SWA_TOKENS = int(FULL_TOKENS * SWA_RATIO) // PAGE * PAGE
ENGINE_ARGS = {"chunked_prefill_size": PAGE, "max_total_tokens": FULL_TOKENS, "swa_full_tokens_ratio": SWA_RATIO}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = str(make_tiny(tmp_path_factory.mktemp("sgl-retract") / "flash", "flash", seed=0))
    with T.environment(T.EXACT_ENV):
        engine, log = T.start_engine(model_dir, **ENGINE_ARGS)
    try:
        yield model_dir, engine, log
    finally:
        T.shutdown_engine(engine)


@pytest.fixture(scope="module")
def reference(served):
    return T.reference_model(served[0])


def test_pools_have_the_requested_sizes(served):
    _, engine, log = served
    assert engine.get_server_info()["max_total_num_tokens"] == FULL_TOKENS
    built = re.findall(r"KV pool of (\d+) full / (\d+) SWA token slots", open(log).read())
    assert built and tuple(map(int, built[-1])) == (FULL_TOKENS, SWA_TOKENS)


def test_request_longer_than_the_swa_pool_is_exact(served, reference):
    _, engine, _ = served
    prompt = T.prompt_ids(SWA_TOKENS + 60, VOCAB, seed=5)  # 700 positions > 640 SWA slots
    new_tokens = 4
    got = T.generate(engine, [prompt], new_tokens)[0]["output_ids"]
    assert got == T.reference_greedy(reference, [prompt], new_tokens)[0]


def test_retraction_keeps_tokens_exact(served):
    """Submitted together the requests do not fit, SGLang retracts some and recomputes them later;
    each must give the tokens it gives alone (which equal the reference: test_sglang_engine)."""
    _, engine, log = served
    prompts = [T.prompt_ids(247 + i, VOCAB, seed=50 + i) for i in range(4)]
    new_tokens = 12  # past position 256 each running request needs a third page: 2 x 3 > 5 SWA pages
    retracted = re.compile(r"KV cache pool is full\. Retract requests\. #retracted_reqs: [1-9]")
    before = len(retracted.findall(open(log).read()))
    together = [o["output_ids"] for o in T.generate(engine, prompts, new_tokens)]
    assert len(retracted.findall(open(log).read())) > before, \
        "SGLang did not retract any request; the test no longer exercises retraction"
    alone = [T.generate(engine, [p], new_tokens)[0]["output_ids"] for p in prompts]
    assert together == alone
