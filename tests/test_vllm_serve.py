"""`vllm serve` end to end over HTTP on tiny checkpoints: our plugin serves (its startup line is in
the server log), chat completions use the checkpoint's chat encoding, streaming equals the
non-streamed answer, a prompt over --max-model-len gets HTTP 400 and the server keeps serving; and a
checkpoint missing a tensor fails at startup with the tensor's name.

Chat (issues 7 and 9), with the README's parser flags: requests with `tools` get OpenAI-format
answers (streamed too) with no DSML or think markup in `content`; the rendered prompt of every
profile x effort x thinking mode equals DeepSeek's official encoder; an unknown effort is a 400
listing the allowed ones; the tiny -0731 checkpoint serves the same greedy tokens as the 04-24 one of
the same seed and as the reference model.

Two servers (04-24 and -0731) are started once for the module, each in its own process group and
killed in teardown."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm_harness import VllmServer, healthy  # noqa: E402

MAX_MODEL_LEN = 2048
STARTUP_TIMEOUT = 420
SERVER_ENV = {"V4_PLUGIN_QUANT_SIM": "off"}


PARSER_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "deepseek_v4_plugin",
                "--reasoning-parser", "deepseek_v4_plugin"]
"""The README's flags for tool calls and reasoning."""


def _start(model_dir: Path, log: Path, *extra: str) -> VllmServer:
    return VllmServer(model_dir, log, "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
                      "--served-model-name", "tiny-v4", *extra, env=SERVER_ENV)


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read().decode()
            return resp.status, (json.loads(raw) if not body.get("stream") else raw)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The tiny 04-24 ("flash") and -0731 checkpoints of one seed, served side by side with the
    parser flags: {"flash": (base URL, model dir, log), "flash-0731": ...}."""
    from v4_plugin.checkpoint.tiny import make_tiny

    root = tmp_path_factory.mktemp("vllm-serve")
    running, out = [], {}
    try:
        for preset in ("flash", "flash-0731"):  # both start at once, then each is waited for
            model_dir = make_tiny(root / preset, preset=preset, seed=4)
            log = root / f"{preset}.log"
            running.append(_start(model_dir, log, *PARSER_FLAGS))
            out[preset] = (running[-1].base, model_dir, log)
        for server in running:
            server.wait(STARTUP_TIMEOUT)
        yield out
    finally:
        for server in running:
            server.stop()


@pytest.fixture(scope="module")
def server(servers):
    """The 04-24 server: (base URL, model dir, log)."""
    return servers["flash"]


MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about compressed attention."}]


def test_server_runs_our_plugin(server):
    _, _, log = server
    text = log.read_text()
    assert "deepseek-v4-plugin 0.1.0: serving DeepseekV4ForCausalLM with the DEEPSEEK_V4_PLUGIN_PAGED" in text
    assert "KV cache size:" in text


def test_chat_completion_uses_checkpoint_chat_encoding(server):
    """vLLM renders V4 chats in its deepseek_v4 tokenizer mode, which the plugin serves with
    `v4_plugin.text.chat` (thinking mode by default); in chat mode the prompt is exactly the checkpoint's
    encoding."""
    from tokenizers import Tokenizer

    from v4_plugin.text.chat import encode_messages

    base, model_dir, _ = server
    chat_mode = {"thinking": False}
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    expected = tok.encode(encode_messages(MESSAGES), add_special_tokens=False).ids
    status, body = _post(f"{base}/tokenize", {"model": "tiny-v4", "messages": MESSAGES,
                                              "chat_template_kwargs": chat_mode})
    assert status == 200, body
    assert body["tokens"] == expected
    status, body = _post(f"{base}/v1/chat/completions",
                         {"model": "tiny-v4", "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
                          "chat_template_kwargs": chat_mode})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == len(expected)
    assert body["usage"]["completion_tokens"] >= 1
    assert isinstance(body["choices"][0]["message"]["content"], str)
    # The default (thinking mode, as vLLM's V4 renderer does for the real checkpoints) serves too.
    status, body = _post(f"{base}/v1/chat/completions",
                         {"model": "tiny-v4", "messages": MESSAGES, "max_tokens": 4, "temperature": 0})
    assert status == 200, body


def test_streaming_equals_non_streaming(server):
    base, _, _ = server
    request = {"model": "tiny-v4", "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
               "chat_template_kwargs": {"thinking": False}}
    status, whole = _post(f"{base}/v1/chat/completions", request)
    assert status == 200, whole
    status, raw = _post(f"{base}/v1/chat/completions", {**request, "stream": True})
    assert status == 200, raw
    pieces = []
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            delta = json.loads(line[6:])["choices"][0]["delta"]
            pieces.append(delta.get("content") or "")
    assert raw.rstrip().endswith("data: [DONE]")
    assert len(pieces) > 1
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]


def test_prompt_over_max_model_len_gets_400_and_server_keeps_serving(server):
    base, _, _ = server
    status, body = _post(f"{base}/v1/completions",
                         {"model": "tiny-v4", "prompt": [5] * (MAX_MODEL_LEN + 10), "max_tokens": 4})
    assert status == 400, body
    assert healthy(base)
    status, body = _post(f"{base}/v1/completions",
                         {"model": "tiny-v4", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 4 or body["choices"][0]["finish_reason"] == "stop"


def test_sampled_requests_are_served(server):
    """Sampling (temperature, top-p, top-k) goes through vLLM's sampler on our logits; the server keeps serving."""
    base, _, _ = server
    for seed in (1, 2):
        status, body = _post(f"{base}/v1/chat/completions", {
            "model": "tiny-v4", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
            "temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": seed})
        assert status == 200, body
        assert body["usage"]["completion_tokens"] >= 1
    assert healthy(base)


# ---- chat: tools, effort profiles, the -0731 checkpoint (issues 7 and 9) ----------------------------
@pytest.mark.parametrize("thinking", [False, True])
def test_tool_request_gets_an_openai_answer(server, thinking):
    """The tiny model's text is random: whatever it writes, the answer is OpenAI-shaped and holds no
    markup (the parsers' exact output on constructed completions is tests/test_dsml_frameworks.py)."""
    from chat_corpus import WEATHER_TOOL, check_openai_chat_answer, stream_chunks

    base, _, _ = server
    request = {"model": "tiny-v4", "messages": MESSAGES, "tools": [WEATHER_TOOL], "tool_choice": "auto",
               "max_tokens": 24, "temperature": 0, "chat_template_kwargs": {"thinking": thinking}}
    status, whole = _post(f"{base}/v1/chat/completions", request)
    assert status == 200, whole
    status, raw = _post(f"{base}/v1/chat/completions", {**request, "stream": True})
    assert status == 200, raw
    check_openai_chat_answer(whole, stream_chunks(raw), {"get_weather"})


def test_forced_tool_call_goes_through_the_server_parsers(server):
    """The model is constrained to write a DSML tool call (structured outputs, `choice`): the answer
    carries it as an OpenAI tool call, streamed and not."""
    from chat_corpus import FORCED_TOOL_COMPLETION, WEATHER_TOOL, check_forced_tool_call_answer

    base, _, _ = server
    request = {"model": "tiny-v4", "messages": MESSAGES, "tools": [WEATHER_TOOL], "tool_choice": "auto",
               "max_tokens": 400, "temperature": 0, "chat_template_kwargs": {"thinking": False},
               "structured_outputs": {"choice": [FORCED_TOOL_COMPLETION]}}
    status, whole = _post(f"{base}/v1/chat/completions", request)
    assert status == 200, whole
    status, raw = _post(f"{base}/v1/chat/completions", {**request, "stream": True})
    assert status == 200, raw
    check_forced_tool_call_answer(whole, raw)


@pytest.mark.parametrize("preset,profile", [("flash", "preview"), ("flash-0731", "refresh")])
def test_rendered_prompt_per_profile_effort_and_thinking(servers, preset, profile):
    """`/tokenize` renders the checkpoint's profile: the 04-24 checkpoint gets no preamble for the
    default effort (upstream vLLM would write "Absolute maximum"), the -0731 one the official mapping;
    expected prompts come from DeepSeek's official encoder."""
    from tokenizers import Tokenizer

    from chat_corpus import OFFICIAL_EFFORT, official_encode

    base, model_dir, _ = servers[preset]
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for (name, effort), official in OFFICIAL_EFFORT.items():
        if name != profile:
            continue
        for thinking in (True, False):
            kwargs = {"thinking": thinking} | ({"reasoning_effort": effort} if effort else {})
            expected = official_encode(MESSAGES, thinking=thinking, effort=official)
            status, body = _post(f"{base}/tokenize", {"model": "tiny-v4", "messages": MESSAGES,
                                                      "chat_template_kwargs": kwargs})
            assert status == 200, body
            assert tok.decode(body["tokens"], skip_special_tokens=False) == expected, (effort, thinking)
            assert body["tokens"] == tok.encode(expected, add_special_tokens=False).ids


@pytest.mark.parametrize("preset,allowed", [("flash", "high, max"), ("flash-0731", "high, low, max")])
def test_unknown_effort_is_a_400_listing_the_allowed_ones(servers, preset, allowed):
    base, _, _ = servers[preset]
    bad = {"model": "tiny-v4", "messages": MESSAGES, "chat_template_kwargs": {"reasoning_effort": "ultra"}}
    for endpoint, extra in (("/tokenize", {}), ("/v1/chat/completions", {"max_tokens": 2})):
        status, body = _post(f"{base}{endpoint}", {**bad, **extra})
        assert status == 400, body
        assert "'ultra'" in body and allowed in body, body
    assert healthy(base)
    status, body = _post(f"{base}/v1/chat/completions", {"model": "tiny-v4", "messages": MESSAGES, "max_tokens": 2,
                                                        "reasoning_effort": "max"})
    assert status == 200, body


def test_refresh_checkpoint_serves_the_04_24_tokens_and_the_reference(servers):
    """Same seed, same main weights: greedy tokens of the -0731 server == the 04-24 server == the
    reference model (the DSpark drafter is not used without speculative decoding)."""
    from vllm_harness import compare_with_reference, random_prompt, reference_model

    prompts = [random_prompt(n, seed) for n, seed in ((7, 1), (40, 2), (150, 3))]
    served = {}
    for preset, (base, _, _) in servers.items():
        served[preset] = []
        for prompt in prompts:
            status, body = _post(f"{base}/v1/completions", {
                "model": "tiny-v4", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True})
            assert status == 200, body
            served[preset].append(body["choices"][0]["token_ids"])
    assert served["flash-0731"] == served["flash"]
    ref = reference_model(servers["flash"][1])
    for prompt, tokens in zip(prompts, served["flash"]):
        result = compare_with_reference(ref, prompt, tokens, None)
        assert result.tokens_equal, result.detail


def test_missing_tensor_fails_at_startup_naming_it(server, tmp_path):
    """(Uses the module's checkpoint after the server tests; the running server is not touched.)"""
    from safetensors.torch import load_file, save_file

    _, model_dir, _ = server
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    missing = "layers.2.attn.indexer.weights_proj.weight"
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = broken / index["weight_map"][missing]
    tensors = load_file(shard)
    del tensors[missing]
    save_file(tensors, shard, metadata={"format": "pt"})
    del index["weight_map"][missing]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))

    log = tmp_path / "broken.log"
    server = _start(broken, log)
    try:
        server.proc.wait(timeout=STARTUP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server with a missing tensor did not fail:\n{log.read_text()[-3000:]}")
    finally:
        server.stop()
    assert server.proc.returncode != 0
    assert missing in log.read_text()


# ---- tool_choice "required" / a named function (issue 16) -------------------------------------------
def test_forced_tool_choice_gets_a_schema_valid_call(server):
    """`tool_choice` "required" or a named function, thinking off and on: the completion is constrained
    (after the reasoning) to one DSML call of the allowed tools with arguments valid against the tool's
    schema, which the parsers return as an OpenAI tool call, streamed and not. The tiny model writes
    random text, so the call can only come from the constraint. The 8 requests run concurrently (one
    decode batch: each call is ~110 tokens)."""
    from concurrent.futures import ThreadPoolExecutor

    from tokenizers import Tokenizer

    from chat_corpus import FORCED_CASES, check_forced_tool_choice_answer, forced_tool_choice_request

    base, model_dir, _ = server
    think_end = Tokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id("</think>")
    bodies = [{"model": "tiny-v4", **forced_tool_choice_request(choice, thinking, think_end), "stream": stream}
              for choice, thinking, _ in FORCED_CASES for stream in (False, True)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: _post(f"{base}/v1/chat/completions", body, timeout=1500), bodies))
    for k, (choice, thinking, names) in enumerate(FORCED_CASES):
        (status, whole), (streamed_status, streamed) = answers[2 * k], answers[2 * k + 1]
        assert status == 200 and streamed_status == 200, (choice, thinking, whole, streamed)
        check_forced_tool_choice_answer(whole, streamed, names)


def test_markup_and_control_tokens_never_reach_the_client(server):
    """The model is forced (structured outputs, `choice`) to write stray DSML, `</think>` and control
    tokens: the answer's content is the text without them, streamed and not (issues 16 and 21)."""
    from chat_corpus import MARKUP_COMPLETION, WEATHER_TOOL, check_markup_free_answer

    base, _, _ = server
    request = {"model": "tiny-v4", "messages": MESSAGES, "tools": [WEATHER_TOOL], "tool_choice": "auto",
               "max_tokens": 200, "temperature": 0, "chat_template_kwargs": {"thinking": False},
               "structured_outputs": {"choice": [MARKUP_COMPLETION]}}
    status, whole = _post(f"{base}/v1/chat/completions", request)
    assert status == 200, whole
    status, raw = _post(f"{base}/v1/chat/completions", {**request, "stream": True})
    assert status == 200, raw
    check_markup_free_answer(whole, raw)
