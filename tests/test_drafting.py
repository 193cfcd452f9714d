"""Speculative decoding in the core: rejected drafts dropped exactly, drafting == the drafters' reference, greedy output unchanged.

Everything runs on the tiny checkpoints in fp32 with the quantization simulation off, so tolerances
can compare against the whole-sequence forward (whose summation order differs); that a verify step's
rows are bit-identical to plain steps' with it on is test_row_invariance.py's. Positions are chosen around the 4- and 128-token block edges (the window is 128 too).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from v4_plugin.checkpoint.config import parse_config
from v4_plugin.runtime.drafting import (DSparkDrafter, DSparkHead, Method, MTPDrafter, ReplayDrafter, SpeculativeConfigError,
                                dspark_features, plan_speculation, speculative_generate)
from v4_plugin.runtime.model import V4Model, SequenceCache
from v4_plugin.checkpoint.quant import QuantSim
from v4_plugin.runtime.paged import BatchPlan, dspark_blocks_paged, dspark_context_paged, dspark_draft_paged, mtp_streams_paged, streams_paged
from v4_plugin.cache.formats import COMPRESSED_CACHES, EXACT
from v4_plugin.checkpoint.tiny import TINY_PRESETS, random_weights
from sglang_backend.capacity import plan_sglang_speculation
from vllm_backend.capacity import plan_vllm_speculation

from paged_engine import TinyEngine
from recording import recording

TOL = dict(atol=2e-4, rtol=1e-4)
STATE_TOL = dict(atol=1e-5, rtol=1e-5)
K = 5  # drafts per step: the target verifies K + 1 tokens
EDGES = [3, 4, 5, 8, 127, 128, 129, 255, 256]


@pytest.fixture(scope="module")
def models() -> dict[str, V4Model]:
    out = {}
    for preset in ("flash", "pro", "flash-0731"):
        cfg = parse_config(TINY_PRESETS[preset], f"tiny-{preset}")
        out[preset] = V4Model(cfg, random_weights(cfg, seed=0), quant=QuantSim.off())
    return out


def _ids(n: int, seed: int, vocab: int = 384) -> torch.Tensor:
    return torch.randint(2, vocab - 1, (n,), generator=torch.Generator().manual_seed(seed))


def _assert_same_cache(got: SequenceCache, want: SequenceCache) -> None:
    """The entries of the kept tokens are equal in every cache (rows past them are never read)."""
    n = want.num_tokens
    assert got.num_tokens == n
    for g, w, kind in zip(got.layers, want.layers, want.kinds, strict=True):
        for name, cache in vars(w).items():
            if cache is not None:
                rows = n // kind.ratio if name in COMPRESSED_CACHES else n
                torch.testing.assert_close(getattr(g, name).data[0, :rows], cache.data[0, :rows], **STATE_TOL)


# ---- rejected drafts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_truncate_equals_stepping_only_the_kept_tokens(models, preset):
    """Verify K+1 tokens (the first j+1 true, the rest wrong) at every block edge, keep j+1: window,
    compressor rows (blocks of 4 and 128), compressed entries and indexer keys equal a cache that
    stepped only the kept tokens, and the continuation's logits equal the whole-sequence forward."""
    model = models[preset]
    ids = _ids(300, seed=7)
    full = model.forward(ids).logits
    cache, done = model.new_cache(), 0
    for p in EDGES:
        model.step(ids[done:p], cache)
        done = p
        for j in (0, 2, K):
            wrong = (ids[p + j + 1 : p + K + 1] + 1) % model.cfg.vocab_size
            trial = copy.deepcopy(cache)
            model.step(torch.cat((ids[p : p + j + 1], wrong)), trial)
            trial.truncate(p + j + 1)
            kept = copy.deepcopy(cache)
            model.step(ids[p : p + j + 1], kept)
            _assert_same_cache(trial, kept)
            after = model.step(ids[p + j + 1 : p + j + 10], trial).logits
            torch.testing.assert_close(after, full[p + j + 1 : p + j + 10], **TOL)


def test_truncate_keeps_at_most_what_was_stepped(models):
    cache = models["flash"].new_cache()
    models["flash"].step(_ids(7, seed=3), cache)
    with pytest.raises(ValueError, match=r"can keep 0 ... 7 tokens, not 8"):
        cache.truncate(8)
    cache.truncate(0)
    assert cache.num_tokens == 0


def test_paged_cache_needs_no_rollback(models):
    """`forward_paged` indexes every cache by position / entry number: a rejected suffix is overwritten
    before anything reads it. Two sequences verify K+1 tokens per step (wrong tails, 0 ... K accepted)
    in one batch and go on from the kept tokens; every kept row equals the whole-sequence forward."""
    model = models["flash"]
    seqs = [_ids(280, seed=11), _ids(200, seed=12)]
    full = [model.forward(s).logits for s in seqs]
    engine = TinyEngine(model, EXACT, 2, 300)
    done = [125, 2]
    engine.step([(s, seqs[s][: done[s]], 0) for s in range(2)])
    step = 0
    while all(d + K + 1 <= len(s) for d, s in zip(done, seqs)):
        keep = [(step + s) % (K + 1) for s in range(2)]  # accepted drafts this step
        chunks = []
        for s, seq in enumerate(seqs):
            p, j = done[s], keep[s]
            chunks.append((s, torch.cat((seq[p : p + j + 1], (seq[p + j + 1 : p + K + 1] + 1) % 384)), p))
        for s, logits in enumerate(engine.step(chunks)):
            p, j = done[s], keep[s]
            torch.testing.assert_close(logits[: j + 1], full[s][p : p + j + 1], **TOL)
            done[s] = p + j + 1
        step += 1
    assert done[0] > 256 and step > 20


# ---- drafting -------------------------------------------------------------------------------------
class CopyTarget(ReplayDrafter):
    """Proposes the plain greedy continuation, wrong at one draft index per step (`wrong_at(step)`,
    >= k: none), so the number of accepted drafts is known in advance."""

    def __init__(self, prompt_len: int, greedy: list[int], wrong_at):
        super().__init__(prompt_len, greedy)
        self.wrong_at, self.steps = wrong_at, 0

    def observe(self, token_ids, out, next_token):
        super().observe(token_ids, out, next_token)
        assert self.continuation[self.position - self.prompt_len] == next_token

    def propose(self, k):
        drafts = super().propose(k)
        bad = self.wrong_at(self.steps)
        if bad < k:
            drafts[bad] = (drafts[bad] + 1) % 384
        self.steps += 1
        return drafts


PROMPT_LENGTHS = [1, 126]  # drafts then cross 4-edges (and 128)
NEW_TOKENS = 14


@pytest.mark.parametrize("preset,method,k", [("flash", "mtp", 1), ("flash", "mtp", 3), ("flash-0731", "dspark", 5)])
def test_speculative_greedy_equals_plain_greedy(models, preset, method, k):
    model = models[preset]
    plan = plan_speculation(model.cfg, method, k)
    for length in PROMPT_LENGTHS:
        prompt = _ids(length, seed=length).tolist()
        drafter = (MTPDrafter if plan.method is Method.MTP else DSparkDrafter)(model)
        out = speculative_generate(model, drafter, prompt, NEW_TOKENS, plan.num_speculative_tokens)
        assert out.tokens == model.generate(prompt, NEW_TOKENS)
        assert all(0 <= a <= k for a in out.accepted)


@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_full_and_partial_acceptance(models, preset):
    """A drafter copying the target: with all drafts right every step emits K+1 tokens; with draft i
    wrong exactly i are accepted; the output is plain greedy either way (drafts cross 128)."""
    model = models[preset]
    prompt = _ids(110, seed=5).tolist()
    greedy = model.generate(prompt, 40 + K)  # the last step drafts up to K past the 40th token
    full = speculative_generate(model, CopyTarget(len(prompt), greedy, lambda s: K), prompt, 40, K)
    assert full.tokens == greedy[:40]
    assert full.accepted == [K] * 7 and full.acceptance_length == K + 1  # 1 + 7 * 6 >= 40 tokens
    partial = speculative_generate(model, CopyTarget(len(prompt), greedy, lambda s: s % (K + 2)), prompt, 40, K)
    assert partial.tokens == greedy[:40]
    assert partial.accepted == [min(s % (K + 2), K) for s in range(len(partial.accepted))]


def test_stop_token_ends_the_output_as_plain_greedy_does(models):
    model = models["flash"]
    prompt = _ids(20, seed=9).tolist()
    greedy = model.generate(prompt, 30)
    stop = greedy[9]
    expected = model.generate(prompt, 30, stop_ids=(stop,))
    got = speculative_generate(model, CopyTarget(len(prompt), greedy, lambda s: K), prompt, 30, K, (stop,))
    assert got.tokens == expected and got.tokens[-1] == stop


def test_mtp_drafter_state_equals_the_whole_sequence_mtp(models):
    """After a run with rejections, the drafter's committed rows reproduce `mtp_forward` over the
    accepted sequence, and it proposes what a drafter fed that sequence in one step proposes."""
    model = models["flash"]
    prompt = _ids(123, seed=2).tolist()
    drafter = MTPDrafter(model)
    out = speculative_generate(model, drafter, prompt, 12, 3)
    seq = torch.tensor(prompt + out.tokens)
    n = drafter.cache.num_tokens  # rows 0 ... n-1 committed: target position t, token t+1
    assert n >= len(prompt)
    target = model.forward(seq[:n])
    reference = model.mtp_forward(target.streams, seq[1 : n + 1])
    torch.testing.assert_close(drafter._newest.logits[-1], reference.logits[-1], **TOL)
    fresh = MTPDrafter(model)
    fresh.observe(seq[:n], target, int(seq[n]))
    assert drafter.propose(3) == fresh.propose(3)


@dataclass
class PagedStep:
    """One verify step of `_paged_generate`'s batch, after acceptance."""

    plan: BatchPlan
    streams: torch.Tensor  # [T, hc, D] pre-hc_head streams of every scheduled row
    captured: dict[int, torch.Tensor]
    next_ids: torch.Tensor  # [T]: row t's token one position later (the target's new token after the last kept row)
    last_rows: list[int]  # per sequence: its last kept row
    anchors: list[tuple[int, int]]  # per sequence: (the target's new token, its position)


def _paged_generate(engine: TinyEngine, prompts: list[list[int]], new_tokens: int, capture: tuple[int, ...],
                    propose) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Greedy drafting over paged caches for a batch, the way vLLM drives it: each step verifies
    [anchor, drafts] of every sequence in one `streams_paged`, keeps the longest agreeing prefix and the
    target's next token, then `propose(PagedStep)` returns the next drafts per sequence (rejected rows
    stay in the caches, to be overwritten). Returns per sequence (tokens, drafts proposed per step)."""
    model, n = engine.model, len(prompts)
    chunks = [(s, torch.tensor(p), 0) for s, p in enumerate(prompts)]
    drafts: list[list[int]] = [[] for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    proposed: list[list[list[int]]] = [[] for _ in prompts]
    while True:
        plan = engine.plan(chunks)
        streams, captured = streams_paged(model, torch.cat([c[1] for c in chunks]), plan, engine.caches, engine.fmt,
                                          capture)
        choices = model.logits(streams).argmax(-1).split([len(c[1]) for c in chunks])
        next_ids, last_rows, anchors, offset = [], [], [], 0
        for s, (_, ids, first) in enumerate(chunks):
            base, c = len(ids) - 1 - len(drafts[s]), choices[s].tolist()
            j = 0
            while j < len(drafts[s]) and drafts[s][j] == c[base + j]:
                j += 1
            token = c[base + j]
            tokens[s] += drafts[s][:j] + [token]
            shifted = torch.cat((ids[1:], torch.tensor([token])))
            shifted[base + j] = token
            next_ids.append(shifted)
            last_rows.append(offset + base + j)
            anchors.append((token, first + base + j + 1))
            offset += len(ids)
        drafts = propose(PagedStep(plan, streams, captured, torch.cat(next_ids), last_rows, anchors))
        if min(len(t) for t in tokens) >= new_tokens:
            return [t[:new_tokens] for t in tokens], proposed
        for s in range(n):
            proposed[s].append(drafts[s])
        chunks = [(s, torch.tensor([token] + drafts[s]), p) for s, (token, p) in enumerate(anchors)]


def _mtp_proposer(engine: TinyEngine, k: int):
    """vLLM's MTP flow: one MTP pass over every scheduled row (streams of row t, token t+1), then k-1
    one-row passes fed the MTP's own streams."""
    model, cache = engine.model, engine.mtp_caches[0]

    def propose(step: PagedStep) -> list[list[int]]:
        out = mtp_streams_paged(model, step.streams, step.next_ids, step.plan, cache, engine.fmt)
        rows = out[step.last_rows]
        current = model.logits(rows, "mtp.0.").argmax(-1)
        drafts = [[int(t)] for t in current]
        positions = torch.tensor([p for _, p in step.anchors])
        for _ in range(k - 1):
            plan = BatchPlan(positions, torch.arange(len(drafts)))
            rows = mtp_streams_paged(model, rows, current, plan, cache, engine.fmt)
            current = model.logits(rows, "mtp.0.").argmax(-1)
            for s, t in enumerate(current.tolist()):
                drafts[s].append(t)
            positions = positions + 1
        return drafts

    return propose


@pytest.mark.parametrize("k", [1, 3])
def test_paged_mtp_drafts_equal_the_reference_drafter(models, k):
    """The MTP block over paged caches, batched the way vLLM drives it, proposes exactly the
    reference `MTPDrafter`'s drafts at every step and keeps plain greedy output (drafts cross the
    4- and 128-token edges; random weights reject most drafts, so rejected rows are overwritten)."""
    model = models["flash"]
    prompts = [_ids(126, seed=21).tolist(), _ids(3, seed=22).tolist()]
    engine = TinyEngine(model, EXACT, len(prompts), 200)
    got_tokens, got_drafts = _paged_generate(engine, prompts, NEW_TOKENS, (), _mtp_proposer(engine, k))
    for prompt, tokens, drafts in zip(prompts, got_tokens, got_drafts):
        reference = recording(MTPDrafter)(model)
        out = speculative_generate(model, reference, prompt, NEW_TOKENS, k)
        assert tokens == out.tokens == model.generate(prompt, NEW_TOKENS)
        assert drafts[: len(reference.proposed)] == reference.proposed and len(reference.proposed) >= 4


def _markov_chain(head: DSparkHead, anchors: list[int], hidden: torch.Tensor) -> list[list[int]]:
    """Drafts picked one step at a time for the whole batch, as SGLang's draft loop runs them:
    hidden [n, k, D] from `dspark_blocks_paged`."""
    prev, steps = torch.tensor(anchors), []
    for i in range(hidden.shape[1]):
        prev = head.markov_logits(hidden[:, i], prev).argmax(dim=-1)
        steps.append(prev.tolist())
    return [list(drafts) for drafts in zip(*steps)]


@pytest.mark.parametrize("k,stepwise", [(3, False), (K, False), (K, True)])
def test_paged_dspark_drafts_equal_the_reference_drafter(models, k, stepwise):
    """DSpark over paged context caches (written for every verified row, rejected ones overwritten
    later) proposes exactly the reference `DSparkDrafter`'s blocks at every step, batched; also when
    the Markov head picks the drafts a step at a time over the batch (`stepwise`, SGLang's loop)."""
    model = models["flash-0731"]
    head = DSparkHead(model)
    prompts = [_ids(125, seed=31).tolist(), _ids(4, seed=32).tolist()]
    engine = TinyEngine(model, EXACT, len(prompts), 200)
    caches = [engine._allocate(stage) for stage in head.stages]
    rows = list(range(len(prompts)))

    def propose(step: PagedStep) -> list[list[int]]:
        dspark_context_paged(head, dspark_features(model.cfg, step.captured), step.plan, caches, engine.fmt)
        anchors, positions = zip(*step.anchors)
        if stepwise:
            return _markov_chain(head, list(anchors),
                                 dspark_blocks_paged(head, anchors, positions, rows, caches, engine.fmt, k))
        return [d.tokens for d in dspark_draft_paged(head, anchors, positions, rows, caches, engine.fmt, k)]

    got_tokens, got_drafts = _paged_generate(engine, prompts, NEW_TOKENS, head.capture, propose)
    for prompt, tokens, drafts in zip(prompts, got_tokens, got_drafts):
        reference = recording(DSparkDrafter)(model)
        out = speculative_generate(model, reference, prompt, NEW_TOKENS, k)
        assert tokens == out.tokens == model.generate(prompt, NEW_TOKENS)
        assert drafts[: len(reference.proposed)] == reference.proposed and len(reference.proposed) >= 3


def test_dspark_drafter_state_equals_one_pass_over_the_sequence(models):
    """Context built through verify steps with rejections == context from one forward of the
    accepted sequence: same drafts, logits and confidences."""
    model = models["flash-0731"]
    prompt = _ids(124, seed=4).tolist()
    drafter = DSparkDrafter(model)
    out = speculative_generate(model, drafter, prompt, 12, K)
    seq = torch.tensor(prompt + out.tokens)
    n = drafter.num_context
    assert n >= len(prompt) and drafter.anchor == int(seq[n])
    fresh = DSparkDrafter(model)
    fresh.observe(seq[:n], model.forward(seq[:n], capture=fresh.capture), int(seq[n]))
    for a, b in zip(drafter.context, fresh.context):
        torch.testing.assert_close(a, b, **STATE_TOL)
    got, want = drafter.draft(K), fresh.draft(K)
    assert got.tokens == want.tokens
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    torch.testing.assert_close(got.confidence, want.confidence, **TOL)
    assert got.logits.shape == (K, model.cfg.vocab_size) and bool(((got.confidence > 0) & (got.confidence < 1)).all())


def test_dspark_block_attends_both_ways(models):
    """Block slot 0 sees the noise tokens after it: its base logits change with the block length,
    while a 1-token block is the anchor alone."""
    drafter = DSparkDrafter(models["flash-0731"])
    ids = _ids(40, seed=6)
    drafter.observe(ids, models["flash-0731"].forward(ids, capture=drafter.capture), 17)
    one, five = drafter.draft(1), drafter.draft(5)
    assert not torch.allclose(one.logits[0], five.logits[0])
    assert drafter.draft(1).tokens == one.tokens  # drafting leaves the state alone


# ---- requests a checkpoint cannot serve -------------------------------------------------------------
def test_plans_and_clear_errors(models):
    old, new = models["flash"].cfg, models["flash-0731"].cfg
    assert plan_speculation(new, Method.DSPARK).num_speculative_tokens == 5  # dspark_block_size
    assert plan_vllm_speculation(old, "deepseek_mtp").num_speculative_tokens == 1
    assert plan_sglang_speculation(old, "NEXTN", 3).method is Method.MTP
    assert plan_sglang_speculation(new, "DSPARK", 2).method is Method.DSPARK
    with pytest.raises(SpeculativeConfigError, match="tiny-flash-0731: speculative method 'mtp' needs the 04-24 MTP "
                                                     "block, but this is a DSpark checkpoint"):
        plan_speculation(new, Method.MTP)
    with pytest.raises(SpeculativeConfigError, match="'dspark' needs a DSpark checkpoint .*04-24"):
        plan_speculation(old, Method.DSPARK)
    with pytest.raises(SpeculativeConfigError, match="num_speculative_tokens = 6 exceeds dspark_block_size = 5"):
        plan_speculation(new, Method.DSPARK, 6)
    with pytest.raises(SpeculativeConfigError, match="positive int"):
        plan_speculation(old, Method.MTP, 0)
    with pytest.raises(SpeculativeConfigError, match="'medusa' is not available"):
        plan_vllm_speculation(old, "medusa")
    with pytest.raises(SpeculativeConfigError, match="DSpark checkpoint"):
        MTPDrafter(models["flash-0731"])
    with pytest.raises(SpeculativeConfigError, match="04-24 checkpoint"):
        DSparkDrafter(models["flash"])
