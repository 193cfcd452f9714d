"""Triton kernels for DeepSeek-V4, importable as `v4_kernels` (the name `kernels` belongs to a dependency).

Each kernel sits beside its test; its reference is the core's function in `v4_plugin`.
"""
