"""Generate tests/fixtures/chat_gold.json: DeepSeek's official encoder and parser run on a derived corpus.

Usage (once, by hand; tests never run it and never download)::

    python tests/make_chat_gold.py PATH/TO/encoding_dsv4.py

PATH is DeepSeek's ``encoding/encoding_dsv4.py`` of the 04-24 release (provenance used for the
committed file: the annotated copy (Chinese comments added, code as released) in GitHub
``supermy/ds4rs`` @ 2ecc534c2423f589fd2c3f04b76b46dc41f6f162, cited by
/work/shared/spec/architecture.md [ENC]; it reproduces the release's own gold files
``encoding/tests/test_output_{1..4}.txt``). The refresh (-0731) encoder differs from it only in the
reasoning-effort table (``REASONING_EFFORT_PROMPTS``, ``None`` = ``low``, validated against the
table): its results are made by the same module with that table, the texts read from the installed
vLLM's copy of the refresh encoder (``vllm/tokenizers/deepseek_v4_encoding.py``).

The corpus is generated, not written: conversations drawn (seeded) from message pieces that
exercise every option of ``encode_messages`` (``context``, ``drop_thinking``,
``add_default_bos_token``, efforts, tasks, ``wo_eos``, non-object tool-call arguments, tools on
user messages, system-only conversations, malformed inputs), and completions made by the official
encoder from assistant messages, then mutated (DSML tags inside values, extra invoke attributes,
odd parameter names, ``string="false"`` non-JSON, extra newlines, cuts, garbage). Each case stores
the official result or the fact that it raised.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib
import random
import sys
from typing import Any

OUT = pathlib.Path(__file__).parent / "fixtures" / "chat_gold.json"
D = "｜DSML｜"
EOS = "<｜end▁of▁sentence｜>"
SEED = 21

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather — °C.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOL2 = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}
ARGUMENTS = [
    '{"city": "Paris"}', '{"city": "Zürich", "days": 3, "tags": ["a", "b"], "opts": {"x": null}}', "{}", "",
    "not json", "[1, 2]", "7", {"city": "Oslo", "n": 1.5}, {}, '{"q": "a <b> & \\"c\\"\\n"}',
    '{"na\\"me": 1, "ключ": "значение"}', '{"flag": true, "v": false}',
]


def load_official(path: str):
    """The official module (04-24) loaded from ``path``."""
    spec = importlib.util.spec_from_file_location("_official_dsv4", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refresh_prompts() -> dict[str, str]:
    """The refresh encoder's effort table, from the installed vLLM's copy of it."""
    spec = importlib.util.find_spec("vllm")
    path = pathlib.Path(spec.origin).parent / "tokenizers" / "deepseek_v4_encoding.py"
    module_spec = importlib.util.spec_from_file_location("_vllm_dsv4", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return dict(module.REASONING_EFFORT_PROMPTS)


def refresh_encode(official, prompts: dict[str, str]):
    """``encode_messages`` of the refresh: the 04-24 module with the refresh effort table."""
    original = official.render_message

    def render_message(index, messages, thinking_mode, drop_thinking=True, reasoning_effort=None):
        effort = reasoning_effort or "low"
        assert effort in prompts, f"Invalid reasoning effort: {effort}"
        prompt = original(index, messages, thinking_mode, drop_thinking=drop_thinking, reasoning_effort=None)
        return (prompts[effort] if index == 0 and thinking_mode == "thinking" else "") + prompt

    def encode(*args, **kwargs):
        official.render_message = render_message
        try:
            return official.encode_messages(*args, **kwargs)
        finally:
            official.render_message = original

    return encode


def call(i: int, arguments: Any, name: str = "get_weather") -> dict[str, Any]:
    return {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


def random_message(rng: random.Random, i: int) -> dict[str, Any]:
    """One message drawn from the pieces (a few of them malformed on purpose)."""
    kind = rng.choice(["system", "user", "user", "user", "assistant", "assistant", "tool", "developer",
                       "latest_reminder", "task_user", *["bad"] * (rng.random() < 0.3)])
    if kind == "system":
        m: dict[str, Any] = {"role": "system", "content": rng.choice(["Be brief.", "", None, "Système: ok"])}
        if rng.random() < 0.4:
            m["tools"] = rng.choice([[TOOL], [TOOL, TOOL2]])
        if rng.random() < 0.2:
            m["response_format"] = {"type": "json_object"}
        return m
    if kind in ("user", "task_user"):
        m = {"role": "user", "content": rng.choice(["Hi", "Weather in Paris?", "2+2?", "", "naïve ✓",
                                                    "a </think> b", f"x {EOS} y"])}
        if kind == "task_user":
            m["task"] = rng.choice(["action", "query", "authority", "domain", "title", "read_url"])
        if rng.random() < 0.1:
            m["tools"] = [TOOL]
        if rng.random() < 0.1:
            m["wo_eos"] = True
        return m
    if kind == "assistant":
        m = {"role": "assistant", "content": rng.choice(["Sure.", "", None, "It is 4.\n"])}
        if rng.random() < 0.6:
            m["reasoning_content"] = rng.choice(["Think.", "", "Let me see\nmore"])
        if rng.random() < 0.4:
            m["tool_calls"] = [call(i * 10 + k, rng.choice(ARGUMENTS)) for k in range(rng.randint(1, 2))]
        if rng.random() < 0.1:
            m["wo_eos"] = True
        return m
    if kind == "tool":
        return {"role": "tool", "tool_call_id": rng.choice(["c0", "c1", "c10", "c11", "zz", None]),
                "content": rng.choice(["22°C", "", None, [{"type": "text", "text": "a"}, {"type": "image"}]])}
    if kind == "developer":
        m = {"role": "developer", "content": rng.choice(["Search first.", "Use tools.", None])}
        if rng.random() < 0.3:
            m["tools"] = [TOOL2]
        return m
    if kind == "latest_reminder":
        return {"role": "latest_reminder", "content": rng.choice(["Date: 2026-04-24", None])}
    return rng.choice([{"role": "robot", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": "p"}]},
                       {"role": "system", "tools": [{"name": "no_function_key"}]},
                       {"role": "user", "content": "t", "task": "bogus"}])


def render_cases(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Arguments of ``encode_messages`` calls (conversations and options)."""
    fixed = [
        [{"role": "system", "content": "Only a system message."}],
        [{"role": "system", "content": "S", "tools": [TOOL]}],
        [{"role": "user", "content": "Hi", "tools": [TOOL]}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel", "wo_eos": True}],
        [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "", "tool_calls": [
            call(0, a) for a in ARGUMENTS[:4]]}],
    ]
    cases = []
    for messages in fixed:
        for mode in ("chat", "thinking"):
            cases.append({"messages": messages, "thinking_mode": mode})
    while len(cases) < n:
        messages = [random_message(rng, i) for i in range(rng.randint(1, 7))]
        if rng.random() < 0.7:
            messages.append({"role": "user", "content": "Last?"})
        case: dict[str, Any] = {"messages": messages, "thinking_mode": rng.choice(["chat", "thinking", "thinking"])}
        if rng.random() < 0.02:
            case["thinking_mode"] = "bogus"
        if rng.random() < 0.25 and len(messages) > 1:
            k = rng.randint(1, len(messages) - 1)
            case["context"], case["messages"] = messages[:k], messages[k:]
        if rng.random() < 0.3:
            case["drop_thinking"] = False
        if rng.random() < 0.15:
            case["add_default_bos_token"] = False
        if rng.random() < 0.5:
            case["reasoning_effort"] = rng.choice(["high", "max", "low", "high", "max", "ultra"])
        cases.append(case)
    return cases


def completion_cases(official, rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Completions the official encoder writes, then mutated."""
    cases = []
    names = ["city", 'a"b', "ключ", "x y"]
    while len(cases) < n:
        thinking = rng.random() < 0.5
        args = {rng.choice(names): rng.choice(["Paris", 3, [1, 2], {"k": None}, True, "v <x>\n", ""])
                for _ in range(rng.randint(0, 3))}
        assistant = {"role": "assistant", "content": rng.choice(["", "Checking.", "Line\n", "Two\n\n", "4"])}
        if thinking:
            assistant["reasoning_content"] = rng.choice(["", "Hmm.", "multi\nline"])
        if rng.random() < 0.7:
            assistant["tool_calls"] = [call(k, json.dumps(args, ensure_ascii=False), rng.choice(["get_weather", "f"]))
                                       for k in range(rng.randint(1, 2))]
        user = [{"role": "user", "content": "Q"}]
        mode = "thinking" if thinking else "chat"
        text = official.encode_messages(user + [assistant], mode)[len(official.encode_messages(user, mode)):]
        text = mutate(rng, text)
        cases.append({"text": text, "thinking": thinking})
    return cases


def mutate(rng: random.Random, text: str) -> str:
    """Maybe change a completion the way models (or clients) do."""
    r = rng.random()
    if r < 0.35:
        return text
    options = [
        lambda t: t.replace(f'">\n<{D}parameter', f'" extra="1">\n<{D}parameter', 1),
        lambda t: t.replace('string="true">', f'string="true">see <{D}invoke name="x">\n', 1),
        lambda t: t.replace('string="true">', f'string="true">a <{D}parameter name="z" string="true">', 1),
        lambda t: t.replace('string="true">', 'string="false">', 1),
        lambda t: t.replace(f"\n\n<{D}tool_calls", f"\n\n\n<{D}tool_calls", 1),
        lambda t: t.replace(f"\n\n<{D}tool_calls", f"<{D}tool_calls", 1),
        lambda t: t[: rng.randint(0, len(t))],
        lambda t: t.removesuffix(EOS),
        lambda t: t + "junk",
        lambda t: t.replace(EOS, f"\nmore{EOS}", 1),
        lambda t: t.replace("</think>", f"<{D}invoke name=\"x\">\n</think>", 1),
        lambda t: t.replace("</think>", "<think></think>", 1),
        lambda t: t.replace(f"</{D}invoke>", f"</{D}invoke>\n<{D}invoke name=\"y\">\n</{D}invoke>", 1),
        lambda t: t.replace('string="', 'string= "', 1),
        lambda t: t.replace(f"</{D}parameter>", f"</{D}parameter>\n<{D}parameter name=\"dup\" string=\"true\">1"
                                                f"</{D}parameter>\n<{D}parameter name=\"dup\" string=\"true\">2"
                                                f"</{D}parameter>", 1),
    ]
    for _ in range(rng.randint(1, 2)):
        text = rng.choice(options)(text)
    return text


def run(fn, *args, **kwargs) -> dict[str, Any]:
    try:
        return {"ok": fn(*args, **kwargs)}
    except Exception as exc:  # noqa: BLE001 - any failure of the official code is a rejection
        return {"error": type(exc).__name__}


def main(path: str) -> None:
    official = load_official(path)
    encode_refresh = refresh_encode(official, refresh_prompts())
    rng = random.Random(SEED)
    renders = []
    for case in render_cases(rng, 300):
        for profile, encode in (("preview", official.encode_messages), ("refresh", encode_refresh)):
            renders.append({"profile": profile, "args": case, **run(encode, **copy.deepcopy(case))})
    parses = []
    for case in completion_cases(official, rng, 400):
        text = case["text"]
        whole = text if text.endswith(EOS) else text + EOS
        result = run(official.parse_message_from_completion_text, whole, "thinking" if case["thinking"] else "chat")
        if "ok" in result:
            ok = result["ok"]
            result["ok"] = {"reasoning": ok["reasoning_content"], "content": ok["content"],
                            "calls": [[c["function"]["name"], c["function"]["arguments"]] for c in ok["tool_calls"]]}
        parses.append({**case, **result})
    OUT.write_text(json.dumps({"source": "tests/make_chat_gold.py", "render": renders, "parse": parses},
                              ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(renders)} render cases ({sum('error' in r for r in renders)} errors), "
          f"{len(parses)} parse cases ({sum('error' in p for p in parses)} rejected)")


if __name__ == "__main__":
    main(sys.argv[1])
