"""`v4-plugin` command line: KV planning, tiny checkpoints and reference generation.

    v4-plugin kv-plan --model {flash,pro,flash-0731,pro-0813,v3.2,PATH} [--indexer-cache fp8|fp4] [--context N]
                      [--gpu-memory GIB] [--json]
    v4-plugin make-tiny OUT [--preset flash|pro|flash-0731|pro-0813] [--seed N]
    v4-plugin generate --model DIR --prompt TEXT [--max-tokens N] [--raw]

Also reachable as `python -m v4_plugin ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .config import PRESETS, ConfigError, load_config, preset_config
from .layout import IndexerCache, KVPlan, checkpoint_bytes, plan, plan_v32

GIB = 1 << 30
_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_tokens(text: str) -> int:
    """A token count: `131072`, `128K` or `1M` (binary multiples)."""
    t = text.strip().lower()
    try:
        if t and t[-1] in _SUFFIXES:
            return int(float(t[:-1]) * _SUFFIXES[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (use e.g. 131072, 128K, 1M)") from None


def _plan_for(model: str, context: int, fmt: IndexerCache) -> KVPlan:
    if model in ("v3.2", "v32"):
        return plan_v32(context=context)
    cfg = preset_config(model) if model in PRESETS else load_config(model)
    name = f"deepseek-v4-{model}" if model in PRESETS else model
    return plan(cfg, context=context, indexer_cache=fmt, name=name, weight_bytes=checkpoint_bytes(cfg))


def _human(n: float) -> str:
    return f"{n / 1e9:,.2f} GB ({n / GIB:,.2f} GiB)"


def _print_plan(p: KVPlan, gpu_memory_gib: float | None) -> None:
    counts = ", ".join(f"{n} {k}" for k, n in p.layer_counts.items() if n)
    rows = [
        ("model", f"{p.model} ({counts})"),
        ("indexer cache", p.indexer_cache),
        ("entry bytes", f"main {p.entry_bytes['main']} B, indexer {p.entry_bytes['indexer']} B"),
        ("bytes per token", f"{p.bytes_per_token:,.4f} B (amortised, fixed state excluded)"),
        ("fixed per sequence", f"{p.fixed_bytes_per_sequence:,} B (windows + compressor state)"),
    ]
    if p.draft_fixed_bytes_per_sequence:
        rows.append((p.draft_kind, f"{p.draft_fixed_bytes_per_sequence:,} B of windows per sequence (SWA-only)"))
    rows += [
        (f"KV at {p.context:,} tokens", _human(p.kv_bytes_at_context)),
        ("with fixed state", _human(p.total_bytes_at_context)),
    ]
    if p.weight_bytes is not None:
        rows.append(("weights", _human(p.weight_bytes)))
    if gpu_memory_gib is not None:
        fits = p.sequences_fitting(int(gpu_memory_gib * GIB))
        rows.append((f"sequences in {gpu_memory_gib:g} GiB", "n/a (weights unknown)" if fits is None else f"{fits:,}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _kv_plan(args: argparse.Namespace) -> int:
    p = _plan_for(args.model, args.context, IndexerCache(args.indexer_cache))
    if args.json:
        out = p.to_json()
        if args.gpu_memory is not None:
            out["gpu_memory_bytes"] = int(args.gpu_memory * GIB)
            out["sequences_fitting"] = p.sequences_fitting(out["gpu_memory_bytes"])
        print(json.dumps(out, indent=2))
    else:
        _print_plan(p, args.gpu_memory)
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from .tiny import make_tiny

    out = make_tiny(Path(args.out), preset=args.preset, seed=args.seed)
    print(f"wrote tiny DeepSeek-V4 ({args.preset}, seed {args.seed}) checkpoint to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch
    from tokenizers import Tokenizer

    from .chat import BOS, encode_messages
    from .checkpoint import load_checkpoint
    from .model import ReferenceModel

    model_dir = Path(args.model)
    cfg = load_config(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = BOS + args.prompt if args.raw else encode_messages([{"role": "user", "content": args.prompt}])
    prompt_ids = tokenizer.encode(text, add_special_tokens=False).ids
    model = ReferenceModel(cfg, load_checkpoint(model_dir, cfg, include_mtp=False), dtype=torch.float32)
    new_ids = model.generate(prompt_ids, args.max_tokens, stop_ids=(cfg.eos_token_id,))
    print(f"reference model: {len(prompt_ids)} prompt tokens -> {len(new_ids)} new tokens {new_ids}", file=sys.stderr)
    print(tokenizer.decode(new_ids, skip_special_tokens=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="v4-plugin", description="DeepSeek-V4 plugin for vLLM and SGLang")
    parser.add_argument("--version", action="version", version=f"deepseek-v4-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    kv = sub.add_parser("kv-plan", help="KV-cache bytes per token, per sequence and at a context length")
    kv.add_argument("--model", default="flash",
                    help=f"{', '.join(PRESETS)}, v3.2, or a config.json / checkpoint directory")
    kv.add_argument("--indexer-cache", choices=[f.value for f in IndexerCache], default="fp8")
    kv.add_argument("--context", type=parse_tokens, default=1 << 20, help="tokens per sequence (e.g. 128K, 1M)")
    kv.add_argument("--gpu-memory", type=float, help="GiB of accelerator memory, weights included")
    kv.add_argument("--json", action="store_true", help="print one JSON object")
    kv.set_defaults(func=_kv_plan)

    tiny = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the official on-disk format")
    tiny.add_argument("out")
    tiny.add_argument("--preset", choices=list(PRESETS), default="flash")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny)

    gen = sub.add_parser("generate", help="greedy generation with the reference model")
    gen.add_argument("--model", required=True, help="checkpoint directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--raw", action="store_true", help="feed BOS + the prompt text, without the chat encoding")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"v4-plugin: error: {e}", file=sys.stderr)
        return 2
