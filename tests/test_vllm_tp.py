"""vLLM with `tensor_parallel_size=2` on the CPU (issue 19): two worker processes, each holding its slices of a tiny
checkpoint and computing over vLLM's TP group (gloo here), generate what the one-rank core reference generates.

One `LLM` per case, in a subprocess (`vllm_harness.greedy_tokens_in_subprocess`, whose log holds both workers'
lines; the cases' subprocesses run at once), with vLLM's CPU settings for two ranks on one NUMA node:
`VLLM_CPU_OMP_THREADS_BIND="0|1"` (one core per rank; automatic binding asserts as many NUMA nodes as ranks), an
explicit KV budget per rank (`VLLM_CPU_KVCACHE_SPACE`; without it each rank asks for 0.92 of the node's memory)
and the multiprocessing executor. Prompts of 1, 5, 129 and 513 tokens (across the 4- and 128-token edges and two
256-token blocks), submitted together:

* exact mode (`V4_PLUGIN_QUANT_SIM=off`, float caches), the routed experts split by intermediate dimension
  (the tiny 96 widened to 128: whole 32-column FP4 scale groups per rank), drafting with the MTP block (two
  tokens per step, on the target's split core: verify steps must reproduce plain greedy decoding);
* the served default (quantization simulation on, `--kv-cache-dtype fp8`) with `--enable-expert-parallel`
  (4 of the 8 routed experts per rank).

Sizes the checkpoint cannot split are refused when vLLM builds its config, before any worker starts.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm_harness import (COUNTERS_MARK, STARTUP_MARK, compare_with_reference, greedy_tokens_in_subprocess,
                          random_prompt, reference_model)

LENGTHS = [1, 5, 129, 513]
NEW_TOKENS = 6
TWO_RANKS_ON_ONE_NODE = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1"}

MTP = {"method": "mtp", "num_speculative_tokens": 2}

# case: (checkpoint overrides, engine arguments, environment, reference in exact mode)
CASES = {
    "exact-moe-tp-mtp": ({"moe_intermediate_size": 128}, {"speculative_config": MTP}, {"V4_PLUGIN_QUANT_SIM": "off"},
                         True),
    "default-ep": ({}, {"enable_expert_parallel": True, "kv_cache_dtype": "fp8"}, {"V4_PLUGIN_QUANT_SIM": "on"},
                   False),
}


def _serve(case: str, root: Path) -> tuple[Path, list[list[int]], list[list[int]], str]:
    """(checkpoint, prompts, greedy tokens of the case's TP=2 engine, its log)."""
    from v4_plugin.checkpoint.tiny import make_tiny

    overrides, engine, env, _ = CASES[case]
    model_dir = make_tiny(root / "flash", preset="flash", seed=1, overrides=overrides)
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    log = root / "engine.log"
    tokens = greedy_tokens_in_subprocess(
        model_dir, prompts, NEW_TOKENS, log=log, env={**TWO_RANKS_ON_ONE_NODE, **env},
        overrides={"tensor_parallel_size": 2, "distributed_executor_backend": "mp", **engine})
    return model_dir, prompts, tokens, log.read_text()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, tuple]:
    """Every case's run (`_serve`), the engines started at once: most of a start-up is waiting, not computing."""
    with ThreadPoolExecutor(len(CASES)) as pool:
        runs = {case: pool.submit(_serve, case, tmp_path_factory.mktemp(f"vllm-tp-{case}")) for case in CASES}
    return {case: run.result() for case, run in runs.items()}


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_equal_one_rank_reference(served, case):
    model_dir, prompts, tokens, _ = served[case]
    ref = reference_model(model_dir, quant_off=CASES[case][3])
    failures = []
    for prompt, completion in zip(prompts, tokens):
        assert len(completion) == NEW_TOKENS
        cmp = compare_with_reference(ref, prompt, completion, None)
        if not cmp.tokens_equal:
            failures.append(f"prompt length {len(prompt)}: {cmp}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", CASES)
def test_mtp_drafts_ran_where_asked(served, case):
    line = next(line for line in served[case][3].splitlines() if line.startswith(COUNTERS_MARK))
    drafted = json.loads(line[len(COUNTERS_MARK):]).get("vllm:spec_decode_num_draft_tokens", 0)
    assert (drafted > 0) == ("speculative_config" in CASES[case][1]), line


@pytest.mark.parametrize("case", CASES)
def test_every_rank_logs_the_plugin_and_its_slices(served, case):
    log = served[case][3]
    experts = "by expert range" if CASES[case][1].get("enable_expert_parallel") else "by intermediate dimension"
    for rank in (0, 1):
        # vLLM prefixes each worker's lines with its name: Worker_TP<r>, Worker_TP<r>_EP<r> under expert parallelism
        lines = [line for line in log.splitlines() if re.search(rf"\(Worker_TP{rank}(_EP{rank})? pid=\d+\)", line)]
        assert sum(STARTUP_MARK in line for line in lines) == 1, (rank, log[-4000:])
        split = [line for line in lines if f"tensor-parallel rank {rank} of 2 over vLLM's TP group" in line]
        assert len(split) == 1 and f"4 of 8 attention heads, 1 of 2 output groups, routed experts split {experts}" \
            in split[0], (rank, lines)


@pytest.mark.parametrize("flags, message", [
    ({"tensor_parallel_size": 3}, r"--tensor-parallel-size 3: tensor parallelism 3 must divide the attention heads "
                                  r"\(num_attention_heads = 64\)"),
    ({"tensor_parallel_size": 16}, r"--tensor-parallel-size 16: .* output groups \(o_groups = 8\)"),
    ({"tensor_parallel_size": 2, "model": "tiny"},
     r"--tensor-parallel-size 2: MoE tensor parallelism over 2 ranks .* FP4 scale blocks of 32 "
     r"\(moe_intermediate_size = 96\)"),
    ({"pipeline_parallel_size": 2}, r"--pipeline-parallel-size 2 is not implemented"),
    ({"data_parallel_size": 2, "enable_expert_parallel": True},
     r"--enable-expert-parallel with --data-parallel-size 2 is not implemented"),
], ids=["heads", "o-groups", "tiny-fp4-groups", "pipeline", "dp-ep"])
def test_unsplittable_sizes_are_refused_when_vllm_builds_its_config(tmp_path, flags, message):
    """By the plugin's config hook, in the calling process, before vLLM starts an engine or a worker: the error
    names the flags and the checkpoint field (real Flash sizes, or the tiny flash's)."""
    from vllm.engine.arg_utils import EngineArgs

    from v4_plugin.checkpoint.config import preset_config
    from v4_plugin.checkpoint.tiny import TINY_PRESETS

    flags = dict(flags)
    config = TINY_PRESETS["flash"] if flags.pop("model", None) == "tiny" else preset_config("flash").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = EngineArgs(model=str(tmp_path), skip_tokenizer_init=True, enforce_eager=True, max_model_len=4096, **flags)
    with pytest.raises(ValueError, match=message):
        args.create_engine_config()
