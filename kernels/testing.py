"""Scaffolding shared by the kernel tests (`kernels/<op>/test_<op>.py`), importable as `v4_kernels.testing`.

Importing this module imports no kernel module, compiles nothing and leaves TRITON_INTERPRET alone:
each test file still sets TRITON_INTERPRET itself (when there is no GPU) before it imports its
kernel, because @triton.jit reads it when it decorates.

* `DEVICE` / `DEVICES`: where the kernels run: "cuda" when there is a GPU (compiled kernels), else the
  interpreter on "cpu". One device, never both: a compiled kernel launched on CPU tensors fails.
* `ON_GPU`, `gpu_only`: the cases at real shapes (Flash / Pro heads, 4K-128K contexts) that only a GPU
  runs in test time; `interpreter_only`: cases about the interpreter's own emulation.
* `on_device(fn)`: fn with its tensor arguments moved to DEVICE (and written back) and its tensor
  results moved to the CPU, for tests that build their inputs and references on the CPU.
* `one_cpu_thread`: an autouse fixture; a test module opts in by importing it.
* `dtype_id`: pytest ids for torch dtype parameters.
* `assert_close`: |actual - expected| <= atol + rtol |expected| elementwise, evaluated in fp64
  (torch.testing.assert_close imports torch.distributed.tensor on first use: seconds per run).
* `sm90_compile_check`, `compile_for_sm90`, `run_compile_check`: the opt-in check that the kernels
  compile for a real GPU (sm_90) without one; the interpreter accepts tiles a GPU compiler rejects.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DEVICES = [DEVICE]  # as a parametrization, so that the test ids name the device

gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs CUDA (compiled kernels, real shapes)")
interpreter_only = pytest.mark.skipif(ON_GPU, reason="checks the Triton interpreter's emulation")


def _to(value, device: str):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        moved = [_to(v, device) for v in value]
        return value if all(m is v for m, v in zip(moved, value)) else type(value)(moved)
    return value


def on_device(fn: Callable) -> Callable:
    """`fn` run on DEVICE. A call with CPU tensor arguments (also inside tuples / lists) runs on copies of
    them on DEVICE; the CPU tensors it changed get the new values back (caches written in place) and its
    tensor results come back to the CPU. A call whose tensors are all on DEVICE, and every call on the
    CPU (the interpreter), is `fn` itself."""
    if DEVICE == "cpu":
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        names = list(range(len(args))) + list(kwargs)
        originals = list(args) + list(kwargs.values())
        moved = [_to(v, DEVICE) for v in originals]
        if not any(m is not o for m, o in zip(moved, originals)):
            return fn(*args, **kwargs)
        out = fn(*moved[: len(args)], **dict(zip(names[len(args):], moved[len(args):])))
        for original, copy in zip(originals, moved):
            if isinstance(original, torch.Tensor) and copy is not original and not torch.equal(original, copy.cpu()):
                original.copy_(copy.cpu())
        return _to(out, "cpu")

    return run


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Interpreted kernels are single-threaded NumPy; one torch thread avoids OpenMP spin-waits on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dtype_id(v):
    """`ids=` for pytest.mark.parametrize: "float32" / "bfloat16" for dtypes, pytest's own id otherwise."""
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else None


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float,
                 atol: float | torch.Tensor) -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise, same shape; any NaN fails.

    `atol` may be a tensor broadcasting against `expected` (a per-element error scale). Raises
    AssertionError itself (no `assert`), so the check also holds where pytest does not rewrite asserts.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    a, e = actual.double(), expected.double()
    if a.isnan().any() or e.isnan().any():
        raise AssertionError("NaN in actual or expected")
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())
    if bad.any():
        raise AssertionError(f"{int(bad.sum())}/{bad.numel()} outside atol + rtol |expected| (rtol={rtol}); "
                             f"max abs err {err.max():.3g}")


# ---- GPU legality without a GPU -------------------------------------------------------------------
def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def sm90_compile_check(test):
    """Mark a test that compiles kernels for sm_90: opt-in (V4_KERNELS_COMPILE_CHECK=1) and needs ptxas."""
    opt_in = pytest.mark.skipif(
        os.environ.get("V4_KERNELS_COMPILE_CHECK") != "1",
        reason="set V4_KERNELS_COMPILE_CHECK=1 (about 10-30 s: a subprocess compiles for sm_90)")
    ptxas = pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's NVIDIA backend (ptxas)")
    return opt_in(ptxas(test))


def compile_for_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4) -> None:
    """Compile one @triton.jit kernel for sm_90 (no GPU needed); raises where the GPU compiler rejects it.

    `signature` names the runtime arguments' types ("*fp32", "i32", ...); `constexprs` the rest.
    Meant for the script `run_compile_check` runs, where TRITON_INTERPRET is unset.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})


def run_compile_check(script: str) -> None:
    """Run `script` (which calls `compile_for_sm90`) in a fresh interpreter without TRITON_INTERPRET
    (the kernel modules must be imported anew, as GPU kernels) and assert that it got to the end."""
    code = 'import os\nos.environ.pop("TRITON_INTERPRET", None)\n' + textwrap.dedent(script) + '\nprint("compiled")\n'
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if not (r.returncode == 0 and "compiled" in r.stdout):
        raise AssertionError(r.stderr[-4000:])
