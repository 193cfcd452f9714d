"""The grammar that enforces `tool_choice` "required" / a named function in both servers
(:func:`v4_plugin.text.tools.forced_call_structural_tag`, compiled by xgrammar as the servers do) against
the parser both servers read calls with (:mod:`v4_plugin.text.dsml`, DeepSeek's official grammar):
every completion the grammar allows is read as calls to the allowed tools with schema-valid
arguments, and the official layout is allowed. Completions are random walks through the grammar
over the tiny tokenizer (a random model under the constraint). The servers themselves are tested
in tests/test_vllm_serve.py and tests/test_sglang_server.py."""

from __future__ import annotations

import json
import random

import pytest

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from chat_corpus import FORCED_TOOL_COMPLETION, FORCED_TOOLS, WEATHER_TOOL  # noqa: E402
from v4_plugin.text.dsml import parse_completion  # noqa: E402
from v4_plugin.text.tools import check_tool_schemas, forced_call_structural_tag, forced_tools  # noqa: E402

VOCAB = 384  # the tiny checkpoints' vocab_size (the tokenizer's ids and padding)
EOS_ID = 1
NOTE_TOOL = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object",
    "properties": {"text": {"type": "string"}, "tags": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
                   "level": {"type": "number"}, "mode": {"type": "string", "enum": ["a", "b"]}},
    "required": ["text"]}}}
PING_TOOL = {"type": "function", "function": {"name": "ping"}}
TOOLS = [*FORCED_TOOLS, NOTE_TOOL, PING_TOOL, WEATHER_TOOL]


@pytest.fixture(scope="module")
def compiler(tmp_path_factory):
    from transformers import AutoTokenizer

    from v4_plugin.text.tokenizer import write_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB))


def _walks(compiler, tag, count: int, max_steps: int = 400) -> list[str]:
    """The completions (text) of `count` random walks through `tag` that end within `max_steps` tokens."""
    tokenizer, comp = compiler
    grammar = comp.compile_structural_tag(tag)
    mask = xgr.allocate_token_bitmask(1, VOCAB)
    texts = []
    for seed in range(count):
        rng, matcher, ids = random.Random(seed), xgr.GrammarMatcher(grammar), []
        while not matcher.is_terminated() and len(ids) < max_steps:
            matcher.fill_next_token_bitmask(mask)
            allowed = [i for i in range(VOCAB) if (int(mask[0, i // 32]) >> (i % 32)) & 1]
            ids.append(rng.choice(allowed))
            assert matcher.accept_token(ids[-1])
        if matcher.is_terminated():
            texts.append(tokenizer.decode([i for i in ids if i != EOS_ID], skip_special_tokens=False))
    return texts


@pytest.mark.parametrize("choice,parallel", [("required", True), ("required", False), ("days", False)])
def test_every_completion_the_grammar_allows_parses_to_valid_calls(compiler, choice, parallel):
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    allowed = forced_tools(TOOLS, tool_choice)
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in allowed}
    tag = forced_call_structural_tag(allowed, parallel_tool_calls=parallel)
    texts = _walks(compiler, tag, 40)
    assert len(texts) >= 10, len(texts)
    for text in texts:
        result = parse_completion(text)
        assert not result.malformed and result.tool_calls and result.content == "", text
        assert parallel or len(result.tool_calls) == 1, text
        for call in result.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_the_official_layout_is_allowed(compiler):
    """A call written out by hand in the official format (tests/chat_corpus.py) is a complete match."""
    _, comp = compiler
    block = FORCED_TOOL_COMPLETION[FORCED_TOOL_COMPLETION.index("\n\n<"):]
    matcher = xgr.GrammarMatcher(comp.compile_structural_tag(forced_call_structural_tag([WEATHER_TOOL])))
    assert matcher.accept_string(block) and matcher.accept_token(EOS_ID) and matcher.is_terminated()


def test_schemas_beyond_the_layout_and_invalid_ones():
    """A schema with cross-property rules gets no exact tag (the servers fall back to xgrammar's
    built-in one); a schema that is not JSON Schema is refused naming the tool."""
    either = {"type": "function", "function": {"name": "either", "parameters": {
        "type": "object", "anyOf": [{"required": ["a"]}, {"required": ["b"]}],
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
    assert forced_call_structural_tag([either]) is None
    check_tool_schemas(TOOLS)
    with pytest.raises(ValueError, match="'broken'.*properties"):
        check_tool_schemas([{"type": "function", "function": {"name": "broken", "parameters": {"properties": 5}}}])
