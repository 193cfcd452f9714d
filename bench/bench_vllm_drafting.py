"""Speculative decoding through vLLM on the tiny checkpoints: acceptance and tokens/s with and without drafts.

    python bench/bench_vllm_drafting.py [--new 48] [--prompt 64] [--batches 1,8] [--dtype float32]

In-process vLLM engines (this plugin serving the tiny Flash and Flash-0731 checkpoints built offline)
for each `--speculative-config`: none, MTP k=1 and k=3 (Flash), DSpark k=5 (Flash-0731), and `replay`
k=3 / k=5, a `custom_class` proposer drafting the plain greedy continuation (every draft accepted:
the ceiling). For each batch size B, B greedy requests of `--new` tokens run at once; the table gives
acceptance length (tokens per verify step: accepted drafts / verify steps + 1, from vLLM's own
counters), output tokens/s over the wall time, and the speed-up over no drafting. Every run's tokens
are checked equal to the run without drafting. The tiny models have random weights, so their own
drafters are almost never right: those rows measure the cost of drafting and of verifying k+1 tokens.
Wall-clock times on a shared CPU are noisy; compare rows of one run only.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: ReplayProposer is set here
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if __package__:  # imported as bench.bench_vllm_drafting
    from . import common
else:  # run as a script: bench/ is sys.path[0]
    import common
common.use_test_harnesses()  # vllm_harness: the tests' engine and server helpers


def _run(llm, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]], float]:
    """(seconds, tokens per request, acceptance length) of one batch of greedy requests."""
    from vllm import SamplingParams

    from vllm_harness import counters

    before = counters(llm)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True), use_tqdm=False)
    seconds = time.perf_counter() - start
    after = counters(llm)
    steps = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
    accepted = (after.get("vllm:spec_decode_num_accepted_tokens", 0)
                - before.get("vllm:spec_decode_num_accepted_tokens", 0))
    return seconds, [list(o.outputs[0].token_ids) for o in outs], (accepted / steps + 1 if steps else 1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=48, help="new tokens per request")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--batches", default="1,8", help="requests at once, comma-separated")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    batches = common.int_list(args.batches)

    from v4_plugin.checkpoint.tiny import make_tiny
    from vllm_harness import ReplayProposer, make_llm, random_prompt

    cases = {"flash": [None, ("mtp", 1), ("mtp", 3), ("replay", 3)],
             "flash-0731": [None, ("dspark", 5), ("replay", 5)]}
    prompts = [random_prompt(args.prompt, seed=i) for i in range(max(batches))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, specs in cases.items():
            model_dir = make_tiny(Path(tmp) / preset, preset=preset, seed=1)
            plain: dict[int, tuple[float, list[list[int]]]] = {}
            for spec in specs:
                config = None
                if spec is not None:
                    method, k = spec
                    config = {"method": method, "num_speculative_tokens": k}
                    if method == "replay":
                        ReplayProposer.continuations = {
                            tuple(p): toks + [0] * (k + 1) for p, toks in zip(prompts, plain[max(batches)][1])}
                        config = {"method": "custom_class", "num_speculative_tokens": k,
                                  "model": "vllm_harness.ReplayProposer"}
                llm = make_llm(model_dir, dtype=args.dtype, speculative_config=config, disable_log_stats=False)
                _run(llm, prompts[:1], 4)  # warm-up
                for b in batches:
                    seconds, tokens, accept = _run(llm, prompts[:b], args.new)
                    if spec is None:
                        plain[b] = (seconds, tokens)
                    elif tokens != plain[b][1]:
                        raise SystemExit(f"{preset} {spec} batch {b}: tokens differ from decoding without drafts")
                    rows.append(common.drafting_row(preset, spec, b, args.new, accept, seconds, plain[b][0]))
                del llm
                gc.collect()

    common.print_drafting_table(f"vLLM (in-process, CPU) serving the tiny checkpoints through deepseek-v4-plugin, "
                                f"{args.dtype}, prompt {args.prompt}, {args.new} new tokens per request, greedy", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
