"""train.py / evaluate.py end to end on fake Fashion-MNIST: run folder, resume, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from q8 import trainer
from q8.errors import NonFiniteLossError
from q8.train_config import TrainConfig
from tests import fakedata

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    return fakedata.fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=256, n_test=96)


def tiny(fm, run_dir, *extra):
    return [
        f"data.root={fm}", "data.train_subset=null", "data.batch_size=32", "data.eval_batch_size=64", "data.workers=0",
        "++model.kwargs.width=4", "trainer.epochs=2", "trainer.log_every=1", "trainer.progress=false",
        f"hydra.run.dir={run_dir}", *extra,
    ]


def run(script, args, tmp_path, check=True, **kw):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def test_end_to_end_run_folder_and_evaluate(fm, tmp_path):
    run_dir = tmp_path / "run"
    p = run("train.py", tiny(fm, run_dir, "trainer.diagnostics_every=4"), tmp_path)
    assert "val top1" in p.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("val_top1", "val_top5", "best_val_top1", "epochs", "steps", "wall_time_s", "images_per_s", "config", "versions",
                "git_commit", "coverage", "precision"):
        assert key in summary, key
    assert summary["coverage"]["quantized_share_of_parameters"] == 1.0 and "q8.convert: 43 of 43" in p.stderr + p.stdout
    assert summary["steps"] == 16 and summary["epochs"] == 2 and summary["versions"]["torch"] == torch.__version__
    assert (run_dir / "config.yaml").exists() and (run_dir / "last.pt").exists() and (run_dir / "best.pt").exists()
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/top1", "val/loss", "val/top1", "val/top5", "lr", "perf/images_per_s",
                "perf/epoch_time_s", "quant/layer1.0.conv1/layer_grad/cosine", "quant/conv1/act_hi", "hparam/val_top1",
                "quant/collapse_depth/layer_grad", "quant/bn1/range_bn/sigma_ratio_mean"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("val/top1")] == [8, 16]
    assert "quant/depth_profile" in events.Tags()["images"]
    assert not [d for d in (run_dir / "tb").iterdir() if d.is_dir()]  # hparams in the same run

    p = run("evaluate.py", [f"checkpoint={run_dir / 'last.pt'}"], tmp_path)
    result = json.loads((run_dir / "last.eval.json").read_text())
    assert result["top1"] == pytest.approx(summary["val_top1"]) and result["count"] == 96
    run("evaluate.py", [f"checkpoint={run_dir / 'last.pt'}", "quantized=false"], tmp_path)
    assert json.loads((run_dir / "last.eval-float.json").read_text())["quantized"] is False
    assert not (ROOT / ".hydra").exists() and not (ROOT / "evaluate.log").exists()  # evaluate writes only the JSON


def test_rerun_of_a_finished_run_trains_nothing_more(fm, tmp_path):
    run_dir = tmp_path / "run"
    run("train.py", tiny(fm, run_dir, "trainer.epochs=1"), tmp_path)
    first = json.loads((run_dir / "summary.json").read_text())
    p = run("train.py", tiny(fm, run_dir, "trainer.epochs=1"), tmp_path)
    again = json.loads((run_dir / "summary.json").read_text())
    assert "resumed" in p.stdout + p.stderr and again["steps"] == first["steps"] and again["val_top1"] == first["val_top1"]


def test_sigkill_and_resume_equals_uninterrupted(fm, tmp_path):
    args = ("trainer.deterministic=true", "trainer.checkpoint_every=1", "trainer.threads=1")
    whole = tmp_path / "whole"
    run("train.py", tiny(fm, whole, *args), tmp_path)

    killed = tmp_path / "killed"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "train.py", *tiny(fm, killed, *args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "last.pt").exists():
        time.sleep(0.05)
    time.sleep(0.7)  # somewhere in epoch 1 or 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before the kill"
    step_at_kill = torch.load(killed / "last.pt", weights_only=True)["step"]
    assert 1 <= step_at_kill < 16
    run("train.py", tiny(fm, killed, *args), tmp_path)

    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, killed))
    for key in ("val_top1", "val_top5", "val_loss", "best_val_top1", "steps"):
        assert a[key] == b[key], key
    wa, wb = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (whole, killed))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize(
    "override,message",
    [("quant.grad_bits=nine", "quant.grad_bits"), ("quant.grad_bits=40", "quant.grad_bits must be an int in 1..16"),
     ("model=nosuchnet", "model/nosuchnet"), ("norm.chunks=0", "norm.chunks"), ("optim.lr=-1", "optim.lr")],
)
def test_bad_overrides_name_the_key(fm, tmp_path, override, message):
    p = run("train.py", tiny(fm, tmp_path / "run", override), tmp_path, check=False)
    assert p.returncode != 0 and message in p.stderr + p.stdout
    assert "Traceback" not in p.stderr


def test_missing_data_and_corrupt_checkpoint_are_one_line_errors(fm, tmp_path):
    p = run("train.py", tiny(tmp_path / "nowhere", tmp_path / "run1"), tmp_path, check=False)
    assert p.returncode == 1 and "Fashion-MNIST not found" in p.stdout + p.stderr and "Traceback" not in p.stderr
    run_dir = tmp_path / "run2"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"garbage")
    p = run("train.py", tiny(fm, run_dir), tmp_path, check=False)
    assert p.returncode == 1 and "cannot read checkpoint" in p.stdout + p.stderr and "Traceback" not in p.stderr
    assert (run_dir / "last.pt").read_bytes() == b"garbage"  # nothing overwritten
    p = run("evaluate.py", [f"checkpoint={run_dir / 'last.pt'}"], tmp_path, check=False)
    assert p.returncode == 1 and "cannot read checkpoint" in p.stdout + p.stderr


def test_checkpoint_of_another_run_is_refused(fm, tmp_path):
    run_dir = tmp_path / "run"
    run("train.py", tiny(fm, run_dir, "trainer.epochs=1"), tmp_path)
    config = (run_dir / "config.yaml").read_text()
    p = run("train.py", tiny(fm, run_dir, "quant=fp32"), tmp_path, check=False)
    assert p.returncode == 1 and "different run" in p.stdout + p.stderr and "quant.act_bits" in p.stdout + p.stderr
    assert (run_dir / "config.yaml").read_text() == config  # the refused run's config is not written over it


def tiny_config(fm) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.root, cfg.data.batch_size, cfg.data.workers, cfg.data.eval_batch_size = str(fm), 32, 0, 64
    cfg.model.kwargs = {"width": 4}
    cfg.trainer.epochs, cfg.trainer.progress, cfg.trainer.checkpoint_every = 1, False, 1
    return cfg


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(fm, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = {"n": 0}
    real = trainer.F.cross_entropy

    def flaky(out, y, *a, **k):
        calls["n"] += 1
        loss = real(out, y, *a, **k)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer.F, "cross_entropy", flaky)
    with pytest.raises(NonFiniteLossError, match="at step 3 "):
        trainer.train(tiny_config(fm), tmp_path / "run")
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2


def test_schedules():
    from q8.train_config import ScheduleConfig

    step = trainer.LRFactor(ScheduleConfig(name="step", milestones=[30, 60]), steps_per_epoch=10, epochs=90)
    assert [step(s) for s in (0, 299, 300, 599, 600, 899)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = trainer.LRFactor(ScheduleConfig(name="cosine", warmup_epochs=1, warmup_start=0.1), steps_per_epoch=10, epochs=5)
    assert cos(0) == pytest.approx(0.1) and cos(5) == pytest.approx(0.55) and cos(10) == pytest.approx(1.0)
    assert cos(30) == pytest.approx(0.5) and cos(50) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_can_skip_norm_and_bias():
    from q8.models import build
    from q8.train_config import OptimConfig

    model = build("resnet20")
    groups = trainer.make_optimizer(model, OptimConfig(decay_norm_and_bias=False)).param_groups
    assert groups[1]["weight_decay"] == 0 and all(p.ndim == 1 for p in groups[1]["params"])
    assert len(trainer.make_optimizer(model, OptimConfig()).param_groups) == 1
