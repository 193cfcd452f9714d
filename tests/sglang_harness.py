"""Helpers for the SGLang adapter's tests (real engines on CPU, tiny checkpoints, no mocks) and
`bench/bench_sglang_drafting.py`.

Nothing here is needed to serve, so it lives beside the tests, not in the adapter; the tests import it as
`sglang_harness` (pytest puts tests/ on sys.path). The test draft model it writes checkpoints for,
`DeepseekV4PluginReplayDraft`, stays in `sglang_backend/models/replay_draft.py`: SGLang finds model
classes only in the one package `SGLANG_EXTERNAL_MODEL_PACKAGE` names, which the plugin sets to
`sglang_backend.models` in every process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

# Exact mode: float KV entries and no quantization simulation on both sides (tiny random models
# are chaotic under FP8 rounding, so token equality is only meaningful without it).
EXACT_ENV = {"V4_PLUGIN_QUANT_SIM": "off"}

# What every CPU engine in the tests gets (setup-and-ci.md §3: no SGLANG_USE_CPU_ENGINE, a token cap).
CPU_ENGINE_ARGS = dict(
    device="cpu",
    dtype="float32",
    disable_overlap_schedule=True,
    cuda_graph_backend_decode="disabled",
    disable_prefill_cuda_graph=True,
    log_level="info",
)


def prompt_ids(length: int, vocab: int, seed: int) -> list[int]:
    """A prompt of random non-special token ids (0 = BOS, 1 = EOS in the tiny tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (length,), generator=g).tolist()


def reference_model(model_dir: str, *, quant_off: bool = True, mtp: bool = False):
    """The oracle: the core's fp32 `V4Model` of a checkpoint (`mtp`: with the mtp.* tensors, for the drafters)."""
    from v4_plugin.runtime.model import V4Model
    from v4_plugin.checkpoint.quant import QuantSim

    return V4Model.from_checkpoint(model_dir, quant=QuantSim.off() if quant_off else QuantSim(), include_mtp=mtp)


def reference_greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    return [model.generate(list(p), max_new_tokens) for p in prompts]


def replay_checkpoint(model_dir: Path, out: Path, sequences: list[list[int]]) -> Path:
    """A draft checkpoint dir for `DeepseekV4PluginReplayDraft`: `model_dir`'s files (weights linked), its
    config.json naming the replay architecture first (the core still finds DeepseekV4ForCausalLM) and
    carrying `sequences`."""
    from sglang_backend import REPLAY_ARCH
    from sglang_backend.models.replay_draft import REPLAY_FIELD

    out.mkdir()
    for f in model_dir.iterdir():
        if f.suffix == ".safetensors":
            (out / f.name).symlink_to(f)
        else:
            shutil.copy(f, out / f.name)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = [REPLAY_ARCH, *config["architectures"]]
    config[REPLAY_FIELD] = sequences
    (out / "config.json").write_text(json.dumps(config))
    return out


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set env vars for the duration (engine processes spawned inside inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def stderr_to_file() -> Iterator[str]:
    """Route fd 2 to a temp file while the block runs: SGLang's scheduler process, spawned inside,
    keeps it as its stderr (where its log lines go). Yields the file's path."""
    fd, path = tempfile.mkstemp(prefix="sglang-", suffix=".log")
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        yield path
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


class EngineDied(RuntimeError):
    """An SGLang child process failed (it signals the parent with SIGQUIT)."""


def _raise_on_sigquit(signum, frame):
    # SGLang's default handler SIGKILLs the whole process tree, pytest included; fail the test instead.
    raise EngineDied("an SGLang scheduler/detokenizer process failed; see its log")


def start_engine(model_dir: str, **kwargs):
    """`sglang.Engine` on CPU with the test defaults; returns (engine, log path)."""
    import sglang as sgl

    args = {**CPU_ENGINE_ARGS, "skip_tokenizer_init": True, "custom_sigquit_handler": _raise_on_sigquit, **kwargs}
    with stderr_to_file() as log:
        try:
            engine = sgl.Engine(model_path=model_dir, **args)
        except BaseException as exc:
            from sglang.srt.utils import kill_process_tree

            kill_process_tree(os.getpid(), include_parent=False)
            raise EngineDied(f"engine failed to start: {exc!r}\n(log: {log})\n{open(log).read()[-6000:]}") from exc
    return engine, log


def shutdown_engine(engine) -> None:
    """Shut an engine down; first point SGLang's log handlers back at the real stderr (pytest closes
    the capture stream they were created with, and shutdown logs)."""
    import logging
    import sys

    for name in [None, *logging.root.manager.loggerDict]:
        for handler in logging.getLogger(name).handlers:
            # exact type: pytest's own capture handlers are subclasses and must keep their streams
            if type(handler) is logging.StreamHandler:
                handler.setStream(sys.__stderr__)
    engine.shutdown()


def generate(engine, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[dict]:
    """Greedy generation of a batch submitted together (concurrent requests)."""
    params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    out = engine.generate(input_ids=[list(p) for p in prompts], sampling_params=params)
    return out if isinstance(out, list) else [out]


# ---- `python -m sglang.launch_server` as a real server (HTTP tests) ---------------------------------
SERVER_ARGS = ("--device", "cpu", "--dtype", "float32", "--max-total-tokens", "4096", "--disable-overlap-schedule",
               "--cuda-graph-backend-decode", "disabled", "--disable-prefill-cuda-graph")
"""The CPU flags every test server gets (the `CPU_ENGINE_ARGS` of `launch_server`)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SglangServer:
    """`python -m sglang.launch_server --model-path MODEL_DIR ... ARGS...` (exact mode, `SERVER_ARGS`) as a
    real server, output in `log`, in its own process group. Several can start at once: construct them all,
    then `wait` for each."""

    def __init__(self, model_dir: str | Path, log: str | Path, *args: str, env: dict[str, str] | None = None):
        self.log, self.port = Path(log), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir),
                    "--host", "127.0.0.1", "--port", str(self.port), *SERVER_ARGS, *args]
        server_env = {**os.environ, **EXACT_ENV, **(env or {})}
        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=server_env,
                                     start_new_session=True)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/health", timeout=5) as resp:
                return resp.status == 200
        except Exception:
            return False

    def wait(self, timeout: float = 420) -> None:
        """Until /health answers; raises RuntimeError with the log's tail if the server exits or times out."""
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`{' '.join(self.cmd)}` did not come up:\n{self.log.read_text()[-5000:]}")
            time.sleep(2)

    def stop(self) -> None:
        """SIGTERM the process group (SIGKILL after 20 s)."""
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                return
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
