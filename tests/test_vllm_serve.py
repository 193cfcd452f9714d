"""`vllm serve` end to end over HTTP on a tiny checkpoint: our plugin serves (its startup line is in
the server log), chat completions use the checkpoint's chat encoding, streaming equals the
non-streamed answer, a prompt over --max-model-len gets HTTP 400 and the server keeps serving; and a
checkpoint missing a tensor fails at startup with the tensor's name.

The server is started once for the module in its own process group and killed in teardown."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

MAX_MODEL_LEN = 1024
STARTUP_TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_cli() -> list[str]:
    exe = Path(sys.executable).with_name("vllm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # a real server: API process + engine core
    env["V4_PLUGIN_QUANT_SIM"] = "off"
    return env


def _start(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = _vllm_cli() + ["serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                         "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
                         "--served-model-name", "tiny-v4"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=_server_env(),
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read().decode()
            return resp.status, (json.loads(raw) if not body.get("stream") else raw)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
            return resp.status == 200
    except Exception:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from v4_plugin.tiny import make_tiny

    root = tmp_path_factory.mktemp("vllm-serve")
    model_dir = make_tiny(root / "flash", preset="flash", seed=4)
    port, log = _free_port(), root / "server.log"
    proc = _start(model_dir, port, log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_TIMEOUT
        while not _healthy(base):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"vllm serve did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield base, model_dir, log
    finally:
        _stop(proc)


MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about compressed attention."}]


def test_server_runs_our_plugin(server):
    _, _, log = server
    text = log.read_text()
    assert "deepseek-v4-plugin 0.1.0: serving DeepseekV4ForCausalLM with the DEEPSEEK_V4_PLUGIN_PAGED" in text
    assert "KV cache size:" in text


def test_chat_completion_uses_checkpoint_chat_encoding(server):
    """vLLM renders V4 chats with its deepseek_v4 encoder (keyed by model_type; thinking mode by
    default); in chat mode the prompt is exactly the checkpoint's encoding (`v4_plugin.chat`)."""
    from tokenizers import Tokenizer

    from v4_plugin.chat import encode_messages

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
    assert _healthy(base)
    status, body = _post(f"{base}/v1/completions",
                         {"model": "tiny-v4", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 4 or body["choices"][0]["finish_reason"] == "stop"


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
    proc = _start(broken, _free_port(), log)
    try:
        proc.wait(timeout=STARTUP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server with a missing tensor did not fail:\n{log.read_text()[-3000:]}")
    finally:
        _stop(proc)
    assert proc.returncode != 0
    assert missing in log.read_text()
