"""Parse DeepSeek-V4 completions: reasoning, content and DSML tool calls, streaming or not.

The inverse of :mod:`v4_plugin.chat`. A completion (the text the model writes after
the prompt's ``<｜Assistant｜><think>`` or ``<｜Assistant｜></think>``) is::

    [reasoning </think>] content [\\n\\n <｜DSML｜tool_calls> invokes </｜DSML｜tool_calls>] [EOS]

:class:`StreamParser` is one incremental state machine; :func:`parse_completion`
feeds it the whole text at once, so the streaming and non-streaming results are
the same by construction, for any split of the text into chunks (chunks may be
``str`` or UTF-8 ``bytes`` cut anywhere, inside a character, a special token or
a DSML tag).

Guarantees:

* no DSML markup (``｜DSML｜``), ``<think>``, ``</think>`` or EOS text reaches
  ``content``: tool-call blocks become tool calls, stray DSML tags and think
  tags are dropped;
* a tool call is emitted whole (name and complete JSON ``arguments`` in one
  delta) once its ``</｜DSML｜invoke>`` has arrived, so a completion cut short
  (``max_tokens``) never yields half a call: the unfinished part comes back as
  content with the DSML markers removed (``truncated="content"``, the default)
  or is dropped (``truncated="drop"``), and ``truncated`` is set on the result;
* lenient where models are sloppy: ``<｜DSML｜toolcalls>`` (vllm#51914) and
  ``function_calls`` / ``tool_call`` / ``tool`` block names, an ``invoke``
  without its block, a missing ``string`` attribute (JSON if it parses, else
  text), a missing ``</｜DSML｜parameter>`` or ``</｜DSML｜invoke>``, an invoke
  whose body is one JSON object, a tool block opened inside reasoning (ends it);
* ``string="true"`` values are kept verbatim; ``string="false"`` values are
  JSON-decoded (a value that is not JSON is kept as text).

The whitespace that separates content from a tool block (the encoder writes
``\\n\\n``) is not part of the content.
"""

from __future__ import annotations

import codecs
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .chat import DSML, EOS, THINK_END, THINK_START

__all__ = [
    "Delta",
    "ParsedCompletion",
    "StreamParser",
    "ToolCall",
    "ToolCallDelta",
    "parse_completion",
    "strip_dsml",
]

BLOCK_NAMES = ("tool_calls", "toolcalls", "tool_call", "function_calls", "tool")
"""Block names accepted around invokes (V4 writes ``tool_calls``)."""

_OPEN = "<" + DSML
_CLOSE = "</" + DSML
_INVOKE = _OPEN + "invoke"
_INVOKE_END = _CLOSE + "invoke>"
_BLOCK_NAME_RE = "(?:" + "|".join(BLOCK_NAMES) + ")"
_BLOCK_OPEN_RE = re.compile(re.escape(_OPEN) + _BLOCK_NAME_RE + r"\s*>")
_BLOCK_CLOSE_RE = re.compile(re.escape(_CLOSE) + _BLOCK_NAME_RE + r"\s*>")
_PARTIAL_CLOSE_RE = re.compile(re.escape(_CLOSE) + r"[A-Za-z_]*\s*")
_INVOKE_HEAD_RE = re.compile(
    re.escape(_INVOKE) + r'\s+name\s*=\s*"([^"]*)"\s*>|' + re.escape(_INVOKE) + r"\s+name\s*=\s*([^\s>]*)\s*>"
)
_PARAM_RE = re.compile(
    re.escape(_OPEN + "parameter")
    + r'\s+name\s*=\s*"([^"]*)"(?:\s+string\s*=\s*"([^"]*)")?\s*>'
    + r"(.*?)(?:"
    + re.escape(_CLOSE + "parameter>")
    + r"|(?="
    + re.escape(_OPEN + "parameter")
    + r"[\s>])|\Z)",
    re.DOTALL,
)
_MAX_TAG = 512  # a DSML tag longer than this without '>' is not a tag

# Markers searched for in the reasoning and content states (none of them is a
# substring of a proper prefix of another, so "earliest complete marker, else
# hold back the longest partial one" is exact).
_REASONING_MARKERS = (THINK_END, THINK_START, EOS, _OPEN)
_CONTENT_MARKERS = (THINK_START, THINK_END, EOS, _OPEN, _CLOSE)


def strip_dsml(text: str) -> str:
    """``text`` without the ``｜DSML｜`` marker (so it can be shown as plain text)."""
    return text.replace(DSML, "")


def _trim_partial_marker(text: str) -> str:
    """Drop a special-token fragment (``<｜DS``, ``</｜``, ``<｜end…``) ending ``text``."""
    for marker in (_OPEN, _CLOSE, EOS):
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if "｜" in marker[:k] and text.endswith(marker[:k]):
                return text[:-k]
    return text


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    """A complete tool call; ``arguments`` is JSON text of an object."""

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
    truncated: bool = False
    """An unfinished tool call was cut off (returned as content or dropped)."""

    def to_message(self) -> dict[str, Any]:
        """An OpenAI assistant message (``reasoning_content`` for the reasoning)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return message


State = Literal["reasoning", "content", "raw", "tag", "block"]


class StreamParser:
    """Incremental parser of one completion.

    Args:
        thinking: the prompt opened the turn with ``<think>`` (the completion
            starts inside reasoning).
        parse_tools: parse DSML tool calls. ``False`` passes everything after the
            reasoning through verbatim as content (for a framework's reasoning
            parser whose output feeds a separate tool parser).
        split_reasoning: separate reasoning. ``False`` starts in content and
            drops think tags (for a tool parser fed reasoning-free text).
        truncated: what an unfinished tool call at the end becomes: ``"content"``
            (its text, DSML markers removed) or ``"drop"``.
        id_factory: makes tool-call ids.
    """

    def __init__(
        self,
        thinking: bool = False,
        *,
        parse_tools: bool = True,
        split_reasoning: bool = True,
        truncated: Literal["content", "drop"] = "content",
        id_factory: Callable[[], str] = _new_call_id,
    ) -> None:
        if truncated not in ("content", "drop"):
            raise ValueError(f"truncated must be 'content' or 'drop', got {truncated!r}")
        self.parse_tools = parse_tools
        self.split_reasoning = split_reasoning
        self.truncated_policy = truncated
        self.id_factory = id_factory
        self.state: State = "reasoning" if (thinking and split_reasoning) else ("content" if parse_tools else "raw")
        self._result = ParsedCompletion()
        self._reasoning_parts: list[str] = []
        self._content_parts: list[str] = []
        self.finished = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""  # unprocessed text (reasoning/content/raw/tag states)
        self._tag = ""  # a DSML tag being read (tag state)
        self._ws = ""  # trailing content whitespace held back
        self._ws_before_block = ""  # the whitespace a tool block replaced
        self._content_seen = False  # non-whitespace content (or a call) was produced
        self._after_block = False  # drop whitespace that follows a tool block
        self._block = ""  # text inside the current tool block
        self._bpos = 0  # parse position in _block
        self._block_dropped = ""  # block text skipped before the first call (for truncation)
        self._scan = 0  # chars of the current invoke already searched for its end
        self._deferred: list[str] = []  # block text known not to end the current invoke
        self._tail = ""  # the last characters of the block text (deferred included)
        self._block_opener = ""  # the tag that opened the block
        self._block_calls = 0  # calls emitted from the current block
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
        """End of the completion: release held-back text; return the last delta."""
        if not self.finished:
            self.finished = True
            self._take(self._decoder.decode(b"", final=True), final=True)
        return self._flush_out()

    # -- output ---------------------------------------------------------------

    def _flush_out(self) -> Delta:
        out, self._out = self._out, Delta()
        return out

    def _reasoning(self, text: str) -> None:
        if text:
            self._out.reasoning += text
            self._reasoning_parts.append(text)

    def _content(self, text: str, *, final: bool = False) -> None:
        """Emit content, holding back trailing whitespace (it may precede a block)."""
        if self._after_block:
            text = text.lstrip()
            if not text:
                return
            self._after_block = False
        text = self._ws + text
        body = text if final else text.rstrip()
        self._ws = text[len(body) :]
        if body:
            if body.strip():
                self._content_seen = True
            self._out.content += body
            self._content_parts.append(body)

    def _call(self, name: str, arguments: str) -> None:
        call = ToolCall(name=name, arguments=arguments, id=self.id_factory())
        self._out.tool_calls.append(ToolCallDelta(len(self._result.tool_calls), call.id, name, arguments))
        self._result.tool_calls.append(call)
        self._content_seen = True
        self._block_calls += 1

    # -- the state machine ------------------------------------------------------

    def _take(self, text: str, *, final: bool) -> None:
        if self.state == "block":
            # Inside an unfinished invoke only text with a DSML marker can end it:
            # collect the rest without rebuilding the block string (linear time).
            if self._scan and not final and DSML not in self._tail + text:
                self._deferred.append(text)
                self._tail = (self._tail + text)[-8:]
                return
            if self._deferred:
                text, self._deferred = "".join(self._deferred) + text, []
            self._block += text
            self._tail = self._block[-8:]
        elif self.state == "tag":
            self._tag += text
        else:
            self._buf += text
        while True:
            state = self.state
            if state == "reasoning":
                progressed = self._step_reasoning(final)
            elif state == "content":
                progressed = self._step_content(final)
            elif state == "raw":
                self._content(self._buf, final=True)
                self._buf = ""
                progressed = False
            elif state == "tag":
                progressed = self._step_tag(final)
            else:
                progressed = self._step_block(final)
            if not progressed:
                break
        if final:
            self._content("", final=True)

    @staticmethod
    def _find(buf: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
        """Earliest complete marker in ``buf`` -> (index, marker); else (split, None)
        where ``buf[split:]`` is the longest suffix that may start a marker."""
        best, found = len(buf), None
        for marker in markers:
            i = buf.find(marker)
            if i != -1 and (i < best or (i == best and found is not None and len(marker) > len(found))):
                best, found = i, marker
        if found is not None:
            return best, found
        hold = 0
        for marker in markers:
            for k in range(min(len(marker) - 1, len(buf)), hold, -1):
                if marker.startswith(buf[-k:]):
                    hold = k
                    break
        return len(buf) - hold, None

    def _step_reasoning(self, final: bool) -> bool:
        i, marker = self._find(self._buf, _REASONING_MARKERS)
        if marker is None:
            if final:
                i = len(self._buf)
            self._reasoning(self._buf[:i])
            self._buf = self._buf[i:]
            return False
        self._reasoning(self._buf[:i])
        if marker == _OPEN:  # a tool block inside reasoning ends it; the tag stays
            self._buf = self._buf[i:]
        else:
            self._buf = self._buf[i + len(marker) :]
            if marker != THINK_END:  # duplicate <think> / EOS: drop
                return True
        self.state = "content" if self.parse_tools else "raw"
        return True

    def _step_content(self, final: bool) -> bool:
        i, marker = self._find(self._buf, _CONTENT_MARKERS)
        if marker is None:
            if final:  # a held-back special-token fragment is not text
                self._buf = self._buf[:i] + _trim_partial_marker(self._buf[i:])
                i = len(self._buf)
            self._content(self._buf[:i])
            self._buf = self._buf[i:]
            return False
        self._content(self._buf[:i])
        self._buf = self._buf[i + len(marker) :]
        if marker == THINK_START and self.split_reasoning and not self._content_seen:
            self._ws = ""
            self.state = "reasoning"
        elif marker in (_OPEN, _CLOSE):
            self._tag, self.state = marker + self._buf, "tag"
            self._buf = ""
        return True

    def _step_tag(self, final: bool) -> bool:
        end = self._tag.find(">")
        if end == -1 and len(self._tag) <= _MAX_TAG:
            if final:  # cut off inside a tag
                self._truncate(self._tag)
                self._tag, self.state = "", "content"
            return False
        if end == -1:  # too long to be a tag: keep the text, drop the marker
            rest, tag = self._tag, ""
            rest = rest[len(_CLOSE) :] if rest.startswith(_CLOSE) else rest[len(_OPEN) :]
        else:
            tag, rest = self._tag[: end + 1], self._tag[end + 1 :]
        self._tag = ""
        if tag and _BLOCK_OPEN_RE.fullmatch(tag):
            self._open_block(tag, rest)
        elif tag and tag.startswith(_INVOKE) and _INVOKE_HEAD_RE.fullmatch(tag):
            self._open_block("", tag + rest)
        else:  # stray DSML markup: dropped
            self._buf, self.state = rest, "content"
        return True

    def _open_block(self, opener: str, text: str) -> None:
        self._ws_before_block, self._ws = self._ws, ""
        self._block_opener, self._block, self._bpos, self._block_calls = opener, text, 0, 0
        self._block_dropped, self._scan = "", 0
        self.state = "block"

    def _step_block(self, final: bool) -> bool:
        if self._bpos:  # forget what has been consumed (keeps long blocks linear)
            if self._block_calls == 0:
                self._block_dropped += self._block[: self._bpos]
            self._block, self._bpos = self._block[self._bpos :], 0
        block = self._block
        pos = 0
        while pos < len(block) and block[pos].isspace():
            pos += 1
        self._bpos = pos
        rest = block[pos:]
        if not rest:
            return False
        if rest.startswith(_INVOKE):
            end, consume = self._invoke_end(rest)
            if end == -1:
                if final:
                    self._truncate_block(rest)
                return False
            self._parse_invoke(rest[:end])
            self._bpos, self._scan = pos + end + consume, 0
            return True
        m = _BLOCK_CLOSE_RE.match(rest)
        if m:
            self._close_block(rest[m.end() :])
            return True
        if _INVOKE.startswith(rest) or _CLOSE.startswith(rest) or (rest.startswith(_CLOSE) and ">" not in rest):
            if final:
                if _CLOSE.startswith(rest) or _PARTIAL_CLOSE_RE.fullmatch(rest):
                    self._close_block("")  # a block end cut short: the calls are complete
                else:
                    self._truncate_block(rest)
            return False
        if rest.startswith(_CLOSE):  # a stray closing tag (e.g. </｜DSML｜parameter>)
            self._bpos = pos + rest.index(">") + 1
            return True
        nxt = rest.find("<", 1)  # anything else inside a block is skipped
        self._bpos = pos + (nxt if nxt != -1 else len(rest))
        return True

    def _invoke_end(self, rest: str) -> tuple[int, int]:
        """(end of the invoke text, length of its end tag) or (-1, 0) if unfinished.

        Searches only past what earlier calls searched (less a tag's length), so a
        long invoke fed in small pieces costs linear time."""
        start = max(0, self._scan - 64)
        candidates = []
        i = rest.find(_INVOKE_END, start)
        if i != -1:
            candidates.append((i, len(_INVOKE_END)))
        m = _BLOCK_CLOSE_RE.search(rest, start)
        if m:
            candidates.append((m.start(), 0))
        j = rest.find(_INVOKE, max(start, len(_INVOKE)))
        if j != -1:
            candidates.append((j, 0))
        if not candidates:
            self._scan = len(rest)
            return -1, 0
        return min(candidates)

    def _parse_invoke(self, text: str) -> None:
        head = _INVOKE_HEAD_RE.match(text)
        if head is None:
            return  # not a recognisable invoke: dropped
        name = head.group(1) if head.group(1) is not None else head.group(2)
        body = text[head.end() :]
        arguments: dict[str, Any] = {}
        for m in _PARAM_RE.finditer(body):
            key, is_string, value = m.group(1), m.group(2), m.group(3)
            arguments[key] = value if is_string == "true" else _json_or_text(value)
        if not arguments and body.strip().startswith("{"):
            try:
                value = json.loads(body)
            except ValueError:
                value = None
            if isinstance(value, dict):
                arguments = value
        self._call(name, json.dumps(arguments, ensure_ascii=False))

    def _close_block(self, rest: str) -> None:
        self._block, self._bpos, self._block_opener = "", 0, ""
        self._after_block = True
        self._buf, self.state = rest, "content"

    def _truncate_block(self, rest: str) -> None:
        if self._block_calls == 0:  # nothing of the block was used: give it back whole
            rest = self._block_opener + self._block_dropped + self._block
            if self.truncated_policy == "content":
                self._ws = self._ws_before_block
        self._block, self._bpos, self._block_opener = "", 0, ""
        self._buf, self.state = "", "content"
        self._truncate(rest)

    def _truncate(self, text: str) -> None:
        self._result.truncated = True
        if self.truncated_policy == "content":
            self._after_block = False
            self._content(_trim_partial_marker(strip_dsml(text)), final=True)


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def parse_completion(
    text: str,
    *,
    thinking: bool = False,
    truncated: Literal["content", "drop"] = "content",
    id_factory: Callable[[], str] = _new_call_id,
) -> ParsedCompletion:
    """Parse a whole completion into reasoning, content and tool calls.

    ``thinking`` says whether the prompt opened the turn with ``<think>``.
    """
    parser = StreamParser(thinking, truncated=truncated, id_factory=id_factory)
    parser.feed(text)
    parser.finish()
    return parser.result
