"""DeepSeek-V4 chat encoding with tools, tool results and effort modes, checked
against DeepSeek's official encoder (vLLM's vendored copy) and by round trips."""

from __future__ import annotations

import copy
import json

import pytest

from chat_corpus import (COMPLETIONS, CONVERSATIONS, TOOLS, completion_of, counter_ids, expected_calls,
                         official_encode, official_encoder, splits)
from v4_plugin.text.chat import (
    ABSOLUTE_MAXIMUM_PREAMBLE,
    BOS,
    PREVIEW_PROFILE,
    EffortProfile,
    encode_messages,
    encode_request,
    render_tool_calls,
)
from v4_plugin.text.dsml import parse_completion

# Our preview profile's efforts expressed in the official (0731) encoder's names.
PREVIEW_TO_OFFICIAL = {"high": "low", "max": "high"}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("effort", [None, "high", "max"])
@pytest.mark.parametrize("thinking", [False, True])
def test_matches_official_encoder(name: str, thinking: bool, effort: str | None) -> None:
    messages, tools = CONVERSATIONS[name]
    # every prefix ending in a non-assistant message (generation prompts) and the whole conversation
    cuts = [i + 1 for i, m in enumerate(messages) if m["role"] != "assistant"] + [len(messages)]
    for cut in cuts:
        part = messages[:cut]
        ours = encode_messages(part, thinking=thinking, tools=tools, reasoning_effort=effort)
        official_effort = PREVIEW_TO_OFFICIAL[PREVIEW_PROFILE.resolve(effort)]
        assert ours == official_encode(part, tools, thinking=thinking, effort=official_effort), (name, cut)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_keep_all_reasoning_matchesofficial_encode(name: str) -> None:
    messages, tools = CONVERSATIONS[name]
    ours = encode_messages(messages, thinking=True, tools=tools, drop_thinking=False)
    assert ours == official_encode(messages, tools, thinking=True, effort="low", drop_thinking=False)


def test_a_plugged_in_profile_matches_the_official_efforts() -> None:
    """A profile is data: the 0731 ("official") mapping, built from the oracle's
    table, reproduces the oracle for every effort."""
    oracle = official_encoder()
    official = EffortProfile("official", dict(oracle.REASONING_EFFORT_PROMPTS), default_effort="low")
    messages, tools = CONVERSATIONS["weather_two_calls"]
    for effort in ("low", "high", "max"):
        ours = encode_messages(messages[:2], thinking=True, tools=tools, reasoning_effort=effort, profile=official)
        assert ours == official_encode(messages[:2], tools, thinking=True, effort=effort)


def test_preview_profile_modes() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert encode_messages(messages) == BOS + "<｜User｜>Hi<｜Assistant｜></think>"
    assert encode_messages(messages, thinking=True) == BOS + "<｜User｜>Hi<｜Assistant｜><think>"
    assert encode_messages(messages, thinking=True, reasoning_effort="high") == encode_messages(messages, thinking=True)
    think_max = encode_messages(messages, thinking=True, reasoning_effort="max")
    assert think_max == BOS + ABSOLUTE_MAXIMUM_PREAMBLE + "<｜User｜>Hi<｜Assistant｜><think>"
    assert think_max.count("Absolute maximum") == 1
    # the effort only matters in thinking mode
    assert encode_messages(messages, reasoning_effort="max") == encode_messages(messages)
    # lower OpenAI efforts fall back to the lowest the preview defines
    assert encode_messages(messages, thinking=True, reasoning_effort="low") == encode_messages(messages, thinking=True)
    assert encode_messages(messages, thinking=True, reasoning_effort="xhigh") == think_max
    with pytest.raises(ValueError, match="ultra"):
        encode_messages(messages, thinking=True, reasoning_effort="ultra")


def test_encode_request_reads_the_framework_kwargs() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert encode_request(messages) == encode_messages(messages, thinking=True)
    assert encode_request(messages, chat_template_kwargs={"thinking": False}) == encode_messages(messages)
    on = encode_messages(messages, thinking=True)
    assert encode_request(messages, chat_template_kwargs={"enable_thinking": True}) == on
    assert encode_request(messages, reasoning_effort="none") == encode_messages(messages)
    think_max = encode_messages(messages, thinking=True, reasoning_effort="max")
    assert encode_request(messages, reasoning_effort="max") == think_max
    assert encode_request(messages, chat_template_kwargs={"reasoning_effort": "max"}, tools=TOOLS) == encode_messages(
        messages, thinking=True, reasoning_effort="max", tools=TOOLS
    )


def test_dsml_rendering_by_hand() -> None:
    block = render_tool_calls([{"function": {"name": "f", "arguments": '{"s": "x<y", "n": [1, {"é": null}]}'}}])
    assert block == (
        "<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="s" string="true">x<y</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">[1, {"é": null}]</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls>"
    )
    assert render_tool_calls([{"function": {"name": "g", "arguments": "{}"}}]).count("\n\n") == 1
    # DeepSeek's encoder: arguments that are not JSON text of an object are one `arguments` parameter
    assert render_tool_calls([{"function": {"name": "g", "arguments": {"x": 1}}}]) == (
        '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="g">\n'
        '<｜DSML｜parameter name="arguments" string="false">{"x": 1}</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
    )


def test_tool_results_join_one_user_turn_in_call_order() -> None:
    messages, tools = CONVERSATIONS["weather_two_calls"]
    prompt = encode_messages(messages[:5], tools=tools)
    tail = prompt[prompt.rindex("<｜User｜>") :]
    assert tail == (
        '<｜User｜><tool_result>{"temp": 18, "sky": "clear"}</tool_result>\n\n'
        "<tool_result>Tokyo: 21°C, rain</tool_result><｜Assistant｜></think>"
    )


def test_reasoning_is_dropped_before_the_last_user_turn_without_tools() -> None:
    messages, _ = CONVERSATIONS["plain_multi_turn"]
    prompt = encode_messages(messages, thinking=True)
    assert "greet" not in prompt and "farewell" in prompt
    assert "Answer in French." not in prompt  # earlier developer turns go too
    assert "Answer in French." in encode_messages(messages, thinking=False)
    with_tools = encode_messages(messages, thinking=True, tools=TOOLS)
    assert "greet</think>Hello!" in with_tools and "Answer in French." in with_tools


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("thinking", [False, True])
def test_round_trip(name: str, thinking: bool) -> None:
    """encode -> the assistant part -> parse gives the message back."""
    messages, tools = CONVERSATIONS[name]
    final = messages[-1]
    parsed = parse_completion(completion_of(messages, tools, thinking), thinking=thinking, id_factory=counter_ids())
    assert parsed.reasoning == ((final.get("reasoning") or "") if thinking else "")
    assert parsed.content == (final.get("content") or "")
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == expected_calls(final)
    assert not parsed.malformed
    # and the parsed message encodes back to the same prompt
    again = [*messages[:-1], parsed.to_message()]
    original = encode_messages(messages, thinking=thinking, tools=tools)
    assert encode_messages(again, thinking=thinking, tools=tools) == original


def test_continue_final_message_leaves_the_turn_open() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    assert encode_messages(messages, continue_final_message=True).endswith("<｜Assistant｜></think>Hel")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from v4_plugin.text.tokenizer import write_tokenizer

    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


def _dict_arguments(messages):
    """Tool-call arguments as mappings, the way vLLM hands messages to a chat template."""
    messages = copy.deepcopy(messages)
    for m in messages:
        for c in m.get("tool_calls") or []:
            if isinstance(c["function"]["arguments"], str):
                c["function"]["arguments"] = json.loads(c["function"]["arguments"] or "{}")
    return messages


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("effort", [None, "max"])
def test_jinja_template_matches_encode_messages(hf_tokenizer, name: str, thinking: bool, effort) -> None:
    messages, tools = CONVERSATIONS[name]
    messages = _dict_arguments(messages)
    cuts = [i + 1 for i, m in enumerate(messages) if m["role"] != "assistant"] + [len(messages)]
    for cut in cuts:
        for add_generation_prompt in (True, False):
            part = messages[:cut]
            kwargs = {"thinking": thinking}
            if effort is not None:
                kwargs["reasoning_effort"] = effort
            rendered = hf_tokenizer.apply_chat_template(
                part, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
            expected = encode_messages(
                part,
                thinking=thinking,
                tools=tools,
                reasoning_effort=effort,
                add_generation_prompt=add_generation_prompt,
            )
            assert rendered == expected, (name, cut, add_generation_prompt)


def test_jinja_template_orders_tool_results_and_keeps_reasoning(hf_tokenizer) -> None:
    messages, tools = CONVERSATIONS["weather_two_calls"]
    messages = _dict_arguments(messages)
    for drop in (True, False):
        rendered = hf_tokenizer.apply_chat_template(
            messages, tools=None, tokenize=False, thinking=True, drop_thinking=drop
        )
        assert rendered == encode_messages(messages, thinking=True, drop_thinking=drop)


def test_corpus_is_well_formed() -> None:
    for name, (messages, _tools) in CONVERSATIONS.items():
        assert messages[-1]["role"] == "assistant", name
    for name, (text, thinking, *_rest) in COMPLETIONS.items():
        assert isinstance(text, str) and isinstance(thinking, bool), name
    assert [c for chunks in splits("abc") for c in chunks if not c] == []
