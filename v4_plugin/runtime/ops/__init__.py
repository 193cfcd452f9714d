"""The DeepSeek-V4 math as plain functions over tensors (pure PyTorch, any device).

Each module holds one component; `V4Model` composes them, the kernels are tested against
them, and the framework adapters call them (through the kernel dispatch layer) instead of
re-deriving any formula.
"""
