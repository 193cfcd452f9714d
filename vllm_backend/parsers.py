"""vLLM tool-call and reasoning parsers for DeepSeek-V4: thin adapters over
:class:`v4_plugin.text.dsml.StreamParser`.

Select them with::

    --enable-auto-tool-choice --tool-call-parser deepseek_v4_plugin --reasoning-parser deepseek_v4_plugin

:func:`register_parsers` registers both names lazily (nothing heavy is imported
until vLLM asks for a parser). vLLM composes the two into its ``DelegatingParser``:
the reasoning parser splits ``reasoning </think> rest`` and hands ``rest`` (its non-DSML
special tokens removed) to the tool parser, which turns DSML blocks into tool calls. Both are
stateful per request and flag ``engine_based_streaming`` so vLLM feeds them
deltas and calls ``finish_streaming()`` at the reasoning/content boundary and at
the end of the stream (where held-back text such as a partial marker or a cut-off
tool call is released).

Thinking mode (does the completion start inside ``<think>``?) comes from the
prompt when vLLM passes it (streaming: the last think token of the prompt), else
from the chat-template kwargs by :func:`v4_plugin.text.chat.request_thinking` (``thinking`` /
``enable_thinking``, ``reasoning_effort="none"`` off) with the default of the prompt
renderer in use (:func:`default_thinking`: on for the ``deepseek_v4`` tokenizer mode,
which the plugin renders with :mod:`vllm_backend.chat`; off for our Jinja template).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

from v4_plugin.text.chat import ASSISTANT, TEMPLATE_HEADER, THINK_END, THINK_START, request_thinking
from v4_plugin.text.dsml import Delta, StreamParser
from v4_plugin.text.tools import forced_call_structural_tag, forced_tools

PARSER_NAME = "deepseek_v4_plugin"
"""The ``--tool-call-parser`` and ``--reasoning-parser`` name."""

TOOL_PARSER_CLASS = "DeepSeekV4PluginToolParser"
REASONING_PARSER_CLASS = "DeepSeekV4PluginReasoningParser"


def register_parsers() -> None:
    """Register the tool-call and reasoning parsers with vLLM (lazy, idempotent)."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    ToolParserManager.register_lazy_module(PARSER_NAME, __name__, TOOL_PARSER_CLASS)
    ReasoningParserManager.register_lazy_module(PARSER_NAME, __name__, REASONING_PARSER_CLASS)


def default_thinking(tokenizer: Any, model_config: Any = None) -> bool:
    """Whether prompts open in thinking mode when the request does not say.

    vLLM's ``deepseek_v4`` tokenizer mode (rendered by :mod:`vllm_backend.chat`, as DeepSeek's
    encoder does) defaults to thinking; our Hugging Face template
    (:func:`v4_plugin.text.chat.build_chat_template`, any profile) defaults to chat; anything else: thinking."""
    if getattr(model_config, "tokenizer_mode", None) == "deepseek_v4":
        return True
    return not (getattr(tokenizer, "chat_template", None) or "").startswith(TEMPLATE_HEADER)


def __getattr__(name: str) -> Any:
    # The classes subclass vLLM's, so they are built on first use only.
    if name in (TOOL_PARSER_CLASS, REASONING_PARSER_CLASS):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _classes() -> dict[str, type]:
    from vllm.entrypoints.generate.base.protocol import (
        DeltaFunctionCall,
        DeltaMessage,
        DeltaToolCall,
        ExtractedToolCallInformation,
        FunctionCall,
        ToolCall,
    )
    import vllm.envs as envs
    from vllm.reasoning import ReasoningParser
    from vllm.tool_parsers import ToolParser
    from vllm.tool_parsers.tool_strict_level import ToolStrictLevel

    def to_delta_message(delta: Delta) -> DeltaMessage | None:
        if not delta:
            return None
        return DeltaMessage(
            reasoning=delta.reasoning or None,
            content=delta.content or None,
            tool_calls=[
                DeltaToolCall(
                    index=tc.index,
                    id=tc.id,
                    type="function" if tc.id is not None else None,
                    function=DeltaFunctionCall(name=tc.name, arguments=tc.arguments),
                )
                for tc in delta.tool_calls
            ],
        )

    def keep_special_tokens(request):
        # DSML and think markers must survive detokenization to be parsed.
        if getattr(request, "skip_special_tokens", None) is True:
            request.skip_special_tokens = False
        return request

    class DeepSeekV4PluginReasoningParser(ReasoningParser):
        """Splits ``reasoning </think> rest``; ``rest`` goes on as content, non-DSML special tokens removed."""

        engine_based_streaming = True

        def __init__(self, tokenizer, *args, **kwargs) -> None:
            super().__init__(tokenizer, *args, **kwargs)
            vocab = self.vocab
            self._think_start_id = vocab.get(THINK_START)
            self._think_end_id = vocab.get(THINK_END)
            self._assistant_id = vocab.get(ASSISTANT)
            if self._think_end_id is None:
                raise RuntimeError(f"the tokenizer has no {THINK_END!r} token")
            self.thinking = request_thinking(
                kwargs.get("chat_template_kwargs"), default=default_thinking(tokenizer, self._model_config)
            )
            self._stream = self._new_stream(self.thinking)
            self._fed = False

        @staticmethod
        def _new_stream(thinking: bool) -> StreamParser:
            return StreamParser(thinking, parse_tools=False)

        @property
        def reasoning_start_str(self) -> str:
            return THINK_START

        @property
        def reasoning_end_str(self) -> str:
            return THINK_END

        def _prompt_thinking(self, prompt_ids: Sequence[int]) -> bool | None:
            """Whether the prompt opened the last turn with ``<think>`` (None: unknown)."""
            for token in reversed(prompt_ids):
                if token == self._think_start_id:
                    return True
                if token == self._think_end_id:
                    return False
                if token == self._assistant_id:
                    return None
            return None

        def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
            # Output ids: '</think>' seen. Prompt ids: the turn was opened with '</think>'.
            for token in reversed(input_ids):
                if token == self._think_end_id:
                    return True
                if token == self._think_start_id:
                    return False
            return False

        def is_reasoning_end_streaming(self, input_ids: Sequence[int], delta_ids: Iterable[int]) -> bool:
            return self._think_end_id in delta_ids

        def extract_content_ids(self, input_ids: list[int]) -> list[int]:
            if self._think_end_id not in input_ids:
                return []
            last = len(input_ids) - 1 - input_ids[::-1].index(self._think_end_id)
            return input_ids[last + 1 :]

        def adjust_initial_state_from_prompt(self, prompt_token_ids: Sequence[int]) -> None:
            thinking = self._prompt_thinking(prompt_token_ids)
            if thinking is not None and not self._fed:
                self.thinking = thinking
                self._stream = self._new_stream(thinking)

        def adjust_request(self, request):
            return keep_special_tokens(request)

        def extract_reasoning(self, model_output: str, request) -> tuple[str | None, str | None]:
            stream = self._new_stream(self.thinking)
            stream.feed(model_output)
            stream.finish()
            return stream.result.reasoning or None, stream.result.content or None

        def extract_reasoning_streaming(
            self,
            previous_text: str,
            current_text: str,
            delta_text: str,
            previous_token_ids: Sequence[int],
            current_token_ids: Sequence[int],
            delta_token_ids: Sequence[int],
        ) -> DeltaMessage | None:
            self._fed = True
            return to_delta_message(self._stream.feed(delta_text))

        def has_engine_confirmed_reasoning_end(self) -> bool:
            return self._stream.reasoning_ended

        def finish_streaming(self) -> DeltaMessage | None:
            return to_delta_message(self._stream.finish())

        def count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
            if self._think_end_id in token_ids:
                return list(token_ids).index(self._think_end_id)
            return len(token_ids) if self.thinking else 0

    class DeepSeekV4PluginToolParser(ToolParser):
        """Turns DSML ``tool_calls`` blocks into OpenAI tool calls; the calls are streamed whole
        when the completion ends (only then is the block known to be valid).

        ``tool_choice`` "required" or a named function: vLLM constrains the completion after the
        reasoning with the structural tag of :func:`v4_plugin.text.tools.forced_call_structural_tag` (a DSML
        block calling the tools, or the named one, with arguments valid against each tool's
        ``parameters``, in the official layout), and this parser reads the calls from it."""

        engine_based_streaming = True
        supports_required_and_named = False  # the model answers in DSML, not vLLM's JSON list
        # xgrammar's built-in DSML tag: "auto" with strict tools, and forced calls beyond the exact layout
        structural_tag_model = "deepseek_v4"

        def __init__(self, tokenizer, tools=None, **kwargs) -> None:
            super().__init__(tokenizer, tools)
            self._stream = StreamParser(split_reasoning=False)
            self._drop_calls = False  # tool_choice "none": vLLM drops streamed calls, not the final flush's

        def adjust_request(self, request):
            return keep_special_tokens(request)

        def get_structural_tag(self, request, *, reasoning: bool = False,
                               strict_level: ToolStrictLevel = ToolStrictLevel.AUTO):
            if request.tool_choice == "auto" or not envs.VLLM_ENFORCE_STRICT_TOOL_CALLING:
                return super().get_structural_tag(request, reasoning=reasoning, strict_level=strict_level)
            tag = forced_call_structural_tag(forced_tools(request.tools, request.tool_choice), reasoning=reasoning,
                                             parallel_tool_calls=request.parallel_tool_calls is not False)
            if tag is not None:
                return tag
            # xgrammar's looser built-in tag, held to the schemas whatever the tools' `strict` says
            return super().get_structural_tag(request, reasoning=reasoning,
                                              strict_level=max(strict_level, ToolStrictLevel.PARAMETER))

        def extract_tool_calls(self, model_output: str, request) -> ExtractedToolCallInformation:
            stream = StreamParser(split_reasoning=False)
            stream.feed(model_output)
            stream.finish()
            result = stream.result
            calls = [
                ToolCall(id=c.id, type="function", function=FunctionCall(name=c.name, arguments=c.arguments))
                for c in result.tool_calls
            ]
            return ExtractedToolCallInformation(
                tools_called=bool(calls), tool_calls=calls, content=result.content or None
            )

        def extract_tool_calls_streaming(
            self,
            previous_text: str,
            current_text: str,
            delta_text: str,
            previous_token_ids: Sequence[int],
            current_token_ids: Sequence[int],
            delta_token_ids: Sequence[int],
            request,
        ) -> DeltaMessage | None:
            self._drop_calls = getattr(request, "tool_choice", None) == "none"
            delta = self._stream.feed(delta_text)
            self._track(delta)
            return to_delta_message(delta)

        def finish_streaming(self) -> DeltaMessage | None:
            # calls come with the end of the completion (only then is the block known valid)
            delta = self._stream.finish()
            if self._drop_calls:
                delta.tool_calls = []
            self._track(delta)
            return to_delta_message(delta)

        def _track(self, delta: Delta) -> None:
            # vLLM's bookkeeping: calls are streamed whole, nothing is left unstreamed.
            for tc in delta.tool_calls:
                self.prev_tool_call_arr.append({"name": tc.name, "arguments": tc.arguments})
                self.streamed_args_for_tool.append(tc.arguments)
                self.current_tool_id = tc.index

    DeepSeekV4PluginReasoningParser.__module__ = __name__
    DeepSeekV4PluginToolParser.__module__ = __name__
    return {
        REASONING_PARSER_CLASS: DeepSeekV4PluginReasoningParser,
        TOOL_PARSER_CLASS: DeepSeekV4PluginToolParser,
    }
