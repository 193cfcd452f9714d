"""Issue 10 (SGLang): forced full acceptance, k + 1 tokens per verify step through SGLang's EAGLE worker.

The tiny model's random MTP block rejects most drafts, so tests/test_sglang_speculative.py never runs
SGLang's multi-step path at full acceptance (k drafts accepted, their draft-extend rows and window-cache
writes used by the next step's drafts). Here the draft model is `DeepseekV4PluginReplayDraft`: the MTP
block run as usual, its logits replaced by the target's own greedy continuation (the `replay_sequences`
of a draft checkpoint directory next to the tiny 04-24 one). One engine (`--speculative-algorithm
NEXTN`, `STEPS` drafts in chains, exact mode) serves prompts of 3 and 125 tokens whose drafts cross the
4- and 128-token edges. Per request, alone and both concurrently: the tokens are the core's plain greedy
ones, and SGLang's metrics show every draft accepted: after the prefill's token each verify step emits
STEPS + 1 tokens (the last one cut at max_new_tokens, its drafts still counted as correct, as SGLang
counts a step before it truncates the output).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("sglang")

import sglang_harness as T  # noqa: E402
from sglang_backend.models.replay_draft import replay_table  # noqa: E402
from v4_plugin.checkpoint.tiny import make_tiny  # noqa: E402

STEPS = 3  # drafts per verify step
NEW_TOKENS = 14  # 1 from the prefill + 13 from verify steps of 4: the last step is cut after 1 token
VOCAB = 384
PROMPTS = [(3, 5), (125, 6)]  # (length, seed)
SPEC_ARGS = dict(speculative_algorithm="NEXTN", speculative_num_steps=STEPS, speculative_eagle_topk=1,
                 speculative_num_draft_tokens=STEPS + 1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("sgl-replay") / "flash", "flash", seed=0)


@pytest.fixture(scope="module")
def runs(checkpoint) -> dict[int, tuple[list[int], list[int]]]:
    """Per prompt length: (prompt, the core's plain greedy output). The output runs a verify step past
    NEW_TOKENS, so that the drafts of the last (cut) step are the target's tokens too."""
    model = T.reference_model(str(checkpoint))
    prompts = {n: T.prompt_ids(n, VOCAB, seed) for n, seed in PROMPTS}
    return {n: (prompt, model.generate(prompt, NEW_TOKENS + STEPS + 1)) for n, prompt in prompts.items()}


@pytest.fixture(scope="module")
def engine(checkpoint, runs):
    sequences = [prompt + out for prompt, out in runs.values()]
    replay_table(sequences)  # the rows of the two sequences are told apart (else the engine would not start)
    draft_dir = T.replay_checkpoint(checkpoint, checkpoint.parent / "replay", sequences)
    with T.environment(T.EXACT_ENV):
        engine, _ = T.start_engine(str(checkpoint), max_total_tokens=4096, chunked_prefill_size=128,
                                   speculative_draft_model_path=str(draft_dir), **SPEC_ARGS)
    try:
        yield engine
    finally:
        T.shutdown_engine(engine)


def _check(result: dict, tokens: list[int], what: str) -> None:
    meta = result["meta_info"]
    assert result["output_ids"] == tokens[:NEW_TOKENS], f"{what}: tokens"
    steps = -(-(NEW_TOKENS - 1) // (STEPS + 1))  # every verify step emits STEPS + 1 tokens after the prefill's
    got = (meta["spec_verify_ct"], meta["spec_num_correct_drafts"], meta["spec_correct_drafts_histogram"])
    assert got == (steps, STEPS * steps, [0] * STEPS + [steps]), f"{what}: {meta}"
    assert meta["spec_accept_rate"] == 1.0, f"{what}: {meta}"
    assert meta["spec_accept_length"] == pytest.approx(NEW_TOKENS / steps)


def test_full_acceptance_alone(engine, runs):
    for n, (prompt, tokens) in runs.items():
        _check(T.generate(engine, [prompt], NEW_TOKENS)[0], tokens, f"prompt length {n}")


def test_full_acceptance_concurrent(engine, runs):
    results = T.generate(engine, [prompt for prompt, _ in runs.values()], NEW_TOKENS)
    for (n, (_, tokens)), result in zip(runs.items(), results):
        _check(result, tokens, f"concurrent, prompt length {n}")
