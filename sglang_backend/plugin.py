"""`sglang.srt.plugins` entry point: make SGLang serve DeepSeek-V4 with this project's implementation.

SGLang calls `register()` in every process (main, each scheduler, detokenizer, DP controller), before
it parses server arguments there, so it is cheap and idempotent. Unless `V4_PLUGIN_DISABLE=1` (then
SGLang's native DeepSeek-V4 code serves, untouched), it:

1. points `SGLANG_EXTERNAL_MODEL_PACKAGE` at `sglang_backend.models` (children inherit it). SGLang
   then resolves architectures from our package first, without importing its ~260 built-in models;
   on a name clash the external class wins (`DeepseekV4ForCausalLM` included);
2. renames the architecture of a DeepSeek-V4 config from `DeepseekV4ForCausalLM` to
   `DeepseekV4PluginForCausalLM` when SGLang loads it (an AFTER hook on
   `sglang.srt.utils.hf_transformers.config.get_config`). SGLang keys five native paths on the
   architecture string (the `dsv4` backend and page size 256, the DSV4 pool configurator and pool,
   MLA shape derivation, FP8 defaults); none of them can run on CPU, SM80 or SM89. Under the new
   name none of them fires and SGLang treats the model as one MQA head of head_dim;
3. adds `v4_plugin` to `--attention-backend` choices and to the attention-backend registry, and
   makes it (with page size 128) the default for our architecture;
4. opts the model into SGLang's hybrid-SWA memory (`is_hybrid_swa` on the renamed config: SGLang
   then builds its `SWATokenToKVPoolAllocator`, frees window slots leaving the window and uses its
   SWA-aware radix cache) and hooks SGLang's pool sizing (`create_memory_pool_configurator`) and
   pool construction (`KVCacheConfigurator._build_token_to_kv_pool`) for our architecture only: the
   caches are the core's layout (`sglang_backend.pools`), sized by `sglang_backend.capacity`;
5. renders chats for our architecture with `v4_plugin.text.chat` and the checkpoint's effort profile
   (the `v4_plugin` chat encoding, `sglang_backend.chat`);
6. serves `--speculative-algorithm NEXTN/EAGLE` (MTP block) and `DSPARK` (DSpark stages) through
   SGLang's EAGLE worker and refuses drafters the checkpoint does not carry
   (`sglang_backend.speculative`): hooks on SGLang's speculative-argument resolution (DSPARK becomes
   EAGLE with our draft), its model config (the draft architecture) and its draft attention-backend
   factory;
7. checks a local checkpoint (config.json, the index against the shards' headers) when SGLang reads
   its config in the launching process, before any scheduler starts (`validate_checkpoint`), and the
   parallel layout against it when SGLang resolves the server arguments there (`model_defaults`:
   `--tp-size` and `--ep-size` the checkpoint's heads, output groups and experts divide,
   `sglang_backend.parallel`), and
   answers requests whose token ids are outside the vocabulary (or that ask for more top logprobs
   than it has) with HTTP 400 where SGLang validates requests (`check_request`, `detokenize`): the
   scheduler would otherwise fail on them and take the server down;
8. replaces SGLang's startup lines about the tokenizer's chat template (unused for our model) with
   one saying what renders the chats (`load_chat_template`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from v4_plugin.checkpoint.loader import validate_checkpoint as validate
from v4_plugin.serving.logs import MutedLines
from v4_plugin.serving.settings import DISABLE_ENV, Settings

from . import ARCHS, BACKEND_NAME, MODELS_PACKAGE, NATIVE_ARCH, PLUGIN_ARCH, is_ours
from .capacity import PAGE_SIZE
from .chat import install_chat_encoding
from .parallel import served_parallelism
from .parsers import register_parsers

logger = logging.getLogger(__name__)

TESTED_SGLANG = ("0.5.23",)
EXTERNAL_PACKAGE_ENV = "SGLANG_EXTERNAL_MODEL_PACKAGE"

_state = {"registered": False}


def register() -> None:
    """Entry point (`sglang.srt.plugins`). Safe to call any number of times, in any process."""
    if _state["registered"]:
        return
    register_parsers()  # selected by name (--tool-call-parser / --reasoning-parser), so always offered
    if Settings.from_env().disabled:
        logger.info("deepseek-v4-plugin: %s is set; SGLang's native DeepSeek-V4 serves", DISABLE_ENV)
        _state["registered"] = True
        return
    _check_version()
    _use_external_model_package()
    _register_attention_backend()
    _register_model_defaults()
    _install_hooks()
    install_chat_encoding()
    _state["registered"] = True


def _check_version() -> None:
    try:
        from importlib.metadata import version

        found = version("sglang")
    except Exception:  # noqa: BLE001 - metadata may be missing in odd installs
        return
    if found not in TESTED_SGLANG:
        logger.warning("deepseek-v4-plugin: sglang %s is outside the tested versions %s; registering anyway",
                       found, ", ".join(TESTED_SGLANG))


def _use_external_model_package() -> None:
    current = os.environ.get(EXTERNAL_PACKAGE_ENV)
    if current and current != MODELS_PACKAGE:
        # One package per variable: a user's own package hides ours.
        logger.warning("deepseek-v4-plugin: %s=%s is set by the user; DeepSeek-V4 will not be served by the plugin",
                       EXTERNAL_PACKAGE_ENV, current)
        return
    os.environ[EXTERNAL_PACKAGE_ENV] = MODELS_PACKAGE


def _register_attention_backend() -> None:
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(create_backend)


def create_backend(runner):
    """Attention-backend factory (`ATTENTION_BACKENDS["v4_plugin"]`), called in the scheduler."""
    from .backend import V4PluginAttnBackend

    return V4PluginAttnBackend(runner)


def _register_model_defaults() -> None:
    from sglang.srt.arg_groups.model_override_base import register_model_override

    register_model_override(PLUGIN_ARCH)(model_defaults)


def model_defaults(server_args, hf_config) -> dict:
    """Server-argument defaults for our architecture (SGLang's per-architecture override registry). It runs in
    the launching process, before any scheduler starts: a parallel layout the plugin does not serve, or sizes
    the checkpoint does not divide (`sglang_backend.parallel.served_parallelism`), and a drafter the checkpoint
    does not carry end the launch here."""
    from sglang.srt.arg_groups.overrides import resolving_view

    from .pools import v4_config_of
    from .speculative import check_request

    cfg = resolving_view(server_args)
    v4 = v4_config_of(cfg)
    served_parallelism(cfg, v4)
    check_request(server_args, v4)
    out: dict = {}
    for name in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
        chosen = getattr(cfg, name, None)
        if chosen not in (None, BACKEND_NAME):
            logger.info("deepseek-v4-plugin: attention backend %s -> %s for DeepSeek-V4 (%s)",
                        chosen, BACKEND_NAME, name)
        if name == "attention_backend" or chosen is not None:
            out[name] = BACKEND_NAME
    page = getattr(cfg, "page_size", None)
    if page is None or page % PAGE_SIZE:
        if page not in (None, 1):
            logger.warning("deepseek-v4-plugin: --page-size %s is not a multiple of %d; using %d",
                           page, PAGE_SIZE, PAGE_SIZE)
        out["page_size"] = PAGE_SIZE
    return out


# ---- hooks -----------------------------------------------------------------------------------------
GET_CONFIG = "sglang.srt.utils.hf_transformers.config.get_config"
POOL_CONFIGURATOR = "sglang.srt.model_executor.pool_configurator.create_memory_pool_configurator"
BUILD_POOL = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool"
MODEL_CONFIG = "sglang.srt.configs.model_config.ModelConfig._derive_hybrid_model"
DRAFT_BACKENDS = "sglang.srt.speculative.draft_utils.DraftBackendFactory"
EAGLE_UTILS = "sglang.srt.speculative.eagle_utils"  # its tree kernels, bound by name there
SPECULATIVE_ARGS = "handle_speculative_decoding"  # the server-argument resolution step
VALIDATE_REQUEST = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
DETOKENIZE = "sglang.srt.entrypoints.openai.serving_tokenize.OpenAIServingDetokenize._handle_non_streaming_request"
LOAD_CHAT_TEMPLATE = "sglang.srt.parser.template_manager.TemplateManager.load_chat_template"


def _install_hooks() -> None:
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(GET_CONFIG, validate_checkpoint, HookType.BEFORE)
    HookRegistry.register(GET_CONFIG, rename_architecture, HookType.AFTER)
    HookRegistry.register(VALIDATE_REQUEST, check_request, HookType.BEFORE)
    HookRegistry.register(DETOKENIZE, detokenize, HookType.AROUND)
    HookRegistry.register(LOAD_CHAT_TEMPLATE, load_chat_template, HookType.AROUND)
    HookRegistry.register(POOL_CONFIGURATOR, _pool_configurator, HookType.AROUND)
    HookRegistry.register(BUILD_POOL, _build_pool, HookType.AROUND)
    register_resolution_hook(SPECULATIVE_ARGS)(_speculative("serve_dspark_with_eagle"))
    HookRegistry.register(MODEL_CONFIG, _speculative("configure_model_config"), HookType.AFTER)
    for name in ("create_decode_backend", "create_draft_extend_backend"):
        HookRegistry.register(f"{DRAFT_BACKENDS}.{name}", _speculative(name), HookType.AROUND)
    HookRegistry.register(f"{EAGLE_UTILS}.build_tree_kernel_efficient_func", _speculative("build_tree_on_cpu"),
                          HookType.AROUND)
    HookRegistry.register(f"{EAGLE_UTILS}.verify_tree_greedy_func", _speculative("verify_tree_on_cpu"),
                          HookType.AROUND)


def _speculative(name: str):
    """A hook that imports `sglang_backend.speculative` (SGLang's attention classes) on first call only."""

    def hook(*args, **kwargs):
        from . import speculative

        return getattr(speculative, name)(*args, **kwargs)

    return hook


_validated: set[str] = set()  # checkpoint dirs already validated in this process


def validate_checkpoint(model=None, *args, **kwargs) -> None:
    """BEFORE `get_config(model, ...)`, which SGLang runs in the launching process while it resolves the
    server arguments (before any scheduler starts): a local DeepSeek-V4 checkpoint is checked by the
    core (`v4_plugin.checkpoint.loader.validate_checkpoint`: config.json and the index against the shards'
    headers), so a bad one fails with the plugin's message naming the file and field or tensor instead
    of a transformers error, or a failure in a scheduler after minutes."""
    model = kwargs.get("model", model)
    config_path = Path(str(model)) / "config.json"
    if Settings.from_env().disabled or str(config_path) in _validated or not config_path.is_file():
        return None
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raw = None  # not ours to judge: SGLang reports it
    raw = raw if isinstance(raw, dict) else {}
    archs = raw.get("architectures") or []
    if raw.get("model_type") == "deepseek_v4" or any(a in (NATIVE_ARCH, *ARCHS) for a in archs):
        validate(config_path.parent)  # ConfigError / CheckpointError (ValueError) ends the launch
    _validated.add(str(config_path))
    return None


def token_id_error(ids, vocab: int) -> str | None:
    """Why the token ids `ids` (ints, or lists of ints) cannot be given to a model of `vocab` ids, or None."""
    for token in ids:
        if isinstance(token, list):
            if (error := token_id_error(token, vocab)) is not None:
                return error
        elif type(token) is not int:  # bool and float are refused too
            return f"token ids must be integers, got {token!r}"
        elif not 0 <= token < vocab:
            return f"token id {token} is out of range: the vocabulary has {vocab} ids, [0, {vocab})"
    return None


def check_request(manager, obj, input_ids, *args, **kwargs) -> None:
    """BEFORE `TokenizerManager._validate_one_request(obj, input_ids)` (every generate request, batch
    items one by one, in the HTTP process), for our models: token ids that are not integers in
    [0, vocab_size), or more top log-probabilities than the vocabulary has, are the client's error, a
    ValueError that SGLang answers with HTTP 400 (its scheduler would fail on either, in the embedding
    or the sampler, and take the whole server down)."""
    if not is_ours(manager.model_config.hf_config):
        return None
    vocab = manager.model_config.vocab_size
    if input_ids and (error := token_id_error(input_ids, vocab)) is not None:
        raise ValueError(f"input {error}")
    top = getattr(obj, "top_logprobs_num", None)
    if isinstance(top, int) and not 0 <= top <= vocab:
        raise ValueError(f"top_logprobs_num (logprobs / top_logprobs) {top} is out of range: the vocabulary has "
                         f"{vocab} ids")
    return None


async def detokenize(original, self, adapted_request, request, *args, **kwargs):
    """AROUND `OpenAIServingDetokenize._handle_non_streaming_request`: for our models an id outside the
    vocabulary is a 400 naming it (SGLang answers a negative one with a 500 and decodes the others)."""
    model_config = self.tokenizer_manager.model_config
    if is_ours(model_config.hf_config) and isinstance(request.tokens, list):
        if (error := token_id_error(request.tokens, model_config.vocab_size)) is not None:
            return self.create_error_response(f"Invalid input: {error}", param="tokens")
    return await original(self, adapted_request, request, *args, **kwargs)


TEMPLATE_LOGGER = "sglang.srt.parser.template_manager"
TEMPLATE_LINES = ("Loading chat template from argument", "Using default HuggingFace chat template",
                  "No chat template found", "Auto-detected template features")
"""What SGLang's template manager says about the chat template it found, which our chat encoding never
uses (`sglang_backend.chat` renders with `v4_plugin.text.chat` for our architecture)."""


def load_chat_template(original, self, tokenizer_manager, chat_template_arg=None, *args, **kwargs):
    """AROUND `TemplateManager.load_chat_template`: SGLang still loads it (a `--*-parser auto` is resolved
    from it, and logs so), but for our architecture its lines about the template are replaced by one
    saying what renders the chats."""
    if not is_ours(tokenizer_manager.model_config.hf_config):
        return original(self, tokenizer_manager, chat_template_arg, *args, **kwargs)
    with MutedLines(TEMPLATE_LOGGER, *TEMPLATE_LINES):
        result = original(self, tokenizer_manager, chat_template_arg, *args, **kwargs)
    if tokenizer_manager.tokenizer is None:  # --skip-tokenizer-init: no chats at all
        return result
    unused = f"--chat-template {chat_template_arg}" if chat_template_arg else "the tokenizer's chat template, if any,"
    logger.info("deepseek-v4-plugin: chats are rendered by v4_plugin.text.chat (the checkpoint's DeepSeek-V4 encoding); "
                "%s is not used", unused)
    return result


def rename_architecture(config, *args, **kwargs):
    """AFTER `get_config`: DeepseekV4ForCausalLM -> DeepseekV4PluginForCausalLM, with hybrid-SWA
    memory (in place; the result is cached). A config that already names one of our architectures (a
    draft checkpoint's, such as the test draft `REPLAY_ARCH`) keeps its name and is served the same way."""
    archs = getattr(config, "architectures", None)
    if archs and archs[0] in (NATIVE_ARCH, *ARCHS) and not Settings.from_env().disabled:
        if archs[0] == NATIVE_ARCH:
            config.architectures = [PLUGIN_ARCH, *archs[1:]]
        # SGLang's generic opt-in (configs/model_config.py `is_hybrid_swa_model`): a full pool plus an
        # SWA pool whose slots are recycled once they leave the window (`sglang_backend.pools`).
        config.is_hybrid_swa = True
        # The core loader dequantizes the checkpoint itself: SGLang must not build FP8 linears for it.
        quant = getattr(config, "quantization_config", None)
        if quant is not None:
            config.v4_plugin_quantization_config = quant
            try:
                delattr(config, "quantization_config")
            except AttributeError:
                config.quantization_config = None
    return config


def _pool_configurator(original, kvc, *args, **kwargs):
    if is_ours(kvc.model_config.hf_config):
        from .pools import V4PoolConfigurator

        return V4PoolConfigurator(kvc)
    return original(kvc, *args, **kwargs)


def _build_pool(original, self, *args, **kwargs):
    if is_ours(self.model_config.hf_config):
        from .pools import build_token_pool

        return build_token_pool(self, **kwargs)
    return original(self, *args, **kwargs)
