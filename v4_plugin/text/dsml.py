"""Parse DeepSeek-V4 completions: reasoning, content and DSML tool calls, streaming or not.

The inverse of :mod:`v4_plugin.text.chat`, with the grammar of DeepSeek's official parser
(``parse_message_from_completion_text`` in ``encoding/encoding_dsv4.py``). A completion (the text
after the prompt's ``<｜Assistant｜><think>`` or ``<｜Assistant｜></think>``) is::

    [reasoning </think>] content [\\n\\n<｜DSML｜tool_calls> invokes </｜DSML｜tool_calls>] [EOS]

:class:`StreamParser` is one incremental state machine whose decisions never depend on where
the text is cut, so :func:`parse_completion` (the whole text fed at once) and any streaming of
the same text give the same result (chunks may be ``str`` or UTF-8 ``bytes`` cut anywhere).
The end of the text stands for EOS (servers stop at EOS and usually do not show it).

On every completion the official parser accepts (with EOS appended when absent) the result is
the official one: reasoning up to ``</think>``; content up to ``\\n\\n<｜DSML｜tool_calls`` (so
content keeps all but the last two newlines before a tool block); each call's name and
``arguments`` text byte for byte as the official parser builds them (``string="false"`` values
are copied raw, JSON or not). Deliberate differences, where the official parser raises or keeps
control tokens:

* between DSML tags, where the format has ``>\\n``, any whitespace or none is accepted (the
  layouts xgrammar's DeepSeek-V4 structural tag allows when it enforces ``tool_choice``);
* a tool block the official grammar rejects (cut short, stray text, a duplicate parameter, ...)
  gives no calls: its text goes to ``content`` with the special tokens removed and
  :attr:`ParsedCompletion.malformed` is set (and a warning logged);
* special-token strings (:data:`SPECIAL_TOKENS`: BOS, EOS, ``<think>``, ``</think>``,
  ``｜DSML｜``, ``<｜User｜>``, the task tokens, ...) never reach ``content`` or ``reasoning``:
  they are removed (the official parser rejects the first five, which sets ``malformed``, and
  keeps the others);
* a thinking completion that ends inside its reasoning (``max_tokens``) keeps that text as
  reasoning, as both frameworks do.

Tool calls are emitted when the completion ends (:meth:`StreamParser.finish`): only then is the
block known to be valid.
"""

from __future__ import annotations

import codecs
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from v4_plugin.text.chat import (ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, PAD, TASK_TOKENS, THINK_END, THINK_START,
                   TOOL_CALLS_BLOCK, USER, to_json)

__all__ = [
    "Delta",
    "MalformedToolBlock",
    "ParsedCompletion",
    "SPECIAL_TOKENS",
    "StreamParser",
    "ToolCall",
    "ToolCallDelta",
    "parse_completion",
    "parse_tool_block",
    "strip_special",
]

logger = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, USER, ASSISTANT, LATEST_REMINDER, THINK_START, THINK_END,
                                   DSML, *TASK_TOKENS.values())
"""Control-token strings that never reach ``content`` or ``reasoning``."""

REJECTED_TOKENS = frozenset({BOS, EOS, THINK_START, THINK_END, DSML})
"""The special tokens whose presence in content or reasoning makes the official parser raise."""

BLOCK_START = f"\n\n<{DSML}{TOOL_CALLS_BLOCK}"
"""What starts a tool block (the official parser needs the two newlines)."""

_INVOKE = f"<{DSML}invoke"
_INVOKE_END = f"</{DSML}invoke"
_PARAM = f"<{DSML}parameter"
_PARAM_END = f"/{DSML}parameter"
_BLOCK_END = f"</{DSML}{TOOL_CALLS_BLOCK}>"
# The official grammar's patterns (`$` also matches before a final newline, as there).
_NAME_RE = re.compile(r'^\s*name="(.*?)">\n$', re.DOTALL)
_GAP_RE = re.compile(r">\s*")
"""Between DSML tags DeepSeek's format has ``>\n``; any whitespace (or none) after the ``>`` is
accepted too: xgrammar's DeepSeek-V4 structural tag (which enforces ``tool_choice``) allows it."""
_PARAM_RE = re.compile(r'^ name="(.*?)" string="(true|false)">(.*?)<$', re.DOTALL)


class MalformedToolBlock(ValueError):
    """A tool block the official DSML grammar rejects."""


def strip_special(text: str) -> str:
    """``text`` without any special-token string (:data:`SPECIAL_TOKENS`)."""
    for token in SPECIAL_TOKENS:
        text = text.replace(token, "")
    return text


def _read_until(text: str, index: int, stops: tuple[str, ...]) -> tuple[int, str, str | None]:
    """From ``index``: (index after the earliest stop, text before it, the stop), or
    (len(text), the rest, None) when no stop occurs. Ties go to the first stop listed."""
    best, found = len(text), None
    for stop in stops:
        pos = text.find(stop, index)
        if pos != -1 and pos < best:
            best, found = pos, stop
    if found is None:
        return len(text), text[index:], None
    return best + len(found), text[index:best], found


def parse_tool_block(rest: str) -> list[tuple[str, str]]:
    """The calls of a tool block: ``rest`` is the text after ``\\n\\n<｜DSML｜tool_calls``, ending
    with EOS. Returns ``(name, arguments JSON text)`` pairs as the official parser builds them.

    Raises:
        MalformedToolBlock: the official grammar rejects the block (the message says where).
    """
    calls: list[tuple[str, str]] = []
    index = 0
    while index < len(rest):
        index, gap, stop = _read_until(rest, index, (_INVOKE, _BLOCK_END))
        if not _GAP_RE.fullmatch(gap):
            raise MalformedToolBlock(f"expected '>\\n' before an invoke or the block end, got {gap[:80]!r}")
        if stop == _BLOCK_END:
            break
        if stop is None:
            raise MalformedToolBlock("the tool block has no invoke and no end tag")
        index, head, stop = _read_until(rest, index, (_PARAM, _INVOKE_END))
        names = _NAME_RE.findall(head)
        if len(names) != 1:
            raise MalformedToolBlock(f"bad invoke head {head[:80]!r}")
        arguments: dict[str, tuple[str, str]] = {}
        while stop == _PARAM:
            index, body, stop = _read_until(rest, index, (_PARAM_END,))
            match = _PARAM_RE.findall(body)
            if len(match) != 1:
                raise MalformedToolBlock(f"bad parameter {body[:80]!r}")
            key, is_string, value = match[0]
            if key in arguments:
                raise MalformedToolBlock(f"duplicate parameter {key!r}")
            arguments[key] = (value, is_string)
            index, gap, stop = _read_until(rest, index, (_PARAM, _INVOKE_END))
            if not _GAP_RE.fullmatch(gap):
                raise MalformedToolBlock(f"expected '>\\n' after a parameter, got {gap[:80]!r}")
        pairs = (f"{to_json(k)}: {to_json(v) if s == 'true' else v}" for k, (v, s) in arguments.items())
        calls.append((names[0], "{" + ", ".join(pairs) + "}"))
    index, tail, stop = _read_until(rest, index, (EOS,))
    if tail or index != len(rest):
        raise MalformedToolBlock(f"text after the tool block: {(tail or rest[index:])[:80]!r}")
    return calls


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    """A complete tool call; ``arguments`` is the JSON text of its arguments object."""

    name: str
    arguments: str
    id: str = field(default_factory=_new_call_id)

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """One streamed tool-call piece in OpenAI's shape (here always a whole call)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI streaming ``delta.tool_calls`` entry."""
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


@dataclass
class Delta:
    """What one :meth:`StreamParser.feed` call adds."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: Delta) -> Delta:
        """Append ``other`` to this delta (in place) and return it."""
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)
        return self


@dataclass
class ParsedCompletion:
    """A whole completion, parsed."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed: bool = False
    """The official parser rejects this completion: a bad tool block (returned as content) or a
    rejected special token (removed)."""

    def to_message(self) -> dict[str, Any]:
        """An OpenAI assistant message (``reasoning_content`` for the reasoning)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return message


State = Literal["reasoning", "content", "raw", "block", "done"]

_REASONING_MARKERS = (THINK_END, *SPECIAL_TOKENS)
_CONTENT_MARKERS = (BLOCK_START, *SPECIAL_TOKENS)
_RAW_MARKERS = tuple(t for t in SPECIAL_TOKENS if t != DSML)
_MAX_MARKER = max(len(m) for m in _CONTENT_MARKERS)


def _find(buf: str, markers: tuple[str, ...], final: bool) -> tuple[int, str | None]:
    """The next marker in ``buf``: ``(index, marker)``; or ``(split, None)`` when none is certain
    yet, ``buf[:split]`` being plain text and ``buf[split:]`` a possible marker start (held back
    unless ``final``). A complete marker is taken only when no longer marker can start before it."""
    best, found = len(buf), None
    for marker in markers:
        i = buf.find(marker)
        if i != -1 and (i < best or (i == best and len(marker) > len(found or ""))):
            best, found = i, marker
    if final:
        return (best, found) if found is not None else (len(buf), None)
    for q in range(max(0, len(buf) - _MAX_MARKER + 1), min(best, len(buf))):
        tail = buf[q:]
        if any(len(m) > len(tail) and m.startswith(tail) for m in markers):
            return q, None
    return best, found


class StreamParser:
    """Incremental parser of one completion.

    Args:
        thinking: the prompt opened the turn with ``<think>`` (the completion starts inside
            reasoning).
        parse_tools: parse DSML tool calls. ``False`` passes everything after the reasoning on as
            content with only the non-DSML special tokens removed (for a framework's reasoning
            parser whose output feeds a separate tool parser).
        split_reasoning: separate reasoning. ``False`` starts in content (for a tool parser fed
            reasoning-free text).
        id_factory: makes tool-call ids.
    """

    def __init__(
        self,
        thinking: bool = False,
        *,
        parse_tools: bool = True,
        split_reasoning: bool = True,
        id_factory: Callable[[], str] = _new_call_id,
    ) -> None:
        self.parse_tools = parse_tools
        self.id_factory = id_factory
        self.state: State = "reasoning" if (thinking and split_reasoning) else ("content" if parse_tools else "raw")
        self._result = ParsedCompletion()
        self._reasoning_parts: list[str] = []
        self._content_parts: list[str] = []
        self.finished = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""  # unprocessed text (reasoning / content / raw states)
        self._block: list[str] = []  # text after BLOCK_START (block state)
        self._why = ""  # what made the completion malformed (logged at the end)
        self._out = Delta()

    # -- public API ---------------------------------------------------------

    @property
    def result(self) -> ParsedCompletion:
        """Everything parsed so far (the whole completion after :meth:`finish`)."""
        self._result.reasoning = "".join(self._reasoning_parts)
        self._result.content = "".join(self._content_parts)
        return self._result

    @property
    def reasoning_ended(self) -> bool:
        """Whether the completion has left the reasoning part."""
        return self.state != "reasoning"

    def feed(self, chunk: str | bytes) -> Delta:
        """Add text (or UTF-8 bytes, cut anywhere) and return what it completes."""
        if self.finished:
            raise RuntimeError("feed() after finish()")
        text = self._decoder.decode(chunk) if isinstance(chunk, (bytes, bytearray)) else chunk
        self._take(text, final=False)
        return self._flush_out()

    def finish(self) -> Delta:
        """End of the completion: release held-back text and the tool calls; return the last delta."""
        if not self.finished:
            self.finished = True
            self._take(self._decoder.decode(b"", final=True), final=True)
            if self.state == "block":
                self._end_block()
            if self._result.malformed:
                logger.warning("DeepSeek-V4 completion rejected by the official DSML grammar: %s; "
                               "returned as plain content, special tokens removed", self._why)
        return self._flush_out()

    # -- output ---------------------------------------------------------------

    def _flush_out(self) -> Delta:
        out, self._out = self._out, Delta()
        return out

    def _reasoning(self, text: str) -> None:
        if text:
            self._out.reasoning += text
            self._reasoning_parts.append(text)

    def _content(self, text: str) -> None:
        if text:
            self._out.content += text
            self._content_parts.append(text)

    def _malformed(self, why: str) -> None:
        if not self._result.malformed:
            self._result.malformed, self._why = True, why

    # -- the state machine ------------------------------------------------------

    def _take(self, text: str, *, final: bool) -> None:
        if self.state == "block":
            self._block.append(text)
            return
        self._buf += text
        while self.state != "block" and (self._buf or final):
            if self.state == "reasoning":
                progressed = self._step(_REASONING_MARKERS, self._reasoning, final)
            else:
                progressed = self._step(_RAW_MARKERS if self.state == "raw" else _CONTENT_MARKERS, self._content, final)
            if not progressed:
                break

    def _step(self, markers: tuple[str, ...], emit: Callable[[str], None], final: bool) -> bool:
        i, marker = _find(self._buf, markers, final)
        if self.state == "done" and (i or marker):
            self._malformed("text after EOS")
        emit(self._buf[:i])
        if marker is None:
            self._buf = self._buf[i:]
            return False
        self._buf = self._buf[i + len(marker) :]
        if marker == THINK_END and self.state == "reasoning":
            self.state = "content" if self.parse_tools else "raw"
        elif marker == BLOCK_START:
            self.state = "block"
            self._block = [self._buf]
            self._buf = ""
        elif marker == EOS and self.state == "content":
            self.state = "done"
        elif marker in REJECTED_TOKENS and self.state != "raw":
            self._malformed(f"{marker!r} in the {'reasoning' if self.state == 'reasoning' else 'content'}")
        return True

    def _end_block(self) -> None:
        rest = "".join(self._block)
        self._block, self.state = [], "done"
        try:
            if self._result.malformed:  # the official parser rejects the whole completion
                raise MalformedToolBlock(self._why)
            calls = parse_tool_block(rest if rest.endswith(EOS) else rest + EOS)
        except MalformedToolBlock as exc:
            self._malformed(f"tool block: {exc}")
            self._content(strip_special(BLOCK_START + rest))
            return
        for name, arguments in calls:
            call = ToolCall(name=name, arguments=arguments, id=self.id_factory())
            self._out.tool_calls.append(ToolCallDelta(len(self._result.tool_calls), call.id, name, arguments))
            self._result.tool_calls.append(call)


def parse_completion(
    text: str,
    *,
    thinking: bool = False,
    id_factory: Callable[[], str] = _new_call_id,
) -> ParsedCompletion:
    """Parse a whole completion into reasoning, content and tool calls.

    ``thinking`` says whether the prompt opened the turn with ``<think>``.
    """
    parser = StreamParser(thinking, id_factory=id_factory)
    parser.feed(text)
    parser.finish()
    return parser.result
