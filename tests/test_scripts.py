"""The sweep launcher's dry run, and tables that are a pure function of the run folders."""

import json
import os
import subprocess
import sys
from pathlib import Path

from scripts import make_tables, sweep

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_dry_run_lists_every_job_without_launching(tmp_path):
    p = subprocess.run([sys.executable, "scripts/sweep.py", "imagenet", "--dry-run", "--launcher", "slurm",
                        "--root", str(tmp_path), "--", "data.root=/data"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "# 27 jobs:" in p.stdout  # 9 rows x 3 seeds
    assert "hydra/launcher=slurm" in p.stdout and "experiment=imagenet_resnet18_fp32,imagenet_resnet18_int8" in p.stdout
    assert not any(tmp_path.iterdir())


def test_every_grid_row_is_an_experiment():
    experiments = {p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")}
    assert set(sweep.IMAGENET) <= experiments and set(sweep.FMNIST) <= experiments
    assert set(sweep.CONVERGED + sweep.CONVERGED_DIAGNOSIS + sweep.CONVERGED_ABLATIONS) <= experiments
    assert {k for k, _ in make_tables.CONVERGED_ROWS if "/" not in k} == set(
        sweep.CONVERGED + sweep.CONVERGED_DIAGNOSIS + sweep.CONVERGED_ABLATIONS)
    assert {name for _, _, name in make_tables.PAPER_ROWS} <= set(sweep.IMAGENET)
    assert [n for n, _ in make_tables.FMNIST_ROWS] == sweep.FMNIST


def fake_run(root: Path, name: str, seed: int, top1: float, sub: str = "", **quant):
    d = root / name / sub / f"seed{seed}"
    d.mkdir(parents=True)
    config = {"model": {"name": "resnet20", "kwargs": {"width": 8}}, "data": {"train_subset": 100, "batch_size": 8},
              "trainer": {"epochs": 1}, "schedule": {"name": "cosine", "warmup_epochs": 1},
              "optim": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, "quant": {"grad_bits": 8, **quant}, "seed": seed}
    fidelity = {k: {"cosine": 0.9, "shadow_cosine": 0.8} for k in ("weight", "activation", "layer_grad", "weight_grad")}
    (d / "summary.json").write_text(json.dumps({
        "name": name, "val_top1": top1, "val_top5": 99.0, "wall_time_s": 10.0, "config": config, "fidelity": fidelity,
        "machine": {"processor": "cpu", "platform": "linux"}, "threads": 1, "versions": {"torch": "x"}, "git_commit": "abc"}))


def test_tables_are_byte_identical_on_rerun_and_show_mean_std_n(tmp_path):
    runs = tmp_path / "runs"
    for seed, top1 in enumerate((90.0, 91.0, 92.0)):
        fake_run(runs, "fmnist_int8", seed, top1)
    fake_run(runs, "imagenet_resnet50_int8", 0, 70.0)
    fake_run(runs, "bits_grad", 0, 80.0, grad_bits=4)
    out1, out2 = tmp_path / "a", tmp_path / "b"
    make_tables.main(["--runs", str(runs), "--out", str(out1)])
    make_tables.main(["--runs", str(runs), "--out", str(out2)])
    for name in ("paper_table.md", "fmnist.md", "bits.md", "fmnist.png", "bits.png"):
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    fm = (out1 / "fmnist.md").read_text()
    assert "91.00 +- 1.00 (n=3)" in fm and "`fmnist_int8/seed0`" in fm
    paper = (out1 / "paper_table.md").read_text()
    assert "read from figure, approx." in paper and "71.6" in paper and "70.00 +- 0.00 (n=1)" in paper
    assert paper.count("not run here") == 4
    assert "| 4 | 80.00 +- 0.00 (n=1) |" in (out1 / "bits.md").read_text()


def test_diverged_runs_are_counted_not_averaged(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "bits_grad", 0, 50.0, grad_bits=3)
    d = runs / "bits_grad2" / "seed0"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"name": "bits_grad", "status": "diverged", "val_top1": None, "val_top5": None,
                                                 "wall_time_s": 1.0, "fidelity": {}, "config": {"quant": {"grad_bits": 2}}}))
    make_tables.main(["--runs", str(runs), "--out", str(tmp_path / "out")])
    bits = (tmp_path / "out" / "bits.md").read_text()
    assert "| 2 | 1 of 1 diverged |" in bits and "| 3 | 50.00 +- 0.00 (n=1) |" in bits


def test_claims_get_welch_intervals_and_a_verdict(tmp_path):
    """int8 vs fp32 within 0.3 on 3 seeds each is resolved; a row 2 points lower on one seed is
    resolved as lower (the baseline's spread stands in for it); two single seeds are not resolved."""
    runs = tmp_path / "runs"
    for seed, (a, b) in enumerate([(92.50, 92.45), (92.60, 92.55), (92.40, 92.50)]):
        fake_run(runs, "conv_fp32", seed, a)
        fake_run(runs, "conv_int8", seed, b)
    fake_run(runs, "conv_int8_no_bifurcation", 0, 90.5)
    fake_run(runs, "conv_int8_fp32_wgrad", 0, 91.0)
    fake_run(runs, "conv_bits_grad", 0, 91.0, sub="grad_bits6", grad_bits=6)
    out = tmp_path / "out"
    make_tables.main(["--runs", str(runs), "--out", str(out)])
    md = (out / "converged.md").read_text()
    row = lambda text: next(line for line in md.splitlines() if text in line)  # noqa: E731
    # Welch by hand: diff 0, se = sqrt(0.01/3 + 0.0025/3) = 0.0645, df = 2.94, t = 3.19: +-0.206
    assert "| +0.00 | [-0.21, +0.21] (Welch) | 3/3 | resolved: the same within 0.3 |" in row("`conv_int8` vs `conv_fp32`")
    assert "(pooled: one side has 1 seed) | 1/3 | resolved: lower |" in row("`conv_int8_no_bifurcation` vs")
    assert "| -1.50 |" in row("`conv_bits_grad/grad_bits6` vs `conv_int8`")
    assert "not run here" in row("`conv_int8_batchnorm` vs") and "92.50 +- 0.05 (n=3)" in row("`conv_int8`)")
    assert "| 0.800 | 0.800 | 0.800 |" in row("`conv_int8`)")  # the shadow cosines of activations and gradients
    assert "`converged/" not in md and "`conv_bits_grad/grad_bits6/seed0`" in md
    make_tables.main(["--runs", str(runs), "--out", str(tmp_path / "again")])
    for name in ("converged.md", "converged.png"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert make_tables.verdict("same", None, (1, 1)) == "not resolved at n=1/1 seeds"
    assert make_tables.verdict("same", (0.0, -0.5, 0.2, "Welch"), (3, 3)) == "not resolved at n=3/3 seeds"
    assert make_tables.verdict("same", (-0.57, -0.91, -0.23, "Welch"), (2, 3)) == \
        "resolved: lower (the interval excludes 0); within 0.3: not resolved at n=2/3 seeds"
    assert make_tables.verdict("lower", (0.1, -0.2, 0.4, "Welch"), (3, 3)) == "resolved: no loss beyond 0.3"
    assert make_tables.difference_interval([92.0, 92.0], [91.0, 91.0]) is None  # no spread: nothing to go on


def test_sweep_jobs_lists_single_runs_seed_major_and_skips_ended_ones(tmp_path, capsys):
    for name, status in (("arch_mobilenet_v2_fp32", "finished"), ("arch_resnet20_int8", "diverged"), ("arch_resnet20_fp32", "running")):
        (tmp_path / name / "seed0").mkdir(parents=True)
        (tmp_path / name / "seed0" / "summary.json").write_text(json.dumps({"status": status}))
    assert sweep.main(["arch", "--jobs", "2", "--dry-run", "--root", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#   ")]
    total = 3 * len(sweep.ARCH) + len(sweep.ARCH_SEARCH)
    assert len(lines) == total - 2  # the finished and the diverged run are skipped, the unfinished one is not
    assert not any("arch_mobilenet_v2_fp32 seed=0" in line or "arch_resnet20_int8 seed=0" in line for line in lines)
    assert "experiment=arch_resnet20_fp32 seed=0" in lines[2]  # grid order, every row's seed 0 first
    assert "seed=1" in lines[len(sweep.ARCH) - 2] and "seed=0" in lines[-1]
    bits = sweep.single_runs("converged", tmp_path, [0], [])
    six = next(c for c in bits if "quant.grad_bits=6" in c and "name=conv_bits_grad" in c)
    assert f"hydra.run.dir={tmp_path}/${{name}}/grad_bits${{quant.grad_bits}}/seed${{seed}}" in six
    # seed 3 is both the pair's extra seed and, with --seeds 3, every row's: its folder is listed once
    folders = [sweep.run_folder(c) for c in sweep.single_runs("converged", tmp_path, [3], [])]
    assert len(folders) == len(set(folders)) and tmp_path / "conv_int8" / "seed3" in folders


def test_provenance_names_each_commit_and_its_rows(tmp_path):
    """Runs made by different code say so: each commit with the rows it ran, not the first run's only."""
    runs = tmp_path / "runs"
    fake_run(runs, "conv_fp32", 0, 92.0)
    fake_run(runs, "conv_int8", 0, 91.9)
    fake_run(runs, "conv_grad_range", 0, 91.0, sub="grad_rangehadamard", grad_range="hadamard")
    summary = runs / "conv_grad_range" / "grad_rangehadamard" / "seed0" / "summary.json"
    summary.write_text(summary.read_text().replace('"git_commit": "abc"', '"git_commit": "def"'))
    assert make_tables._commits(make_tables.load_runs(runs)) == \
        "commits abc (2 runs: conv_fp32, conv_int8), def (1 run: conv_grad_range/grad_rangehadamard)"
    assert make_tables._commits(make_tables.load_runs(runs)[:1]).startswith("commit ")
    # a run resumed under other code counts under each version, changed files marked
    data = json.loads(summary.read_text())
    data["code"] = [{"commit": "abc", "dirty": False, "from_step": 0}, {"commit": "def", "dirty": True, "from_step": 5}]
    summary.write_text(json.dumps(data))
    assert make_tables._commits(make_tables.load_runs(runs)) == (
        "commits abc (3 runs: conv_fp32, conv_grad_range/grad_rangehadamard, conv_int8), "
        "def+changes (1 run: conv_grad_range/grad_rangehadamard)")


def test_sweep_only_and_skip_pick_rows_and_logs_are_named_by_run_folder(tmp_path, capsys):
    """--only/--skip select single runs by their overrides (one row of a grid run from other code);
    each run's log is named after its folder, so two pools on one root never write the same log."""
    assert sweep.main(["converged", "--jobs", "1", "--dry-run", "--root", str(tmp_path), "--only", "quant.grad_range=hadamard",
                       "name=conv_grad_range"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#   ")]
    assert len(lines) == 1 and "quant.grad_range=hadamard seed=0" in lines[0]
    assert sweep.main(["converged", "--jobs", "1", "--dry-run", "--root", str(tmp_path),
                       "--skip", "quant.grad_range=hadamard", "experiment=conv_fp32"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#   ")]
    assert lines and not any("hadamard" in line or "experiment=conv_fp32" in line for line in lines)
    assert any("experiment=conv_int8 seed=4" in line for line in lines)
    code = "import sys; print('ran', sys.argv[1]); sys.exit('fail' in sys.argv[1])"
    runs = [[sys.executable, "-c", code, f"hydra.run.dir={tmp_path}/{name}/seed0"] for name in ("a/b", "fail")]
    assert sweep.run_pool(runs, 2, tmp_path) == 1
    assert "ran hydra.run.dir" in (tmp_path / "logs" / "a_b_seed0.log").read_text()
    assert (tmp_path / "logs" / "fail_seed0.log").is_file()


def test_sweep_skips_runs_that_another_process_trains(tmp_path, capsys):
    """A run whose folder is locked (another sweep, or a run a session left going) is neither listed
    to run nor launched a second time, and is not counted a failure."""
    from q8.runfolder import RunFolderLock

    folder = tmp_path / "conv_fp32" / "seed0"
    folder.mkdir(parents=True)
    lock = RunFolderLock(folder)
    assert lock.holder() is None and RunFolderLock(tmp_path / "never").holder() is None
    lock.acquire()
    try:
        assert lock.holder().startswith(f"process {os.getpid()} on ")
        assert sweep.main(["converged", "--jobs", "1", "--dry-run", "--root", str(tmp_path), "--only", "experiment=conv_fp32"]) == 0
        out = capsys.readouterr().out
        listed = [line for line in out.splitlines() if line.startswith("#   ")]
        assert "in use by process" in out and "2 in use" not in out and "1 in use elsewhere" in out
        assert not any("seed=0" in line for line in listed) and any("seed=1" in line for line in listed)
        code = "import sys; sys.exit(3)"  # a failure, were it launched
        assert sweep.run_pool([[sys.executable, "-c", code, f"hydra.run.dir={folder}"]], 1, tmp_path) == 0
        assert "skip (in use by process" in capsys.readouterr().out
    finally:
        lock.release()
    assert lock.holder() is None
