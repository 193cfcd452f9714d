"""`DeepSeekV4MTPModel` for vLLM: the 04-24 checkpoints' MTP block as vLLM's MTP draft model.

vLLM resolves `--speculative-config '{"method": "mtp", ...}'` on a DeepSeek-V4 checkpoint to the
draft architecture `DeepSeekV4MTPModel` (`SpeculativeConfig.hf_config_override`); the native class
needs the native main model (and raises NotImplementedError on CPU), so the plugin registers this one.

vLLM's proposer drives it like every MTP draft (spec §10): a first pass over the step's rows with the
target's hidden states (our flat pre-hc_head streams) and the token one position later, then
`num_speculative_tokens - 1` one-row passes fed the draft's own streams. The math is
`v4_plugin.runtime.paged.mtp_streams_paged` on the target's core (`CoreHandle`, shared by vLLM as the target's
`model.embed_tokens`); the block's window cache is one more vLLM cache layer, so vLLM's block manager
allocates and charges it like the main layers' windows. Rows are position-indexed: rejected drafts
are overwritten by the next pass, no rollback. A run without attention metadata (the proposer's
`dummy_run` inside vLLM's profiling and dummy runs) computes over scratch caches, as the target does
(`model.py`).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig

from v4_plugin.checkpoint.config import load_config
from v4_plugin.runtime.paged import mtp_streams_paged
from v4_plugin.serving.settings import resolve_model_dir

from .kv_specs import serving_format
from .model import CacheLayers, pad_rows, scratch_plan, step_metadata


class DeepseekV4MTP(nn.Module):
    """vLLM draft model: MTP block `spec_step_idx % num_nextn_predict_layers` of the target's core."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        # The request was checked against the checkpoint when vLLM built its config (`plugin.check_speculation`).
        model_config = vllm_config.speculative_config.draft_model_config
        self.cfg = load_config(resolve_model_dir(model_config.model, getattr(model_config, "revision", None)))
        cache_dtype = vllm_config.cache_config.cache_dtype
        self.fmt = serving_format(vllm_config)
        n = self.cfg.num_hidden_layers
        self.caches = CacheLayers(self.cfg, range(n, n + self.cfg.num_nextn_predict_layers), self.fmt,
                                  vllm_config.model_config.dtype, cache_dtype)
        self.model = nn.Module()  # vLLM sets `model.embed_tokens` to the target's (a `CoreHandle`)
        self.dtype = vllm_config.model_config.dtype
        self.max_model_len = vllm_config.model_config.max_model_len

    @property
    def core(self):
        handle = getattr(self.model, "embed_tokens", None)
        return None if handle is None else handle.core

    def load_weights(self, weights) -> set[str]:
        """Nothing to load: the target model loaded the MTP tensors with its own (`drafts_with_mtp`)."""
        return set()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.core.embed(input_ids)

    def _depth(self, spec_step_idx: int) -> int:
        return spec_step_idx % self.cfg.num_nextn_predict_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None,
                spec_step_idx: int = 0) -> torch.Tensor:
        """Rows at `positions`: the streams at that position, flat [T, hc * D] (the target's or, after the
        first pass, this model's own output) and `input_ids`, the token one position later.
        Returns this block's pre-hc_head streams, flat [T, hc * D]."""
        cfg = self.cfg
        metadata = step_metadata()
        if metadata is None:  # profiling / dummy run: scratch caches, as the target's (`model.py`)
            plan = scratch_plan(positions.shape[0], self.max_model_len, positions.device)
            caches = self.caches.scratch(plan, self.max_model_len)
        else:
            plan, caches = self.caches.plan(positions, metadata), self.caches.views(metadata)
        depth = self._depth(spec_step_idx)
        n = len(plan.positions)
        streams = hidden_states[:n].unflatten(-1, (cfg.hc_mult, cfg.hidden_size))
        out = mtp_streams_paged(self.core, streams, input_ids[:n].long(), plan, caches[depth], self.fmt, depth)
        return pad_rows(out.flatten(1), positions.shape[0])

    def compute_logits(self, hidden_states: torch.Tensor, spec_step_idx: int = 0) -> torch.Tensor:
        """Flat MTP streams [n, hc * D] -> fp32 draft logits [n, vocab] (the block's hc_head and norm, the shared head)."""
        cfg = self.cfg
        streams = hidden_states.unflatten(-1, (cfg.hc_mult, cfg.hidden_size))
        return self.core.logits(streams, f"mtp.{self._depth(spec_step_idx)}.")
