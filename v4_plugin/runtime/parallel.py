"""The collectives a tensor-parallel `V4Model` runs, as one small interface the adapters implement with their
framework's communicators (vLLM: `tensor_model_parallel_all_reduce` / `_all_gather`; SGLang: its attention-TP
and MoE groups), so that the core stays framework-free.

A model built over rank r's slices of the checkpoint (`load_checkpoint(..., parallelism=, rank=)`, split as
`v4_plugin.checkpoint.sharding` says) calls them at four places, every rank with the same shapes:

* `all_reduce` of the attention output after `wo_b` ([T, D]: each rank's heads' share of it, `Block._attend`);
* `all_reduce` of the MoE output ([T, D]: the rank's routed experts, or its slice of every expert's intermediate
  dimension, plus its slice of the shared expert, `Block._moe`);
* `all_reduce` of the embeddings ([T, D]: the rows of the rank's vocabulary slice, zero elsewhere, `V4Model.embed`);
* `all_gather` of the head's logits over the vocabulary (fp32 [T, ceil(V / size)] per rank, the last one padded,
  `V4Model._head_logits`).

All ranks of the group see the same tokens (attention data parallelism is not modelled here): the MoE group is the
attention tensor-parallel group. On one rank `SINGLE` is the identity and the model is exactly the unsharded one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist


@runtime_checkable
class Collectives(Protocol):
    """The tensor-parallel group of one model replica: `size` ranks, this one `rank` (0 ... size-1), numbered as
    `sharding.shard` numbers the attention tensor-parallel ranks."""

    rank: int
    size: int

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `t` over the ranks (same shape and dtype on every rank); may reuse `t`'s memory."""

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' `t` (same shape on every rank) concatenated along `dim` in rank order."""


class Single:
    """One rank: both collectives are the identity (no copy)."""

    rank, size = 0, 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return t

    def __repr__(self) -> str:
        return "SINGLE"


SINGLE = Single()


class TorchDistributed:
    """`Collectives` over a `torch.distributed` process group (the default group when `group` is None), for the
    tests over gloo and for adapters that hold a plain process group. gloo reduces fp32 / bf16 on the CPU; NCCL
    on GPUs."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=dim)

    def __repr__(self) -> str:
        return f"TorchDistributed(rank={self.rank}, size={self.size})"
