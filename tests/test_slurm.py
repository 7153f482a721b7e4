"""A real single-node SLURM on localhost: a 2-job sweep through hydra-submitit-launcher, and a
requeued job that resumes from its checkpoint. Skips only where SLURM cannot run (not root)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import fakedata

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("apt-get") is None and shutil.which("slurmctld") is None,
    reason="a local SLURM cluster needs root (and apt-get to install slurm-wlm and munge)",
)


@pytest.fixture(scope="module")
def cluster():
    state = Path(f"/tmp/q8-slurm-test-{os.getpid()}")  # munged wants a 0755 path, not pytest's 0700 tmp
    env = {**os.environ, "Q8_SLURM_PORT": "26817"}
    subprocess.run(["bash", "scripts/slurm_local.sh", "start", str(state)], cwd=ROOT, env=env, check=True, timeout=900)
    env.update(SLURM_CONF=str(state / "slurm.conf"), PATH=f"{state / 'bin'}:{os.environ['PATH']}")
    try:
        yield env
    finally:
        subprocess.run(["bash", "scripts/slurm_local.sh", "stop", str(state)], cwd=ROOT, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    return fakedata.fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=128, n_test=64)


def sweep_cmd(fm, sweep_dir, *extra):
    return [sys.executable, "train.py", "-m", "hydra/launcher=slurm_cpu", f"hydra.sweep.dir={sweep_dir}",
            "hydra.sweep.subdir=${name}/seed${seed}", f"data.root={fm}", "data.train_subset=null", "data.batch_size=32",
            "data.eval_batch_size=64", "data.workers=0", "++model.kwargs.width=4", "trainer.progress=false",
            "trainer.threads=1", *extra]


def test_two_job_sweep_lands_where_the_tables_look(cluster, fm, tmp_path):
    sweep = tmp_path / "runs"
    env = {**cluster, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    p = subprocess.run(sweep_cmd(fm, sweep, "seed=0,1", "trainer.epochs=1", "name=fmnist_int8"), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    summaries = sorted(sweep.rglob("summary.json"))
    assert [s.parent.relative_to(sweep).as_posix() for s in summaries] == ["fmnist_int8/seed0", "fmnist_int8/seed1"]
    assert {json.loads(s.read_text())["config"]["seed"] for s in summaries} == {0, 1}
    out = tmp_path / "results"
    subprocess.run([sys.executable, "scripts/make_tables.py", "--runs", str(sweep), "--out", str(out), "--no-plots"],
                   cwd=ROOT, check=True, timeout=120)
    assert "(n=2)" in (out / "fmnist.md").read_text()


def test_requeued_job_resumes_from_its_checkpoint(cluster, fm, tmp_path):
    sweep = tmp_path / "runs"
    env = {**cluster, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run_dir = sweep / "requeue" / "seed0"
    proc = subprocess.Popen(sweep_cmd(fm, sweep, "seed=0", "trainer.epochs=12", "trainer.checkpoint_every=1", "name=requeue"),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "last.pt").exists():
        time.sleep(0.2)
    assert (run_dir / "last.pt").exists(), "the job never checkpointed"
    job = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=30).stdout.split()[0]
    subprocess.run(["scontrol", "requeue", job], env=env, check=True, timeout=30)
    # SLURM holds a requeued job for two minutes (its begin time); release it once it is pending.
    for _ in range(300):
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, capture_output=True, text=True,
                               timeout=30).stdout.split()
        if state == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True, timeout=30)
            break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 * 4  # 128 examples / batch 32, 12 epochs: nothing lost, nothing twice
    logs = "".join(p.read_text() for p in run_dir.rglob("*.log")) + "".join(
        p.read_text(errors="replace") for p in (sweep / ".submitit").rglob("*.out"))
    assert "resumed from" in logs
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 48
