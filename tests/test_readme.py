"""Every command the README shows runs in a test: here (shrunk to a step on fake data) or in the
test named for it. A new README command without a test fails this file."""

import re
import shlex
from pathlib import Path

import pytest

from tests import fakedata
from tests.test_train import run

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# commands run elsewhere, with the test that runs them (checked to exist below)
ELSEWHERE = {
    "make train": "the quickstart is `python train.py` (run here); make adds scripts/setup.sh, which CI runs",
    "make test": ".ci/run runs it",
    "torchrun --nproc_per_node=2 train.py": "tests/test_distributed.py::test_torchrun_int8_range_bn_chunks_share_one_run_folder_and_resume_exactly",
    "python scripts/sweep.py imagenet --launcher slurm -- hydra.launcher.partition=gpu": "tests/test_slurm.py::test_two_job_sweep_lands_where_the_tables_look",
    "python scripts/make_tables.py": "tests/test_scripts.py::test_tables_are_byte_identical_on_rerun_and_show_mean_std_n",
    "python scripts/sweep.py fmnist": "tests/test_scripts.py::test_sweep_dry_run_lists_every_job_without_launching",
    "python scripts/sweep.py converged": "tests/test_scripts.py::test_sweep_jobs_lists_single_runs_seed_major_and_skips_ended_ones",
    "python scripts/sweep.py arch": "tests/test_scripts.py::test_sweep_jobs_lists_single_runs_seed_major_and_skips_ended_ones",
}


def readme_commands() -> list[str]:
    """Indented code lines of the README that start a command, without their comments."""
    found = []
    for line in README.splitlines():
        m = re.match(r"^    ((?:python|torchrun|make)\b.*)$", line)
        if m:
            found.append(m.group(1).split("  #")[0].strip())
    return found


def elsewhere(cmd: str):
    return next((test for prefix, test in ELSEWHERE.items() if cmd.startswith(prefix)), None)


def test_every_readme_command_is_covered():
    commands = readme_commands()
    assert len(commands) >= 10
    for cmd in commands:
        if elsewhere(cmd) is None:
            assert cmd.startswith(("python train.py", "python evaluate.py", "python scripts/sweep.py")) and (
                "--dry-run" in cmd or not cmd.startswith("python scripts/sweep.py")), f"no test runs: {cmd}"
    for test in ELSEWHERE.values():
        if "::" in test:
            path, name = test.split("::")
            assert f"def {name}(" in (ROOT / path).read_text(), test


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("readme")
    return fakedata.fashion_mnist(base / "fm", n_train=64, n_test=32), fakedata.imagenet(base / "imagenet", classes=3, per_class=2)


SHRINK = ["trainer.max_steps=1", "data.workers=0", "data.eval_batch_size=32", "trainer.progress=false"]


def shrunk(cmd: str, fm: Path, imagenet: Path, out: Path) -> list[str]:
    args = shlex.split(cmd)[2:]
    args = [a.replace("/data/imagenet", str(imagenet)) for a in args if not a.startswith("hydra.run.dir=")]
    if args and args[0] == "--cfg":
        return args
    extra = [f"data.root={fm}"] if not any(a.startswith("data.root=") for a in args) else []
    if "imagenet" in cmd:
        extra += ["data.batch_size=2", "data.val_subset=4"]
    else:
        extra += ["data.batch_size=16", "data.train_subset=null"]
    where = [f"hydra.sweep.dir={out}"] if "-m" in args else [f"hydra.run.dir={out}"]
    return args + extra + SHRINK + where


@pytest.mark.parametrize("cmd", [c for c in readme_commands() if c.startswith("python train.py")])
def test_readme_train_commands(cmd, data, tmp_path):
    fm, imagenet = data
    p = run("train.py", shrunk(cmd, fm, imagenet, tmp_path / "out"), tmp_path)
    if "--cfg" in cmd:
        assert "quant:" in p.stdout
    elif "-m" in cmd:
        assert len(list((tmp_path / "out").rglob("summary.json"))) == 6
    else:
        assert (tmp_path / "out" / "summary.json").exists()


def test_readme_evaluate_and_sweep_commands(data, tmp_path):
    fm, imagenet = data
    run_dir = tmp_path / "outputs" / "run"
    run("train.py", shrunk("python train.py", fm, imagenet, run_dir), tmp_path)
    for cmd in readme_commands():
        if cmd.startswith("python evaluate.py"):
            args = shlex.split(cmd)[2:]
            args = [f"checkpoint={run_dir / Path(a.split('=', 1)[1]).name}" if a.startswith("checkpoint=") else a for a in args]
            run("evaluate.py", args, tmp_path)
        elif cmd.startswith("python scripts/sweep.py") and "--dry-run" in cmd:
            p = run("scripts/sweep.py", shlex.split(cmd)[2:], tmp_path)
            assert "imagenet_resnet50_int8" in p.stdout
    assert (run_dir / "last.eval.json").exists() and (run_dir / "best.eval-float.json").exists()


def test_readme_library_snippet_runs():
    snippet = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    import torch

    scope = {"images": torch.randn(2, 3, 64, 64), "labels": torch.tensor([1, 2])}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["rows"] and scope["model"].conv1.spec.weight_bits == 8
