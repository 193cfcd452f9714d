"""DeepSeek-V4 chat encoding: turns, tools (DSML), tool results and thinking modes.

DeepSeek ships no Jinja template for V4; the prompt contract is the checkpoint's
``encoding/encoding_dsv4.py`` (architecture.md §11). This module is our own
implementation of that contract. :func:`encode_dsv4` is the official ``encode_messages``
exactly (arguments, message fields, errors; tests/test_chat_gold.py compares it with the
official file on a generated corpus). :func:`encode_messages` / :func:`encode_request` are the
serving path: that encoder with OpenAI extensions on top (below; README "Tool calls and reasoning"):

* the prompt starts with BOS; in thinking mode the effort profile's preamble
  (if any) comes right after it, once;
* a system message is its text, unadorned; tool schemas (``## Tools`` block)
  and a response-format note are appended to it after a blank line. Request
  ``tools`` attach to the first system message (one is made when there is
  none), as vLLM and DeepSeek's own renderer do;
* a ``developer`` message is a user turn carrying the same extras;
* a user message is ``<｜User｜>`` + text. Tool results have no role of their
  own: each ``tool`` message becomes ``<tool_result>…</tool_result>`` inside a
  user turn; consecutive user/tool messages form one turn whose parts are
  joined by a blank line, tool results ordered like the calls they answer;
* an assistant turn is opened by ``<｜Assistant｜>`` + ``<think>`` (thinking) or
  ``</think>`` (chat), written after the user/system message it answers; its
  body is [reasoning + ``</think>``] + text + [``\\n\\n`` + DSML tool calls] + EOS;
* DSML tool calls::

      <｜DSML｜tool_calls>
      <｜DSML｜invoke name="NAME">
      <｜DSML｜parameter name="KEY" string="true">raw text</｜DSML｜parameter>
      <｜DSML｜parameter name="KEY2" string="false">JSON value</｜DSML｜parameter>
      </｜DSML｜invoke>
      </｜DSML｜tool_calls>

* reasoning: without tools, thinking mode drops the reasoning of assistant turns
  before the last user message (those turns are opened with ``</think>``) and
  drops developer messages before it; when any tools are present nothing is
  dropped and every turn is opened with ``<think>``.

Modes: ``thinking=False`` is non-think; ``thinking=True`` with an effort picks a
preamble from an :class:`EffortProfile`. :data:`PREVIEW_PROFILE` is the 04-24
checkpoints' profile (``high`` = no preamble, ``max`` = "Absolute maximum");
other profiles are plain :class:`EffortProfile` values passed as ``profile=``.

:func:`encode_request` reads a serving request (``chat_template_kwargs``,
``reasoning_effort``; thinking on by default, as DeepSeek's API and both
frameworks do). ``CHAT_TEMPLATE`` is :func:`encode_messages` as a Hugging Face
Jinja template, generated from the same pieces and tested equal on the corpus
(``thinking`` / ``enable_thinking`` kwargs, default off; tool-call arguments must be
mappings there). The inverse (completion text -> reasoning, content, tool calls)
is :mod:`v4_plugin.text.dsml`.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
IMAGE_PLACEHOLDER = "<｜deepseek_image｜>"
TASK_TOKENS: dict[str, str] = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

TOOL_CALLS_BLOCK = "tool_calls"
"""The DSML block name V4 writes (V3.2 used ``function_calls``)."""

Message = Mapping[str, Any]

# ----------------------------------------------------------------------------
# Reasoning-effort profiles
# ----------------------------------------------------------------------------

ABSOLUTE_MAXIMUM_PREAMBLE = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)
"""The "Absolute maximum" preamble: 04-24 ``max`` (and the 0731 encoder's ``high``)."""


@dataclass(frozen=True)
class EffortProfile:
    """How a checkpoint family maps a reasoning effort to a prompt preamble.

    Attributes:
        name: label (``"preview"`` for the 04-24 checkpoints).
        preambles: effort -> text written once, right after BOS, in thinking mode.
        default_effort: effort used in thinking mode when none is requested.
        aliases: extra effort names mapped onto keys of ``preambles``.
    """

    name: str
    preambles: Mapping[str, str]
    default_effort: str
    aliases: Mapping[str, str] = field(default_factory=dict)

    def allowed_efforts(self) -> list[str]:
        """Every effort name a request may use: the profile's own, its aliases, and ``none``
        (thinking off, handled by :func:`encode_request`)."""
        return [*sorted(self.preambles), *sorted(self.aliases), "none"]

    def resolve(self, effort: Any) -> str:
        """The canonical effort for ``effort`` (``None`` -> the default).

        Raises:
            ValueError: ``effort`` is not a name of this profile (the message lists the allowed ones).
        """
        if effort is None:
            return self.default_effort
        effort = self.aliases.get(effort, effort) if isinstance(effort, str) else effort
        if effort not in self.preambles:
            raise ValueError(
                f"reasoning effort {effort!r} is not defined by the {self.name!r} profile of this "
                f"checkpoint; expected one of {', '.join(self.allowed_efforts())}"
            )
        return effort

    def preamble(self, effort: str | None) -> str:
        """The preamble text for ``effort`` (may be empty)."""
        return self.preambles[self.resolve(effort)]


PREVIEW_PROFILE = EffortProfile(
    name="preview",
    preambles={"high": "", "max": ABSOLUTE_MAXIMUM_PREAMBLE},
    default_effort="high",
    aliases={"minimal": "high", "low": "high", "medium": "high", "xhigh": "max"},
)
"""The 04-24 ("preview") profile: think-high has no preamble, think-max the
"Absolute maximum" text (refresh-checkpoints.md §4); lower OpenAI efforts map to
``high`` (the lowest the preview defines), ``xhigh`` to ``max``."""

BEYOND_MAXIMUM_PREAMBLE = (
    "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively "
    "decompose the problem into its most fundamental components, trace every causal chain to its root, and "
    "resolve the underlying cause rather than any surface symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple angles and are "
    "certain that no assumption remains unchecked and no error remains undiscovered.\n\n"
)
"""The "Beyond maximum" preamble of the 0731 / 0813 encoder's ``max``."""

REFRESH_PROFILE = EffortProfile(
    name="refresh",
    preambles={"low": "", "high": ABSOLUTE_MAXIMUM_PREAMBLE, "max": BEYOND_MAXIMUM_PREAMBLE},
    default_effort="high",
    aliases={"minimal": "low", "medium": "low", "xhigh": "max"},
)
"""The -0731 / -0813 profile (refresh-checkpoints.md §4): ``low`` no preamble, ``high`` the
"Absolute maximum" text, ``max`` "Beyond maximum". A request without an effort gets ``high``, as
DeepSeek's API and the serving frameworks default."""

PROFILES = {p.name: p for p in (PREVIEW_PROFILE, REFRESH_PROFILE)}
PROFILE_ENV = "V4_PLUGIN_EFFORT_PROFILE"


def detect_profile(model_dir: str | pathlib.Path | None, dspark: bool | None = None) -> EffortProfile:
    """The effort profile of a checkpoint.

    In order: the `V4_PLUGIN_EFFORT_PROFILE` override (`preview` | `refresh`); the checkpoint's
    bundled `encoding/encoding_dsv4.py` (a `REASONING_EFFORT_MAX` constant is the 04-24 encoder,
    `REASONING_EFFORT_PROMPTS` the refreshed one); else the config: `dspark` when given, otherwise
    whether `model_dir/config.json` has `dspark_*` keys (a refresh).
    """
    override = os.environ.get(PROFILE_ENV)
    if override:
        if override not in PROFILES:
            raise ValueError(f"{PROFILE_ENV}={override!r}: expected one of {sorted(PROFILES)}")
        return PROFILES[override]
    encoder = pathlib.Path(model_dir) / "encoding" / "encoding_dsv4.py" if model_dir else None
    if encoder is not None and encoder.is_file():
        source = encoder.read_text(encoding="utf-8", errors="replace")
        if "REASONING_EFFORT_PROMPTS" in source:
            return REFRESH_PROFILE
        if "REASONING_EFFORT_MAX" in source:
            return PREVIEW_PROFILE
    if dspark is None:
        dspark = _config_has_dspark(model_dir)
    return REFRESH_PROFILE if dspark else PREVIEW_PROFILE


def _config_has_dspark(model_dir: str | pathlib.Path | None) -> bool:
    """Whether ``model_dir/config.json`` has ``dspark_*`` keys (False when there is no such file)."""
    config = pathlib.Path(model_dir) / "config.json" if model_dir else None
    if config is None or not config.is_file():
        return False
    try:
        keys = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{config}: not valid JSON ({exc})") from exc
    return any(str(key).startswith("dspark_") for key in keys)


# ----------------------------------------------------------------------------
# Pieces of the format
# ----------------------------------------------------------------------------


def render_tools_block(tools: Sequence[Mapping[str, Any]]) -> str:
    """The ``## Tools`` section listing the tool schemas (one JSON per line).

    ``tools`` may be OpenAI tool entries (``{"type": "function", "function": {...}}``)
    or bare function schemas.
    """
    schemas = "\n".join(to_json(_function_schema(tool)) for tool in tools)
    open_block, close_block = f"<{DSML}{TOOL_CALLS_BLOCK}>", f"</{DSML}{TOOL_CALLS_BLOCK}>"
    invoke, invoke_end = f"<{DSML}invoke", f"</{DSML}invoke>"
    param, param_end = f"<{DSML}parameter", f"</{DSML}parameter>"
    return (
        "## Tools\n\n"
        "You have access to a set of tools to help answer the user's question. "
        f'You can invoke tools by writing a "{open_block}" block like the following:\n\n'
        f"{open_block}\n"
        f'{invoke} name="$TOOL_NAME">\n'
        f'{param} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{param_end}\n'
        "...\n"
        f"{invoke_end}\n"
        f'{invoke} name="$TOOL_NAME2">\n'
        "...\n"
        f"{invoke_end}\n"
        f"{close_block}\n\n"
        'String parameters should be specified as is and set `string="true"`. For all other '
        "types (numbers, booleans, arrays, objects), pass the value in JSON format and set "
        '`string="false"`.\n\n'
        f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete "
        f"reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
        f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
        "### Available Tool Schemas\n\n"
        f"{schemas}\n\n"
        "You MUST strictly follow the above defined tool name and parameter schemas to invoke "
        "tool calls.\n"
    )


def render_response_format(schema: Any) -> str:
    """The note that asks for a reply following ``schema`` (a response_format)."""
    return (
        "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        + to_json(schema)
    )


def to_json(value: Any) -> str:
    """JSON as the format writes it: ``json.dumps`` defaults, non-ASCII kept."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return json.dumps(value, ensure_ascii=True)


def render_parameter(name: str, value: Any) -> str:
    """One DSML parameter: strings raw with ``string="true"``, others JSON."""
    if isinstance(value, str):
        return f'<{DSML}parameter name="{name}" string="true">{value}</{DSML}parameter>'
    return f'<{DSML}parameter name="{name}" string="false">{to_json(value)}</{DSML}parameter>'


def tool_call_arguments(tool_call: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of an OpenAI tool call (``function.arguments``, JSON text or dict)."""
    function = tool_call.get("function", tool_call)
    arguments = function.get("arguments")
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if not isinstance(arguments, Mapping):
        raise ValueError(f"tool call arguments must be a JSON object, got {arguments!r}")
    return dict(arguments)


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """The DSML ``tool_calls`` block of OpenAI-format ``tool_calls`` as DeepSeek's encoder writes it:
    ``function.arguments`` that is JSON text of an object gives one parameter per key; any other
    value (not JSON, not an object, not text) one ``arguments`` parameter holding it."""
    invokes = "\n".join(f'<{DSML}invoke name="{c["function"]["name"]}">\n{_exact_arguments(c["function"]["arguments"])}'
                        f"\n</{DSML}invoke>" for c in tool_calls)
    return f"<{DSML}{TOOL_CALLS_BLOCK}>\n{invokes}\n</{DSML}{TOOL_CALLS_BLOCK}>"


def _function_schema(tool: Mapping[str, Any]) -> Any:
    return tool["function"] if "function" in tool else tool


def _tool_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, Mapping) and block.get("type") == "text":
                parts.append(block.get("text") or "")
            else:
                kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
                parts.append(f"[Unsupported {kind}]")
        return "\n\n".join(parts)
    return str(content)


def _text(content: Any) -> str:
    """Plain text of message content: a string, ``None``, or OpenAI content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if not isinstance(block, Mapping):
            parts.append(str(block))
        elif block.get("type") == "text":
            parts.append(block.get("text") or "")
        elif block.get("type") in ("image", "image_url"):
            parts.append(IMAGE_PLACEHOLDER)
        else:
            raise ValueError(f"unsupported content part type {block.get('type')!r}")
    return "\n\n".join(parts)


def _reasoning(message: Message) -> str:
    value = message.get("reasoning")
    if value is None:
        value = message.get("reasoning_content")
    return value or ""


# ----------------------------------------------------------------------------
# The serving encoder: OpenAI requests on top of the exact encoder
# ----------------------------------------------------------------------------

_SERVING_ROLES = ("system", "developer", "user", "tool", "assistant", "latest_reminder")


def encode_messages(
    messages: Sequence[Message],
    *,
    thinking: bool = False,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    reasoning_effort: str | None = None,
    profile: EffortProfile = PREVIEW_PROFILE,
    drop_thinking: bool = True,
    continue_final_message: bool = False,
) -> str:
    """Encode an OpenAI-style conversation into the DeepSeek-V4 prompt string.

    :func:`encode_dsv4` renders it after :func:`_official_messages` (the OpenAI extensions: content
    parts and images, ``reasoning`` for ``reasoning_content``, tool-call arguments as JSON text or a
    mapping, ``None`` texts as empty); on top of it, as vLLM's copy of the encoder does, a system
    message that ends the conversation or precedes an assistant turn opens that turn.

    Args:
        messages: OpenAI-style dicts. Roles ``system``, ``developer``, ``user``, ``tool``
            (``content``, ``tool_call_id``), ``assistant`` (``content``, ``reasoning`` or
            ``reasoning_content``, ``tool_calls``) and ``latest_reminder``. System and developer
            messages may carry ``tools`` and ``response_format``.
        thinking: thinking mode (the model reasons inside ``<think>…</think>``).
        add_generation_prompt: open an assistant turn after a trailing user, developer or system
            message.
        tools: request tools (OpenAI format); attached to the first system message (made if missing).
        reasoning_effort: effort name of ``profile``, aliases included (thinking mode only; ``None``
            = the profile's default).
        profile: the :class:`EffortProfile` mapping efforts to preambles.
        drop_thinking: drop earlier turns' reasoning (only without tools).
        continue_final_message: leave a final assistant message open (no EOS).

    Returns:
        The prompt text, starting with BOS; tokenize it without adding specials.

    Raises:
        ValueError: an unknown role or effort, a developer message without content, tool-call
            arguments that are not a JSON object.
    """
    effort = profile.resolve(reasoning_effort) if thinking else None
    official = _official_messages(_attach_tools(messages, tools), continue_final_message)
    start, pieces, full, drop = _exact_pieces(official, "thinking" if thinking else "chat", [], drop_thinking,
                                              True, effort, profile)
    last_user = _last_user(full)
    parts = [start]
    for index, piece in pieces:
        role = full[index].get("role")
        is_last = index == len(full) - 1
        opener = ASSISTANT + (THINK_START if thinking and (not drop or index >= last_user) else THINK_END)
        if role == "system" and (is_last or full[index + 1].get("role") == "assistant"):
            piece += opener
        if is_last and not add_generation_prompt and role in ("system", "developer", "user"):
            piece = piece.removesuffix(opener)
        parts.append(piece)
    return "".join(parts)


def _official_messages(messages: Sequence[Message], continue_final_message: bool) -> list[dict[str, Any]]:
    """OpenAI-style messages as :func:`encode_dsv4` reads them (only the fields a request may set)."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in _SERVING_ROLES:
            raise ValueError(f"unsupported role {role!r} in DeepSeek-V4 chat encoding")
        if role == "tool":
            out.append({"role": role, "content": _tool_text(message.get("content")),
                        "tool_call_id": message.get("tool_call_id") or ""})
            continue
        item: dict[str, Any] = {"role": role, "content": _text(message.get("content"))}
        for key in ("tools", "response_format"):
            if message.get(key) and role in ("system", "developer"):
                item[key] = message[key]
        if role == "assistant":
            item["reasoning_content"] = _reasoning(message)
            if message.get("tool_calls"):
                item["tool_calls"] = [_official_call(call) for call in message["tool_calls"]]
            if continue_final_message and i == len(messages) - 1:
                item["wo_eos"] = True
        out.append(item)
    return out


def _official_call(call: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call (``{"function": {...}}`` or bare) with its arguments as JSON object text."""
    function = call.get("function", call)
    call_id = call.get("id") or function.get("id")
    arguments = to_json(tool_call_arguments(call))
    return {"id": call_id, "function": {"name": function.get("name"), "arguments": arguments}}


def _attach_tools(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None) -> list[Message]:
    """Attach request ``tools`` to the first system message (made if missing)."""
    messages = list(messages)
    if not tools:
        return messages
    index = next((i for i, m in enumerate(messages) if m.get("role") == "system"), None)
    if index is None:
        messages.insert(0, {"role": "system", "tools": list(tools)})
    else:
        messages[index] = {**messages[index], "tools": list(tools)}
    return messages


# ----------------------------------------------------------------------------
# The official encoder, exactly
# ----------------------------------------------------------------------------

_KEEP_WHEN_DROPPING = frozenset({"user", "system", "tool", "latest_reminder", "direct_search_results"})


def encode_dsv4(
    messages: Sequence[Message],
    thinking_mode: str,
    context: Sequence[Message] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
    *,
    profile: EffortProfile = PREVIEW_PROFILE,
) -> str:
    """DeepSeek's ``encode_messages`` (``encoding/encoding_dsv4.py``): same arguments, same prompt
    byte for byte, an error (:class:`ValueError`) wherever the official encoder raises.

    Semantics of the official file (04-24 release; the refresh differs only in its efforts):
    ``tool`` messages fold into user turns as ``<tool_result>`` blocks (a user message's other
    fields but ``task`` / ``wo_eos`` / ``mask`` are not kept, so ``tools`` on a user message are
    ignored), sorted like the calls they answer; ``context`` is a conversation already rendered
    (no BOS, not rendered again; it still decides tool-result order and ``drop_thinking``);
    ``drop_thinking`` (thinking mode, no ``tools`` on any message) removes the reasoning of
    assistant turns and the developer messages before the last user message; message ``task``
    (``action``, ``query``, ``authority``, ``domain``, ``title``, ``read_url``) writes its token
    after the message (``action``: after an Assistant + think token); ``wo_eos`` leaves an
    assistant turn open; tool-call ``arguments`` that are not JSON text of an object render as one
    ``arguments`` parameter; message text goes through ``str.format`` as there (``None`` in a
    reminder or tool result is written ``None``). Only user and developer messages open the next
    assistant turn (a trailing system message does not).

    Args:
        messages: the messages to render (OpenAI-style dicts; ``reasoning_content`` on assistant
            turns, ``tools`` / ``response_format`` on system and developer messages).
        thinking_mode: ``"chat"`` or ``"thinking"``.
        context: earlier messages (already encoded).
        drop_thinking: as above.
        add_default_bos_token: start with BOS (only when there is no context).
        reasoning_effort: ``None`` (no preamble) or a key of ``profile.preambles`` (preview:
            ``high``, ``max``; refresh: ``low``, ``high``, ``max``); thinking mode only.
        profile: the checkpoint's :class:`EffortProfile`.

    Raises:
        ValueError: what the official encoder rejects (naming the message and the field).
    """
    start, pieces, _, _ = _exact_pieces(messages, thinking_mode, list(context or []), drop_thinking,
                                        add_default_bos_token, reasoning_effort, profile)
    return start + "".join(piece for _, piece in pieces)


def _exact_pieces(messages: Sequence[Message], thinking_mode: str, context: list[Message], drop_thinking: bool,
                  add_default_bos_token: bool, reasoning_effort: str | None,
                  profile: EffortProfile) -> tuple[str, list[tuple[int, str]], list[Message], bool]:
    """:func:`encode_dsv4` in parts: (the start (BOS or nothing), ``[(index, text)]`` for each message
    rendered (index into the conversation as rendered), that conversation, the effective
    ``drop_thinking``)."""
    merged = _sort_tool_results(_fold_tool_messages(messages), order_from=context)
    if context:
        context = _sort_tool_results(_fold_tool_messages(context))
    full = context + merged
    start = BOS if add_default_bos_token and not context else ""
    drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking_mode == "thinking" and drop:
        full = _drop_earlier_thinking(full)
        first = len(_drop_earlier_thinking(context))
    else:
        first = len(context)
    pieces = []
    for index in range(first, len(full)):
        try:
            pieces.append((index, _render_exact(index, full, thinking_mode, drop, reasoning_effort, profile)))
        except (TypeError, KeyError, AttributeError, IndexError, json.JSONDecodeError) as exc:
            raise ValueError(f"message {index} ({full[index].get('role')!r}) cannot be encoded: "
                             f"{type(exc).__name__}: {exc}") from exc
    return start, pieces, full, drop


def _fold_tool_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Tool messages -> ``tool_result`` blocks of a user message; user text -> ``text`` blocks
    (consecutive user/tool messages share one user message unless it carries a task)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        message = copy.deepcopy(dict(message))
        role = message.get("role")
        last = out[-1] if out and out[-1].get("role") == "user" and "content_blocks" in out[-1] else None
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": message.get("tool_call_id", ""),
                     "content": message.get("content", "")}
            if last is not None:
                last["content_blocks"].append(block)
            else:
                out.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": message.get("content", "")}
            if last is not None and last.get("task") is None:
                last["content_blocks"].append(block)
            else:
                kept = {k: message[k] for k in ("task", "wo_eos", "mask") if k in message}
                out.append({"role": "user", "content": message.get("content", ""), "content_blocks": [block], **kept})
        else:
            out.append(message)
    return out


def _sort_tool_results(messages: list[dict[str, Any]], order_from: Sequence[Message] = ()) -> list[dict[str, Any]]:
    """Order each user message's tool results like the calls of the assistant message before it
    (``order_from``: earlier messages that only set the call order). Sorts in place."""
    order: dict[Any, int] = {}
    for message in [*order_from, *messages]:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            order = {}
            for i, call in enumerate(message["tool_calls"]):
                call_id = call.get("id") or call.get("function", {}).get("id", "")
                if call_id:
                    order[call_id] = i
        elif role == "user" and message.get("content_blocks"):
            results = [b for b in message["content_blocks"] if b.get("type") == "tool_result"]
            if len(results) > 1 and order:
                ordered = iter(sorted(results, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
                message["content_blocks"] = [next(ordered) if b.get("type") == "tool_result" else b
                                             for b in message["content_blocks"]]
    return messages


def _last_user(messages: Sequence[Message]) -> int:
    """Index of the last user or developer message (-1 if none)."""
    return max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)


def _drop_earlier_thinking(messages: Sequence[Message]) -> list[Message]:
    """Before the last user message: assistant turns lose their reasoning, developer (and unknown)
    messages go."""
    last_user = _last_user(messages)
    out: list[Message] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role in _KEEP_WHEN_DROPPING or i >= last_user:
            out.append(message)
        elif role == "assistant":
            out.append({k: v for k, v in message.items() if k != "reasoning_content"})
    return out


def _exact_arguments(arguments: Any) -> str:
    """Official DSML parameters of one call: JSON text of an object -> its items; anything else
    (not JSON, not text) -> one ``arguments`` parameter holding the value."""
    try:
        parsed = json.loads(arguments)
    except Exception:  # noqa: BLE001 - the official encoder falls back on any failure
        parsed = {"arguments": arguments}
    return "\n".join(render_parameter(f"{k}", v) for k, v in parsed.items())


def _render_exact(index: int, messages: Sequence[Message], thinking_mode: str, drop: bool,
                  effort: str | None, profile: EffortProfile) -> str:
    """One message of :func:`encode_dsv4` and the transition after it."""
    if thinking_mode not in ("chat", "thinking"):
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    if effort is not None and effort not in profile.preambles:
        raise ValueError(f"reasoning effort {effort!r} is not defined by the {profile.name!r} profile; "
                         f"expected None or one of {sorted(profile.preambles)}")
    thinking = thinking_mode == "thinking"
    message = messages[index]
    last_user = _last_user(messages)
    role, content = message.get("role"), message.get("content")
    tools = [tool["function"] for tool in message.get("tools") or []]
    calls = [{"function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
             for c in message.get("tool_calls") or []]
    prompt = profile.preambles[effort] if index == 0 and thinking and effort is not None else ""
    if role in ("system", "developer"):
        if role == "developer" and not content:
            raise ValueError(f"message {index}: a developer message needs content")
        prompt += f"{content or ''}" if role == "system" else USER + content
        if tools:
            prompt += "\n\n" + render_tools_block(tools)
        if message.get("response_format"):
            prompt += "\n\n" + render_response_format(message["response_format"])
    elif role == "user":
        blocks = message.get("content_blocks")
        prompt += USER + ("\n\n".join(_exact_block(b) for b in blocks) if blocks else content or "")
    elif role == "latest_reminder":
        prompt += LATEST_REMINDER + f"{content}"
    elif role == "assistant":
        block = "\n\n" + render_tool_calls(calls) if calls else ""
        after_task = index > 0 and messages[index - 1].get("task") is not None
        reasoning = ""
        if thinking and not after_task and (not drop or index > last_user):
            reasoning = f"{message.get('reasoning_content') or ''}{THINK_END}"
        prompt += f"{reasoning}{content or ''}{block}" + ("" if message.get("wo_eos", False) else EOS)
    else:
        raise ValueError(f"message {index}: unsupported role {role!r} in DeepSeek-V4 chat encoding")
    if index + 1 < len(messages) and messages[index + 1].get("role") not in ("assistant", "latest_reminder"):
        return prompt
    task = message.get("task")
    if task is not None:
        if task not in TASK_TOKENS:
            raise ValueError(f"message {index}: task {task!r} is not one of {sorted(TASK_TOKENS)}")
        if task == "action":
            prompt += ASSISTANT + (THINK_START if thinking else THINK_END)
        prompt += TASK_TOKENS[task]
    elif role in ("user", "developer"):
        opens_thinking = thinking and (not drop or index >= last_user)
        prompt += ASSISTANT + (THINK_START if opens_thinking else THINK_END)
    return prompt


def _exact_block(block: Mapping[str, Any]) -> str:
    """One content block of a folded user message."""
    kind = block.get("type")
    if kind == "text":
        return block.get("text", "")
    if kind != "tool_result":
        return f"[Unsupported {kind}]"
    content = block.get("content", "")
    if isinstance(content, list):
        content = "\n\n".join(b.get("text", "") if b.get("type") == "text" else f"[Unsupported {b.get('type')}]"
                              for b in content)
    return f"<tool_result>{content}</tool_result>"


def encode_request(
    messages: Sequence[Message],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    reasoning_effort: str | None = None,
    profile: EffortProfile = PREVIEW_PROFILE,
    default_thinking: bool = True,
    add_generation_prompt: bool = True,
) -> str:
    """Encode an OpenAI chat request the way the serving frameworks read it.

    Thinking is :func:`request_thinking` with ``default_thinking`` (on, like DeepSeek's
    API and both servers with the plugin); the effort (template kwarg, else argument)
    ``"none"`` turns it off, other values go through ``profile`` (aliases included).
    Extra kwargs ``drop_thinking`` and ``continue_final_message`` are passed on.

    Raises:
        ValueError: an effort ``profile`` does not define, thinking on or off (the servers
            answer it with HTTP 400; the message lists the allowed names).
    """
    kwargs = dict(chat_template_kwargs or {})
    effort = requested_effort(kwargs, reasoning_effort)
    thinking = request_thinking(kwargs, reasoning_effort, default=default_thinking)
    if effort not in (None, "none"):
        profile.resolve(effort)  # an unknown effort is an error even with thinking off
    return encode_messages(
        messages,
        thinking=thinking,
        add_generation_prompt=add_generation_prompt,
        tools=tools,
        reasoning_effort=effort if thinking and effort != "none" else None,
        profile=profile,
        drop_thinking=kwargs.get("drop_thinking", True),
        continue_final_message=kwargs.get("continue_final_message", False),
    )


# ----------------------------------------------------------------------------
# Special-token strings in client text
# ----------------------------------------------------------------------------

SPECIAL_TEXT_ENV = "V4_PLUGIN_SPECIAL_TOKENS_IN_TEXT"
"""Server setting: how special-token strings in client text (message content, reasoning, tool
arguments, tool results, tool schemas) are tokenized. ``control`` (default, as DeepSeek's encoder
and tokenizer do): as the control tokens themselves; ``plain``: as ordinary text."""

TEXT_SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, USER, ASSISTANT, LATEST_REMINDER, THINK_START, THINK_END,
                                        DSML, IMAGE_PLACEHOLDER, *TASK_TOKENS.values())
"""Every V4 special-token string (the ones :data:`SPECIAL_TEXT_ENV` ``plain`` keeps as text)."""

_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in sorted(TEXT_SPECIAL_TOKENS, key=len, reverse=True)))
_SLOT_RE = re.compile("\ue000(\\d+)\ue001")


def special_tokens_in_text() -> str:
    """The :data:`SPECIAL_TEXT_ENV` setting: ``"control"`` (default) or ``"plain"``.

    Raises:
        ValueError: any other value (the message names the variable).
    """
    value = os.environ.get(SPECIAL_TEXT_ENV, "control")
    if value not in ("control", "plain"):
        raise ValueError(f"{SPECIAL_TEXT_ENV}={value!r}: expected 'control' or 'plain'")
    return value


def encode_request_ids(tokenizer: Any, messages: Sequence[Message], *,
                       tools: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> list[int]:
    """Token ids of :func:`encode_request` (same arguments) with a Hugging Face ``tokenizer``.

    With :data:`SPECIAL_TEXT_ENV` ``plain``, each special-token string found in the client's
    strings is tokenized as text (its first character apart from the rest, so no added token
    matches); the prompt's own markup stays control tokens. The text of the prompt is the same.
    """
    if special_tokens_in_text() == "control":
        return tokenizer.encode(encode_request(messages, tools=tools, **kwargs), add_special_tokens=False)
    found: list[str] = []

    def slot(match: re.Match[str]) -> str:
        found.append(match.group())
        return f"\ue000{len(found) - 1}\ue001"

    def escape(value: Any) -> Any:
        if isinstance(value, str):
            return _SPECIAL_RE.sub(slot, value)
        if isinstance(value, Mapping):
            return {key: escape(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [escape(item) for item in value]
        return value

    prompt = encode_request(escape(list(messages)), tools=escape(tools) if tools else tools, **kwargs)
    ids: list[int] = []
    for i, piece in enumerate(_SLOT_RE.split(prompt)):
        pieces = (piece,) if i % 2 == 0 else (found[int(piece)][:1], found[int(piece)][1:])
        for text in pieces:
            if text:
                ids += tokenizer.encode(text, add_special_tokens=False)
    return ids


def requested_effort(chat_template_kwargs: Mapping[str, Any] | None, reasoning_effort: Any = None) -> Any:
    """The effort a request asks for: ``chat_template_kwargs["reasoning_effort"]``, else the
    request's ``reasoning_effort`` (``None`` when neither is set)."""
    kwargs = chat_template_kwargs or {}
    effort = kwargs.get("reasoning_effort")
    return reasoning_effort if effort is None else effort


def request_thinking(
    chat_template_kwargs: Mapping[str, Any] | None, reasoning_effort: Any = None, *, default: bool = True
) -> bool:
    """Whether a serving request renders in thinking mode: ``chat_template_kwargs["thinking"]``
    or ``["enable_thinking"]`` when either is given (either true: on), else ``default``; an effort
    of ``"none"`` (see :func:`requested_effort`) turns it off. Both frameworks' prompt renderers and
    reasoning parsers decide with this one rule."""
    kwargs = chat_template_kwargs or {}
    if "thinking" in kwargs or "enable_thinking" in kwargs:
        thinking = bool(kwargs.get("thinking")) or bool(kwargs.get("enable_thinking"))
    else:
        thinking = default
    return thinking and requested_effort(kwargs, reasoning_effort) != "none"


def _jinja_literal(text: str) -> str:
    """``text`` as a Jinja string literal (Jinja reads JSON string escapes)."""
    return json.dumps(text, ensure_ascii=False)


TEMPLATE_HEADER = "{#- DeepSeek-V4 chat template, generated from v4_plugin.text.chat (encode_messages). -#}\n"
"""First line of every template :func:`build_chat_template` writes (how a tokenizer's template is
recognised as ours, whatever its profile)."""


def build_chat_template(profile: EffortProfile = PREVIEW_PROFILE) -> str:
    """:func:`encode_messages` with `profile` as a Jinja template, generated from the same pieces."""
    marker = "\x00SCHEMAS\x00"
    tools_head, tools_tail = render_tools_block([]).replace("\n\n\n", f"\n\n{marker}\n").split(marker)
    assert render_tools_block([{"a": 1}]) == tools_head + '{"a": 1}' + tools_tail
    lit = _jinja_literal
    return (
        TEMPLATE_HEADER +
        # ---- settings
        "{%- set thinking = (thinking is defined and thinking) or (enable_thinking is defined and enable_thinking)"
        " -%}\n"
        "{%- set effort = reasoning_effort if reasoning_effort is defined else none -%}\n"
        "{%- if effort == 'none' -%}{%- set thinking = false -%}{%- endif -%}\n"
        "{%- set keep_all = drop_thinking is defined and not drop_thinking -%}\n"
        "{%- set req_tools = tools if tools is defined and tools else none -%}\n"
        "{%- set ns = namespace(has_tools=req_tools is not none, first_system=-1, last_user=-1, call_ids=[],"
        " sorted=[], tool_pos=0) -%}\n"
        "{%- for m in messages -%}\n"
        "{%- if m.tools is defined and m.tools -%}{%- set ns.has_tools = true -%}{%- endif -%}\n"
        "{%- if m.role == 'system' and ns.first_system < 0 -%}{%- set ns.first_system = loop.index0 -%}{%- endif -%}\n"
        "{%- if m.role in ['user', 'tool', 'developer'] -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- set drop = thinking and not keep_all and not ns.has_tools -%}\n"
        # ---- helpers
        "{%- macro text(c) -%}\n"
        "{%- if c is none -%}\n"
        "{%- elif c is string -%}{{- c -}}\n"
        "{%- else -%}{%- for b in c -%}{%- if not loop.first -%}{{- '\\n\\n' -}}{%- endif -%}\n"
        "{%- if b.type == 'text' -%}{{- b.text or '' -}}\n"
        "{%- elif b.type in ['image', 'image_url'] -%}{{- " + lit(IMAGE_PLACEHOLDER) + " -}}\n"
        "{%- else -%}{{- raise_exception('unsupported content part type ' ~ b.type) -}}{%- endif -%}\n"
        "{%- endfor -%}{%- endif -%}\n"
        "{%- endmacro -%}\n"
        "{%- macro tool_text(c) -%}\n"
        "{%- if c is none -%}\n"
        "{%- elif c is string -%}{{- c -}}\n"
        "{%- else -%}{%- for b in c -%}{%- if not loop.first -%}{{- '\\n\\n' -}}{%- endif -%}\n"
        "{%- if b.type == 'text' -%}{{- b.text or '' -}}\n"
        "{%- else -%}{{- '[Unsupported ' ~ b.type ~ ']' -}}{%- endif -%}\n"
        "{%- endfor -%}{%- endif -%}\n"
        "{%- endmacro -%}\n"
        "{%- macro tools_block(ts) -%}\n"
        "{{- " + lit(tools_head) + " -}}\n"
        "{%- for t in ts -%}{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
        "{{- (t.function if t.function is defined else t) | tojson -}}{%- endfor -%}\n"
        "{{- " + lit(tools_tail) + " -}}\n"
        "{%- endmacro -%}\n"
        "{%- macro extras(m, ts) -%}\n"
        "{%- if ts -%}{{- '\\n\\n' + tools_block(ts) -}}{%- endif -%}\n"
        "{%- if m.response_format is defined and m.response_format -%}"
        "{{- '\\n\\n' + " + lit(render_response_format("")[: -len('""')]) + " + (m.response_format | tojson) -}}"
        "{%- endif -%}\n"
        "{%- endmacro -%}\n"
        "{%- macro opener(on) -%}{{- " + lit(ASSISTANT) + " + (" + lit(THINK_START) + " if on else "
        + lit(THINK_END) + ") -}}{%- endmacro -%}\n"
        # ---- prompt start
        "{{- " + lit(BOS) + " -}}\n"
        + _effort_block(profile) +
        "{%- if req_tools and ns.first_system < 0 -%}\n"
        "{{- '\\n\\n' + tools_block(req_tools) -}}\n"
        "{%- if (messages | length == 0 and add_generation_prompt) or (messages and messages[0].role == 'assistant')"
        " -%}{{- opener(thinking) -}}{%- endif -%}\n"
        "{%- endif -%}\n"
        # ---- messages
        "{%- for m in messages -%}\n"
        "{%- set i = loop.index0 -%}\n"
        "{%- set next_role = none if loop.last else messages[i + 1].role -%}\n"
        "{%- if m.role == 'developer' and drop and i < ns.last_user -%}{%- continue -%}{%- endif -%}\n"
        "{%- if m.role == 'system' -%}\n"
        "{{- text(m.content) -}}\n"
        "{{- extras(m, req_tools if (i == ns.first_system and req_tools) else"
        " (m.tools if m.tools is defined else none)) -}}\n"
        "{%- elif m.role == 'developer' -%}\n"
        "{%- if not text(m.content) -%}{{- raise_exception('a developer message needs content') -}}{%- endif -%}\n"
        "{{- " + lit(USER) + " + text(m.content) -}}{{- extras(m, m.tools if m.tools is defined else none) -}}\n"
        "{%- elif m.role in ['user', 'tool'] -%}\n"
        "{%- if i > 0 and messages[i - 1].role in ['user', 'tool'] -%}{{- '\\n\\n' -}}\n"
        "{%- else -%}\n"
        "{{- " + lit(USER) + " -}}\n"
        # a new user turn: its tool results in the order of the calls they answer
        "{%- set run = namespace(tools=[], open=true) -%}\n"
        "{%- for r in messages[i:] -%}{%- if run.open and r.role in ['user', 'tool'] -%}"
        "{%- if r.role == 'tool' -%}{%- set run.tools = run.tools + [r] -%}{%- endif -%}"
        "{%- else -%}{%- set run.open = false -%}{%- endif -%}{%- endfor -%}\n"
        "{%- set ns.sorted = [] -%}{%- set ns.tool_pos = 0 -%}\n"
        "{%- if run.tools | length > 1 and ns.call_ids -%}\n"
        "{%- for k in range(ns.call_ids | length) -%}{%- for r in run.tools -%}\n"
        "{%- set rid = r.tool_call_id if r.tool_call_id is defined and r.tool_call_id else '' -%}\n"
        "{%- if (ns.call_ids.index(rid) if rid in ns.call_ids else 0) == k -%}"
        "{%- set ns.sorted = ns.sorted + [r] -%}{%- endif -%}\n"
        "{%- endfor -%}{%- endfor -%}\n"
        "{%- else -%}{%- set ns.sorted = run.tools -%}{%- endif -%}\n"
        "{%- endif -%}\n"
        "{%- if m.role == 'user' -%}{{- text(m.content) -}}\n"
        "{%- else -%}{{- '<tool_result>' + tool_text(ns.sorted[ns.tool_pos].content) + '</tool_result>' -}}"
        "{%- set ns.tool_pos = ns.tool_pos + 1 -%}{%- endif -%}\n"
        "{%- elif m.role == 'latest_reminder' -%}\n"
        "{{- " + lit(LATEST_REMINDER) + " + text(m.content) -}}\n"
        "{%- elif m.role == 'assistant' -%}\n"
        "{%- if thinking and (not drop or i > ns.last_user) -%}"
        "{{- (m.reasoning if m.reasoning is defined and m.reasoning is not none else"
        " (m.reasoning_content if m.reasoning_content is defined and m.reasoning_content else '')) + "
        + lit(THINK_END) + " -}}{%- endif -%}\n"
        "{{- text(m.content) -}}\n"
        "{%- if m.tool_calls is defined and m.tool_calls -%}\n"
        "{%- set ns.call_ids = [] -%}\n"
        "{{- '\\n\\n' + " + lit(f"<{DSML}{TOOL_CALLS_BLOCK}>\n") + " -}}\n"
        "{%- for tc in m.tool_calls -%}\n"
        "{%- set f = tc.function if tc.function is defined else tc -%}\n"
        "{%- set cid = tc.id if tc.id is defined and tc.id else (f.id if f.id is defined and f.id else '') -%}\n"
        "{%- if cid -%}{%- set ns.call_ids = ns.call_ids + [cid] -%}{%- else -%}"
        "{%- set ns.call_ids = ns.call_ids + ['\\x00' ~ loop.index0] -%}{%- endif -%}\n"
        "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}\n"
        "{{- " + lit(f'<{DSML}invoke name="') + " + f.name + " + lit('">\n') + " -}}\n"
        "{%- set args = f.arguments if f.arguments is defined and f.arguments else {} -%}\n"
        "{%- if args is string -%}{{- raise_exception('tool call arguments must be a mapping in the chat template;"
        " use v4_plugin.text.chat.encode_messages for JSON text') -}}{%- endif -%}\n"
        "{%- for k, v in args.items() -%}{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}\n"
        "{{- " + lit(f'<{DSML}parameter name="') + " + k + '\" string=\"' + ('true' if v is string else 'false')"
        " + '\">' + (v if v is string else v | tojson) + " + lit(f"</{DSML}parameter>") + " -}}\n"
        "{%- endfor -%}\n"
        "{{- " + lit(f"\n</{DSML}invoke>") + " -}}\n"
        "{%- endfor -%}\n"
        "{{- " + lit(f"\n</{DSML}{TOOL_CALLS_BLOCK}>") + " -}}\n"
        "{%- endif -%}\n"
        "{{- " + lit(EOS) + " -}}\n"
        "{%- continue -%}\n"
        "{%- else -%}\n"
        "{{- raise_exception('unsupported role in DeepSeek-V4 chat encoding: ' + m.role) -}}\n"
        "{%- endif -%}\n"
        # ---- open the assistant turn that follows (or the generation prompt)
        "{%- if next_role in [none, 'assistant', 'latest_reminder'] and m.role != 'latest_reminder'"
        " and not (m.role == 'system' and next_role == 'latest_reminder')"
        " and not (loop.last and not add_generation_prompt) -%}\n"
        "{{- opener(thinking and (not drop or i >= ns.last_user)) -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
    )


def _effort_block(profile: EffortProfile) -> str:
    """The Jinja lines that write the profile's preamble for `effort` (thinking mode only)."""
    lit = _jinja_literal
    lines = ["{%- if thinking -%}\n",
             f"{{%- if effort is none -%}}{{%- set effort = {lit(profile.default_effort)} -%}}{{%- endif -%}}\n"]
    for alias, target in profile.aliases.items():
        lines.append(f"{{%- if effort == {lit(alias)} -%}}{{%- set effort = {lit(target)} -%}}{{%- endif -%}}\n")
    for effort, text in profile.preambles.items():
        lines.append(f"{{%- if effort == {lit(effort)} -%}}{{{{- {lit(text)} -}}}}{{%- endif -%}}\n")
    allowed = ", ".join(sorted(profile.preambles))
    lines.append(f"{{%- if effort not in {sorted(profile.preambles)!r} -%}}"
                 f"{{{{- raise_exception('reasoning effort ' ~ effort ~ ' is not defined by the {profile.name} "
                 f"profile; expected one of: {allowed}') -}}}}{{%- endif -%}}\n")
    lines.append("{%- endif -%}\n")
    return "".join(lines)


CHAT_TEMPLATE = build_chat_template(PREVIEW_PROFILE)
"""Jinja version of :func:`encode_messages` for ``tokenizer_config.json`` (template
kwargs: ``thinking`` or ``enable_thinking`` (default off), ``reasoning_effort`` with the
preview profile (``"none"``: thinking off), ``drop_thinking``; tool-call ``arguments``
must be mappings, as vLLM and transformers pass them)."""
