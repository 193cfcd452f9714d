"""`vllm serve` as a hostile client finds it (issue 16): one server on the tiny 04-24 checkpoint with the
README's parser flags; no request may take it down or change another request's output.

After every bad request the server answers a fixed normal request with the tokens that request got
before any bad one (`assert_still_serving`). A bad `config.json` fails `vllm serve` before any engine
starts, naming the file and the field.

Other hostile cases (tool_choice, special tokens) belong here too: add them against `server`."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import pytest

pytest.importorskip("vllm")
requests = pytest.importorskip("requests")

from vllm_harness import VllmServer, vllm_cli  # noqa: E402

MODEL = "tiny-v4"
MAX_MODEL_LEN = 256
VOCAB = 384  # the tiny checkpoints' vocab_size
STARTUP_TIMEOUT = 420
ENGINE_START_MARK = "Initializing a V1 LLM engine"  # vLLM's first engine-core log line
PARSER_FLAGS = ("--enable-auto-tool-choice", "--tool-call-parser", "deepseek_v4_plugin",
                "--reasoning-parser", "deepseek_v4_plugin")
"""The README's flags for tool calls and reasoning."""


class Served(NamedTuple):
    base: str  # http://127.0.0.1:PORT
    model_dir: Path
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Served:
    """One `vllm serve` of the tiny 04-24 checkpoint (exact mode, parser flags) for the module."""
    from v4_plugin.checkpoint.tiny import make_tiny

    root = tmp_path_factory.mktemp("vllm-hostile")
    model_dir = make_tiny(root / "flash", preset="flash", seed=16)
    log = root / "server.log"
    proc = VllmServer(model_dir, log, "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
                      "--served-model-name", MODEL, *PARSER_FLAGS, env={"V4_PLUGIN_QUANT_SIM": "off"})
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


NORMAL = {"model": MODEL, "prompt": [5, 17, 42, 99, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True,
          "return_token_ids": True}
"""The normal request every bad one is followed by."""


def normal_tokens(server: Served) -> list[int]:
    """The normal request's greedy completion (token ids)."""
    r = post(server, "/v1/completions", NORMAL)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


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
    completion = {"model": MODEL, "max_tokens": 2, "temperature": 0}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    return [
        ("/v1/completions", {**completion, "prompt": [5, bad]}),
        ("/v1/completions", {**completion, "prompt": [[5, 6], [5, bad]]}),
        ("/v1/completions", {**completion, "prompt": [5, 6], "allowed_token_ids": [bad]}),
        ("/v1/completions", {**completion, "prompt": [5, 6], "logit_bias": {str(bad): 5}}),
        ("/v1/completions", {**completion, "prompt": [5, 6], "stop_token_ids": [bad]}),
        ("/v1/chat/completions", {**chat, "logit_bias": {str(bad): 5}}),
        ("/v1/chat/completions", {**chat, "allowed_token_ids": [bad]}),
        ("/detokenize", {"model": MODEL, "tokens": [5, bad]}),
    ]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_out_of_range_token_ids_are_400s(server, before, bad):
    """Each endpoint that takes ids answers an out-of-range one with a 4xx naming it (stop ids are harmless:
    a 200 is fine there), and the server serves on unchanged."""
    refused = []
    for path, body in _id_requests(bad):
        r = post(server, path, body)
        if not (r.status_code == 200 and "stop_token_ids" in body):
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
            refused.append(r.text)
        assert_still_serving(server, before)
    assert any(str(bad) in text for text in refused), refused


def _prompt(length: int) -> list[int]:
    return [5 + i % 300 for i in range(length)]


def test_prompt_at_the_limit_is_served_and_over_it_refused(server, before):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": _prompt(MAX_MODEL_LEN - 1), "max_tokens": 1,
                                         "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1
    for length, max_tokens in ((MAX_MODEL_LEN, 1), (MAX_MODEL_LEN + 1, 1), (20 * MAX_MODEL_LEN, 1),
                               (MAX_MODEL_LEN - 2, 10**9)):
        r = post(server, "/v1/completions", {"model": MODEL, "prompt": _prompt(length), "max_tokens": max_tokens})
        assert r.status_code == 400, (length, max_tokens, r.text)
    long_chat = {"model": MODEL, "messages": [{"role": "user", "content": "word " * (4 * MAX_MODEL_LEN)}]}
    r = post(server, "/v1/chat/completions", long_chat)
    assert r.status_code == 400, r.text
    assert_still_serving(server, before)


MALFORMED = [
    ("/v1/completions", "{"),
    ("/v1/completions", "[1, 2]"),
    ("/v1/completions", "\xff\xfe"),
    ("/v1/completions", {"model": MODEL}),
    ("/v1/completions", {"model": MODEL, "prompt": {"text": "hi"}}),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 6.5]}),
    ("/v1/completions", {"model": MODEL, "prompt": []}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "eight"}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 10**6}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": -5}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 7}),
    ("/v1/chat/completions", {"model": MODEL}),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": "x"}),
    ("/tokenize", {"model": MODEL, "messages": 5}),
    ("/detokenize", {"model": MODEL, "tokens": "abc"}),
]


@pytest.mark.parametrize("path,body", MALFORMED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(MALFORMED)])
def test_malformed_bodies_are_4xx(server, before, path, body):
    r = post(server, path, body)
    assert 400 <= r.status_code < 500, r.text
    assert_still_serving(server, before)


def _stamp(line: str) -> datetime:
    """The time of a vLLM log line ("... INFO 12-07 16:49:22 [file.py:N] ...")."""
    return datetime.strptime(re.search(r"\d\d-\d\d \d\d:\d\d:\d\d", line).group(), "%m-%d %H:%M:%S")


def test_startup_log_says_what_happens(server):
    """Issue 16: the weight-loading time is the time the load took (at most the time between the worker's
    "Starting to load model" and that line, to the log's 1 s resolution), chunked prefill and prefix caching
    are reported on (no line saying vLLM disables them), and no block size is reported as the user's."""
    lines = server.log.read_text().splitlines()
    start = next(line for line in lines if "Starting to load model" in line)
    took = next(line for line in lines if "Loading weights took" in line)
    seconds = float(re.search(r"Loading weights took ([\d.]+) seconds", took).group(1))
    assert seconds <= (_stamp(took) - _stamp(start)).total_seconds() + 1, (start, took)
    text = "\n".join(lines)
    assert "chunked prefill=True and prefix caching=True" in text
    for misleading in ("forcing chunked prefill and prefix caching to be disabled", "user-specified block_size"):
        assert misleading not in text


def test_bad_config_fails_before_any_engine_starts(tmp_path):
    """A config.json whose `compress_ratios` does not list one ratio per layer: `vllm serve` exits with the
    plugin's message naming the file and the field, and no engine core was started."""
    from v4_plugin.checkpoint.tiny import make_tiny

    model_dir = make_tiny(tmp_path / "bad", preset="flash", seed=16)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["compress_ratios"] = config["compress_ratios"][:3]
    config_path.write_text(json.dumps(config))
    proc = subprocess.run([*vllm_cli(), "serve", str(model_dir), "--dtype", "float32", "--max-model-len", "256",
                           "--enforce-eager"], capture_output=True, text=True, timeout=STARTUP_TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert str(config_path) in out and "compress_ratios" in out, out[-3000:]
    assert ENGINE_START_MARK not in out, out[-3000:]


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
    """`/tokenize` with messages: a top-level `reasoning_effort` is the chat path's (the same prompt as
    the template kwarg, and as the prompt a chat completion is served from); `add_generation_prompt`
    false leaves out the assistant opener; `max_model_len` is the context length served."""

    def tokenize(**extra) -> dict:
        r = post(server, "/tokenize", {"model": MODEL, "messages": CHAT_MESSAGES, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    for effort in ("none", "max"):
        assert tokenize(reasoning_effort=effort)["tokens"] == \
            tokenize(chat_template_kwargs={"reasoning_effort": effort})["tokens"], effort
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": CHAT_MESSAGES, "max_tokens": 1,
                                              "reasoning_effort": "none", "return_token_ids": True})
    assert r.status_code == 200, r.text
    assert tokenize(reasoning_effort="none")["tokens"] == r.json()["prompt_token_ids"]

    from tokenizers import Tokenizer

    full = tokenize()
    bare = tokenize(add_generation_prompt=False)["tokens"]
    tok = Tokenizer.from_file(str(server.model_dir / "tokenizer.json"))
    opener = tok.decode(full["tokens"][len(bare):], skip_special_tokens=False)
    assert full["tokens"][:len(bare)] == bare and opener == "<｜Assistant｜><think>", opener
    models = requests.get(server.base + "/v1/models", timeout=30).json()["data"]
    assert full["max_model_len"] == models[0]["max_model_len"] == MAX_MODEL_LEN
