"""The `v4_plugin` attention backend: SGLang's forward metadata -> the core's `BatchPlan` / `LayerCaches`.

No attention math here. SGLang calls `init_forward_metadata(forward_batch)` once per forward before
`model.forward`; the model then asks the backend for the plan and the per-layer caches and runs the
core's `paged.streams_paged`, which reads and writes the caches in `V4TokenToKVPool` (its
full pool and, through SGLang's full->SWA slot mapping, its SWA pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from v4_plugin.runtime.paged import BatchPlan, LayerCaches

from . import BACKEND_NAME
from .pools import V4TokenToKVPool


@dataclass
class V4ForwardMetadata:
    plan: BatchPlan
    caches: list[LayerCaches]
    last_index: torch.Tensor  # int64 [num_seqs]: the row of each sequence's last token in this step


class V4PluginAttnBackend(AttentionBackend):
    name = BACKEND_NAME

    def __init__(self, model_runner):
        super().__init__()
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.forward_metadata: V4ForwardMetadata | None = None
        pool = self.token_to_kv_pool
        if not isinstance(pool, V4TokenToKVPool):
            raise RuntimeError(
                f"the {BACKEND_NAME} attention backend serves DeepSeek-V4 through the plugin's pool; got "
                f"{type(pool).__name__} (is the model DeepseekV4PluginForCausalLM?)")

    # ---- metadata -------------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        fb = forward_batch
        mode = fb.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
            return
        bs = fb.batch_size
        if mode.is_target_verify() or mode.is_draft_extend_v2():
            # Speculative steps: every sequence has the same number of tokens (anchor + drafts).
            counts = torch.full((bs,), fb.positions.numel() // bs, dtype=torch.long)
            max_len = int(fb.positions.max()) + 1
        else:
            seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
            if mode.is_decode_or_idle() or not mode.is_extend():
                new_lens = [1] * bs
            else:
                new_lens = (fb.extend_seq_lens_cpu if fb.extend_seq_lens_cpu is not None
                            else fb.extend_seq_lens.tolist())
            counts = torch.tensor(new_lens, dtype=torch.long)
            max_len = max(seq_lens)
        self.forward_metadata = step_metadata(self, fb, fb.positions, counts, max_len)

    # ---- SGLang's per-layer entry points: not used by our model ------------------------------------
    def forward_extend(self, *args, **kwargs):
        raise NotImplementedError("v4_plugin: attention runs inside the core's streams_paged")

    def forward_decode(self, *args, **kwargs):
        raise NotImplementedError("v4_plugin: attention runs inside the core's streams_paged")

    def support_triton(self):
        return False


def step_metadata(backend: V4PluginAttnBackend, forward_batch, positions: torch.Tensor, counts: torch.Tensor,
                  max_len: int) -> V4ForwardMetadata:
    """The core's plan and caches for a step of `counts[s]` tokens of sequence s at `positions` [T]
    (contiguous per sequence, in batch order; no sequence longer than `max_len` tokens), the block
    tables read from SGLang's req_to_token."""
    pool, dev = backend.token_to_kv_pool, positions.device
    counts = counts.to(device=dev, dtype=torch.long)
    seq_ids = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts)
    plan = BatchPlan(positions=positions.to(torch.long), seq_ids=seq_ids)
    page = pool.page_size
    n_pages = -(-max_len // page)
    rows = forward_batch.req_pool_indices.to(torch.long)
    # The full-pool slot of each page's first position, per sequence: the pool turns these into the
    # block tables of its full (compressed) and SWA (window, compressor rows) caches.
    page_starts = backend.req_to_token_pool.req_to_token[rows][:, 0 : n_pages * page : page].to(torch.long)
    return V4ForwardMetadata(plan, pool.layer_caches(page_starts), torch.cumsum(counts, 0) - 1)
