"""The kernel tests pick their device as intended, proven on a CPU machine by collecting them (pytest
--collect-only, nothing runs) in a subprocess where CUDA is faked (`torch.cuda.is_available` -> True,
capability sm_90) and TRITON_INTERPRET is unset, as on a GPU:

* `v4_kernels.testing.DEVICES` is ["cuda"] alone: no test is parametrized onto "cpu", where a compiled
  kernel would be launched on CPU tensors;
* the modules that build inputs on the CPU call their kernels through `testing.on_device` wrappers;
* the real-shape cases (Flash and Pro heads, 4K-128K contexts, real expert dims) are collected and not
  skipped, while here (no CUDA) they skip;
* tests/test_dispatch.py keeps its CUDA part (not skipped) and skips its interpreter part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
import json, os, sys
import torch

torch.cuda.is_available = lambda: True
torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)
KERNEL_NAMES = ("sparse_attention", "index_scores", "index_topk", "select_topk", "pool_finish",
                "pool_finish_store", "store_main", "store_indexer", "load_main", "load_indexer")


def pytest_collection_modifyitems(session, config, items):
    from v4_kernels import testing
    out = {"devices": testing.DEVICES, "interpret": os.environ.get("TRITON_INTERPRET"), "items": [], "wrapped": {}}
    for item in items:
        skipped = any(m.args and m.args[0] is True for m in item.iter_markers("skipif")) or any(
            True for _ in item.iter_markers("skip"))
        params = getattr(getattr(item, "callspec", None), "params", {})
        out["items"].append({"id": item.nodeid, "skipped": skipped,
                             "params": [str(v) for v in params.values()]})
        names = {n: hasattr(getattr(item.module, n), "__wrapped__") for n in KERNEL_NAMES if hasattr(item.module, n)}
        out["wrapped"][item.module.__name__] = names
    with open(os.environ["V4_COLLECT_REPORT"], "w") as f:
        json.dump(out, f)
'''


@pytest.fixture(scope="module")
def fake_cuda_collection(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("fake_cuda")
    (tmp / "fake_cuda.py").write_text(PLUGIN)
    report = tmp / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp), env.get("PYTHONPATH", "")]), V4_COLLECT_REPORT=str(report))
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "fake_cuda", "-p",
                        "no:cacheprovider", "kernels", "tests/test_dispatch.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(report.read_text())


def _ran(report: dict, module: str) -> list[dict]:
    return [i for i in report["items"] if i["id"].startswith(module) and not i["skipped"]]


def test_fake_cuda_selects_cuda_only(fake_cuda_collection):
    report = fake_cuda_collection
    assert report["devices"] == ["cuda"] and report["interpret"] is None
    assert len(report["items"]) > 200
    assert not [i["id"] for i in report["items"] if "cpu" in i["params"]]
    assert any("cuda" in i["params"] for i in report["items"])


def test_cpu_built_inputs_go_through_on_device(fake_cuda_collection):
    wrapped = fake_cuda_collection["wrapped"]
    for module, names in (("test_sparse_attention", ["sparse_attention"]),
                          ("test_indexer", ["index_scores", "index_topk", "select_topk"]),
                          ("test_compressor", ["pool_finish", "pool_finish_store"]),
                          ("test_kv_store", ["store_main", "store_indexer", "load_main", "load_indexer"])):
        assert wrapped[module] == {n: True for n in names}, module


@pytest.mark.parametrize("module,cases", [
    ("kernels/sparse_attention/test_sparse_attention.py::test_gpu_real_contexts", 24),
    ("kernels/indexer/test_indexer.py::test_gpu_real_contexts", 12),
    ("kernels/fp4_moe/test_fp4_moe.py::test_gpu_real_shapes_bf16", 9),
    ("kernels/fp8_linear/test_fp8_linear.py::test_gpu_real_shapes_bf16", 24),
    ("kernels/mhc/test_mhc.py::test_gpu_real_shapes_bf16", 6),
])
def test_real_shapes_run_only_with_cuda(fake_cuda_collection, module, cases):
    ran = _ran(fake_cuda_collection, module)
    assert len(ran) == cases
    if module.startswith("kernels/sparse") or module.startswith("kernels/indexer"):
        ids = " ".join(i["id"] for i in ran)
        assert all(f"{k}k" in ids for k in (4, 32, 128)) and "flash" in ids and "pro" in ids
    if not torch.cuda.is_available():
        from v4_kernels import testing
        assert testing.DEVICES == ["cpu"] and testing.gpu_only.args[0] is True


def test_dispatch_keeps_its_cuda_part(fake_cuda_collection):
    ran = {i["id"].split("::")[1].split("[")[0] for i in _ran(fake_cuda_collection, "tests/test_dispatch.py")}
    assert ran == {"test_cuda_tiny_checkpoint_runs_every_op_on_its_kernel",
                   "test_cuda_real_flash_layers_run_every_op_on_its_kernel",
                   "test_served_weights_are_held_as_stored"}
