"""Issue 10 (SGLang): speculative decoding through SGLang's own EAGLE worker, on CPU.

One engine per drafter and quantization mode (exact, and the default `V4_PLUGIN_QUANT_SIM` on, where
one ulp of difference between a verify step and a plain step would flip an FP8 rounding) serves a
tiny checkpoint, chains of drafts (`--speculative-eagle-topk 1`):

* MTP: the 04-24 checkpoint, `--speculative-algorithm NEXTN` with `STEPS` drafts, the MTP block as
  the draft model (`DeepseekV4PluginForCausalLMNextN` over the draft worker's pool);
* DSpark: the -0731 checkpoint, plain `--speculative-algorithm DSPARK` (k = dspark_block_size = 5),
  which the plugin serves through the same worker with its DSpark draft
  (`DeepseekV4PluginForCausalLMDSpark`).

Per request SGLang must give the core's plain greedy tokens, and its own acceptance metrics must be
those of the core's drafting loop (`speculative_generate` with `MTPDrafter` / `DSparkDrafter`):
verify steps, accepted drafts and their histogram. The prompts (lengths 1, 3, 126, 127: drafts cross
the 4- and 128-token edges) include ones where the reference accepts drafts, so a wrong draft model
cannot pass by rejecting everything. Alone and 8 concurrent. Requests the checkpoint cannot serve
fail in `sgl.Engine` with the core's message.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

pytest.importorskip("sglang")

import sglang_harness as T  # noqa: E402
from v4_plugin.checkpoint.tiny import make_tiny  # noqa: E402

NEW_TOKENS = 12
VOCAB = 384
STEPS = 3  # MTP drafts per verify step
SPEC_ARGS = dict(speculative_algorithm="NEXTN", speculative_num_steps=STEPS, speculative_eagle_topk=1,
                 speculative_num_draft_tokens=STEPS + 1)


@dataclass(frozen=True)
class Drafting:
    preset: str
    args: dict
    k: int  # drafts per verify step
    # mode -> (length, seed) pairs; the reference of that mode accepts a draft in most (the short ones in all)
    prompts: dict[str, tuple[tuple[int, int], ...]]


DRAFTING = {
    "mtp": Drafting("flash", SPEC_ARGS, STEPS, {
        "exact": ((1, 1), (1, 8), (3, 26), (3, 0), (126, 9), (126, 10), (127, 8), (127, 15)),
        "default": ((1, 3), (1, 8), (3, 16), (3, 26), (126, 9), (126, 10), (127, 8), (127, 15))}),
    "dspark": Drafting("flash-0731", dict(speculative_algorithm="DSPARK"), 5, {
        "exact": ((1, 3), (1, 16), (3, 2), (3, 3), (126, 1), (126, 18), (127, 5), (127, 6)),
        "default": ((1, 19), (1, 28), (3, 0), (3, 3), (126, 1), (126, 18), (127, 5), (127, 6))}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sgl-spec")
    return {preset: str(make_tiny(root / preset, preset, seed=0)) for preset in ("flash", "flash-0731")}


@pytest.fixture(scope="module", params=[(name, mode) for name in DRAFTING for mode in ("exact", "default")],
                ids="-".join)
def served(request, checkpoints):
    """(drafting, engine, log, expected): expected maps (length, seed) to (prompt, the core's speculative
    run in the same quantization mode: tokens == plain greedy, accepted drafts per step)."""
    from v4_plugin.runtime.drafting import DSparkDrafter, MTPDrafter, speculative_generate

    name, mode = request.param
    drafting = DRAFTING[name]
    model = T.reference_model(checkpoints[drafting.preset], quant_off=mode == "exact", mtp=True)
    drafter = MTPDrafter if name == "mtp" else DSparkDrafter
    expected = {}
    for n, seed in drafting.prompts[mode]:
        prompt = T.prompt_ids(n, VOCAB, seed)
        run = speculative_generate(model, drafter(model), prompt, NEW_TOKENS, drafting.k)
        assert run.tokens == model.generate(prompt, NEW_TOKENS)
        expected[n, seed] = prompt, run
    assert sum(sum(run.accepted) for _, run in expected.values()) >= 4  # the drafter is checked, not only the verifier
    with T.environment(T.EXACT_ENV if mode == "exact" else {"V4_PLUGIN_QUANT_SIM": "on"}):
        engine, log = T.start_engine(checkpoints[drafting.preset], max_total_tokens=4096, chunked_prefill_size=128,
                                     **drafting.args)
    try:
        yield drafting, engine, log, expected
    finally:
        T.shutdown_engine(engine)


def _check(result: dict, run, what: str) -> None:
    meta = result["meta_info"]
    assert result["output_ids"] == run.tokens, f"{what}: tokens"
    histogram = [run.accepted.count(j) for j in range(max(run.accepted) + 1)]  # SGLang's: up to the largest
    got = (meta["spec_verify_ct"], meta["spec_num_correct_drafts"], meta["spec_correct_drafts_histogram"])
    assert got == (len(run.accepted), sum(run.accepted), histogram), f"{what}: {meta}"
    assert meta["spec_accept_length"] == pytest.approx(NEW_TOKENS / len(run.accepted))


def test_drafting_alone_equals_the_core(served):
    _, engine, _, expected = served
    for (n, seed), (prompt, run) in list(expected.items())[::2]:  # one prompt of each length
        _check(T.generate(engine, [prompt], NEW_TOKENS)[0], run, f"prompt length {n} (seed {seed})")


def test_drafting_concurrent_equals_the_core(served):
    _, engine, _, expected = served
    prompts = [prompt for prompt, _ in expected.values()]
    for ((n, seed), (_, run)), result in zip(expected.items(), T.generate(engine, prompts, NEW_TOKENS)):
        _check(result, run, f"concurrent, prompt length {n} (seed {seed})")


@pytest.mark.parametrize("preset,args,error,match", [
    ("flash", dict(speculative_algorithm="DSPARK", speculative_num_draft_tokens=3), "SpeculativeConfigError",
     r"--speculative-algorithm DSPARK .*'dspark' needs a DSpark checkpoint .* Use method 'mtp' \(SGLang: "
     r"--speculative-algorithm NEXTN or EAGLE\)"),
    ("flash-0731", SPEC_ARGS, "SpeculativeConfigError",
     r"--speculative-algorithm NEXTN .*'mtp' needs the 04-24 MTP block, but this is a DSpark checkpoint"),
    ("flash-0731", dict(speculative_algorithm="DSPARK", speculative_num_draft_tokens=7), "SpeculativeConfigError",
     r"--speculative-num-draft-tokens 7\): .*num_speculative_tokens = 6 exceeds dspark_block_size = 5"),
    ("flash", dict(SPEC_ARGS, speculative_eagle_topk=2), "SpeculativeConfigError", r"chains only"),
])
def test_requests_the_checkpoint_cannot_serve(checkpoints, preset, args, error, match):
    """Refused while SGLang resolves its arguments, before any process starts."""
    import sglang as sgl

    with pytest.raises(Exception, match=match) as info:
        sgl.Engine(model_path=checkpoints[preset], skip_tokenizer_init=True, **T.CPU_ENGINE_ARGS, **args)
    assert type(info.value).__name__ == error
