"""KV-cache layout of DeepSeek-V4: the one place that knows how many bytes everything takes (spec §5).

Per layer, a sequence keeps:

* a ring of the last `sliding_window` raw KV entries (every layer: a fixed cost per sequence);
* CSA (ratio 4): one compressed main entry and one indexer key per 4 tokens;
* HCA (ratio 128): one compressed main entry per 128 tokens;
* for CSA/HCA, the compressor's carried fp32 state (values and gate scores of the partial block and,
  for the overlapping CSA compressor, of the block before it): a fixed cost per sequence.

A main entry is the 512-d shared KV vector as stored: the non-rope dims in FP8 e4m3, the rope dims
in bf16, one E8M0 scale byte per 64 FP8 values, padded to 8 scale bytes (584 B for V4). An indexer
key is FP8 + one fp32 scale (132 B) or MXFP4: packed e2m1 + one E8M0 byte per 32 (68 B).
Adapters size their pages from `page_layout`; nothing else in the project restates these numbers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from v4_plugin.checkpoint.config import FP4_BLOCK, FP8_KV_BLOCK, LayerType, V4Config
from v4_plugin.checkpoint.schema import checkpoint_tensors, stored_bytes
from v4_plugin.checkpoint.sharding import Parallelism, RankWeights, rank_weights

SCALE_SECTION_ALIGN = 8  # the per-entry E8M0 scale bytes are padded to a multiple of 8
FP32_BYTES = 4
BF16_BYTES = 2


class IndexerCache(enum.Enum):
    """Storage format of CSA indexer keys."""

    FP8 = "fp8"  # e4m3 values + one fp32 scale (V3.2-compatible; vLLM's default)
    FP4 = "fp4"  # MXFP4: packed e2m1 + one E8M0 scale per 32 values (the format the model was trained in)


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def main_entry_bytes(cfg: V4Config) -> int:
    """Bytes of one window or compressed KV entry: FP8 non-rope dims + bf16 rope dims + scales (584 for V4)."""
    nope = cfg.nope_head_dim
    return nope + BF16_BYTES * cfg.qk_rope_head_dim + _align(nope // FP8_KV_BLOCK, SCALE_SECTION_ALIGN)


def indexer_entry_bytes(cfg: V4Config, fmt: IndexerCache) -> int:
    """Bytes of one indexer key: 132 (FP8 + fp32 scale) or 68 (MXFP4) for V4."""
    d = cfg.index_head_dim
    if fmt is IndexerCache.FP8:
        return d + FP32_BYTES
    return d // 2 + d // FP4_BLOCK


def compressor_state_bytes(cfg: V4Config, kind: LayerType, *, indexer: bool = False) -> int:
    """fp32 carried state of one compressor: (c*m) tokens x (c*e) channels x (value, score).

    c = 2 for the overlapping CSA compressor (the previous block is kept too), else 1;
    e = 512 (main) or index_head_dim (indexer). CSA main 64 KiB, CSA indexer 16 KiB, HCA 512 KiB.
    """
    if kind is LayerType.SWA:
        return 0
    c = 2 if kind is LayerType.CSA else 1
    e = cfg.index_head_dim if indexer else cfg.head_dim
    return (c * kind.ratio) * (c * e) * 2 * FP32_BYTES


@dataclass(frozen=True)
class LayerBytes:
    """Cache cost of one layer type for one sequence."""

    kind: LayerType
    per_token: float  # amortised bytes per token of context (compressed entries and indexer keys)
    window: int  # bytes of the raw-KV ring (fixed per sequence)
    state: int  # bytes of compressor state (fixed per sequence)

    @property
    def fixed(self) -> int:
        return self.window + self.state


def layer_bytes(cfg: V4Config, kind: LayerType, fmt: IndexerCache) -> LayerBytes:
    main = main_entry_bytes(cfg)
    window = cfg.sliding_window * main
    if kind is LayerType.SWA:
        return LayerBytes(kind, 0.0, window, 0)
    per_token = main / kind.ratio
    state = compressor_state_bytes(cfg, kind)
    if kind is LayerType.CSA:
        per_token += indexer_entry_bytes(cfg, fmt) / kind.ratio
        state += compressor_state_bytes(cfg, kind, indexer=True)
    return LayerBytes(kind, per_token, window, state)


def entries_at(cfg: V4Config, kind: LayerType, context: int) -> int:
    """Compressed entries a sequence of `context` tokens holds in one layer (complete blocks only)."""
    return 0 if kind is LayerType.SWA else context // kind.ratio


@dataclass(frozen=True)
class KVPlan:
    """Cache bytes of one model for one sequence."""

    model: str
    indexer_cache: str
    layer_counts: dict[str, int]  # main layers per type
    bytes_per_token: float  # amortised over context; fixed window/state excluded
    fixed_bytes_per_sequence: int  # windows + compressor state of the main layers
    draft_fixed_bytes_per_sequence: int  # windows of the MTP block / DSpark stages (SWA-only), reported apart
    draft_kind: str  # "MTP layers", "DSpark stages" or "" 
    entry_bytes: dict[str, int]
    context: int
    kv_bytes_at_context: int  # compressed entries + indexer keys for `context` tokens (exact block counts)
    weight_bytes: int | None  # checkpoint tensor bytes, when known

    @property
    def total_bytes_at_context(self) -> int:
        return self.kv_bytes_at_context + self.fixed_bytes_per_sequence

    def sequences_fitting(self, memory_bytes: int) -> int | None:
        """Whole `context`-token sequences that fit in `memory_bytes` after the weights."""
        if self.weight_bytes is None:
            return None
        return max(0, (memory_bytes - self.weight_bytes) // self.total_bytes_at_context)

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        out["total_bytes_at_context"] = self.total_bytes_at_context
        return out


def plan(cfg: V4Config, *, context: int, indexer_cache: IndexerCache = IndexerCache.FP8,
         name: str = "deepseek-v4", weight_bytes: int | None = None) -> KVPlan:
    """The KV plan of a V4 model at a context length."""
    costs = {kind: layer_bytes(cfg, kind, indexer_cache) for kind in LayerType}
    kinds = cfg.layer_types
    main, idx = main_entry_bytes(cfg), indexer_entry_bytes(cfg, indexer_cache)
    kv_at = sum(entries_at(cfg, k, context) * (main + (idx if k is LayerType.CSA else 0)) for k in kinds)
    n_draft = len(cfg.compress_ratios) - cfg.num_hidden_layers
    return KVPlan(
        model=name,
        indexer_cache=indexer_cache.value,
        layer_counts={k.name: cfg.count(k) for k in LayerType},
        bytes_per_token=sum(costs[k].per_token for k in kinds),
        fixed_bytes_per_sequence=sum(costs[k].fixed for k in kinds),
        draft_fixed_bytes_per_sequence=n_draft * costs[LayerType.SWA].window,
        draft_kind="" if not n_draft else "DSpark stages" if cfg.dspark is not None else "MTP layers",
        entry_bytes={"main": main, "indexer": idx},
        context=context,
        kv_bytes_at_context=kv_at,
        weight_bytes=weight_bytes,
    )


@dataclass(frozen=True)
class RankPlan:
    """One rank of a multi-rank deployment: its share of the weights as stored and the KV it can hold in
    `memory_bytes`. V4 attention has one KV head, so every attention tensor-parallel rank holds the whole
    KV of its replica's sequences: KV bytes per token do not shrink with tensor parallelism."""

    parallelism: Parallelism
    weights: RankWeights
    kv: KVPlan  # one sequence of `kv.context` tokens
    memory_bytes: int | None  # for weights and KV, per rank

    @property
    def kv_budget_bytes(self) -> int | None:
        return None if self.memory_bytes is None else max(0, self.memory_bytes - self.weights.total)

    @property
    def kv_tokens(self) -> int | None:
        """Tokens of KV the budget holds at the amortised bytes per token (windows and states excluded)."""
        budget = self.kv_budget_bytes
        return None if budget is None else int(budget // self.kv.bytes_per_token)

    @property
    def sequences_per_replica(self) -> int | None:
        """Whole `kv.context`-token sequences (windows and states included) one attention replica holds."""
        budget = self.kv_budget_bytes
        return None if budget is None else budget // self.kv.total_bytes_at_context

    @property
    def sequences(self) -> int | None:
        """Over every data-parallel attention replica."""
        n = self.sequences_per_replica
        return None if n is None else n * self.parallelism.attn_dp

    def to_json(self) -> dict:
        par = self.parallelism
        return {"tensor_parallel": par.attn_tp, "data_parallel": par.attn_dp, "expert_parallel": par.expert_parallel,
                "weight_bytes_per_rank": self.weights.total, "weight_bytes_by_part": dict(self.weights.__dict__),
                "kv_bytes_per_token": self.kv.bytes_per_token, "context": self.kv.context,
                "memory_bytes_per_rank": self.memory_bytes, "kv_budget_bytes_per_rank": self.kv_budget_bytes,
                "kv_tokens_per_rank": self.kv_tokens, "sequences_per_replica": self.sequences_per_replica,
                "sequences": self.sequences}


def plan_ranks(cfg: V4Config, par: Parallelism, *, context: int, indexer_cache: IndexerCache = IndexerCache.FP8,
               memory_bytes: int | None = None, name: str = "deepseek-v4") -> RankPlan:
    """The plan of rank 0 of `par` (every rank holds the same bytes when the sizes divide, as
    `check_parallelism` requires)."""
    weights = rank_weights(cfg, par)
    kv = plan(cfg, context=context, indexer_cache=indexer_cache, name=name, weight_bytes=weights.total)
    return RankPlan(par, weights, kv, memory_bytes)


def checkpoint_bytes(cfg: V4Config, include_mtp: bool = True) -> int:
    """Bytes of every tensor of the checkpoint, as stored (Flash: 159,609,485,896)."""
    return sum(stored_bytes(spec) for spec in checkpoint_tensors(cfg, include_mtp))


# ---- DeepSeek-V3.2, for comparison -------------------------------------------------------------
@dataclass(frozen=True)
class V32Dims:
    """The V3.2 dimensions its cache depends on: MLA latent + rope key per token in every layer."""

    num_layers: int = 61
    kv_lora_rank: int = 512  # FP8, one fp32 scale per 128
    qk_rope_head_dim: int = 64  # bf16
    index_head_dim: int = 128  # FP8 + one fp32 scale


def plan_v32(*, context: int, dims: V32Dims = V32Dims()) -> KVPlan:
    """V3.2's cache: every layer stores a 656-B MLA entry and a 132-B indexer key per token."""
    mla = dims.kv_lora_rank + dims.kv_lora_rank // 128 * FP32_BYTES + BF16_BYTES * dims.qk_rope_head_dim
    idx = dims.index_head_dim + FP32_BYTES
    per_token = dims.num_layers * (mla + idx)
    return KVPlan(
        model="deepseek-v3.2", indexer_cache="fp8", layer_counts={"MLA": dims.num_layers},
        bytes_per_token=float(per_token), fixed_bytes_per_sequence=0, draft_fixed_bytes_per_sequence=0, draft_kind="",
        entry_bytes={"main": mla, "indexer": idx}, context=context, kv_bytes_at_context=per_token * context,
        weight_bytes=None,
    )


# ---- pages ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachePage:
    """One paged cache of one layer, for a logical block of `block_tokens` tokens."""

    name: str  # "window", "compressed", "indexer", "compressor_state", "indexer_compressor_state"
    entries_per_block: int  # entries stored per logical block
    entry_bytes: int
    page_bytes: int  # entries_per_block * entry_bytes rounded up to `alignment`


def page_layout(cfg: V4Config, kind: LayerType, block_tokens: int, *,
                indexer_cache: IndexerCache = IndexerCache.FP8, alignment: int = 1) -> list[CachePage]:
    """The length-proportional caches of one layer type, paged by logical blocks of `block_tokens` tokens.

    `block_tokens` must be a multiple of the layer's ratio, so that every block holds whole entries.
    The window and compressor state are fixed-size per sequence and paged by the adapter's own rules.
    """
    if kind is LayerType.SWA:
        return []
    if block_tokens % kind.ratio:
        raise ValueError(f"block of {block_tokens} tokens does not hold whole ratio-{kind.ratio} entries")
    n = block_tokens // kind.ratio

    def page(name: str, entry: int) -> CachePage:
        return CachePage(name, n, entry, _align(n * entry, alignment))

    pages = [page("compressed", main_entry_bytes(cfg))]
    if kind is LayerType.CSA:
        pages.append(page("indexer", indexer_entry_bytes(cfg, indexer_cache)))
    return pages
