"""`DeepseekV4ForCausalLM` for vLLM, on the project's core.

The adapter only: parameters (official names, loaded by the core's loader), one cache layer per
paged cache (specs from `kv_specs`), and each step's vLLM metadata turned into the core's
`BatchPlan` + `LayerCaches` views over the tensors vLLM allocated. The math is
`v4_plugin.runtime.paged.streams_paged` over `v4_plugin.runtime.model.V4Model`'s blocks.

`forward` returns the last layer's pre-hc_head streams of every scheduled token, flat [T, hc * D]
(vLLM's hidden states); `compute_logits` runs the head on the rows vLLM samples. With MTP drafting
the same streams feed the draft model (`mtp.py`), which runs the MTP block of this model's core.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
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
from v4_plugin.runtime.paged import BatchPlan, LayerCaches, PagedCache, dspark_context_paged, streams_paged
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

    def step(self, positions: torch.Tensor) -> tuple[BatchPlan, list[LayerCaches]] | None:
        """This step's `BatchPlan` (its real tokens only) and `LayerCaches` per block; None when vLLM runs
        the model without attention metadata (profiling and dummy runs)."""
        metadata = step_metadata()
        if metadata is None:
            return None
        first = metadata[self.names[0]["window"]]
        query_lens = first.query_start_loc_cpu.diff()
        seq_ids = torch.repeat_interleave(torch.arange(first.num_reqs), query_lens).to(positions.device)
        n = first.num_actual_tokens
        return BatchPlan(positions=positions[:n].long(), seq_ids=seq_ids[:n]), self.views(metadata)

    def views(self, metadata: dict) -> list[LayerCaches]:
        """Per block, its caches as this step's block tables see them (rows in batch order)."""
        return [LayerCaches(**{cache: PagedCache(self._by_name[name].kv_cache, metadata[name].block_table)
                               for cache, name in names.items()}) for names in self.names]


def step_metadata() -> dict | None:
    """This step's attention metadata by layer name, or None (profiling and dummy runs)."""
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # micro-batching: not used with this backend
        metadata = metadata[0] if len(metadata) == 1 else None
    return metadata or None


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
        check_parallelism(vllm_config.parallel_config)
        self.model_dir = resolve_model_dir(model_config.model, getattr(model_config, "revision", None))
        self.cfg = load_config(self.model_dir)
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

    # ---- weights -----------------------------------------------------------------------------------
    def load_weights(self, weights) -> set[str]:
        """Load through the core's loader (official FP8/FP4 format, tiny checkpoints, transformers'
        save_pretrained dialect); vLLM's own weight iterator is not consumed (no second read). Where the
        GEMM kernels run (`dispatch.keep_quantized`), FP8/FP4 linears stay in their file format."""
        drafting = self.serve_mtp or self.dspark_caches is not None
        tensors = load_checkpoint(self.model_dir, self.cfg, dtype=self.dtype, include_mtp=drafting,
                                  keep_quantized=dispatch.keep_quantized(self.device_type), device=self.device)
        register_tensors(self, tensors)
        params = dict(self.named_parameters())
        self.core = V4Model(self.cfg, {n: params[n].data for n in tensors}, dtype=self.dtype, quant=self.quant)
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
        width = self.cfg.hc_mult * self.cfg.hidden_size
        step = self.caches.step(positions) if self.core is not None else None
        if step is None:  # profiling / dummy runs: nothing to attend
            return torch.zeros(input_ids.shape[0], width, dtype=self.dtype, device=input_ids.device)
        plan, caches = step
        ids = input_ids[: len(plan.positions)].long()
        if self.dspark_head is None:
            streams, _ = streams_paged(self.core, ids, plan, caches, self.fmt)
        else:
            streams, captured = streams_paged(self.core, ids, plan, caches, self.fmt, self.dspark_head.capture)
            self._dspark_views = self.dspark_caches.views(step_metadata())
            dspark_context_paged(self.dspark_head, dspark_features(self.cfg, captured), plan, self._dspark_views,
                                 self.fmt)
        return pad_rows(streams.flatten(1), input_ids.shape[0])

    def dspark_step(self) -> tuple[DSparkHead, list[LayerCaches], CacheFormat]:
        """What `dspark.DSparkProposer` drafts from after a step: the head, the stages' context caches
        as this step's block tables see them (rows in batch order), and the cache format."""
        return self.dspark_head, self._dspark_views, self.fmt

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Flat streams [n, hc * D] of the sampled rows -> fp32 logits [n, vocab]."""
        return self.core.logits(hidden_states.unflatten(-1, (self.cfg.hc_mult, self.cfg.hidden_size)))
