"""Tiny checkpoints in the official on-disk format, and the loader's checks (spec §9, §15 items 36-37)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from v4_plugin.checkpoint import loader as ckpt
from v4_plugin.checkpoint import hf_config, hf_tensors
from v4_plugin.checkpoint.loader import (
    INDEX_FILE,
    CheckpointError,
    inspect_checkpoint,
    iter_checkpoint_files,
    load_checkpoint,
)
from v4_plugin.checkpoint.config import load_config, parse_config, preset_config
from v4_plugin.checkpoint.schema import Format, checkpoint_tensors, file_entries
from v4_plugin.checkpoint.tiny import TINY_PRESETS, make_tiny, random_weights, write_checkpoint

@pytest.fixture(scope="module", params=["flash", "pro"])
def tiny(request, tmp_path_factory):
    """(preset, config, checkpoint directory) written with seed 0."""
    path = make_tiny(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param, seed=0)
    return request.param, parse_config(TINY_PRESETS[request.param]), path


@pytest.fixture(scope="module")
def flash_pristine(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("flash-pristine"), "flash", seed=0)


@pytest.fixture()
def flash_copy(flash_pristine, tmp_path):
    """A fresh, writable copy of the tiny flash checkpoint for one test to break."""
    return shutil.copytree(flash_pristine, tmp_path / "ckpt"), parse_config(TINY_PRESETS["flash"])


def _index(path: Path) -> dict:
    return json.loads((path / INDEX_FILE).read_text())


def _write_index(path: Path, index: dict) -> None:
    (path / INDEX_FILE).write_text(json.dumps(index))


def _rewrite_shard(path: Path, name: str, edit) -> str:
    """Apply edit(tensors dict) to the shard holding `name`; returns that shard's file name."""
    shard = _index(path)["weight_map"][name]
    tensors = load_file(path / shard)
    edit(tensors)
    save_file(tensors, path / shard, metadata={"format": "pt"})
    return shard


def _error(path: Path, cfg, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, cfg, **kw)
    return str(info.value)


# ---- the tiny checkpoints -----------------------------------------------------------------------
def test_load_returns_random_weights_bitwise(tiny):
    _, cfg, path = tiny
    loaded, expected = load_checkpoint(path), random_weights(cfg, seed=0)
    assert list(loaded) == list(expected) == [s.key for s in checkpoint_tensors(cfg)]
    for name, t in expected.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    assert not any(name.endswith(".scale") for name in loaded)
    assert loaded["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert loaded["layers.0.attn.wq_a.weight"].dtype == torch.float32


def test_files_hold_the_official_inventory(tiny):
    _, cfg, path = tiny
    index = _index(path)
    shards = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == shards
    stored, total = {}, 0
    for shard in shards:
        with safe_open(path / shard, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                stored[name] = (shard, tuple(t.shape), t.dtype)
                total += t.nbytes
    entries = [e for spec in checkpoint_tensors(cfg) for e in file_entries(spec)]
    assert list(index["weight_map"]) == [name for name, _, _ in entries]  # schema order
    assert {name: (shape, dtype) for name, shape, dtype in entries} == {n: s[1:] for n, s in stored.items()}
    assert index["weight_map"] == {n: s[0] for n, s in stored.items()}
    assert index["metadata"]["total_size"] == total
    shard_order = [shards.index(index["weight_map"][name]) for name, _, _ in entries]
    assert shard_order == sorted(shard_order)  # contiguous, in schema order
    for spec in checkpoint_tensors(cfg):
        if spec.format in (Format.FP8, Format.FP4):
            assert index["weight_map"][f"{spec.name}.weight"] == index["weight_map"][f"{spec.name}.scale"]
    assert sum(f.stat().st_size for f in path.iterdir()) < 8 * 2**20


def test_formats_and_partial_blocks(tiny):
    preset, cfg, path = tiny
    inv = inspect_checkpoint(path, cfg)
    q_lora = TINY_PRESETS[preset]["q_lora_rank"]
    assert inv["layers.0.attn.wq_b.weight"].dtype == "F8_E4M3"
    assert inv["layers.0.attn.wq_b.scale"].shape == (8 if preset == "flash" else 16, -(-q_lora // 128))
    assert inv["layers.0.attn.wq_a.scale"].shape == (1, 1)  # [96 or 128, 128]
    w2 = inv["layers.3.ffn.experts.7.w2.weight"]  # [128, 96] packed two codes per byte
    assert (w2.shape, w2.dtype) == ((128, 48), "I8")
    assert inv["layers.3.ffn.experts.7.w2.scale"].shape == (128, 3)
    assert inv["layers.2.attn.compressor.wkv.weight"].dtype == "BF16"
    assert inv["layers.2.attn.indexer.weights_proj.weight"].dtype == "BF16"
    assert inv["layers.4.ffn.gate.bias"].dtype == inv["layers.2.attn.compressor.ape"].dtype == "F32"
    assert inv["mtp.0.e_proj.scale"].shape == (1, 1)


def test_written_config_and_generation_config(tiny):
    preset, cfg, path = tiny
    assert load_config(path) == cfg
    assert TINY_PRESETS[preset]["rope_scaling"] == json.loads(
        (Path(preset_config("flash").source)).read_text())["rope_scaling"]
    assert cfg.quantized and cfg.expert_dtype == "fp4" and cfg.compress_ratios[-1] == 0
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 1.0, "top_p": 1.0}
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) <= cfg.vocab_size


def test_inspect_reads_headers_only(tiny, monkeypatch):
    _, cfg, path = tiny

    class HeaderOnly:
        def __init__(self, *args, **kwargs):
            self._f = safe_open(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_slice(self, name):
            return self._f.get_slice(name)

        def get_tensor(self, name):
            raise AssertionError(f"inspect_checkpoint read the data of {name}")

    monkeypatch.setattr(ckpt, "safe_open", HeaderOnly)
    inventory = inspect_checkpoint(path, cfg)
    assert len(inventory) == sum(len(file_entries(s)) for s in checkpoint_tensors(cfg))


def test_iter_checkpoint_files_yields_raw_entries(tiny):
    _, cfg, path = tiny
    raw = dict(iter_checkpoint_files(path))
    want = {name: (shape, dtype) for s in checkpoint_tensors(cfg) for name, shape, dtype in file_entries(s)}
    assert {name: (tuple(t.shape), t.dtype) for name, t in raw.items()} == want


def test_load_options(tiny):
    _, cfg, path = tiny
    main = load_checkpoint(path, cfg, include_mtp=False, dtype=torch.bfloat16)
    assert list(main) == [s.key for s in checkpoint_tensors(cfg, include_mtp=False)]
    assert main["layers.1.attn.wo_a.weight"].dtype == torch.bfloat16  # FP8 -> bf16
    assert main["layers.1.ffn.experts.0.w1.weight"].dtype == torch.bfloat16  # FP4 -> bf16
    assert main["embed.weight"].dtype == torch.bfloat16
    assert main["layers.1.hc_attn_fn"].dtype == torch.float32  # fp32 kept
    full = random_weights(cfg, seed=0)
    assert torch.equal(main["layers.1.ffn.experts.0.w1.weight"], full["layers.1.ffn.experts.0.w1.weight"].bfloat16())
    drafter = load_checkpoint(path, cfg, only_mtp=True)  # a draft model's tensors alone
    everything = load_checkpoint(path, cfg)
    assert list(drafter) == [k for k in everything if k.startswith("mtp.")] and drafter
    assert all(torch.equal(t, everything[k]) for k, t in drafter.items())


@pytest.mark.parametrize("keep_quantized", [False, True])
def test_tensors_land_on_the_requested_device(tiny, keep_quantized):
    """The adapters load straight onto their device (a GPU's there; "meta" here: the same code path, and
    a tensor left behind on the CPU shows)."""
    _, cfg, path = tiny
    tensors = load_checkpoint(path, cfg, keep_quantized=keep_quantized, device="meta")
    on_cpu = load_checkpoint(path, cfg, keep_quantized=keep_quantized)
    assert {k: (t.shape, t.dtype) for k, t in tensors.items()} == {k: (t.shape, t.dtype) for k, t in on_cpu.items()}
    assert {t.device.type for t in tensors.values()} == {"meta"}


def test_quantized_routed_experts_are_stacked_once(tiny):
    """With keep_quantized the routed experts' file entries are views of one [E, ...] tensor per layer and
    entry, which the MoE GEMM gets as it is (no second copy of the experts); values are the file's."""
    from v4_plugin.runtime.model import Weights

    _, cfg, path = tiny
    tensors = load_checkpoint(path, cfg, keep_quantized=True)
    raw = dict(iter_checkpoint_files(path))
    assert all(torch.equal(t, raw[name]) for name, t in tensors.items() if ".experts." in name)
    prefix, n = "layers.1.ffn", cfg.n_routed_experts
    routed, _ = Weights(tensors, torch.float32).moe(prefix, n).packed()
    for stack, part in zip(routed, ("w1.weight", "w1.scale", "w2.weight", "w2.scale", "w3.weight", "w3.scale")):
        entries = [tensors[f"{prefix}.experts.{e}.{part}"] for e in range(n)]
        assert stack.data_ptr() == entries[0].data_ptr()  # the loader's stack itself
        assert torch.equal(stack, torch.stack(entries))


def test_single_file_checkpoint(flash_copy):
    path, cfg = flash_copy
    merged = dict(iter_checkpoint_files(path))
    for shard in set(_index(path)["weight_map"].values()):
        (path / shard).unlink()
    (path / INDEX_FILE).unlink()
    save_file(merged, path / "model.safetensors")
    loaded = load_checkpoint(path)
    assert all(torch.equal(loaded[k], v) for k, v in random_weights(cfg, seed=0).items())


@pytest.mark.parametrize("num_shards", [1, 7])
def test_shard_counts(tmp_path, num_shards):
    cfg = parse_config(TINY_PRESETS["flash"])
    weights = random_weights(cfg, seed=3)
    write_checkpoint(cfg, weights, tmp_path, num_shards=num_shards)
    assert len(set(_index(tmp_path)["weight_map"].values())) == num_shards
    loaded = load_checkpoint(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())


def test_writer_refusals(tmp_path):
    cfg = parse_config(TINY_PRESETS["flash"])
    weights = random_weights(cfg, seed=0)
    with pytest.raises(ValueError, match="smaller than the test tokenizer"):
        write_checkpoint(parse_config({**TINY_PRESETS["flash"], "vocab_size": 200}), weights, tmp_path)
    with pytest.raises(ValueError, match="layers.0.attn.wq_a.weight"):
        write_checkpoint(cfg, {k: v for k, v in weights.items() if k != "layers.0.attn.wq_a.weight"}, tmp_path)
    with pytest.raises(ValueError, match=r"'norm.weight' has shape \[127\], expected \[128\]"):
        write_checkpoint(cfg, {**weights, "norm.weight": torch.ones(127)}, tmp_path)
    with pytest.raises(ValueError, match="unknown tiny preset"):
        make_tiny(tmp_path, "huge")


def test_determinism(tmp_path, tiny):
    preset, cfg, path = tiny
    again = make_tiny(tmp_path / "again", preset, seed=0)
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (path / name).read_bytes() == (again / name).read_bytes(), name
    other = random_weights(cfg, seed=1)
    ref = random_weights(cfg, seed=0)
    assert all(not torch.equal(other[k], ref[k]) for k in ("embed.weight", "layers.0.attn.wq_a.weight",
                                                           "layers.0.ffn.gate.tid2eid", "mtp.0.e_proj.weight"))


def test_random_weights_are_healthy():
    cfg = parse_config(TINY_PRESETS["flash"])
    w = random_weights(cfg, seed=0)
    assert all(torch.isfinite(t).all() for t in w.values() if t.is_floating_point())
    tid2eid = w["layers.2.ffn.gate.tid2eid"]
    assert tid2eid.shape == (384, 2) and tid2eid.min() >= 0 and tid2eid.max() < 8
    assert (tid2eid[:, 0] != tid2eid[:, 1]).all()
    assert abs(w["embed.weight"].std().item() - 1) < 0.05
    assert abs(w["layers.0.attn.wq_b.weight"].std().item() - 96**-0.5) < 0.01  # N(0, 1/fan_in)
    assert abs(w["layers.0.attn_norm.weight"].mean().item() - 1) < 0.05


# ---- loader errors ------------------------------------------------------------------------------
def test_missing_tensor_still_in_index(flash_copy):
    path, cfg = flash_copy
    name = "layers.2.attn.indexer.wq_b.scale"
    shard = _rewrite_shard(path, name, lambda t: t.pop(name))
    msg = _error(path, cfg)
    assert name in msg and shard in msg and "missing" in msg


def test_missing_tensor_and_index_entry(flash_copy):
    path, cfg = flash_copy
    name = "layers.3.attn.compressor.ape"
    shard = _rewrite_shard(path, name, lambda t: t.pop(name))
    index = _index(path)
    del index["weight_map"][name]
    _write_index(path, index)
    msg = _error(path, cfg)
    assert f"tensor '{name}' is missing" in msg and shard in msg


def test_wrong_shape(flash_copy):
    path, cfg = flash_copy
    name = "layers.1.attn.wkv.weight"
    shard = _rewrite_shard(path, name, lambda t: t.update({name: t[name][:100].contiguous()}))
    msg = _error(path, cfg)
    assert f"{shard}: tensor '{name}' has shape [100, 128], expected [128, 128]" in msg


def test_wrong_dtype(flash_copy):
    path, cfg = flash_copy
    name = "layers.0.attn.q_norm.weight"
    shard = _rewrite_shard(path, name, lambda t: t.update({name: t[name].float()}))
    msg = _error(path, cfg)
    assert f"{shard}: tensor '{name}' has dtype F32, expected BF16" in msg


def test_wrong_dtype_of_a_scale(flash_copy):
    path, cfg = flash_copy
    name = "layers.4.ffn.experts.3.w1.scale"
    shard = _rewrite_shard(path, name, lambda t: t.update({name: torch.ones(t[name].shape)}))
    assert f"{shard}: tensor '{name}' has dtype F32, expected F8_E8M0" in _error(path, cfg)


def test_unexpected_tensor(flash_copy):
    path, cfg = flash_copy
    name = "layers.1.attn.indexer.wq_b.weight"  # CSA-only tensor in an SWA layer
    anchor = "layers.1.attn.wkv.weight"
    shard = _rewrite_shard(path, anchor, lambda t: t.update({name: torch.zeros(256, 96)}))
    index = _index(path)
    index["weight_map"][name] = shard
    _write_index(path, index)
    msg = _error(path, cfg)
    assert f"{shard}: unexpected tensor '{name}'" in msg


def test_tensor_missing_from_index(flash_copy):
    path, cfg = flash_copy
    name = "layers.0.extra"
    shard = _rewrite_shard(path, "layers.0.attn.wkv.weight", lambda t: t.update({name: torch.zeros(2)}))
    msg = _error(path, cfg)
    assert f"{shard}: tensor '{name}' is not listed in {INDEX_FILE}" in msg


def test_extra_mtp_tensor_is_skipped_without_mtp(flash_copy):
    path, cfg = flash_copy
    name = "mtp.0.emb.weight"
    shard = _rewrite_shard(path, "mtp.0.e_proj.weight", lambda t: t.update({name: torch.zeros(4)}))
    index = _index(path)
    index["weight_map"][name] = shard
    _write_index(path, index)
    assert f"{shard}: unexpected tensor '{name}'" in _error(path, cfg)
    assert not any(k.startswith("mtp.") for k in load_checkpoint(path, cfg, include_mtp=False))


def test_truncated_shard(flash_copy):
    path, cfg = flash_copy
    shard = "model-00002-of-00003.safetensors"
    data = (path / shard).read_bytes()
    (path / shard).write_bytes(data[: len(data) // 2])
    first = next(n for n, s in _index(path)["weight_map"].items() if s == shard)
    for call in (lambda: load_checkpoint(path, cfg), lambda: inspect_checkpoint(path, cfg),
                 lambda: list(iter_checkpoint_files(path))):
        with pytest.raises(CheckpointError) as info:
            call()
        msg = str(info.value)
        assert shard in msg and f"'{first}'" in msg and "truncated or corrupt" in msg


def test_index_names_a_missing_shard(flash_copy):
    path, cfg = flash_copy
    index = _index(path)
    index["weight_map"]["norm.weight"] = "model-00004-of-00004.safetensors"
    _write_index(path, index)
    msg = _error(path, cfg)
    assert "shard model-00004-of-00004.safetensors is missing" in msg and "'norm.weight'" in msg


def test_wrong_config_lists_problems(flash_copy):
    """The pro config against the flash files: many problems, each naming tensor and shard."""
    path, _ = flash_copy
    msg = _error(path, parse_config(TINY_PRESETS["pro"]))
    assert "layers.0.attn.compressor.ape' is missing" in msg
    assert "model-00001-of-00003.safetensors: tensor 'layers.0.attn.attn_sink' has shape [8], expected [16]" in msg
    assert "... and" in msg


# ---- unquantized checkpoints --------------------------------------------------------------------
def _unquantized():
    raw = {k: v for k, v in TINY_PRESETS["flash"].items() if k not in ("quantization_config", "expert_dtype")}
    cfg = parse_config(raw)
    return cfg, random_weights(cfg, seed=2)


def test_unquantized_checkpoint_accepts_any_float_dtype(tmp_path):
    cfg, weights = _unquantized()
    assert not cfg.quantized
    write_checkpoint(cfg, weights, tmp_path)
    for name, dtype in (("layers.0.attn.wq_a.weight", torch.float16), ("layers.0.attn_norm.weight", torch.float32),
                        ("layers.0.hc_attn_fn", torch.bfloat16)):
        _rewrite_shard(tmp_path, name, lambda t: t.update({name: t[name].to(dtype)}))
    loaded = load_checkpoint(tmp_path)
    assert torch.equal(loaded["layers.0.attn_norm.weight"], weights["layers.0.attn_norm.weight"])
    assert loaded["layers.0.hc_attn_fn"].dtype == torch.float32
    _rewrite_shard(tmp_path, "layers.0.ffn.gate.tid2eid",
                   lambda t: t.update({"layers.0.ffn.gate.tid2eid": t["layers.0.ffn.gate.tid2eid"].int()}))
    assert "tensor 'layers.0.ffn.gate.tid2eid' has dtype I32, expected I64" in _error(tmp_path, cfg)


def _write_transformers_dialect(path: Path, official_config: dict, weights: dict) -> None:
    """What `save_pretrained` would write: transformers names and config keys, two shards."""
    tensors = hf_tensors.state_dict_to_transformers(weights, official_config)
    names = list(tensors)
    path.mkdir()
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    _write_index(path, {"metadata": {"total_size": 0}, "weight_map": weight_map})
    (path / "config.json").write_text(json.dumps(hf_config.config_to_transformers(official_config)))


def test_transformers_dialect(tmp_path):
    cfg, weights = _unquantized()
    main = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    stored = {k: v.bfloat16() if v.is_floating_point() and k.endswith(".weight") else v for k, v in main.items()}
    _write_transformers_dialect(tmp_path / "hf", cfg.to_dict(), stored)
    loaded = load_checkpoint(tmp_path / "hf")
    assert list(loaded) == [s.key for s in checkpoint_tensors(cfg, include_mtp=False)]
    for name, t in main.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


def test_transformers_dialect_errors(tmp_path):
    cfg, weights = _unquantized()
    main = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    _write_transformers_dialect(tmp_path / "hf", cfg.to_dict(), main)
    shard = _index(tmp_path / "hf")["weight_map"]["model.layers.0.self_attn.sinks"]
    tensors = load_file(tmp_path / "hf" / shard)
    tensors["model.layers.0.self_attn.sinks"] = torch.zeros(7)
    save_file(tensors, tmp_path / "hf" / shard)
    msg = _error(tmp_path / "hf", None)
    assert "transformers dialect" in msg and "model.layers.0.self_attn.sinks" in msg and "(7,)" in msg
