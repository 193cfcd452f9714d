"""The refreshes' DSpark drafter as the draft model of SGLang's EAGLE worker (`sglang_backend.speculative`).

SGLang names a DeepSeek-V4 draft config of a DSpark checkpoint `DeepseekV4PluginForCausalLMDSpark` (the
plugin's `configure_model_config`). The worker drives it in two kinds of step:

* extend (after a prefill chunk) and draft extend (after a verify step): row t carries the target's
  `dspark_features` of position t (`spec_info.hidden_states` [T, S*D]) and, shifted by SGLang, the token
  at t+1. Every row's context KV goes into the stages' window caches in the draft worker's pool (rows
  of rejected drafts are overwritten later, like the main windows); then each sequence's anchor row, the
  one whose next token the target chose last (prefill: its last row; draft extend: its last accepted
  row), drafts one block after that token (`v4_plugin.runtime.paged.dspark_blocks_paged`). The output is the
  first draft's logits (block row 0 + the Markov bias of the anchor) and, as hidden states, the block's
  rows for the later drafts (1 ... k-1, zero-padded to [block_size*D]; a draft extend returns every row,
  zeros off the anchors, and the worker picks the anchor rows);
* draft step i (decode): the input id is draft i, the hidden states the rows the previous step handed
  on; row 0 gives draft i+1's logits (`DSparkHead.markov_logits`) and the rest move up one.
"""

from __future__ import annotations

import torch

from v4_plugin.runtime.drafting import DSparkHead
from v4_plugin.runtime.paged import dspark_blocks_paged, dspark_context_paged

from .deepseek_v4_mtp import DeepseekV4PluginForCausalLMNextN


class DeepseekV4PluginForCausalLMDSpark(DeepseekV4PluginForCausalLMNextN):
    """The DSpark stages (mtp.0 ... mtp.{S-1}) over their context windows in the draft worker's pool
    (`v4_plugin.runtime.drafting.draft_layer_types`), sharing the target's embedding and head."""

    _dspark = (None, None)  # (the core model in use, its DSparkHead)

    def _head(self, ref):
        """The `DSparkHead` of the core model in use (rebuilt when that is)."""
        if self._dspark[0] is not ref:
            self._dspark = (ref, DSparkHead(ref))
        return self._dspark[1]

    def _output(self, ref, ids: torch.Tensor, forward_batch, meta, fmt):
        """A draft step, or an extend / draft extend (see the module docstring)."""
        from sglang.srt.layers.logits_processor import LogitsProcessorOutput

        head = self._head(ref)
        block = (self.cfg.dspark.block_size, self.cfg.hidden_size)
        if forward_batch.forward_mode.is_decode():  # a draft step
            rows = forward_batch.spec_info.hidden_states.unflatten(-1, block)
            logits = head.markov_logits(rows[:, 0].to(head.model.dtype), ids)
            return LogitsProcessorOutput(next_token_logits=logits, hidden_states=_next_rows(rows).flatten(1))
        anchor_rows, logits, rows = self._context_and_blocks(head, ids, forward_batch, meta, fmt)
        if forward_batch.forward_mode.is_draft_extend_v2():  # the worker picks the anchor rows of every row
            all_logits = logits.new_zeros(ids.shape[0], logits.shape[1])
            all_rows = rows.new_zeros(ids.shape[0], *block)
            all_logits[anchor_rows], all_rows[anchor_rows] = logits, rows
            return LogitsProcessorOutput(next_token_logits=all_logits, hidden_states=all_rows.flatten(1))
        capture = forward_batch.capture_hidden_mode  # extend: the anchors are the sequences' last rows
        return LogitsProcessorOutput(next_token_logits=logits,
                                     hidden_states=rows.flatten(1) if capture and capture.need_capture() else None)

    def _context_and_blocks(self, head, ids: torch.Tensor, forward_batch, meta,
                            fmt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the step's context, then draft a block at each sequence's anchor row: the anchor rows
        (int64 [num_seqs]), the first draft's logits fp32 [num_seqs, V] and the block's rows for the later
        drafts [num_seqs, block_size, D] (zero-padded)."""
        from sglang.srt.runtime_context import get_spec

        features = forward_batch.spec_info.hidden_states.to(head.model.dtype)
        dspark_context_paged(head, features, meta.plan, meta.caches, fmt)
        anchor_rows = meta.last_index
        if forward_batch.forward_mode.is_draft_extend_v2():  # rows of a verify step: up to the last accepted
            lens = forward_batch.extend_seq_lens.to(torch.long)
            starts = torch.cumsum(lens, 0) - lens
            anchor_rows = starts + forward_batch.spec_info.num_accept_tokens.to(starts.device) - 1
        anchors, k = ids[anchor_rows], int(get_spec().speculative_num_steps)
        blocks = dspark_blocks_paged(head, anchors.tolist(), (meta.plan.positions[anchor_rows] + 1).tolist(),
                                     meta.plan.seq_ids[anchor_rows].tolist(), meta.caches, fmt, k)  # [num_seqs, k, D]
        rows = blocks.new_zeros(len(anchors), self.cfg.dspark.block_size, self.cfg.hidden_size)
        rows[:, : k - 1] = blocks[:, 1:]
        return anchor_rows, head.markov_logits(blocks[:, 0], anchors), rows


def _next_rows(rows: torch.Tensor) -> torch.Tensor:
    """Block rows [B, R, D] for the next draft step: without the first, zero-padded at the end."""
    return torch.cat((rows[:, 1:], rows.new_zeros(rows.shape[0], 1, rows.shape[2])), dim=1)


EntryClass = [DeepseekV4PluginForCausalLMDSpark]
