"""`v4-plugin` command line: KV planning, tiny checkpoints and greedy generation with the core model.

    v4-plugin kv-plan --model {flash,pro,flash-0731,pro-0813,v3.2,PATH} [--indexer-cache fp8|fp4] [--context N]
                      [--gpu-memory GIB] [--tp N] [--dp N] [--ep] [--json]
    v4-plugin kv-plan --framework vllm --model {flash,...,PATH} --kv-cache-memory BYTES --max-num-batched-tokens N
                      [--max-model-len N] [--kv-cache-dtype auto|fp8|fp8_e4m3|fp8_ds_mla|...] [--indexer-cache fp8|fp4]
                      [--dtype auto|bfloat16|float16|float32] [--device gpu|cpu] [--[no-]async-scheduling]
                      [--block-size N] [--json]
    v4-plugin kv-plan --framework sglang --model {flash,...,PATH} --kv-cache-memory BYTES [--page-size N]
                      [--swa-full-tokens-ratio R | --swa-tokens N] [--max-total-tokens N]
                      [--kv-cache-dtype ...] [--indexer-cache fp8|fp4] [--dtype ...] [--json]
    v4-plugin make-tiny OUT [--preset flash|pro|flash-0731|pro-0813] [--seed N]
    v4-plugin generate --model DIR --prompt TEXT [--max-tokens N] [--raw]

Also reachable as `python -m v4_plugin ...`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer

import sglang_backend.capacity as sglang_capacity
import vllm_backend.capacity as vllm_capacity
from v4_plugin import __version__
from v4_plugin.cache.layout import IndexerCache, KVPlan, RankPlan, checkpoint_bytes, plan, plan_ranks, plan_v32
from v4_plugin.checkpoint.config import PRESETS, ConfigError, V4Config, load_config, preset_config
from v4_plugin.checkpoint.sharding import Parallelism, check_parallelism
from v4_plugin.checkpoint.tiny import make_tiny
from v4_plugin.runtime.model import V4Model
from v4_plugin.serving.settings import KV_CACHE_DTYPES
from v4_plugin.text.chat import BOS, encode_messages

GIB = 1 << 30
_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
DEFAULT_CONTEXT = 1 << 20


def parse_tokens(text: str) -> int:
    """A token count: `131072`, `128K` or `1M` (binary multiples)."""
    t = text.strip().lower()
    try:
        if t and t[-1] in _SUFFIXES:
            return int(float(t[:-1]) * _SUFFIXES[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (use e.g. 131072, 128K, 1M)") from None


_BYTE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """A byte count as vLLM's `--kv-cache-memory-bytes` reads it (`85899345920`, `80G` = 80 GiB,
    `80g` = 80e9), or spelled out (`80GiB`, `80GB` = 80e9)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:([kKmMgGtT])(iB|B)?)?", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (use e.g. 85899345920, 80G, 80GiB, 80GB)")
    number, prefix, unit = m.group(1), m.group(2) or "", m.group(3)
    if unit == "iB":
        prefix = prefix.upper()
    elif unit == "B":
        prefix = prefix.lower()
    return int(float(number) * _BYTE_UNITS[prefix])


def _model_config(model: str) -> tuple[V4Config, str]:
    """A preset name or a config path -> (config, display name)."""
    if model in PRESETS:
        return preset_config(model), f"deepseek-v4-{model}"
    return load_config(model), model


def _plan_for(model: str, context: int, fmt: IndexerCache) -> KVPlan:
    if model in ("v3.2", "v32"):
        return plan_v32(context=context)
    cfg, name = _model_config(model)
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
    _print_rows(rows)


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


# ---- kv-plan --framework: the capacity a serving framework logs for a cache budget --------------------
# Each framework's planner lives in its adapter (`vllm_backend.capacity`, `sglang_backend.capacity`, both
# importable without the framework): it reads the parsed flags and returns (JSON fields, rows of the
# table, the log line the framework prints at startup). A new framework adds its flags in `build_parser`
# and one entry here.
FrameworkPlan = Callable[[argparse.Namespace, V4Config, str], tuple[dict, list[tuple[str, str]], str]]
FRAMEWORKS: dict[str, FrameworkPlan] = {"vllm": vllm_capacity.kv_plan, "sglang": sglang_capacity.kv_plan}
MODEL_DTYPES = ("bfloat16", "float16", "float32")


def _framework_plan(args: argparse.Namespace) -> int:
    for flag, value in (("--context", args.context), ("--gpu-memory", args.gpu_memory)):
        if value is not None:
            raise ValueError(f"{flag} is for the framework-free plan; with --framework use --max-model-len and "
                             "--kv-cache-memory")
    if args.kv_cache_memory is None:
        raise ValueError(f"--framework {args.framework} needs --kv-cache-memory (bytes of KV cache, e.g. 80G)")
    if args.model in ("v3.2", "v32"):
        raise ValueError("--framework plans DeepSeek-V4 models only")
    cfg, name = _model_config(args.model)
    fields, rows, line = FRAMEWORKS[args.framework](args, cfg, name)
    if args.json:
        print(json.dumps(fields, indent=2))
    else:
        _print_rows(rows)
        print(line)
    return 0


def _kv_plan(args: argparse.Namespace) -> int:
    if args.framework is not None:
        return _framework_plan(args)
    for flag in ("kv_cache_memory", "max_model_len", "max_num_batched_tokens", "block_size", "async_scheduling",
                 "page_size", "swa_full_tokens_ratio", "swa_tokens", "max_total_tokens"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} needs --framework (e.g. --framework vllm)")
    if args.kv_cache_dtype != "auto" or args.dtype != "auto" or args.device != "gpu":
        raise ValueError("--kv-cache-dtype, --dtype and --device need --framework (e.g. --framework vllm)")
    args.context = DEFAULT_CONTEXT if args.context is None else args.context
    if args.tp is not None or args.dp is not None or args.ep:
        return _rank_plan(args)
    p = _plan_for(args.model, args.context, IndexerCache(args.indexer_cache or "fp8"))
    if args.json:
        out = p.to_json()
        if args.gpu_memory is not None:
            out["gpu_memory_bytes"] = int(args.gpu_memory * GIB)
            out["sequences_fitting"] = p.sequences_fitting(out["gpu_memory_bytes"])
        print(json.dumps(out, indent=2))
    else:
        _print_plan(p, args.gpu_memory)
    return 0


def _rank_plan(args: argparse.Namespace) -> int:
    """kv-plan --tp/--dp/--ep: what one rank holds (weights as stored, KV), and what fits in --gpu-memory."""
    if args.model in ("v3.2", "v32"):
        raise ValueError("--tp/--dp/--ep plan DeepSeek-V4 models only")
    cfg, name = _model_config(args.model)
    par = Parallelism(args.tp or 1, args.dp or 1, args.ep)
    check_parallelism(cfg, par, where=f"--tp {par.attn_tp} --dp {par.attn_dp}{' --ep' if par.expert_parallel else ''}")
    memory = None if args.gpu_memory is None else int(args.gpu_memory * GIB)
    p = plan_ranks(cfg, par, context=args.context, indexer_cache=IndexerCache(args.indexer_cache or "fp8"),
                   memory_bytes=memory, name=name)
    if args.json:
        print(json.dumps({"model": name, **p.to_json()}, indent=2))
    else:
        _print_rows(_rank_rows(p, name))
    return 0


def _rank_rows(p: RankPlan, name: str) -> list[tuple[str, str]]:
    par, w = p.parallelism, p.weights
    moe = f"experts by range over {par.world} ranks" if par.expert_parallel else \
        f"experts by intermediate dim over {par.world} ranks"
    rows = [
        ("model", name),
        ("ranks", f"{par.world} = TP {par.attn_tp} x DP {par.attn_dp} (attention); MoE: {moe}"),
        ("weights per rank", f"{_human(w.total)}: routed experts {_human(w.routed_experts)}, shared "
                             f"{_human(w.shared_experts)}, blocks {_human(w.blocks)}, embedding + head "
                             f"{_human(w.embedding_and_head)}"),
        ("KV per token", f"{p.kv.bytes_per_token:,.1f} B on every rank (one KV head: TP ranks hold copies)"),
        (f"KV at {p.kv.context:,} tokens", f"{_human(p.kv.total_bytes_at_context)} per sequence (windows included)"),
    ]
    if p.memory_bytes is not None:
        gib = p.memory_bytes / GIB
        if p.kv_budget_bytes == 0:
            rows.append(("fits", f"no: the weights need {_human(w.total)} of {gib:g} GiB per rank"))
        else:
            rows += [
                (f"KV budget in {gib:g} GiB", f"{_human(p.kv_budget_bytes)} per rank"),
                ("KV tokens per rank", f"{p.kv_tokens:,} (amortised bytes per token)"),
                (f"sequences of {p.kv.context:,}", f"{p.sequences_per_replica:,} per replica x {par.attn_dp} = "
                                                   f"{p.sequences:,}"),
            ]
    return rows


def _make_tiny(args: argparse.Namespace) -> int:
    out = make_tiny(Path(args.out), preset=args.preset, seed=args.seed)
    print(f"wrote tiny DeepSeek-V4 ({args.preset}, seed {args.seed}) checkpoint to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    cfg = load_config(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = BOS + args.prompt if args.raw else encode_messages([{"role": "user", "content": args.prompt}])
    prompt_ids = tokenizer.encode(text, add_special_tokens=False).ids
    model = V4Model.from_checkpoint(model_dir)
    new_ids = model.generate(prompt_ids, args.max_tokens, stop_ids=(cfg.eos_token_id,))
    print(f"V4Model: {len(prompt_ids)} prompt tokens -> {len(new_ids)} new tokens {new_ids}", file=sys.stderr)
    print(tokenizer.decode(new_ids, skip_special_tokens=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="v4-plugin", description="DeepSeek-V4 plugin for vLLM and SGLang")
    parser.add_argument("--version", action="version", version=f"deepseek-v4-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    kv = sub.add_parser("kv-plan", help="KV-cache bytes per token, per sequence and at a context length; with "
                                         "--framework, the capacity the framework logs for a cache budget")
    kv.add_argument("--model", default="flash",
                    help=f"{', '.join(PRESETS)}, v3.2, or a config.json / checkpoint directory")
    kv.add_argument("--indexer-cache", choices=[f.value for f in IndexerCache],
                    help="indexer key format (default fp8; with --framework vllm: of FP8 KV caches)")
    kv.add_argument("--context", type=parse_tokens, help="tokens per sequence (e.g. 128K, 1M; default 1M)")
    kv.add_argument("--gpu-memory", type=float, help="GiB of accelerator memory, weights included")
    kv.add_argument("--json", action="store_true", help="print one JSON object")
    ranks = kv.add_argument_group("several ranks", "weights per rank as stored (the native sharding) and the KV "
                                                   "each rank holds; --gpu-memory is then per rank")
    ranks.add_argument("--tp", type=int, help="tensor-parallel ranks per attention replica (heads split)")
    ranks.add_argument("--dp", type=int, help="data-parallel attention replicas")
    ranks.add_argument("--ep", action="store_true", help="expert parallelism: routed experts by range over all ranks "
                                                         "(else by intermediate dimension)")
    serving = kv.add_argument_group("serving framework", "predict the KV capacity a framework logs at startup")
    serving.add_argument("--framework", choices=list(FRAMEWORKS))
    serving.add_argument("--kv-cache-memory", type=parse_bytes, metavar="BYTES",
                         help="KV cache budget per replica: bytes, 80G (GiB, as vLLM's --kv-cache-memory-bytes "
                              "reads it), 80GiB or 80GB")
    serving.add_argument("--max-model-len", type=parse_tokens, help="default: the config's max_position_embeddings")
    serving.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto",
                         help="auto (entries in the model dtype) or an FP8 name (584-byte records); the spellings "
                              "both adapters accept")
    serving.add_argument("--dtype", choices=["auto", *MODEL_DTYPES], default="auto",
                         help="model dtype; auto = bfloat16 (entries of --kv-cache-dtype auto)")
    serving.add_argument("--block-size", type=int, help="accepted and ignored: the plugin fixes 256-token blocks")
    vllm = kv.add_argument_group("vLLM (--framework vllm)")
    vllm.add_argument("--max-num-batched-tokens", type=parse_tokens,
                      help="tokens per scheduler step (sizes the per-request window/state reserve)")
    vllm.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                      help="where vLLM runs: names the log line and sets the default of --async-scheduling")
    vllm.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                      help="two batches in flight (vLLM's default on GPUs; off on CPU)")
    vllm.add_argument("--speculative-config", type=json.loads, metavar="JSON",
                      help="vLLM's flag, e.g. '{\"method\": \"mtp\", \"num_speculative_tokens\": 3}': the "
                           "drafter's window caches (MTP block or DSpark stages) are charged too")
    sglang = kv.add_argument_group("SGLang (--framework sglang)")
    sglang.add_argument("--page-size", type=int,
                        help=f"tokens per page, a multiple of 128 (default {sglang_capacity.PAGE_SIZE})")
    sglang.add_argument("--swa-full-tokens-ratio", type=float,
                        help="SWA pool tokens per full-pool token (SGLang's flag; default "
                             f"{sglang_capacity.SWA_RATIO})")
    sglang.add_argument("--swa-tokens", type=parse_tokens, help="a fixed SWA pool instead of the ratio")
    sglang.add_argument("--max-total-tokens", type=parse_tokens, help="SGLang's cap on the full pool")
    sglang.add_argument("--speculative-algorithm", metavar="NAME",
                        help="SGLang's flag (NEXTN/EAGLE: MTP, DSPARK): the drafter's windows are charged per SWA slot")
    kv.set_defaults(func=_kv_plan)

    tiny = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the official on-disk format")
    tiny.add_argument("out")
    tiny.add_argument("--preset", choices=list(PRESETS), default="flash")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny)

    gen = sub.add_parser("generate", help="greedy generation with the core model (V4Model, torch)")
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
