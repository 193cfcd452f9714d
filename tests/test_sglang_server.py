"""M4: `python -m sglang.launch_server` end to end over HTTP on a tiny checkpoint (CPU).

One good server per module (own process group, killed in teardown) started with
`--attention-backend v4_plugin`, and, at the same time, one server on a broken checkpoint that must
fail at startup naming the bad tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("sglang")
requests = pytest.importorskip("requests")

from v4_plugin.tiny import make_tiny  # noqa: E402

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


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("sgl-server")
    good_dir = make_tiny(root / "flash", "flash", seed=0)
    bad_dir = root / "broken"
    _break_checkpoint(good_dir, bad_dir)
    port, bad_port = _free_port(), _free_port()
    good_log, bad_log = str(root / "good.log"), str(root / "bad.log")
    good = _launch(str(good_dir), port, good_log, "--attention-backend", "v4_plugin")
    bad = _launch(str(bad_dir), bad_port, bad_log)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + START_TIMEOUT
        while True:
            if good.poll() is not None:
                pytest.fail(f"server exited with {good.returncode}:\n{Path(good_log).read_text()[-5000:]}")
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT} s:\n{Path(good_log).read_text()[-5000:]}")
            time.sleep(2)
        yield {"url": url, "log": good_log, "bad": bad, "bad_log": bad_log}
    finally:
        _kill(good)
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
    assert isinstance(body["choices"][0]["message"]["content"], str)
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


def test_broken_checkpoint_fails_at_startup_naming_the_tensor(servers):
    bad = servers["bad"]
    try:
        bad.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("a server on a broken checkpoint did not exit")
    text = Path(servers["bad_log"]).read_text()
    assert bad.returncode != 0
    assert BROKEN_TENSOR in text and "CheckpointError" in text, text[-5000:]
