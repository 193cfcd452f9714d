"""Helpers shared by the vLLM adapter's tests (`tests/test_vllm_*.py`, `tests/test_sglang_engine.py`), the demo
(`tests/vllm_demo.py`) and the benchmarks (`bench/bench_serving.py`, `bench/bench_vllm_drafting.py`).

Nothing here is needed to serve, so it lives beside the tests, not in the adapter: it builds tiny engines
and servers and checks their output against the core's `V4Model`, whose whole-sequence `forward` is the
oracle. The tests import it as `vllm_harness` (pytest puts tests/ on sys.path); scripts elsewhere put
tests/ on sys.path first.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

PLUGIN_LOGGER = "vllm.deepseek_v4_plugin"
KV_LOGGER = "vllm.v1.core.kv_cache_utils"  # logs "CPU KV cache size: N tokens, Maximum concurrency ..."
STARTUP_MARK = "serving DeepseekV4ForCausalLM with the"


class LogCapture(logging.Filter):
    """Collects the plugin's log records. A filter, not a handler: vLLM re-applies its logging
    dictConfig while an engine starts, which strips handlers (not filters) from `vllm.*` loggers.
    Entering forgets what vLLM's `*_once` loggers printed before, so an engine started inside logs
    its lines even after an earlier engine of this process logged the same ones."""

    def __init__(self, *loggers: str):
        super().__init__()
        self.loggers = loggers or (PLUGIN_LOGGER,)
        self.lines: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.lines.append(record.getMessage())
        return True

    def __enter__(self) -> "LogCapture":
        from vllm import logger as vllm_logger

        for once in (vllm_logger._print_debug_once, vllm_logger._print_info_once,
                     vllm_logger._print_warning_once, vllm_logger._print_error_once):
            once.cache_clear()
        for name in self.loggers:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.loggers:
            logging.getLogger(name).removeFilter(self)

    def startup_lines(self) -> list[str]:
        return [line for line in self.lines if STARTUP_MARK in line]


class EnvPatch:
    """Set environment variables for a block (in-process engines read them at construction)."""

    def __init__(self, **values: str):
        self.values, self.saved = values, {}

    def __enter__(self):
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_llm(model_dir: str | Path, **overrides):
    """An in-process vLLM engine on the CPU in exact mode (fp32, auto KV, eager)."""
    from vllm import LLM

    kwargs = dict(
        model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
        distributed_executor_backend="uni", disable_log_stats=False, kv_cache_dtype="auto",
    )
    kwargs.update(overrides)
    return LLM(**kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cli() -> list[str]:
    """The `vllm` command of this environment (its console script, else the module)."""
    exe = Path(sys.executable).with_name("vllm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def healthy(base: str) -> bool:
    """True when the server at `base` answers /health with 200."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
            return resp.status == 200
    except Exception:
        return False


class VllmServer:
    """`vllm serve MODEL_DIR --host 127.0.0.1 --port PORT ARGS...` as a real server (API process + engine
    core), output in `log`, in its own process group. Several can start at once: construct them all,
    then `wait` for each."""

    def __init__(self, model_dir: str | Path, log: Path, *args: str, env: dict[str, str] | None = None,
                 port: int | None = None):
        self.log, self.port = Path(log), port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        server_env = {**os.environ, **(env or {})}
        server_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self.cmd = [*vllm_cli(), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=server_env,
                                     start_new_session=True)

    def wait(self, timeout: float = 600) -> None:
        """Until /health answers; raises RuntimeError with the log's tail if the server exits or times out."""
        deadline = time.monotonic() + timeout
        while not healthy(self.base):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`{' '.join(self.cmd)}` did not come up:\n{self.log.read_text()[-4000:]}")
            time.sleep(2)

    def stop(self) -> None:
        """SIGTERM the process group (SIGKILL after 30 s)."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            self.proc.wait(timeout=30)


@contextmanager
def vllm_server(model_dir: str | Path, log: Path, *args: str, env: dict[str, str] | None = None,
                port: int | None = None, startup_timeout: float = 600) -> Iterator[str]:
    """A `VllmServer` for a block: yields its base URL once /health answers, stops it on exit."""
    server = VllmServer(model_dir, log, *args, env=env, port=port)
    try:
        server.wait(startup_timeout)
        yield server.base
    finally:
        server.stop()


def engine_core(llm):
    """The in-process EngineCore (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core


def counters(llm) -> dict[str, float]:
    """vLLM's own metrics (counters and gauges) by name, summed over labels."""
    out: dict[str, float] = {}
    for metric in llm.get_metrics():
        value = getattr(metric, "value", None)
        if isinstance(value, (int, float)):
            out[metric.name] = out.get(metric.name, 0) + value
    return out


def random_prompt(length: int, seed: int, vocab: int = 384) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (length,), generator=g).tolist()


def reference_model(model_dir: str | Path, include_mtp: bool = False, quant_off: bool = True):
    """The oracle: the core's fp32 `V4Model`, in exact mode (no quantization simulation) or, with `quant_off=False`, in the
    served default; with its drafter blocks on request."""
    from v4_plugin.runtime.model import V4Model
    from v4_plugin.checkpoint.quant import QuantSim

    return V4Model.from_checkpoint(model_dir, quant=QuantSim.off() if quant_off else QuantSim(),
                                   include_mtp=include_mtp)


@dataclass
class Comparison:
    tokens_equal: bool
    max_logprob_error: float
    first_mismatch: int | None = None
    detail: list[str] = field(default_factory=list)


def compare_with_reference(ref, prompt: list[int], tokens: list[int], logprobs: list[float] | None,
                           tie_tolerance: float = 1e-4) -> Comparison:
    """Teacher-forced check of a greedy completion: the oracle `ref` (a `V4Model`) runs prompt + tokens[:-1]
    once (`forward`), and each generated token must be its argmax (a near-tie within `tie_tolerance` in
    log-probability ends the comparison as equal-so-far), with its log-probability matching."""
    ids = torch.tensor(prompt + tokens[:-1])
    with torch.inference_mode():
        logits = ref.forward(ids).logits.float()
    lp = torch.log_softmax(logits, dim=-1)
    start = len(prompt) - 1
    worst, detail = 0.0, []
    for k, tok in enumerate(tokens):
        row = lp[start + k]
        best = int(row.argmax())
        if best != tok:
            gap = float(row[best] - row[tok])
            if gap <= tie_tolerance:
                detail.append(f"near-tie at step {k}: {best} vs {tok} (gap {gap:.2e}); stopped comparing")
                break
            return Comparison(False, worst, k, [f"step {k}: vLLM {tok}, reference {best} (gap {gap:.3e})"])
        if logprobs is not None:
            worst = max(worst, abs(float(row[tok]) - logprobs[k]))
    return Comparison(True, worst, None, detail)


def sampled_logprobs(completion) -> list[float] | None:
    """Log-probabilities of the sampled tokens of one vLLM CompletionOutput."""
    if completion.logprobs is None:
        return None
    return [step[tok].logprob for tok, step in zip(completion.token_ids, completion.logprobs)]


# ---- greedy tokens from another process (cross-framework comparisons, multi-process engines) --------
TOKENS_MARK = "v4-plugin-greedy-tokens: "
COUNTERS_MARK = "v4-plugin-counters: "


def greedy_tokens(llm, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy completions (token ids) of token-id prompts, all submitted at once, from `llm`."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def greedy_tokens_in_subprocess(model_dir: str | Path, prompts: list[list[int]], max_new_tokens: int,
                                timeout: float = 900, overrides: dict | None = None, env: dict[str, str] | None = None,
                                log: Path | None = None) -> list[list[int]]:
    """`greedy_tokens` of a `make_llm` engine (exact mode unless `overrides`, JSON values, or `env` say otherwise)
    run by `python tests/vllm_harness.py` in a fresh process, so another framework's engine can live in the
    caller's (vLLM and SGLang patch torch and logging process-wide), or so that a multi-process engine's
    workers log where the caller reads them: the process's whole output (its workers' and the engine's
    `counters` after the run, on a `COUNTERS_MARK` line) is written to `log`."""
    import json

    env = {**os.environ, "V4_PLUGIN_QUANT_SIM": "off", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(model_dir), str(max_new_tokens),
                           json.dumps(overrides or {})],
                          input=json.dumps(prompts), capture_output=True, text=True, env=env, timeout=timeout)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(TOKENS_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM greedy run failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len(TOKENS_MARK):])


class ReplayProposer:
    """vLLM `custom_class` proposer drafting a known continuation of each prompt (the plain greedy output:
    every draft accepted, k + 1 tokens per verify step). Used in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0):
    `--speculative-config '{"method": "custom_class", "model": "vllm_harness.ReplayProposer", ...}'`
    after setting `ReplayProposer.continuations` (prompt ids tuple -> continuation)."""

    continuations: dict[tuple[int, ...], list[int]] = {}

    def __init__(self, vllm_config):
        self.k = vllm_config.speculative_config.num_speculative_tokens

    def load_model(self, target_model) -> None:  # the CPU model runner hands every drafter the target
        pass

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        drafts = []
        for i in range(len(sampled_token_ids)):
            seq = token_ids_cpu[i, : int(num_tokens_no_spec[i])].tolist()
            prompt = next(p for p in self.continuations if tuple(seq[: len(p)]) == p)
            done = len(seq) - len(prompt)
            drafts.append((self.continuations[prompt][done : done + self.k] + [0] * self.k)[: self.k])
        return drafts


if __name__ == "__main__":  # python tests/vllm_harness.py MODEL_DIR MAX_NEW_TOKENS [OVERRIDES_JSON] < prompts.json
    import json

    engine = make_llm(sys.argv[1], **json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}"))
    print(TOKENS_MARK + json.dumps(greedy_tokens(engine, json.load(sys.stdin), int(sys.argv[2]))), flush=True)
    print(COUNTERS_MARK + json.dumps(counters(engine)), flush=True)
