"""How DeepSeek-V4's checkpoint tensors split across ranks, and the bytes each rank holds as stored.

The split is the one DeepSeek's reference and the native vLLM / SGLang implementations use:

* attention: query heads over the attention tensor-parallel ranks (`wq_b` rows and `attn_sink` by
  head, `wo_a` by output group, `wo_b` by input columns, one all-reduce after `wo_b`); `wq_a`, `wkv`,
  the compressors, the indexer, mHC, the norms and the router are replicated (V4 attention has one
  KV head, so every attention rank holds the whole KV cache of its sequences);
* routed experts: by expert range over every rank (expert parallelism), or else by intermediate
  dimension over every rank (`w1`/`w3` rows, `w2` columns), as vLLM flattens MoE tensor parallelism
  across data-parallel replicas;
* the shared expert: by intermediate dimension over the attention tensor-parallel ranks;
* embedding and output head: by vocabulary rows over the attention tensor-parallel ranks (the last
  rank's slice may be shorter).

A slice keeps the stored format: FP8 weights with the E8M0 scales of the 128 x 128 blocks it touches,
packed FP4 experts with their scale rows. Everything here is arithmetic on `checkpoint_tensors`; no
tensor is read.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from v4_plugin.checkpoint.config import FP4_BLOCK, WEIGHT_BLOCK, ConfigError, V4Config
from v4_plugin.checkpoint.schema import Format, TensorSpec, checkpoint_tensors, element_bytes, file_entries


@dataclass(frozen=True)
class Parallelism:
    """The ranks serving one model: `attn_tp` ranks share each attention replica (heads split), `attn_dp`
    replicas run attention on their own sequences, and the MoE spans all `world = attn_tp * attn_dp` ranks,
    by expert range (`expert_parallel`) or by intermediate dimension.

    vLLM `-tp T -dp D [--enable-expert-parallel]` is `Parallelism(T, D, ep)`; SGLang `--tp T --dp D
    --enable-dp-attention` is `Parallelism(T // D, D, ep)` (its TP size counts every rank)."""

    attn_tp: int = 1
    attn_dp: int = 1
    expert_parallel: bool = False

    @property
    def world(self) -> int:
        return self.attn_tp * self.attn_dp


class Split(enum.Enum):
    """How one tensor is laid across ranks."""

    REPLICATED = "replicated"
    HEADS = "rows over attention TP"  # dim 0 over attn_tp: wq_b, attn_sink, wo_a, shared w1/w3, embed, head
    COLUMNS = "columns over attention TP"  # dim 1 over attn_tp: wo_b, shared w2
    EXPERT_ROWS = "rows over all ranks"  # routed w1/w3 by intermediate dim (no expert parallelism)
    EXPERT_COLUMNS = "columns over all ranks"  # routed w2 by intermediate dim
    EXPERT = "whole, on the rank owning the expert"  # expert parallelism


_ROUTED = re.compile(r"\.ffn\.experts\.(\d+)\.(w[123])$")
_SHARED = re.compile(r"\.ffn\.shared_experts\.(w[123])$")


def split_of(spec: TensorSpec, par: Parallelism) -> Split:
    """How `spec` (a tensor of `checkpoint_tensors`) splits under `par`."""
    name = spec.name
    if m := _ROUTED.search(name):
        if par.expert_parallel:
            return Split.EXPERT
        return Split.EXPERT_COLUMNS if m.group(2) == "w2" else Split.EXPERT_ROWS
    if m := _SHARED.search(name):
        return Split.COLUMNS if m.group(1) == "w2" else Split.HEADS
    if name in ("embed.weight", "head.weight") or name.endswith((".attn.wq_b", ".attn.attn_sink", ".attn.wo_a")):
        return Split.HEADS  # (the indexer's `attn.indexer.wq_b` ends in `indexer.wq_b`: replicated)
    if name.endswith(".attn.wo_b"):
        return Split.COLUMNS
    return Split.REPLICATED


def check_parallelism(cfg: V4Config, par: Parallelism, where: str = "parallelism") -> None:
    """A `ConfigError` naming the field and the size unless every split tensor divides evenly."""
    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: {what} ({field} = {getattr(cfg, field)})")

    if par.attn_tp < 1 or par.attn_dp < 1:
        raise ConfigError(f"{where}: tensor- and data-parallel sizes must be >= 1, got {par.attn_tp} and {par.attn_dp}")
    tp, world = par.attn_tp, par.world
    need(cfg.num_attention_heads % tp == 0, "num_attention_heads",
         f"tensor parallelism {tp} must divide the attention heads")
    need(cfg.o_groups % tp == 0, "o_groups", f"tensor parallelism {tp} must divide the output groups")
    need(cfg.moe_intermediate_size % tp == 0, "moe_intermediate_size",
         f"tensor parallelism {tp} must divide the shared expert's intermediate size")
    if par.expert_parallel:
        need(cfg.n_routed_experts % world == 0, "n_routed_experts",
             f"expert parallelism over {world} ranks must divide the routed experts")
    else:
        block = FP4_BLOCK if cfg.expert_dtype == "fp4" else 1
        need(cfg.moe_intermediate_size % (world * block) == 0, "moe_intermediate_size",
             f"MoE tensor parallelism over {world} ranks must divide the experts' intermediate size"
             + (f" into whole FP4 scale blocks of {FP4_BLOCK}" if block > 1 else ""))


def rank_range(n: int, parts: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s share of n items in `parts` contiguous slices (ceil-sized; the last may be short)."""
    size = -(-n // parts)
    return min(n, rank * size), min(n, (rank + 1) * size)


def _attn_rank(par: Parallelism, rank: int) -> int:
    return rank % par.attn_tp  # ranks are numbered dp-major: rank = dp_index * attn_tp + tp_index


def shard(spec: TensorSpec, par: Parallelism, rank: int, cfg: V4Config) -> tuple[slice, ...] | None:
    """The index of `rank`'s slice of the logical (dequantized) tensor `spec`, or None if it holds none of it."""
    split = split_of(spec, par)
    full = tuple(slice(0, n) for n in spec.shape)
    if split is Split.REPLICATED:
        return full
    if split is Split.EXPERT:
        return full if int(_ROUTED.search(spec.name).group(1)) in expert_range(cfg, par, rank) else None
    dim = 1 if split in (Split.COLUMNS, Split.EXPERT_COLUMNS) else 0
    parts, index = (par.world, rank) if split in (Split.EXPERT_ROWS, Split.EXPERT_COLUMNS) else \
        (par.attn_tp, _attn_rank(par, rank))
    start, stop = rank_range(spec.shape[dim], parts, index)
    if start == stop:
        return None
    return full[:dim] + (slice(start, stop),) + full[dim + 1:]


def expert_range(cfg: V4Config, par: Parallelism, rank: int) -> range:
    """The global ids of the routed experts `rank` holds (whole, under expert parallelism, or a slice of each)."""
    if not par.expert_parallel:
        return range(cfg.n_routed_experts)
    per_rank = cfg.n_routed_experts // par.world
    return range(rank * per_rank, (rank + 1) * per_rank)


def fp8_block_aligned(index: tuple[slice, ...]) -> bool:
    """Whether a slice of an FP8 linear starts on a 128 x 128 block edge in both dims: then its weight entries
    and the scale rows / columns of the blocks it touches form a stand-alone FP8 linear (the block grid of
    the slice is the checkpoint's); otherwise a local block would straddle two stored scales."""
    return all(s.start % WEIGHT_BLOCK == 0 for s in index)


def file_slices(spec: TensorSpec, index: tuple[slice, ...]) -> list[tuple[slice, ...]]:
    """The slices of `spec`'s file entries (in `file_entries` order) that hold `index` of the logical tensor:
    an FP8 weight's own slice and the scales of every 128 x 128 block it touches; a packed FP4 weight's
    bytes and E8M0 scale columns of whole 32-column groups (a ValueError if `index` cuts a group)."""
    if spec.format is Format.FP8:
        rows, cols = index
        touched = tuple(slice(s.start // WEIGHT_BLOCK, -(-s.stop // WEIGHT_BLOCK)) for s in (rows, cols))
        return [index, touched]
    if spec.format is Format.FP4:
        rows, cols = index
        if cols.start % FP4_BLOCK or (cols.stop % FP4_BLOCK and cols.stop != spec.shape[1]):
            raise ValueError(f"{spec.name}: columns {cols.start} ... {cols.stop} of an FP4 weight cut a "
                             f"{FP4_BLOCK}-column scale group")
        return [(rows, slice(cols.start // 2, cols.stop // 2)),
                (rows, slice(cols.start // FP4_BLOCK, -(-cols.stop // FP4_BLOCK)))]
    return [index]


def stored_slice_bytes(spec: TensorSpec, index: tuple[slice, ...]) -> int:
    """Bytes of the file entries covering `index` of `spec`: its weight elements as stored and, for a
    quantized linear, the scales of every block it touches."""
    return sum(math.prod(s.stop - s.start for s in part) * element_bytes(dtype)
               for (_, _, dtype), part in zip(file_entries(spec), file_slices(spec, index)))


@dataclass(frozen=True)
class RankWeights:
    """The checkpoint bytes one rank holds as stored, by part."""

    blocks: int  # the rest of every block (MTP / DSpark ones too): attention, compressors, indexer, router, mHC, norms
    routed_experts: int
    shared_experts: int
    embedding_and_head: int  # embedding, output head, final norm and hc_head

    @property
    def total(self) -> int:
        return self.blocks + self.routed_experts + self.shared_experts + self.embedding_and_head


def rank_weights(cfg: V4Config, par: Parallelism, rank: int = 0, include_mtp: bool = True) -> RankWeights:
    """What `rank` holds of the checkpoint (with its MTP / DSpark drafter blocks when `include_mtp`)."""
    check_parallelism(cfg, par)
    parts = dict(blocks=0, routed_experts=0, shared_experts=0, embedding_and_head=0)
    for spec in checkpoint_tensors(cfg, include_mtp):
        index = shard(spec, par, rank, cfg)
        if index is None:
            continue
        if _ROUTED.search(spec.name):
            part = "routed_experts"
        elif _SHARED.search(spec.name):
            part = "shared_experts"
        elif spec.name.startswith(("layers.", "mtp.")):
            part = "blocks"
        else:
            part = "embedding_and_head"
        parts[part] += stored_slice_bytes(spec, index)
    return RankWeights(**parts)
