"""SGLang's chat path for DeepSeek-V4: prompts rendered by `v4_plugin.text.chat` with the checkpoint's
reasoning-effort profile, and one thinking rule for the prompt and the reasoning parser.

SGLang picks a chat encoding "spec" per model (`chat_encoding.resolve_chat_encoding_spec`); for a
`DeepseekV4*` architecture it is `dsv4`, rendered by the deepseek-recipe package with the
-0731 / -0813 effort mapping only (a 04-24 checkpoint would get the "Absolute maximum" preamble for
the default effort, one tier too strong). :func:`install_chat_encoding` adds the spec
`v4_plugin` for our architecture (whatever `--tool-call-parser` is given), whose adapter renders
with :func:`v4_plugin.text.chat.encode_request` and the checkpoint's profile
(:func:`v4_plugin.text.chat.detect_profile`; override with `V4_PLUGIN_EFFORT_PROFILE`). Real checkpoints
ship no Jinja template; any template a checkpoint carries is unused. Completions are parsed by the
text parsers given on the command line (`--reasoning-parser` / `--tool-call-parser
deepseek_v4_plugin`, see `parsers.py`).

Thinking, for the prompt and for the reasoning parser alike, is
:func:`v4_plugin.text.chat.request_thinking`: on unless `chat_template_kwargs` sets `thinking` /
`enable_thinking` false or the effort (`reasoning_effort`, request field or template kwarg) is
`"none"` (SGLang alone would render `dsv4` prompts in chat mode unless `thinking` is true, and
force reasoning unless it is false). An effort the profile does not know raises ValueError, which
SGLang answers with HTTP 400 (the message lists the allowed names).
"""

from __future__ import annotations

from typing import Any

from v4_plugin.text.chat import EffortProfile, detect_profile, encode_request_ids, request_thinking
from v4_plugin.text.tools import check_tool_schemas

from . import is_ours
from .parsers import PARSER_NAME

SPEC = "v4_plugin"
"""Our chat encoding spec name (SGLang's `OpenAIServingChat.chat_encoding_spec`)."""

RESOLVE_SPEC = "sglang.srt.entrypoints.openai.chat_encoding.resolve_chat_encoding_spec"
SERVING_CHAT = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat"
THINKING_REQUESTED = f"{SERVING_CHAT}._thinking_requested"
REASONING_FROM_REQUEST = f"{SERVING_CHAT}._get_reasoning_from_request"
VALIDATE_REQUEST = f"{SERVING_CHAT}._validate_request"
SERVING_TOKENIZE = "sglang.srt.entrypoints.openai.serving_tokenize.OpenAIServingTokenize"
TOKENIZE_CHAT = f"{SERVING_TOKENIZE}._tokenize_chat_request"
TOKENIZE = f"{SERVING_TOKENIZE}._handle_non_streaming_request"


def install_chat_encoding() -> None:
    """Register the `v4_plugin` chat encoding and the hooks that select it (idempotent)."""
    from sglang.srt.entrypoints.openai import chat_encoding_adapters
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    chat_encoding_adapters._BUILDERS[SPEC] = {"builtin": build_adapter}
    HookRegistry.register(RESOLVE_SPEC, resolve_spec, HookType.AROUND)
    HookRegistry.register(THINKING_REQUESTED, thinking_requested, HookType.AROUND)
    HookRegistry.register(REASONING_FROM_REQUEST, reasoning_from_request, HookType.AROUND)
    HookRegistry.register(VALIDATE_REQUEST, validate_request, HookType.AROUND)
    HookRegistry.register(TOKENIZE_CHAT, tokenize_chat_request, HookType.AROUND)
    HookRegistry.register(TOKENIZE, tokenize, HookType.AROUND)


def resolve_spec(original, *args, **kwargs) -> str | None:
    """AROUND `resolve_chat_encoding_spec`: `v4_plugin` for our architecture, else SGLang's answer."""
    hf_config = kwargs.get("hf_config", args[0] if args else None)
    return SPEC if hf_config is not None and is_ours(hf_config) else original(*args, **kwargs)


def _request_thinking(request: Any) -> bool:
    return request_thinking(getattr(request, "chat_template_kwargs", None), getattr(request, "reasoning_effort", None))


def thinking_requested(original, self, request) -> bool:
    """AROUND `OpenAIServingChat._thinking_requested` (the thinking the prompt is rendered with)."""
    return _request_thinking(request) if self.chat_encoding_spec == SPEC else original(self, request)


def reasoning_from_request(original, self, request) -> bool:
    """AROUND `OpenAIServingChat._get_reasoning_from_request` (whether the completion starts inside
    the reasoning): the prompt's rule when our reasoning parser is in use."""
    return _request_thinking(request) if self.reasoning_parser == PARSER_NAME else original(self, request)


def validate_request(original, self, request) -> str | None:
    """AROUND `OpenAIServingChat._validate_request` (an error message answered with HTTP 400, or None):
    SGLang's checks first (they rewrite database-style type names such as "varchar" in tool schemas
    in place and name a tool with an invalid `parameters` schema by its index only), then, for our
    encoding, :func:`v4_plugin.text.tools.check_tool_schemas`, whose message names the tool."""
    error = original(self, request)
    if error is None or self.chat_encoding_spec != SPEC:
        return error
    try:
        check_tool_schemas(tool.model_dump() for tool in self._effective_tools(request))
    except ValueError as exc:
        return str(exc)
    return error


def tokenize_chat_request(original, self, request) -> list[int]:
    """AROUND `OpenAIServingTokenize._tokenize_chat_request` (`/tokenize` with `messages`): SGLang
    refuses `add_generation_prompt` for every encoding but a Jinja template; ours renders it as the
    chat path does (it reaches the adapter as a template kwarg)."""
    chat = self.chat_serving
    if chat is None or chat.chat_encoding_spec != SPEC or request.add_generation_prompt is None:
        return original(self, request)
    kwargs = {**(request.chat_template_kwargs or {}), "add_generation_prompt": request.add_generation_prompt}
    return original(self, request.model_copy(update={"add_generation_prompt": None, "chat_template_kwargs": kwargs}))


async def tokenize(original, self, *args, **kwargs):
    """AROUND `OpenAIServingTokenize._handle_non_streaming_request`: for our architecture `max_model_len`
    is the context length served (as `/v1/models` says), not the tokenizer's `model_max_length`."""
    response = await original(self, *args, **kwargs)
    model_config = self.tokenizer_manager.model_config
    if hasattr(response, "max_model_len") and is_ours(model_config.hf_config):
        response.max_model_len = model_config.context_len
    return response


def build_adapter(ctx) -> V4PluginChatEncodingAdapter | None:
    """SGLang's adapter builder for the `v4_plugin` spec (`ChatEncodingAdapterContext` -> adapter)."""
    if ctx.tokenizer is None:
        return None  # --skip-tokenizer-init: the server encodes no chat prompts
    return V4PluginChatEncodingAdapter(ctx.tokenizer, detect_profile(ctx.model_path))


class V4PluginChatEncodingAdapter:
    """SGLang `ChatEncodingAdapter`: prompt ids from :func:`v4_plugin.text.chat.encode_request`.

    Args:
        tokenizer: the checkpoint's Hugging Face tokenizer.
        profile: the checkpoint's effort profile.
    """

    collects_openai_media = False  # text only
    strict_tool_call_arguments = True  # history arguments must be JSON objects (checked by SGLang)

    def __init__(self, tokenizer: Any, profile: EffortProfile) -> None:
        self.tokenizer = tokenizer
        self.profile = profile

    @property
    def output(self) -> None:
        """Completions go through the text parsers given on the command line."""
        return None

    def encode_messages(self, *, messages: list[dict[str, Any]], request: Any, tools: list[dict] | None,
                        thinking: bool, image_data: list) -> list[int]:
        """Prompt token ids of `messages` (SGLang's dumps of the request's messages) with `tools` (the
        request's tools that apply, OpenAI format) in thinking mode `thinking` (decided by
        :func:`thinking_requested`)."""
        kwargs = {**(request.chat_template_kwargs or {}), "thinking": thinking}
        kwargs.pop("enable_thinking", None)
        kwargs["continue_final_message"] = bool(request.continue_final_message)
        # `/tokenize` passes its `add_generation_prompt` here (see :func:`tokenize_chat_request`)
        add_generation_prompt = kwargs.pop("add_generation_prompt", not request.continue_final_message)
        # V4_PLUGIN_SPECIAL_TOKENS_IN_TEXT applies (v4_plugin.text.chat.encode_request_ids)
        return encode_request_ids(self.tokenizer, messages, tools=tools, chat_template_kwargs=kwargs,
                                  reasoning_effort=request.reasoning_effort, profile=self.profile,
                                  add_generation_prompt=add_generation_prompt)
