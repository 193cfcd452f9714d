"""SGLang adapter of the DeepSeek-V4 plugin (a thin layer: no V4 math lives here).

* `plugin.register` is the `sglang.srt.plugins` entry point: it makes SGLang resolve
  DeepSeek-V4 checkpoints to `models.deepseek_v4_plugin`, registers the `v4_plugin` attention
  backend and installs the few hooks that give our memory pools to SGLang's scheduler.
* `models/` is the external model package (`SGLANG_EXTERNAL_MODEL_PACKAGE`): the model class.
* `backend.py` turns SGLang's forward metadata into the core's `BatchPlan` / `LayerCaches`.
* `pools.py` sizes and allocates the window, compressed, indexer and compressor-state caches from
  `v4_plugin.cache.layout`.
* `parallel.py`: the parallel layouts served (`--tp-size`, `--ep-size`), checked in the launching
  process, and the core's `Collectives` over SGLang's tensor-parallel group.
* `capacity.py` (no SGLang import: `v4-plugin kv-plan` uses it): the page size, SGLang's drafter
  names and the model of the pool sizes. The serving switches are the core's (`v4_plugin.serving.settings`).

Written against sglang 0.5.23 (private names are used; see `plugin.TESTED_SGLANG`).
"""

from v4_plugin import __version__

NATIVE_ARCH = "DeepseekV4ForCausalLM"  # what V4 checkpoints name in config.json
PLUGIN_ARCH = "DeepseekV4PluginForCausalLM"  # the name SGLang sees once the plugin is active
# Draft models of SGLang's EAGLE worker (`speculative`): the 04-24 MTP block, the refreshes' DSpark
# stages, and for tests the MTP draft made to propose a known continuation (`models.replay_draft`).
MTP_ARCH = "DeepseekV4PluginForCausalLMNextN"
DSPARK_ARCH = "DeepseekV4PluginForCausalLMDSpark"
REPLAY_ARCH = "DeepseekV4PluginReplayDraft"
ARCHS = (PLUGIN_ARCH, MTP_ARCH, DSPARK_ARCH, REPLAY_ARCH)  # the served model and its draft models
BACKEND_NAME = "v4_plugin"  # --attention-backend v4_plugin
MODELS_PACKAGE = "sglang_backend.models"
PROJECT = "deepseek-v4-plugin"



def is_ours(hf_config) -> bool:
    """The served model or one of its draft models (`ARCHS`), by the architecture an HF config names first."""
    archs = getattr(hf_config, "architectures", None) or []
    return bool(archs) and archs[0] in ARCHS


__all__ = ["__version__", "NATIVE_ARCH", "PLUGIN_ARCH", "MTP_ARCH", "DSPARK_ARCH", "REPLAY_ARCH", "ARCHS",
           "BACKEND_NAME", "MODELS_PACKAGE", "PROJECT", "is_ours"]
