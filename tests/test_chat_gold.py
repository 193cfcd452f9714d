"""The plugin's encoder and parser against DeepSeek's official ones, on the corpus of
tests/fixtures/chat_gold.json (made once by tests/make_chat_gold.py from the official
``encoding_dsv4.py``; see its docstring for provenance).

Render: :func:`v4_plugin.text.chat.encode_dsv4` gives the official prompt byte for byte, and raises
``ValueError`` exactly where the official encoder raises, with both effort profiles.
Parse: on every completion the official parser accepts, the plugin's result is the official one;
where it raises, the plugin returns no tool call, flags the completion (unless it only ends
inside its reasoning) and leaves no special token in content or reasoning. Streaming equals the
whole-text result at every split point (short completions) and on random splits (all).
"""

from __future__ import annotations

import copy
import json
import pathlib
import random

import pytest

from v4_plugin.text.chat import PROFILES, THINK_END, encode_dsv4
from v4_plugin.text.dsml import SPECIAL_TOKENS, StreamParser, parse_completion

GOLD = json.loads((pathlib.Path(__file__).parent / "fixtures" / "chat_gold.json").read_text(encoding="utf-8"))
RENDER = GOLD["render"]
PARSE = GOLD["parse"]


def test_corpus_is_broad() -> None:
    """The generated corpus covers what issue 21 lists (so a regenerated file cannot go narrow)."""
    args = [c["args"] for c in RENDER]
    assert sum("error" in c for c in RENDER) > 50 and sum("ok" in c for c in RENDER) > 300
    assert any(a.get("context") for a in args) and any(a.get("add_default_bos_token") is False for a in args)
    assert any(a.get("drop_thinking") is False for a in args)
    messages = [m for a in args for m in [*a["messages"], *a.get("context", [])]]
    assert {m.get("task") for m in messages} >= {"action", "query", "authority", "domain", "title", "read_url"}
    assert any(m.get("wo_eos") for m in messages) and any(m.get("role") == "user" and m.get("tools") for m in messages)
    assert {json.dumps(c["function"]["arguments"]) for m in messages for c in m.get("tool_calls") or []} >= {
        '""', '"not json"', '{"city": "Oslo", "n": 1.5}'}
    assert sum("error" in c for c in PARSE) > 40 and sum(bool(c.get("ok", {}).get("calls")) for c in PARSE) > 100


@pytest.mark.parametrize("index", range(len(RENDER)))
def test_render_equals_official(index: int) -> None:
    case = RENDER[index]
    args = copy.deepcopy(case["args"])
    profile = PROFILES[case["profile"]]
    if "error" in case:
        with pytest.raises(ValueError):
            encode_dsv4(**args, profile=profile)
    else:
        assert encode_dsv4(**args, profile=profile) == case["ok"]


def _result(text: str, thinking: bool, chunks: list[str] | None = None) -> tuple:
    parser = StreamParser(thinking, id_factory=lambda: "id")
    reasoning = content = ""
    calls = []
    for chunk in chunks if chunks is not None else [text]:
        delta = parser.feed(chunk)
        reasoning, content, calls = reasoning + delta.reasoning, content + delta.content, calls + delta.tool_calls
    delta = parser.finish()
    reasoning, content, calls = reasoning + delta.reasoning, content + delta.content, calls + delta.tool_calls
    return reasoning, content, [[c.name, c.arguments] for c in calls], parser.result.malformed


@pytest.mark.parametrize("index", range(len(PARSE)))
def test_parse_equals_official(index: int) -> None:
    case = PARSE[index]
    text, thinking = case["text"], case["thinking"]
    reasoning, content, calls, malformed = whole = _result(text, thinking)
    parsed = parse_completion(text, thinking=thinking, id_factory=lambda: "id")
    assert (parsed.reasoning, parsed.content, [[c.name, c.arguments] for c in parsed.tool_calls]) == whole[:3]
    if "ok" in case:
        assert (reasoning, content, calls, malformed) == (
            case["ok"]["reasoning"], case["ok"]["content"], case["ok"]["calls"], False)
    else:
        assert calls == []
        assert malformed or (thinking and THINK_END not in text)
        assert not any(token in content or token in reasoning for token in SPECIAL_TOKENS)
    rng = random.Random(index)
    chunkings = [[text[i : i + 1] for i in range(len(text))]]
    if len(text) <= 160:
        chunkings += [[text[:k], text[k:]] for k in range(1, len(text))]
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 6))) if len(text) > 2 else []
        bounds = [0, *cuts, len(text)]
        chunkings.append([text[a:b] for a, b in zip(bounds, bounds[1:])])
    for chunks in chunkings:
        assert _result(text, thinking, chunks) == whole, chunks


def _plain_request(case: dict) -> bool:
    """Whether a corpus case uses only what an OpenAI request can say the same way to the serving
    path (:func:`v4_plugin.text.chat.encode_messages`): no context, BOS, no task / ``wo_eos`` / tools on a
    user message, tool-call arguments as JSON text of an object, no ``None`` text where DeepSeek's
    ``str.format`` writes ``None``, and no system message followed by an assistant turn or ending
    the conversation (the serving path opens the answer there, as vLLM's copy of the encoder does)."""
    args = case["args"]
    if "error" in case or args.get("context") or args.get("add_default_bos_token") is False:
        return False
    messages = args["messages"]
    for i, m in enumerate(messages):
        nxt = messages[i + 1]["role"] if i + 1 < len(messages) else None
        if m["role"] not in ("system", "developer", "user", "tool", "assistant", "latest_reminder"):
            return False  # DeepSeek's encoder drops unknown roles before the last user message
        if {"task", "wo_eos", "mask"} & m.keys() or (m["role"] == "user" and m.get("tools")):
            return False
        if m["role"] == "system" and nxt in (None, "assistant"):
            return False
        if m["role"] in ("tool", "latest_reminder") and m.get("content") is None:
            return False
        for c in m.get("tool_calls") or []:
            arguments = c["function"]["arguments"]
            if not (isinstance(arguments, str) and arguments.startswith("{")):
                return False
    return True


PLAIN = [i for i, c in enumerate(RENDER) if _plain_request(c)]


def test_serving_path_equals_the_exact_encoder_where_requests_mean_the_same() -> None:
    """The serving path's encoder gives the official prompt on every corpus case it can express."""
    from v4_plugin.text.chat import encode_messages

    assert len(PLAIN) > 40
    for index in PLAIN:
        case = RENDER[index]
        args = copy.deepcopy(case["args"])
        # no effort: DeepSeek's refresh encoder means `low`, a request `high` (the API's default)
        effort = args.get("reasoning_effort") or ("low" if case["profile"] == "refresh" else None)
        ours = encode_messages(args["messages"], thinking=args["thinking_mode"] == "thinking",
                               reasoning_effort=effort, profile=PROFILES[case["profile"]],
                               drop_thinking=args.get("drop_thinking", True))
        assert ours == case["ok"], index
