"""The `config.json` class vLLM uses for `model_type` deepseek_v4, extended to the transformers dialect.

vLLM maps `model_type` deepseek_v4 to its own `DeepseekV4Config` (kept: its tokenizer, renderer and
parsers key on it). A checkpoint written by transformers' `save_pretrained` carries
`mlp_layer_types` = hash_moe/moe, which transformers' generic `PreTrainedConfig` validator rejects
(it allows only sparse/dense), so vLLM could not even read such a config. This subclass keeps that
list under another name; the model itself reads its hyperparameters with the core's `load_config`.
"""

from __future__ import annotations

from vllm.transformers_utils.configs.deepseek_v4 import DeepseekV4Config as _VllmDeepseekV4Config


class DeepseekV4PluginHFConfig(_VllmDeepseekV4Config):
    model_type = "deepseek_v4"

    def __init__(self, **kwargs):
        mlp_layer_types = kwargs.pop("mlp_layer_types", None)
        if mlp_layer_types is not None:
            kwargs["v4_mlp_layer_types"] = list(mlp_layer_types)
        super().__init__(**kwargs)
