"""SGLang function-call detector and reasoning detector for DeepSeek-V4: thin
adapters over :class:`v4_plugin.text.dsml.StreamParser`.

Select them with::

    --tool-call-parser deepseek_v4_plugin --reasoning-parser deepseek_v4_plugin

:func:`register_parsers` adds both to SGLang's registries
(``FunctionCallParser.ToolCallParserEnum`` and ``ReasoningParser.DetectorMap``).
SGLang builds the ``--tool-call-parser`` / ``--reasoning-parser`` choices from
those registries when the modules are already imported, so call it before SGLang
parses its command line (the plugin entry point does).

SGLang runs the reasoning detector first and feeds its normal text to the
function-call detector: the reasoning detector splits ``reasoning </think> rest``
and passes ``rest`` on with its non-DSML special tokens removed; the function-call
detector turns DSML blocks into calls (whole, when the completion ends) and keeps every
special token out of the normal text.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from v4_plugin.text.chat import DSML, THINK_END, THINK_START
from v4_plugin.text.dsml import SPECIAL_TOKENS, StreamParser
from v4_plugin.text.tools import forced_call_structural_tag, forced_tools

PARSER_NAME = "deepseek_v4_plugin"
"""The ``--tool-call-parser`` and ``--reasoning-parser`` name."""


def register_parsers() -> None:
    """Register the detectors with SGLang (idempotent)."""
    from sglang.srt.function_call.function_call_parser import FunctionCallParser
    from sglang.srt.parser.reasoning_parser import ReasoningParser

    classes = _classes()
    FunctionCallParser.ToolCallParserEnum[PARSER_NAME] = classes["DeepSeekV4PluginDetector"]
    ReasoningParser.DetectorMap[PARSER_NAME] = classes["DeepSeekV4PluginReasoningDetector"]


def __getattr__(name: str) -> Any:
    # The classes subclass SGLang's, so they are built on first use only.
    if name in ("DeepSeekV4PluginDetector", "DeepSeekV4PluginReasoningDetector"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _classes() -> dict[str, type]:
    from sglang.srt.function_call.base_format_detector import BaseFormatDetector
    from sglang.srt.function_call.core_types import StreamingParseResult, StructureInfo, ToolCallItem
    from sglang.srt.parser.reasoning_parser import BaseReasoningFormatDetector
    from sglang.srt.parser.reasoning_parser import StreamingParseResult as ReasoningResult

    def tool_indices(tools) -> dict[str, int]:
        return {t.function.name: i for i, t in enumerate(tools or []) if t.function.name}

    class DeepSeekV4PluginDetector(BaseFormatDetector):
        """DSML ``tool_calls`` blocks -> SGLang tool-call items."""

        def __init__(self) -> None:
            super().__init__()
            self.bot_token = f"<{DSML}tool_calls>"
            self.eot_token = f"</{DSML}tool_calls>"
            self._stream = StreamParser(split_reasoning=False)

        def has_tool_call(self, text: str) -> bool:
            # True whenever the text holds markup the parser removes, so SGLang
            # returns the cleaned text rather than the raw one.
            return any(m in text for m in SPECIAL_TOKENS)

        def detect_and_parse(self, text: str, tools) -> StreamingParseResult:
            stream = StreamParser(split_reasoning=False)
            stream.feed(text)
            stream.finish()
            indices = tool_indices(tools)
            calls = [
                ToolCallItem(tool_index=indices.get(c.name, -1), name=c.name, parameters=c.arguments)
                for c in stream.result.tool_calls
            ]
            return StreamingParseResult(normal_text=stream.result.content, calls=calls)

        def _result(self, delta) -> StreamingParseResult:
            calls = []
            for tc in delta.tool_calls:
                # streaming items carry the call ordinal (SGLang uses it as the delta index)
                calls.append(ToolCallItem(tool_index=tc.index, name=tc.name, parameters=tc.arguments))
                self.prev_tool_call_arr.append({"name": tc.name, "arguments": tc.arguments})
                self.streamed_args_for_tool.append(tc.arguments)
                self.current_tool_id = tc.index + 1
            return StreamingParseResult(normal_text=delta.content, calls=calls)

        def parse_streaming_increment(self, new_text: str, tools) -> StreamingParseResult:
            return self._result(self._stream.feed(new_text))

        def finish(self, tools) -> StreamingParseResult:
            return self._result(self._stream.finish())

        def supports_structural_tag(self) -> bool:
            return False  # SGLang's legacy begin/end tag; the builtin tag below replaces it

        def parses_required_natively(self) -> bool:
            return True

        def get_structural_tag_name(self) -> str:
            return "deepseek_v4"  # xgrammar's builtin DSML grammar (V4's `tool_calls` block)

        def get_structural_tag(self, tools=None, tool_choice="auto", thinking_mode: bool = False,
                               parallel_tool_calls: bool = True):
            # tool_choice "required" or a named function: SGLang constrains the completion after the
            # reasoning with this tag (v4_plugin.text.tools.forced_call_structural_tag)
            if tool_choice == "auto":
                return super().get_structural_tag(tools, tool_choice, thinking_mode, parallel_tool_calls)
            tag = forced_call_structural_tag(forced_tools(tools, tool_choice), reasoning=thinking_mode,
                                             parallel_tool_calls=parallel_tool_calls is not False)
            if tag is not None:
                return tag
            # xgrammar's looser built-in tag, held to the schemas whatever the tools' `strict` says
            tools = [t.model_copy(update={"function": t.function.model_copy(update={"strict": True})})
                     for t in tools or []]
            return super().get_structural_tag(tools, tool_choice, thinking_mode, parallel_tool_calls)

        @classmethod
        def parses_without_tools(cls) -> bool:
            return True

        def structure_info(self):
            def info(name: str) -> StructureInfo:
                return StructureInfo(
                    begin=f'<{DSML}tool_calls>\n<{DSML}invoke name="{name}">\n',
                    end=f"</{DSML}invoke>\n</{DSML}tool_calls>",
                    trigger=f"<{DSML}tool_calls>",
                )

            return info

    class DeepSeekV4PluginReasoningDetector(BaseReasoningFormatDetector):
        """Splits ``reasoning </think> rest``; ``rest`` goes on as normal text, non-DSML special tokens removed.

        Thinking (the completion starts inside ``<think>``) follows ``force_reasoning``,
        which SGLang computes per request with ``OpenAIServingChat._get_reasoning_from_request``;
        for this parser :mod:`sglang_backend.chat` answers it with the rule the prompt is
        rendered with (:func:`v4_plugin.text.chat.request_thinking`: ``reasoning_effort="none"``
        or ``thinking`` / ``enable_thinking`` false turn it off).
        """

        def __init__(
            self,
            stream_reasoning: bool = True,
            force_reasoning: bool = True,
            continue_final_message: bool = False,
            previous_content: str = "",
            force_nonempty_content: bool = False,
            tool_call_parser_active: bool = False,
        ) -> None:
            super().__init__(
                THINK_START,
                THINK_END,
                force_reasoning=force_reasoning,
                stream_reasoning=stream_reasoning,
                continue_final_message=continue_final_message,
                previous_content=previous_content,
                reasoning_default="thinking",
                force_nonempty_content=force_nonempty_content,
            )
            # continuing an assistant message: its text says where we are
            self._thinking = self._in_reasoning
            self._stream = StreamParser(self._thinking, parse_tools=False)
            self._held_reasoning = ""

        def _result(self, delta, *, final: bool = False) -> ReasoningResult:
            reasoning = delta.reasoning
            if not self.stream_reasoning:  # hand the reasoning over in one piece
                self._held_reasoning += reasoning
                reasoning = ""
                if final or self._stream.reasoning_ended:
                    reasoning, self._held_reasoning = self._held_reasoning, ""
            return ReasoningResult(normal_text=delta.content, reasoning_text=reasoning)

        def detect_and_parse(self, text: str) -> ReasoningResult:
            stream = StreamParser(self._thinking, parse_tools=False)
            stream.feed(text)
            stream.finish()
            return ReasoningResult(normal_text=stream.result.content, reasoning_text=stream.result.reasoning)

        def parse_streaming_increment(self, new_text: str) -> ReasoningResult:
            return self._result(self._stream.feed(new_text))

        def finish(self) -> ReasoningResult:
            return self._result(self._stream.finish(), final=True)

    DeepSeekV4PluginDetector.__module__ = __name__
    DeepSeekV4PluginReasoningDetector.__module__ = __name__
    return {
        "DeepSeekV4PluginDetector": DeepSeekV4PluginDetector,
        "DeepSeekV4PluginReasoningDetector": DeepSeekV4PluginReasoningDetector,
    }
