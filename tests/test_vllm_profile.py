"""vLLM's profiling and dummy runs execute the real core (issue 18 item 6), over scratch caches that are gone
afterwards.

One in-process engine (not eager, `max_num_batched_tokens` 512 of a 1024-token context) whose model runner is
driven through vLLM's own entry points: `profile_run` (what the GPU worker measures peak memory with, and the CPU
worker's compile warm-up: `_dummy_run(max_num_batched_tokens, is_profile=True)` without attention metadata, then
the sampler on the head's logits; vLLM 0.32 never runs it when a CPU engine of this architecture starts, see
`vllm_backend/model.py`) and `execute_dummy_batch` (a data-parallel idle rank's step). The core's op counts
(`dispatch.count_calls`) and a spy on `CacheLayers.scratch` (the real method, recorded) show what each computed;
weak references to the scratch storage show it freed; generation afterwards still equals the reference."""

from __future__ import annotations

import gc
import weakref

import pytest

pytest.importorskip("vllm")

from vllm_harness import EnvPatch, compare_with_reference, engine_core, make_llm, random_prompt, reference_model

MAX_LEN, BATCHED = 1024, 512
LAYERS, CSA = 5, 2  # the tiny flash: ratios 0, 0, 4, 128, 4


class ScratchSpy:
    """Records every `CacheLayers.scratch` call of the adapter (the real method runs): the plan's positions
    and sequences, and weak references to the scratch storage it returned."""

    def __init__(self):
        from vllm_backend.model import CacheLayers

        self.real, self.calls, self.storage = CacheLayers.scratch, [], []

    def __call__(self, layers, plan, max_len):
        caches = self.real(layers, plan, max_len)
        self.calls.append((plan.positions.tolist(), plan.seq_ids.tolist()))
        self.storage += [weakref.ref(c.data) for block in caches for c in vars(block).values() if c is not None]
        return caches

    def live(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.storage)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from v4_plugin.checkpoint.tiny import make_tiny

    model_dir = make_tiny(tmp_path_factory.mktemp("vllm-profile") / "flash", preset="flash", seed=3)
    spy = ScratchSpy()
    with pytest.MonkeyPatch.context() as patch, EnvPatch(V4_PLUGIN_QUANT_SIM="off"):
        patch.setattr("vllm_backend.model.CacheLayers.scratch", lambda layers, plan, n: spy(layers, plan, n))
        llm = make_llm(model_dir, enforce_eager=False, max_model_len=MAX_LEN, max_num_batched_tokens=BATCHED)
        yield llm, model_dir, spy
    del llm
    gc.collect()


def test_cpu_startup_runs_no_dummy_run(engine):
    """Not even without --enforce-eager: vLLM 0.32 turns compilation off for DeepseekV4ForCausalLM (breakable
    CUDA graphs by default), and the CPU worker profiles only to compile (`vllm_backend/model.py`'s docstring
    says so; this fails when a vLLM changes it)."""
    from vllm.config import CompilationMode

    llm, _, spy = engine
    assert llm.llm_engine.vllm_config.compilation_config.mode == CompilationMode.NONE
    assert spy.calls == []


def test_vllm_profile_run_executes_the_core_at_its_token_count(engine):
    from v4_plugin.runtime import dispatch

    llm, _, spy = engine
    before = len(spy.calls)
    with dispatch.count_calls() as (_, ops):
        engine_core(llm).model_executor.driver_worker.worker.model_runner.profile_run()
    assert len(spy.calls) == before + 1  # one forward (the sampler's run reuses its hidden states)
    positions, seq_ids = spy.calls[-1]
    # 512 tokens as the last chunk of a 1024-token context: the costliest step of that size
    assert positions == list(range(MAX_LEN - BATCHED, MAX_LEN)) and set(seq_ids) == {0}
    # every layer attended once (one sequence), every CSA layer's indexer scored, the MoE ran in every layer
    assert ops["attention_paged"] == LAYERS and ops["index_scores_paged"] == CSA, ops
    assert ops["moe"] == LAYERS and ops["hc_head"] >= 1, ops
    assert spy.live() == 0


def test_data_parallel_dummy_batch_executes_the_core(engine):
    """What an idle data-parallel rank runs each step (`Worker.execute_dummy_batch`: one token, no metadata)."""
    from v4_plugin.runtime import dispatch

    llm, _, spy = engine
    before = len(spy.calls)
    with dispatch.count_calls() as (_, ops):
        engine_core(llm).model_executor.driver_worker.worker.execute_dummy_batch()
    assert spy.calls[before:] == [([MAX_LEN - 1], [0])]
    assert ops["attention_paged"] == LAYERS and ops["index_scores_paged"] == CSA, ops
    assert spy.live() == 0


def test_generation_after_the_dummy_runs_equals_reference(engine):
    """The dummy runs wrote only their scratch caches: the served caches are intact."""
    from vllm import SamplingParams

    llm, model_dir, _ = engine
    prompts = [random_prompt(n, seed=n) for n in (5, 130)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    ref = reference_model(model_dir)
    for prompt, out in zip(prompts, outputs):
        cmp = compare_with_reference(ref, prompt, list(out.outputs[0].token_ids), None)
        assert cmp.tokens_equal, cmp
