"""M4: `python -m sglang.launch_server` end to end over HTTP on tiny checkpoints (CPU).

Two good servers per module (own process groups, killed in teardown) started with
`--attention-backend v4_plugin` and the README's parser flags, on the tiny 04-24 and -0731
checkpoints of one seed, and, at the same time, one server on a broken checkpoint that must fail at
startup naming the bad tensor.

Chat (issues 7 and 9): requests with `tools` get OpenAI-format answers (streamed too) with no DSML or
think markup in `content`; the rendered prompt of every profile x effort x thinking mode equals
DeepSeek's official encoder; an unknown effort is a 400 listing the allowed ones; thinking off by
`reasoning_effort="none"` leaves the reasoning empty; the -0731 server's greedy tokens equal the 04-24
server's and the reference model's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("sglang")
requests = pytest.importorskip("requests")

from v4_plugin.checkpoint.tiny import make_tiny  # noqa: E402

SERVED_NAME = "deepseek-v4-tiny"
BROKEN_TENSOR = "layers.2.attn.compressor.ape"
START_TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model_dir: str, port: int, log_path: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_dir, "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-total-tokens", "4096",
           "--served-model-name", SERVED_NAME, "--disable-overlap-schedule",
           "--cuda-graph-backend-decode", "disabled", "--disable-prefill-cuda-graph", *extra]
    env = {**os.environ, "V4_PLUGIN_QUANT_SIM": "off"}
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _break_checkpoint(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    shard = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"][BROKEN_TENSOR]
    tensors = load_file(dst / shard)
    tensors[BROKEN_TENSOR] = tensors[BROKEN_TENSOR][:, :-1].contiguous()  # wrong shape
    save_file(tensors, dst / shard, metadata={"format": "pt"})


PARSER_FLAGS = ("--tool-call-parser", "deepseek_v4_plugin", "--reasoning-parser", "deepseek_v4_plugin")
"""The README's flags for tool calls and reasoning."""


def _wait_healthy(proc: subprocess.Popen, url: str, log_path: str, deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{Path(log_path).read_text()[-5000:]}")
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.time() > deadline:
            pytest.fail(f"server not healthy after {START_TIMEOUT} s:\n{Path(log_path).read_text()[-5000:]}")
        time.sleep(2)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("sgl-server")
    good_dir = make_tiny(root / "flash", "flash", seed=0)
    refresh_dir = make_tiny(root / "flash-0731", "flash-0731", seed=0)
    bad_dir = root / "broken"
    _break_checkpoint(good_dir, bad_dir)
    port, refresh_port, bad_port = _free_port(), _free_port(), _free_port()
    good_log, refresh_log, bad_log = str(root / "good.log"), str(root / "refresh.log"), str(root / "bad.log")
    good = _launch(str(good_dir), port, good_log, "--attention-backend", "v4_plugin", *PARSER_FLAGS)
    refresh = _launch(str(refresh_dir), refresh_port, refresh_log, "--attention-backend", "v4_plugin", *PARSER_FLAGS)
    bad = _launch(str(bad_dir), bad_port, bad_log)
    try:
        url, refresh_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{refresh_port}"
        deadline = time.time() + START_TIMEOUT
        _wait_healthy(good, url, good_log, deadline)
        _wait_healthy(refresh, refresh_url, refresh_log, deadline)
        yield {"url": url, "log": good_log, "dir": good_dir, "refresh_url": refresh_url, "refresh_dir": refresh_dir,
               "bad": bad, "bad_log": bad_log}
    finally:
        _kill(good)
        _kill(refresh)
        _kill(bad)


def test_log_line_names_the_plugin(servers):
    text = Path(servers["log"]).read_text()
    assert "deepseek-v4-plugin 0.1.0: serving DeepseekV4ForCausalLM with the v4_plugin attention backend (" in text


def test_chat_completion(servers):
    r = requests.post(servers["url"] + "/v1/chat/completions", timeout=120, json={
        "model": SERVED_NAME, "messages": [{"role": "user", "content": "Tell me about compressed attention."}],
        "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert isinstance(message["content"], str) or isinstance(message.get("reasoning_content"), str), message
    assert body["usage"]["completion_tokens"] >= 1 and body["usage"]["prompt_tokens"] > 5


def test_chat_completion_streaming(servers):
    r = requests.post(servers["url"] + "/v1/chat/completions", timeout=120, stream=True, json={
        "model": SERVED_NAME, "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8, "temperature": 0, "stream": True})
    assert r.status_code == 200
    events = [line[len(b"data: "):] for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events and events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(chunks) >= 2 and isinstance(text, str)


def test_too_long_prompt_is_refused_and_server_keeps_serving(servers):
    r = requests.post(servers["url"] + "/v1/completions", timeout=120, json={
        "model": SERVED_NAME, "prompt": [5] * 5000, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 400, r.text
    message = r.text.lower()
    assert "context length" in message or "too long" in message or "longer than" in message, r.text
    ok = requests.post(servers["url"] + "/v1/completions", timeout=120, json={
        "model": SERVED_NAME, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 4


def test_sampled_requests_are_served(servers):
    """Sampling (temperature, top-p, top-k) scales the model's logits in place inside SGLang's sampler:
    the request is answered and the server keeps serving."""
    for seed in (1, 2):
        r = requests.post(servers["url"] + "/v1/chat/completions", timeout=120, json={
            "model": SERVED_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
            "temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": seed})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    assert requests.get(servers["url"] + "/health", timeout=30).status_code == 200


# ---- chat: tools, effort profiles, the -0731 checkpoint (issues 7 and 9) ----------------------------
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about compressed attention."}]


# SGLang on a 2-core CPU decodes about one token a second over a ~1.2K-token tool prompt under a grammar
# (the forced-call test below took 230-300+ s): a generous limit, so that a slow machine is not a failure.
CHAT_TIMEOUT_S = 900


def _chat(url: str, **body) -> requests.Response:
    return requests.post(url + "/v1/chat/completions", timeout=CHAT_TIMEOUT_S, json={"model": SERVED_NAME, **body})


@pytest.mark.parametrize("thinking", [False, True])
def test_tool_request_gets_an_openai_answer(servers, thinking):
    """The tiny model's text is random: whatever it writes, the answer is OpenAI-shaped and holds no
    markup (the parsers' exact output on constructed completions is tests/test_dsml_frameworks.py)."""
    from chat_corpus import WEATHER_TOOL, check_openai_chat_answer, stream_chunks

    request = dict(messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=24, temperature=0,
                   chat_template_kwargs={"thinking": thinking})
    whole = _chat(servers["url"], **request)
    assert whole.status_code == 200, whole.text
    streamed = _chat(servers["url"], **request, stream=True)
    assert streamed.status_code == 200, streamed.text
    check_openai_chat_answer(whole.json(), stream_chunks(streamed.text), {"get_weather"})


def test_forced_tool_call_goes_through_the_server_parsers(servers):
    """The model is constrained to write a DSML tool call (a `regex` of the whole completion): the
    answer carries it as an OpenAI tool call, streamed and not."""
    import re

    from chat_corpus import FORCED_TOOL_COMPLETION, WEATHER_TOOL, check_forced_tool_call_answer

    request = dict(messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=400, temperature=0,
                   chat_template_kwargs={"thinking": False}, regex=re.escape(FORCED_TOOL_COMPLETION))
    whole = _chat(servers["url"], **request)
    assert whole.status_code == 200, whole.text
    streamed = _chat(servers["url"], **request, stream=True)
    assert streamed.status_code == 200, streamed.text
    check_forced_tool_call_answer(whole.json(), streamed.text)


@pytest.mark.parametrize("which,profile", [("url", "preview"), ("refresh_url", "refresh")])
def test_rendered_prompt_per_profile_effort_and_thinking(servers, which, profile):
    """`/tokenize` with messages renders through the chat path: the 04-24 checkpoint gets no preamble
    for the default effort (SGLang's deepseek-recipe would write "Absolute maximum"), the -0731 one
    the official mapping; expected prompts come from DeepSeek's official encoder. The effort is given
    as a template kwarg beside `thinking`, and (thinking on) as the request field alone: an effort
    other than "none" asks for thinking, as in vLLM."""
    from tokenizers import Tokenizer

    from chat_corpus import OFFICIAL_EFFORT, official_encode

    tok = Tokenizer.from_file(str(servers["dir"] / "tokenizer.json"))
    for (name, effort), official in OFFICIAL_EFFORT.items():
        if name != profile:
            continue
        for thinking in (True, False):
            expected = official_encode(MESSAGES, thinking=thinking, effort=official)
            kwargs = {"thinking": thinking} | ({"reasoning_effort": effort} if effort else {})
            bodies = [{"chat_template_kwargs": kwargs}] + ([{"reasoning_effort": effort}] if thinking else [])
            for body in bodies:
                r = requests.post(servers[which] + "/tokenize", timeout=60,
                                  json={"model": SERVED_NAME, "messages": MESSAGES, **body})
                assert r.status_code == 200, r.text
                assert tok.decode(r.json()["tokens"], skip_special_tokens=False) == expected, body


@pytest.mark.parametrize("which,allowed", [("url", "high, max"), ("refresh_url", "high, low, max")])
def test_unknown_effort_is_a_400_listing_the_allowed_ones(servers, which, allowed):
    url = servers[which]
    for body in ({"reasoning_effort": "ultra"}, {"chat_template_kwargs": {"reasoning_effort": "ultra"}}):
        r = _chat(url, messages=MESSAGES, max_tokens=2, temperature=0, **body)
        assert r.status_code == 400, r.text
        assert "'ultra'" in r.text and allowed in r.text, r.text
    assert requests.get(url + "/health", timeout=120).status_code == 200
    r = _chat(url, messages=MESSAGES, max_tokens=2, temperature=0, reasoning_effort="max")
    assert r.status_code == 200, r.text


def test_effort_none_turns_thinking_off_for_prompt_and_parser(servers):
    """`reasoning_effort="none"`: the prompt opens the answer with `</think>` and the reasoning parser
    does not put the completion into `reasoning_content` (it did when SGLang decided alone)."""
    from v4_plugin.text.chat import ASSISTANT, THINK_END

    r = requests.post(servers["url"] + "/tokenize", timeout=60,
                      json={"model": SERVED_NAME, "messages": MESSAGES, "reasoning_effort": "none"})
    tok = json.loads((servers["dir"] / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in tok}
    assert r.status_code == 200 and r.json()["tokens"][-2:] == [ids[ASSISTANT], ids[THINK_END]], r.text
    request = dict(messages=MESSAGES, max_tokens=12, temperature=0, reasoning_effort="none")
    for answer in (_chat(servers["url"], **request), _chat(servers["url"], **request, stream=True)):
        assert answer.status_code == 200, answer.text
        assert "reasoning_content\":\"" not in answer.text.replace(" ", ""), answer.text


def test_refresh_checkpoint_serves_the_04_24_tokens_and_the_reference(servers):
    """Same seed, same main weights: greedy tokens of the -0731 server == the 04-24 server == the
    reference model (the DSpark drafter is not used without speculative decoding)."""
    from sglang_harness import prompt_ids, reference_greedy, reference_model

    prompts = [prompt_ids(n, 384, seed) for n, seed in ((7, 1), (40, 2), (150, 3))]
    served = {}
    for which in ("url", "refresh_url"):
        served[which] = []
        for prompt in prompts:
            r = requests.post(servers[which] + "/v1/completions", timeout=300, json={
                "model": SERVED_NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True})
            assert r.status_code == 200, r.text
            served[which].append(r.json()["choices"][0]["token_ids"])
    assert served["refresh_url"] == served["url"]
    assert served["url"] == reference_greedy(reference_model(str(servers["dir"])), prompts, 6)


def test_broken_checkpoint_fails_at_startup_naming_the_tensor(servers):
    bad = servers["bad"]
    try:
        bad.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("a server on a broken checkpoint did not exit")
    text = Path(servers["bad_log"]).read_text()
    assert bad.returncode != 0
    assert BROKEN_TENSOR in text and "CheckpointError" in text, text[-5000:]


# ---- tool_choice "required" / a named function (issue 16) -------------------------------------------
def test_forced_tool_choice_gets_a_schema_valid_call(servers):
    """`tool_choice` "required" or a named function, thinking off and on: the completion is constrained
    (after the reasoning) to one DSML call of the allowed tools with arguments valid against the tool's
    schema, which the parsers return as an OpenAI tool call, streamed and not. The tiny model writes
    random text, so the call can only come from the constraint. The 8 requests run concurrently (one
    decode batch: each call is ~110 tokens)."""
    from concurrent.futures import ThreadPoolExecutor

    from tokenizers import Tokenizer

    from chat_corpus import FORCED_CASES, check_forced_tool_choice_answer, forced_tool_choice_request

    think_end = Tokenizer.from_file(str(servers["dir"] / "tokenizer.json")).token_to_id("</think>")
    bodies = [{"model": SERVED_NAME, **forced_tool_choice_request(choice, thinking, think_end), "stream": stream}
              for choice, thinking, _ in FORCED_CASES for stream in (False, True)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: requests.post(servers["url"] + "/v1/chat/completions", json=body,
                                                           timeout=1500), bodies))
    for k, (choice, thinking, names) in enumerate(FORCED_CASES):
        whole, streamed = answers[2 * k], answers[2 * k + 1]
        assert whole.status_code == 200 and streamed.status_code == 200, (choice, thinking, whole.text, streamed.text)
        check_forced_tool_choice_answer(whole.json(), streamed.text, names)


def test_markup_and_control_tokens_never_reach_the_client(servers):
    """The model is forced (a `regex` of the whole completion) to write stray DSML, `</think>` and
    control tokens: the answer's content is the text without them, streamed and not (issues 16 and 21)."""
    import re

    from chat_corpus import MARKUP_COMPLETION, WEATHER_TOOL, check_markup_free_answer

    request = dict(messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=200, temperature=0,
                   chat_template_kwargs={"thinking": False}, regex=re.escape(MARKUP_COMPLETION))
    whole = _chat(servers["url"], **request)
    assert whole.status_code == 200, whole.text
    streamed = _chat(servers["url"], **request, stream=True)
    assert streamed.status_code == 200, streamed.text
    check_markup_free_answer(whole.json(), streamed.text)
