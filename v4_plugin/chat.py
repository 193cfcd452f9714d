"""DeepSeek-V4 chat encoding (basic: system, user and assistant text messages).

DeepSeek ships no Jinja template for V4; the prompt contract is the checkpoint's
``encoding/encoding_dsv4.py`` (architecture.md §11). This module reproduces that
encoder for plain text conversations:

* the prompt starts with BOS;
* a system message is its text, unadorned (so leading system messages are simply
  concatenated right after BOS);
* a user message is ``<｜User｜>`` + text; consecutive user messages form one
  turn, their texts joined by a blank line;
* an assistant turn is opened by ``<｜Assistant｜>`` + ``<think>`` (thinking mode)
  or ``</think>`` (chat mode), written right after the user or system message it
  answers; the turn itself is its text + EOS. In thinking mode, turns before the
  last user message are opened with ``</think>`` and lose their reasoning; a turn
  after it keeps ``reasoning + </think>`` in front of its text;
* the generation prompt is the same opener after a trailing user/system message.

Example (chat mode)::

    <｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜></think>Hello!<｜end▁of▁sentence｜><｜User｜>Bye<｜Assistant｜></think>

``CHAT_TEMPLATE`` is the same encoding as a Hugging Face Jinja template (a
``thinking`` template kwarg selects thinking mode; default off). Tools/DSML,
task tokens and reasoning-effort preambles are not handled here yet; each role
has its own render function so they can be added where they belong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
TASK_TOKENS: dict[str, str] = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

Message = Mapping[str, Any]


def _text(message: Message) -> str:
    """Return a message's text content (``None`` or missing counts as empty)."""
    return message.get("content") or ""


def render_system(message: Message) -> str:
    """Render a system message: its text, with no role marker."""
    return _text(message)


def render_user(message: Message, *, continues_turn: bool) -> str:
    """Render a user message: ``<｜User｜>`` + text, or ``\n\n`` + text when it
    continues the user turn of the message before it."""
    return ("\n\n" if continues_turn else USER) + _text(message)


def render_assistant(message: Message, *, keep_reasoning: bool) -> str:
    """Render an assistant turn's body (its opener is written by ``assistant_opener``).

    With ``keep_reasoning`` (thinking mode, turn after the last user message) the
    body is ``reasoning + </think> + text + EOS``; otherwise ``text + EOS``.
    """
    reasoning = (message.get("reasoning") or "") + THINK_END if keep_reasoning else ""
    return reasoning + _text(message) + EOS


def assistant_opener(*, thinking: bool) -> str:
    """Open an assistant turn: ``<｜Assistant｜>`` + ``<think>`` or ``</think>``."""
    return ASSISTANT + (THINK_START if thinking else THINK_END)


def _last_user_index(messages: Sequence[Message]) -> int:
    """Index of the last user message, or -1 if there is none."""
    return max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)


def encode_messages(
    messages: Sequence[Message], *, thinking: bool = False, add_generation_prompt: bool = True
) -> str:
    """Encode a conversation into the DeepSeek-V4 prompt string.

    Args:
        messages: dicts with ``role`` (``system``, ``user`` or ``assistant``) and
            text ``content``; an assistant message may carry ``reasoning``, which
            is kept only in thinking mode for turns after the last user message.
        thinking: thinking mode (the model reasons inside ``<think>…</think>``)
            instead of chat mode.
        add_generation_prompt: open an assistant turn after a trailing user or
            system message.

    Returns:
        The prompt text, starting with BOS; tokenize it without adding specials.
    """
    last_user = _last_user_index(messages)
    parts = [BOS]
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "system":
            parts.append(render_system(message))
        elif role == "user":
            continues_turn = i > 0 and messages[i - 1].get("role") == "user"
            parts.append(render_user(message, continues_turn=continues_turn))
        elif role == "assistant":
            parts.append(render_assistant(message, keep_reasoning=thinking and i > last_user))
            continue
        else:
            raise ValueError(f"unsupported role {role!r} in DeepSeek-V4 chat encoding")
        is_last = i == len(messages) - 1
        if add_generation_prompt if is_last else messages[i + 1].get("role") == "assistant":
            parts.append(assistant_opener(thinking=thinking and i >= last_user))
    return "".join(parts)


CHAT_TEMPLATE = (
    "{#- DeepSeek-V4 chat template; mirrors v4_plugin.chat.encode_messages. -#}\n"
    "{%- set thinking = thinking is defined and thinking -%}\n"
    "{%- set ns = namespace(last_user=-1) -%}\n"
    "{%- for m in messages -%}\n"
    "{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{{- '" + BOS + "' -}}\n"
    "{%- for m in messages -%}\n"
    "{%- set i = loop.index0 -%}\n"
    "{%- if m.role == 'system' -%}\n"
    "{{- m.content or '' -}}\n"
    "{%- elif m.role == 'user' -%}\n"
    "{{- ('\\n\\n' if i > 0 and messages[i - 1].role == 'user' else '" + USER + "')"
    " + (m.content or '') -}}\n"
    "{%- elif m.role == 'assistant' -%}\n"
    "{%- if thinking and i > ns.last_user -%}"
    "{{- (m.reasoning or '') + '" + THINK_END + "' -}}"
    "{%- endif -%}\n"
    "{{- (m.content or '') + '" + EOS + "' -}}\n"
    "{%- else -%}\n"
    "{{- raise_exception('unsupported role in DeepSeek-V4 chat encoding: ' + m.role) -}}\n"
    "{%- endif -%}\n"
    "{%- if m.role != 'assistant' and (add_generation_prompt if loop.last"
    " else messages[i + 1].role == 'assistant') -%}\n"
    "{{- '" + ASSISTANT + "' + ('" + THINK_START + "' if thinking and i >= ns.last_user"
    " else '" + THINK_END + "') -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
)
"""Jinja version of :func:`encode_messages` for ``tokenizer_config.json``."""
