"""What the GPU benchmark scripts in bench/ share: the no-CUDA exit, timing, the same-run streaming
baselines (a plain Triton read and a plain Triton copy) and table printing.

The scripts run as `python bench/bench_x.py` (from the repo root or from bench/: either way bench/ is
sys.path[0]) and import this module as `common`; imported as `bench.bench_x` they use `from . import common`.
Importing it needs no GPU: nothing is compiled or launched until a function is called.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

TESTS = Path(__file__).resolve().parents[1] / "tests"


def use_test_harnesses() -> None:
    """Put tests/ on sys.path: the framework benchmarks start engines and servers with the tests' harnesses
    (`vllm_harness`, `sglang_harness`), which live beside the tests, not in the adapters."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


# ---- no GPU: say so, measure nothing, exit 0 ------------------------------------------------------
def cuda_missing(script: str, tests: str) -> bool:
    """True, after printing why, when there is no CUDA device; the caller then returns 0.

    `tests`: the pytest paths that check the benchmarked kernels on CPU instead.
    """
    if torch.cuda.is_available():
        return False
    print(f"{script}: no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU, "
          f"nothing measured. (On CPU the kernels are tested with the Triton interpreter: pytest {tests}.)")
    return True


def int_list(csv: str) -> list[int]:
    """"1,16,64" -> [1, 16, 64] (the --batch / --batches / --tokens options)."""
    return [int(v) for v in csv.split(",")]


def parse_ctx(s: str) -> int:
    """Context length with an optional K / M suffix (powers of 1024): "4K" -> 4096, "1M" -> 1048576."""
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1], 1)
    return int(s[:-1] if s[-1] in "KM" else s) * mult


def ctx_label(ctx: int) -> str:
    """4096 -> "4K", 1048576 -> "1M"."""
    return f"{ctx // 1024}K" if ctx < 2**20 else f"{ctx // 2**20}M"


# ---- timing -----------------------------------------------------------------------------------------
def time_ms(fn) -> float:
    """triton.testing.do_bench(fn) with Triton's defaults (25 ms warm-up, 100 ms of runs, mean), in ms."""
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def time_us(fn) -> float:
    """`time_ms` in microseconds."""
    return time_ms(fn) * 1e3


def median_ms(fn) -> float:
    """A shorter run for the large decode tables: 10 ms warm-up, 50 ms of runs, median, in ms."""
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


# ---- streaming baselines ------------------------------------------------------------------------------
@triton.jit
def _stream_read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Grid-stride read of n int32 or int64 words, one partial sum per program: the memory-bound floor."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], x_ptr.dtype.element_ty)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def stream_read(buf: torch.Tensor, out: torch.Tensor):
    """A launcher reading all bytes of buf (a multiple of 8 bytes) once as int64 words, one program per
    element of out (int64)."""
    words = buf.reshape(-1).view(torch.int64)
    return lambda: _stream_read_kernel[(out.numel(),)](words, out, words.numel(), BLOCK=2048)


class Streamer:
    """Times streaming reads of a given byte count from one preallocated buffer."""

    def __init__(self, max_bytes: int):
        self.buf = torch.ones(max(1, max_bytes // 4), dtype=torch.int32, device="cuda")
        self.programs = 4 * torch.cuda.get_device_properties(0).multi_processor_count
        self.out = torch.empty(self.programs, dtype=torch.int32, device="cuda")

    def time_ms(self, nbytes: int) -> float:
        n = max(1, min(nbytes // 4, self.buf.numel()))
        grid = (min(self.programs, triton.cdiv(n, 4096)),)
        return median_ms(lambda: _stream_read_kernel[grid](self.buf, self.out, n, BLOCK=4096, num_warps=8))

    def print_peak(self) -> None:
        """Print the device and the bandwidth of reading the whole buffer."""
        nbytes = self.buf.numel() * 4
        peak = nbytes / (self.time_ms(nbytes) * 1e-3) / 1e9
        print(f"# {torch.cuda.get_device_name()}: streaming read of {nbytes / 2**30:g} GiB = {peak:,.0f} GB/s "
              "(plain Triton kernel)")


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def copy_time_ms(nbytes: int) -> float:
    """Time of a streaming copy reading and writing nbytes / 2 each (so nbytes are moved)."""
    n = max(1, nbytes // 8)  # int32 elements per side
    src = torch.empty(n, dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    block = 4096
    return time_ms(lambda: _copy_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block))


def print_copy_peak(nbytes: int = 256 << 20) -> float:
    """Print the device and the streaming-copy bandwidth at nbytes moved; return it in GB/s."""
    peak = nbytes / copy_time_ms(nbytes) / 1e6
    print(f"device: {torch.cuda.get_device_name()}; streaming copy peak {peak:.0f} GB/s ({nbytes >> 20} MiB moved)")
    return peak


# The columns `vs_copy` fills, for a table header.
COPY_HEADER = (f"{'bytes':>10s} {'time us':>9s} {'GB/s':>8s} {'copy us':>8s} {'x copy(same B)':>14s} "
               f"{'% copy peak':>11s}")


def vs_copy(nbytes: int, ms: float, peak: float) -> str:
    """The COPY_HEADER columns of a kernel that moved nbytes in ms, timing the copy of nbytes now."""
    cms = copy_time_ms(nbytes)
    return (f"{nbytes:10d} {ms * 1e3:9.2f} {nbytes / ms / 1e6:8.1f} {cms * 1e3:8.2f} {ms / cms:14.2f} "
            f"{100 * nbytes / ms / 1e6 / peak:10.1f}%")


# ---- tables and tile sweeps -----------------------------------------------------------------------------
def print_header(header: str) -> None:
    """A table's header line and a rule as wide."""
    print(header)
    print("-" * len(header))


# The drafting tables of the framework scripts (bench_vllm_drafting, bench_sglang_drafting).
DraftingRow = tuple[str, str, int, float, float, float]  # model, drafting, batch, accept len, tok/s, speed-up


def drafting_row(preset: str, spec: tuple[str, int] | None, batch: int, new: int, accept: float, seconds: float,
                 plain_seconds: float) -> DraftingRow:
    """One row: `spec` (method, k) or None without drafting; `batch` requests of `new` tokens took `seconds`,
    `plain_seconds` without drafting."""
    name = "none" if spec is None else f"{spec[0]} k={spec[1]}"
    return preset, name, batch, accept, batch * new / seconds, plain_seconds / seconds


def print_drafting_table(title: str, rows: list[DraftingRow]) -> None:
    print(title)
    print_header(f"{'model':<11} {'drafting':<11} {'batch':>5} {'accept len':>10} {'tok/s':>8} {'speed-up':>8}")
    for preset, name, b, accept, tps, speedup in rows:
        print(f"{preset:<11} {name:<11} {b:>5} {accept:>10.2f} {tps:>8.1f} {speedup:>7.2f}x")


def sweep_tiles(fn, module, configs: list[dict]) -> None:
    """Time fn with `module.tile_config` returning each of `configs` in turn (restored after each); print the
    configs the compiler rejects and the three fastest."""
    original = module.tile_config
    results = []
    for cfg in configs:
        label = " ".join(f"{k}={v}" for k, v in cfg.items())
        module.tile_config = lambda *a, _cfg=cfg, **k: dict(_cfg)
        try:
            results.append((time_ms(fn), label))
        except Exception as exc:  # a config the compiler rejects (e.g. registers)
            print(f"    {label}: {type(exc).__name__}")
        finally:
            module.tile_config = original
    results.sort(key=lambda r: r[0])
    print("    sweep best: " + ", ".join(f"{label}: {ms * 1e3:.2f} us" for ms, label in results[:3]))
