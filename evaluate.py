"""Evaluate a checkpoint: `python evaluate.py checkpoint=<run>/last.pt [quantized=false]`.

Rebuilds the model from the checkpoint's own config, prints top-1 / top-5 on the validation
split and writes them as JSON beside the checkpoint (<name>.eval.json, or .eval-float.json).
"""

import json
import logging

import hydra
from omegaconf import DictConfig

from cli import fail
from q8.errors import Q8Error
from q8.trainer import evaluate_checkpoint, save_evaluation

log = logging.getLogger("q8")


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    changes = {k: v for k, v in cfg.data.items() if v is not None}
    try:
        result = evaluate_checkpoint(cfg.checkpoint, quantized=cfg.quantized, data_changes=changes, device=cfg.device)
    except (Q8Error, OSError) as err:
        fail(err)
    print(json.dumps(result))  # first: a folder we cannot write to loses nothing
    try:
        path = save_evaluation(result)
    except OSError as err:
        fail(err)
    if path is not None:
        log.info("written to %s", path)


if __name__ == "__main__":
    main()
