"""The checkpoint: `config.json` (both dialects), the tensor inventory, the FP8 / FP4 / E8M0 number
formats, loading and validating the safetensors files, and tiny checkpoints in the real format."""
