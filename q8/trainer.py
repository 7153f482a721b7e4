"""The training run: build, convert, train, validate, log, checkpoint, resume.

`train(cfg, run_dir)` is what train.py calls and what tests call directly. Everything the run
writes goes under run_dir: tb/ (TensorBoard), last.pt / best.pt, summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint, data, distributed
from .convert import convert, coverage
from .diagnostics import collapse_depth, depth_profile_figure, layer_fidelity, range_bn_scales, summarize
from .engine import autocast, correct_topk, evaluate
from .errors import CheckpointError, ConfigError, NonFiniteLossError, Q8Error, RunFolderError
from .layers import ActivationRange
from .models import build
from .quantize import seed_rounding
from .runfolder import RunFolderLock, write_text
from .train_config import OptimConfig, ScheduleConfig, TrainConfig, check, quant_config

log = logging.getLogger("q8")

# Keys that must match for a checkpoint to continue a run (the rest may change on resume,
# e.g. trainer.epochs to extend a run or data.root after moving the files).
RESUME_KEYS = ("model", "quant", "norm", "data.name", "data.batch_size", "data.train_subset", "seed")


class Interrupted(Q8Error):
    """A signal asked the run to stop; last.pt holds the state to resume from."""

    def __init__(self, signum: int, step: int, path: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {path} saved: rerun to resume")
        self.signum = signum


class StopFlag:
    """SIGINT (Ctrl-C), SIGTERM, SIGUSR1, SIGUSR2 (SLURM preemption, submitit's timeout warning)
    set a flag the loop checks between steps; after saving, the signal goes on to the previous
    handler. A second Ctrl-C stops at once, as Python's default would."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever owns them
                pass
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def forward(self) -> None:
        """Hand the signal to whoever handled it before (submitit requeues the job there)."""
        previous = self._previous.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)


class LRFactor:
    """The learning-rate multiplier at an optimizer step, in closed form (resume-proof)."""

    def __init__(self, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int):
        self.cfg, self.spe, self.total = cfg, steps_per_epoch, epochs * steps_per_epoch

    def __call__(self, step: int) -> float:
        c, epoch = self.cfg, step / self.spe
        if epoch < c.warmup_epochs:
            return c.warmup_start + (1 - c.warmup_start) * epoch / c.warmup_epochs
        if c.name == "step":
            return c.gamma ** sum(epoch >= m for m in c.milestones)
        if c.name == "cosine":
            start = c.warmup_epochs * self.spe
            t = min(1.0, (step - start) / max(1, self.total - start))
            return c.min_factor + (1 - c.min_factor) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if (p.ndim <= 1 and not cfg.decay_norm_and_bias) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def cpu_model() -> str:
    """The processor's name (platform.processor() is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _code_version() -> dict:
    """The code this process runs: its git commit and whether tracked files differ from it (None
    outside a git checkout). Read at start: main may move on while a run trains."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit or None, "dirty": bool(status) if status is not None else None}


def _check_resumable(saved: dict, cfg: dict, path: Path) -> None:
    # a setting newer than the checkpoint ran at its default there (e.g. quant.act_range)
    flat_saved = {**_flat(dataclasses.asdict(TrainConfig())), **_flat(saved)}
    flat_now = _flat(cfg)
    for key in RESUME_KEYS:
        a = {k: v for k, v in flat_saved.items() if k == key or k.startswith(key + ".")}
        b = {k: v for k, v in flat_now.items() if k == key or k.startswith(key + ".")}
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise CheckpointError(
                f"{path} was written by a different run ({', '.join(diff)} differ); use a new run folder"
            )


class Run:
    """The state of one training run, and the steps that move it forward."""

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        check(cfg)
        self.cfg, self.dir = cfg, run_dir
        self.config_dict = dataclasses.asdict(cfg)
        t = cfg.trainer
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.rank, self.world, self.device, self._owns_group = distributed.setup(t.device)
        # Same seed on every process: identical initial weights and data order. Stochastic
        # rounding draws from a stream of its own per process and step (seed_step).
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self.train_loader, self.val_loader, info = data.loaders(cfg.data, cfg.seed)
        self.model = build_model(cfg, info).to(self.device)
        self.coverage = coverage(self.model)  # and with the first batch: which layers forward calls
        self.calls_checked = False
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net: nn.Module = self.model
        if self.world > 1:
            distributed.sync_norms(self.model)
            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "16-mixed")
        self.steps_per_epoch = len(self.train_loader)
        # The learning rate is a closed-form function of the step under the current config, so
        # a resumed run follows the schedule it is asked for now (extending a run included).
        self.lr_factor = LRFactor(cfg.schedule, self.steps_per_epoch, t.epochs)
        self.epoch = self.step = self.batch_in_epoch = 0
        self.epoch_sums = [0.0, 0.0, 0.0]  # loss sum, correct, examples of the epoch so far
        self.best_top1 = -1.0
        self.last_val: dict = {}
        self.fidelity: dict = {}  # the last diagnostics' means per tensor kind
        # every logged step's loss and gradient norm, and every diagnostics' means: how a run got
        # where it ended (a divergence included), kept in summary.json
        self.history: dict = {"train": [], "fidelity": []}
        self.wall_before = 0.0  # seconds spent by earlier (interrupted) sessions
        self.images = 0
        self.saved: Optional[tuple[Path, int]] = None  # the last finite checkpoint written: (path, step)
        self.t0 = time.time()
        self.code: list[dict] = []  # each code version that trained this run, and the step it took over at
        self.resumed = self._resume()
        version = _code_version()
        if not self.code or any(self.code[-1][k] != v for k, v in version.items()):
            self.code.append({**version, "from_step": self.step})
        self.set_lr()
        self.writer = None

    def open_writer(self) -> None:
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed session logged after its last checkpoint.
            self.writer = SummaryWriter(str(self.dir / "tb"), purge_step=self.step if self.resumed else None)

    # ---- checkpoints ----
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_sums": self.epoch_sums,
            "best_top1": self.best_top1,
            "last_val": self.last_val,
            "fidelity": self.fidelity,
            "history": self.history,
            "wall_time_s": self.wall_before + time.time() - self.t0,
            "images": self.images,
            "rng": checkpoint.rng_state(),
            "config": self.config_dict,
            "code": self.code,
        }

    def save(self, best: bool = False) -> None:
        """Write last.pt (and best.pt, in one atomic pair) unless the state holds NaN or Inf:
        a non-finite state is never saved over the last good one."""
        if self.world > 1:  # rank 0 writes; every process has the same model and optimizer
            torch.distributed.barrier()
        bad = None
        if self.rank == 0:
            state = self.state()
            model = {k: v for k, v in state["model"].items() if not k.endswith("act_range")}  # NaN: not yet seen
            bad = checkpoint.first_non_finite({"model": model, "optimizer": state["optimizer"]})
            if bad is None:
                last = self.dir / "last.pt"
                checkpoint.save(state, last, also=[self.dir / "best.pt"] if best else [])
                self.saved = (last, self.step)
        if self.world > 1:
            torch.distributed.barrier()
        if distributed.any_true(bad is not None, self.device):
            raise NonFiniteLossError(
                f"non-finite values in {bad or 'the model'} after step {self.step} (epoch {self.epoch + 1}); "
                f"{self._last_good()}"
            )

    def _last_good(self) -> str:
        if self.saved is None:
            return "no checkpoint was written (set trainer.checkpoint_every to save more often)"
        return f"the last good checkpoint is {self.saved[0]} (step {self.saved[1]})"

    def _newest_checkpoint(self) -> Optional[tuple[Path, dict]]:
        """(path, state) of last.pt, or of best.pt when a kill fell between the two renames of one
        save (best.pt is renamed first, so it can be one save ahead); each file is read once."""
        last, best = self.dir / "last.pt", self.dir / "best.pt"
        if not last.exists():
            return (best, checkpoint.load(best)) if best.exists() else None
        state = checkpoint.load(last)
        if best.exists() and best.stat().st_mtime > last.stat().st_mtime and not os.path.samefile(best, last):
            try:
                ahead = checkpoint.load(best)
            except CheckpointError:
                ahead = None
            if ahead is not None and ahead["step"] > state["step"]:
                return best, ahead
        return last, state

    def _resume(self) -> bool:
        found = self._newest_checkpoint()
        if found is None:
            return False
        path, state = found
        _check_resumable(state["config"], self.config_dict, path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state.get("scaler", {}))
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path} does not fit this model: {str(err).splitlines()[0]}") from None
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.epoch_sums, self.best_top1, self.last_val = state["epoch_sums"], state["best_top1"], state["last_val"]
        self.fidelity = state.get("fidelity", {})
        self.history = state.get("history", {"train": [], "fidelity": []})
        self.wall_before, self.images = state["wall_time_s"], state["images"]
        self.code = state.get("code", [])
        checkpoint.set_rng_state(state["rng"])
        self.saved = (path, self.step)
        if self.epoch >= self.cfg.trainer.epochs and self.batch_in_epoch == 0 and self.epoch > 0:
            log.info("resumed from %s: the run has finished its %d epochs", path, self.epoch)
        else:
            log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)
        return True

    def set_lr(self) -> None:
        factor = self.lr_factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optim.lr * factor

    def seed_step(self) -> None:
        """Stochastic rounding of this step draws from a stream of (seed, rank, step): its own on
        every process, and nothing to restore on resume."""
        seed_rounding(self.cfg.seed, self.rank, self.step)

    # ---- logging ----
    def scalar(self, tag: str, value: float, step: Optional[int] = None) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, self.step if step is None else step)

    def diagnostics(self, x, y) -> None:
        with autocast(self.device, self.cfg.trainer.precision):
            rows = layer_fidelity(self.model, x, y)  # every rank runs it: synchronized norms need all
        self.fidelity = {"step": self.step, **summarize(rows)}
        self.history["fidelity"].append(self.fidelity)
        if self.writer is None:
            return
        for r in rows:
            base = f"quant/{r['layer']}/{r['kind']}"
            for key in ("cosine", "sqnr_db", "shadow_cosine", "shadow_sqnr_db", "clipped"):
                if key in r and math.isfinite(r[key]):
                    self.scalar(f"{base}/{key}", r[key])
        for kind, figures in summarize(rows).items():
            for key, v in figures.items():
                self.scalar(f"quant/all/{kind}/{key}", v)
        for kind, depth in collapse_depth(rows).items():  # -1: no layer lost direction
            self.scalar(f"quant/collapse_depth/{kind}", depth)
        self.writer.add_figure("quant/depth_profile", depth_profile_figure(rows), self.step)
        with autocast(self.device, self.cfg.trainer.precision):
            scales = range_bn_scales(self.model, x)
        for r in scales:
            for key in ("sigma_ratio_mean", "sigma_ratio_min", "sigma_ratio_max"):
                self.scalar(f"quant/{r['layer']}/range_bn/{key}", r[key])
        for name, m in self.model.named_modules():
            if isinstance(m, ActivationRange) and not torch.isnan(m.act_range).any():
                self.scalar(f"quant/{name}/act_lo", float(m.act_range[0].min()))  # per channel: the widest
                self.scalar(f"quant/{name}/act_hi", float(m.act_range[1].max()))

    # ---- the loop ----
    def validate(self) -> bool:
        """Evaluate now; remember the figures; True if this is the best top-1 so far."""
        val = evaluate(self.net, self.val_loader, self.device, self.cfg.trainer.channels_last, self.cfg.trainer.precision)
        for k in ("loss", "top1", "top5"):
            self.scalar(f"val/{k}", val[k])
        val["step"] = self.step
        best = val["top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, val["top1"])
        self.last_val = val
        return best

    def _batches(self, bar, stop: StopFlag):
        """The loader's batches; a loader that fails because a stop signal reached its worker
        processes too (Ctrl-C goes to the whole process group) ends the epoch early instead."""
        it = iter(bar)
        while True:
            try:
                yield next(it)
            except StopIteration:
                return
            except RuntimeError:
                if stop.signum is None:
                    raise
                return

    def train_steps(self, stop: StopFlag) -> bool:
        """Train from the current position to the end of the epoch; False if stopped early."""
        t, cfg = self.cfg.trainer, self.cfg
        data.set_epoch(self.train_loader, self.epoch, self.batch_in_epoch)
        self.net.train()
        bar = tqdm(
            self.train_loader, total=self.steps_per_epoch, initial=self.batch_in_epoch,
            desc=f"epoch {self.epoch + 1}/{t.epochs}", leave=False, dynamic_ncols=True,
            disable=not (t.progress and self.rank == 0 and sys.stderr.isatty()),
        )
        for x, y in self._batches(bar, stop):
            if stop.signum is not None:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if not self.calls_checked:  # a swapped layer whose parent reads its weights would train in float
                self.calls_checked = True
                self.coverage = coverage(self.model, x)
                if self.coverage.bypassed:
                    log.warning("%s", self.coverage.summary())
            self.seed_step()
            if t.diagnostics_every and self.step % t.diagnostics_every == 0:
                self.diagnostics(x, y)
            with autocast(self.device, t.precision):
                out = self.net(x)
                loss = F.cross_entropy(out.float(), y)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at step {self.step + 1} (epoch {self.epoch + 1}); {self._last_good()}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            grad_norm = self._grad_norm() if (self.step + 1) % t.log_every == 0 else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            self.batch_in_epoch += 1
            self.set_lr()
            self.images += len(y) * self.world
            correct = correct_topk(out.detach(), y, ks=(1,))[0]
            s = self.epoch_sums
            s[0], s[1], s[2] = s[0] + loss.item() * len(y), s[1] + correct, s[2] + len(y)
            if self.step % t.log_every == 0:
                self.scalar("train/loss", loss.item())
                self.scalar("train/top1", 100 * correct / len(y))
                self.scalar("lr", self.optimizer.param_groups[0]["lr"])
                if grad_norm is not None:
                    self.scalar("train/grad_norm", grad_norm)
                self.history["train"].append({"step": self.step, "loss": loss.item(), "grad_norm": grad_norm})
            bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", top1=f"{100 * s[1] / s[2]:.1f}")
            if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                self.save()
            if stop.signum is not None or (t.max_steps is not None and self.step >= t.max_steps):
                break
        bar.close()
        return self.batch_in_epoch == self.steps_per_epoch

    def run(self) -> dict:
        t = self.cfg.trainer
        log.info(
            "%s: %s on %s, %d steps per epoch, %d process(es), device %s, precision %s",
            self.cfg.name or "run", self.cfg.model.name, self.cfg.data.name, self.steps_per_epoch, self.world,
            self.device, t.precision,
        )
        with StopFlag() as stop:
            while self.epoch < t.epochs and (t.max_steps is None or self.step < t.max_steps):
                epoch_start, images_start = time.time(), self.images
                finished = self.train_steps(stop)
                if stop.signum is not None:
                    self.save()
                    stop.forward()
                    raise Interrupted(stop.signum, self.step, self.dir / "last.pt")
                if not finished:
                    break  # max_steps
                loss_sum, correct, count = distributed.all_sum(self.epoch_sums, self.device)
                elapsed = time.time() - epoch_start
                self.scalar("train/epoch_loss", loss_sum / count)
                self.scalar("train/epoch_top1", 100 * correct / count)
                self.scalar("perf/epoch_time_s", elapsed)
                self.scalar("perf/images_per_s", (self.images - images_start) / max(elapsed, 1e-9))
                self.epoch, self.batch_in_epoch, self.epoch_sums = self.epoch + 1, 0, [0.0, 0.0, 0.0]
                best = False
                if self.epoch % t.eval_every == 0 or self.epoch == t.epochs:
                    best = self.validate()
                    log.info(
                        "epoch %d/%d: train loss %.4f top1 %.2f | val loss %.4f top1 %.2f top5 %.2f | %.0f s",
                        self.epoch, t.epochs, loss_sum / count, 100 * correct / count,
                        self.last_val["loss"], self.last_val["top1"], self.last_val["top5"], elapsed,
                    )
                self.save(best=best)
        if self.last_val.get("step") != self.step:  # stopped by max_steps, or eval_every skipped it
            self.save(best=self.validate())
        return self.finish()

    def finish(self) -> dict:
        wall = self.wall_before + time.time() - self.t0
        summary = {
            "name": self.cfg.name,
            "status": "finished",
            "val_top1": self.last_val["top1"],
            "val_top5": self.last_val["top5"],
            "val_loss": self.last_val["loss"],
            "best_val_top1": self.best_top1,
            "epochs": self.epoch + (self.batch_in_epoch / self.steps_per_epoch),
            "steps": self.step,
            "wall_time_s": wall,
            "images_per_s": self.images / max(wall, 1e-9),
            "fidelity": self.fidelity,
            "history": self.history,
            "coverage": self.coverage.as_dict(),
            "processes": self.world,
            "device": str(self.device),
            "precision": self.cfg.trainer.precision,
            "threads": torch.get_num_threads(),
            "machine": {"platform": platform.platform(), "processor": cpu_model(), "cpus": os.cpu_count()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "torchvision": _tv_version()},
            "git_commit": self.code[-1]["commit"],  # the code that finished the run
            "code": self.code,  # every version that trained it (a resumed run may span several)
            "config": self.config_dict,
        }
        if self.rank == 0:
            write_text(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            self._hparams(summary)
            self.writer.close()
        log.info("done: val top1 %.2f top5 %.2f (best %.2f) after %d steps, %.0f s", summary["val_top1"],
                 summary["val_top5"], summary["best_val_top1"], self.step, wall)
        return summary

    def _grad_norm(self) -> Optional[float]:
        """The 2-norm of all parameter gradients (unscaled under a gradient scaler); None if not finite."""
        grads = [p.grad.detach().float() for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return None
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if self.scaler.is_enabled():
            norm /= self.scaler.get_scale()
        return norm if math.isfinite(norm) else None

    def record_failure(self, err: Exception) -> None:
        """summary.json for a run that stopped on an error (status 'diverged')."""
        if self.rank == 0:
            summary = {"name": self.cfg.name, "status": "diverged", "error": str(err), "steps": self.step,
                       "val_top1": None, "val_top5": None, "wall_time_s": self.wall_before + time.time() - self.t0,
                       "fidelity": self.fidelity, "history": self.history, "code": self.code, "config": self.config_dict}
            write_text(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")

    def _hparams(self, summary: dict) -> None:
        """hparams in the run's own event file (add_hparams would make a sub-run)."""
        from torch.utils.tensorboard.summary import hparams

        params = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in _flat(self.config_dict).items()}
        metrics = {f"hparam/{k}": summary[k] for k in ("val_top1", "val_top5", "best_val_top1")}
        for s in hparams(params, metrics):
            self.writer.file_writer.add_summary(s)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, self.step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def build_model(cfg: TrainConfig, info: data.DatasetInfo, quantized: bool = True) -> nn.Module:
    """The run's float model passed through q8.convert (quantized=False: every bit-width off)."""
    model = build(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size,
                  **cfg.model.kwargs)
    qc = quant_config(cfg)
    if not quantized:
        qc = dataclasses.replace(qc, weight_bits=None, act_bits=None, grad_bits=None, grad_weight_bits=None, overrides={})
    return convert(model, qc)


def evaluate_checkpoint(path, quantized: bool = True, data_changes: Optional[dict] = None, device: str = "auto") -> dict:
    """Top-1 / top-5 of a checkpoint's model in eval mode on its validation split, at the
    precision it was trained with. data_changes: changes to the saved data config (root,
    val_subset, ...). save_evaluation writes the result beside the checkpoint."""
    from .train_config import from_dict

    path = Path(path)
    state = checkpoint.load(path)
    cfg = from_dict(state["config"])
    for key, value in (data_changes or {}).items():
        if not hasattr(cfg.data, key):
            raise ConfigError(f"data.{key} is not a data setting")
        setattr(cfg.data, key, value)
    cfg.trainer.device = device
    check(cfg)
    rank, world, dev, owns = distributed.setup(device)
    try:
        val_loader, info = data.val_loader(cfg.data)
        model = build_model(cfg, info, quantized).to(dev)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(f"{path} does not fit its own config's model: {str(err).splitlines()[0]}") from None
        result = evaluate(model, val_loader, dev, precision=cfg.trainer.precision)
    finally:
        if owns:
            torch.distributed.destroy_process_group()
    result.update(checkpoint=str(path), quantized=quantized, epoch=state["epoch"], step=state["step"], rank=rank)
    return result


def save_evaluation(result: dict) -> Optional[Path]:
    """Write an evaluate_checkpoint result as <stem>.eval.json (or .eval-float.json) beside its
    checkpoint, on rank 0; returns the path (None on other ranks)."""
    result = dict(result)
    if result.pop("rank", 0) != 0:
        return None
    path = Path(result["checkpoint"])
    out = path.with_name(f"{path.stem}.eval{'' if result['quantized'] else '-float'}.json")
    write_text(out, json.dumps(result, indent=2) + "\n")
    return out


def _tv_version() -> str:
    import torchvision

    return torchvision.__version__


def train(cfg: TrainConfig, run_dir: str | Path, resolved_config: Optional[str] = None) -> dict:
    """Train (or resume) the run in run_dir and return its summary (also in summary.json).

    The run folder is locked while the run trains (a second process is refused with one line);
    resolved_config (the text of config.yaml) is written only once the run is accepted, so a
    refused resume or a bad value never replaces the config of the run already there.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"cannot create the run folder {run_dir}: {err.strerror or err}") from None
    lock = RunFolderLock(run_dir).acquire() if distributed.env_rank() == 0 else None
    try:
        if lock is not None:
            for stale in checkpoint.clean_temporaries(run_dir):
                log.info("removed %s, left by a save that was killed", stale.name)
        run = Run(cfg, run_dir)
        try:
            if run.rank == 0 and resolved_config is not None:
                write_text(run_dir / "config.yaml", resolved_config)
            run.open_writer()
            return run.run()
        except NonFiniteLossError as err:
            run.record_failure(err)  # a diverged run is a result too: the tables show it
            raise
        finally:
            run.close()
    finally:
        if lock is not None:
            lock.release()
