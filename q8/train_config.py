"""The training run's configuration: plain dataclasses (train.py registers them as Hydra's
schema, so a wrong type fails at start with the key's name; values are checked here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .config import QuantConfig
from .errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "resnet20"  # a key of q8.models.MODELS
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra builder arguments (e.g. width)


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | imagenet
    root: Optional[str] = None  # folder with the files; null: the dataset's usual places
    download: bool = False  # let torchvision download when the files are missing
    batch_size: int = 128  # global: split evenly over the processes
    eval_batch_size: int = 512  # per process
    workers: int = 2  # DataLoader worker processes
    pin_memory: bool = False  # pinned host memory (useful with CUDA)
    persistent_workers: bool = True  # keep workers between epochs (when workers > 0)
    train_subset: Optional[int] = None  # use this many training examples (fixed subset); null: all
    val_subset: Optional[int] = None  # use this many validation examples; null: all
    augment: bool = True  # the dataset's training augmentation


@dataclass
class QuantSettings:
    """q8.QuantConfig's layer fields (see q8/config.py); the norm group adds the BN ones."""

    weight_bits: Optional[int] = 8
    act_bits: Optional[int] = 8
    grad_bits: Optional[int] = 8
    grad_weight_bits: Optional[int] = 16
    weight_rounding: str = "nearest"
    act_rounding: str = "nearest"
    grad_rounding: str = "stochastic"
    weight_range: str = "tensor"
    act_range: str = "tensor"  # tensor (the paper) | channel (depthwise convolutions and norms: per channel)
    act_estimator: str = "sample_mean"  # sample_mean (the paper: mean of per-sample min/max) | batch (min/max)
    grad_range: str = "tensor"  # layer gradients: tensor (the paper) | sample | channel | hadamard
    act_momentum: float = 0.1
    overrides: Dict[str, Any] = field(default_factory=dict)  # pattern -> "float" or {field: value}


@dataclass
class NormConfig:
    kind: str = "range"  # batch | range
    chunks: int = 16  # Range BN: average the range over this many chunks (the paper's 16)
    constant: str = "exact"  # Range BN: paper | reference | exact


@dataclass
class OptimConfig:
    lr: float = 0.1  # for the global batch the recipe names (no automatic scaling)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True  # false: no weight decay on BN parameters and biases


@dataclass
class ScheduleConfig:
    name: str = "step"  # step | cosine | constant
    milestones: List[float] = field(default_factory=lambda: [30, 60])  # step: epochs where lr *= gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from warmup_start * lr
    warmup_start: float = 0.1
    min_factor: float = 0.0  # cosine: final lr as a fraction of optim.lr


@dataclass
class TrainerConfig:
    epochs: int = 90
    max_steps: Optional[int] = None  # stop after this many optimizer steps; null: no limit
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed (autocast; 16-mixed adds a gradient scaler)
    threads: Optional[int] = None  # torch CPU threads; null: torch's default
    deterministic: bool = False  # deterministic algorithms: a resumed run equals an uninterrupted one
    progress: bool = True  # tqdm bars (only on rank 0 and on a terminal)
    log_every: int = 50  # steps between train/* scalars
    diagnostics_every: int = 0  # steps between per-layer quantization diagnostics; 0: off
    checkpoint_every: int = 0  # steps between last.pt saves, besides every epoch; 0: epochs only
    eval_every: int = 1  # epochs between validations (the last epoch always validates)
    channels_last: bool = False  # channels-last memory format for conv models


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantSettings = field(default_factory=QuantSettings)
    norm: NormConfig = field(default_factory=NormConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    name: str = ""  # a label for tables (the experiment)


def quant_config(cfg: TrainConfig) -> QuantConfig:
    """The q8.QuantConfig of a run; a bad value raises ConfigError naming the key."""
    q = dataclasses.asdict(cfg.quant) if dataclasses.is_dataclass(cfg.quant) else dict(cfg.quant)
    try:
        return QuantConfig(
            **q, norm=cfg.norm.kind, range_bn_chunks=cfg.norm.chunks, range_bn_constant=cfg.norm.constant
        )
    except ValueError as err:
        msg = str(err)
        for key in ("norm", "range_bn_chunks", "range_bn_constant"):
            if msg.startswith(key):
                short = {"norm": "kind", "range_bn_chunks": "chunks", "range_bn_constant": "constant"}[key]
                raise ConfigError(f"norm.{short}{msg[len(key):]}") from None
        raise ConfigError(f"quant.{msg}") from None


def check(cfg: TrainConfig) -> None:
    """Validate the values a type cannot express; raise ConfigError naming the key."""
    import torch

    from .data import DATASETS
    from .engine import PRECISIONS
    from .models import MODELS, check_kwargs

    quant_config(cfg)
    rules = [
        ("model.name", cfg.model.name in MODELS, f"one of {sorted(MODELS)}"),
        ("data.name", cfg.data.name in DATASETS, f"one of {sorted(DATASETS)}"),
        ("data.batch_size", cfg.data.batch_size >= 1, ">= 1"),
        ("data.eval_batch_size", cfg.data.eval_batch_size >= 1, ">= 1"),
        ("data.workers", cfg.data.workers >= 0, ">= 0"),
        ("data.train_subset", cfg.data.train_subset is None or cfg.data.train_subset >= 1, "null or >= 1"),
        ("data.val_subset", cfg.data.val_subset is None or cfg.data.val_subset >= 1, "null or >= 1"),
        ("optim.lr", cfg.optim.lr > 0, "> 0"),
        ("optim.momentum", 0 <= cfg.optim.momentum < 1, "in [0, 1)"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, ">= 0"),
        ("optim.nesterov", not cfg.optim.nesterov or cfg.optim.momentum > 0, "false when momentum is 0"),
        ("schedule.name", cfg.schedule.name in ("step", "cosine", "constant"), "step, cosine or constant"),
        ("schedule.warmup_epochs", cfg.schedule.warmup_epochs >= 0, ">= 0"),
        ("trainer.epochs", cfg.trainer.epochs >= 1, ">= 1"),
        ("trainer.max_steps", cfg.trainer.max_steps is None or cfg.trainer.max_steps >= 1, "null or >= 1"),
        ("trainer.device", cfg.trainer.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
        ("trainer.device", cfg.trainer.device != "cuda" or torch.cuda.is_available(),
         "auto or cpu on this machine (torch sees no CUDA device)"),
        ("trainer.precision", cfg.trainer.precision in PRECISIONS, f"one of {sorted(PRECISIONS)}"),
        ("trainer.threads", cfg.trainer.threads is None or cfg.trainer.threads >= 1, "null or >= 1"),
        ("trainer.log_every", cfg.trainer.log_every >= 1, ">= 1"),
        ("trainer.diagnostics_every", cfg.trainer.diagnostics_every >= 0, ">= 0"),
        ("trainer.checkpoint_every", cfg.trainer.checkpoint_every >= 0, ">= 0"),
        ("trainer.eval_every", cfg.trainer.eval_every >= 1, ">= 1"),
    ]
    for key, ok, expected in rules:
        if not ok:
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            raise ConfigError(f"{key} must be {expected}, got {value!r}")
    try:
        check_kwargs(cfg.model.name, cfg.model.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.kwargs: {err}") from None


def from_dict(d: dict) -> TrainConfig:
    """A TrainConfig from its asdict() form (as saved in checkpoints and summaries)."""
    sections = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    kinds = {"model": ModelConfig, "data": DataConfig, "quant": QuantSettings, "norm": NormConfig,
             "optim": OptimConfig, "schedule": ScheduleConfig, "trainer": TrainerConfig}
    kwargs = {}
    for name in sections:
        if name in kinds:
            kwargs[name] = kinds[name](**d.get(name, {}))
        elif name in d:
            kwargs[name] = d[name]
    return TrainConfig(**kwargs)
