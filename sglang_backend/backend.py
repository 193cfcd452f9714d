"""The `v4_plugin` attention backend: SGLang's forward metadata -> the core's `BatchPlan` / `LayerCaches`.

No attention math here. SGLang calls `init_forward_metadata(forward_batch)` once per forward before
`model.forward`; the model then asks the backend for the plan and the per-layer caches and runs the
core's `ReferenceModel.forward_paged`, which reads and writes the caches in `V4TokenToKVPool` (its
full pool and, through SGLang's full->SWA slot mapping, its SWA pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from . import BACKEND_NAME
from .pools import V4TokenToKVPool


@dataclass
class V4ForwardMetadata:
    plan: object  # v4_plugin.paged.BatchPlan
    caches: list  # list[v4_plugin.paged.LayerCaches]
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
        from v4_plugin.paged import BatchPlan

        fb, pool = forward_batch, self.token_to_kv_pool
        mode = fb.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
            return
        bs = fb.batch_size
        dev = fb.positions.device
        seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
        if mode.is_decode_or_idle() or not mode.is_extend():
            new_lens = [1] * bs
        else:
            new_lens = (fb.extend_seq_lens_cpu if fb.extend_seq_lens_cpu is not None
                        else fb.extend_seq_lens.tolist())
        counts = torch.tensor(new_lens, dtype=torch.long, device=dev)
        seq_ids = torch.repeat_interleave(torch.arange(bs, device=dev), counts)
        plan = BatchPlan(positions=fb.positions.to(torch.long), seq_ids=seq_ids)
        last_index = torch.cumsum(counts, 0) - 1

        page = pool.page_size
        max_len = max(seq_lens)
        n_pages = -(-max_len // page)
        rows = fb.req_pool_indices.to(torch.long)
        # The full-pool slot of each page's first position, per sequence: the pool turns these into the
        # block tables of its full (compressed) and SWA (window, compressor rows) caches.
        page_starts = self.req_to_token_pool.req_to_token[rows][:, 0 : n_pages * page : page].to(torch.long)
        self.forward_metadata = V4ForwardMetadata(plan, pool.layer_caches(page_starts), last_index)

    # ---- SGLang's per-layer entry points: not used by our model ------------------------------------
    def forward_extend(self, *args, **kwargs):
        raise NotImplementedError("v4_plugin: attention runs inside the core's forward_paged")

    def forward_decode(self, *args, **kwargs):
        raise NotImplementedError("v4_plugin: attention runs inside the core's forward_paged")

    def support_triton(self):
        return False
