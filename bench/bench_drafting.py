"""CPU benchmark of speculative decoding in the core (`v4_plugin.runtime.drafting`) on the tiny checkpoints.

Per drafter: acceptance length (tokens emitted per verify step, drafts accepted + 1) and tokens/s
of `speculative_generate` beside plain greedy `V4Model.generate` on the same prompt, after
checking that both return the same tokens. The tiny models have random weights, so their own
drafters (MTP, DSpark) are almost never right: those rows measure the cost of drafting and of
verifying k+1 tokens. The `replay` rows propose the plain greedy output (every draft accepted) and
show the ceiling (the replayed continuation is computed before the timed runs). Wall-clock times
on a shared CPU are noisy; the best of `--repeats` runs counts.

    python bench/bench_drafting.py [--prompt 64] [--new 64] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from v4_plugin.checkpoint.config import parse_config
from v4_plugin.runtime.drafting import DSparkDrafter, MTPDrafter, ReplayDrafter, speculative_generate
from v4_plugin.runtime.model import V4Model
from v4_plugin.checkpoint.quant import QuantSim
from v4_plugin.checkpoint.tiny import TINY_PRESETS, random_weights


def _best_seconds(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cases = [("flash", "mtp", 1), ("flash", "mtp", 3), ("flash", "replay", 3), ("flash", "replay", 5),
             ("flash-0731", "dspark", 3), ("flash-0731", "dspark", 5), ("flash-0731", "replay", 5)]
    header = (f"{'model':<11} {'drafter':<7} {'k':>2} {'accept len':>10} {'tok/s plain':>11} "
              f"{'tok/s draft':>11} {'speed-up':>8}")
    print(f"tiny checkpoints, fp32, quantization simulation off, prompt {args.prompt}, {args.new} new tokens, "
          f"{args.threads} thread(s), best of {args.repeats}")
    print(header)
    print("-" * len(header))
    models: dict[str, V4Model] = {}
    for preset, kind, k in cases:
        if preset not in models:
            cfg = parse_config(TINY_PRESETS[preset], f"tiny-{preset}")
            models[preset] = V4Model(cfg, random_weights(cfg, seed=0), quant=QuantSim.off())
        model = models[preset]
        prompt = torch.randint(2, model.cfg.vocab_size - 1, (args.prompt,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        plain_s, plain = _best_seconds(lambda: model.generate(prompt, args.new), args.repeats)

        # The last step drafts past the new tokens too: replay k more.
        continuation = model.generate(prompt, args.new + k) if kind == "replay" else []

        def drafter():
            if kind == "replay":
                return ReplayDrafter(len(prompt), continuation)
            return MTPDrafter(model) if kind == "mtp" else DSparkDrafter(model)

        spec_s, spec = _best_seconds(lambda: speculative_generate(model, drafter(), prompt, args.new, k), args.repeats)
        if spec.tokens != plain:
            raise SystemExit(f"{preset} {kind} k={k}: speculative output differs from plain greedy")
        n = len(plain)
        print(f"{preset:<11} {kind:<7} {k:>2} {spec.acceptance_length:>10.2f} {n / plain_s:>11.1f} "
              f"{n / spec_s:>11.1f} {plain_s / spec_s:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
