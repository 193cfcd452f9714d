"""SGLang's external model package for DeepSeek-V4 (`SGLANG_EXTERNAL_MODEL_PACKAGE=sglang_backend.models`).

SGLang imports every top-level module here and registers each `EntryClass` under its class name.
Keep this package flat and its imports light: an import error here is swallowed by SGLang.
"""
