"""Tensor and expert parallelism under SGLang: which of its parallel layouts the plugin serves, and the core's
`Collectives` over SGLang's own tensor-parallel group.

`--tp-size T` splits attention heads, output groups, the shared expert and the vocabulary over T ranks
(`v4_plugin.checkpoint.sharding`); the routed experts split by intermediate dimension, or by expert range with
`--ep-size T`. Every rank runs every step on the same tokens and holds the whole KV cache of its sequences (V4
attention has one KV head), so each rank's pool is the one-rank pool. `--dp-size N` (replicas, each with its own
TP group) is served the same way; attention data parallelism (`--attn-dp-size`, `--enable-dp-attention`),
context and pipeline parallelism and MoE data parallelism are refused: the core's collectives are one group in
which every rank sees the same tokens (`v4_plugin.runtime.parallel`).
"""

from __future__ import annotations

import torch

from v4_plugin.checkpoint.config import V4Config
from v4_plugin.checkpoint.sharding import Parallelism, check_parallelism
from v4_plugin.runtime.parallel import SINGLE, Collectives

from . import PROJECT


def served_parallelism(args, cfg: V4Config) -> Parallelism:
    """The core's `Parallelism` of SGLang's resolved server arguments `args` (read in the launching process,
    before any scheduler starts), or a `ValueError` naming the argument the plugin cannot serve, or
    (`check_parallelism`) a `ConfigError` naming the config field a size does not divide."""
    from sglang.srt.runtime_context import parallel_widths_of

    refused = {"--pp-size": args.pp_size, "--attn-dp-size": args.attn_dp_size, "--attn-cp-size": args.attn_cp_size,
               "--dcp-size": args.dcp_size, "--moe-dp-size": args.moe_dp_size}
    for flag, size in refused.items():
        if size > 1:
            raise ValueError(f"{PROJECT}: {flag} {size} is not served: the plugin runs DeepSeek-V4 with tensor "
                             "parallelism (--tp-size), optionally expert parallelism over the same ranks (--ep-size "
                             "equal to --tp-size), and data-parallel replicas (--dp-size without attention data "
                             "parallelism)")
    tp, ep = args.tp_size, parallel_widths_of(args)["moe_ep_size"]
    if ep not in (1, tp):
        raise ValueError(f"{PROJECT}: --ep-size {ep} is not served with --tp-size {tp}: the routed experts split "
                         "over every tensor-parallel rank, by range (--ep-size equal to --tp-size) or by "
                         "intermediate dimension (--ep-size 1)")
    par = Parallelism(tp, 1, ep > 1)
    check_parallelism(cfg, par, where=f"--tp-size {tp}" + (f" --ep-size {ep}" if ep > 1 else ""))
    return par


class GroupCollectives:
    """The core's `Collectives` over an SGLang `GroupCoordinator`: its all-reduce and all-gather (on a CPU,
    SGLang's shared-memory kernels where it has them, AMX or arm64, else torch.distributed over gloo)."""

    def __init__(self, group):
        self.group, self.rank, self.size = group, group.rank_in_group, group.world_size

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(t.contiguous())

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return self.group.all_gather(t.contiguous(), dim)

    def __repr__(self) -> str:
        return f"GroupCollectives({self.group.unique_name}, rank={self.rank}, size={self.size})"


def rank_parallelism() -> tuple[Parallelism | None, Collectives]:
    """In a scheduler: this rank's `Parallelism` (None at one rank) and the collectives of its tensor-parallel
    group, from SGLang's parallel state (`served_parallelism` accepted the layout at launch)."""
    from sglang.srt.distributed.parallel_state import get_moe_expert_parallel_world_size, get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return None, SINGLE
    return Parallelism(group.world_size, 1, get_moe_expert_parallel_world_size() > 1), GroupCollectives(group)


def describe(par: Parallelism | None, comm: Collectives) -> str:
    """What this rank serves, for the startup line: '' at one rank."""
    if par is None:
        return ""
    experts = "by range" if par.expert_parallel else "by intermediate dimension"
    return f", tensor-parallel rank {comm.rank} of {comm.size} (routed experts split {experts})"
