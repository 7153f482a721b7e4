"""Train a model with q8: `python train.py model=resnet50 data=imagenet quant=int8 ...`.

Thin: Hydra composes the config (schema: q8.train_config.TrainConfig), q8.trainer does the work.
Everything lands in the Hydra run folder; rerunning in the same folder resumes.
"""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cli import describe, fail
from q8.errors import Q8Error
from q8.train_config import TrainConfig
from q8.trainer import Interrupted, train

ConfigStore.instance().store(name="train_schema", node=TrainConfig)
log = logging.getLogger("q8")


def export_slurm_ranks() -> None:
    """Under a multi-task SLURM job (submitit), expose ranks the env:// way, as torchrun does."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    export_slurm_ranks()
    try:
        # config.yaml is written by train() once the run is accepted (never over a refused one)
        summary = train(OmegaConf.to_object(cfg), run_dir, resolved_config=OmegaConf.to_yaml(cfg, resolve=True))
    except Interrupted as err:
        log.warning("%s", err)
        sys.exit(128 + err.signum)
    except (Q8Error, OSError) as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("%s", describe(err))
            raise  # the sweep goes on with its other jobs and fails at the end
        fail(err)
    print(f"val top1 {summary['val_top1']:.2f}  top5 {summary['val_top5']:.2f}  ({run_dir})")
    return summary["val_top1"]


if __name__ == "__main__":
    main()
