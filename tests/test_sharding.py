"""v4_plugin.checkpoint.sharding and `kv-plan --tp/--dp/--ep`: every split tensor's slices tile it exactly
once, one rank's bytes are the published per-rank figures of the real checkpoints, the per-rank plan holds
the whole KV on every TP rank, and a size that does not divide is a clear error."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from v4_plugin.cache.layout import checkpoint_bytes, plan
from v4_plugin.cli import main
from v4_plugin.checkpoint.config import ConfigError, parse_config, preset_config
from v4_plugin.checkpoint.schema import Format, checkpoint_tensors
from v4_plugin.checkpoint.sharding import (Parallelism, Split, check_parallelism, rank_weights, shard, split_of,
                                           stored_slice_bytes)
from v4_plugin.checkpoint.tiny import TINY_PRESETS

GIB = 1 << 30
LAYOUTS = [Parallelism(2), Parallelism(1, 2, True), Parallelism(2, 2, True), Parallelism(2, 2)]


def test_one_rank_holds_the_whole_checkpoint():
    for name in ("flash", "pro", "flash-0731"):
        cfg = preset_config(name)
        assert rank_weights(cfg, Parallelism()).total == checkpoint_bytes(cfg)


# parallelism.md §3: FP8 linears + FP4 experts as stored, scales included, MTP block included.
@pytest.mark.parametrize("model, par, gib", [
    ("flash", Parallelism(8), 19.7), ("flash", Parallelism(1, 8, True), 25.9), ("flash", Parallelism(4), 38.1),
    ("pro", Parallelism(8), 103.7), ("pro", Parallelism(1, 8, True), 124.4), ("pro", Parallelism(16), 53.6),
])
def test_rank_bytes_of_the_real_checkpoints(model, par, gib):
    assert rank_weights(preset_config(model), par).total / GIB == pytest.approx(gib, abs=0.05)


@pytest.mark.parametrize("preset, par", [("flash", p) for p in LAYOUTS] + [("pro-0813", p) for p in LAYOUTS]
                         + [("pro-0813", Parallelism(4)), ("pro-0813", Parallelism(4, 2, True))], ids=str)
def test_slices_tile_every_tensor_once(preset, par):
    """Per tensor: a replicated one is whole on every rank; a split one's slices over the ranks of one
    attention replica (or over all ranks, for the MoE) cover each element exactly once; an expert lives on
    exactly one rank; and the ranks' stored bytes add up to the tensor's (FP4 scales split with their rows).
    (The tiny experts' intermediate size, 96, is widened to 128: 4 ranks x whole FP4 scale blocks.)"""
    cfg = parse_config({**TINY_PRESETS[preset], "moe_intermediate_size": 128})
    check_parallelism(cfg, par)
    for spec in checkpoint_tensors(cfg):
        split = split_of(spec, par)
        slices = [shard(spec, par, r, cfg) for r in range(par.world)]
        if split is Split.REPLICATED:
            assert all(s == tuple(slice(0, n) for n in spec.shape) for s in slices), spec.name
            continue
        if split is Split.EXPERT:
            assert sum(s is not None for s in slices) == 1, spec.name
            continue
        group = range(par.world) if split in (Split.EXPERT_ROWS, Split.EXPERT_COLUMNS) else range(par.attn_tp)
        dim = 1 if split in (Split.COLUMNS, Split.EXPERT_COLUMNS) else 0
        covered = [0] * spec.shape[dim]
        for r in group:
            if slices[r] is not None:
                for i in range(slices[r][dim].start, slices[r][dim].stop):
                    covered[i] += 1
        assert covered == [1] * spec.shape[dim], spec.name
        if spec.format is Format.FP4:
            whole = stored_slice_bytes(spec, tuple(slice(0, n) for n in spec.shape))
            assert sum(stored_slice_bytes(spec, slices[r]) for r in group if slices[r] is not None) == whole


def test_experts_are_spread_evenly():
    cfg = preset_config("flash")
    totals = {rank_weights(cfg, Parallelism(2, 4, True), r).routed_experts for r in range(8)}
    assert len(totals) == 1
    assert totals.pop() * 8 == rank_weights(cfg, Parallelism()).routed_experts


@pytest.mark.parametrize("model, par, field", [
    ("flash", Parallelism(3), "num_attention_heads"),  # 64 heads
    ("flash", Parallelism(16), "o_groups"),  # 8 groups: vLLM's limit for Flash
    ("pro", Parallelism(1, 5, True), "n_routed_experts"),  # 384 experts over 5 ranks
    ("flash", Parallelism(1, 128), "moe_intermediate_size"),  # 2048 / 128 = 16: not whole FP4 scale blocks
    ("tiny", Parallelism(2), "moe_intermediate_size"),  # 96 / 2 = 48
])
def test_sizes_that_do_not_divide_are_named(model, par, field):
    cfg = parse_config(TINY_PRESETS["flash"]) if model == "tiny" else preset_config(model)
    with pytest.raises(ConfigError, match=field):
        check_parallelism(cfg, par)


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["kv-plan", *args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("model, flags, par", [
    ("flash", ["--tp", "8"], Parallelism(8)), ("flash", ["--dp", "8", "--ep"], Parallelism(1, 8, True)),
    ("pro", ["--tp", "4", "--dp", "2", "--ep"], Parallelism(4, 2, True)),
])
def test_kv_plan_per_rank(model, flags, par):
    """`kv-plan --tp/--dp/--ep`: the rank's stored bytes, the single-rank KV bytes per token (TP ranks hold
    copies: one KV head), and the sequences of every replica in the memory left after the weights."""
    code, out, _ = _cli("--model", model, *flags, "--gpu-memory", "126.4", "--context", "128K", "--json")
    assert code == 0
    got, cfg = json.loads(out), preset_config(model)
    weights = rank_weights(cfg, par).total
    single = plan(cfg, context=128 * 1024)
    assert got["weight_bytes_per_rank"] == weights
    assert got["kv_bytes_per_token"] == single.bytes_per_token
    budget = int(126.4 * GIB) - weights
    assert got["kv_tokens_per_rank"] == int(budget // single.bytes_per_token)
    assert got["sequences"] == budget // single.total_bytes_at_context * par.attn_dp > 0


def test_kv_plan_per_rank_errors_and_table():
    code, _, err = _cli("--model", "flash", "--tp", "3")
    assert code == 2 and "--tp 3 --dp 1" in err and "num_attention_heads" in err
    code, out, _ = _cli("--model", "pro", "--tp", "8", "--gpu-memory", "71.7")
    assert code == 0 and "does not fit" not in out and "fits" in out and "no: the weights need" in out
