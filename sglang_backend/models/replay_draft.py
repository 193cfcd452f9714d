"""A test draft model for SGLang's EAGLE worker: the MTP draft made to propose a known continuation.

`DeepseekV4PluginReplayDraft` runs every draft step as `DeepseekV4PluginForCausalLMNextN` does (the MTP
block over the draft worker's pool: its window cache written and read, its streams handed on as hidden
states), then replaces the logits of each row whose continuation it knows by a one-hot row at that token.
Fed the target's own greedy continuation, SGLang's verify accepts every draft and each verify step emits
k + 1 tokens (tests/test_sglang_full_acceptance.py), so its multi-step path runs at full acceptance.

The continuations come from the draft checkpoint's config.json, `replay_sequences` (`REPLAY_FIELD`):
token lists, each a prompt followed by the target's greedy output. That config names this architecture
first and keeps `DeepseekV4ForCausalLM` after it (the core's config check requires it). As for the MTP
block, a draft row at position p reads token p + 1 as its input id and predicts token p + 2 (SGLang
shifts the ids of its draft models by one); rows the table does not know keep the MTP block's logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .deepseek_v4_mtp import DeepseekV4PluginForCausalLMNextN

REPLAY_FIELD = "replay_sequences"


def replay_table(sequences: Sequence[Sequence[int]]) -> dict[tuple[int, int], int]:
    """(position p, token at p + 1) -> token at p + 2, over all `sequences`. Raises `ValueError` when two
    sequences share a key but continue differently (a row could not tell them apart)."""
    table: dict[tuple[int, int], int] = {}
    for seq in sequences:
        for p in range(len(seq) - 2):
            key, nxt = (p, int(seq[p + 1])), int(seq[p + 2])
            if table.setdefault(key, nxt) != nxt:
                raise ValueError(f"{REPLAY_FIELD}: position {p}, token {key[1]} continues with both "
                                 f"{table[key]} and {nxt}")
    return table


class DeepseekV4PluginReplayDraft(DeepseekV4PluginForCausalLMNextN):
    """The MTP draft whose logits, on rows the replay table knows, select the table's next token."""

    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__(config, quant_config, prefix)
        self.replay = replay_table(getattr(config, REPLAY_FIELD))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch, input_embeds=None,
                **kwargs):
        from sglang.srt.model_executor.forward_context import get_attn_backend

        out = super().forward(input_ids, positions, forward_batch, input_embeds, **kwargs)
        logits = out.next_token_logits  # [rows, vocab] fp32: every token's, or each sequence's last (prefill)
        if logits.shape[0] == 0:  # idle batch
            return out
        pos, ids = forward_batch.positions, input_ids
        if logits.shape[0] != ids.shape[0]:
            last = get_attn_backend().forward_metadata.last_index
            pos, ids = pos[last], ids[last]
        for row, key in enumerate(zip(pos.tolist(), ids.tolist())):
            token = self.replay.get(key)
            if token is not None:
                logits[row] = 0.0
                logits[row, token] = 1.0
        return out


EntryClass = [DeepseekV4PluginReplayDraft]
