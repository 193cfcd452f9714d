"""vLLM adapter of deepseek-v4-plugin: registration, model class, KV-cache specs and metadata.

Thin by design: no V4 math lives here. The model math is the core's (`v4_plugin.runtime.model` /
`v4_plugin.runtime.paged`); this package tells vLLM what to allocate and hands vLLM's block tables and
cache tensors to the core. `vllm_backend.plugin:register` is the `vllm.general_plugins` entry point.
`vllm_backend.capacity` (no vLLM import: `v4-plugin kv-plan` uses it) holds the block sizes, vLLM's
drafter names and the model of vLLM's KV capacity; the serving switches are the core's
(`v4_plugin.serving.settings`).
"""
