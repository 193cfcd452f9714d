"""Test-wide environment: offline, small engines, Triton's interpreter when there is no GPU.

Set here rather than in the shell so `make test` and a bare `pytest` behave the same; server
processes started by tests inherit these variables.
"""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
if not torch.cuda.is_available():
    # Read when @triton.jit decorates a kernel, so it must be set before kernel modules import.
    os.environ.setdefault("TRITON_INTERPRET", "1")
