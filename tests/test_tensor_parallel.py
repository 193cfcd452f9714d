"""Tensor and expert parallelism in the core: two gloo ranks reproduce the one-rank model.

Two processes (`torch.multiprocessing`, gloo over a file rendezvous, spawned once for the module) each load
only their slices of tiny checkpoints (`load_checkpoint(..., parallelism=, rank=)`) and run `V4Model` with
`TorchDistributed` collectives; the one-rank model runs here. fp32, exact mode (`QuantSim.off()`), prompts of
1, 5, 129 and 130 tokens (across the 4- and 128-token edges), compared within 1e-5:

* (a) heads, output groups, shared expert and vocabulary over 2 ranks, routed experts by range (EP);
* (b) the same with every routed expert split by intermediate dimension (the tiny experts' 96 is widened to
  128: 2 ranks x whole 32-column FP4 scale groups);
* (c) the paged path (`forward_paged` through tests/paged_engine.py), `step` in chunks, the MTP block and the
  DSpark drafter of the refresh checkpoint (its draft logits and confidences);
* (d) what a rank loads is its slices alone: as stored (FP8 / FP4 entries kept) the bytes `rank_weights`
  counts, on a config whose slices start on 128-blocks (also run at TP=2 from those kept entries); no split
  tensor is read whole;
* (e) sizes that do not divide: the `ConfigError` naming the field, before any file is opened.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from v4_plugin.cache.formats import EXACT
from v4_plugin.checkpoint import loader
from v4_plugin.checkpoint.config import ConfigError, load_config
from v4_plugin.checkpoint.loader import load_checkpoint
from v4_plugin.checkpoint.quant import QuantSim
from v4_plugin.checkpoint.schema import checkpoint_tensors, file_entries
from v4_plugin.checkpoint.sharding import Parallelism, rank_weights, shard
from v4_plugin.checkpoint.tiny import make_tiny
from v4_plugin.runtime.drafting import DSparkDrafter
from v4_plugin.runtime.model import V4Model
from v4_plugin.runtime.parallel import SINGLE, TorchDistributed

from paged_engine import TinyEngine

TOL = dict(atol=1e-5, rtol=1e-5)
LENGTHS = (1, 5, 129, 130)
EP, MOE_TP = True, False
WIDE = {"moe_intermediate_size": 128}  # 64 per rank: whole FP4 scale groups
ALIGNED = {"moe_intermediate_size": 256, "o_lora_rank": 128}  # every rank's FP8 slice starts on a 128-block

# (case, preset, config overrides, expert_parallel, keep_quantized, paths run)
CASES = [
    ("flash-ep", "flash", {}, EP, False, ("forward", "step", "paged", "mtp")),
    ("pro-ep", "pro", {}, EP, False, ("forward", "step", "paged", "mtp")),
    ("flash-moe-tp", "flash", WIDE, MOE_TP, False, ("forward", "step", "paged")),
    ("pro-moe-tp", "pro", WIDE, MOE_TP, False, ("forward", "paged")),
    ("flash-0731-ep", "flash-0731", {}, EP, False, ("forward", "dspark")),
    ("aligned-ep-kept", "flash", ALIGNED, EP, True, ("forward",)),
    ("aligned-moe-tp-kept", "flash", ALIGNED, MOE_TP, True, ("forward",)),
]


def _checkpoint_key(preset: str, overrides: dict) -> str:
    return preset + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))


def _prompts(vocab: int) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {n: torch.randint(0, vocab, (n,), generator=gen) for n in LENGTHS}


def _run(case: str, model: V4Model, paths: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every output the case compares, by name: the same calls at TP=1 and on each rank of TP=2."""
    prompts, out = _prompts(model.cfg.vocab_size), {}
    if "forward" in paths:
        for n, ids in prompts.items():
            out[f"{case}/forward/{n}"] = model.forward(ids).logits
    if "step" in paths:  # one sequence in chunks across both edges
        ids, cache = prompts[130], model.new_cache()
        out[f"{case}/step"] = torch.cat([model.step(ids[a:b], cache).logits
                                         for a, b in ((0, 3), (3, 5), (5, 129), (129, 130))])
    if "mtp" in paths:
        ids = prompts[130]
        out[f"{case}/mtp"] = model.mtp_forward(model.forward(ids).streams[:-1], ids[1:]).logits
    if "dspark" in paths:  # the refresh's drafter: its stages' attention and the shared head, split the same way
        ids, cache = prompts[130], model.new_cache()
        drafter = DSparkDrafter(model)
        target = model.step(ids, cache, drafter.capture)
        drafter.observe(ids, target, int(target.logits[-1].argmax()))
        draft = drafter.draft(model.cfg.dspark.block_size)
        out[f"{case}/dspark/logits"], out[f"{case}/dspark/confidence"] = draft.logits, draft.confidence
    if "paged" in paths:  # two sequences sharing steps, prefill chunks beside single tokens, scrambled blocks
        engine, seqs = TinyEngine(model, EXACT, 2, 160), (prompts[130], prompts[129])
        got: list[list[torch.Tensor]] = [[], []]
        for step in ([(0, 0, 3), (1, 0, 5)], [(0, 3, 128), (1, 5, 6)], [(0, 128, 130), (1, 6, 129)]):
            chunks = [(s, seqs[s][a:b], a) for s, a, b in step]
            for (s, _, _), logits in zip(chunks, engine.step(chunks)):
                got[s].append(logits)
        for s in range(2):
            out[f"{case}/paged/{s}"] = torch.cat(got[s])
    return out


def _rank_main(rank: int, init_file: str, jobs: list, out_dir: str) -> None:
    """One of the two ranks: every case over this rank's slices, results to out_dir/rank{rank}.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    try:
        comm, results = TorchDistributed(), {}
        assert (comm.rank, comm.size) == (rank, 2)
        for case, path, expert_parallel, keep, paths in jobs:
            par = Parallelism(2, 1, expert_parallel)
            tensors = load_checkpoint(path, keep_quantized=keep, parallelism=par, rank=rank)
            model = V4Model(load_config(path), tensors, quant=QuantSim.off(), collectives=comm)
            results.update(_run(case, model, paths))
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread here (as on each rank) is faster than two contending for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-checkpoints")
    out = {}
    for _, preset, overrides, *_ in CASES:
        key = _checkpoint_key(preset, overrides)
        if key not in out:
            out[key] = make_tiny(root / key, preset, seed=0, overrides=overrides)
    return out


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    """The outputs of every case on each of the two ranks (one spawn for the module)."""
    root = tmp_path_factory.mktemp("tp-ranks")
    jobs = [(case, str(checkpoints[_checkpoint_key(preset, overrides)]), ep, keep, paths)
            for case, preset, overrides, ep, keep, paths in CASES]
    mp.spawn(_rank_main, args=(str(root / "rendezvous"), jobs, str(root)), nprocs=2, join=True)
    return [torch.load(root / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case, preset, overrides, expert_parallel, keep, paths", CASES, ids=[c[0] for c in CASES])
def test_two_ranks_equal_one(two_ranks, checkpoints, case, preset, overrides, expert_parallel, keep, paths):
    path = checkpoints[_checkpoint_key(preset, overrides)]
    single = V4Model(load_config(path), load_checkpoint(path, keep_quantized=keep), quant=QuantSim.off())
    expected = _run(case, single, paths)
    for rank, got in enumerate(two_ranks):
        for name, logits in expected.items():
            assert got[name].shape == logits.shape, name
            torch.testing.assert_close(got[name], logits, **TOL, msg=lambda m: f"rank {rank}, {name}: {m}")
    for name in expected:  # the gathered logits are the same tensor on both ranks
        assert torch.equal(two_ranks[0][name], two_ranks[1][name]), name


# ---- what a rank reads and holds ----------------------------------------------------------------
class _Spy:
    """A safetensors handle that logs which entries are read whole (`get_tensor`) or sliced (`get_slice`)."""

    def __init__(self, real, log: list):
        self.real, self.log = real, log

    def __enter__(self):
        self.f = self.real.__enter__()
        return self

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        self.log.append(("whole", name))
        return self.f.get_tensor(name)

    def get_slice(self, name):
        self.log.append(("slice", name))
        return self.f.get_slice(name)


@pytest.fixture
def reads(monkeypatch) -> list:
    log, real = [], loader.safe_open

    def spying_open(path, *args, **kwargs):
        log.append(("open", path))
        return _Spy(real(path, *args, **kwargs), log)

    monkeypatch.setattr(loader, "safe_open", spying_open)
    return log


@pytest.mark.parametrize("expert_parallel", [EP, MOE_TP], ids=["ep", "moe-tp"])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_reads_and_holds_its_slices_only(checkpoints, reads, expert_parallel, rank):
    """As stored: the loaded bytes are `rank_weights`'s; a split tensor is only ever read as a slice."""
    path = checkpoints[_checkpoint_key("flash", ALIGNED)]
    cfg, par = load_config(path), Parallelism(2, 1, expert_parallel)
    # bf16: the bf16 tensors as stored (fp32 ones come back fp32, int64 ones int64, FP8 / FP4 entries as stored)
    tensors = load_checkpoint(path, cfg, dtype=torch.bfloat16, keep_quantized=True, parallelism=par, rank=rank)
    assert sum(t.nbytes for t in tensors.values()) == rank_weights(cfg, par, rank).total
    whole_on_rank = set()
    for spec in checkpoint_tensors(cfg):
        index = shard(spec, par, rank, cfg)
        if index is not None and tuple(s.stop - s.start for s in index) == spec.shape:
            whole_on_rank.update(name for name, _, _ in file_entries(spec))
    read_whole = {name for how, name in reads if how == "whole"}
    assert read_whole == whole_on_rank
    assert "embed.weight" not in read_whole and "layers.0.attn.wq_b.weight" not in read_whole


def test_slices_of_an_unaligned_checkpoint(checkpoints):
    """The tiny flash (64-row output groups, 48-row shared-expert slices: FP8 slices inside a 128-block):
    every tensor has its slice's shape, dequantized from the right scales even when kept quantized, and
    another rank's experts are absent."""
    path = checkpoints[_checkpoint_key("flash", {})]
    cfg, par = load_config(path), Parallelism(2, 1, EP)
    whole = load_checkpoint(path, cfg)
    for keep in (False, True):
        tensors = load_checkpoint(path, cfg, keep_quantized=keep, parallelism=par, rank=1)
        for spec in checkpoint_tensors(cfg):
            index = shard(spec, par, 1, cfg)
            if index is None:
                assert spec.key not in tensors and f"{spec.name}.scale" not in tensors, spec.name
            elif not keep or f"{spec.name}.scale" not in tensors:
                assert torch.equal(tensors[spec.key], whole[spec.key][index]), spec.name
    assert "layers.0.ffn.experts.3.w1.weight" not in tensors and "layers.0.ffn.experts.4.w1.scale" in tensors


@pytest.mark.parametrize("par, field", [
    (Parallelism(3), "num_attention_heads"),  # 8 heads
    (Parallelism(4, 1, True), "o_groups"),  # 2 groups
    (Parallelism(1, 3, True), "n_routed_experts"),  # 8 experts over 3 ranks
    (Parallelism(2), "moe_intermediate_size"),  # 96 / 2 = 48: not whole 32-column FP4 scale groups
])
def test_sizes_that_do_not_divide_fail_before_reading(checkpoints, reads, par, field):
    path = checkpoints[_checkpoint_key("flash", {})]
    with pytest.raises(ConfigError, match=field):
        load_checkpoint(path, parallelism=par, rank=0)
    assert reads == []  # no shard was even opened


def test_a_slice_model_needs_its_group(checkpoints):
    """A rank's slices with one-rank collectives: a clear error instead of wrong shapes."""
    path = checkpoints[_checkpoint_key("flash", {})]
    rank0 = load_checkpoint(path, parallelism=Parallelism(2, 1, EP), rank=0)
    model = V4Model(load_config(path), rank0, quant=QuantSim.off(), collectives=SINGLE)
    with pytest.raises(ValueError, match="4 of the 8 num_attention_heads"):
        model.forward(torch.tensor([1, 2]))
