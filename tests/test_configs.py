"""Every config group option and every experiment composes and passes validation."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import q8
import train  # noqa: F401  (registers the schema)
from q8.train_config import TrainConfig, check, quant_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ["model", "data", "quant", "norm", "optim", "schedule", "trainer"]


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def make(*overrides) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    extra = ["data.root=/data"] if (group, option) == ("data", "imagenet") else []
    cfg = make(f"{group}={option}", *extra)
    check(cfg)


@pytest.mark.parametrize("experiment", [o for o in options("experiment") if not o.endswith("_recipe")])
def test_every_experiment_composes(experiment):
    cfg = make(f"experiment={experiment}", "data.root=/data")
    check(cfg)
    assert cfg.name == experiment


def test_paper_rows_use_the_papers_recipe():
    cfg = make("experiment=imagenet_resnet50_int8", "data.root=/data")
    assert (cfg.model.name, cfg.data.name, cfg.trainer.epochs, cfg.data.batch_size) == ("resnet50", "imagenet", 90, 256)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert (cfg.schedule.name, list(cfg.schedule.milestones), cfg.schedule.gamma) == ("step", [30, 60], 0.1)
    assert quant_config(cfg) == q8.QuantConfig.preset("int8")
    assert quant_config(make("experiment=imagenet_resnet50_fp32", "data.root=/data")) == q8.QuantConfig.preset("fp32")


@pytest.mark.parametrize("preset", options("quant"))
def test_quant_options_mirror_the_library_presets(preset):
    cfg = make(f"quant={preset}", "norm=batch" if preset == "fp32" else "norm=range")
    assert quant_config(cfg) == q8.QuantConfig.preset(preset)


def test_the_default_is_the_quickstart():
    cfg = make()
    assert (cfg.data.name, cfg.norm.kind, cfg.quant.grad_weight_bits) == ("fashion_mnist", "range", 16)


def test_unknown_option_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        make("model=nosuchnet")
