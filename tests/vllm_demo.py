"""`make demo` for vLLM: serve a tiny checkpoint with `vllm serve`, send one chat request, print the
answer and vLLM's KV-capacity line, stop the server.

    python tests/vllm_demo.py [--model DIR] [--port 8011]

It sits beside the tests because it starts the server with their harness (`vllm_harness.vllm_server`);
run as a script, tests/ is sys.path[0]. Not a test module: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

from vllm_harness import vllm_server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: a fresh tiny Flash checkpoint)")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--prompt", default="Tell me about compressed attention.")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="v4-vllm-demo-"))
    model = Path(args.model) if args.model else None
    if model is None:
        from v4_plugin.checkpoint.tiny import make_tiny

        model = make_tiny(work / "tiny-flash", preset="flash", seed=0)
    log = work / "server.log"
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1"}
    flags = ("--max-model-len", "2048", "--enforce-eager", "--served-model-name", "tiny-v4")
    print(f"starting: vllm serve {model} {' '.join(flags)}  (log: {log})", flush=True)
    try:
        with vllm_server(model, log, *flags, env=env, port=args.port) as base:
            body = {"model": "tiny-v4", "max_tokens": 24, "temperature": 0, "chat_template_kwargs": {"thinking": False},
                    "messages": [{"role": "user", "content": args.prompt}]}
            req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                answer = json.loads(r.read())
    except RuntimeError as exc:  # the server did not come up: the message holds its log's tail
        print(exc, file=sys.stderr)
        return 1
    for line in log.read_text().splitlines():
        if "deepseek-v4-plugin" in line and "serving" in line or "KV cache size" in line:
            print(line.split("] ", 1)[-1])
    print("answer:", repr(answer["choices"][0]["message"]["content"]))
    print("usage:", answer["usage"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
