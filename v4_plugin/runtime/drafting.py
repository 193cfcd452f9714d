"""Speculative decoding in the core: DeepSeek-V4's two drafters and a greedy draft-then-verify loop.

Pure PyTorch over `V4Model`, one sequence at a time; the oracle for framework drafting.

* MTP (04-24 checkpoints, spec §10): the `mtp.0` block. Row t reads the target's pre-hc_head
  streams at t and the token at t+1 and predicts the token at t+2; its window cache has one row per
  target position. Drafting k tokens commits the newest row (target streams, the token the target
  just chose) and then feeds the MTP's own output streams back k-1 times on speculative rows that
  are dropped afterwards (`SequenceCache.truncate`).
* DSpark (-0731 / -0813 refreshes, refresh-checkpoints.md §3.1): S SWA-only decoder stages
  `mtp.0 ... mtp.{S-1}`. Context: for every target position, the hc-stream mean of the outputs of
  main layers `dspark_target_layer_ids`, concatenated [S*D], through `mtp.0.main_proj` and
  `mtp.0.main_norm` gives main_x [D]; each stage turns main_x into its own window KV (its wkv,
  kv_norm, RoPE at the position, KV storage rounding). A proposal is one block of k tokens at
  positions p ... p+k-1 (p = context length): the anchor (the token the target chose last) and
  k-1 `dspark_noise_token_id`s. Every block query attends to the last `sliding_window` context
  entries and to the whole block, both directions. After the last stage, its hc_head + norm and
  the shared head give base logits U [k, V]; the Markov head then picks left to right:
  draft_i = argmax(U_i + markov_w2 markov_w1[prev]), prev = anchor for i = 0, else draft_{i-1}.
  The confidence head gives sigmoid(w . [h_i ; markov_w1[prev_i]]) per draft (h_i = hc_head output).
* `speculative_generate`: prefill; then per step draft k, verify anchor + k drafts with one
  `V4Model.step`, keep the longest prefix of drafts the target agrees with plus the
  target's next token, truncate the target cache to it. Greedy, so it returns the tokens of
  `V4Model.generate`.

`plan_speculation` validates a request (drafter, num_speculative_tokens) against the checkpoint, with
errors that name the config fields; each adapter maps its framework's spellings of the drafter
(vLLM's `method`, SGLang's `--speculative-algorithm`) to a `Method` and adds its flags to the errors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from v4_plugin.checkpoint.config import LayerType, V4Config
from v4_plugin.runtime.model import Block, ModelOutput, V4Model
from v4_plugin.runtime import dispatch
from v4_plugin.runtime.ops.invariant import rows_times_transposed, sigmoid
from v4_plugin.runtime.ops.norm import rms_norm


class SpeculativeConfigError(ValueError):
    """A speculative-decoding request this checkpoint cannot serve; the message names the field.
    `suggested`: the drafter the checkpoint does carry, when the request named the other one (an adapter
    adds its framework's name for it)."""

    def __init__(self, message: str, suggested: Method | None = None):
        super().__init__(message)
        self.suggested = suggested


class Method(enum.Enum):
    MTP = "mtp"  # the 04-24 multi-token-prediction block
    DSPARK = "dspark"  # the refreshes' block drafter



@dataclass(frozen=True)
class SpeculativePlan:
    method: Method
    num_speculative_tokens: int  # k: drafts per step; the target verifies k + 1 tokens per sequence


def check_method(cfg: V4Config, method: Method) -> None:
    """Raise `SpeculativeConfigError` unless the checkpoint `cfg` describes carries this drafter."""
    if method is Method.MTP and cfg.dspark is not None:
        raise SpeculativeConfigError(
            f"{cfg.source}: speculative method 'mtp' needs the 04-24 MTP block, but this is a DSpark checkpoint "
            "(config has dspark_block_size/dspark_target_layer_ids; its mtp.* tensors are DSpark stages without "
            "e_proj/h_proj/enorm/hnorm). Use method 'dspark'", suggested=Method.DSPARK)
    if method is Method.MTP and not cfg.has_mtp:
        raise SpeculativeConfigError(
            f"{cfg.source}: speculative method 'mtp' needs an MTP block, but num_nextn_predict_layers is 0")
    if method is Method.DSPARK and cfg.dspark is None:
        raise SpeculativeConfigError(
            f"{cfg.source}: speculative method 'dspark' needs a DSpark checkpoint (-0731 / -0813: config fields "
            "dspark_block_size, dspark_noise_token_id, dspark_target_layer_ids, dspark_markov_rank), but this is a "
            "04-24 checkpoint with an MTP block. Use method 'mtp'", suggested=Method.MTP)


def plan_speculation(cfg: V4Config, method: Method, num_speculative_tokens: int | None = None) -> SpeculativePlan:
    """Validate a speculative request (the drafter `method`, drafts per step) against the checkpoint.

    `num_speculative_tokens` defaults to `dspark_block_size` (DSpark) or `num_nextn_predict_layers`
    (MTP); DSpark drafts one block per step, so more than `dspark_block_size` is refused.
    """
    chosen = Method(method)
    check_method(cfg, chosen)
    k = num_speculative_tokens
    if k is None:
        k = cfg.dspark.block_size if chosen is Method.DSPARK else cfg.num_nextn_predict_layers
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SpeculativeConfigError(f"num_speculative_tokens must be a positive int, got {k!r}")
    if chosen is Method.DSPARK and k > cfg.dspark.block_size:
        raise SpeculativeConfigError(
            f"{cfg.source}: num_speculative_tokens = {k} exceeds dspark_block_size = {cfg.dspark.block_size}: "
            "the DSpark drafter proposes at most one block per step")
    return SpeculativePlan(chosen, k)


class Drafter(Protocol):
    """One sequence's drafter, driven by `speculative_generate`."""

    capture: tuple[int, ...]  # main layer ids whose output streams `observe` reads (`ModelOutput.captured`)

    def observe(self, token_ids: torch.Tensor, out: ModelOutput, next_token: int) -> None:
        """The target accepted `token_ids` [n] (its step output for them is `out`) and chose `next_token`."""

    def propose(self, k: int) -> list[int]:
        """k draft tokens following `next_token`."""


def rows(out: ModelOutput, n: int) -> ModelOutput:
    """The first n rows of a step's output (logits, streams and captured streams)."""
    return ModelOutput(out.logits[:n], out.streams[:n], {i: c[:n] for i, c in out.captured.items()})


class MTPDrafter:
    """The 04-24 MTP block as a drafter (depth 0 reused for every draft, as vLLM does)."""

    capture: tuple[int, ...] = ()

    def __init__(self, model: V4Model):
        check_method(model.cfg, Method.MTP)
        self.model = model
        self.cache = model.new_mtp_cache()  # one committed row per target position
        self._newest: ModelOutput | None = None  # MTP output of the newest committed row

    @torch.inference_mode()
    def observe(self, token_ids: torch.Tensor, out: ModelOutput, next_token: int) -> None:
        """Commit the rows of the accepted positions: target streams at t, token at t+1."""
        next_ids = torch.cat((token_ids[1:], torch.tensor([next_token], device=token_ids.device)))
        self._newest = self.model.mtp_step(out.streams, next_ids, self.cache)

    @torch.inference_mode()
    def propose(self, k: int) -> list[int]:
        newest = self._newest
        drafts = [int(newest.logits[-1].argmax())]
        if k > 1:
            committed, streams = self.cache.num_tokens, newest.streams[-1:]
            for _ in range(k - 1):
                out = self.model.mtp_step(streams, torch.tensor([drafts[-1]]), self.cache)
                drafts.append(int(out.logits[-1].argmax()))
                streams = out.streams
            self.cache.truncate(committed)
        return drafts


@dataclass
class DSparkDraft:
    tokens: list[int]  # k drafts
    logits: torch.Tensor  # fp32 [k, vocab]: base logits + Markov bias, the rows the drafts are argmaxes of
    confidence: torch.Tensor  # fp32 [k]: the confidence head's acceptance estimate per draft


def dspark_features(cfg: V4Config, captured: dict[int, torch.Tensor]) -> torch.Tensor:
    """What a DSpark drafter reads of the target, per target row: the hc-stream means of the captured
    outputs (layer id -> [T, hc, D]) of main layers `dspark_target_layer_ids`, concatenated [T, S*D].
    Weight-free, so the target computes it and hands it over (SGLang passes it as hidden states)."""
    return torch.cat([captured[i].mean(dim=1) for i in cfg.dspark.target_layer_ids], dim=-1)


def draft_layer_types(cfg: V4Config) -> tuple[LayerType, ...]:
    """The blocks of the checkpoint's drafter that keep a window cache beside the main layers when a
    framework drafts one step at a time: the DSpark stages (a context window each) or the MTP block
    (depth 0, reused for every draft)."""
    blocks = cfg.dspark.num_stages if cfg.dspark is not None else 1
    return tuple(cfg.layer_type(cfg.num_hidden_layers + k) for k in range(blocks))


class DSparkHead:
    """The DSpark drafter's math, stateless (see the module docstring): context KV from the target's
    `dspark_features`, and one drafted block over given context KV. `DSparkDrafter` keeps one sequence's
    context in rings; `paged.dspark_context_paged` / `dspark_blocks_paged` keep it in paged caches."""

    def __init__(self, model: V4Model):
        cfg = model.cfg
        check_method(cfg, Method.DSPARK)
        self.model, self.cfg, self.dspark = model, cfg, cfg.dspark
        n, stages = cfg.num_hidden_layers, cfg.dspark.num_stages
        self.stages = [Block(cfg, model.w, f"mtp.{k}", n + k, model.quant, model.collectives)
                       for k in range(stages)]
        self.capture = tuple(cfg.dspark.target_layer_ids)
        self.last = f"mtp.{stages - 1}."  # the stage whose hc_head and norm finish a block
        # The Markov head in fp32, once (every draft step reads it): embeddings w1 and output w2, [V, R] each.
        self.markov_w1 = model.w(f"{self.last}markov_head.markov_w1.weight").float()
        self.markov_w2 = model.w(f"{self.last}markov_head.markov_w2.weight").float()

    def main_x(self, features: torch.Tensor) -> torch.Tensor:
        """`dspark_features` [T, S*D] -> context vectors [T, D]: main_norm(main_proj(features))."""
        w, eps = self.model.w, self.cfg.rms_norm_eps
        x = dispatch.linear(features, w.linear("mtp.0.main_proj.weight"), self.stages[0].act_q)
        return rms_norm(x, w("mtp.0.main_norm.weight"), eps)

    def context_kv(self, features: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """Per stage, the context KV entries [T, d] of the target rows at `positions` (int64 [T])."""
        main_x = self.main_x(features)
        return [stage.window_kv(main_x, positions) for stage in self.stages]

    def _block_attention(self, stage: Block, context: torch.Tensor, u: torch.Tensor,
                         positions: torch.Tensor) -> torch.Tensor:
        """Block queries u [k, D] over the context entries [n, d] and the whole block -> [k, D]."""
        _, q = stage.query(u, positions)
        kv = torch.cat((context, stage.window_kv(u, positions)))
        indices = torch.arange(kv.shape[0], device=kv.device).expand(u.shape[0], -1)  # every entry, every query
        return stage.attend(q, kv, indices, positions)

    @torch.no_grad()
    def block_hidden(self, anchor: int, position: int, contexts: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """The block after `anchor`, the token at `position` (not yet in the context), through the stages:
        its hc_head outputs [k, D] (row i gives draft i's base logits). contexts: per stage, the KV of the
        last min(position, sliding_window) positions before it, oldest first [n, d]."""
        if not 1 <= k <= self.dspark.block_size:
            raise SpeculativeConfigError(f"DSpark drafts 1 ... dspark_block_size = {self.dspark.block_size} tokens, "
                                         f"not {k}")
        model, device = self.model, contexts[0].device
        ids = torch.tensor([anchor] + [self.dspark.noise_token_id] * (k - 1), device=device)
        positions = torch.arange(position, position + k, device=device)
        x = model.input_streams(ids)
        for stage, context in zip(self.stages, contexts):
            x = stage.forward(x, ids, lambda u, s=stage, c=context: self._block_attention(s, c, u, positions))
        return model.head_hidden(x, self.last)

    def markov_logits(self, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """The draft logits fp32 [n, V] of block rows `hidden` [n, D] after tokens `prev` (int64 [n]): the
        rows' base logits plus the Markov head's bias markov_w2 . markov_w1[prev]."""
        return self.model.head_logits(hidden, self.last) + rows_times_transposed(self.markov_w1[prev], self.markov_w2)

    @torch.no_grad()
    def draft(self, anchor: int, position: int, contexts: Sequence[torch.Tensor], k: int) -> DSparkDraft:
        """Propose k <= dspark_block_size tokens after `anchor` (`block_hidden`'s arguments): one parallel
        block through the stages, then the Markov head left to right."""
        hidden = self.block_hidden(anchor, position, contexts, k)
        prev, tokens, logits = anchor, [], []
        for i in range(k):
            row = self.markov_logits(hidden[i:i + 1], torch.tensor([prev], device=hidden.device))[0]
            prev = int(row.argmax())
            tokens.append(prev)
            logits.append(row)
        prevs = torch.tensor([anchor] + tokens[:-1], device=hidden.device)
        features = torch.cat((hidden.float(), self.markov_w1[prevs]), dim=-1)
        confidence = self.model.w(f"{self.last}confidence_head.proj.weight").float()
        return DSparkDraft(tokens, torch.stack(logits), sigmoid(rows_times_transposed(features, confidence)).squeeze(-1))


class DSparkDrafter:
    """The DSpark drafter of a refresh checkpoint for one sequence, its context in one ring per stage."""

    def __init__(self, model: V4Model):
        self.head = DSparkHead(model)
        self.cfg, self.capture = model.cfg, self.head.capture
        # Per stage: the context KV of position t in slot t mod window.
        self.context = [torch.zeros(self.cfg.sliding_window, self.cfg.head_dim, dtype=model.dtype)
                        for _ in self.head.stages]
        self.num_context = 0
        self.anchor: int | None = None

    @torch.inference_mode()
    def observe(self, token_ids: torch.Tensor, out: ModelOutput, next_token: int) -> None:
        """Write each stage's context KV for the accepted positions; `next_token` is the next anchor."""
        win = self.cfg.sliding_window
        positions = torch.arange(self.num_context, self.num_context + token_ids.shape[0])[-win:]
        features = dspark_features(self.cfg, out.captured)[-win:]
        for ring, kv in zip(self.context, self.head.context_kv(features, positions)):
            ring[positions % win] = kv
        self.num_context += token_ids.shape[0]
        self.anchor = next_token

    def propose(self, k: int) -> list[int]:
        return self.draft(k).tokens

    def draft(self, k: int) -> DSparkDraft:
        """Propose k <= dspark_block_size tokens after the anchor."""
        if self.anchor is None:
            raise ValueError("DSparkDrafter.draft: observe() the target's first step before drafting")
        p, win = self.num_context, self.cfg.sliding_window
        window = torch.arange(max(0, p - win), p) % win
        return self.head.draft(self.anchor, p, [ring[window] for ring in self.context], k)


class ReplayDrafter:
    """Proposes a known continuation of the prompt (e.g. the plain greedy output): every draft is
    accepted, so each step emits k+1 tokens. The upper bound for tests and benchmarks."""

    capture: tuple[int, ...] = ()

    def __init__(self, prompt_len: int, continuation: Sequence[int]):
        self.prompt_len, self.continuation = prompt_len, list(continuation)
        self.position = 0  # of the token the target chose last

    def observe(self, token_ids: torch.Tensor, out: ModelOutput, next_token: int) -> None:
        self.position += len(token_ids)

    def propose(self, k: int) -> list[int]:
        start = self.position - self.prompt_len + 1
        return (self.continuation[start : start + k] + [0] * k)[:k]  # past the end: anything


@dataclass
class SpeculativeOutput:
    tokens: list[int]  # the new tokens (those of `V4Model.generate` for the same arguments)
    accepted: list[int] = field(default_factory=list)  # per verify step: drafts the target agreed with (0 ... k)

    @property
    def acceptance_length(self) -> float:
        """Mean tokens emitted per verify step (accepted drafts + the target's own token); 0 without steps."""
        return sum(a + 1 for a in self.accepted) / len(self.accepted) if self.accepted else 0.0


@torch.inference_mode()
def speculative_generate(model: V4Model, drafter: Drafter, prompt_ids: Sequence[int], max_new_tokens: int,
                         k: int, stop_ids: tuple[int, ...] = ()) -> SpeculativeOutput:
    """Greedy decoding with drafting: each step verifies the anchor and k drafts in one `step` of k+1 tokens.

    The target keeps the longest prefix of drafts equal to its own argmax choices, then its argmax
    after them; the cache is truncated to the kept tokens (`SequenceCache.truncate`). Returns
    the same tokens as `model.generate(prompt_ids, max_new_tokens, stop_ids)`.
    """
    cache = model.new_cache()
    ids = torch.tensor(list(prompt_ids))
    out = model.step(ids, cache, drafter.capture)
    token = int(out.logits[-1].argmax())
    result = SpeculativeOutput([token])
    while len(result.tokens) < max_new_tokens and not set(result.tokens) & set(stop_ids):
        drafter.observe(ids, out, token)
        drafts = drafter.propose(k)
        ids, kept = torch.tensor([token] + drafts), cache.num_tokens
        out = model.step(ids, cache, drafter.capture)
        choices = out.logits.argmax(dim=-1).tolist()  # the target's token after each of ids
        j = 0
        while j < k and drafts[j] == choices[j]:
            j += 1
        cache.truncate(kept + j + 1)
        ids, out, token = ids[: j + 1], rows(out, j + 1), choices[j]
        result.tokens += drafts[:j] + [token]
        result.accepted.append(j)
    tokens = result.tokens[:max_new_tokens]
    for i, t in enumerate(tokens):
        if t in stop_ids:
            tokens = tokens[: i + 1]
            break
    result.tokens = tokens
    return result
