"""Serving throughput and latency of a tiny DeepSeek-V4 checkpoint against a tiny Llama, same vLLM, one run.

    python bench/bench_serving.py [--preset flash] [--concurrency 1,8,32] [--rounds 2] [--prompt-len 64]
                                  [--output-len 32] [--dtype bfloat16] [--max-model-len 1024]
                                  [--kv-cache-memory 1G] [--keep DIR]

Builds, offline, a tiny V4 checkpoint (`v4_plugin.checkpoint.tiny.make_tiny`, served by this plugin) and a tiny
random Llama with about as many parameters (transformers `LlamaConfig` + random weights, the same
tokenizer: `v4_plugin.text.tokenizer.write_tokenizer`). Serves each in turn with `vllm serve` (same flags),
and at each concurrency C runs vLLM's own client, `vllm bench serve` (random dataset, C * `--rounds`
requests of `--prompt-len` random tokens, `--output-len` tokens each, `ignore_eos`, greedy, at most C in
flight; the same seed for both models; both servers get the same --kv-cache-memory-bytes). Prints one
table of what it reports: requests/s, output tokens/s, per-token latency (TPOT) and time to first
token (mean, p50).

Runs on the CPU build of vLLM as on a GPU one. The numbers are for comparing the two models on one
machine, not absolute serving figures: the tiny models are far too small to load any accelerator.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__:  # imported as bench.bench_serving
    from . import common
else:  # run as a script: bench/ is sys.path[0]
    import common
common.use_test_harnesses()  # vllm_harness: the tests' engine and server helpers


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level of one model, as `vllm bench serve` reports it (its --save-result JSON)."""

    model: str
    concurrency: int
    report: dict

    def row(self) -> str:
        r = self.report
        return (f"{self.model:<12s} {self.concurrency:>5d} {r['completed']:>5d} {r['request_throughput']:>8.2f} "
                f"{r['output_throughput']:>10.1f} {r['mean_tpot_ms']:>10.1f} {r['median_tpot_ms']:>9.1f} "
                f"{r['mean_ttft_ms']:>10.1f} {r['median_ttft_ms']:>9.1f}")


HEADER = (f"{'model':<12s} {'conc':>5s} {'reqs':>5s} {'req/s':>8s} {'out tok/s':>10s} {'tpot mean':>10s} "
          f"{'tpot p50':>9s} {'ttft mean':>10s} {'ttft p50':>9s}")
UNITS = "(tpot: per-token latency, ttft: time to first token; both in ms; measured by `vllm bench serve`)"


# ---- models -----------------------------------------------------------------------------------------
def parameter_count(model_dir: Path) -> int:
    """Logical parameters of a V4 checkpoint's main model (FP8/FP4 weights counted as their values)."""
    from v4_plugin.checkpoint.loader import load_checkpoint
    from v4_plugin.checkpoint.config import load_config

    tensors = load_checkpoint(model_dir, load_config(model_dir), include_mtp=False)
    return sum(t.numel() for t in tensors.values())


def make_tiny_llama(out: Path, *, vocab_size: int, num_layers: int, target_params: int, seed: int = 0) -> int:
    """A random Llama with `target_params` parameters (to one MLP width step) written with
    `save_pretrained`, with the V4 tiny checkpoints' tokenizer; returns its parameter count.

    hidden 256, 8 query heads / 2 KV heads of 32 (vLLM's CPU attention needs head_dim >= 32), untied
    embeddings; the MLP width is solved for the parameter budget."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from v4_plugin.text.tokenizer import write_tokenizer

    hidden, heads, kv_heads, head_dim, step = 256, 8, 2, 32, 32
    fixed = 2 * vocab_size * hidden + hidden  # embeddings, lm_head, final norm
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 2 * hidden  # attention + norms
    mlp_width = max(step, round((target_params - fixed - num_layers * per_layer) / (3 * hidden * num_layers) / step)
                    * step)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp_width, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=4096,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer_vocab = write_tokenizer(out)
    if tokenizer_vocab > vocab_size:
        raise ValueError(f"tokenizer has {tokenizer_vocab} tokens, more than the model's vocab_size {vocab_size}")
    return sum(p.numel() for p in model.parameters())


# ---- load: vLLM's own client ---------------------------------------------------------------------------
def run_level(base: str, label: str, model_dir: Path, args: argparse.Namespace, concurrency: int,
              work: Path) -> LevelResult:
    """`vllm bench serve` at `concurrency` clients: --rounds requests per client of random prompts of
    --prompt-len tokens, --output-len tokens each (ignore_eos, greedy)."""
    out = work / f"{label}-c{concurrency}.json"
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm",
               "--base-url", base, "--model", label, "--tokenizer", str(model_dir), "--dataset-name", "random",
               "--random-input-len", str(args.prompt_len), "--random-output-len", str(args.output_len),
               "--random-range-ratio", "0", "--num-prompts", str(concurrency * args.rounds),
               "--max-concurrency", str(concurrency), "--ignore-eos", "--temperature", "0", "--seed", "0",
               "--percentile-metrics", "ttft,tpot", "--save-result", "--result-dir", str(work),
               "--result-filename", out.name, "--disable-tqdm"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode or not out.exists():
        raise RuntimeError(f"vllm bench serve failed for {label} at concurrency {concurrency}:\n{done.stderr[-3000:]}")
    return LevelResult(label, concurrency, json.loads(out.read_text()))


def bench_model(model_dir: Path, label: str, args: argparse.Namespace, work: Path,
                env: dict[str, str] | None = None) -> list[LevelResult]:
    from vllm_harness import vllm_server

    log = work / f"{label}.server.log"
    flags = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--enforce-eager",
             "--kv-cache-memory-bytes", args.kv_cache_memory, "--served-model-name", label]
    print(f"# serving {label} from {model_dir} (log: {log})", flush=True)
    with vllm_server(model_dir, log, *flags, env=env) as base:
        run_level(base, label, model_dir, args, 1, work)  # warm-up, not counted
        results = []
        for c in args.concurrency:
            results.append(run_level(base, label, model_dir, args, c, work))
            print(f"#   {results[-1].row()}", flush=True)
    for line in log.read_text().splitlines():
        if "KV cache size" in line or "serving DeepseekV4ForCausalLM" in line:
            print(f"#   {line.split('] ', 1)[-1]}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="flash", choices=["flash", "pro"], help="tiny V4 preset")
    parser.add_argument("--concurrency", type=common.int_list, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each concurrency")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-memory", default="1G", help="--kv-cache-memory-bytes of both servers")
    parser.add_argument("--keep", type=Path, help="write the checkpoints and server logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.prompt_len + args.output_len > args.max_model_len:
        parser.error("--prompt-len + --output-len exceeds --max-model-len")

    from v4_plugin.checkpoint.config import load_config
    from v4_plugin.checkpoint.tiny import make_tiny

    work = args.keep or Path(tempfile.mkdtemp(prefix="v4-bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    v4_dir = make_tiny(work / f"tiny-v4-{args.preset}", preset=args.preset, seed=0)
    cfg = load_config(v4_dir)
    v4_params = parameter_count(v4_dir)
    llama_params = make_tiny_llama(work / "tiny-llama", vocab_size=cfg.vocab_size, num_layers=cfg.num_hidden_layers,
                                   target_params=v4_params)
    print(f"# tiny V4 {args.preset}: {v4_params:,} parameters (all experts); tiny Llama: {llama_params:,}")
    print(f"# {args.prompt_len} prompt tokens, {args.output_len} output tokens per request, {args.rounds} "
          f"requests per client, vllm serve --dtype {args.dtype} --enforce-eager --kv-cache-memory-bytes "
          f"{args.kv_cache_memory}", flush=True)

    results = bench_model(v4_dir, f"v4-{args.preset}", args, work)
    results += bench_model(work / "tiny-llama", "llama", args, work)

    import vllm

    print(f"\nvLLM {vllm.__version__}; {UNITS}")
    common.print_header(HEADER)
    for c in args.concurrency:
        for r in results:
            if r.concurrency == c:
                print(r.row())
    return 0


if __name__ == "__main__":
    sys.exit(main())
