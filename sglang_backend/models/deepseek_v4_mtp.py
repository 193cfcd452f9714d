"""The 04-24 MTP block as the draft model of SGLang's EAGLE worker (`sglang_backend.speculative`).

SGLang names a DeepSeek-V4 draft config `DeepseekV4PluginForCausalLMNextN` (the plugin's
`configure_model_config`); this module of the external model package serves it with the core's
`mtp_streams_paged`, over the MTP block's window cache in the draft worker's pool.
"""

from __future__ import annotations

import torch

from v4_plugin.checkpoint.loader import load_checkpoint
from v4_plugin.runtime import dispatch
from v4_plugin.runtime.model import V4Model
from v4_plugin.runtime.paged import mtp_streams_paged

from .deepseek_v4_plugin import DeepseekV4PluginForCausalLM, device_type


class DeepseekV4PluginForCausalLMNextN(DeepseekV4PluginForCausalLM):
    """The 04-24 MTP block (depth 0, reused for every draft) as SGLang's EAGLE draft model: the core's
    `mtp_streams_paged` over its window cache in the draft worker's pool
    (`v4_plugin.runtime.drafting.draft_layer_types`).

    Row i of a step reads the target's (or, in later draft steps, its own) streams at the row's
    position, `spec_info.hidden_states` [T, hc*D], and `input_ids[i]`, the token one position later
    (SGLang shifts the ids for its draft models); it returns the draft logits for two positions ahead
    and its own streams as hidden states."""

    HEAD_PREFIX = "mtp.0."

    def _load_tensors(self) -> dict[str, torch.Tensor]:
        """The mtp.* tensors; the embedding and head come from the target (`set_embed_and_head`)."""
        return load_checkpoint(self._resolved_dir(), self.cfg, dtype=self.dtype, include_mtp=True, only_mtp=True,
                               keep_quantized=dispatch.keep_quantized(device_type()), device=device_type(),
                               parallelism=self.parallelism, rank=self.collectives.rank)

    def set_embed_and_head(self, embed: torch.Tensor, head: torch.Tensor) -> None:
        self.tensors.update({"embed.weight": embed, "head.weight": head})
        self.ref = V4Model(self.cfg, self.tensors, dtype=self.dtype, quant=self.ref.quant,
                           collectives=self.collectives)

    def _step(self, ref, input_ids: torch.Tensor, forward_batch, meta, fmt) -> tuple[torch.Tensor, torch.Tensor]:
        streams = forward_batch.spec_info.hidden_states.unflatten(-1, (self.cfg.hc_mult, self.cfg.hidden_size))
        out = mtp_streams_paged(ref, streams.to(ref.dtype), input_ids, meta.plan, meta.caches[0], fmt)
        return out, out.flatten(1)


EntryClass = [DeepseekV4PluginForCausalLMNextN]
