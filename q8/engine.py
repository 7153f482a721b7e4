"""Evaluation and metrics: top-k accuracy summed over every validation example exactly once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import all_sum

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast context of a trainer.precision: off for "32"; bf16 / fp16 mixed precision
    otherwise (q8 layers quantize in float32 and run their products in that dtype)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def correct_topk(output: Tensor, target: Tensor, ks=(1, 5)) -> list[int]:
    """How many rows have the target among the k highest scores, for each k."""
    k_max = min(max(ks), output.shape[1])
    top = output.topk(k_max, dim=1).indices
    hit = top.eq(target.unsqueeze(1))
    return [int(hit[:, : min(k, k_max)].any(1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, channels_last: bool = False, precision: str = "32") -> dict:
    """Loss, top-1 and top-5 (percent) over the whole loader, all processes together."""
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            out = model(x).float()
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        c1, c5 = correct_topk(out, y)
        top1, top5, count = top1 + c1, top5 + c5, count + len(y)
    loss_sum, top1, top5, count = all_sum([loss_sum, top1, top5, count], device)
    if count == 0:
        raise ValueError("the validation loader is empty")
    return {"loss": loss_sum / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "count": int(count)}
