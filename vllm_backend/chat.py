"""vLLM's chat path for DeepSeek-V4: prompts rendered by `v4_plugin.text.chat` with the checkpoint's
reasoning-effort profile.

vLLM picks `--tokenizer-mode deepseek_v4` for the `DeepseekV4ForCausalLM` architecture (also when
the user passes it) and renders chats with its copy of DeepSeek's refreshed encoder, whose effort
mapping is the -0731 / -0813 one: a 04-24 checkpoint would get the "Absolute maximum" preamble for
the default effort, one tier too strong. :func:`install_chat_encoding` points that tokenizer mode at
:class:`DeepseekV4PluginTokenizer`: the checkpoint's Hugging Face tokenizer whose
`apply_chat_template` is :func:`v4_plugin.text.chat.encode_request` with the profile of the checkpoint
(:func:`v4_plugin.text.chat.detect_profile`; override with `V4_PLUGIN_EFFORT_PROFILE`). Real checkpoints
ship no Jinja template, so this is also what supplies one. vLLM's `DeepseekV4Renderer` (FIM
completions included) stays in place: it calls the tokenizer's `apply_chat_template`.

Request semantics (as vLLM's own V4 mode): thinking on unless `chat_template_kwargs` sets `thinking`
/ `enable_thinking` false or the effort is `"none"`; `reasoning_effort` (request field or template
kwarg) is a name of the profile or one of its aliases, anything else is a ValueError that vLLM
answers with HTTP 400 (the message lists the allowed names).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from functools import cache
from typing import Any

from v4_plugin.text.chat import EffortProfile, detect_profile, encode_request, encode_request_ids
from v4_plugin.text.tools import check_tool_schemas

TOKENIZER_MODE = "deepseek_v4"
"""The vLLM tokenizer mode (and renderer) vLLM uses for DeepSeek-V4 checkpoints."""


def install_chat_encoding() -> None:
    """Make vLLM's `deepseek_v4` tokenizer mode load :class:`DeepseekV4PluginTokenizer` (idempotent).

    The registry entry is replaced in place (vLLM's `register` would log an overwrite warning in
    every process)."""
    from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest
    from vllm.tokenizers.registry import TokenizerRegistry

    TokenizerRegistry.tokenizers[TOKENIZER_MODE] = (__name__, "DeepseekV4PluginTokenizer")
    if not getattr(TokenizeChatRequest.build_chat_params, "v4_plugin", False):
        TokenizeChatRequest.build_chat_params = _with_request_effort(TokenizeChatRequest.build_chat_params)


def _with_request_effort(build_chat_params):
    """`TokenizeChatRequest.build_chat_params` that passes a top-level `reasoning_effort` (an extra field
    of vLLM's `/tokenize` request, which it would ignore) to the renderer as the chat path
    (`ChatCompletionRequest.build_chat_params`) does: as the `reasoning_effort` template kwarg, over one
    in `chat_template_kwargs`, with `enable_thinking` (effort not "none") unless the request sets it."""

    def build(self, *args: Any, **kwargs: Any):
        params = build_chat_params(self, *args, **kwargs)
        effort = (self.model_extra or {}).get("reasoning_effort")
        if effort is None:
            return params
        extra = {"reasoning_effort": effort}
        if "enable_thinking" not in (self.chat_template_kwargs or {}):
            extra["enable_thinking"] = effort != "none"
        return dataclasses.replace(params, chat_template_kwargs={**params.chat_template_kwargs, **extra})

    build.v4_plugin = True
    return build


def with_v4_chat_encoding(tokenizer: Any, profile: EffortProfile) -> Any:
    """A copy of a Hugging Face `tokenizer` whose `apply_chat_template` renders with
    :func:`v4_plugin.text.chat.encode_request` and `profile` (any Jinja template it carries is unused)."""
    wrapped = copy.copy(tokenizer)

    class _V4PluginChatTokenizer(tokenizer.__class__):  # type: ignore[misc, name-defined]
        effort_profile = profile

        def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                                **kwargs: Any) -> str | list[int]:
            """The prompt (text, or token ids when `tokenize`, the default) of `messages`;
            `kwargs` are vLLM's chat-template kwargs (the request's `chat_template_kwargs`,
            `reasoning_effort`, `add_generation_prompt`, `continue_final_message`, ...)."""
            conversation = kwargs.pop("conversation", messages)
            check_tool_schemas(tools)
            request = {"tools": tools, "chat_template_kwargs": kwargs, "profile": profile,
                       "add_generation_prompt": kwargs.get("add_generation_prompt", True)}
            if not kwargs.get("tokenize", True):
                return encode_request(conversation, **request)
            ids = encode_request_ids(self, conversation, **request)  # V4_PLUGIN_SPECIAL_TOKENS_IN_TEXT applies
            limit = kwargs.get("max_length")
            if kwargs.get("truncation") and limit is not None and len(ids) > limit:
                ids = ids[len(ids) - limit :] if self.truncation_side == "left" else ids[:limit]
            return ids

        def __reduce__(self):
            return with_v4_chat_encoding, (tokenizer, profile)

    _V4PluginChatTokenizer.__name__ = f"V4Plugin{tokenizer.__class__.__name__}"
    wrapped.__class__ = _V4PluginChatTokenizer
    return wrapped


def _checkpoint_dir(path_or_repo_id: str, revision: str | None) -> str:
    """A local directory holding the checkpoint's non-weight files (config.json, encoding/)."""
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    from vllm.transformers_utils.repo_utils import get_non_weight_snapshot_path

    return get_non_weight_snapshot_path(path_or_repo_id, revision=revision)


def __getattr__(name: str) -> Any:
    # The class subclasses vLLM's TokenizerLike, so it is built on first use only.
    if name == "DeepseekV4PluginTokenizer":
        return _tokenizer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _tokenizer_class() -> type:
    from transformers import TokenizersBackend
    from vllm.tokenizers.hf import get_cached_tokenizer
    from vllm.tokenizers.protocol import TokenizerLike

    class DeepseekV4PluginTokenizer(TokenizerLike):
        """vLLM tokenizer class for `--tokenizer-mode deepseek_v4` (see the module docstring)."""

        @classmethod
        def from_pretrained(cls, path_or_repo_id, *args, **kwargs):
            tokenizer = TokenizersBackend.from_pretrained(path_or_repo_id, *args, **kwargs)
            profile = detect_profile(_checkpoint_dir(str(path_or_repo_id), kwargs.get("revision")))
            return get_cached_tokenizer(with_v4_chat_encoding(tokenizer, profile))

    DeepseekV4PluginTokenizer.__module__ = __name__
    return DeepseekV4PluginTokenizer
