"""`DeepseekV4ForCausalLM` for vLLM, on the project's core.

The adapter only: parameters (official names, loaded by the core's loader), one cache layer per
paged cache (specs from `kv_specs`), and each step's vLLM metadata turned into the core's
`BatchPlan` + `LayerCaches` views over the tensors vLLM allocated. The math is
`v4_plugin.paged.forward_paged` over `v4_plugin.model.ReferenceModel`'s blocks.

`forward` returns the fp32 logits of every scheduled token (the core computes them); vLLM then
picks the sampled rows and `compute_logits` passes them through.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.kv_cache_interface import KVCacheSpec

from v4_plugin import __version__, dispatch
from v4_plugin.config import LayerType, load_config
from v4_plugin.model import QuantSim

from .backend import BACKEND_NAME, V4PagedBackend
from .kv_specs import CacheDecl, attn_prefix, cache_format, indexer_cache_choice, layer_caches, make_spec
from .plugin import check_parallelism

logger = init_logger("vllm.deepseek_v4_plugin")

QUANT_SIM_ENV = "V4_PLUGIN_QUANT_SIM"  # on (default) | off


def quant_sim_from_env() -> QuantSim:
    value = os.environ.get(QUANT_SIM_ENV, "on").strip().lower()
    if value in ("on", "1", "true", "yes", ""):
        return QuantSim()
    if value in ("off", "0", "false", "no"):
        return QuantSim.off()
    raise ValueError(f"{QUANT_SIM_ENV}={value!r}: choose 'on' or 'off'")


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local checkpoint directory for vLLM's `--model` (a path, or a hub id already downloaded or
    downloadable by huggingface_hub: config, tokenizer and safetensors only)."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


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


def add_parameter(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Register `tensor` under its official checkpoint name (`layers.3.attn.wq_a.weight`, ...), creating
    the intermediate modules, so that `root.named_parameters()` yields the official names."""
    module = root
    *path, leaf = name.split(".")
    for part in path:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))


class DeepseekV4ForCausalLM(nn.Module):
    """vLLM model class for DeepSeek-V4 (Flash / Pro) running the project's implementation."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        model_config = vllm_config.model_config
        check_parallelism(vllm_config.parallel_config)
        self.model_dir = resolve_model_dir(model_config.model, getattr(model_config, "revision", None))
        self.cfg = load_config(self.model_dir)
        self.dtype = model_config.dtype
        cache_dtype = vllm_config.cache_config.cache_dtype
        self.fmt = cache_format(cache_dtype, indexer_cache_choice(vllm_config))
        self.quant = quant_sim_from_env()
        self.vocab_size = self.cfg.vocab_size

        # One cache layer per paged cache of every main layer (MTP layers are not served).
        self.cache_layers = nn.ModuleList()
        self.layer_cache_names: list[dict[str, str]] = []
        for i, kind in enumerate(self.cfg.layer_types):
            names = {}
            for decl in layer_caches(self.cfg, kind, self.fmt, self.dtype):
                name = f"{attn_prefix(i)}.{decl.name}"
                self.cache_layers.append(V4CacheLayer(decl, name, cache_dtype))
                names[decl.name] = name
            self.layer_cache_names.append(names)
        self._layer_by_name = {layer.prefix: layer for layer in self.cache_layers}

        self.core = None  # built after load_weights

        indexer = "float" if self.fmt.indexer is None else self.fmt.indexer.value
        logger.info(
            "deepseek-v4-plugin %s: serving DeepseekV4ForCausalLM with the %s attention backend (%s)",
            __version__, BACKEND_NAME, dispatch.backend_name(vllm_config.device_config.device_type),
        )
        logger.info(
            "deepseek-v4-plugin: %d layers (%d SWA, %d CSA, %d HCA), KV storage %s, indexer keys %s, "
            "dtype %s, quantization simulation %s",
            self.cfg.num_hidden_layers, self.cfg.count(LayerType.SWA), self.cfg.count(LayerType.CSA),
            self.cfg.count(LayerType.HCA), self.fmt.kv.value, indexer, self.dtype,
            "on" if self.quant != QuantSim.off() else "off",
        )

    # ---- weights -----------------------------------------------------------------------------------
    def load_weights(self, weights) -> set[str]:
        """Load through the core's loader (official FP8/FP4 format, tiny checkpoints, transformers'
        save_pretrained dialect); vLLM's own weight iterator is not consumed (no second read)."""
        from v4_plugin.checkpoint import load_checkpoint
        from v4_plugin.model import ReferenceModel

        tensors = load_checkpoint(self.model_dir, self.cfg, dtype=self.dtype, include_mtp=False)
        for name, tensor in tensors.items():
            add_parameter(self, name, tensor)
        params = dict(self.named_parameters())
        self.core = ReferenceModel(self.cfg, {n: params[n].data for n in tensors}, dtype=self.dtype, quant=self.quant)
        return set(params)

    # ---- execution ---------------------------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.core.embed(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        from v4_plugin.paged import BatchPlan, LayerCaches, PagedCache, forward_paged

        if inputs_embeds is not None:
            raise NotImplementedError("deepseek-v4-plugin: prompt embeddings are not supported")
        num_padded = input_ids.shape[0]
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):  # micro-batching: not used with this backend
            metadata = metadata[0] if len(metadata) == 1 else None
        if not metadata or self.core is None:  # profiling / dummy runs: nothing to attend
            return torch.zeros(num_padded, self.vocab_size, dtype=torch.float32, device=input_ids.device)

        first = metadata[self.layer_cache_names[0]["window"]]
        num_tokens = first.num_actual_tokens
        query_lens = first.query_start_loc_cpu.diff()
        seq_ids = torch.repeat_interleave(torch.arange(first.num_reqs), query_lens).to(input_ids.device)
        plan = BatchPlan(positions=positions[:num_tokens].long(), seq_ids=seq_ids[:num_tokens])

        caches = []
        for names in self.layer_cache_names:
            views = {}
            for cache, name in names.items():
                views[cache] = PagedCache(self._layer_by_name[name].kv_cache, metadata[name].block_table)
            caches.append(LayerCaches(**views))
        logits = forward_paged(self.core, input_ids[:num_tokens].long(), plan, caches, self.fmt).logits
        if num_tokens < num_padded:
            logits = torch.cat((logits, logits.new_zeros(num_padded - num_tokens, logits.shape[1])))
        return logits

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states  # forward already returned fp32 logits
