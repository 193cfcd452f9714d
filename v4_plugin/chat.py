"""DeepSeek-V4 chat encoding: turns, tools (DSML), tool results and thinking modes.

DeepSeek ships no Jinja template for V4; the prompt contract is the checkpoint's
``encoding/encoding_dsv4.py`` (architecture.md §11). This module is our own
implementation of that contract (tests compare it with the official file):

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
is :mod:`v4_plugin.dsml`.
"""

from __future__ import annotations

import json
import os
import pathlib
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
    """The DSML ``tool_calls`` block for OpenAI-format ``tool_calls``."""
    invokes = []
    for call in tool_calls:
        name = call.get("function", call).get("name")
        params = "\n".join(render_parameter(k, v) for k, v in tool_call_arguments(call).items())
        invokes.append(f'<{DSML}invoke name="{name}">\n{params}\n</{DSML}invoke>')
    body = "\n".join(invokes)
    return f"<{DSML}{TOOL_CALLS_BLOCK}>\n{body}\n</{DSML}{TOOL_CALLS_BLOCK}>"


def render_tool_result(content: Any) -> str:
    """A tool result as it sits in a user turn."""
    return f"<tool_result>{_tool_text(content)}</tool_result>"


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
# Role render functions
# ----------------------------------------------------------------------------


def render_system(message: Message) -> str:
    """A system message: its text, then its tools block and response format."""
    return _text(message.get("content")) + _extras(message)


def render_developer(message: Message) -> str:
    """A developer message: a user turn with the system message's extras."""
    text = _text(message.get("content"))
    if not text:
        raise ValueError("a developer message needs content")
    return USER + text + _extras(message)


def render_user(parts: Sequence[str]) -> str:
    """A user turn from its rendered parts (texts and tool results)."""
    return USER + "\n\n".join(parts)


def render_assistant(message: Message, *, keep_reasoning: bool, eos: bool = True) -> str:
    """An assistant turn's body (its opener is written by :func:`assistant_opener`).

    ``keep_reasoning`` writes ``reasoning + </think>`` in front of the text.
    """
    body = (_reasoning(message) + THINK_END) if keep_reasoning else ""
    body += _text(message.get("content"))
    if message.get("tool_calls"):
        body += "\n\n" + render_tool_calls(message["tool_calls"])
    return body + (EOS if eos else "")


def assistant_opener(*, thinking: bool) -> str:
    """Open an assistant turn: ``<｜Assistant｜>`` + ``<think>`` or ``</think>``."""
    return ASSISTANT + (THINK_START if thinking else THINK_END)


def _extras(message: Message) -> str:
    out = ""
    if message.get("tools"):
        out += "\n\n" + render_tools_block(message["tools"])
    if message.get("response_format"):
        out += "\n\n" + render_response_format(message["response_format"])
    return out


# ----------------------------------------------------------------------------
# Conversation preprocessing
# ----------------------------------------------------------------------------


@dataclass
class _Turn:
    """A message after preprocessing; user turns carry rendered parts."""

    role: str
    message: Message
    parts: list[str] = field(default_factory=list)
    tool_ids: list[str | None] = field(default_factory=list)  # per part; None = not a tool result


def _merge_turns(messages: Sequence[Message]) -> list[_Turn]:
    """Fold tool messages into user turns, merge consecutive user turns and
    order each turn's tool results like the calls they answer."""
    turns: list[_Turn] = []
    call_order: dict[str, int] = {}
    for message in messages:
        role = message.get("role")
        if role in ("user", "tool"):
            if role == "tool":
                part, tool_id = render_tool_result(message.get("content")), message.get("tool_call_id") or ""
            else:
                part, tool_id = _text(message.get("content")), None
            if not (turns and turns[-1].role == "user"):
                turns.append(_Turn("user", message))
            turns[-1].parts.append(part)
            turns[-1].tool_ids.append(tool_id)
            continue
        if role not in ("system", "developer", "assistant", "latest_reminder"):
            raise ValueError(f"unsupported role {role!r} in DeepSeek-V4 chat encoding")
        _order_tool_results(turns, call_order)
        if role == "assistant" and message.get("tool_calls"):
            call_order = {}
            for i, call in enumerate(message["tool_calls"]):
                call_id = call.get("id") or call.get("function", {}).get("id")
                if call_id:
                    call_order[call_id] = i
        turns.append(_Turn(role, message))
    _order_tool_results(turns, call_order)
    return turns


def _order_tool_results(turns: list[_Turn], call_order: Mapping[str, int]) -> None:
    """Sort the tool results of the last turn (if a user turn) by call order;
    texts keep their places, unknown ids sort first, ties keep their order."""
    if not turns or turns[-1].role != "user":
        return
    turn = turns[-1]
    slots = [i for i, tool_id in enumerate(turn.tool_ids) if tool_id is not None]
    if len(slots) < 2 or not call_order:
        return
    ordered = sorted(slots, key=lambda i: call_order.get(turn.tool_ids[i] or "", 0))
    parts = list(turn.parts)
    for slot, source in zip(slots, ordered):
        turn.parts[slot] = parts[source]


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


def _last_user_index(turns: Sequence[_Turn]) -> int:
    """Index of the last user or developer turn, or -1 if there is none."""
    return max((i for i, t in enumerate(turns) if t.role in ("user", "developer")), default=-1)


# ----------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------


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
    """Encode a conversation into the DeepSeek-V4 prompt string.

    Args:
        messages: OpenAI-style dicts. Roles ``system``, ``developer``, ``user``,
            ``tool`` (``content``, ``tool_call_id``), ``assistant`` (``content``,
            ``reasoning`` or ``reasoning_content``, ``tool_calls`` with
            ``function.name`` / ``function.arguments`` as JSON text or dict) and
            ``latest_reminder``. Content may be a string or text parts. System and
            developer messages may carry ``tools`` and ``response_format``.
        thinking: thinking mode (the model reasons inside ``<think>…</think>``).
        add_generation_prompt: open an assistant turn after a trailing user,
            developer or system message.
        tools: request tools (OpenAI format); attached to the first system message.
        reasoning_effort: effort name of ``profile`` (thinking mode only; ``None``
            = the profile's default).
        profile: the :class:`EffortProfile` mapping efforts to preambles.
        drop_thinking: drop earlier turns' reasoning (only without tools).
        continue_final_message: leave a final assistant message open (no EOS) so
            generation continues it.

    Returns:
        The prompt text, starting with BOS; tokenize it without adding specials.
    """
    preamble = profile.preamble(reasoning_effort) if thinking else ""
    turns = _merge_turns(_attach_tools(messages, tools))
    has_tools = any(t.message.get("tools") for t in turns)
    drop = thinking and drop_thinking and not has_tools
    if drop:
        last_user = _last_user_index(turns)
        turns = [t for i, t in enumerate(turns) if not (t.role == "developer" and i < last_user)]
    last_user = _last_user_index(turns)

    parts = [BOS, preamble]
    for i, turn in enumerate(turns):
        role, message = turn.role, turn.message
        is_last = i == len(turns) - 1
        next_role = None if is_last else turns[i + 1].role
        if role == "system":
            parts.append(render_system(message))
        elif role == "developer":
            parts.append(render_developer(message))
        elif role == "user":
            parts.append(render_user(turn.parts))
        elif role == "latest_reminder":
            parts.append(LATEST_REMINDER + _text(message.get("content")))
        else:  # assistant
            keep = thinking and (not drop or i > last_user)
            parts.append(render_assistant(message, keep_reasoning=keep, eos=not (is_last and continue_final_message)))
            continue
        # Open the assistant turn that follows (or the generation prompt).
        if next_role not in (None, "assistant", "latest_reminder"):
            continue
        if role == "latest_reminder" or (role == "system" and next_role == "latest_reminder"):
            continue
        if is_last and not add_generation_prompt:
            continue
        parts.append(assistant_opener(thinking=thinking and (not drop or i >= last_user)))
    return "".join(parts)


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


TEMPLATE_HEADER = "{#- DeepSeek-V4 chat template, generated from v4_plugin.chat (encode_messages). -#}\n"
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
        " use v4_plugin.chat.encode_messages for JSON text') -}}{%- endif -%}\n"
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
