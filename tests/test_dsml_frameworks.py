"""The vLLM and SGLang parser adapters, driven through each framework's own parser
API objects with the tiny checkpoint's tokenizer: registration by name, the
non-streaming result equals the core's, and the every-split streaming property
(token boundaries with real token ids, and character boundaries inside special
tokens and DSML tags)."""

from __future__ import annotations

import random

import pytest

from chat_corpus import COMPLETIONS, CONVERSATIONS, TOOLS, completion_of, has_markup, splits
from v4_plugin.text.chat import encode_messages
from v4_plugin.text.dsml import parse_completion


def _cases() -> dict[str, tuple[str, bool, list]]:
    """name -> (completion, thinking, prompt messages)."""
    out = {}
    for name, (text, thinking, *_rest) in COMPLETIONS.items():
        out[name] = (text, thinking, [{"role": "user", "content": "Go."}])
    for name, (messages, tools) in CONVERSATIONS.items():
        for thinking in (False, True):
            out[f"{name}-think{int(thinking)}"] = (completion_of(messages, tools, thinking), thinking, messages[:-1])
    return out


CASES = _cases()


def _expected(text: str, thinking: bool) -> tuple[str, str, list[tuple[str, str]]]:
    parsed = parse_completion(text, thinking=thinking)
    return parsed.reasoning, parsed.content, [(c.name, c.arguments) for c in parsed.tool_calls]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from v4_plugin.checkpoint.tiny import make_tiny

    return AutoTokenizer.from_pretrained(make_tiny(tmp_path_factory.mktemp("tiny"), "flash"))


def _token_chunks(tokenizer, text: str, rng: random.Random) -> list[list[tuple[str, list[int]]]]:
    """Chunkings of ``text`` at token boundaries as (delta_text, delta_ids), with
    text released like an incremental detokenizer (whole UTF-8 characters only)."""
    import codecs

    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = []
    for token_id in ids:
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token_id in tokenizer.all_special_ids or token_id >= 256 + 15 or tokenizer.decode([token_id]) == token:
            pieces.append(tokenizer.decode([token_id]).encode())
        else:
            pieces.append(bytes([token_id - 15]))
    assert b"".join(pieces).decode() == text
    n = len(ids)
    groupings = [[(0, n)], [(i, i + 1) for i in range(n)]]
    groupings += [[(0, k), (k, n)] for k in range(1, n)]
    for _ in range(10):
        cuts = sorted(rng.sample(range(1, n), min(n - 1, 6))) if n > 2 else []
        bounds = [0, *cuts, n]
        groupings.append(list(zip(bounds, bounds[1:])))
    out = []
    for grouping in groupings:
        decoder = codecs.getincrementaldecoder("utf-8")()
        out.append([(decoder.decode(b"".join(pieces[a:b])), ids[a:b]) for a, b in grouping])
    return out


# ---------------------------------------------------------------------------- vLLM


@pytest.fixture(scope="module")
def vllm_parser_cls(tokenizer):
    pytest.importorskip("vllm")
    from vllm.parser.parser_manager import ParserManager

    from vllm_backend.parsers import PARSER_NAME, register_parsers

    register_parsers()
    register_parsers()  # idempotent
    return ParserManager.get_parser(
        tool_parser_name=PARSER_NAME, reasoning_parser_name=PARSER_NAME, enable_auto_tools=True, tokenizer=tokenizer
    )


def _vllm_request():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "Go."}], tools=TOOLS)


def test_vllm_registration(vllm_parser_cls) -> None:
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    from vllm_backend.parsers import PARSER_NAME

    assert PARSER_NAME in ToolParserManager.list_registered()
    assert PARSER_NAME in ReasoningParserManager.list_registered()
    assert ToolParserManager.get_tool_parser(PARSER_NAME).__name__ == "DeepSeekV4PluginToolParser"
    assert ReasoningParserManager.get_reasoning_parser(PARSER_NAME).__name__ == "DeepSeekV4PluginReasoningParser"


def _vllm_stream(parser_cls, tokenizer, request, chunks, thinking, prompt_ids):
    parser = parser_cls(tokenizer, request.tools, chat_template_kwargs={"thinking": thinking}, model_config=None)
    reasoning, content, calls = "", "", []
    for i, (delta_text, delta_ids) in enumerate(chunks):
        delta = parser.parse_delta(
            delta_text, list(delta_ids), request, prompt_token_ids=prompt_ids, finished=i == len(chunks) - 1
        )
        if delta is None:
            continue
        assert not has_markup(delta.content or "") and not has_markup(delta.reasoning or "")
        reasoning += delta.reasoning or ""
        content += delta.content or ""
        for tc in delta.tool_calls:
            assert tc.index == len(calls) and tc.id and tc.type == "function"
            calls.append((tc.function.name, tc.function.arguments))
    return reasoning, content, calls


@pytest.mark.parametrize("name", CASES)
def test_vllm_parse_and_every_split(vllm_parser_cls, tokenizer, name: str) -> None:
    text, thinking, prompt_messages = CASES[name]
    request = _vllm_request()
    expected = _expected(text, thinking)

    parser = vllm_parser_cls(tokenizer, request.tools, chat_template_kwargs={"thinking": thinking}, model_config=None)
    reasoning, content, calls = parser.parse(text, request, enable_auto_tools=True)
    got = (reasoning or "", content or "", [(c.name, c.arguments) for c in calls or []])
    # vLLM reports whitespace-only content next to tool calls as no content
    assert got == (expected[0], "" if expected[2] and not expected[1].strip() else expected[1], expected[2])

    # streaming: the prompt tells the parser whether the turn opened with <think>
    prompt = encode_messages(prompt_messages, thinking=thinking, tools=TOOLS)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    rng = random.Random(name)
    for chunks in _token_chunks(tokenizer, text, rng):
        assert _vllm_stream(vllm_parser_cls, tokenizer, request, chunks, thinking, prompt_ids) == expected, chunks
    char_chunkings = [[c] for c in splits(text, seed=len(name), random_cuts=10)]
    for chunking in char_chunkings:
        chunks = [(piece, []) for piece in chunking[0]]
        assert _vllm_stream(vllm_parser_cls, tokenizer, request, chunks, thinking, prompt_ids) == expected, chunks


def test_vllm_reasoning_end_from_prompt_and_output_ids(vllm_parser_cls, tokenizer) -> None:
    from vllm.reasoning import ReasoningParserManager

    from vllm_backend.parsers import PARSER_NAME

    cls = ReasoningParserManager.get_reasoning_parser(PARSER_NAME)
    parser = cls(tokenizer)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning": "r", "content": "a"},
        {"role": "user", "content": "Again"},
    ]
    think = tokenizer.encode(encode_messages(messages, thinking=True, tools=TOOLS), add_special_tokens=False)
    chat = tokenizer.encode(encode_messages(messages, thinking=False), add_special_tokens=False)
    assert parser.is_reasoning_end(think) is False and parser.is_reasoning_end(chat) is True
    out = tokenizer.encode("abc</think>xyz", add_special_tokens=False)
    assert parser.is_reasoning_end(out) and tokenizer.decode(parser.extract_content_ids(out)) == "xyz"
    assert parser.count_reasoning_tokens(out) == 3


def test_vllm_thinking_defaults_follow_the_prompt_renderer(tokenizer) -> None:
    from types import SimpleNamespace

    from v4_plugin.text.chat import REFRESH_PROFILE, build_chat_template, request_thinking
    from vllm_backend.parsers import default_thinking

    assert request_thinking(None) is True
    assert request_thinking(None, default=False) is False
    assert request_thinking({"thinking": False}) is False
    assert request_thinking({"enable_thinking": True}, default=False) is True
    assert request_thinking({"reasoning_effort": "none"}) is False
    assert request_thinking({}, "none") is False and request_thinking({"reasoning_effort": "max"}, "none") is True
    assert default_thinking(SimpleNamespace(chat_template=build_chat_template(REFRESH_PROFILE))) is False
    # our Jinja template defaults to chat mode, vLLM's deepseek_v4 mode to thinking
    assert default_thinking(tokenizer) is False
    assert default_thinking(tokenizer, SimpleNamespace(tokenizer_mode="deepseek_v4")) is True
    assert default_thinking(SimpleNamespace(chat_template=None)) is True
    # and the template agrees: enable_thinking (what vLLM sets for reasoning_effort) turns it on
    messages = [{"role": "user", "content": "Hi"}]
    render = tokenizer.apply_chat_template
    assert render(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True).endswith("<think>")
    assert render(messages, tokenize=False, add_generation_prompt=True).endswith("</think>")
    off = render(messages, tokenize=False, add_generation_prompt=True, thinking=True, reasoning_effort="none")
    assert off.endswith("</think>")


def test_vllm_tool_choice_none_keeps_markup_out(vllm_parser_cls, tokenizer) -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    text = COMPLETIONS["block_after_content"][0]
    request = ChatCompletionRequest(
        model="tiny", messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="none"
    )
    chunks = [(c, []) for c in text]
    reasoning, content, calls = _vllm_stream(vllm_parser_cls, tokenizer, request, chunks, True, None)
    assert calls == [] and content == "Calling." and not has_markup(content)


# ---------------------------------------------------------------------------- SGLang


@pytest.fixture(scope="module")
def sglang_api():
    pytest.importorskip("sglang")
    from sglang.srt.entrypoints.openai.protocol import Tool
    from sglang.srt.function_call.function_call_parser import FunctionCallParser
    from sglang.srt.parser.reasoning_parser import ReasoningParser

    from sglang_backend.parsers import register_parsers

    register_parsers()
    register_parsers()  # idempotent
    tools = [Tool.model_validate(t) for t in TOOLS]
    return FunctionCallParser, ReasoningParser, tools


def test_sglang_registration(sglang_api) -> None:
    from sglang.srt.server_args import _reasoning_parser_choices, _tool_call_parser_choices

    from sglang_backend.parsers import PARSER_NAME

    function_call_parser, reasoning_parser, _ = sglang_api
    assert function_call_parser.ToolCallParserEnum[PARSER_NAME].__name__ == "DeepSeekV4PluginDetector"
    assert reasoning_parser.DetectorMap[PARSER_NAME].__name__ == "DeepSeekV4PluginReasoningDetector"
    assert PARSER_NAME in _tool_call_parser_choices() and PARSER_NAME in _reasoning_parser_choices()


def _sglang_parsers(sglang_api, thinking: bool, stream_reasoning: bool = True):
    from sglang_backend.parsers import PARSER_NAME

    function_call_parser, reasoning_parser, tools = sglang_api
    rp = reasoning_parser(PARSER_NAME, stream_reasoning, thinking, None, tool_call_parser_active=True)
    fcp = function_call_parser(tools=tools, tool_call_parser=PARSER_NAME)
    return rp, fcp


def _sglang_stream(sglang_api, chunks, thinking, stream_reasoning=True):
    rp, fcp = _sglang_parsers(sglang_api, thinking, stream_reasoning)
    reasoning, content, calls = "", "", []

    def tools_step(normal: str, end: bool) -> None:
        nonlocal content
        text, items = fcp.parse_stream_chunk(normal) if normal else ("", [])
        if end:
            end_text, end_items = fcp.parse_stream_end()
            text, items = text + end_text, [*items, *end_items]
        assert not has_markup(text)
        content += text
        for item in items:
            assert item.tool_index == len(calls) and item.name
            calls.append((item.name, item.parameters))

    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        r, n = rp.parse_stream_chunk(chunk)
        if last:
            end_r, end_n = rp.parse_stream_end()
            r, n = (r or "") + (end_r or ""), (n or "") + (end_n or "")
        reasoning += r or ""
        tools_step(n or "", last)
    return reasoning, content, calls


@pytest.mark.parametrize("name", CASES)
def test_sglang_parse_and_every_split(sglang_api, name: str) -> None:
    text, thinking, _ = CASES[name]
    expected = _expected(text, thinking)

    rp, fcp = _sglang_parsers(sglang_api, thinking)
    reasoning, normal = rp.parse_non_stream(text)
    content, items = fcp.parse_non_stream(normal or "")
    names = {t["function"]["name"]: i for i, t in enumerate(TOOLS)}
    assert [i.tool_index for i in items] == [names.get(i.name, -1) for i in items]
    assert (reasoning or "", content, [(i.name, i.parameters) for i in items]) == expected

    for chunks in splits(text, seed=len(name), random_cuts=10):
        assert _sglang_stream(sglang_api, chunks, thinking) == expected, chunks
    assert _sglang_stream(sglang_api, list(text), thinking, stream_reasoning=False) == expected


def test_vllm_adjust_request_keeps_markup_tokens(vllm_parser_cls, tokenizer) -> None:
    request = _vllm_request()
    request.skip_special_tokens = True
    parser = vllm_parser_cls(tokenizer, request.tools, chat_template_kwargs={}, model_config=None)
    assert parser.adjust_request(request).skip_special_tokens is False
