"""DSpark drafting (the -0731 / -0813 refreshes) through vLLM's V1 model runner.

vLLM runs `"method": "dspark"` only on its V2 GPU model runner, with its native model; its V1 runner
(the CPU's, and the GPU's with VLLM_USE_V2_MODEL_RUNNER=0) refuses it. The plugin therefore serves
`--speculative-config '{"method": "dspark", "num_speculative_tokens": k}'` with vLLM's `custom_class`
proposer hook (`plugin.check_speculation` rewrites the config when vLLM builds it):

* the target model (`model.DeepseekV4ForCausalLM`) captures the streams of `dspark_target_layer_ids`
  in every step and writes each DSpark stage's context KV for every scheduled row into that stage's
  window cache, one more vLLM cache layer per stage, allocated and charged by vLLM's block manager
  (`v4_plugin.runtime.paged.dspark_context_paged`); rejected rows are overwritten like the main windows;
* `DSparkProposer` then drafts one block per request after its newest token
  (`v4_plugin.runtime.paged.dspark_draft_paged`); vLLM verifies the drafts and counts acceptance as for any
  drafter.
"""

from __future__ import annotations

from vllm.config import VllmConfig

from v4_plugin.runtime.paged import dspark_draft_paged

PROPOSER = "vllm_backend.dspark.DSparkProposer"  # `speculative_config.model` of the rewritten config


def drafts_with_dspark(vllm_config: VllmConfig) -> bool:
    """Whether vLLM drafts with the DSpark block through `DSparkProposer` (then the target feeds it)."""
    spec = vllm_config.speculative_config
    return spec is not None and spec.method == "custom_class" and spec.model == PROPOSER


class DSparkProposer:
    """vLLM `custom_class` proposer: one DSpark block per request, over the context the target wrote."""

    def __init__(self, vllm_config: VllmConfig):
        self.k = vllm_config.speculative_config.num_speculative_tokens
        self.target = None

    def load_model(self, target_model) -> None:
        """The model runner hands over the target (`DeepseekV4ForCausalLM`), whose step feeds the drafts."""
        self.target = target_model

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None) -> list[list[int]]:
        """Per request of the step (batch order): k drafts after its newest token, or none while its
        prompt is still being prefilled (no token sampled). `num_tokens_no_spec[i]` counts the request's
        tokens, the newest included, so that token sits at position `num_tokens_no_spec[i] - 1`."""
        wanted = [i for i, sampled in enumerate(sampled_token_ids) if sampled]
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        if not wanted:
            return drafts
        head, caches, fmt = self.target.dspark_step()
        blocks = dspark_draft_paged(head, [sampled_token_ids[i][-1] for i in wanted],
                                    [int(num_tokens_no_spec[i]) - 1 for i in wanted], wanted, caches, fmt, self.k)
        for i, block in zip(wanted, blocks):
            drafts[i] = block.tokens
        return drafts
