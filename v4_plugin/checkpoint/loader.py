"""Load a DeepSeek-V4 checkpoint directory: validate its inventory, then dequantize (spec §9).

A checkpoint is `model.safetensors.index.json` plus the shards its `weight_map` names, or a single
`model.safetensors`, next to a `config.json`. `inspect_checkpoint` checks the whole inventory against
`schema.checkpoint_tensors` from the safetensors headers alone (no tensor data is read), so a wrong,
missing or corrupt tensor fails before any weight is loaded, with a message that names the tensor
and the shard file. `load_checkpoint` then returns the dequantized tensors under their official
names (or, with a `Parallelism` and a rank, only that rank's slices of them, read as slices);
`iter_checkpoint_files` streams the raw file tensors for framework loaders.

Checkpoints written by transformers' `save_pretrained` (recognised from `config.json`) are read,
renamed to the official names by `hf_tensors` and validated against the same inventory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from v4_plugin.checkpoint import hf_config, hf_tensors
from v4_plugin.checkpoint.config import WEIGHT_BLOCK, V4Config, load_config
from v4_plugin.checkpoint.quant import dequantize_weight_fp4, dequantize_weight_fp8
from v4_plugin.checkpoint.schema import Format, TensorSpec, checkpoint_tensors, file_entries
from v4_plugin.checkpoint.sharding import (Parallelism, check_parallelism, expert_range, file_slices,
                                           fp8_block_aligned, shard)

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MAX_LISTED_PROBLEMS = 20

# safetensors header dtype codes <-> torch dtypes.
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_CODES = {dtype: code for code, dtype in _ST_DTYPES.items()}
_FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})


class CheckpointError(ValueError):
    """A checkpoint whose files do not match its config; the message names the tensor and the shard file."""


@dataclass(frozen=True)
class StoredTensor:
    """Where and how one file tensor is stored, as read from a safetensors header."""

    shard: str  # file name inside the checkpoint directory
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: "F8_E4M3", "F8_E8M0", "I8", "BF16", "F32", "I64", ...


def decode_tensor(spec: TensorSpec, parts: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Turn the file entries of one logical tensor (in `file_entries` order) into its value.

    FP8 (e4m3 [out, in] + E8M0 [ceil(out/128), ceil(in/128)]) and FP4 (packed int8 [out, in/2] + E8M0
    [out, in/32]) are dequantized to `dtype`; BF16 and unquantized linears are cast to `dtype`;
    FP32 tensors come back fp32 and int64 tensors unchanged. The result has the logical shape.
    """
    if spec.format in (Format.FP8, Format.FP4):
        return dequantize_linear(*parts, dtype)
    (value,) = parts
    if spec.format is Format.FP32:
        return value.float()
    if spec.format is Format.I64:
        return value
    return value.to(dtype)


def dequantize_linear(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A quantized linear's file entries -> its values [out, in] in `dtype`: FP8 (e4m3 [out, in] + E8M0
    [ceil(out/128), ceil(in/128)]) or, told apart by the int8 weight, FP4 (packed [out, in/2] + E8M0 [out, in/32])."""
    if weight.dtype == torch.int8:
        return dequantize_weight_fp4(weight, scale).to(dtype)
    return dequantize_weight_fp8(weight, scale).to(dtype)


# ---- locating the shards ------------------------------------------------------------------------
def _checkpoint_dir(path: str | Path) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    return root


def _weight_map(root: Path) -> dict[str, str] | None:
    """The index's tensor name -> shard file map, or None for a single-file checkpoint."""
    index = root / INDEX_FILE
    if not index.exists():
        if (root / SINGLE_FILE).exists():
            return None
        raise CheckpointError(f"{root}: neither {INDEX_FILE} nor {SINGLE_FILE} is present")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def _shards(root: Path, weight_map: Mapping[str, str] | None) -> list[str]:
    """Shard file names in sorted order; every shard the index names must exist."""
    if weight_map is None:
        return [SINGLE_FILE]
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (root / shard).is_file():
            raise CheckpointError(f"{root}: shard {shard} is missing{_listed_in(shard, weight_map)}")
    return shards


def _listed_in(shard: str, weight_map: Mapping[str, str] | None) -> str:
    """A note on which tensors the index says a shard holds (for error messages)."""
    names = [name for name, s in (weight_map or {}).items() if s == shard]
    if not names:
        return ""
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return f" ({INDEX_FILE} maps '{names[0]}'{more} to it)"


@contextlib.contextmanager
def _open_shard(root: Path, shard: str, weight_map: Mapping[str, str] | None) -> Iterator:
    """`safe_open` one shard (PyTorch tensors, CPU); a file safetensors cannot parse is a CheckpointError."""
    try:
        handle = safe_open(root / shard, framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{root}: shard {shard} cannot be read by safetensors (truncated or corrupt: {e})"
            f"{_listed_in(shard, weight_map)}"
        ) from None
    with handle as f:
        yield f


# ---- validation ---------------------------------------------------------------------------------
def _read_headers(
    root: Path, shards: Sequence[str], weight_map: Mapping[str, str] | None
) -> dict[str, StoredTensor]:
    """Every tensor in every shard, from the headers only; a name stored twice is an error."""
    found: dict[str, StoredTensor] = {}
    for shard in shards:
        with _open_shard(root, shard, weight_map) as f:
            for name in f.keys():
                info = f.get_slice(name)
                if name in found:
                    raise CheckpointError(f"{root}: tensor '{name}' is stored in {found[name].shard} and in {shard}")
                found[name] = StoredTensor(shard, tuple(info.get_shape()), info.get_dtype())
    return found


def _index_problems(found: Mapping[str, StoredTensor], weight_map: Mapping[str, str] | None) -> list[str]:
    """Disagreements between the index's `weight_map` and what the shards actually hold."""
    if weight_map is None:
        return []
    problems = []
    for name, shard in weight_map.items():
        if name not in found:
            problems.append(f"{shard}: tensor '{name}' is missing ({INDEX_FILE} maps it to this shard)")
        elif found[name].shard != shard:
            problems.append(f"{shard}: tensor '{name}' is in {found[name].shard}, but {INDEX_FILE} maps it to {shard}")
    unlisted = [(name, t.shard) for name, t in found.items() if name not in weight_map]
    problems += [f"{shard}: tensor '{name}' is not listed in {INDEX_FILE}" for name, shard in unlisted]
    return problems


def _is_mtp(name: str) -> bool:
    return name.startswith("mtp.")


def _dtype_problem(name: str, t: StoredTensor, want: torch.dtype | None, fmt: Format, quantized: bool) -> str | None:
    """None if `t`'s dtype is acceptable; `want` None (or an unquantized checkpoint's float entry) = any float."""
    relaxed = want is None or (not quantized and fmt in (Format.BF16, Format.FP32))
    if relaxed:
        ok, expected = t.dtype in _FLOAT_CODES, "a float dtype"
    else:
        ok, expected = t.dtype == _ST_CODES[want], _ST_CODES[want]
    return None if ok else f"{t.shard}: tensor '{name}' has dtype {t.dtype}, expected {expected}"


def _inventory_problems(found: Mapping[str, StoredTensor], cfg: V4Config, include_mtp: bool) -> list[str]:
    """Missing, misshapen, mistyped and unexpected tensors; `mtp.*` tensors are skipped unless include_mtp."""
    problems, expected = [], set()
    previous: tuple[str, StoredTensor] | None = None  # last present tensor, to say where a missing one belongs
    for spec in checkpoint_tensors(cfg, include_mtp=True):
        for name, shape, dtype in file_entries(spec):
            expected.add(name)
            if _is_mtp(name) and not include_mtp:
                continue
            t = found.get(name)
            if t is None:
                where = f"; the tensor before it, '{previous[0]}', is in {previous[1].shard}" if previous else ""
                problems.append(f"tensor '{name}' is missing: no shard holds it{where}")
                continue
            previous = (name, t)
            if t.shape != shape:
                problems.append(f"{t.shard}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
            elif (p := _dtype_problem(name, t, dtype, spec.format, cfg.quantized)) is not None:
                problems.append(p)
    for name, t in found.items():
        if name not in expected and (include_mtp or not _is_mtp(name)):
            problems.append(f"{t.shard}: unexpected tensor '{name}' {list(t.shape)} {t.dtype} (not in the schema)")
    return problems


def _raise_if(problems: Sequence[str], where: str) -> None:
    if not problems:
        return
    shown = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    raise CheckpointError(f"{where}: {len(problems)} problem(s) with the checkpoint tensors:\n  {shown}{more}")


def inspect_checkpoint(path: str | Path, cfg: V4Config, include_mtp: bool = True) -> dict[str, StoredTensor]:
    """Validate an official-format checkpoint directory against `cfg` from the safetensors headers only.

    Checks that the index (or `model.safetensors`) is readable, that every shard it names exists and
    parses, that the index agrees with the shards, and that every entry of `checkpoint_tensors(cfg)`
    is present with the right shape and dtype (any float dtype for the BF16/FP32 entries of an
    unquantized checkpoint), with nothing unexpected. `mtp.*` tensors are skipped when not
    `include_mtp`. Returns the inventory: file tensor name -> `StoredTensor`.
    Raises `CheckpointError` naming each bad tensor and its shard.
    """
    root = _checkpoint_dir(path)
    weight_map = _weight_map(root)
    found = _read_headers(root, _shards(root, weight_map), weight_map)
    _raise_if(_index_problems(found, weight_map), str(root))
    _raise_if(_inventory_problems(found, cfg, include_mtp), str(root))
    return found


def validate_checkpoint(path: str | Path) -> V4Config:
    """Everything about a checkpoint directory that can be checked before a weight is read, for the
    adapters to run when their framework builds its config (before any worker starts).

    Parses `config.json` (`ConfigError` naming the file and field). When the weights are present (an
    index or `model.safetensors`): every shard the index names exists, the shards' headers agree with
    the index, and (official format) the tensor inventory matches the config, `mtp.*` not required
    (`CheckpointError` naming the file, shard and tensor). Header reads only. Returns the config."""
    root = _checkpoint_dir(path)
    cfg = load_config(root)
    if not (root / INDEX_FILE).exists() and not (root / SINGLE_FILE).exists():
        return cfg  # weights not here yet: checked when they are loaded
    if not hf_config.is_transformers_dialect(_read_config(root) or {}):
        inspect_checkpoint(root, cfg, include_mtp=False)
        return cfg
    weight_map = _weight_map(root)  # transformers dialect: its names are checked once converted, at load
    found = _read_headers(root, _shards(root, weight_map), weight_map)
    _raise_if(_index_problems(found, weight_map), str(root))
    return cfg


# ---- loading ------------------------------------------------------------------------------------
def iter_checkpoint_files(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (file name, tensor) for every tensor of every shard, raw as stored, one shard at a time."""
    root = _checkpoint_dir(path)
    weight_map = _weight_map(root)
    for shard in _shards(root, weight_map):
        with _open_shard(root, shard, weight_map) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _read_config(root: Path) -> dict | None:
    """The raw `config.json` content, or None if the directory has none."""
    path = root / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


_ROUTED_EXPERT = re.compile(r"(?P<layer>.+\.ffn\.experts)\.(?P<e>\d+)\.(?P<entry>w[123]\.(weight|scale))")


class _ExpertStacks:
    """Routed experts' file entries, kept quantized, written into one [E, ...] tensor per layer and entry;
    each expert's entry is a view of it, so the GEMM kernels get the stack without a copy
    (`model.Weights.moe`). Under expert parallelism a rank's stack holds its experts `held` only."""

    def __init__(self, held: range, device: torch.device | str):
        self.held, self.device = held, device
        self.stacks: dict[str, torch.Tensor] = {}

    def place(self, name: str, entry: torch.Tensor) -> torch.Tensor:
        """`entry` (file entry `name`) in its stack when it is a routed expert's, else moved to the device."""
        m = _ROUTED_EXPERT.fullmatch(name)
        if m is None:
            return entry.to(self.device)
        key = f"{m['layer']}.{m['entry']}"
        if key not in self.stacks:
            self.stacks[key] = torch.empty((len(self.held), *entry.shape), dtype=entry.dtype, device=self.device)
        slot = self.stacks[key][self.held.index(int(m["e"]))]
        slot.copy_(entry)
        return slot


Reader = Callable[[str, tuple[slice, ...] | None], torch.Tensor]  # (file name, slice or None = whole) -> entry


def _decode_all(
    cfg: V4Config, include_mtp: bool, read: Reader, dtype: torch.dtype, keep_quantized: bool, only_mtp: bool,
    device: torch.device | str, par: Parallelism | None = None, rank: int = 0,
) -> dict[str, torch.Tensor]:
    """Decode every logical tensor, or only the `mtp.*` ones (FP8 / FP4 linears kept as their file entries if
    `keep_quantized`, routed experts' in per-layer stacks), each moved to `device` as it is done;
    `read(file_name, index)` supplies the raw file entries, whole (index None) or the slice `index`.

    With `par`, only `rank`'s slices (`sharding.shard`) are read and returned, under the same names, with
    their local shapes; a slice of an FP8 linear that does not start on a 128-block edge is dequantized
    even with `keep_quantized` (its local blocks would straddle stored scales; the shipped configs never
    slice so at the TP sizes `check_parallelism` accepts, the tiny test checkpoints do)."""
    out: dict[str, torch.Tensor] = {}
    stacks = _ExpertStacks(expert_range(cfg, par, rank) if par is not None else range(cfg.n_routed_experts), device)
    straddling = []
    for spec in checkpoint_tensors(cfg, include_mtp=include_mtp):
        if only_mtp and not _is_mtp(spec.key):
            continue
        names = [name for name, _, _ in file_entries(spec)]
        index = None if par is None else shard(spec, par, rank, cfg)
        if par is not None and index is None:
            continue  # another rank's expert
        if index is not None and tuple(s.stop - s.start for s in index) == spec.shape:
            index = None  # replicated, or whole on this rank
        if index is None:
            parts = [read(name, None) for name in names]
        else:
            parts = [read(name, part) for name, part in zip(names, file_slices(spec, index))]
        if index is not None and spec.format is Format.FP8 and not fp8_block_aligned(index):
            straddling.append(spec.name)
            offset = tuple(s.start % WEIGHT_BLOCK for s in index)
            out[spec.key] = dequantize_weight_fp8(*parts, offset=offset).to(dtype).to(device)
        elif keep_quantized and spec.format in (Format.FP8, Format.FP4):
            out.update((name, stacks.place(name, part)) for name, part in zip(names, parts))
        else:
            out[spec.key] = decode_tensor(spec, parts, dtype).to(device)
    if straddling and keep_quantized:
        logger.info("rank %d of %s: %d FP8 slices do not start on a 128-block edge (e.g. %s): dequantized to %s",
                    rank, par, len(straddling), straddling[0], dtype)
    return out


def _load_official(root: Path, cfg: V4Config, include_mtp: bool, dtype: torch.dtype, keep_quantized: bool,
                   only_mtp: bool, device: torch.device | str, par: Parallelism | None,
                   rank: int) -> dict[str, torch.Tensor]:
    """Validate from the headers, then read tensors (or `rank`'s slices) in schema order with one shard open
    at a time."""
    inventory = inspect_checkpoint(root, cfg, include_mtp)
    skipped = sum(_is_mtp(name) for name in inventory) if not include_mtp else 0
    if skipped:
        what = "DSpark drafter" if cfg.dspark is not None else "MTP"
        logger.info("%s: skipping the %d %s tensors (mtp.*): no drafting requested", root, skipped, what)
    with contextlib.ExitStack() as stack:
        current: dict[str, Any] = {}  # the one open shard: file name -> safetensors handle

        def read(name: str, index: tuple[slice, ...] | None) -> torch.Tensor:
            shard = inventory[name].shard
            if shard not in current:
                stack.close()
                current.clear()
                current[shard] = stack.enter_context(_open_shard(root, shard, None))
            f = current[shard]
            return f.get_tensor(name) if index is None else f.get_slice(name)[index]

        return _decode_all(cfg, include_mtp, read, dtype, keep_quantized, only_mtp, device, par, rank)


def _load_transformers(root: Path, raw_config: dict, cfg: V4Config, dtype: torch.dtype, keep_quantized: bool,
                       only_mtp: bool, device: torch.device | str, par: Parallelism | None,
                       rank: int) -> dict[str, torch.Tensor]:
    """A `save_pretrained` checkpoint: read all tensors, rename to official names, validate, cast (and, with
    `par`, keep `rank`'s slices: this dialect is converted whole in host memory first)."""
    where = f"{root} (transformers dialect, converted to official names)"
    try:
        tensors = hf_tensors.state_dict_from_transformers(dict(iter_checkpoint_files(root)), raw_config)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    found = {
        name: StoredTensor("<converted>", tuple(t.shape), _ST_CODES.get(t.dtype, str(t.dtype)))
        for name, t in tensors.items()
    }
    _raise_if(_inventory_problems(found, cfg, include_mtp=False), where)
    def read(name: str, index: tuple[slice, ...] | None) -> torch.Tensor:
        return tensors[name] if index is None else tensors[name][index]

    return _decode_all(cfg, False, read, dtype, keep_quantized, only_mtp, device, par, rank)


def load_checkpoint(
    path: str | Path, cfg: V4Config | None = None, *, dtype: torch.dtype = torch.float32, include_mtp: bool = True,
    keep_quantized: bool = False, only_mtp: bool = False, device: torch.device | str = "cpu",
    parallelism: Parallelism | None = None, rank: int = 0,
) -> dict[str, torch.Tensor]:
    """Validate and load a checkpoint directory; returns dequantized tensors by official name, in schema order.

    Linears come back as `<name>.weight` [out, in] in `dtype` (FP8 and FP4 dequantized; no `.scale`
    entries), BF16 tensors cast to `dtype`, FP32 tensors as fp32, `tid2eid` as int64. With
    `keep_quantized`, FP8 and FP4 linears are instead their raw file entries `<name>.weight` (e4m3, or
    packed int8) and `<name>.scale` (E8M0), for the GEMM kernels (`dispatch.keep_quantized`). With
    `only_mtp` (and `include_mtp`), only the `mtp.*` tensors are read (a draft model's). Each tensor is
    moved to `device` as soon as it is decoded (official format: the host holds one at a time). `cfg` defaults
    to the directory's `config.json`. A transformers-dialect checkpoint (no MTP) is converted and
    validated against `checkpoint_tensors(cfg, include_mtp=False)`. Raises `CheckpointError`.

    With `parallelism`, only what `rank` holds under it (`sharding.shard`: query heads, output groups, experts
    or their intermediate slices, vocabulary rows) is read, through safetensors slices, so no rank reads a
    whole tensor it does not hold; each comes back under its official name with its local shape. Kept-quantized
    FP8 slices carry the scales of the 128 x 128 blocks they touch, FP4 expert slices whole 32-column scale
    groups; an FP8 slice that does not start on a block edge is dequantized instead (see `_decode_all`).
    Routed experts another rank owns are absent. `check_parallelism` runs first: a size that does not divide
    is a `ConfigError` naming the config field, before any tensor is read.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a float dtype, got {dtype}")
    root = _checkpoint_dir(path)
    raw_config = _read_config(root)
    cfg = cfg if cfg is not None else load_config(root)
    if parallelism is not None:
        check_parallelism(cfg, parallelism, where=f"{root} with {parallelism}")
        if not 0 <= rank < parallelism.world:
            raise ValueError(f"rank {rank} is not one of the {parallelism.world} ranks of {parallelism}")
    if raw_config is not None and hf_config.is_transformers_dialect(raw_config):
        return _load_transformers(root, raw_config, cfg, dtype, keep_quantized, only_mtp, device, parallelism, rank)
    return _load_official(root, cfg, include_mtp, dtype, keep_quantized, only_mtp, device, parallelism, rank)
