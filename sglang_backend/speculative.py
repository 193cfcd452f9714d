"""Speculative decoding for DeepSeek-V4 through SGLang's own EAGLE worker (`--speculative-algorithm`).

SGLang's EAGLE worker (chain drafts: topk 1) runs the checkpoint's drafter as its draft model:

* 04-24 checkpoints, `--speculative-algorithm NEXTN` or `EAGLE`: the MTP block
  (`models.deepseek_v4_mtp`, the core's `mtp_streams_paged`; draft step i feeds the MTP its own
  streams and the previous draft);
* -0731 / -0813 refreshes, `--speculative-algorithm DSPARK`: SGLang runs DSPARK only in its own
  `DSparkWorkerV2`, on CUDA/NPU/XPU, over its native V4 model. `serve_dspark_with_eagle` turns the request
  into EAGLE with k = gamma drafts (`--speculative-num-draft-tokens` - 1, default
  dspark_block_size) and the draft `models.deepseek_v4_dspark`: the target hands it the
  `dspark_features` of every row it verified; the draft extend writes the stages' context and runs
  one block per sequence after its newest token; each draft step is one Markov-head pick over the
  block's rows, which the draft carries as its hidden states.

The plugin supplies what the worker looks up for our architecture:

* the draft architecture: SGLang's `ModelConfig` turns a draft config of `DeepseekV4ForCausalLM`
  into its native `...NextN` / `...DSpark`, which expect SGLang's native V4 model hooks. Under our
  renamed architecture it does nothing, so `configure_model_config` names the draft `MTP_ARCH` or
  `DSPARK_ARCH`. It also gives our configs what SGLang's native V4 config carries: no per-layer
  SWA split (`is_deepseek_v4_arch`) and the widths of the hidden states the worker hands on
  (`spec_hidden_size`);
* `check_request`: the checkpoint against the requested drafter (`capacity.plan_sglang_speculation`:
  MTP on a DSpark checkpoint, DSpark on a 04-24 one, more drafts than dspark_block_size, topk > 1),
  while SGLang resolves its server arguments, so `sgl.Engine` / `launch_server` fail with the core's
  message;
* the per-step attention backends of the multi-step draft (`V4MultiStepDraftBackend`) and the draft's
  extend backend, given to SGLang's `DraftBackendFactory` for our backend name (the backend itself
  plans verify and draft-extend steps, `backend.V4PluginAttnBackend`).

The drafter's window caches are a pool of their own (`pools.V4TokenToKVPool` over
`v4_plugin.runtime.drafting.draft_layer_types`) on the slots of SGLang's shared hybrid-SWA allocator: rows
live and die with the target's window slots.
"""

from __future__ import annotations

import logging

import torch

from v4_plugin.runtime.drafting import SpeculativeConfigError, SpeculativePlan

from . import BACKEND_NAME, DSPARK_ARCH, MTP_ARCH, PLUGIN_ARCH, is_ours
from .backend import V4PluginAttnBackend, step_metadata
from .capacity import plan_sglang_speculation
from .pools import v4_config_of

logger = logging.getLogger(__name__)


def drafts_requested(cfg) -> int | None:
    """Drafts per step from SGLang's arguments (`cfg`: a resolving view of ServerArgs): EAGLE chains
    draft `--speculative-num-steps` tokens, DSpark `--speculative-num-draft-tokens` - 1 (SGLang's gamma)."""
    if cfg.speculative_algorithm.upper() == "DSPARK":
        n = cfg.speculative_num_draft_tokens
        return None if n is None else int(n) - 1
    n = cfg.speculative_num_steps
    return None if n is None else int(n)


def check_request(server_args, v4_cfg) -> SpeculativePlan | None:
    """The checkpoint against the requested drafter: its `SpeculativePlan`, None without drafting;
    `SpeculativeConfigError` names the flags and the config fields."""
    from sglang.srt.arg_groups.overrides import resolving_view

    cfg = resolving_view(server_args)
    if cfg.speculative_algorithm is None:
        return None
    try:
        plan = plan_sglang_speculation(v4_cfg, cfg.speculative_algorithm, drafts_requested(cfg))
    except SpeculativeConfigError as e:
        raise SpeculativeConfigError(f"--speculative-algorithm {cfg.speculative_algorithm} "
                                     f"(--speculative-num-steps {cfg.speculative_num_steps}, "
                                     f"--speculative-num-draft-tokens {cfg.speculative_num_draft_tokens}): {e}") from None
    topk = cfg.speculative_eagle_topk
    if topk is not None and int(topk) != 1:
        raise SpeculativeConfigError(f"--speculative-eagle-topk {topk}: DeepSeek-V4 drafts chains only "
                                     "(--speculative-eagle-topk 1)")
    return plan


def serve_dspark_with_eagle(server_args, previous) -> None:
    """Resolution hook around SGLang's `handle_speculative_decoding`: for our architecture, DSPARK becomes
    SGLang's EAGLE worker with the plugin's DSpark draft, k = gamma drafts per verify step."""
    from sglang.srt.arg_groups.model_override_base import model_config_of
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    cfg = resolving_view(server_args)
    if (cfg.speculative_algorithm or "").upper() == "DSPARK" and \
            model_config_of(server_args).hf_config.architectures[0] == PLUGIN_ARCH:
        k = check_request(server_args, v4_config_of(cfg)).num_speculative_tokens
        logger.info("deepseek-v4-plugin: --speculative-algorithm DSPARK -> SGLang's EAGLE worker with the "
                    "plugin's DSpark draft (%s), %d drafts per verify step", DSPARK_ARCH, k)
        declare_resolution(server_args, "deepseek-v4-plugin", speculative_algorithm="EAGLE", speculative_num_steps=k,
                           speculative_eagle_topk=1, speculative_num_draft_tokens=k + 1)
    previous(server_args)


def configure_model_config(result, model_config, *args, **kwargs):
    """AFTER `ModelConfig._derive_hybrid_model`, for our architecture: native-V4 pool semantics, the
    width of the hidden states the EAGLE worker hands on (`spec_hidden_size`) and, for a draft config,
    the draft architecture of the checkpoint's drafter (the request was checked by `check_request`)."""
    if not is_ours(model_config.hf_config):
        return result
    archs = model_config.hf_config.architectures
    model_config.is_deepseek_v4_arch = True  # SGLang: no per-layer SWA split of the draft's KV
    text = model_config.hf_text_config
    hc_mult, width = int(getattr(text, "hc_mult", 1)), model_config.hidden_size
    model_config.hc_hidden_size = hc_mult * width
    dspark = getattr(text, "dspark_target_layer_ids", None) is not None
    if model_config.is_draft_model and archs[0] == PLUGIN_ARCH:
        archs[0] = DSPARK_ARCH if dspark else MTP_ARCH
        # SGLang's draft bookkeeping: one layer (MTP depth 0 serves every draft; the stages' windows are our pool's)
        model_config.hf_config.num_nextn_predict_layers = 1
        model_config.num_nextn_predict_layers = 1
    if not dspark:  # the target and the MTP draft hand on pre-hc_head streams
        model_config.spec_hidden_size = hc_mult * width
    elif model_config.is_draft_model:  # the DSpark draft carries its block's rows between draft steps
        model_config.spec_hidden_size = int(text.dspark_block_size) * width
    else:  # the target hands the DSpark draft the features of its target layers
        model_config.spec_hidden_size = len(text.dspark_target_layer_ids) * width
    return result


# ---- attention metadata ----------------------------------------------------------------------------
class V4MultiStepDraftBackend:
    """SGLang's multi-step draft backend for our draft models: `attn_backends[i]` serves draft step
    i + 1 of a chain, one token per sequence at position seq_len + i (the anchor's position is
    seq_len; step i feeds the i+1-th draft token)."""

    def __init__(self, model_runner, topk: int, speculative_num_steps: int):
        if topk != 1:
            raise ValueError(f"{BACKEND_NAME}: DeepSeek-V4 drafts chains only (--speculative-eagle-topk 1, "
                             f"got {topk})")
        self.topk, self.speculative_num_steps = topk, speculative_num_steps
        self.attn_backends = [V4PluginAttnBackend(model_runner) for _ in range(speculative_num_steps - 1)]

    def init_forward_metadata(self, forward_batch):
        bs, positions = forward_batch.batch_size, forward_batch.positions
        max_len = int(positions.max()) + 1
        for i, backend in enumerate(self.attn_backends):
            backend.forward_metadata = step_metadata(backend, forward_batch, positions + i,
                                                     torch.ones(bs, dtype=torch.long), max_len + i)


def _ours(factory) -> bool:
    return is_ours(factory.draft_model_runner.model_config.hf_config)


def create_decode_backend(original, factory, *args, **kwargs):
    """AROUND `DraftBackendFactory.create_decode_backend`: ours for our draft models (None for one step)."""
    if not _ours(factory):
        return original(factory, *args, **kwargs)
    if factory.speculative_num_steps <= 1:
        return None
    return V4MultiStepDraftBackend(factory.draft_model_runner, factory.topk, factory.speculative_num_steps)


def create_draft_extend_backend(original, factory, *args, **kwargs):
    """AROUND `DraftBackendFactory.create_draft_extend_backend`: ours for our draft models."""
    if not _ours(factory):
        return original(factory, *args, **kwargs)
    backend = V4PluginAttnBackend(factory.draft_model_runner)
    backend.prefill_attention_backend_str = backend.decode_attention_backend_str = BACKEND_NAME
    return backend


# ---- SGLang's chain-tree kernels on CPU ------------------------------------------------------------
# SGLang builds and verifies the draft tree with CUDA/HIP kernels, `sgl_kernel`'s CPU build (absent
# here: `is_cpu()` is False in this CPU setup) or Triton (XPU). Off those platforms it has none
# (`NameError: name 'sgl_build_tree_kernel_efficient' is not defined`), so on CPU tensors the
# plugin runs SGLang's own Triton versions, which the Triton interpreter executes
# (TRITON_INTERPRET=1, as the tests set it without a GPU).
def build_tree_on_cpu(original, *args, **kwargs):
    """AROUND eagle_utils' `build_tree_kernel_efficient_func` (same positional arguments)."""
    from sglang.kernels.ops.speculative import spec_tree

    return _on_cpu(original, spec_tree.sgl_build_tree_kernel_triton, args, kwargs, {"top_scores_index": "selected_index",
                   "seq_lens": "verified_seq_len", "spec_steps": "depth", "num_verify_tokens": "draft_token_num"})


def verify_tree_on_cpu(original, *args, **kwargs):
    """AROUND eagle_utils' `verify_tree_greedy_func`."""
    from sglang.kernels.ops.speculative import spec_tree

    bound = _bind(original, args, kwargs)
    if bound["predicts"].device.type != "cpu":
        return original(*args, **kwargs)
    bound.pop("topk", None)
    spec_tree.verify_tree_greedy_triton(**bound)
    return bound["predicts"], bound["accept_index"], bound["accept_token_num"]


def _bind(fn, args, kwargs) -> dict:
    import inspect

    return dict(inspect.signature(fn).bind(*args, **kwargs).arguments)


def _on_cpu(original, triton_fn, args, kwargs, renames: dict[str, str]):
    bound = _bind(original, args, kwargs)
    if next(iter(bound.values())).device.type != "cpu":
        return original(*args, **kwargs)
    return triton_fn(**{renames.get(k, k): v for k, v in bound.items()})
