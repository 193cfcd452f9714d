"""Drafting through vLLM (`--speculative-config`) == decoding without it: MTP on the tiny Flash
checkpoint, DSpark on the tiny Flash-0731 one (served through vLLM's `custom_class` proposer hook, see
`vllm_backend/dspark.py`).

In-process engines (fp32, `auto` KV) in exact mode (no quantization simulation) and in the default mode
(`V4_PLUGIN_QUANT_SIM` on: FP8 activations, FP4 indexer), the reference model of the same mode being the
oracle token for token: a verify step's rows must be bit-identical to plain decoding's (`ops.matmul`),
or one FP8 rounding changes a greedy token. Random tiny weights reject almost every draft: that exercises the
position-indexed overwrite of rejected rows (our caches need no rollback). Full acceptance is forced
with a `custom_class` proposer that replays the target's greedy continuation.
"""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm")

from recording import recording

from v4_plugin.runtime.drafting import DSparkDrafter, MTPDrafter, speculative_generate
from vllm_harness import (EnvPatch, ReplayProposer, counters, engine_core, make_llm, random_prompt,
                          reference_model)

LENGTHS = [1, 3, 4, 5, 126, 127, 128, 129]  # drafts cross the 4- and 128-token edges
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from v4_plugin.checkpoint.tiny import make_tiny

    root = tmp_path_factory.mktemp("vllm-spec")
    return {preset: make_tiny(root / preset, preset=preset, seed=1) for preset in ("flash", "flash-0731")}


@pytest.fixture(scope="module")
def references(checkpoints):
    """(preset, mode) -> the reference model of that quantization mode ("exact" or "default")."""
    return {(preset, mode): reference_model(d, include_mtp=True, quant_off=mode == "exact")
            for preset, d in checkpoints.items() for mode in ("exact", "default")}


def _engine(model_dir, spec: dict, mode: str = "exact"):
    with EnvPatch(V4_PLUGIN_QUANT_SIM="off" if mode == "exact" else "on"):
        return make_llm(model_dir, speculative_config=spec)


def _greedy(llm, prompts: list[list[int]]) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


DRAFTERS = {"mtp": MTPDrafter, "dspark": DSparkDrafter}


@pytest.fixture(scope="module", params=[("flash", "mtp", 1, "exact"), ("flash", "mtp", 3, "default"),
                                        ("flash-0731", "dspark", 5, "exact"), ("flash-0731", "dspark", 5, "default")],
                ids=lambda p: f"{p[1]}-k{p[2]}-{p[3]}")
def drafting(request, checkpoints, references):
    """(engine, preset, method, k, reference model) for one `--speculative-config` and quantization mode."""
    preset, method, k, mode = request.param
    llm = _engine(checkpoints[preset], {"method": method, "num_speculative_tokens": k}, mode)
    yield llm, preset, method, k, references[preset, mode]
    del llm
    gc.collect()


def test_greedy_output_equals_decoding_without_drafts(drafting):
    """Single requests and the 8 at once: the tokens of the reference's plain greedy decoding; vLLM's
    metrics count k drafts per verify step."""
    llm, _, _, k, reference = drafting
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    want = [reference.generate(p, NEW_TOKENS) for p in prompts]
    before = counters(llm)
    single = [_greedy(llm, [p])[0] for p in prompts]
    concurrent = _greedy(llm, prompts)
    after = counters(llm)
    assert single == want
    assert concurrent == want
    delta = {name: after[name] - before.get(name, 0) for name in after if name.startswith("vllm:spec_decode")}
    drafts, drafted = delta["vllm:spec_decode_num_drafts"], delta["vllm:spec_decode_num_draft_tokens"]
    assert drafts >= 2 * len(prompts) and drafted == k * drafts
    assert 0 <= delta["vllm:spec_decode_num_accepted_tokens"] <= drafted


def test_drafts_equal_the_reference_drafter(drafting):
    """Every step's drafts, recorded at vLLM's proposer, are the core drafter's for the same state."""
    llm, _, method, k, reference = drafting
    proposer = engine_core(llm).model_executor.driver_worker.worker.model_runner.drafter
    recorded: list[list[int]] = []
    propose = proposer.propose

    def propose_and_record(*args, **kwargs):
        drafts = propose(*args, **kwargs)
        recorded.extend(drafts.tolist() if hasattr(drafts, "tolist") else drafts)
        return drafts

    proposer.propose = propose_and_record
    try:
        for n in (3, 126):
            prompt = random_prompt(n, seed=100 + n)
            recorded.clear()
            assert _greedy(llm, [prompt])[0] == reference.generate(prompt, NEW_TOKENS)
            want = recording(DRAFTERS[method])(reference)
            speculative_generate(reference, want, prompt, NEW_TOKENS, k)
            assert len(want.proposed) >= 2
            assert recorded[: len(want.proposed)] == want.proposed, n
    finally:
        proposer.propose = propose


def test_kv_capacity_with_the_drafter_windows_matches_the_plan(drafting, checkpoints):
    """The capacity vLLM resolved with the drafter's window caches allocated (stored in its cache
    config; logged once per process) is `kv-plan --speculative-config`'s."""
    from test_layout import kv_plan

    llm, preset, method, k, _ = drafting
    config = llm.llm_engine.vllm_config
    plan = kv_plan("--framework", "vllm", "--model", str(checkpoints[preset]), "--device", "cpu", "--dtype", "float32",
                   "--kv-cache-memory", str(config.cache_config.kv_cache_memory_bytes), "--max-model-len", "1024",
                   "--max-num-batched-tokens", str(config.scheduler_config.max_num_batched_tokens),
                   "--speculative-config", f'{{"method": "{method}", "num_speculative_tokens": {k}}}')
    assert plan["draft_layers"] == (1 if method == "mtp" else 3)
    assert plan["kv_cache_size_tokens"] == config.cache_config.kv_cache_size_tokens
    assert abs(plan["max_concurrency"] - config.cache_config.kv_cache_max_concurrency) < 0.005


# ---- forced full acceptance ----------------------------------------------------------------------
def test_full_acceptance_emits_k_plus_one_tokens_per_step(checkpoints, references):
    k, reference = 3, references["flash", "exact"]
    prompts = [random_prompt(n, seed=7 + n) for n in (5, 127)]
    greedy = [reference.generate(p, NEW_TOKENS + k + 1) for p in prompts]
    ReplayProposer.continuations = {tuple(p): g for p, g in zip(prompts, greedy)}
    llm = _engine(checkpoints["flash"], {"method": "custom_class", "num_speculative_tokens": k,
                                            "model": "vllm_harness.ReplayProposer"})
    try:
        assert _greedy(llm, prompts) == [g[:NEW_TOKENS] for g in greedy]
        c = counters(llm)
        drafts, accepted = c["vllm:spec_decode_num_drafts"], c["vllm:spec_decode_num_accepted_tokens"]
        assert c["vllm:spec_decode_num_draft_tokens"] == k * drafts
        assert accepted == k * drafts  # every draft accepted: k + 1 tokens per verify step
        # After the prefill's token, each verify step emits k + 1: ceil((NEW_TOKENS - 1) / (k + 1)) steps per request.
        assert drafts == len(prompts) * -(-(NEW_TOKENS - 1) // (k + 1))
    finally:
        del llm
        gc.collect()


# ---- requests the checkpoint cannot serve --------------------------------------------------------
@pytest.mark.parametrize("preset,spec,message", [
    ("flash-0731", {"method": "mtp", "num_speculative_tokens": 1}, "speculative method 'mtp' needs the 04-24 MTP block"),
    ("flash", {"method": "dspark", "num_speculative_tokens": 5}, "speculative method 'dspark' needs a DSpark checkpoint"),
    ("flash-0731", {"method": "dspark", "num_speculative_tokens": 6},
     "num_speculative_tokens = 6 exceeds dspark_block_size = 5"),
])
def test_clear_errors_when_vllm_builds_its_config(checkpoints, preset, spec, message):
    with pytest.raises(Exception, match=message) as info:
        make_llm(checkpoints[preset], speculative_config=spec)
    assert str(checkpoints[preset]) in str(info.value)  # names the checkpoint's config.json
