"""`vllm.general_plugins` entry point: make vLLM serve DeepSeek-V4 with this project's implementation.

`register()` runs in every vLLM process (API server, engine core, workers, the registry's
inspection subprocess), so it is cheap and idempotent, and it imports none of the adapter's model
classes: they are registered by string and load only where the model is built.

What it does, unless `V4_PLUGIN_DISABLE=1` (then vLLM's native `DeepseekV4ForCausalLM` serves):

* registers `DeepseekV4ForCausalLM` (overwriting vLLM's entry: the last registration wins) and the
  distinct name `DeepseekV4PluginForCausalLM` (for A/B runs through `--hf-overrides`, registered
  even when disabled), and the MTP draft architecture `DeepSeekV4MTPModel` (`mtp.py`);
* extends the config class vLLM uses for `model_type` deepseek_v4 to the transformers dialect
  (`hf_config.py`);
* replaces vLLM's per-architecture config hook for those names (`MODELS_CONFIG_MAP`): the native
  hook rewrites `quant_method` fp8 -> deepseek_v4_fp8 for its own FP8 layers; ours tells vLLM the
  checkpoint is loaded by the plugin (no vLLM quantization method), and fixes the block size to 256;
* validates the checkpoint (config.json; a local directory's index against the shards' headers) in
  that hook, when vLLM builds its model config, before any engine or worker starts;
* keeps chunked prefill and prefix caching on for our architectures on CPUs without AMX, where
  vLLM's CPU platform turns both off for every MLA model (`model_type` deepseek_v4 sets `use_mla`),
  and mutes that platform's lines that would say otherwise (or name a block size the user never gave);
* makes vLLM's "Loading weights took N seconds" true for our models (`_time_weight_loading`), and
  answers `/detokenize` ids outside the vocabulary with HTTP 400 (`_check_detokenize_ids`);
* renders chats with `v4_plugin.text.chat` and the checkpoint's effort profile: the `deepseek_v4`
  tokenizer mode (vLLM's default for the architecture) loads `chat.DeepseekV4PluginTokenizer`.

The tool-call and reasoning parsers (`parsers.py`, name `deepseek_v4_plugin`) are offered even when
disabled: they are selected by name on the command line.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from v4_plugin.checkpoint.config import load_config
from v4_plugin.checkpoint.loader import validate_checkpoint
from v4_plugin.checkpoint.sharding import Parallelism, check_parallelism as check_parallelism_of
from v4_plugin.runtime.drafting import Method
from v4_plugin.serving.logs import MutedLines
from v4_plugin.serving.settings import Settings, kv_storage, resolve_model_dir

from .capacity import BLOCK as BLOCK_SIZE
from .capacity import method_of, plan_vllm_speculation
from .chat import install_chat_encoding
from .parsers import register_parsers

logger = logging.getLogger("vllm.deepseek_v4_plugin")  # a child of vLLM's logger: same handlers

ARCH = "DeepseekV4ForCausalLM"
PLUGIN_ARCH = "DeepseekV4PluginForCausalLM"
MODEL_CLASS = "vllm_backend.model:DeepseekV4ForCausalLM"
MTP_ARCH = "DeepSeekV4MTPModel"  # the draft architecture vLLM resolves for method "mtp" on DeepSeek-V4
MTP_CLASS = "vllm_backend.mtp:DeepseekV4MTP"
TESTED_VLLM = ((0, 32), (0, 33))  # minor versions whose internals this adapter was written against

_state = {"registered": False}


def disabled() -> bool:
    """True when the user handed DeepSeek-V4 back to vLLM's native implementation (V4_PLUGIN_DISABLE)."""
    return Settings.from_env().disabled


def served_architectures() -> tuple[str, ...]:
    """Architecture names this plugin serves in this process."""
    return (PLUGIN_ARCH,) if disabled() else (ARCH, PLUGIN_ARCH)


def _vllm_minor() -> tuple[int, int] | None:
    import vllm

    try:
        major, minor = vllm.__version__.split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return None


def register() -> None:
    """Entry point (`vllm.general_plugins`). Safe to call any number of times."""
    from vllm.model_executor.models import ModelRegistry

    version = _vllm_minor()
    if version not in TESTED_VLLM and not _state["registered"]:
        logger.warning("deepseek-v4-plugin: vLLM %s is outside the tested versions %s; registering anyway",
                       version, ", ".join(f"{a}.{b}" for a, b in TESTED_VLLM))
    register_parsers()  # selected by name (--tool-call-parser / --reasoning-parser), so always offered
    for arch in served_architectures():
        ModelRegistry.register_model(arch, MODEL_CLASS)
        _install_config_hook(arch)
    if not disabled():
        ModelRegistry.register_model(MTP_ARCH, MTP_CLASS)
        _install_config_class()
        install_chat_encoding()
    _keep_chunked_prefill_and_prefix_caching_on_cpu()
    _time_weight_loading()
    _check_detokenize_ids()
    _state["registered"] = True


# ---- config class keyed by model_type ---------------------------------------------------------------
def _install_config_class() -> None:
    """vLLM 0.32's own `DeepseekV4Config`, extended to read transformers-dialect config.json files.
    vLLM 0.33 has no config class of its own for deepseek_v4: it reads config.json with transformers'
    `DeepseekV4Config`, which reads both dialects, so there is nothing to install."""
    import importlib.util

    if importlib.util.find_spec("vllm.transformers_utils.configs.deepseek_v4") is None:
        return
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    from .hf_config import DeepseekV4PluginHFConfig

    _CONFIG_REGISTRY["deepseek_v4"] = DeepseekV4PluginHFConfig


# ---- parallelism ---------------------------------------------------------------------------------
def check_parallelism(parallel_config, cfg) -> Parallelism:
    """The split of the model that vLLM's parallel config asks for, or a `ValueError` naming the flag and
    the checkpoint field: tensor parallelism T is served (each rank holds its slices of the heads, output
    groups, shared expert, vocabulary and routed experts, by expert range with --enable-expert-parallel,
    else by intermediate dimension: `v4_plugin.checkpoint.sharding.check_parallelism`); every T-rank
    replica runs every step and holds the whole KV cache (one KV head). Pipeline parallelism is refused,
    and so is expert parallelism across data-parallel replicas (the core's collectives span one replica's
    tensor-parallel group: its MoE does not exchange tokens between replicas). Raised by the config hook
    when vLLM builds its config, before any engine or worker process starts, and again by the model."""
    tp, pp, dp = (parallel_config.tensor_parallel_size, parallel_config.pipeline_parallel_size,
                  parallel_config.data_parallel_size)
    ep = bool(parallel_config.enable_expert_parallel)
    if pp > 1:
        raise ValueError(f"deepseek-v4-plugin: --pipeline-parallel-size {pp} is not implemented; use "
                         f"--tensor-parallel-size N or --data-parallel-size N for several GPUs, or "
                         f"V4_PLUGIN_DISABLE=1 for vLLM's native DeepSeek-V4")
    if ep and dp > 1:
        raise ValueError(f"deepseek-v4-plugin: --enable-expert-parallel with --data-parallel-size {dp} is not "
                         f"implemented (experts split across data-parallel replicas need the MoE to exchange "
                         f"tokens between them); use --tensor-parallel-size {tp * dp} --enable-expert-parallel, "
                         f"or --data-parallel-size {dp} without expert parallelism (whole experts per replica)")
    par = Parallelism(tp, 1, ep)
    flags = f"--tensor-parallel-size {tp}" + (" --enable-expert-parallel" if ep else "")
    check_parallelism_of(cfg, par, where=f"deepseek-v4-plugin: {flags}")
    return par


# ---- speculative decoding --------------------------------------------------------------------------
def check_speculation(vllm_config) -> None:
    """Validate `--speculative-config` against the checkpoint when vLLM builds its config (before its
    own model-runner checks): MTP on a DSpark checkpoint, DSpark on a 04-24 checkpoint, or more drafts
    than `dspark_block_size` raise `v4_plugin.runtime.drafting.SpeculativeConfigError` naming the fields. A
    valid DSpark request is rewritten to vLLM's `custom_class` proposer hook (`dspark.py`)."""
    spec = vllm_config.speculative_config
    if spec is None or method_of(spec.method) is None:  # ngram, suffix, ...: no V4 drafter involved
        return
    model_config = vllm_config.model_config
    cfg = load_config(resolve_model_dir(model_config.model, model_config.revision, config_only=True))
    plan = plan_vllm_speculation(cfg, spec.method, spec.num_speculative_tokens)
    if plan.method is Method.DSPARK:
        from .dspark import PROPOSER

        spec.method, spec.model = "custom_class", PROPOSER
        logger.info("deepseek-v4-plugin: DSpark drafting (%d tokens per step) through the plugin's proposer %s "
                    "(vLLM's own DSpark path needs its V2 GPU model runner and native model)",
                    plan.num_speculative_tokens, PROPOSER)


# ---- checkpoint ----------------------------------------------------------------------------------
def validate_checkpoint_of(model_config) -> None:
    """Check the served checkpoint while vLLM builds its model config, in the API process before any
    engine or worker starts: `config.json` and, for a local directory, its index against the shards'
    headers (`v4_plugin.checkpoint.loader.validate_checkpoint`: errors name the file, field or tensor). A hub
    id's config.json is checked here; its weights are checked when the worker has downloaded them."""
    if Path(model_config.model).is_dir():
        validate_checkpoint(Path(model_config.model))
        return
    load_config(resolve_model_dir(model_config.model, model_config.revision, config_only=True))


# ---- per-architecture config hook ------------------------------------------------------------------
def _install_config_hook(arch: str) -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP[arch] = _config_hook_class()


_HOOK: list = []


def _config_hook_class():
    """`VerifyAndUpdateConfig` subclass for our architectures (built once, on first use)."""
    if _HOOK:
        return _HOOK[0]
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class DeepseekV4PluginConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            validate_checkpoint_of(model_config)
            # The core's loader dequantizes the FP8/FP4 checkpoint itself; vLLM must not build its own
            # quantized layers (native rewrites fp8 -> deepseek_v4_fp8 for those). Runs before
            # ModelConfig._verify_quantization, which reads model_arch_config.quantization_config.
            arch_cfg = getattr(model_config, "model_arch_config", None)
            if arch_cfg is not None and getattr(arch_cfg, "quantization_config", None) is not None:
                arch_cfg.quantization_config = None
            if getattr(model_config, "quantization", None) in ("fp8", "deepseek_v4_fp8"):
                model_config.quantization = None

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            model_config = vllm_config.model_config
            cfg = load_config(resolve_model_dir(model_config.model, model_config.revision, config_only=True))
            check_parallelism(vllm_config.parallel_config, cfg)
            cache_config = vllm_config.cache_config
            if cache_config.user_specified_block_size and cache_config.block_size != BLOCK_SIZE:
                logger.warning("deepseek-v4-plugin: block size %s overridden to %d (whole C128 entries per block)",
                               cache_config.block_size, BLOCK_SIZE)
            cache_config.block_size = BLOCK_SIZE
            cache_config.user_specified_block_size = True
            kv_storage(cache_config.cache_dtype)  # a --kv-cache-dtype the plugin does not serve: an error naming it
            check_speculation(vllm_config)

    _HOOK.append(DeepseekV4PluginConfig)
    return DeepseekV4PluginConfig


# ---- CPU platform: keep chunked prefill and prefix caching -----------------------------------------
def _serves(model_config) -> bool:
    """True when `model_config` (vLLM's ModelConfig, or None) is a model this plugin serves."""
    archs = getattr(model_config, "architectures", None) or []
    return any(a in served_architectures() for a in archs)


def _ours(vllm_config) -> bool:
    return _serves(vllm_config.model_config)


CPU_PLATFORM_LOGGER = "vllm.platforms.cpu"
MISLEADING_CPU_LINES = ("MLA is enabled on a non-GPU platform", "DeepSeek-V4 CPU backend requires block_size")
"""What `CpuPlatform.check_and_update_config` says for deepseek_v4 that is not what happens to our model:
chunked prefill and prefix caching stay on (below), and the block size is the plugin's (set by its config
hook, which reports a user's --block-size it replaces; vLLM's warning would also name the engine's
internal smallest group block size, after the KV cache is built, as if the user had given it)."""


def _keep_chunked_prefill_and_prefix_caching_on_cpu() -> None:
    """Wrap `CpuPlatform.check_and_update_config` so that, for our architectures only, the MLA branch
    ("MLA is enabled on a non-GPU platform; forcing chunked prefill and prefix caching to be
    disabled") is undone. Our caches are paged by vLLM's block manager like any attention cache, so
    both features are exact for us (tests prove it)."""
    try:
        from vllm.platforms.cpu import CpuPlatform
    except Exception:  # not a CPU build of vLLM
        return
    original = CpuPlatform.__dict__["check_and_update_config"]
    inner = original.__func__
    if getattr(inner, "_v4_plugin_wrapped", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        if not _ours(vllm_config):
            return inner(cls, vllm_config)
        sched, cache = vllm_config.scheduler_config, vllm_config.cache_config
        before = (sched.enable_chunked_prefill, cache.enable_prefix_caching, sched.max_num_batched_tokens)
        with MutedLines(CPU_PLATFORM_LOGGER, *MISLEADING_CPU_LINES):
            inner(cls, vllm_config)
        after = (sched.enable_chunked_prefill, cache.enable_prefix_caching, sched.max_num_batched_tokens)
        if after != before:
            sched.enable_chunked_prefill, cache.enable_prefix_caching, sched.max_num_batched_tokens = before
            logger.info("deepseek-v4-plugin: chunked prefill=%s and prefix caching=%s on CPU (the plugin's "
                        "paged caches support both; vLLM's CPU platform would turn them off for MLA models "
                        "without AMX)", before[0], before[1])

    check_and_update_config._v4_plugin_wrapped = True
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


# ---- weight loading: vLLM's timer ------------------------------------------------------------------
def _time_weight_loading() -> None:
    """Wrap `DefaultModelLoader.load_weights` so that "Loading weights took N seconds" is true for our
    models. vLLM starts that timer when its weight iterator first runs; our models load through the core
    and never run it, so the timer stayed at 0 and the line printed the process's clock. For our models
    the timer starts here, when their `load_weights` is about to run."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    original = DefaultModelLoader.load_weights
    if getattr(original, "_v4_plugin_wrapped", False):
        return

    def load_weights(self, model, model_config) -> None:
        if type(model).__module__.startswith(__package__ + "."):  # the model or its MTP / DSpark drafter
            self.counter_before_loading_weights = time.perf_counter()
        return original(self, model, model_config)

    load_weights._v4_plugin_wrapped = True
    DefaultModelLoader.load_weights = load_weights


# ---- /detokenize: ids outside the model's vocabulary -----------------------------------------------
def _check_detokenize_ids() -> None:
    """Wrap `ServingTokenization.create_detokenize` so that for our models an id outside [0, vocab_size)
    is a 400 naming it, as in vLLM's completions (its /detokenize decodes whatever the tokenizer maps,
    including special tokens the model's vocabulary does not have)."""
    from vllm.entrypoints.serve.tokenize.serving import ServingTokenization

    original = ServingTokenization.create_detokenize
    if getattr(original, "_v4_plugin_wrapped", False):
        return

    async def create_detokenize(self, request, raw_request):
        if _serves(self.model_config):
            from vllm.exceptions import VLLMValidationError

            vocab = self.model_config.get_vocab_size()
            bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise VLLMValidationError(f"Token id {bad} is out of vocabulary: the model has {vocab} token ids, "
                                          f"[0, {vocab})", parameter="tokens", value=bad)
        return await original(self, request, raw_request)

    create_detokenize._v4_plugin_wrapped = True
    ServingTokenization.create_detokenize = create_detokenize
