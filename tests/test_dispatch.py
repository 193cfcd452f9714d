"""The dispatch layer is what paged execution calls: with the kernels on, `forward_paged` runs every hot
op through its kernel and matches the torch path. Two parts:

* interpreter (TRITON_INTERPRET=1, CPU tensors through `dispatch.use_kernels_on_cpu`): the tests below
  up to the CUDA section;
* CUDA (compiled kernels, skipped without a GPU): a tiny checkpoint loaded quantized onto the GPU and a
  model at real Flash layer shapes (2 layers, 4 experts, random weights), FP8 and exact caches; every
  dispatched op is counted on its kernel (`dispatch.count_calls`: no torch fallback) and the logits
  are compared with the torch path on the same GPU (V4_PLUGIN_KERNELS=torch).

Three sequences (1, 5 and 129 tokens: no, one and many complete compressor blocks, one 128-block)
are prefilled in one batch, then each decodes one token. Tolerances:

* exact mode (float caches, `QuantSim.off()`): the kernels sum in another order, logits agree to
  1e-4 (measured: about 1e-5);
* the KV-store kernels alone: they quantize bit-exactly, so the caches and logits are identical;
* the fused compressor store alone: its pooling sums in another order, so an FP8 / FP4 rounding near
  a midpoint may go the other way; the first compressor layer (identical inputs) must write the same
  records but for such flips (at most 1% of their bytes; measured: 1 byte in 6600);
* all kernels with quantized caches: such a flip changes later layers' inputs and their roundings
  (the FP8 rounding chaos of a tiny random model), so logits are only compared to 10% of their
  largest magnitude (measured: 3%), with the same greedy token everywhere.

The GEMMs (FP8 linear, FP4 MoE) need the weights as the checkpoint stores them: a tiny checkpoint
loaded with `keep_quantized=True` runs them (sequences of 1 and 5 tokens), against the same file
loaded dense. The weights are the same grid values, so with `QuantSim.off()` only the summation order
differs: logits to 1e-4. With simulated FP8 activations a rounding flip can move later values: logits
to 2% of their largest magnitude, same greedy tokens.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from v4_kernels.testing import one_cpu_thread  # noqa: F401  (autouse fixture)
from v4_plugin.runtime import dispatch
from v4_plugin.runtime.warmup import warm_up
from v4_plugin.checkpoint.loader import load_checkpoint
from v4_plugin.checkpoint.config import PRESET_DIR, LayerType, load_config, parse_config
from v4_plugin.runtime.drafting import DSparkHead, dspark_features
from v4_plugin.cache.layout import IndexerCache
from v4_plugin.runtime.model import V4Model
from v4_plugin.checkpoint.quant import QuantSim
from v4_plugin.checkpoint.sharding import Parallelism, rank_weights
from v4_plugin.runtime.ops import moe as moe_ops
from v4_plugin.runtime.paged import BatchPlan, forward_paged
from v4_plugin.cache.formats import EXACT, CacheFormat, KVStorage
from v4_plugin.checkpoint.tiny import TINY_PRESETS, make_tiny, random_weights, write_checkpoint

from paged_engine import TinyEngine

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRET, reason="runs CPU tensors through the kernels in the Triton interpreter")
on_cuda = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA (compiled kernels)")

LENGTHS = (1, 5, 129)
STORES = ("store_main", "store_indexer")


def _pad_pages(engine: TinyEngine) -> None:
    """Give every cache padded pages, as vLLM's hybrid allocator does: blocks 24 elements apart beyond
    their entries (the kernels then write rows of gcd(block stride, entry stride) elements)."""
    for layer in engine.caches:
        for cache in (layer.window, layer.state, layer.compressed, layer.index_state, layer.index_keys):
            if cache is not None:
                n, bs, w = cache.data.shape
                pages = torch.full((n, bs * w + 24), 7, dtype=cache.data.dtype)
                cache.data = pages[:, : bs * w].view(n, bs, w)


def _run(fmt: CacheFormat, quant: QuantSim, ops: tuple[str, ...] | None = None, kernels: bool = True,
         padded: bool = False) -> tuple[torch.Tensor, TinyEngine, Counter]:
    """Prefill LENGTHS in one step, then decode one token each: (logits [T, vocab], engine, kernel calls)."""
    cfg = parse_config(TINY_PRESETS["flash"])
    model = V4Model(cfg, random_weights(cfg, seed=0), quant=quant)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n + 1,), generator=gen) for n in LENGTHS]
    engine = TinyEngine(model, fmt, len(seqs), max(LENGTHS) + 1)
    if padded:
        _pad_pages(engine)
    prefill = [(s, ids[:-1], 0) for s, ids in enumerate(seqs)]
    decode = [(s, ids[-1:], len(ids) - 1) for s, ids in enumerate(seqs)]
    calls = Counter()
    logits = []
    for chunks in (prefill, decode):
        if kernels:
            with dispatch.use_kernels_on_cpu(ops) as step_calls:
                logits += engine.step(chunks)
            calls += step_calls
        else:
            logits += engine.step(chunks)
    return torch.cat(logits), engine, calls


def _caches(engine: TinyEngine, layer: int | None = None) -> list[torch.Tensor]:
    layers = engine.caches if layer is None else engine.caches[layer : layer + 1]
    return [c.data for lc in layers for c in (lc.window, lc.compressed, lc.index_keys) if c is not None]


def _expected_calls(cfg, quantized_kv: bool, fused: bool) -> Counter:
    """Kernel calls of the two steps, whatever the number of sequences: per step and layer two hc_pre /
    hc_post, one attention over every sequence (CSA: also one indexer scoring and top-k), one window
    store (quantized caches), one pooling per CSA compressor (main and indexer) and one for the HCA
    layer (of the blocks the step completes, none in a step that completes none); once, hc_head per step."""
    kinds = [cfg.layer_type(i) for i in range(cfg.num_hidden_layers)]
    n_csa, n_hca, steps = kinds.count(LayerType.CSA), kinds.count(LayerType.HCA), 2
    calls = Counter(hc_pre=2 * len(kinds) * steps, hc_post=2 * len(kinds) * steps, hc_head=steps,
                    attention_paged=len(kinds) * steps, index_scores_paged=n_csa * steps,
                    select_topk=n_csa * steps)
    calls["pool_finish_store" if fused else "pool_finish"] = (2 * n_csa + n_hca) * steps
    if quantized_kv:
        calls["store_main"] = len(kinds) * steps
    return calls


@interpreted
def test_every_op_runs_on_its_kernel_exact_mode():
    quant = QuantSim.off()
    expected, _, _ = _run(EXACT, quant, kernels=False)
    got, engine, calls = _run(EXACT, quant)
    assert calls == _expected_calls(engine.model.cfg, quantized_kv=False, fused=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@interpreted
@pytest.mark.parametrize("indexer", [IndexerCache.FP8, IndexerCache.FP4])
def test_kv_store_kernels_write_the_reference_bytes(indexer):
    """Indexer keys not FP4-simulated, so that they take `store_indexer` (not the fused compressor store);
    padded pages."""
    fmt, quant = CacheFormat(KVStorage.FP8, indexer), QuantSim(activations=True, kv_cache=True, indexer=False)
    expected, torch_engine, _ = _run(fmt, quant, kernels=False, padded=True)
    got, engine, calls = _run(fmt, quant, ops=STORES, padded=True)
    cfg = engine.model.cfg
    n_csa = sum(cfg.layer_type(i) is LayerType.CSA for i in range(cfg.num_hidden_layers))
    # per step: window entries, and indexer keys of the blocks completed (compressed entries take the fused store)
    assert calls == Counter(store_main=2 * cfg.num_hidden_layers, store_indexer=2 * n_csa)
    for a, b in zip(_caches(engine), _caches(torch_engine), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got, expected)


@interpreted
@pytest.mark.parametrize("indexer", [IndexerCache.FP8, IndexerCache.FP4])
def test_fused_compressor_store_writes_the_reference_records(indexer):
    """Padded pages."""
    fmt = CacheFormat(KVStorage.FP8, indexer)
    quant = fmt.quant_sim(activations=True)
    _, torch_engine, _ = _run(fmt, quant, kernels=False, padded=True)
    _, engine, calls = _run(fmt, quant, ops=("pool_finish_store",), padded=True)
    cfg = engine.model.cfg
    kinds = [cfg.layer_type(i) for i in range(cfg.num_hidden_layers)]
    first = next(i for i, kind in enumerate(kinds) if kind is not LayerType.SWA)
    per_step = 2 * kinds.count(LayerType.CSA) + kinds.count(LayerType.HCA)  # one per compressor, both steps
    assert calls["pool_finish_store"] == 2 * per_step and set(calls) == {"pool_finish_store"}
    for a, b in zip(_caches(engine, first), _caches(torch_engine, first), strict=True):
        written = (b != 7).any(-1)  # TinyEngine fills unwritten rows with 7s
        assert written.any() and torch.equal(written, (a != 7).any(-1))
        assert (a[written] != b[written]).float().mean() <= 0.01


@interpreted
@pytest.mark.parametrize("indexer", [IndexerCache.FP8, IndexerCache.FP4])
def test_every_op_runs_on_its_kernel_quantized_caches(indexer):
    """Quantized caches, activations not FP8-simulated. The kernels' fp32 results differ from torch's in
    the last bits, and a tiny random model turns a flipped FP8 rounding (of an activation, of a stored KV
    entry, of a compressor record: <= 1 % of bytes, checked above) into logit changes of tenths, so the
    numbers are compared on average: a wrong kernel moves every logit."""
    fmt = CacheFormat(KVStorage.FP8, indexer)
    quant = fmt.quant_sim(activations=False)
    expected, _, _ = _run(fmt, quant, kernels=False)
    got, engine, calls = _run(fmt, quant)
    assert calls == _expected_calls(engine.model.cfg, quantized_kv=True, fused=True)
    diff = (got - expected).abs()
    assert diff.mean() <= 0.01 * expected.abs().mean() and diff.max() <= 0.1 * expected.abs().max()


# ---- the GEMMs, on a checkpoint loaded with keep_quantized ----------------------------------------
GEMMS = ("linear", "moe")


@pytest.fixture(scope="module", params=["flash", "flash-0731"])
def tiny_dir(request, tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp(request.param), request.param, seed=0)


def _dense_and_quantized(path, quant: QuantSim) -> tuple[V4Model, V4Model]:
    cfg = load_config(path)
    return tuple(V4Model(cfg, load_checkpoint(path, cfg, keep_quantized=keep), quant=quant)
                 for keep in (False, True))


def _gemm_logits(model: V4Model, kernels: bool) -> tuple[torch.Tensor, Counter]:
    """forward (5 tokens), then paged: prefill of 1 and 5 tokens in one batch and a decode step each;
    all logits, and the GEMM kernel calls."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n + 1,), generator=gen) for n in (1, 5)]
    engine = TinyEngine(model, EXACT, len(seqs), 7)
    runs = [lambda: [model.forward(seqs[1][:-1]).logits],
            lambda: engine.step([(s, ids[:-1], 0) for s, ids in enumerate(seqs)]),
            lambda: engine.step([(s, ids[-1:], len(ids) - 1) for s, ids in enumerate(seqs)])]
    logits, calls = [], Counter()
    for run in runs:
        if kernels:
            with dispatch.use_kernels_on_cpu(GEMMS) as step_calls:
                logits += run()
            calls += step_calls
        else:
            logits += run()
    return torch.cat(logits), calls


def _gemm_calls(cfg) -> Counter:
    """GEMM calls of `_gemm_logits`' three steps (of 1, 2 and 2 sequences): per step and layer wq_a, wq_b,
    wkv, wo_b and one MoE, for CSA the indexer's wq_b, whatever the number of sequences."""
    layers = cfg.num_hidden_layers
    n_csa = sum(cfg.layer_type(i) is LayerType.CSA for i in range(layers))
    return Counter(linear=3 * (4 * layers + n_csa), moe=3 * layers)


@pytest.mark.parametrize("preset", ["flash", "flash-0731"])
def test_served_weights_are_held_as_stored(preset, tmp_path):
    """Every device keeps the FP8 / FP4 linears as stored (issue 19): after a forward and paged steps through
    the torch ops, the model holds the checkpoint's bytes (within 3 %; bf16 compute, so bf16 tensors as
    stored too), and no dequantized copy of a weight was kept."""
    assert dispatch.keep_quantized("cpu")
    path = make_tiny(tmp_path, preset, seed=0)
    cfg = load_config(path)
    tensors = load_checkpoint(path, cfg, dtype=torch.bfloat16, keep_quantized=dispatch.keep_quantized("cpu"))
    model = V4Model(cfg, tensors, dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (130,), generator=torch.Generator().manual_seed(0))
    model.forward(ids[:9])
    cache = model.new_cache()
    model.step(ids[:129], cache)
    model.step(ids[129:], cache)
    stored = rank_weights(cfg, Parallelism(1, 1, False)).total  # (the drafter blocks load too)
    assert abs(model.w.held_bytes() - stored) <= 0.03 * stored
    assert any(t.dtype == torch.float8_e4m3fn for t in tensors.values())


@interpreted
def test_quantized_checkpoint_runs_the_gemm_kernels_exact_mode(tiny_dir):
    dense, quantized = _dense_and_quantized(tiny_dir, QuantSim.off())
    expected, _ = _gemm_logits(dense, kernels=False)
    assert torch.equal(_gemm_logits(quantized, kernels=False)[0], expected)  # dequantized on demand: same values
    got, calls = _gemm_logits(quantized, kernels=True)
    assert calls == _gemm_calls(dense.cfg)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@interpreted
def test_quantized_checkpoint_runs_the_gemm_kernels_fp8_activations(tiny_dir):
    dense, quantized = _dense_and_quantized(tiny_dir, QuantSim(activations=True, kv_cache=False, indexer=False))
    expected, _ = _gemm_logits(dense, kernels=False)
    got, calls = _gemm_logits(quantized, kernels=True)
    assert calls == _gemm_calls(dense.cfg)
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@interpreted
def test_drafter_projections_run_the_fp8_kernel(tiny_dir):
    """MTP's e_proj / h_proj (flash) or DSpark's main_proj (flash-0731), exact mode."""
    dense, quantized = _dense_and_quantized(tiny_dir, QuantSim.off())
    ids = torch.tensor([5, 9, 3, 17, 2])
    if dense.cfg.dspark is None:
        streams = dense.forward(ids).streams
        expected = dense.mtp_input(streams, ids, 0)
        with dispatch.use_kernels_on_cpu(("linear",)) as calls:
            got = quantized.mtp_input(streams, ids, 0)
        assert calls == Counter(linear=2)
    else:
        head = DSparkHead(dense)
        features = dspark_features(dense.cfg, dense.forward(ids, capture=head.capture).captured)
        expected = head.main_x(features)
        with dispatch.use_kernels_on_cpu(("linear",)) as calls:
            got = DSparkHead(quantized).main_x(features)
        assert calls == Counter(linear=1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ---- -Base checkpoints: FP8 routed experts ----------------------------------------------------------
def _base_dir(root: Path) -> Path:
    """The tiny flash checkpoint with FP8 routed experts (as Flash-Base / Pro-Base)."""
    cfg = parse_config(dict(TINY_PRESETS["flash"], expert_dtype="fp8"))
    return write_checkpoint(cfg, random_weights(cfg, seed=3), root)


@interpreted
def test_fp8_experts_run_the_moe_kernel(tmp_path):
    """dispatch.moe hands FP8 routed-expert stacks (the loader's [E, ...] tensors) to the MoE kernel."""
    path = _base_dir(tmp_path)
    cfg = load_config(path)
    tensors = load_checkpoint(path, cfg, keep_quantized=True)
    p = f"layers.{cfg.num_hidden_layers - 1}.ffn"

    def entries(prefix: str) -> tuple[torch.Tensor, ...]:
        return tuple(tensors[f"{prefix}.w{i}.{part}"] for i in (1, 2, 3) for part in ("weight", "scale"))

    routed = [entries(f"{p}.experts.{e}") for e in range(cfg.n_routed_experts)]
    experts = V4Model(cfg, load_checkpoint(path, cfg), quant=QuantSim.off()).w.moe(p, cfg.n_routed_experts)
    packed = moe_ops.MoEWeights(experts.dense, lambda: (tuple(torch.stack(t) for t in zip(*routed)),
                                                        entries(f"{p}.shared_experts")))
    assert routed[0][0].dtype == torch.float8_e4m3fn
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, cfg.hidden_size, generator=gen)
    k = cfg.num_experts_per_tok
    weights = torch.rand(5, k, generator=gen)
    ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=gen)[:k] for _ in range(5)])
    expected = dispatch.moe(x, weights, ids, experts, limit=cfg.swiglu_limit, quantize_input=False)
    with dispatch.use_kernels_on_cpu(("moe",)) as calls:
        got = dispatch.moe(x, weights, ids, packed, limit=cfg.swiglu_limit, quantize_input=False)
    assert calls == Counter(moe=1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@interpreted
def test_base_checkpoint_runs_the_moe_kernel(tmp_path):
    """A -Base checkpoint loaded with keep_quantized: its MoE must reach the kernel, not the torch fallback."""
    path = _base_dir(tmp_path)
    model = V4Model(load_config(path), load_checkpoint(path, load_config(path), keep_quantized=True),
                           quant=QuantSim.off())
    with dispatch.use_kernels_on_cpu(("moe",)), dispatch.count_calls() as (kernel, fallback):
        model.forward(torch.tensor([5, 9, 3]))
    assert kernel["moe"] == model.cfg.num_hidden_layers and not fallback["moe"]


@interpreted
def test_warmup_runs_the_decode_kernels(tmp_path):
    """warm_up compiles what decode runs: every distinct FP8 linear shape, the MoE and mHC per batch
    size, paged attention of the three layer types, the paged indexer at three contexts and its top-k."""
    path = make_tiny(tmp_path, "flash", seed=0)
    cfg = load_config(path)
    model = V4Model(cfg, load_checkpoint(path, cfg, keep_quantized=True), quant=QuantSim.off())
    assert warm_up(model, CacheFormat()) == 0.0  # CPU serving: nothing to compile
    with dispatch.use_kernels_on_cpu() as calls:
        warm_up(model, CacheFormat(), batch_sizes=(1, 3), contexts=(256, 512, 1024))
    assert calls["moe"] == 2 and calls["attention_paged"] == 6 and calls["index_scores_paged"] == 6
    assert calls["select_topk"] == 2 and calls["linear"] > 0 and calls["linear"] % 2 == 0
    assert calls["hc_pre"] == calls["hc_post"] == calls["hc_head"] == 2


# ---- CUDA: compiled kernels ---------------------------------------------------------------------
class _CudaEngine(TinyEngine):
    """`TinyEngine` with its caches, block tables and batch plans on the GPU."""

    def __init__(self, model: V4Model, fmt: CacheFormat, num_seqs: int, max_tokens: int):
        super().__init__(model, fmt, num_seqs, max_tokens)
        for layer in self.caches:
            for name in ("window", "state", "compressed", "index_state", "index_keys"):
                cache = getattr(layer, name)
                if cache is not None:
                    cache.data, cache.block_table = cache.data.cuda(), cache.block_table.cuda()

    def step(self, chunks: list[tuple[int, torch.Tensor, int]]) -> list[torch.Tensor]:
        plan = self.plan(chunks)
        ids = torch.cat([c[1] for c in chunks]).cuda()
        logits = forward_paged(self.model, ids, BatchPlan(plan.positions.cuda(), plan.seq_ids.cuda()), self.caches,
                               self.fmt).logits
        return list(logits.float().cpu().split([len(c[1]) for c in chunks]))


def _cuda_logits(model: V4Model, fmt: CacheFormat, lengths: tuple[int, ...]) -> tuple[torch.Tensor, tuple]:
    """Prefill `lengths` in one step, then one decode token each, on the GPU: (logits, (kernel, torch) calls)."""
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, model.cfg.vocab_size, (n + 1,), generator=gen) for n in lengths]
    engine = _CudaEngine(model, fmt, len(seqs), max(lengths) + 1)
    with dispatch.count_calls() as calls:
        logits = engine.step([(s, ids[:-1], 0) for s, ids in enumerate(seqs)])
        logits += engine.step([(s, ids[-1:], len(ids) - 1) for s, ids in enumerate(seqs)])
    return torch.cat(logits), calls


KERNEL_OPS = {"linear", "moe", "attention_paged", "index_scores_paged", "select_topk", "hc_pre", "hc_post", "hc_head"}
FORMATS = {"exact": (EXACT, QuantSim.off()),
           "fp8-caches": (CacheFormat(KVStorage.FP8, IndexerCache.FP8), CacheFormat().quant_sim(activations=False))}


def _check_against_torch(model: V4Model, fmt: CacheFormat, lengths: tuple[int, ...], monkeypatch,
                         rel: float) -> None:
    got, (kernel, fallback) = _cuda_logits(model, fmt, lengths)
    assert not fallback, f"ops served by torch on CUDA: {dict(fallback)}"
    assert KERNEL_OPS <= set(kernel) and kernel["pool_finish" if fmt is EXACT else "pool_finish_store"] > 0
    monkeypatch.setenv("V4_PLUGIN_KERNELS", "torch")
    expected, (kernel_ref, _) = _cuda_logits(model, fmt, lengths)
    assert not kernel_ref
    diff = (got - expected).abs()
    assert diff.mean() <= rel * expected.abs().mean() and diff.max() <= 10 * rel * expected.abs().max()


@on_cuda
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_cuda_tiny_checkpoint_runs_every_op_on_its_kernel(fmt, tmp_path, monkeypatch):
    """The tiny flash checkpoint, quantized weights kept (FP8 linears, FP4 experts) on the GPU; fp32. Exact
    mode: logits within 1e-3 (relative, on average) of the torch path; FP8 caches: 1 % (rounding flips)."""
    cache_fmt, quant = FORMATS[fmt]
    path = make_tiny(tmp_path, "flash", seed=0)
    cfg = load_config(path)
    model = V4Model(cfg, load_checkpoint(path, cfg, keep_quantized=True, device="cuda"), quant=quant)
    _check_against_torch(model, cache_fmt, LENGTHS, monkeypatch, rel=1e-3 if cache_fmt is EXACT else 1e-2)


def _flash_layers(root: Path) -> Path:
    """Real Flash layer shapes (hidden 4096, 64 heads of 512, indexer 64 x 128, experts 2048 wide), cut to
    a CSA and an HCA layer, 4 routed experts (top 2) and a 1024-token vocabulary; random weights."""
    raw = json.loads((PRESET_DIR / "deepseek-v4-flash.config.json").read_text())
    raw.update(num_hidden_layers=2, compress_ratios=[4, 128], num_nextn_predict_layers=0, n_routed_experts=4,
               num_experts_per_tok=2, num_hash_layers=0, vocab_size=1024)
    cfg = parse_config(raw)
    return write_checkpoint(cfg, random_weights(cfg, seed=0), root)


@pytest.fixture(scope="module")
def flash_layers_dir(tmp_path_factory):
    return _flash_layers(tmp_path_factory.mktemp("flash-layers"))


@on_cuda
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_cuda_real_flash_layers_run_every_op_on_its_kernel(fmt, flash_layers_dir, monkeypatch):
    """bf16, the real layer shapes: a 600-token and a 1-token sequence prefilled together (CSA: 150 entries,
    fewer than the top-k of 512; HCA: 4 blocks of 128), then a decode step each; logits within 2 % (relative,
    on average) of the torch path."""
    cache_fmt, quant = FORMATS[fmt]
    cfg = load_config(flash_layers_dir)
    model = V4Model(cfg, load_checkpoint(flash_layers_dir, cfg, dtype=torch.bfloat16, keep_quantized=True,
                                                device="cuda"), dtype=torch.bfloat16, quant=quant)
    _check_against_torch(model, cache_fmt, (600, 1), monkeypatch, rel=2e-2)
