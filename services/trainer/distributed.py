"""Data parallelism for the learner: one process per device, launched by torchrun (or any launcher that
initialises ``torch.distributed``); on a single process everything here is a no-op.

How the learner splits work so that N processes make exactly the update one process makes on the
same batch (up to float summation order):

* every process receives the same global batch of rollouts and collates all of it (same padding);
* the no-grad passes (reference logprobs, old logprobs, values) run on rows ``rank::world`` and are
  all-gathered, so advantages and their whitening use the statistics of the whole batch;
* minibatches are drawn from one permutation seeded identically on every process; process ``r``
  computes rows ``r::world`` of each minibatch;
* each process's loss is its sum over its tokens divided by the token count of the *whole*
  minibatch, times ``world``; DistributedDataParallel averages gradients (divides by ``world``),
  so the result is the token mean over the whole minibatch, as on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def context() -> DistContext:
    """This process's rank and the world size (0 / 1 unless torch.distributed is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext()


def init_from_env(backend: str | None = None) -> DistContext:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...).

    Without WORLD_SIZE > 1 it does nothing. ``backend`` defaults to nccl with CUDA, else gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return context()


def wrap_for_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """``module`` in DistributedDataParallel when running data-parallel, else unchanged."""
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = None
    if next(module.parameters()).is_cuda:
        device_ids = [next(module.parameters()).device.index]
    # DDP broadcasts rank 0's parameters and buffers at construction: every process starts equal.
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    return (
        module.module
        if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel)
        else module
    )


def shard_rows(n_rows: int, ctx: DistContext) -> list[int]:
    """Rows this process computes out of ``n_rows``: ``rank::world``."""
    return list(range(ctx.rank, n_rows, ctx.world_size))


def all_gather_rows(local: torch.Tensor, n_rows: int, ctx: DistContext) -> torch.Tensor:
    """Inverse of ``shard_rows``: each process holds its rows ``rank::world`` of an (n_rows, ...) tensor;
    returns the whole tensor on every process."""
    if not ctx.enabled:
        return local
    per_rank = -(-n_rows // ctx.world_size)
    padded = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded)
    out = torch.empty((n_rows, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for rank, part in enumerate(gathered):
        rows = shard_rows(n_rows, DistContext(rank, ctx.world_size))
        out[rows] = part[: len(rows)]
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
