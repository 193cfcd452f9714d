"""DeepSeek-V4 for SGLang, served by the core's `V4Model` over SGLang's memory pools.

The class holds the checkpoint as the core loader returns it (FP8 / FP4 linears as stored, the rest in
the model dtype, under the official tensor names) and runs every step through `v4_plugin.runtime.paged.streams_paged`;
the `v4_plugin` attention backend supplies the batch plan and the per-layer paged caches. Under
`--tp-size N` each rank holds its slices of the checkpoint and the core model runs with the collectives
of SGLang's tensor-parallel group (`sglang_backend.parallel`); every rank runs every step, over its own
copy of the caches.

Two names, one implementation: `DeepseekV4PluginForCausalLM` (what SGLang sees once the plugin
renames the architecture) and `DeepseekV4ForCausalLM` (the checkpoint's own name: as part of the
external model package it wins the registry over SGLang's native class).

For SGLang's EAGLE worker (`sglang_backend.speculative`) the model hands the draft what it reads
(`LogitsProcessorOutput.hidden_states`): the flat pre-hc_head streams [T, hc*D] for the MTP block
(`deepseek_v4_mtp`, as SGLang's native V4 NEXTN reads them), or the `dspark_features` [T, S*D] of a
DSpark checkpoint's target layers (`deepseek_v4_dspark`); it shares its embedding and head
(`get_embed_and_head`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from sglang_backend import BACKEND_NAME, NATIVE_ARCH, PROJECT, __version__
from sglang_backend.parallel import describe, rank_parallelism
from v4_plugin.cache.formats import EXACT, CacheFormat
from v4_plugin.checkpoint.config import load_config
from v4_plugin.checkpoint.loader import load_checkpoint
from v4_plugin.runtime import dispatch
from v4_plugin.runtime.drafting import dspark_features
from v4_plugin.runtime.model import V4Model
from v4_plugin.runtime.paged import streams_paged
from v4_plugin.runtime.warmup import warm_up
from v4_plugin.serving.settings import Settings, quant_sim, register_tensors, resolve_model_dir

logger = logging.getLogger("sglang_backend")


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def implementation() -> str:
    """Which kernels run the core's math in this process (`v4_plugin.runtime.dispatch`): 'triton' on a GPU
    where the kernels load, else 'torch'."""
    return dispatch.backend_name(device_type())


def startup_line(backend: str, rank: str = "") -> str:
    """The line every rank logs when it builds the model (`rank`: `sglang_backend.parallel.describe`)."""
    return (f"{PROJECT} {__version__}: serving {NATIVE_ARCH} with the {backend} attention backend "
            f"({implementation()}){rank}")


def _configured_backend() -> str:
    try:
        from sglang.srt.runtime_context import attention_backends

        names = [b for b in attention_backends() if b]
        return names[0] if names else BACKEND_NAME
    except Exception:  # noqa: BLE001
        return BACKEND_NAME


class DeepseekV4PluginForCausalLM(nn.Module):
    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        self.config = config
        self.model_dir = Path(getattr(config, "_name_or_path", "") or ".")
        self.dtype = torch.get_default_dtype()  # SGLang sets the model dtype around construction
        self.cfg = load_config(self._resolved_dir())
        self.settings = Settings.from_env()
        # The pool, and with it the cache format, is built after the weights: until the first step the
        # model simulates as over exact caches; `_bind_cache_format` settles both, once.
        self.fmt: CacheFormat | None = None
        self.quant = quant_sim(EXACT, self.settings)
        self.ref = None  # V4Model, built in load_weights
        # This rank's slices and the collectives of its tensor-parallel group (`sglang_backend.parallel`).
        self.parallelism, self.collectives = rank_parallelism()
        logger.info(startup_line(_configured_backend(), describe(self.parallelism, self.collectives)))

    def _resolved_dir(self) -> Path:
        """The checkpoint directory (a hub id: the snapshot SGLang downloaded)."""
        return resolve_model_dir(self.model_dir, local_files_only=True)

    def get_attention_sliding_window_size(self) -> int:
        """SGLang's sliding window (positions kept in the SWA pool before a step's first token)."""
        return self.cfg.sliding_window

    # ---- weights --------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load through the core: validated, dequantized, official names (`CheckpointError` names the
        tensor and shard). SGLang's raw file iterator is not consumed."""
        tensors = self._load_tensors()
        register_tensors(self, tensors)
        self.tensors = tensors
        self.ref = V4Model(self.cfg, tensors, dtype=self.dtype, quant=self.quant, collectives=self.collectives)
        warm_up(self.ref, CacheFormat())  # decode-shape kernels on GPUs (logged; the pool's format comes later)

    def _load_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors this model holds: the main model's (mtp.* skipped), this rank's slices of
        them; FP8/FP4 linears as stored (`dispatch.keep_quantized`)."""
        return load_checkpoint(self._resolved_dir(), self.cfg, dtype=self.dtype, include_mtp=False,
                               keep_quantized=dispatch.keep_quantized(device_type()), device=device_type(),
                               parallelism=self.parallelism, rank=self.collectives.rank)

    def _bind_cache_format(self, fmt: CacheFormat) -> None:
        """At the first step, the pool's cache format and the quantization simulation that matches it
        (`v4_plugin.serving.settings.quant_sim`: a quantized cache holds simulated values, so storing
        never rounds twice); the core model is rebuilt if its simulation differs."""
        self.fmt = fmt
        self.quant = quant_sim(fmt, self.settings)
        if self.quant != self.ref.quant:
            logger.info("deepseek-v4-plugin: %s storage -> model quantization %s", fmt, self.quant)
            self.ref = V4Model(self.cfg, self.tensors, dtype=self.dtype, quant=self.quant,
                               collectives=self.collectives)

    def get_embed_and_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding and output head SGLang's EAGLE worker shares with the draft model."""
        return self.tensors["embed.weight"], self.tensors["head.weight"]

    # ---- forward --------------------------------------------------------------------------------
    HEAD_PREFIX = ""  # the head that finishes this model's streams (`V4Model.logits`)

    @torch.no_grad()  # not inference_mode: SGLang's sampler scales the logits in place
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch, input_embeds=None,
                **kwargs):
        from sglang.srt.model_executor.forward_context import get_attn_backend

        backend = get_attn_backend()
        meta = getattr(backend, "forward_metadata", None)
        if meta is None:  # idle batch
            return idle_output(self.cfg.vocab_size, input_ids.device)
        if self.fmt is None:
            self._bind_cache_format(backend.token_to_kv_pool.st.cache_format())
        return self._output(self.ref, input_ids.to(torch.long), forward_batch, meta, self.fmt)

    def _output(self, ref, input_ids: torch.Tensor, forward_batch, meta, fmt):
        """SGLang's `LogitsProcessorOutput` of a step with tokens (`meta`: the backend's plan and caches)."""
        streams, hidden = self._step(ref, input_ids, forward_batch, meta, fmt)
        return step_output(lambda rows: ref.logits(rows, self.HEAD_PREFIX), streams, hidden, forward_batch, meta)

    def _step(self, ref, input_ids: torch.Tensor, forward_batch, meta, fmt) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's pre-hc_head streams [T, hc, D] (the main layers over the paged caches) and what a
        draft model reads of them [T, W]: the flat streams (MTP) or, when a DSpark checkpoint drafts,
        the `dspark_features` of its target layers."""
        drafting = forward_batch.spec_algorithm is not None and not forward_batch.spec_algorithm.is_none()
        if self.cfg.dspark is not None and drafting:
            capture = self.cfg.dspark.target_layer_ids
            streams, captured = streams_paged(ref, input_ids, meta.plan, meta.caches, fmt, capture)
            return streams, dspark_features(self.cfg, captured)
        streams = streams_paged(ref, input_ids, meta.plan, meta.caches, fmt)[0]
        return streams, streams.flatten(1)


def idle_output(vocab_size: int, device: torch.device):
    """SGLang's `LogitsProcessorOutput` of an idle batch (no tokens)."""
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    return LogitsProcessorOutput(next_token_logits=torch.zeros(0, vocab_size, device=device))


def step_output(head: Callable[[torch.Tensor], torch.Tensor], streams: torch.Tensor, hidden: torch.Tensor,
                forward_batch, meta):
    """SGLang's `LogitsProcessorOutput` of one step from its pre-hc_head streams [T, hc, D]; `head` maps
    streams to fp32 logits. A prefill chunk (extend) yields the logits of each sequence's last token
    (only those rows go through the head); speculative steps (verify, draft extend, draft decode) those
    of every token. Hidden states, the rows of `hidden` [T, W] the step's capture mode asks for."""
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    mode, capture = forward_batch.forward_mode, forward_batch.capture_hidden_mode
    last_only = mode.is_extend() and not mode.is_target_verify()
    captured = None
    if capture is not None and capture.need_capture():
        captured = hidden if capture.is_full() else hidden[meta.last_index]
    return LogitsProcessorOutput(next_token_logits=head(streams[meta.last_index] if last_only else streams),
                                 hidden_states=captured)


class DeepseekV4ForCausalLM(DeepseekV4PluginForCausalLM):
    """The checkpoint's own architecture name (wins SGLang's registry through the external package)."""


EntryClass = [DeepseekV4PluginForCausalLM, DeepseekV4ForCausalLM]
