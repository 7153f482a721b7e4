"""One process per device: torchrun / SLURM environments, and synchronized normalization."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from .layers import (QBatchNormNd, RangeBatchNormNd, SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d, SyncBatchNormNd,
                     adopt)

SYNC_OF = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm3d: SyncBatchNorm3d}


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
    """Global-batch statistics for every batch norm: Range BN and the quantized standard BN
    synchronize themselves over the process group; a float nn.BatchNorm1d/2d/3d becomes
    q8.layers.SyncBatchNorm1d/2d/3d (any device and backend; torch's nn.SyncBatchNorm raises on
    CPU) with the same Parameters and buffers. Call after q8.convert, before DDP."""
    for name, child in list(model.named_children()):
        if type(child) in SYNC_OF:
            new = SYNC_OF[type(child)](child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats, device="meta")
            child = adopt(new, child)
            setattr(model, name, child)
        if isinstance(child, (RangeBatchNormNd, QBatchNormNd, SyncBatchNormNd)):
            child.process_group = dist.group.WORLD
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
