"""`python -m sglang.launch_server` as a hostile client finds it (issue 16): one server on the tiny 04-24
checkpoint with `--attention-backend v4_plugin` and the README's parser flags; no request may take it
down or change another request's output.

After every bad request the server answers a fixed normal request with the tokens that request got
before any bad one (`assert_still_serving`). A bad `config.json` fails `launch_server` before any
scheduler starts, naming the file and the field.

Other hostile cases (tool_choice, special tokens) belong here too: add them against `server`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

pytest.importorskip("sglang")
requests = pytest.importorskip("requests")

from sglang_harness import SERVER_ARGS, SglangServer  # noqa: E402

MODEL = "deepseek-v4-tiny"
CONTEXT_LEN = 256
VOCAB = 384  # the tiny checkpoints' vocab_size
STARTUP_TIMEOUT = 420
SCHEDULER_START_MARK = "Load weight begin"  # the scheduler's first model-loading log line
PARSER_FLAGS = ("--tool-call-parser", "deepseek_v4_plugin", "--reasoning-parser", "deepseek_v4_plugin")
"""The README's flags for tool calls and reasoning."""


class Served(NamedTuple):
    base: str  # http://127.0.0.1:PORT
    model_dir: Path
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Served:
    """One `launch_server` of the tiny 04-24 checkpoint (exact mode, parser flags) for the module."""
    from v4_plugin.checkpoint.tiny import make_tiny

    root = tmp_path_factory.mktemp("sgl-hostile")
    model_dir = make_tiny(root / "flash", preset="flash", seed=16)
    log = root / "server.log"
    proc = SglangServer(model_dir, log, "--attention-backend", "v4_plugin", "--context-length", str(CONTEXT_LEN),
                        "--served-model-name", MODEL, *PARSER_FLAGS)
    try:
        proc.wait(STARTUP_TIMEOUT)
        yield Served(proc.base, model_dir, log)
    finally:
        proc.stop()


def post(server: Served, path: str, body: dict | str, timeout: float = 120) -> requests.Response:
    """POST `body` (a dict as JSON, a str as raw bytes) to the server's `path`."""
    if isinstance(body, str):
        return requests.post(server.base + path, data=body, timeout=timeout,
                             headers={"Content-Type": "application/json"})
    return requests.post(server.base + path, json=body, timeout=timeout)


NORMAL = {"input_ids": [5, 17, 42, 99, 7],
          "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}
"""The normal request every bad one is followed by."""


def normal_tokens(server: Served) -> list[int]:
    """The normal request's greedy completion (token ids)."""
    r = post(server, "/generate", NORMAL)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


@pytest.fixture(scope="module")
def before(server) -> list[int]:
    """`normal_tokens` before any bad request of the module."""
    return normal_tokens(server)


def assert_still_serving(server: Served, before: list[int]) -> None:
    """The server is up and answers the normal request exactly as before the bad ones."""
    assert normal_tokens(server) == before


BAD_IDS = (-1, VOCAB, 2**31, 10**30)
"""Token ids out of range: negative, = vocab_size, past int32, past int64."""


def _id_requests(bad: int) -> list[tuple[str, dict]]:
    """Every request that carries client token ids, each with `bad` among them."""
    sampling = {"max_new_tokens": 2, "temperature": 0}
    completion = {"model": MODEL, "max_tokens": 2, "temperature": 0}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    return [
        ("/generate", {"input_ids": [5, bad], "sampling_params": sampling}),
        ("/generate", {"input_ids": [[5, 6], [5, bad]], "sampling_params": sampling}),
        ("/generate", {"input_ids": [5, bad], "sampling_params": sampling, "stream": True}),
        ("/generate", {"input_ids": [5, 6], "sampling_params": {**sampling, "logit_bias": {str(bad): 5}}}),
        ("/generate", {"input_ids": [5, 6], "sampling_params": {**sampling, "stop_token_ids": [bad]}}),
        ("/v1/completions", {**completion, "prompt": [5, bad]}),
        ("/v1/completions", {**completion, "prompt": [[5, 6], [5, bad]]}),
        ("/v1/completions", {**completion, "prompt": [5, bad], "stream": True}),
        ("/v1/completions", {**completion, "prompt": [5, 6], "logit_bias": {str(bad): 5}}),
        ("/v1/chat/completions", {**chat, "logit_bias": {str(bad): 5}}),
        ("/detokenize", {"model": MODEL, "tokens": [5, bad]}),
    ]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_out_of_range_token_ids_are_400s(server, before, bad):
    """Each endpoint that takes ids answers an out-of-range one with a 4xx (a streamed request: an error
    event; stop ids are harmless: a 200 is fine there), the plugin's answers naming the id, and the
    server serves on unchanged."""
    refused = []
    for path, body in _id_requests(bad):
        r = post(server, path, body)
        if body.get("stream") and r.status_code == 200:
            assert '"error"' in r.text, (path, body, r.text)
        elif not (r.status_code == 200 and "stop_token_ids" in json.dumps(body)):
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        refused.append(r.text)
        assert_still_serving(server, before)
    if bad < 2**63:  # past int64, SGLang's request parsing refuses it before the plugin's check
        assert any(f"token id {bad} is out of range" in text for text in refused), refused


def _prompt(length: int) -> list[int]:
    return [5 + i % 300 for i in range(length)]


MAX_INPUT = CONTEXT_LEN - 7
"""The longest prompt SGLang's scheduler admits: shorter than context_len - 1 - 5 (its tp_worker)."""


def test_prompt_at_the_limit_is_served_and_over_it_refused(server, before):
    r = post(server, "/generate", {"input_ids": _prompt(MAX_INPUT),
                                   "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    assert r.status_code == 200, r.text
    assert len(r.json()["output_ids"]) == 1
    for length in (MAX_INPUT + 1, CONTEXT_LEN, 20 * CONTEXT_LEN):
        r = post(server, "/v1/completions", {"model": MODEL, "prompt": _prompt(length), "max_tokens": 1})
        assert r.status_code == 400, (length, r.text)
        r = post(server, "/generate", {"input_ids": _prompt(length), "sampling_params": {"max_new_tokens": 1}})
        assert r.status_code == 400, (length, r.text)
    long_chat = {"model": MODEL, "messages": [{"role": "user", "content": "word " * (4 * CONTEXT_LEN)}]}
    r = post(server, "/v1/chat/completions", long_chat)
    assert r.status_code == 400, r.text
    assert_still_serving(server, before)


MALFORMED = [
    ("/generate", "{"),
    ("/generate", "[1, 2]"),
    ("/generate", {}),
    ("/generate", {"input_ids": []}),
    ("/generate", {"input_ids": [5, 6.5]}),
    ("/generate", {"input_ids": "abc"}),
    ("/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": -1}}),
    ("/generate", {"input_ids": [5, 6], "sampling_params": {"temperature": -1}}),
    ("/generate", {"input_ids": [5, 6], "sampling_params": {"top_p": 7}}),
    ("/generate", {"input_ids": [5, 6], "sampling_params": {"top_k": -5}}),
    ("/generate", {"input_ids": [5, 6], "sampling_params": "fast"}),
    ("/v1/completions", "{"),
    ("/v1/completions", {"model": MODEL}),
    ("/v1/completions", {"model": MODEL, "prompt": {"text": "hi"}}),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 6.5]}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "eight"}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 10**6}),
    ("/v1/chat/completions", {"model": MODEL}),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": "x"}),
    ("/tokenize", {"model": MODEL, "messages": 5}),
    ("/detokenize", {"model": MODEL, "tokens": "abc"}),
]


@pytest.mark.parametrize("path,body", MALFORMED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(MALFORMED)])
def test_malformed_bodies_are_4xx(server, before, path, body):
    r = post(server, path, body)
    assert 400 <= r.status_code < 500, r.text
    assert_still_serving(server, before)


def test_startup_log_says_what_renders_chats(server):
    """Issue 16: no line about a chat template or parsers detected from it (the plugin's encoding renders
    the chats, and the parsers are the ones given); the plugin's line says so."""
    text = server.log.read_text()
    assert "deepseek-v4-plugin: chats are rendered by v4_plugin.text.chat" in text
    for misleading in ("Using default HuggingFace chat template", "Auto-detected template features",
                       "tool_call_parser=deepseekv4"):
        assert misleading not in text


def test_bad_config_fails_before_any_scheduler_starts(tmp_path):
    """A config.json whose `compress_ratios` does not list one ratio per layer: `launch_server` exits with
    the plugin's message naming the file and the field, and no scheduler loaded a model."""
    from v4_plugin.checkpoint.tiny import make_tiny

    model_dir = make_tiny(tmp_path / "bad", preset="flash", seed=16)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["compress_ratios"] = config["compress_ratios"][:3]
    config_path.write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), *SERVER_ARGS,
                           "--attention-backend", "v4_plugin"],
                          capture_output=True, text=True, timeout=STARTUP_TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert str(config_path) in out and "compress_ratios" in out, out[-3000:]
    assert SCHEDULER_START_MARK not in out, out[-3000:]


# ---- tools and /tokenize (issue 16, items 4 and 7) ---------------------------------------------------
CHAT_MESSAGES = [{"role": "user", "content": "hi"}]
BROKEN_SCHEMAS = [{"type": "object", "properties": 5}, {"type": "objekt"}, {"type": "object", "required": "city"}]


@pytest.mark.parametrize("parameters", BROKEN_SCHEMAS)
def test_tool_with_invalid_json_schema_is_a_400_naming_it(server, before, parameters):
    """Chat completions (any tool_choice) and `/tokenize` refuse a tool whose `parameters` is not a JSON
    Schema with a 400 naming the tool; the server serves on unchanged."""
    from chat_corpus import UNITS_TOOL

    broken = {"type": "function", "function": {"name": "broken_tool", "parameters": parameters}}
    body = {"model": MODEL, "messages": CHAT_MESSAGES, "tools": [UNITS_TOOL, broken], "max_tokens": 2}
    for path, extra in (("/v1/chat/completions", {"tool_choice": "auto"}),
                        ("/v1/chat/completions", {"tool_choice": "required"}), ("/tokenize", {})):
        r = post(server, path, {**body, **extra})
        assert r.status_code == 400, (path, extra, r.text)
        assert "broken_tool" in r.text, r.text
    assert_still_serving(server, before)


def test_tokenize_renders_like_the_chat_path(server):
    """`/tokenize` with messages gives the prompt a chat completion is served from (thinking on and off);
    `add_generation_prompt` false leaves out the assistant opener (SGLang refuses the field for every
    encoding but a Jinja template); `max_model_len` is the context length served (as `/v1/models`
    says), not the tokenizer's `model_max_length`."""
    from tokenizers import Tokenizer

    def tokenize(**extra) -> dict:
        r = post(server, "/tokenize", {"model": MODEL, "messages": CHAT_MESSAGES, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    for body in ({}, {"reasoning_effort": "none"}, {"chat_template_kwargs": {"thinking": False}}):
        r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": CHAT_MESSAGES, "max_tokens": 1,
                                                  "return_prompt_token_ids": True, **body})
        assert r.status_code == 200, r.text
        assert tokenize(**body)["tokens"] == r.json()["choices"][0]["prompt_token_ids"], body

    full = tokenize()
    bare = tokenize(add_generation_prompt=False)["tokens"]
    assert tokenize(add_generation_prompt=True)["tokens"] == full["tokens"]
    tok = Tokenizer.from_file(str(server.model_dir / "tokenizer.json"))
    opener = tok.decode(full["tokens"][len(bare):], skip_special_tokens=False)
    assert full["tokens"][:len(bare)] == bare and opener == "<｜Assistant｜><think>", opener
    models = requests.get(server.base + "/v1/models", timeout=30).json()["data"]
    assert full["max_model_len"] == models[0]["max_model_len"] == CONTEXT_LEN
