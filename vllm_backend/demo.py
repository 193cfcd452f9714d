"""`make demo` for vLLM: serve a tiny checkpoint with `vllm serve`, send one chat request, print the
answer and vLLM's KV-capacity line, stop the server.

    python -m vllm_backend.demo [--model DIR] [--port 8011]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: a fresh tiny Flash checkpoint)")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--prompt", default="Tell me about compressed attention.")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="v4-vllm-demo-"))
    model = Path(args.model) if args.model else None
    if model is None:
        from v4_plugin.tiny import make_tiny

        model = make_tiny(work / "tiny-flash", preset="flash", seed=0)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    exe = Path(sys.executable).with_name("vllm")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "vllm.entrypoints.cli.main"]),
           "serve", str(model), "--host", "127.0.0.1", "--port", str(args.port), "--max-model-len", "2048",
           "--enforce-eager", "--served-model-name", "tiny-v4"]
    log = work / "server.log"
    print(f"starting: {' '.join(cmd)}  (log: {log})", flush=True)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if proc.poll() is not None or time.time() > deadline:
                print(log.read_text()[-4000:], file=sys.stderr)
                return 1
            time.sleep(2)
        body = {"model": "tiny-v4", "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": args.prompt}], "chat_template_kwargs": {"thinking": False}}
        req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
        for line in log.read_text().splitlines():
            if "deepseek-v4-plugin" in line and "serving" in line or "KV cache size" in line:
                print(line.split("] ", 1)[-1])
        print("answer:", repr(answer["choices"][0]["message"]["content"]))
        print("usage:", answer["usage"])
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    raise SystemExit(main())
