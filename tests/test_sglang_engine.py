"""M2/M3: SGLang's own engine (`sglang.Engine`, CPU) serving the tiny checkpoints through the plugin.

One engine per preset, started once (module-scoped, one at a time), in exact mode on both sides
(`--kv-cache-dtype auto` = float entries, `V4_PLUGIN_QUANT_SIM=off`):

* flash runs with a forced small `--chunked-prefill-size` (128: SGLang wants a multiple of the page size), pro unchunked; both must give the
  reference model's greedy tokens for every prompt length, so chunked == unchunked == reference;
* all prompts submitted together (concurrent, mixed lengths) == each alone;
* the vLLM backend (its own engine, in a subprocess) gives the same greedy tokens for the same prompts;
* a second request sharing a long prefix hits SGLang's SWA-aware radix cache (its `cached_tokens`)
  and still gives the reference tokens;
* the full and SWA pools have the sizes of the core's planner (`sglang_planned_capacity`);
* the scheduler logged the plugin's startup line (ours ran, not SGLang's native DeepSeek-V4).
"""

from __future__ import annotations

import pytest

pytest.importorskip("sglang")

import sglang_harness as T  # noqa: E402
from v4_plugin.checkpoint.tiny import make_tiny  # noqa: E402

LENGTHS = [1, 3, 4, 5, 127, 128, 129, 511, 513]
NEW_TOKENS = 6
VOCAB = 384
ENGINE_ARGS = {
    "flash": {"chunked_prefill_size": 128, "max_total_tokens": 4096},
    "pro": {"chunked_prefill_size": 2048, "max_total_tokens": 4096},  # > any step here: no chunking
}


@pytest.fixture(scope="module", params=["flash", "pro"])
def served(request, tmp_path_factory):
    preset = request.param
    model_dir = str(make_tiny(tmp_path_factory.mktemp(f"sgl-{preset}") / preset, preset, seed=0))
    with T.environment(T.EXACT_ENV):
        engine, log = T.start_engine(model_dir, **ENGINE_ARGS[preset])
    try:
        yield preset, model_dir, engine, log
    finally:
        T.shutdown_engine(engine)


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(model_dir):
        if model_dir not in cache:
            cache[model_dir] = T.reference_model(model_dir)
        return cache[model_dir]

    return get


def _prompts(preset):
    return [T.prompt_ids(n, VOCAB, seed=1000 * n + len(preset)) for n in LENGTHS]


def test_startup_line_names_plugin(served):
    _, _, _, log = served
    text = open(log).read()
    assert "deepseek-v4-plugin 0.1.0: serving DeepseekV4ForCausalLM with the v4_plugin attention backend (" in text


def test_greedy_tokens_equal_reference_alone_and_concurrent(served, reference):
    preset, model_dir, engine, _ = served
    prompts = _prompts(preset)
    want = T.reference_greedy(reference(model_dir), prompts, NEW_TOKENS)
    alone = [T.generate(engine, [p], NEW_TOKENS)[0]["output_ids"] for p in prompts]
    for n, got, exp in zip(LENGTHS, alone, want):
        assert got == exp, f"{preset}: prompt length {n}: {got} != reference {exp}"
    together = [o["output_ids"] for o in T.generate(engine, prompts, NEW_TOKENS)]
    assert together == alone


def test_greedy_tokens_equal_vllm_backend(served):
    """The same checkpoint and prompts through the vLLM backend (its own engine, in a subprocess) give
    the same greedy tokens as SGLang, in exact mode on both sides."""
    from vllm_harness import greedy_tokens_in_subprocess

    preset, model_dir, engine, _ = served
    prompts = _prompts(preset)
    sglang = [o["output_ids"] for o in T.generate(engine, prompts, NEW_TOKENS)]
    assert sglang == greedy_tokens_in_subprocess(model_dir, prompts, NEW_TOKENS)


def test_shared_prefix_hits_radix_cache(served, reference):
    preset, model_dir, engine, _ = served
    prefix = T.prompt_ids(300, VOCAB, seed=77)
    first = prefix + T.prompt_ids(9, VOCAB, seed=78)
    second = prefix + T.prompt_ids(21, VOCAB, seed=79)
    want = T.reference_greedy(reference(model_dir), [first, second], NEW_TOKENS)
    out1 = T.generate(engine, [first], NEW_TOKENS)[0]
    out2 = T.generate(engine, [second], NEW_TOKENS)[0]
    assert out2["meta_info"]["cached_tokens"] >= 256, out2["meta_info"]  # two whole 128-token pages
    assert [out1["output_ids"], out2["output_ids"]] == want


def test_reported_capacity_follows_the_planner(served):
    """SGLang's pool configurator for our architecture sizes the full and SWA pools by the core's
    `sglang_planned_capacity` of the profiled budget, in SGLang's default SWA mode (ratio: no
    --max-running-requests; SGLang's fallback --swa-full-tokens-ratio is 0.8); SGLang then caps the
    full pool at --max-total-tokens and reports it as max_total_num_tokens."""
    import re

    from sglang_backend.capacity import sglang_planned_capacity
    from v4_plugin.checkpoint.config import load_config

    preset, model_dir, engine, log = served
    text = open(log).read()
    found = re.findall(r"deepseek-v4-plugin: (\d+) B of cache memory -> full (\d+) token slots", text)
    assert found, "the plugin's pool configurator did not run"
    budget, slots = map(int, found[-1])
    # exact mode: float32 entries (4 B), float indexer keys
    planned = sglang_planned_capacity(load_config(model_dir), budget, page_size=128, swa_full_tokens_ratio=0.8,
                                      fp8=False, indexer=None, dtype_bytes=4)
    assert abs(slots - planned.full_tokens) <= 0.01 * planned.full_tokens
    full = min(planned.full_tokens, ENGINE_ARGS[preset]["max_total_tokens"])
    assert engine.get_server_info()["max_total_num_tokens"] == full
    built = re.findall(r"KV pool of (\d+) full / (\d+) SWA token slots", text)
    assert built and tuple(map(int, built[-1])) == (full, int(full * 0.8) // 128 * 128)
