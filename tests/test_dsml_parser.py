"""The core completion parser: hand-written cases, corpus completions, and the
every-split streaming property (str and UTF-8 bytes cut anywhere)."""

from __future__ import annotations

import json

import pytest

from chat_corpus import COMPLETIONS, CONVERSATIONS, completion_of, counter_ids, expected_calls, has_markup, splits
from v4_plugin.text.chat import encode_messages
from v4_plugin.text.dsml import Delta, StreamParser, parse_completion


def _all_completions() -> dict[str, tuple[str, bool]]:
    out = {name: (spec[0], spec[1]) for name, spec in COMPLETIONS.items()}
    for name, (messages, tools) in CONVERSATIONS.items():
        for thinking in (False, True):
            out[f"{name}-think{int(thinking)}"] = (completion_of(messages, tools, thinking), thinking)
    return out


ALL = _all_completions()


@pytest.mark.parametrize("name", COMPLETIONS)
def test_hand_written_completions(name: str) -> None:
    text, thinking, reasoning, content, calls, malformed = COMPLETIONS[name]
    parsed = parse_completion(text, thinking=thinking)
    assert parsed.reasoning == reasoning
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls
    assert parsed.malformed == malformed
    assert not has_markup(parsed.content) and not has_markup(parsed.reasoning)


def test_malformed_completion_is_logged(caplog) -> None:
    with caplog.at_level("WARNING", logger="v4_plugin.text.dsml"):
        parse_completion(COMPLETIONS["block_cut_short"][0])
    assert "rejected by the official DSML grammar" in caplog.text


def test_every_prefix_is_never_half_a_call() -> None:
    """Cutting a completion anywhere (max_tokens) gives only whole calls, each one
    equal to the corresponding call of the whole completion."""
    messages, tools = CONVERSATIONS["nested_unicode_empty"]
    text = completion_of(messages, tools, thinking=True)
    whole = parse_completion(text, thinking=True, id_factory=counter_ids())
    for k in range(len(text) + 1):
        part = parse_completion(text[:k], thinking=True, id_factory=counter_ids())
        assert [(c.name, c.arguments) for c in part.tool_calls] == [
            (c.name, c.arguments) for c in whole.tool_calls[: len(part.tool_calls)]
        ]
        assert not has_markup(part.content)


def test_empty_string_arguments_encode_like_an_empty_object() -> None:
    base = [{"role": "user", "content": "x"}]
    def with_arguments(arguments):
        call = {"function": {"name": "n", "arguments": arguments}}
        return encode_messages([*base, {"role": "assistant", "content": "", "tool_calls": [call]}])

    assert with_arguments("") == with_arguments({}) == with_arguments(None)


def _stream(chunks, thinking: bool) -> tuple[Delta, list[Delta], StreamParser]:
    parser = StreamParser(thinking, id_factory=counter_ids())
    deltas = [parser.feed(chunk) for chunk in chunks]
    deltas.append(parser.finish())
    total = Delta()
    for d in deltas:
        total.extend(d)
    return total, deltas, parser


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("as_bytes", [False, True])
def test_every_split_reassembles_to_the_whole_result(name: str, as_bytes: bool) -> None:
    text, thinking = ALL[name]
    whole = parse_completion(text, thinking=thinking, id_factory=counter_ids())
    expected_calls_ = [(c.id, c.name, c.arguments) for c in whole.tool_calls]
    source = text.encode() if as_bytes else text
    for chunks in splits(source, seed=len(name)):
        total, deltas, parser = _stream(chunks, thinking)
        assert parser.result == whole, chunks
        assert (total.reasoning, total.content) == (whole.reasoning, whole.content), chunks
        got = [(d.id, d.name, d.arguments) for d in total.tool_calls]
        assert got == expected_calls_ and [d.index for d in total.tool_calls] == list(range(len(got)))
        assert not any(has_markup(d.content) or has_markup(d.reasoning) for d in deltas)
    assert not has_markup(whole.content)


@pytest.mark.parametrize("name", [n for n in CONVERSATIONS if expected_calls(CONVERSATIONS[n][0][-1])])
def test_tool_call_deltas_have_openai_shape(name: str) -> None:
    messages, tools = CONVERSATIONS[name]
    text = completion_of(messages, tools, thinking=False)
    total, _, _ = _stream([text], thinking=False)
    for i, d in enumerate(total.tool_calls):
        entry = d.to_openai()
        assert entry["index"] == i and entry["type"] == "function" and entry["id"].startswith("call_")
        assert isinstance(json.loads(entry["function"]["arguments"]), dict)


def test_long_tool_call_streams_in_linear_time() -> None:
    """A 200k-character string argument (an agent writing a file) fed in 3-character
    pieces parses (the parser keeps only a marker's length of text back while streaming)."""
    body = ("line <b>&amp; ünïcode ✓\n" * 8000)[:200_000]
    text = (
        f'Writing.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="write">\n'
        f'<｜DSML｜parameter name="path" string="true">a.txt</｜DSML｜parameter>\n'
        f'<｜DSML｜parameter name="text" string="true">{body}</｜DSML｜parameter>\n'
        f"</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
    )
    parser = StreamParser()
    for i in range(0, len(text), 3):
        parser.feed(text[i : i + 3])
    parser.finish()
    assert json.loads(parser.result.tool_calls[0].arguments) == {"path": "a.txt", "text": body}
    assert parser.result.content == "Writing."
