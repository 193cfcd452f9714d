"""The attention backend our cache layers return: it carries specs and metadata, no compute.

As upstream does for DeepSeek-V4, the compute runs in the model layer (here: the core's
`streams_paged`); the backend only tells vLLM the supported layouts/block sizes and turns vLLM's
per-group `CommonAttentionMetadata` into the block table and batch shape the core needs. Cache
layers return it from `get_attn_backend()`, so vLLM's selector (which on CPU refuses sparse MLA) is
never consulted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

BACKEND_NAME = "DEEPSEEK_V4_PLUGIN_PAGED"


@dataclass
class V4PagedMetadata:
    """What one cache group contributes to a step."""

    block_table: torch.Tensor  # [num_reqs, max_blocks] block ids of this group (batch order)
    query_start_loc_cpu: torch.Tensor  # [num_reqs + 1]
    seq_lens_cpu: torch.Tensor  # [num_reqs]: computed + scheduled tokens
    num_reqs: int
    num_actual_tokens: int


class V4PagedMetadataBuilder(AttentionMetadataBuilder[V4PagedMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> V4PagedMetadata:
        m = common_attn_metadata
        n = m.num_reqs
        seq_lens = m.seq_lens_cpu_upper_bound if m.seq_lens_cpu_upper_bound is not None else m.seq_lens.cpu()
        return V4PagedMetadata(
            block_table=m.block_table_tensor[:n],
            query_start_loc_cpu=m.query_start_loc_cpu[: n + 1],
            seq_lens_cpu=seq_lens[:n],
            num_reqs=n,
            num_actual_tokens=m.num_actual_tokens,
        )


class V4PagedBackend(AttentionBackend):
    """Pure-PyTorch/Triton DeepSeek-V4 paged attention (compute in the model layer)."""

    accept_output_buffer = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.bfloat16, torch.float16]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("deepseek-v4-plugin computes attention in the model layer")

    @staticmethod
    def get_builder_cls() -> type[V4PagedMetadataBuilder]:
        return V4PagedMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return 256

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Block-outermost layouts let vLLM pack every cache of a block into one slab (§4.3 of the notes).
        return (KVCacheLayout.BLHNC, KVCacheLayout.BLNHC)

    @classmethod
    def is_mla(cls) -> bool:
        return True

    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True
