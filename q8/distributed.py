"""One process per device: torchrun / SLURM environments, and synchronized normalization."""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .layers import QBatchNormNd, RangeBatchNormNd


def setup(device: str = "auto") -> tuple[int, int, torch.device, bool]:
    """Join the process group that WORLD_SIZE / RANK / MASTER_ADDR describe (env://).

    Returns (rank, world, device, initialized_here); gloo on CPU, nccl on CUDA.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialized_here = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
        initialized_here = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local), initialized_here
    return rank, world, torch.device("cpu"), initialized_here


def sync_norms(model: nn.Module) -> nn.Module:
    """Global-batch statistics for every normalization: Range BN synchronizes itself, plain
    nn.BatchNorm1d/2d/3d becomes nn.SyncBatchNorm. Call after q8.convert, before DDP."""
    for name, child in list(model.named_children()):
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        elif isinstance(child, RangeBatchNormNd):
            child.process_group = dist.group.WORLD
        elif isinstance(child, QBatchNormNd):
            warnings.warn(f"{name}: quantized standard BN keeps per-process statistics under DDP", stacklevel=2)
        else:
            sync_norms(child)
    return model


def all_sum(values: list[float], device) -> list[float]:
    """Sum numbers over processes (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def env_rank() -> int:
    """This process's rank before any process group exists (torchrun / SLURM via submitit set RANK)."""
    return int(os.environ.get("RANK", "0"))


def any_true(flag: bool, device) -> bool:
    """True on every process if it is True on any (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
