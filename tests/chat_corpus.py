"""Shared corpus for the chat / DSML tests: conversations, completions and helpers.

Imported by tests/test_chat_encoding.py, tests/test_dsml_parser.py and
tests/test_dsml_frameworks.py (the first also checks that the corpus is well formed).
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import pathlib
import random
from types import ModuleType
from typing import Any

import pytest

D = "｜DSML｜"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city — °C or °F.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "units": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "filters": {"type": "object"}, "tags": {"type": "array"}},
        },
    },
}
NOOP_TOOL = {
    "type": "function",
    "function": {"name": "noop", "description": "Nothing.", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = [WEATHER_TOOL, SEARCH_TOOL, NOOP_TOOL]


def call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    """An OpenAI tool call (``arguments`` as given: dict or JSON text)."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# Conversations: (messages, request tools). The last message of each is an assistant
# turn whose rendering is a model completion (used by the round-trip tests).
CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "weather_two_calls": (
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Weather in Paris and Tokyo for 3 days?"},
            {
                "role": "assistant",
                "reasoning": "Two cities: two calls.",
                "content": "Let me check both.",
                "tool_calls": [
                    call("c1", "get_weather", {"city": "Paris", "days": 3}),
                    call("c2", "get_weather", json.dumps({"city": "Tokyo", "days": 3, "units": "c"})),
                ],
            },
            # results out of call order: the encoder orders them like the calls
            {"role": "tool", "tool_call_id": "c2", "content": "Tokyo: 21°C, rain"},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 18, "sky": "clear"}'},
            {"role": "assistant", "reasoning": "Summarise.", "content": "Paris 18°C clear; Tokyo 21°C rain."},
            {"role": "user", "content": "And Berlin, in Fahrenheit?"},
            {
                "role": "assistant",
                "reasoning": "One more call.",
                "content": "",
                "tool_calls": [call("c3", "get_weather", {"city": "Berlin", "units": "f"})],
            },
        ],
        TOOLS,
    ),
    "nested_unicode_empty": (
        [
            {"role": "user", "content": "東京の天気と検索 🌸 — please"},
            {
                "role": "assistant",
                "reasoning": "考える… 🤔",
                "content": "Sure — 検索します.",
                "tool_calls": [
                    call(
                        "a",
                        "search",
                        {
                            "query": "天気 \"quoted\" <b>bold</b> & more\nsecond line",
                            "filters": {"lang": ["ja", "en"], "safe": True, "max": 10, "score": 0.5, "none": None},
                            "tags": [[1, 2], {"k": "v"}, [], {}],
                        },
                    ),
                    call("b", "noop", {}),
                    call("c", "noop", "{}"),
                ],
            },
        ],
        TOOLS,
    ),
    "tool_result_then_text": (
        [
            {"role": "system", "content": "Sys."},
            {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]},
            {"role": "assistant", "content": None, "tool_calls": [call("x", "search", {"query": "q"})]},
            {
                "role": "tool",
                "tool_call_id": "x",
                "content": [{"type": "text", "text": "r1"}, {"type": "text", "text": "r2"}],
            },
            {"role": "user", "content": "Thanks, now answer."},
            {"role": "assistant", "reasoning": "Done.", "content": "The answer: 42 (see <tool_result>)."},
        ],
        [SEARCH_TOOL],
    ),
    "plain_multi_turn": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "reasoning": "greet", "content": "Hello!"},
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "reasoning": "farewell < and > signs", "content": "Au revoir ! a < b > c"},
        ],
        None,
    ),
    "reminder_and_format": (
        [
            {"role": "system", "content": "JSON only.", "response_format": {"type": "json_object"}},
            {"role": "user", "content": "Give me a number."},
            {"role": "latest_reminder", "content": "Today is 2026-11-29."},
            {"role": "assistant", "reasoning": "Pick one.", "content": '{"n": 7}'},
        ],
        None,
    ),
    "tools_in_messages_parallel": (
        [
            {"role": "system", "content": "Tools follow.", "tools": [WEATHER_TOOL, NOOP_TOOL]},
            {"role": "user", "content": "Do three things."},
            {
                "role": "assistant",
                "reasoning": "",
                "content": "",
                "tool_calls": [
                    call("t1", "noop", {}),
                    call("t2", "get_weather", {"city": "   spaced   ", "days": -1}),
                    call("t3", "get_weather", {"city": "", "units": "c"}),
                ],
            },
        ],
        None,
    ),
}

# Hand-written completions and what they must parse to (issue 21's cases, the official grammar):
# (text, thinking, reasoning, content, [(name, arguments JSON text)], malformed)
_BLOCK = (f'\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
          f'<{D}parameter name="city" string="true">Oslo</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>')
COMPLETIONS: dict[str, tuple[str, bool, str, str, list[tuple[str, str]], bool]] = {
    "plain_chat": ("Hello there! 1 < 2 and 3 > 2.", False, "", "Hello there! 1 < 2 and 3 > 2.", [], False),
    "ends_with_eos": ("Done.<｜end▁of▁sentence｜>", False, "", "Done.", [], False),
    "think_then_answer": ("Let me see.\n</think>\n\nAnswer: 4.", True, "Let me see.\n", "\n\nAnswer: 4.", [], False),
    "reasoning_cut_off": ("Still thinking about </thi", True, "Still thinking about </thi", "", [], False),
    "block_after_content": ("</think>Calling." + _BLOCK, True, "", "Calling.", [("get_weather", '{"city": "Oslo"}')],
                            False),
    "trailing_newline_before_block": ("Calling.\n" + _BLOCK, False, "", "Calling.\n",
                                      [("get_weather", '{"city": "Oslo"}')], False),
    "dsml_tags_inside_a_string_value": (
        _BLOCK.replace(">Oslo<", f'>see <{D}invoke name="x">\n and <{D}parameter name="y" string="true"><'),
        False, "", "", [("get_weather", json.dumps({"city": f'see <{D}invoke name="x">\n and <{D}parameter name="y" '
                                                            'string="true">'}, ensure_ascii=False))], False),
    "extra_invoke_attribute": (_BLOCK.replace('name="get_weather"', 'name="get_weather" id="7"'), False, "", "",
                               [('get_weather" id="7', '{"city": "Oslo"}')], False),
    "quoted_and_non_ascii_names": (_BLOCK.replace('name="city"', 'name="ci\"ty ключ"'), False, "", "",
                                   [("get_weather", '{"ci\\"ty ключ": "Oslo"}')], False),
    "string_false_not_json": (_BLOCK.replace('string="true">Oslo', 'string="false">Oslo, [1'), False, "", "",
                              [("get_weather", '{"city": Oslo, [1}')], False),
    "xgrammar_layout_without_newlines": (_BLOCK.replace(f"</{D}parameter>\n", f"</{D}parameter>"), False, "", "",
                                         [("get_weather", '{"city": "Oslo"}')], False),
    "leak_reasoning_with_dsml": (f'I could call <{D}invoke name="x">\n now.</think>Answer.', True,
                                 'I could call <invoke name="x">\n now.', "Answer.", [], True),
    "block_inside_reasoning": ("Plan." + _BLOCK + "</think>Ok.", True,
                               'Plan.\n\n<tool_calls>\n<invoke name="get_weather">\n<parameter name="city" '
                               'string="true">Oslo</parameter>\n</invoke>\n</tool_calls>', "Ok.", [], True),
    "block_cut_short": (_BLOCK.split(f"</{D}invoke>")[0], False, "",
                        '\n\n<tool_calls>\n<invoke name="get_weather">\n<parameter name="city" string="true">Oslo'
                        '</parameter>\n', [], True),
    "block_without_blank_line": ("Calling." + _BLOCK[2:], False, "",
                                 'Calling.<tool_calls>\n<invoke name="get_weather">\n<parameter name="city" '
                                 'string="true">Oslo</parameter>\n</invoke>\n</tool_calls>', [], True),
    "text_after_block": (_BLOCK + "\n\nDone.", False, "",
                         '\n\n<tool_calls>\n<invoke name="get_weather">\n<parameter name="city" string="true">Oslo'
                         '</parameter>\n</invoke>\n</tool_calls>\n\nDone.', [], True),
    "control_tokens_in_content": ("A<｜User｜>B<｜title｜>C<｜Assistant｜>", False, "", "ABC", [], False),
    "bos_in_reasoning": ("r<｜begin▁of▁sentence｜>s</think>x<｜latest_reminder｜>", True, "rs", "x", [], True),
}

def official_encoder() -> ModuleType:
    """vLLM's copy of DeepSeek's ``encoding_dsv4.py`` (the independent oracle), loaded
    without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed")
    path = pathlib.Path(spec.origin).parent / "tokenizers" / "deepseek_v4_encoding.py"
    if not path.exists():
        pytest.skip("this vLLM has no deepseek_v4_encoding.py")
    module_spec = importlib.util.spec_from_file_location("_dsv4_encoding_oracle", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def official_encode(messages, tools=None, *, thinking: bool, effort: str | None = None,
                    drop_thinking: bool = True) -> str:
    """The official encoder's prompt, request ``tools`` attached to the first system message (one
    made when there is none) the way vLLM and DeepSeek's renderer do. ``effort`` is an official name."""
    messages = copy.deepcopy(messages)
    if tools:
        idx = next((i for i, m in enumerate(messages) if m.get("role") == "system"), None)
        if idx is None:
            messages.insert(0, {"role": "system"})
            idx = 0
        messages[idx]["tools"] = tools
    return official_encoder().encode_messages(messages, thinking_mode="thinking" if thinking else "chat",
                                              reasoning_effort=effort, drop_thinking=drop_thinking)


OFFICIAL_EFFORT = {
    ("preview", None): "low", ("preview", "high"): "low", ("preview", "max"): "high",
    ("refresh", None): "high", ("refresh", "low"): "low", ("refresh", "high"): "high", ("refresh", "max"): "max",
}
"""(checkpoint profile, requested effort) -> the official (0731) encoder's effort that writes the same
preamble, from the table of refresh-checkpoints.md §4: 04-24 ``high`` (and no effort) = no preamble =
official ``low``; 04-24 ``max`` = "Absolute maximum" = official ``high``; a refresh request without an
effort gets ``high`` (DeepSeek's API and both frameworks default)."""


def counter_ids():
    """A deterministic tool-call id factory."""
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def splits(text: str | bytes, seed: int = 0, random_cuts: int = 30) -> list[list[Any]]:
    """Chunkings of ``text``: one chunk, one piece per unit, every two-piece split,
    and random multi-piece splits."""
    n = len(text)
    out = [[text], [text[i : i + 1] for i in range(n)]]
    out += [[text[:k], text[k:]] for k in range(1, n)]
    rng = random.Random(seed)
    for _ in range(random_cuts):
        cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(2, 8)))) if n > 2 else []
        bounds = [0, *cuts, n]
        out.append([text[a:b] for a, b in zip(bounds, bounds[1:])])
    return out


def completion_of(messages: list[dict[str, Any]], tools, thinking: bool) -> str:
    """The text the model would write for the last (assistant) message."""
    from v4_plugin.text.chat import encode_messages

    prompt = encode_messages(messages[:-1], thinking=thinking, tools=tools)
    full = encode_messages(messages, thinking=thinking, tools=tools)
    assert full.startswith(prompt)
    return full[len(prompt) :]


def expected_calls(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, arguments dict) for each tool call of an assistant message."""
    out = []
    for c in message.get("tool_calls") or []:
        args = c["function"]["arguments"]
        out.append((c["function"]["name"], json.loads(args) if isinstance(args, str) and args else (args or {})))
    return out


SPECIAL_STRINGS = (D, "<think>", "</think>", "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜▁pad▁｜>",
                   "<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>", "<｜action｜>", "<｜query｜>",
                   "<｜authority｜>", "<｜domain｜>", "<｜title｜>", "<｜read_url｜>")
"""The V4 control-token strings (architecture.md §11): none may reach a client's content or reasoning."""


def has_markup(text: str) -> bool:
    """Whether ``text`` holds DSML, think or any other control-token markup."""
    return any(m in text for m in SPECIAL_STRINGS)



def check_openai_chat_answer(whole: dict[str, Any], chunks: list[dict[str, Any]], tool_names: set[str]) -> None:
    """Assert that a served chat answer is OpenAI-shaped and markup-free: ``whole`` the non-streamed
    response, ``chunks`` the streamed ``chat.completion.chunk`` events of the same greedy request
    (``[DONE]`` excluded). Tool calls need an id, type ``function``, a known name and JSON-object
    arguments; the streamed content and reasoning add up to the non-streamed ones."""

    def check_call(tc: dict[str, Any]) -> None:
        assert isinstance(tc["id"], str) and tc["id"] and tc["type"] == "function", tc
        assert tc["function"]["name"] in tool_names, tc
        assert isinstance(json.loads(tc["function"]["arguments"]), dict), tc

    assert whole["object"] == "chat.completion"
    choice = whole["choices"][0]
    message = choice["message"]
    assert message["role"] == "assistant", message
    assert choice["finish_reason"] in ("stop", "length", "tool_calls"), choice
    assert message["content"] is None or isinstance(message["content"], str), message
    assert not has_markup(message["content"] or ""), message
    for tc in message.get("tool_calls") or []:
        check_call(tc)
    assert choice["finish_reason"] != "tool_calls" or message["tool_calls"], choice

    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    reasoning = "".join(d["delta"].get("reasoning") or d["delta"].get("reasoning_content") or "" for d in deltas)
    for d in deltas:
        for tc in d["delta"].get("tool_calls") or []:
            check_call(tc)
    assert [d["finish_reason"] for d in deltas if d.get("finish_reason")] == [choice["finish_reason"]], deltas
    assert content == (message["content"] or "")
    assert reasoning == (message.get("reasoning") or message.get("reasoning_content") or "")


FORCED_TOOL_COMPLETION = (
    "Checking.\n\n"
    f"<{D}tool_calls>\n"
    f'<{D}invoke name="get_weather">\n'
    f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
    f'<{D}parameter name="days" string="false">3</{D}parameter>\n'
    f"</{D}invoke>\n"
    f"</{D}tool_calls>"
)
"""A chat-mode completion with one DSML tool call, written out by hand: the servers' tests force the
tiny model to write it (a constrained ``choice``) so their parsers meet a real tool call; the
answer must be content "Checking." and get_weather({"city": "Paris", "days": 3})."""


def stream_chunks(sse_text: str) -> list[dict[str, Any]]:
    """The JSON events of a streamed chat answer (server-sent events text), which must end with ``[DONE]``."""
    events = [line[len("data: "):] for line in sse_text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def check_forced_tool_call_answer(whole: dict[str, Any], sse_text: str) -> None:
    """The served answers to a request forced to write ``FORCED_TOOL_COMPLETION`` (``whole`` non-streamed,
    ``sse_text`` streamed): OpenAI-shaped, content "Checking." and the one get_weather call, both ways."""

    def calls(tool_calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
        return [(tc["function"]["name"], json.loads(tc["function"]["arguments"])) for tc in tool_calls]

    expected = [("get_weather", {"city": "Paris", "days": 3})]
    message = whole["choices"][0]["message"]
    assert message["content"] == "Checking." and whole["choices"][0]["finish_reason"] == "tool_calls", whole
    assert calls(message["tool_calls"]) == expected
    chunks = stream_chunks(sse_text)
    check_openai_chat_answer(whole, chunks, {"get_weather"})
    assert calls([tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or []]) \
        == expected


# ---- forced tool calls (tool_choice "required" / a named function), both servers (issue 16) ----------
UNITS_TOOL = {
    "type": "function",
    "function": {
        "name": "units",
        "description": "Set the units.",
        "parameters": {"type": "object", "properties": {"u": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["u"], "additionalProperties": False},
    },
}
DAYS_TOOL = {
    "type": "function",
    "function": {
        "name": "days",
        "description": "Set the days.",
        "parameters": {"type": "object", "properties": {"d": {"type": "integer", "minimum": 1, "maximum": 7}},
                       "required": ["d"], "additionalProperties": False},
    },
}
FORCED_TOOLS = [UNITS_TOOL, DAYS_TOOL]
"""Tools whose every valid call is short (~110 tokens of the tiny tokenizer: an enum, a one-digit
integer, short names), so that the tiny random models, constrained to a valid call, finish it soon."""

FORCED_CASES = [("required", thinking, {"units", "days"}) for thinking in (False, True)] + \
    [({"type": "function", "function": {"name": "days"}}, thinking, {"days"}) for thinking in (False, True)]
"""(``tool_choice``, thinking, the tool names a call may have) of each forced-call case."""


def forced_tool_choice_request(tool_choice: Any, thinking: bool, think_end_id: int) -> dict[str, Any]:
    """A chat request (no model, no stream) forcing one call of :data:`FORCED_TOOLS`. Thinking on, a
    logit bias on ``</think>`` (id ``think_end_id``) ends the tiny model's random reasoning at once (a
    real model ends it itself); the constraint then holds the rest."""
    request = {"messages": [{"role": "user", "content": "Set it."}], "tools": FORCED_TOOLS,
               "tool_choice": tool_choice, "parallel_tool_calls": False, "max_tokens": 300, "temperature": 0,
               "chat_template_kwargs": {"thinking": thinking}}
    return request | ({"logit_bias": {str(think_end_id): 100}} if thinking else {})


def check_forced_tool_choice_answer(whole: dict[str, Any], sse_text: str, names: set[str]) -> None:
    """The served answers (``whole`` non-streamed, ``sse_text`` streamed) to a
    :func:`forced_tool_choice_request`: each holds exactly one call, to one of ``names``, whose arguments
    are valid against that tool's ``parameters``; the streamed call equals the non-streamed one."""
    from jsonschema import validate

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in FORCED_TOOLS}

    def call_of(tool_calls: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        assert len(tool_calls) == 1, tool_calls
        name, arguments = tool_calls[0]["function"]["name"], json.loads(tool_calls[0]["function"]["arguments"])
        assert name in names, tool_calls
        validate(arguments, schemas[name])
        return name, arguments

    choice = whole["choices"][0]
    assert choice["finish_reason"] in ("tool_calls", "stop"), whole  # vLLM says "stop" for forced calls
    call = call_of(choice["message"]["tool_calls"])
    deltas = [tc for c in stream_chunks(sse_text) if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls")
              or []]
    assert call_of(deltas) == call


MARKUP_COMPLETION = f'Fine <{D}invoke name="x">\n</think> done <｜User｜>x<｜title｜>.'
"""A completion (chat mode) holding stray DSML, a think tag and control tokens (issues 16 and 21)."""
MARKUP_COMPLETION_CONTENT = 'Fine <invoke name="x">\n done x.'
"""What a client must get for it: the text with every special token removed, no tool call."""


def check_markup_free_answer(whole: dict[str, Any], sse_text: str) -> None:
    """The served answers (``whole`` non-streamed, ``sse_text`` streamed) to a request forced to write
    ``MARKUP_COMPLETION``: content ``MARKUP_COMPLETION_CONTENT`` both ways, no reasoning, no call."""
    message = whole["choices"][0]["message"]
    assert message["content"] == MARKUP_COMPLETION_CONTENT, whole
    assert not message.get("tool_calls") and not message.get("reasoning_content") and not message.get("reasoning")
    deltas = [c["choices"][0]["delta"] for c in stream_chunks(sse_text) if c.get("choices")]
    assert "".join(d.get("content") or "" for d in deltas) == MARKUP_COMPLETION_CONTENT, deltas
    assert not any(d.get("tool_calls") or d.get("reasoning_content") or d.get("reasoning") for d in deltas), deltas
