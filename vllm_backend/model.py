"""`DeepseekV4ForCausalLM` for vLLM, on the project's core.

The adapter only: parameters (official names, loaded by the core's loader), one cache layer per
paged cache (specs from `kv_specs`), and each step's vLLM metadata turned into the core's
`BatchPlan` + `LayerCaches` views over the tensors vLLM allocated. The math is
`v4_plugin.runtime.paged.streams_paged` over `v4_plugin.runtime.model.V4Model`'s blocks.

`forward` returns the last layer's pre-hc_head streams of every scheduled token, flat [T, hc * D]
(vLLM's hidden states); `compute_logits` runs the head on the rows vLLM samples. With MTP drafting
the same streams feed the draft model (`mtp.py`), which runs the MTP block of this model's core.

**Runs without attention metadata (profiling, dummy runs).** vLLM 0.32/0.33 call the model with
`attn_metadata` None from `GPUModelRunner._dummy_run` (the CPU runner inherits it) when:

* `profile_run` (`_dummy_run(max_num_tokens, is_profile=True)`, then `_dummy_sampler_run`, which calls
  `compute_logits`): on GPUs always, from `Worker.determine_available_memory` (its peak memory, less the
  weights, is what the KV cache may not take; with `--kv-cache-memory-bytes` it still runs, for
  compilation). On CPUs only from `CPUModelRunner.warming_up_model`, which returns at once under
  `CompilationMode.NONE`: with `--enforce-eager`, and for `DeepseekV4ForCausalLM` always, because vLLM
  0.32 turns breakable CUDA graphs on for that architecture (`DEFAULT_BREAKABLE_CUDAGRAPH_ARCHITECTURES`),
  which sets the mode to NONE (the A/B name `DeepseekV4PluginForCausalLM` is not on that list: without
  `--enforce-eager` it gets one profile run at startup). The CPU KV size is the explicit budget
  (`VLLM_CPU_KVCACHE_SPACE` / `--kv-cache-memory-bytes`), or `--gpu-memory-utilization` x the node's
  memory less the worker's RSS: no peak is measured on CPUs.
* GPU warm-up (`compile_or_warm_up_model`: the compile sizes when compiled, then `max_num_reqs` tokens
  before warming the sampler) and the warm-up runs before each CUDA-graph capture.
* Data parallelism: an idle rank runs `execute_dummy_batch` (`uniform_decode_query_len` tokens, 1
  without speculation) every step, in lockstep with the busy ranks.

Such a run executes the real core over scratch caches (`scratch_plan`, `CacheLayers.scratch`) built for
that call alone and dropped when it returns: the token count vLLM passes, as sequences of at most
`max_model_len` tokens each at the end of a `max_model_len` context (the costliest step of that many
tokens: the indexer scores every compressed entry of the context, HCA layers attend to all of theirs).
Every scratch cache is one block in its layer's format, every block-table entry pointing at it: the
transients (gathered KV, indexer scores, the MoE, the head) have the shapes of a real step while the
scratch storage is one block per cache whatever the token count (the entries alias; their values do not
matter).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce)
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.kv_cache_interface import KVCacheSpec

from v4_plugin import __version__
from v4_plugin.cache.formats import CacheFormat
from v4_plugin.checkpoint.config import LayerType, V4Config, load_config
from v4_plugin.checkpoint.loader import load_checkpoint
from v4_plugin.runtime import dispatch
from v4_plugin.runtime.drafting import DSparkHead, Method, dspark_features
from v4_plugin.runtime.model import V4Model
from v4_plugin.runtime.batch import StepLayout
from v4_plugin.runtime.paged import BatchPlan, LayerCaches, PagedCache, dspark_context_paged, streams_paged
from v4_plugin.runtime.parallel import SINGLE, Collectives
from v4_plugin.runtime.warmup import warm_up
from v4_plugin.serving.settings import Settings, quant_sim, register_tensors, resolve_model_dir

from .backend import BACKEND_NAME, V4PagedBackend
from .capacity import method_of
from .dspark import drafts_with_dspark
from .kv_specs import CacheDecl, attn_prefix, layer_caches, make_spec, serving_format
from .plugin import check_parallelism

logger = init_logger("vllm.deepseek_v4_plugin")


class V4CacheLayer(nn.Module, AttentionLayerBase):
    """One paged cache of one layer, as vLLM's KV cache manager sees it (no parameters, no compute)."""

    def __init__(self, decl: CacheDecl, prefix: str, cache_dtype_str: str):
        super().__init__()
        self.decl, self.prefix, self.cache_dtype_str = decl, prefix, cache_dtype_str
        self.kv_cache = torch.tensor([])
        context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self

    def get_attn_backend(self) -> type[V4PagedBackend]:
        return V4PagedBackend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        return make_spec(self.decl, self.cache_dtype_str)

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        # vLLM's view is [num_blocks, H=1, entries per block, width]; the core wants [blocks, entries, width].
        self.kv_cache = kv_cache.squeeze(1)

    def forward(self):  # pragma: no cover - compute runs in the model
        raise NotImplementedError


class CacheLayers(nn.Module):
    """The cache layers of some V4 blocks (layer ids into the main stack, or past it for MTP blocks), and
    each step's views of them for the core: one `V4CacheLayer` per paged cache of every block."""

    def __init__(self, cfg: V4Config, layer_ids: Iterable[int], fmt: CacheFormat, dtype: torch.dtype,
                 cache_dtype: str):
        super().__init__()
        self.layers = nn.ModuleList()
        self.names: list[dict[str, str]] = []  # per block: cache name -> layer name
        for i in layer_ids:
            names = {}
            for decl in layer_caches(cfg, cfg.layer_type(i), fmt, dtype):
                name = f"{attn_prefix(i)}.{decl.name}"
                self.layers.append(V4CacheLayer(decl, name, cache_dtype))
                names[decl.name] = name
            self.names.append(names)
        self._by_name = {layer.prefix: layer for layer in self.layers}

    def plan(self, positions: torch.Tensor, metadata: dict) -> BatchPlan:
        """This step's `BatchPlan`: its real tokens only (vLLM pads `positions`), its sequences from vLLM's
        host-side counts (no host sync to find them)."""
        first = metadata[self.names[0]["window"]]
        rows = torch.arange(first.num_reqs, device=positions.device)  # block-table rows are in batch order
        layout = StepLayout.from_lengths(first.query_start_loc_cpu.diff().tolist(), first.seq_lens_cpu.tolist(), rows)
        if layout.token_seq.shape[0] != first.num_actual_tokens:
            raise RuntimeError(f"deepseek-v4-plugin: vLLM scheduled {first.num_actual_tokens} tokens, its query "
                               f"start locations count {layout.token_seq.shape[0]}")
        return BatchPlan(positions[: first.num_actual_tokens].long(), layout.token_seq, layout)

    def views(self, metadata: dict) -> list[LayerCaches]:
        """Per block, its caches as this step's block tables see them (rows in batch order)."""
        return [LayerCaches(**{cache: PagedCache(self._by_name[name].kv_cache, metadata[name].block_table)
                               for cache, name in names.items()}) for names in self.names]

    def scratch(self, plan: BatchPlan, max_len: int) -> list[LayerCaches]:
        """Per block, caches for a run without metadata (see the module docstring): each one block of its
        layer's entries, zeroed, that every block-table entry of every sequence of `plan` points at."""
        device, rows = plan.positions.device, int(plan.seq_ids.max()) + 1

        def scratch_cache(decl: CacheDecl) -> PagedCache:
            data = torch.zeros(1, decl.block_size // decl.tokens_per_entry, decl.width, dtype=decl.dtype, device=device)
            return PagedCache(data, torch.zeros(rows, -(-max_len // decl.block_size), dtype=torch.int32, device=device))

        return [LayerCaches(**{cache: scratch_cache(self._by_name[name].decl) for cache, name in names.items()})
                for names in self.names]


def scratch_plan(num_tokens: int, max_len: int, device: torch.device) -> BatchPlan:
    """`num_tokens` tokens as the costliest step of that size: sequences of `max_len` tokens and one of the
    rest, each ending at position `max_len - 1` (a last prefill chunk of a `max_len` context)."""
    lengths = [max_len] * (num_tokens // max_len) + ([num_tokens % max_len] if num_tokens % max_len else [])
    positions = torch.cat([torch.arange(max_len - n, max_len) for n in lengths])
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return BatchPlan(positions=positions.to(device), seq_ids=seq_ids.to(device))


def step_metadata() -> dict | None:
    """This step's attention metadata by layer name, or None (profiling and dummy runs: no cache is bound
    to a request)."""
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # micro-batching: not used with this backend
        metadata = metadata[0] if len(metadata) == 1 else None
    return metadata or None


class VllmTensorParallel:
    """The core's `Collectives` over vLLM's tensor-parallel group (`vllm.distributed`, set up before the model
    is built): vLLM's device communicator for that group (NCCL and custom all-reduce on GPUs; on CPUs shared
    memory where its `_C` extension has it, else gloo)."""

    def __init__(self):
        self.rank, self.size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return tensor_model_parallel_all_reduce(t)

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return tensor_model_parallel_all_gather(t, dim)

    def __repr__(self) -> str:
        return f"VllmTensorParallel(rank={self.rank}, size={self.size})"


def drafts_with_mtp(vllm_config: VllmConfig) -> bool:
    """Whether vLLM's speculative config drafts with the MTP block (then the target loads it, once)."""
    spec = vllm_config.speculative_config
    return spec is not None and method_of(spec.method) is Method.MTP


class CoreHandle(nn.Module):
    """The target's `model.embed_tokens` as vLLM sees it: no parameters of its own, it carries the core.

    vLLM's proposer gives every MTP draft model the target's `model.embed_tokens`
    (`_maybe_share_embeddings`); our draft model runs its MTP block from the `V4Model` this
    handle carries, so the embedding, head and MTP weights are loaded once, by the target.
    """

    def __init__(self, core: V4Model):
        super().__init__()
        self.core = core

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.core.embed(input_ids)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [n, ...] zero-padded to `rows` rows (vLLM pads a step's tokens; padded rows are never read)."""
    return x if x.shape[0] >= rows else torch.cat((x, x.new_zeros(rows - x.shape[0], *x.shape[1:])))


class DeepseekV4ForCausalLM(nn.Module):
    """vLLM model class for DeepSeek-V4 (Flash / Pro) running the project's implementation."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        model_config = vllm_config.model_config
        self.model_dir = resolve_model_dir(model_config.model, getattr(model_config, "revision", None))
        self.cfg = load_config(self.model_dir)
        self.parallelism = check_parallelism(vllm_config.parallel_config, self.cfg)
        self.collectives: Collectives = VllmTensorParallel() if self.parallelism.attn_tp > 1 else SINGLE
        self.max_model_len = model_config.max_model_len
        self.dtype = model_config.dtype
        self.device_type = vllm_config.device_config.device_type
        self.device = torch.device(self.device_type)  # where the weights go (the core computes there)
        cache_dtype = vllm_config.cache_config.cache_dtype
        self.settings = Settings.from_env()
        self.fmt = serving_format(vllm_config, self.settings)
        self.quant = quant_sim(self.fmt, self.settings)
        self.vocab_size = self.cfg.vocab_size

        n = self.cfg.num_hidden_layers
        self.caches = CacheLayers(self.cfg, range(n), self.fmt, self.dtype, cache_dtype)
        self.serve_mtp = drafts_with_mtp(vllm_config)
        # DSpark drafting (`dspark.py`): this model writes the stages' context into their window caches.
        self.dspark_caches = (CacheLayers(self.cfg, range(n, n + self.cfg.dspark.num_stages), self.fmt, self.dtype,
                                          cache_dtype) if drafts_with_dspark(vllm_config) else None)
        self.dspark_head = None
        self._dspark_views: list[LayerCaches] | None = None
        self.model = nn.Module()  # vLLM shares `model.embed_tokens` with a draft model (see `CoreHandle`)
        self.core = None  # built after load_weights

        indexer = "float" if self.fmt.indexer is None else self.fmt.indexer.value
        logger.info(
            "deepseek-v4-plugin %s: serving DeepseekV4ForCausalLM with the %s attention backend (%s)",
            __version__, BACKEND_NAME, dispatch.backend_name(self.device_type),
        )
        logger.info(
            "deepseek-v4-plugin: %d layers (%d SWA, %d CSA, %d HCA), KV storage %s, indexer keys %s, "
            "dtype %s, quantization simulation %s",
            self.cfg.num_hidden_layers, self.cfg.count(LayerType.SWA), self.cfg.count(LayerType.CSA),
            self.cfg.count(LayerType.HCA), self.fmt.kv.value, indexer, self.dtype,
            "on" if self.settings.simulate_quantization else "off",
        )
        if self.collectives.size > 1:
            cfg, par, rank = self.cfg, self.parallelism, self.collectives.rank
            experts = "by expert range" if par.expert_parallel else "by intermediate dimension"
            logger.info("deepseek-v4-plugin: tensor-parallel rank %d of %d over vLLM's TP group: %d of %d attention "
                        "heads, %d of %d output groups, routed experts split %s, KV caches replicated", rank,
                        par.attn_tp, cfg.num_attention_heads // par.attn_tp, cfg.num_attention_heads,
                        cfg.o_groups // par.attn_tp, cfg.o_groups, experts)

    # ---- weights -----------------------------------------------------------------------------------
    def load_weights(self, weights) -> set[str]:
        """Load through the core's loader (official FP8/FP4 format, tiny checkpoints, transformers'
        save_pretrained dialect); vLLM's own weight iterator is not consumed (no second read). FP8/FP4 linears
        stay as stored (`dispatch.keep_quantized`)."""
        drafting = self.serve_mtp or self.dspark_caches is not None
        sharded = self.collectives.size > 1  # then this rank's slices only (`v4_plugin.checkpoint.sharding`)
        tensors = load_checkpoint(self.model_dir, self.cfg, dtype=self.dtype, include_mtp=drafting,
                                  keep_quantized=dispatch.keep_quantized(self.device_type), device=self.device,
                                  parallelism=self.parallelism if sharded else None, rank=self.collectives.rank)
        register_tensors(self, tensors)
        params = dict(self.named_parameters())
        self.core = V4Model(self.cfg, {n: params[n].data for n in tensors}, dtype=self.dtype, quant=self.quant,
                            collectives=self.collectives)
        warm_up(self.core, self.fmt)  # compiles the decode shapes' kernels on GPUs (logged); no-op on CPU
        self.model.embed_tokens = CoreHandle(self.core)
        if self.dspark_caches is not None:
            self.dspark_head = DSparkHead(self.core)
        return set(params)

    # ---- execution ---------------------------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.core.embed(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Token ids [T] -> the last layer's pre-hc_head streams, flat [T, hc * D] in the model dtype: the
        hidden states vLLM passes to `compute_logits` and, when drafting, to the MTP draft model."""
        if inputs_embeds is not None:
            raise NotImplementedError("deepseek-v4-plugin: prompt embeddings are not supported")
        metadata = step_metadata()
        # profiling / dummy run (no metadata): the real computation over scratch caches (module docstring)
        plan = (scratch_plan(input_ids.shape[0], self.max_model_len, input_ids.device) if metadata is None
                else self.caches.plan(positions, metadata))
        ids = input_ids[: len(plan.positions)].long()
        if self.dspark_head is None:
            streams, _ = streams_paged(self.core, ids, plan, self._views(self.caches, plan, metadata), self.fmt)
        else:
            streams, captured = streams_paged(self.core, ids, plan, self._views(self.caches, plan, metadata),
                                              self.fmt, self.dspark_head.capture)
            dspark_views = self._views(self.dspark_caches, plan, metadata)
            dspark_context_paged(self.dspark_head, dspark_features(self.cfg, captured), plan, dspark_views, self.fmt)
            if metadata is not None:  # a dummy run's scratch caches are not kept
                self._dspark_views = dspark_views
        return pad_rows(streams.flatten(1), input_ids.shape[0])

    def _views(self, layers: CacheLayers, plan: BatchPlan, metadata: dict | None) -> list[LayerCaches]:
        """`layers` as this step's block tables see them, or scratch caches for `plan` without metadata."""
        return layers.views(metadata) if metadata is not None else layers.scratch(plan, self.max_model_len)

    def dspark_step(self) -> tuple[DSparkHead, list[LayerCaches], CacheFormat]:
        """What `dspark.DSparkProposer` drafts from after a step: the head, the stages' context caches
        as this step's block tables see them (rows in batch order), and the cache format."""
        return self.dspark_head, self._dspark_views, self.fmt

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Flat streams [n, hc * D] of the sampled rows -> fp32 logits [n, vocab]."""
        return self.core.logits(hidden_states.unflatten(-1, (self.cfg.hc_mult, self.cfg.hidden_size)))
