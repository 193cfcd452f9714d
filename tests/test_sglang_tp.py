"""Tensor and expert parallelism through SGLang: `sglang.Engine(tp_size=2)` on the CPU serves DeepSeek-V4 with the
plugin on both ranks, each holding its slices (`sglang_backend.parallel`).

Two engines, each started once (module-scoped, one at a time), two scheduler processes each, one core each
(`SGLANG_CPU_OMP_THREADS_BIND="0|1"`: this machine has one NUMA node, and SGLang's default binding wants one per
rank); the collectives are SGLang's TP group (gloo here: its shared-memory all-reduce needs AMX or arm64):

* `--tp-size 2`, the routed experts split by intermediate dimension (the tiny experts' 96 widened to 128: whole
  FP4 scale groups per rank), the default mode (the trained-in quantization simulation, float caches);
* `--tp-size 2 --ep-size 2`, the routed experts split by range, exact mode (`V4_PLUGIN_QUANT_SIM=off`, float
  caches), drafting with the MTP block (`--speculative-algorithm NEXTN`, chains of 3) through SGLang's EAGLE
  worker, whose draft model holds its slices of the MTP block too.

Both give the one-rank core model's greedy tokens for prompts of 1, 5, 129 and 513 tokens (across the 4- and
128-token edges) submitted together, and each rank logs the plugin's startup line; the drafting
engine's acceptance metrics are those of the core's drafting loop. Layouts the plugin does not serve, or sizes
the checkpoint does not divide, end the launch in the launching process with the error naming the flag or the
config field, before any scheduler starts.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("sglang")

import sglang_harness as T  # noqa: E402
from v4_plugin.checkpoint.config import ConfigError  # noqa: E402
from v4_plugin.checkpoint.tiny import make_tiny  # noqa: E402

TWO_RANKS_ENV = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}
LENGTHS = [1, 5, 129, 513]
NEW_TOKENS = 4
VOCAB = 384
WIDE = {"moe_intermediate_size": 128}  # 64 per rank: whole 32-column FP4 scale groups
ENGINE_ARGS = {"tp_size": 2, "max_total_tokens": 4096, "chunked_prefill_size": 128}

STEPS = 3  # MTP drafts per verify step
MTP_ARGS = dict(speculative_algorithm="NEXTN", speculative_num_steps=STEPS, speculative_eagle_topk=1,
                speculative_num_draft_tokens=STEPS + 1)
MTP_PROMPTS, MTP_TOKENS = ((1, 1), (3, 26), (126, 9), (127, 8)), 12  # (length, seed): the core accepts drafts

# (case, checkpoint overrides, extra engine arguments, exact mode, the startup line's expert split)
CASES = [
    ("tp2-moe-tp-default", WIDE, {}, False, "by intermediate dimension"),
    ("tp2-ep2-exact-mtp", {}, {"ep_size": 2, **MTP_ARGS}, True, "by range"),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sgl-tp")
    return {"wide": str(make_tiny(root / "wide", "flash", seed=0, overrides=WIDE)),
            "plain": str(make_tiny(root / "plain", "flash", seed=0))}


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def served(request, checkpoints):
    case, overrides, extra, exact, split = request.param
    model_dir = checkpoints["wide" if overrides else "plain"]
    with T.environment({**TWO_RANKS_ENV, **(T.EXACT_ENV if exact else {})}):
        engine, log = T.start_engine(model_dir, **ENGINE_ARGS, **extra)
    try:
        yield model_dir, engine, log, exact, split, extra
    finally:
        T.shutdown_engine(engine)


def test_every_rank_logs_the_plugin(served):
    _, _, log, _, split, _ = served
    text = open(log).read()
    for rank in range(2):
        line = (rf"\[[^\]]* TP{rank}[^\]]*\] deepseek-v4-plugin 0\.1\.0: serving DeepseekV4ForCausalLM with the "
                rf"v4_plugin attention backend \(torch\), tensor-parallel rank {rank} of 2 \(routed experts split "
                rf"{split}\)")
        assert re.search(line, text), f"rank {rank} did not log the plugin's startup line"


def test_greedy_tokens_equal_one_rank_reference(served):
    """All prompts submitted together (concurrent, mixed lengths; a drafting engine's tokens are its verified ones)."""
    model_dir, engine, _, exact, _, _ = served
    prompts = [T.prompt_ids(n, VOCAB, seed=n) for n in LENGTHS]
    want = T.reference_greedy(T.reference_model(model_dir, quant_off=exact), prompts, NEW_TOKENS)
    together = [o["output_ids"] for o in T.generate(engine, prompts, NEW_TOKENS)]
    for n, got, exp in zip(LENGTHS, together, want):
        assert got == exp, f"prompt length {n}: {got} != one-rank reference {exp}"


def test_mtp_drafting_equals_the_core(served):
    """Concurrent requests: SGLang's tokens, verify steps and accepted drafts are those of the core's drafting loop
    on one rank (`speculative_generate` with `MTPDrafter`, whose tokens are the plain greedy ones)."""
    from v4_plugin.runtime.drafting import MTPDrafter, speculative_generate

    model_dir, engine, _, exact, _, extra = served
    if "speculative_algorithm" not in extra:
        pytest.skip("this engine does not draft")
    model = T.reference_model(model_dir, quant_off=exact, mtp=True)
    prompts = [T.prompt_ids(n, VOCAB, seed) for n, seed in MTP_PROMPTS]
    runs = [speculative_generate(model, MTPDrafter(model), p, MTP_TOKENS, STEPS) for p in prompts]
    assert sum(sum(run.accepted) for run in runs) >= 2  # the drafter is checked, not only the verifier
    for (n, _), run, result in zip(MTP_PROMPTS, runs, T.generate(engine, prompts, MTP_TOKENS)):
        meta = result["meta_info"]
        assert result["output_ids"] == run.tokens, f"prompt length {n}: tokens"
        assert (meta["spec_verify_ct"], meta["spec_num_correct_drafts"]) == (len(run.accepted), sum(run.accepted)), \
            f"prompt length {n}: {meta}"


@pytest.mark.parametrize("args, error, message", [
    ({"tp_size": 3}, ConfigError,
     "--tp-size 3: tensor parallelism 3 must divide the attention heads (num_attention_heads = 8)"),
    ({"tp_size": 2}, ConfigError,
     "--tp-size 2: MoE tensor parallelism over 2 ranks must divide the experts' intermediate size into whole FP4 "
     "scale blocks of 32 (moe_intermediate_size = 96)"),
    ({"tp_size": 2, "dp_size": 2, "enable_dp_attention": True, "ep_size": 2}, ValueError,
     "deepseek-v4-plugin: --attn-dp-size 2 is not served"),
], ids=["heads", "expert-split", "dp-attention"])
def test_unserved_layout_fails_before_any_scheduler(checkpoints, args, error, message):
    """The launching process refuses while it resolves the server arguments: no scheduler ever logs."""
    import sglang as sgl

    with T.environment(TWO_RANKS_ENV), T.stderr_to_file() as log, pytest.raises(error, match=re.escape(message)):
        sgl.Engine(model_path=checkpoints["plain"], **T.CPU_ENGINE_ARGS, max_total_tokens=4096, **args)
    assert not re.search(r"\[[^\]]* TP\d", open(log).read()), "a scheduler started"
