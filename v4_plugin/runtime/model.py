"""The DeepSeek-V4 model (`V4Model`): the model both servers run, and in its whole-sequence form the
oracle every kernel and backend is tested against.

Readable and eager. Two forms of attention share the ops in `v4_plugin.runtime.ops`:

* `forward(ids)`: the whole sequence from position 0 at once (the prefill form: banded window
  indices, every complete compressed block pooled in one go); the oracle;
* `run(ids, plan, caches, codec)`: one step of a batch of sequences over paged caches
  (`v4_plugin.runtime.batch`), every sequence in each op: what both servers run (`runtime.paged`), and
  `step(ids, cache)`, the next chunk of one sequence, over a `SequenceCache` (one sequence in one
  block). `Block.attention` is the one attention of both.

Hot ops go through `dispatch` (Triton kernels for CUDA tensors, the torch ops otherwise; set
V4_PLUGIN_KERNELS=torch for the torch ops alone on a GPU). Weights are the checkpoint tensors under
their official names (spec §9): dequantized, or the FP8/FP4 linears' file entries, which the GEMM
kernels read as they are (`Weights`). The quantization
the model was trained with is simulated (FP8 activations in FP8/FP4 linears, FP8 KV entries,
Hadamard + FP4 indexer q/k), each switchable through `QuantSim` for exact comparisons against
implementations that skip it.

Tensor parallelism (`v4_plugin.checkpoint.sharding`): built over one rank's slices of the checkpoint
(`load_checkpoint(..., parallelism=, rank=)`) with the `Collectives` of its tensor-parallel group, a
`V4Model` computes its query heads and output groups, its routed experts (or its slice of each) and its
slice of the shared expert and of the vocabulary, and makes them whole with one all-reduce after `wo_b`,
one after the MoE, one after the embedding lookup and one all-gather of the logits (`runtime.parallel`).
Everything else (`wq_a`, `wkv`, compressors, indexer, router, mHC, norms, the KV cache) is replicated.
On one rank (`SINGLE`) nothing changes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from v4_plugin.checkpoint.loader import dequantize_linear, load_checkpoint
from v4_plugin.checkpoint.config import LayerType, V4Config, load_config
from v4_plugin.checkpoint.quant import QuantSim
from v4_plugin.checkpoint.sharding import Parallelism, rank_range
from v4_plugin.cache.formats import COMPRESSED_CACHES, EXACT, KVStorage, cache_entry
from v4_plugin.runtime import dispatch
from v4_plugin.runtime.batch import BatchPlan, KVCodec, LayerCaches, PagedCache
from v4_plugin.runtime.ops import attention as attn_ops
from v4_plugin.runtime.ops import compressor as comp_ops
from v4_plugin.runtime.ops import indexer as index_ops
from v4_plugin.runtime.ops.linear import LinearWeight, linear
from v4_plugin.runtime.ops.invariant import times_weight
from v4_plugin.runtime.ops.moe import ExpertWeights, MoEWeights, route
from v4_plugin.runtime.ops.norm import rms_norm
from v4_plugin.runtime.ops.rope import Rope
from v4_plugin.runtime.parallel import SINGLE, Collectives


class Weights:
    """Read-only view of the checkpoint tensors by official name, cast to the compute dtype on demand.

    The tensors are `load_checkpoint`'s: dequantized, or with `keep_quantized` the FP8 / FP4 linears as
    their file entries `<name>.weight` + `<name>.scale`, held as stored: the GEMM kernels read them as they
    are (`linear`, `moe`), the torch ops dequantize a tile or an expert at a time, and nothing keeps a
    dequantized copy (`held_bytes` is what the model holds).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype):
        self._tensors, self.dtype = tensors, dtype
        self._stacks: dict[str, tuple[torch.Tensor, ...]] = {}  # shared expert prefix -> routed FP4 stack
        self._held: dict[str, range] = {}  # MoE prefix -> the routed experts present (a rank's range under EP)

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"checkpoint tensor '{name}' is missing") from None

    def _scale(self, name: str) -> torch.Tensor | None:
        """The E8M0 scales of `name` (`<linear>.weight`) if that linear is kept quantized, else None."""
        return self._tensors.get(name.removesuffix(".weight") + ".scale") if name.endswith(".weight") else None

    def __call__(self, name: str, *, keep_dtype: bool = False) -> torch.Tensor:
        """Tensor `name` in the compute dtype (or as held, with `keep_dtype`); a linear kept as stored comes
        dequantized, as a transient the caller drops."""
        t = self._get(name)
        scale = self._scale(name)
        if scale is not None:
            return dequantize_linear(t, scale, self.dtype)
        return t if keep_dtype or not t.is_floating_point() else t.to(self.dtype)

    def held_bytes(self) -> int:
        """Bytes of every tensor the model holds (each storage once): its share of the checkpoint as loaded,
        and the expert stacks built from it where they are not views of it."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for tensors in ([*self._tensors.values()], *self._stacks.values()) for t in tensors}
        return sum(storages.values())

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> torch.Size:
        """The shape of tensor `name` as held (a rank's slice under tensor parallelism), without decoding it."""
        return self._get(name).shape

    def linear(self, name: str) -> LinearWeight:
        """The linear `name` (`<linear>.weight`) for `dispatch.linear`: with its FP8 entries if kept so."""
        weight, scale = self._get(name), self._scale(name)
        fp8 = (weight, scale) if scale is not None and weight.dtype == torch.float8_e4m3fn else None
        return LinearWeight(lambda: self(name), fp8)

    def moe(self, prefix: str, n_routed: int) -> MoEWeights:
        """The experts `{prefix}.experts.{0 ... n_routed-1}` held here (all, or under expert parallelism a
        contiguous range of them) and `{prefix}.shared_experts` for `dispatch.moe`: packed when the routed
        experts are kept in FP4 (or FP8, `-Base`) and the shared one in FP8."""
        held = self._held_experts(prefix, n_routed)
        routed, shared = [f"{prefix}.experts.{e}" for e in held], f"{prefix}.shared_experts"
        w1 = self._get(f"{routed[0]}.w1.weight")
        packed = w1.dtype in (torch.int8, torch.float8_e4m3fn) and self._scale(f"{shared}.w1.weight") is not None
        return MoEWeights(lambda: (_Lazy(len(routed), lambda i: self._expert(routed[i])), self._expert(shared)),
                          (lambda: self._packed_experts(routed, shared)) if packed else None, held.start)

    def _held_experts(self, prefix: str, n_routed: int) -> range:
        if prefix not in self._held:
            ids = [e for e in range(n_routed) if f"{prefix}.experts.{e}.w1.weight" in self._tensors] or [0]
            if ids != list(range(ids[0], ids[-1] + 1)):
                raise ValueError(f"{prefix}: the routed experts held, {ids}, are not one contiguous range")
            self._held[prefix] = range(ids[0], ids[-1] + 1)
        return self._held[prefix]

    def _expert(self, prefix: str) -> ExpertWeights:
        return ExpertWeights(*(self(f"{prefix}.w{i}.weight") for i in (1, 2, 3)))

    def _entries(self, prefix: str) -> tuple[torch.Tensor, ...]:
        """An expert's file entries (w1, w1_scale, w2, w2_scale, w3, w3_scale)."""
        return tuple(self._get(f"{prefix}.w{i}.{part}") for i in (1, 2, 3) for part in ("weight", "scale"))

    def _packed_experts(self, routed: list[str],
                        shared: str) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """`MoEWeights.packed`: the routed experts' entries stacked over E (built once per layer), the shared one's."""
        if shared not in self._stacks:
            entries = [self._entries(p) for p in routed]
            self._stacks[shared] = tuple(_stacked([e[i] for e in entries]) for i in range(6))
        return self._stacks[shared], self._entries(shared)


class _Lazy(Sequence):
    """A sequence whose item i is made when it is read (the routed experts a step uses, dequantized then)."""

    def __init__(self, length: int, item: Callable[[int], ExpertWeights]):
        self._length, self._item = length, item

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> ExpertWeights:
        if not 0 <= i < self._length:
            raise IndexError(i)
        return self._item(i)


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack(parts), without a copy when the parts already lie back to back in one storage (the
    loader's expert stacks)."""
    first = parts[0]
    size, storage = first.numel() * first.element_size(), first.untyped_storage().data_ptr()
    if size and all(p.is_contiguous() and p.untyped_storage().data_ptr() == storage
                    and p.data_ptr() == first.data_ptr() + e * size for e, p in enumerate(parts)):
        return first.as_strided((len(parts), *first.shape), (first.numel(), *first.stride()))
    return torch.stack(parts)


class SequenceCache:
    """Everything `V4Model.step` carries for one sequence between calls: the paged caches of every layer
    (`runtime.batch`) as one sequence in one block, grown as the sequence grows.

    Every entry is indexed by position (or compressed-entry number), so keeping fewer tokens is only a
    matter of the count: `truncate(n)` drops the rest (rejected drafts), and the next step writes over them.
    """

    def __init__(self, cfg: V4Config, kinds: Sequence[LayerType], dtype: torch.dtype, device: torch.device | str):
        self.cfg, self.kinds, self.dtype, self.device = cfg, tuple(kinds), dtype, torch.device(device)
        self.layers: list[LayerCaches] = [self._allocate(kind, 0) for kind in self.kinds]
        self.num_tokens = 0

    def _allocate(self, kind: LayerType, capacity: int) -> LayerCaches:
        table = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        caches = {}
        for name, (width, dtype) in cache_entry(self.cfg, kind, EXACT, self.dtype).items():
            rows = capacity // kind.ratio if name in COMPRESSED_CACHES else capacity
            caches[name] = PagedCache(torch.zeros(1, rows, width, dtype=dtype, device=self.device), table)
        return LayerCaches(**caches)

    def reserve(self, num_tokens: int) -> None:
        """Make room for positions 0 ... num_tokens - 1 (doubling, so a long generation copies O(log n) times)."""
        capacity = self.layers[0].window.data.shape[1] if self.layers else num_tokens
        if num_tokens <= capacity:
            return
        capacity = max(num_tokens, 2 * capacity, 256)
        grown = [self._allocate(kind, capacity) for kind in self.kinds]
        for old, new in zip(self.layers, grown):
            for name in vars(old):
                if getattr(old, name) is not None:
                    held = getattr(old, name).data
                    getattr(new, name).data[:, : held.shape[1]] = held
        self.layers = grown

    def truncate(self, num_tokens: int) -> None:
        """Keep the first `num_tokens` tokens: the cache becomes exactly what stepping only those leaves."""
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(f"SequenceCache.truncate: can keep 0 ... {self.num_tokens} tokens, not {num_tokens}")
        self.num_tokens = num_tokens

    def plan(self, n: int) -> BatchPlan:
        """The `BatchPlan` of the next n tokens (reserving room for them)."""
        self.reserve(self.num_tokens + n)
        positions = torch.arange(self.num_tokens, self.num_tokens + n, device=self.device)
        return BatchPlan(positions, torch.zeros_like(positions))


@dataclass
class ModelOutput:
    logits: torch.Tensor  # fp32 [T, vocab]
    streams: torch.Tensor  # [T, hc, D]: the residual streams before hc_head (the MTP input)
    # layer id -> [T, hc, D]: the streams that main layer outputs, for the layers asked for with `capture`
    captured: dict[int, torch.Tensor] = field(default_factory=dict)


class Block:
    """One decoder block: mHC around attention and MoE (spec §3).

    Over a rank's slices (`w`) with the `collectives` of its tensor-parallel group: its `heads` query heads
    in `groups` output groups, one all-reduce after `wo_b` and one after the MoE (see the module docstring)."""

    def __init__(self, cfg: V4Config, w: Weights, prefix: str, layer_id: int, quant: QuantSim,
                 collectives: Collectives = SINGLE):
        self.cfg, self.w, self.p, self.layer_id, self.quant = cfg, w, prefix, layer_id, quant
        self.comm = collectives
        self.kind = cfg.layer_type(layer_id)
        self.ratio = self.kind.ratio
        self.rope = Rope.for_layer(cfg, self.kind)
        self.act_q = quant.activations and cfg.quantized

    # Read from the weights on first use (a model may be built before its drafter blocks' tensors are loaded).
    @functools.cached_property
    def heads(self) -> int:
        """The query heads this rank computes: num_attention_heads / the tensor-parallel size."""
        return self._local("attn.attn_sink", 1, "num_attention_heads")

    @functools.cached_property
    def groups(self) -> int:
        """The output groups (`wo_a`) this rank computes: o_groups / the tensor-parallel size."""
        return self._local("attn.wo_a.weight", self.cfg.o_lora_rank, "o_groups")

    def _local(self, name: str, rows_each: int, field: str) -> int:
        held, total = self.w.shape(f"{self.p}.{name}")[0] // rows_each, getattr(self.cfg, field)
        if held * self.comm.size != total:
            raise ValueError(
                f"{self.p}: its weights hold {held} of the {total} {field} ({name}), but its collectives span "
                f"{self.comm.size} rank(s): build a tensor-parallel model over one rank's slices "
                "(load_checkpoint(..., parallelism=, rank=)) with the collectives of that rank's group")
        return held

    # ---- pieces (also DSpark's) -----------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return dispatch.linear(x, self.w.linear(f"{self.p}.{name}.weight"), self.act_q)

    def query(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (c_q [T, R_q], q [T, H, d]): low-rank query, weightless per-head norm, RoPE."""
        cfg = self.cfg
        c_q = rms_norm(self._linear(x, "attn.wq_a"), self.w(f"{self.p}.attn.q_norm.weight"), cfg.rms_norm_eps)
        q = self._linear(c_q, "attn.wq_b").unflatten(-1, (self.heads, cfg.head_dim))
        q = rms_norm(q, None, cfg.rms_norm_eps)
        return c_q, self.rope.rotate(q, positions)

    def window_kv(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> raw KV entries [T, d]: normed, rotated at t, rounded as the cache record stores them."""
        cfg = self.cfg
        kv = rms_norm(self._linear(x, "attn.wkv"), self.w(f"{self.p}.attn.kv_norm.weight"), cfg.rms_norm_eps)
        kv = self.rope.rotate(kv, positions)
        return comp_ops.simulate_kv_storage(kv, cfg.qk_rope_head_dim) if self.quant.kv_cache else kv

    def output(self, o: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Attention output o [T, H, d] -> [T, D]: de-rotation and the grouped low-rank projection (this
        rank's heads' share, summed over the tensor-parallel ranks)."""
        o = self.rope.rotate(o, positions, inverse=True)
        wo_a = self.w.linear(f"{self.p}.attn.wo_a.weight")
        if wo_a.fp8 is None:
            z = attn_ops.grouped_output_projection(o, wo_a.dense(), self.groups)
        else:
            z = attn_ops.grouped_output_projection_stored(o, *wo_a.fp8, self.groups)
        return self.comm.all_reduce(self._linear(z, "attn.wo_b"))

    def attend(self, q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Sparse attention of q [T, H, d] over entries kv [N, d] (indices [T, S], -1 = none), then `output`."""
        return self.output(dispatch.sparse_attention(q, kv, indices, self.sink(), self.cfg.head_dim**-0.5), positions)

    def sink(self) -> torch.Tensor:
        return self.w(f"{self.p}.attn.attn_sink").float()

    def finish_args(self, indexer: bool) -> dict:
        """The keywords of `ops.compressor.finish_entries` for this layer's main or indexer compressor."""
        prefix = f"{self.p}.attn.indexer.compressor" if indexer else f"{self.p}.attn.compressor"
        return dict(ratio=self.ratio, norm_weight=self.w(f"{prefix}.norm.weight"), eps=self.cfg.rms_norm_eps,
                    rope=self.rope, dtype=self.w.dtype, indexer=indexer,
                    simulate_quant=self.quant.indexer if indexer else self.quant.kv_cache)

    def _projections(self, x: torch.Tensor, indexer: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prefix = f"{self.p}.attn.indexer.compressor" if indexer else f"{self.p}.attn.compressor"
        kv, gate = comp_ops.project(x, self.w(f"{prefix}.wkv.weight"), self.w(f"{prefix}.wgate.weight"))
        return kv, gate, self.w(f"{prefix}.ape").float()

    def _index_query(self, x: torch.Tensor, c_q: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The indexer's queries [T, Hi, di] and head weights fp32 [T, Hi] (scaled by di^-1/2 * Hi^-1/2)."""
        cfg = self.cfg
        q = self._linear(c_q, "attn.indexer.wq_b").unflatten(-1, (cfg.index_n_heads, cfg.index_head_dim))
        q = index_ops.index_queries(q, positions, self.rope, self.quant.indexer)
        head_w = linear(x, self.w(f"{self.p}.attn.indexer.weights_proj.weight"), False).float()
        return q, head_w * (cfg.index_head_dim**-0.5 * cfg.index_n_heads**-0.5)

    def _visible(self, positions: torch.Tensor, num_entries: int) -> torch.Tensor:
        """Every compressed entry a query sees (HCA), as entry numbers [T, num_entries] (-1 = not yet)."""
        entries = torch.arange(num_entries, device=positions.device)
        visible = entries[None, :] < attn_ops.visible_entries(positions, self.ratio)[:, None]
        return torch.where(visible, entries[None, :], -1)

    # ---- attention, whole sequence (the oracle) ------------------------------------------------------
    def attention_full(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] at positions 0 ... T-1 -> [T, D]."""
        t = x.shape[0]
        positions = torch.arange(t, device=x.device)
        c_q, q = self.query(x, positions)
        kv = self.window_kv(x, positions)
        indices = attn_ops.window_positions(positions, self.cfg.sliding_window)
        if self.kind is not LayerType.SWA:
            kv_c, gate, ape = self._projections(x, indexer=False)
            pooled = comp_ops.compress_sequence(kv_c, gate, ape, overlap=self.kind is LayerType.CSA)
            block_ids = torch.arange(pooled.shape[0], device=x.device)
            entries = comp_ops.finish_entries(pooled, block_ids, **self.finish_args(False))
            if self.kind is LayerType.CSA:
                k_i, g_i, ape_i = self._projections(x, indexer=True)
                keys = comp_ops.finish_entries(comp_ops.compress_sequence(k_i, g_i, ape_i, overlap=True), block_ids,
                                               **self.finish_args(True))
                scores = dispatch.index_scores(*self._index_query(x, c_q, positions), keys)
                visible = attn_ops.visible_entries(positions, self.ratio)
                chosen = dispatch.select_topk(scores, visible, self.cfg.index_topk)
            else:
                chosen = self._visible(positions, entries.shape[0])
            indices = torch.cat((indices, torch.where(chosen >= 0, chosen + t, chosen)), dim=1)
            kv = torch.cat((kv, entries))
        return self.attend(q, kv, indices, positions)

    # ---- attention, one step of a batch over paged caches --------------------------------------------
    def attention(self, x: torch.Tensor, plan: BatchPlan, caches: LayerCaches, codec: KVCodec) -> torch.Tensor:
        """x [T, D] of a step's tokens (`plan`) -> [T, D]. Writes the step's window entries, compressor
        rows and the compressed entries and indexer keys they complete, then attends over the window and
        compressed caches where they lie: every sequence of the batch in each op."""
        pos, rows = plan.positions, plan.seq_ids
        c_q, q = self.query(x, pos)
        codec.store_main(caches.window, rows, pos, self.window_kv(x, pos))
        window_slots = caches.window.slots(rows[:, None], attn_ops.window_positions(pos, self.cfg.sliding_window))
        compressed = None
        if self.kind is not LayerType.SWA:
            self._emit(x, plan, caches.state, caches.compressed, False, codec)
            if self.kind is LayerType.CSA:
                self._emit(x, plan, caches.index_state, caches.index_keys, True, codec)
                chosen = self._index_paged(x, c_q, plan, caches.index_keys, codec)
            else:
                chosen = self._visible(pos, plan.layout.max_len // self.ratio)
            compressed = (caches.compressed.flat(), caches.compressed.slots(rows[:, None], chosen))
        o = dispatch.attention_paged(q, (caches.window.flat(), window_slots), compressed, self.sink(),
                                     self.cfg.head_dim**-0.5, self.cfg, codec.fmt.kv is KVStorage.FP8)
        return self.output(o, pos)

    def _emit(self, x: torch.Tensor, plan: BatchPlan, state: PagedCache, out: PagedCache, indexer: bool,
              codec: KVCodec) -> None:
        """Write this step's compressor rows, then pool and store every block they complete."""
        m, overlap = self.ratio, self.kind is LayerType.CSA
        kv, gate, ape = self._projections(x, indexer)
        pos, rows = plan.positions, plan.seq_ids
        state.write(rows, pos, torch.cat((kv, gate + ape[pos % m]), dim=1))
        done = plan.completing(m)
        rows_j, block_j = rows[done], pos[done] // m
        offsets = torch.arange(m, device=pos.device)
        block = state.read(rows_j[:, None], block_j[:, None] * m + offsets).float()  # [n, m, 2*c*e]
        cur_kv, cur_score = block.chunk(2, dim=-1)
        before_kv = before_score = None
        if overlap:
            has_prev = (block_j > 0)[:, None, None]
            prev = state.read(rows_j[:, None], ((block_j - 1).clamp(min=0) * m)[:, None] + offsets).float()
            prev_kv, prev_score = prev.chunk(2, dim=-1)
            before_kv = torch.where(has_prev, prev_kv, torch.zeros_like(prev_kv))
            before_score = torch.where(has_prev, prev_score, torch.full_like(prev_score, float("-inf")))
        codec.store_pooled(out, rows_j, block_j, (cur_kv, cur_score, overlap, before_kv, before_score),
                           self.finish_args(indexer))

    def _index_paged(self, x: torch.Tensor, c_q: torch.Tensor, plan: BatchPlan, keys: PagedCache,
                     codec: KVCodec) -> torch.Tensor:
        """CSA selection over each sequence's cached indexer keys: entry numbers [T, min(topk, N)], -1 = none."""
        layout, pos = plan.layout, plan.positions
        entries = torch.arange(layout.max_len // self.ratio, device=pos.device)
        visible = attn_ops.visible_entries(pos, self.ratio)
        q_i, head_w = self._index_query(x, c_q, pos)
        scores = dispatch.index_scores_paged(q_i, head_w, keys.flat(), keys.slots(layout.rows[:, None], entries[None]),
                                             layout.query_start, layout.token_seq, visible, self.cfg,
                                             codec.fmt.indexer)
        return dispatch.select_topk(scores, visible, self.cfg.index_topk)

    # ---- the block -------------------------------------------------------------------------------
    def _hc_pre(self, x: torch.Tensor, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        return dispatch.hc_pre(
            x, self.w(f"{self.p}.hc_{site}_fn", keep_dtype=True), self.w(f"{self.p}.hc_{site}_scale", keep_dtype=True),
            self.w(f"{self.p}.hc_{site}_base", keep_dtype=True),
            norm_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps, sinkhorn_iters=cfg.hc_sinkhorn_iters,
        )

    def _moe(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        cfg, p = self.cfg, f"{self.p}.ffn"
        hashed = self.layer_id < cfg.num_hidden_layers and cfg.is_hash_layer(self.layer_id)
        weights, ids = route(
            x, self.w(f"{p}.gate.weight"), top_k=cfg.num_experts_per_tok, scaling=cfg.routed_scaling_factor,
            bias=None if hashed else self.w(f"{p}.gate.bias", keep_dtype=True),
            tid2eid=self.w(f"{p}.gate.tid2eid") if hashed else None, token_ids=token_ids,
        )
        # Routing is replicated and global; the rank adds its experts (or expert slices) and shared-expert slice.
        y = dispatch.moe(x, weights, ids, self.w.moe(p, cfg.n_routed_experts), limit=cfg.swiglu_limit,
                         quantize_input=self.act_q)
        return self.comm.all_reduce(y)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor,
                attention: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Streams x [T, hc, D] -> [T, hc, D], with `attention` mapping the normed input [T, D] to [T, D]
        (`attention_full`, or `attention` over a step's caches)."""
        eps = self.cfg.rms_norm_eps
        u, post, comb = self._hc_pre(x, "attn")
        u = rms_norm(u, self.w(f"{self.p}.attn_norm.weight"), eps)
        a = attention(u)
        x = dispatch.hc_post(a, x, post, comb)
        v, post, comb = self._hc_pre(x, "ffn")
        f = self._moe(rms_norm(v, self.w(f"{self.p}.ffn_norm.weight"), eps), token_ids)
        return dispatch.hc_post(f, x, post, comb)


class V4Model:
    """DeepSeek-V4 main model (and its MTP block) over dequantized checkpoint tensors (or one rank's slices of
    them, with the `collectives` of its tensor-parallel group: see the module docstring)."""

    def __init__(self, cfg: V4Config, tensors: Mapping[str, torch.Tensor], *,
                 dtype: torch.dtype = torch.float32, quant: QuantSim = QuantSim(),
                 collectives: Collectives = SINGLE):
        self.cfg, self.dtype, self.quant, self.collectives = cfg, dtype, quant, collectives
        self.w = Weights(tensors, dtype)
        self.blocks = [Block(cfg, self.w, f"layers.{i}", i, quant, collectives) for i in range(cfg.num_hidden_layers)]
        n_mtp = cfg.num_nextn_predict_layers if cfg.has_mtp else 0
        self.mtp_blocks = [Block(cfg, self.w, f"mtp.{k}", cfg.num_hidden_layers + k, quant, collectives)
                           for k in range(n_mtp)]

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                        quant: QuantSim = QuantSim(), include_mtp: bool = False,
                        collectives: Collectives = SINGLE, expert_parallel: bool = False) -> "V4Model":
        """The model of a checkpoint directory (config.json, safetensors) through the core loader; its drafter
        blocks (mtp.*) with `include_mtp`. With collectives over several ranks: rank `collectives.rank`'s
        slices under `Parallelism(collectives.size, 1, expert_parallel)`."""
        cfg = load_config(model_dir)
        par = Parallelism(collectives.size, 1, expert_parallel) if collectives.size > 1 else None
        tensors = load_checkpoint(model_dir, cfg, dtype=dtype, include_mtp=include_mtp, parallelism=par,
                                  rank=collectives.rank)
        return cls(cfg, tensors, dtype=dtype, quant=quant, collectives=collectives)

    def _vocab_start(self) -> int:
        """The first vocabulary row of this rank's embedding and head slices (`sharding.shard`: ceil-sized)."""
        comm = self.collectives
        return rank_range(self.cfg.vocab_size, comm.size, comm.rank)[0]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """int64 [T] -> embeddings [T, D] in the model dtype (vocabulary-parallel: each rank looks up the ids
        of its rows, zeros elsewhere, and the all-reduce sums them)."""
        table = self.w("embed.weight")
        if self.collectives.size == 1:
            return table[token_ids]
        local = token_ids - self._vocab_start()
        held = (local >= 0) & (local < table.shape[0])
        rows = table[local.clamp(0, table.shape[0] - 1)]
        return self.collectives.all_reduce(torch.where(held.unsqueeze(-1), rows, torch.zeros_like(rows)))

    def head_hidden(self, streams: torch.Tensor, prefix: str) -> torch.Tensor:
        """Streams [T, hc, D] -> hc_head output [T, D], before the final norm (`prefix`: "" or a draft block's)."""
        cfg = self.cfg
        return dispatch.hc_head(
            streams, self.w(f"{prefix}hc_head_fn", keep_dtype=True), self.w(f"{prefix}hc_head_scale", keep_dtype=True),
            self.w(f"{prefix}hc_head_base", keep_dtype=True), norm_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps,
        )

    def head_logits(self, hidden: torch.Tensor, prefix: str) -> torch.Tensor:
        """hc_head output [T, D] -> fp32 logits [T, vocab] through `{prefix}norm` and the shared head."""
        h = rms_norm(hidden, self.w(f"{prefix}norm.weight"), self.cfg.rms_norm_eps)
        logits = times_weight(h.float(), self.w("head.weight"))
        comm, vocab = self.collectives, self.cfg.vocab_size
        if comm.size == 1:
            return logits
        width = rank_range(vocab, comm.size, 0)[1]  # every rank's slice width; the last one may hold fewer rows
        logits = torch.nn.functional.pad(logits, (0, width - logits.shape[-1]))
        return comm.all_gather(logits, dim=-1)[..., :vocab]

    def logits(self, streams: torch.Tensor, prefix: str = "") -> torch.Tensor:
        """Pre-hc_head streams [T, hc, D] -> fp32 logits [T, vocab]: the main head (`prefix` "") or a
        draft block's own hc_head and norm before the shared head (`prefix` "mtp.{k}.")."""
        return self.head_logits(self.head_hidden(streams, prefix), prefix)

    def input_streams(self, token_ids: torch.Tensor) -> torch.Tensor:
        """int64 [T] -> the residual streams [T, hc, D] entering the first block (the embedding, hc times)."""
        return self.embed(token_ids).unsqueeze(1).repeat(1, self.cfg.hc_mult, 1)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, capture: Sequence[int] = ()) -> ModelOutput:
        """Whole sequence from position 0: token_ids int64 [T] -> logits fp32 [T, vocab].

        `capture`: main layer ids whose output streams to return in `ModelOutput.captured`."""
        x, captured = self.input_streams(token_ids), {}
        for i, block in enumerate(self.blocks):
            x = block.forward(x, token_ids, block.attention_full)
            if i in capture:
                captured[i] = x
        return ModelOutput(self.logits(x, ""), x, captured)

    def run(self, token_ids: torch.Tensor, plan: BatchPlan, caches: Sequence[LayerCaches], codec: KVCodec,
            capture: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One step of a batch (`plan`) over paged caches (one `LayerCaches` per main layer), up to the head:
        the last layer's pre-hc_head streams [T, hc, D] and the output streams of the layers in `capture`."""
        x, captured = self.input_streams(token_ids), {}
        for i, (block, layer) in enumerate(zip(self.blocks, caches)):
            x = block.forward(x, token_ids, lambda u, b=block, c=layer: b.attention(u, plan, c, codec))
            if i in capture:
                captured[i] = x
        return x, captured

    def run_mtp(self, streams: torch.Tensor, next_ids: torch.Tensor, plan: BatchPlan, caches: LayerCaches,
                codec: KVCodec, depth: int = 0) -> torch.Tensor:
        """MTP block `depth` (spec §10) over a step of a batch: row i reads the pre-hc_head streams [T, hc, D]
        at plan.positions[i] and `next_ids[i]`, the token one position later. Returns the MTP's pre-hc_head
        streams [T, hc, D]; `logits(out, f"mtp.{depth}.")` gives the draft logits two positions ahead."""
        self.require_mtp()
        block = self.mtp_blocks[depth]
        return block.forward(self.mtp_input(streams, next_ids, depth), next_ids,
                             lambda u: block.attention(u, plan, caches, codec))

    def new_cache(self, device: torch.device | str = "cpu") -> SequenceCache:
        """The caches of the main layers for one sequence (`step`)."""
        return SequenceCache(self.cfg, [b.kind for b in self.blocks], self.dtype, device)

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor, cache: SequenceCache, capture: Sequence[int] = ()) -> ModelOutput:
        """The next chunk of a sequence: positions cache.num_tokens ... + n - 1; updates cache in place.

        `capture`: main layer ids whose output streams to return in `ModelOutput.captured`."""
        plan = cache.plan(token_ids.shape[0])
        x, captured = self.run(token_ids, plan, cache.layers, KVCodec(self.cfg, EXACT, self.dtype), capture)
        cache.num_tokens += token_ids.shape[0]
        return ModelOutput(self.logits(x, ""), x, captured)

    @torch.inference_mode()
    def mtp_forward(self, streams: torch.Tensor, next_ids: torch.Tensor, depth: int = 0) -> ModelOutput:
        """MTP block `depth` over a whole sequence (spec §10).

        streams [T, hc, D]: the main model's pre-hc_head streams at positions 0 ... T-1; next_ids [T]:
        the token at t+1 for each position t. Returns the draft logits for position t+2 and the MTP's
        own pre-hc_head streams.
        """
        self.require_mtp()
        block = self.mtp_blocks[depth]
        x = block.forward(self.mtp_input(streams, next_ids, depth), next_ids, block.attention_full)
        return ModelOutput(self.logits(x, f"mtp.{depth}."), x)

    def new_mtp_cache(self, depth: int = 0, device: torch.device | str = "cpu") -> SequenceCache:
        """The window cache of MTP block `depth` for one sequence (a one-layer `SequenceCache`)."""
        self.require_mtp()
        return SequenceCache(self.cfg, [self.mtp_blocks[depth].kind], self.dtype, device)

    @torch.inference_mode()
    def mtp_step(self, streams: torch.Tensor, next_ids: torch.Tensor, cache: SequenceCache,
                 depth: int = 0) -> ModelOutput:
        """MTP block `depth` over the next rows, positions cache.num_tokens ... + n - 1 (`mtp_forward`'s step form).

        streams [n, hc, D] and next_ids [n] as in `mtp_forward`; updates `cache` (from `new_mtp_cache`) in place.
        """
        plan = cache.plan(next_ids.shape[0])
        x = self.run_mtp(streams, next_ids, plan, cache.layers[0], KVCodec(self.cfg, EXACT, self.dtype), depth)
        cache.num_tokens += next_ids.shape[0]
        return ModelOutput(self.logits(x, f"mtp.{depth}."), x)

    def require_mtp(self) -> None:
        """Raise unless the checkpoint has an MTP block."""
        cfg = self.cfg
        if not cfg.has_mtp:
            raise ValueError(f"{cfg.source}: this checkpoint has no MTP block (its mtp.* tensors are DSpark drafter "
                             "stages, without e_proj/h_proj/enorm/hnorm); MTP drafting is not available")

    def mtp_input(self, streams: torch.Tensor, next_ids: torch.Tensor, depth: int) -> torch.Tensor:
        """The MTP block's input streams [T, hc, D] (spec §10 steps 1-2)."""
        cfg, p = self.cfg, f"mtp.{depth}."
        e = rms_norm(self.embed(next_ids), self.w(f"{p}enorm.weight"), cfg.rms_norm_eps)
        h = rms_norm(streams, self.w(f"{p}hnorm.weight"), cfg.rms_norm_eps)
        act_q = self.mtp_blocks[depth].act_q
        return (dispatch.linear(e, self.w.linear(f"{p}e_proj.weight"), act_q).unsqueeze(1)
                + dispatch.linear(h, self.w.linear(f"{p}h_proj.weight"), act_q))

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy decoding: one prefill step, then one token per step. Returns the new token ids."""
        cache = self.new_cache()
        out = self.step(torch.tensor(prompt_ids), cache)
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(out.logits[-1].argmax())
            new.append(token)
            if token in stop_ids:
                break
            out = self.step(torch.tensor([token]), cache)
        return new
