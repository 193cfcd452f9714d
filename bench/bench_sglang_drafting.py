"""Speculative decoding through SGLang on the tiny checkpoints: acceptance and tokens/s with and without drafts.

    python bench/bench_sglang_drafting.py [--new 48] [--prompt 64] [--batches 1,8] [--dtype float32]
                                          [--repeats 3]

SGLang engines (`sglang.Engine` on CPU, this plugin serving the tiny Flash and Flash-0731 checkpoints
built offline), one per drafting case: none, `--speculative-algorithm NEXTN` k=1 and k=3 (Flash: the MTP
block as SGLang's EAGLE draft), `DSPARK` k=5 (Flash-0731, k = dspark_block_size by default: the plugin
serves it through SGLang's EAGLE worker with its DSpark draft), and `replay` k=3 (Flash): NEXTN with the
test draft `DeepseekV4PluginReplayDraft`, which drafts the plain greedy continuation (every draft
accepted: the ceiling). For each batch size B, B greedy requests of `--new` tokens run at once,
`--repeats` times (the fastest counts); the table gives acceptance length (tokens per verify step:
accepted drafts / verify steps + 1, summed over the batch from SGLang's per-request `meta_info`,
`spec_num_correct_drafts` and `spec_verify_ct`; 1 without drafting), output tokens/s over the wall time,
and the speed-up over no drafting. Every run's tokens are checked equal to the run without drafting.
The tiny models have random weights, so their own drafters are almost never right: those rows measure
the cost of drafting and of verifying k+1 tokens. Wall-clock times on a shared CPU are noisy (SGLang
binds a thread to every core, so another busy process can slow it down many times over); compare rows
of one run only.

The replay draft keys a draft row by (position, token) alone, so concurrent requests must not share a key
that continues differently: the prompts are random (seeds 0, 1, ...), skipping those whose sequence (with
the core's greedy continuation) would clash with one already chosen. There is no replay row for
Flash-0731: the replay draft is the MTP draft with its logits replaced, which needs the 04-24 MTP block
(mtp.0.e_proj / h_proj / enorm / hnorm) and the target's streams as hidden states, while a DSpark
checkpoint has DSpark stages in their place and its target hands on the stages' features.
Radix cache off: every run prefills its prompts in full.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # SGLang's tree kernels on CPU; read when they are decorated

if __package__:  # imported as bench.bench_sglang_drafting
    from . import common
else:  # run as a script: bench/ is sys.path[0]
    import common
common.use_test_harnesses()  # sglang_harness: the tests' engine and server helpers

VOCAB = 384  # the tiny checkpoints'


def _nextn(k: int) -> dict:
    """SGLang's arguments for MTP chains of k drafts."""
    return dict(speculative_algorithm="NEXTN", speculative_num_steps=k, speculative_eagle_topk=1,
                speculative_num_draft_tokens=k + 1)


def _prompts(model_dir: str, n: int, length: int, new: int) -> list[list[int]]:
    """n random prompts the replay draft can serve at once: each one's sequence (prompt and the core's
    greedy continuation) continues differently from the others' at no shared (position, token)."""
    from sglang_backend.models.replay_draft import replay_table
    from sglang_harness import prompt_ids, reference_model

    model = reference_model(model_dir, quant_off=False)
    chosen: list[list[int]] = []
    sequences: list[list[int]] = []
    seed = 0
    while len(chosen) < n:
        prompt = prompt_ids(length, VOCAB, seed)
        seed += 1
        try:
            replay_table([*sequences, prompt])  # most clashes are in the prompts: checked before generating
            sequence = prompt + model.generate(prompt, new)
            replay_table([*sequences, sequence])
        except ValueError:
            continue
        chosen.append(prompt)
        sequences.append(sequence)
    return chosen


def _run(engine, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]], float]:
    """(seconds, tokens per request, acceptance length) of one batch of greedy requests."""
    from sglang_harness import generate

    start = time.perf_counter()
    outs = generate(engine, prompts, new)
    seconds = time.perf_counter() - start
    steps = sum(o["meta_info"].get("spec_verify_ct", 0) for o in outs)
    accepted = sum(o["meta_info"].get("spec_num_correct_drafts", 0) for o in outs)
    return seconds, [o["output_ids"] for o in outs], (accepted / steps + 1 if steps else 1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=48, help="new tokens per request")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--batches", default="1,8", help="requests at once, comma-separated")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each batch; the fastest counts")
    args = ap.parse_args()
    batches = common.int_list(args.batches)

    from sglang_harness import replay_checkpoint, shutdown_engine, start_engine
    from v4_plugin.checkpoint.tiny import make_tiny

    cases = {"flash": [None, ("NEXTN", 1), ("NEXTN", 3), ("replay", 3)],
             "flash-0731": [None, ("DSPARK", 5)]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {preset: make_tiny(Path(tmp) / preset, preset=preset, seed=1) for preset in cases}
        prompts = _prompts(str(models["flash"]), max(batches), args.prompt, args.new)
        for preset, specs in cases.items():
            plain: dict[int, tuple[float, list[list[int]]]] = {}
            for spec in specs:
                spec_args = {}
                if spec is not None:
                    method, k = spec
                    spec_args = dict(speculative_algorithm="DSPARK") if method == "DSPARK" else _nextn(k)
                    if method == "replay":
                        sequences = [p + toks for p, toks in zip(prompts, plain[max(batches)][1])]
                        draft = replay_checkpoint(models[preset], Path(tmp) / f"{preset}-replay", sequences)
                        spec_args["speculative_draft_model_path"] = str(draft)
                engine, _ = start_engine(str(models[preset]), dtype=args.dtype, max_total_tokens=4096,
                                         disable_radix_cache=True, **spec_args)
                try:
                    _run(engine, prompts[:1], 4)  # warm-up
                    for b in batches:
                        runs = [_run(engine, prompts[:b], args.new) for _ in range(args.repeats)]
                        seconds, tokens, accept = min(runs, key=lambda run: run[0])
                        if spec is None:
                            plain[b] = (seconds, tokens)
                        if any(run[1] != plain[b][1] for run in runs):
                            raise SystemExit(f"{preset} {spec} batch {b}: tokens differ from decoding without drafts")
                        rows.append(common.drafting_row(preset, spec, b, args.new, accept, seconds, plain[b][0]))
                finally:
                    shutdown_engine(engine)

    common.print_drafting_table(f"SGLang (sglang.Engine, CPU) serving the tiny checkpoints through deepseek-v4-plugin, "
                                f"{args.dtype}, prompt {args.prompt}, {args.new} new tokens per request, greedy, "
                                f"fastest of {args.repeats}", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
