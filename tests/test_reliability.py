"""A hostile but realistic user: crafted checkpoints, divergence, extended runs, two processes in
one folder, kills between files, broken data and caches. Each case ends in one clear line."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from q8 import checkpoint, trainer
from q8.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, Q8Error, RunFolderError
from q8.runfolder import RunFolderLock
from q8.train_config import TrainConfig
from tests import fakedata
from tests.test_train import run, tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    return fakedata.fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=256, n_test=96)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def config(fm, **trainer_changes) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.root, cfg.data.batch_size, cfg.data.workers, cfg.data.eval_batch_size = str(fm), 32, 0, 96
    cfg.model.kwargs = {"width": 4}
    cfg.schedule.name = "cosine"
    cfg.trainer.epochs, cfg.trainer.progress, cfg.trainer.log_every = 1, False, 1
    for k, v in trainer_changes.items():
        setattr(cfg.trainer, k, v)
    return cfg


# ---- 1. checkpoints cannot run code ------------------------------------------------------------


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["whole_file", "inside_a_valid_checkpoint"])
def test_a_crafted_checkpoint_is_refused_without_running_it(fm, tmp_path, how):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    if how == "whole_file":
        run_dir.mkdir()
        torch.save(Payload(marker), run_dir / "last.pt")
    else:
        trainer.train(config(fm, max_steps=1), run_dir)
        state = torch.load(run_dir / "last.pt", weights_only=True)
        state["extra"] = Payload(marker)
        torch.save(state, run_dir / "last.pt")
    with pytest.raises(CheckpointError, match="refused unread"):
        checkpoint.load(run_dir / "last.pt")
    with pytest.raises(CheckpointError, match="refused unread"):
        trainer.train(config(fm, epochs=2), run_dir)  # resume
    with pytest.raises(CheckpointError, match="refused unread"):
        trainer.evaluate_checkpoint(run_dir / "last.pt")
    assert not marker.exists()


def test_checkpoints_hold_plain_data_only(fm, tmp_path):
    trainer.train(config(fm, max_steps=2, precision="bf16-mixed"), tmp_path / "run")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)  # raises on anything else
    assert state["format"] == checkpoint.FORMAT and state["step"] == 2


# ---- 2. a non-finite state is never saved as the last good one ---------------------------------


@pytest.mark.parametrize("every", [1, 0])
def test_divergence_never_overwrites_the_last_good_checkpoint(fm, tmp_path, every):
    run_dir = tmp_path / "run"
    cfg = config(fm, checkpoint_every=every, epochs=2)
    cfg.optim.lr = 1e6
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train(cfg, run_dir)
    message = str(err.value)
    named = re.search(r"the last good checkpoint is (\S+) \(step (\d+)\)", message)
    if named:
        state = checkpoint.load(named.group(1))
        assert state["step"] == int(named.group(2))
        assert checkpoint.first_non_finite({"model": state["model"], "optimizer": state["optimizer"]}) is None
    else:
        assert "no checkpoint was written" in message and not (run_dir / "last.pt").exists()
    if (run_dir / "last.pt").exists():  # whatever is there is finite
        state = checkpoint.load(run_dir / "last.pt")
        assert checkpoint.first_non_finite({"model": state["model"]}) is None
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"


def test_summary_keeps_the_history_of_loss_gradient_norm_and_diagnostics(fm, tmp_path, monkeypatch):
    """Every logged step's loss and gradient 2-norm (the one the optimizer stepped with) and every
    diagnostics' means are in summary.json, also across a resume and when the run diverges."""
    seen = []
    real_step = torch.optim.SGD.step

    def recording(self, *a, **k):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.cat([g.flatten() for g in grads]).norm()))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    run_dir = tmp_path / "run"
    trainer.train(config(fm, max_steps=4, diagnostics_every=2), run_dir)
    trainer.train(config(fm, max_steps=6, diagnostics_every=2), run_dir)  # resumed
    h = json.loads((run_dir / "summary.json").read_text())["history"]
    assert [e["step"] for e in h["train"]] == [1, 2, 3, 4, 5, 6]
    assert [e["grad_norm"] for e in h["train"]] == pytest.approx(seen, rel=1e-5)
    assert [f["step"] for f in h["fidelity"]] == [0, 2, 4] and "activation" in h["fidelity"][0]
    cfg = config(fm, max_steps=50)
    cfg.optim.lr = 1e6
    with pytest.raises(NonFiniteLossError):
        trainer.train(cfg, tmp_path / "diverged")
    summary = json.loads((tmp_path / "diverged" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["history"]["train"]


def test_non_finite_weights_are_caught_before_saving(fm, tmp_path, monkeypatch):
    """A finite loss with NaN weights (an overflowing update) must not reach last.pt."""
    run_dir = tmp_path / "run"
    real_step = torch.optim.SGD.step

    def poisoned(self, *a, **k):
        out = real_step(self, *a, **k)
        if self.state and sum(1 for _ in self.state) and poisoned.calls == 2:
            self.param_groups[0]["params"][0].data.fill_(float("nan"))
        poisoned.calls += 1
        return out

    poisoned.calls = 0
    monkeypatch.setattr(torch.optim.SGD, "step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite values in model\.conv1\.weight after step 3.*last good checkpoint is .*last\.pt \(step 2\)"):
        trainer.train(config(fm, checkpoint_every=1), run_dir)
    assert checkpoint.load(run_dir / "last.pt")["step"] == 2


# ---- 3. extending a run continues the schedule asked for now -----------------------------------


def test_extending_a_run_follows_the_new_schedule(fm, tmp_path):
    run_dir = tmp_path / "run"
    trainer.train(config(fm, epochs=1), run_dir)
    trainer.train(config(fm, epochs=2), run_dir)
    lrs = {e.step: e.value for e in EventAccumulator(str(run_dir / "tb")).Reload().Scalars("lr")}
    factor = trainer.LRFactor(config(fm).schedule, steps_per_epoch=8, epochs=2)
    later = [s for s in lrs if s > 8]
    assert later and all(lrs[s] == pytest.approx(0.1 * factor(s), abs=1e-9) and lrs[s] > 0 for s in later if s < 16)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 16


def test_a_run_resumed_under_new_code_names_each_version_read_at_start(fm, tmp_path, monkeypatch):
    """summary.json names the code each segment ran, read when the process started: main moving on
    while a run trains (or between its sessions) must not relabel what ran."""
    run_dir, seen = tmp_path / "run", []
    versions = iter([{"commit": "a" * 40, "dirty": False}, {"commit": "b" * 40, "dirty": True}])

    def version():
        seen.append(next(versions))
        return seen[-1]

    monkeypatch.setattr(trainer, "_code_version", version)
    trainer.train(config(fm, max_steps=3), run_dir)
    trainer.train(config(fm), run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(seen) == 2  # once per process start, never at the end
    assert summary["code"] == [{"commit": "a" * 40, "dirty": False, "from_step": 0},
                               {"commit": "b" * 40, "dirty": True, "from_step": 3}]
    assert summary["git_commit"] == "b" * 40 and summary["steps"] == 8


def test_the_code_version_is_this_checkout():
    version = trainer._code_version()
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert version["commit"] == head and isinstance(version["dirty"], bool)


# ---- 5, 6. config.yaml and the run-folder lock ---------------------------------------------------


def test_a_second_process_in_the_same_folder_is_refused(fm, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from q8.runfolder import RunFolderLock; import time; RunFolderLock({str(run_dir)!r}).acquire(); "
                               "print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    try:
        with pytest.raises(RunFolderError, match=rf"in use by process {holder.pid} on "):
            trainer.train(config(fm, max_steps=1), run_dir)
        assert not (run_dir / "last.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    trainer.train(config(fm, max_steps=1), run_dir)  # the dead holder's lock is gone with it
    RunFolderLock(run_dir).acquire().release()  # and the run released its own


# ---- 7. a kill between last.pt and best.pt ------------------------------------------------------


def test_a_kill_between_best_and_last_loses_nothing(fm, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    # every evaluation scores higher than the one before, so epoch 2 is the best whatever the CPU's
    # arithmetic makes of the short training (on one machine it scored below epoch 1)
    real_evaluate, scores = trainer.evaluate, iter(range(1, 100))
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: {**real_evaluate(*a, **k), "top1": float(next(scores))})
    trainer.train(config(fm, epochs=1), run_dir)
    real_replace = os.replace

    def killed_before_last(src, dst):
        if str(dst).endswith("last.pt"):
            raise SystemExit("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed_before_last)
    with pytest.raises(SystemExit):
        trainer.train(config(fm, epochs=2), run_dir)  # epoch 2 is the best so far: best.pt, then last.pt
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert checkpoint.load(run_dir / "best.pt")["step"] == 16 and checkpoint.load(run_dir / "last.pt")["step"] == 8
    (run_dir / ".last.pt.abc123.tmp").write_bytes(b"x" * 1000)  # what a kill -9 during a write leaves
    summary = trainer.train(config(fm, epochs=2), run_dir)
    assert summary["steps"] == 16  # resumed from best.pt, the newer of the pair: nothing retrained
    best = checkpoint.load(run_dir / "best.pt")
    assert best["last_val"]["top1"] == summary["best_val_top1"]
    assert not list(run_dir.glob(".*.tmp"))


# ---- 8, 9. signals and one-line errors at the command line --------------------------------------


@pytest.mark.parametrize("sig,workers", [(signal.SIGINT, 2), (signal.SIGTERM, 0)])
def test_ctrl_c_and_sigterm_save_and_say_how_to_resume(fm, tmp_path, sig, workers):
    run_dir = tmp_path / "run"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = tiny(fm, run_dir, "trainer.epochs=3", f"data.workers={workers}", "data.persistent_workers=false")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "tb").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(proc.pid, sig)  # Ctrl-C reaches the whole process group: the loader's workers too
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    assert signal.Signals(sig).name in out and "rerun to resume" in out and "Traceback" not in out
    saved = checkpoint.load(run_dir / "last.pt")
    assert 0 < saved["step"] < 24
    run("train.py", tiny(fm, run_dir, "trainer.epochs=3"), tmp_path)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 24


@pytest.mark.parametrize(
    "override,message",
    [("++model.kwargs.widht=8", "model.kwargs: resnet20 does not take these arguments"),
     ("++model.kwargs.width=0", "model.kwargs: width must be an int >= 1, got 0"),
     ("trainer.precision=fp8", "trainer.precision must be one of"),
     ("hydra.run.dir=/proc/q8run", "cannot use the run folder /proc/q8run (hydra.run.dir)")],
)
def test_user_errors_are_one_line(fm, tmp_path, override, message):
    p = run("train.py", tiny(fm, tmp_path / "run", override), tmp_path, check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 1 and message in out and "Traceback" not in out, out


def test_a_regular_file_as_run_folder_and_cuda_without_gpu_are_one_line(fm, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    p = run("train.py", tiny(fm, afile), tmp_path, check=False)
    assert p.returncode == 1 and "cannot use the run folder" in p.stderr and "Traceback" not in p.stderr
    if not torch.cuda.is_available():
        cfg = config(fm)
        cfg.trainer.device = "cuda"
        with pytest.raises(ConfigError, match="trainer.device must be auto or cpu on this machine"):
            trainer.train(cfg, tmp_path / "run")



# ---- disk full, read-only folders: nothing written is lost --------------------------------------


def _mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode == 0


@pytest.fixture
def mounts():
    made = []
    yield made
    for m in made:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_disk_full_and_read_only_folders(fm, tmp_path, mounts):
    small, ro = tmp_path / "small", tmp_path / "ro"
    if os.geteuid() != 0 or not _mount_tmpfs(small, "size=160k"):
        pytest.skip("needs root to mount a small tmpfs")
    mounts.append(small)
    with pytest.raises(OSError) as err:  # tb events fit, the first checkpoint does not
        trainer.train(config(fm, checkpoint_every=1), small / "run")
    assert err.value.errno == 28
    assert not list((small / "run").glob(".*.tmp"))  # the partial write is removed
    from cli import describe

    assert "No space left on device" in describe(err.value) and "\n" not in describe(err.value)
    if not _mount_tmpfs(ro, "ro,size=1m"):
        pytest.skip("cannot mount read-only")
    mounts.append(ro)
    with pytest.raises(RunFolderError, match="cannot write to the run folder .*Read-only file system"):
        trainer.train(config(fm), ro)


# ---- 10. data: garbage files and the cache ------------------------------------------------------


def _gzip(path: Path, payload: bytes) -> None:
    import gzip

    with gzip.open(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("garbage", ["random_gzip", "raw_layout"])
def test_garbage_data_is_one_line_and_fixed_files_are_read(fm, tmp_path, garbage):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(fm, root)
    cfg = config(fm)
    cfg.data.root = str(root)
    if garbage == "random_gzip":
        _gzip(root / "train-images-idx3-ubyte.gz", os.urandom(5000))
    else:
        raw = root / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            (raw / f).write_bytes(os.urandom(3000))
    with pytest.raises(DataError, match="FashionMNIST|Fashion-MNIST"):
        trainer.train(cfg, tmp_path / "run")
    if garbage == "raw_layout":
        shutil.rmtree(root / "FashionMNIST")
    shutil.copy(fm / "train-images-idx3-ubyte.gz", root / "train-images-idx3-ubyte.gz")  # the fix, same path
    os.utime(root / "train-images-idx3-ubyte.gz", (time.time() + 5, time.time() + 5))
    cfg.trainer.max_steps = 1
    assert trainer.train(cfg, tmp_path / "run2")["steps"] == 1  # no stale cache entry in the way


def test_a_broken_cache_entry_is_rebuilt(fm, tmp_path):
    from q8 import data

    cfg = config(fm)
    folder = data._fashion_folder(str(fm))
    images = folder / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100])  # truncated by a crash or a full disk
    assert len(data.DATASETS["fashion_mnist"].load(cfg.data, True)) == 256


def test_every_q8_error_is_a_q8error():
    for kind in (CheckpointError, ConfigError, DataError, NonFiniteLossError, RunFolderError):
        assert issubclass(kind, Q8Error)


def test_every_preset_trains_with_diagnostics_on_a_depthwise_model(fm, tmp_path):
    """Each quantization preset, on a depthwise-separable net, with diagnostics on: a few steps,
    a checkpoint, an evaluation (presets beyond the paper change buffer shapes and ranges)."""
    import q8

    variants = {name: q8.PRESETS[name] for name in q8.PRESETS}
    variants["int8_act_range_channel"] = q8.QuantConfig.preset("int8", act_range="channel")
    for preset, qc in sorted(variants.items()):
        cfg = config(fm, max_steps=2, diagnostics_every=1)
        # MobileNetV2 cut to one block of each kind (depthwise layers, expansion, a residual add),
        # strided early so its 1280-channel last layer sees small maps
        cfg.model.name, cfg.model.kwargs = "mobilenet_v2_cifar", {
            "width_mult": 0.25, "inverted_residual_setting": [[1, 16, 1, 2], [6, 24, 2, 2]]}
        for key, value in dataclasses.asdict(qc).items():
            if hasattr(cfg.quant, key):
                setattr(cfg.quant, key, value)
        cfg.norm.kind = qc.norm
        summary = trainer.train(cfg, tmp_path / preset)
        assert summary["steps"] == 2 and summary["coverage"]["unsupported"] == {}, preset
        assert trainer.evaluate_checkpoint(tmp_path / preset / "last.pt")["count"] == 96


def test_a_vision_transformer_trains_and_evaluates_with_diagnostics(fm, tmp_path):
    """model=vit through the trainer: the data's image size reaches the model, attention and
    LayerNorm are quantized (the embeddings stay float), diagnostics run, the checkpoint evaluates."""
    cfg = config(fm, max_steps=2, diagnostics_every=1)
    cfg.model.name, cfg.model.kwargs = "vit", {"patch_size": 7, "num_layers": 2, "num_heads": 2, "hidden_dim": 16,
                                               "mlp_dim": 32}
    summary = trainer.train(cfg, tmp_path / "vit")
    assert summary["steps"] == 2 and summary["coverage"]["quantized"]["MultiheadAttention"] == 2
    assert set(summary["coverage"]["unsupported"]) == {"VisionTransformer", "Encoder"}  # class token, positions
    assert summary["coverage"]["bypassed"] == {}  # the first batch called every quantized layer
    assert trainer.evaluate_checkpoint(tmp_path / "vit" / "last.pt")["count"] == 96


def test_a_recurrent_net_trains_and_evaluates_with_diagnostics(fm, tmp_path):
    """model=row_lstm through the trainer: the LSTM is quantized (nothing stays float), its every
    quantized layer is called, diagnostics run, the checkpoint evaluates."""
    cfg = config(fm, max_steps=2, diagnostics_every=1)
    cfg.model.name, cfg.model.kwargs = "row_rnn", {"cell": "lstm", "hidden_size": 16, "num_layers": 2}
    summary = trainer.train(cfg, tmp_path / "lstm")
    assert summary["steps"] == 2 and summary["coverage"]["quantized"] == {"LSTM": 1, "Linear": 1}
    assert summary["coverage"]["unsupported"] == {} and summary["coverage"]["bypassed"] == {}
    assert trainer.evaluate_checkpoint(tmp_path / "lstm" / "last.pt")["count"] == 96


class ReadsItsHeadsWeights(nn.Module):
    """A net whose forward passes its head's weight to F.linear itself: q8 swaps the head, but
    it would train in float."""

    def __init__(self, num_classes=10, in_channels=1, **_):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, stride=2)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return F.linear(self.conv(x).mean((2, 3)), self.head.weight, self.head.bias)


def test_the_first_batch_finds_layers_that_forward_bypasses(fm, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(trainer, "build", lambda name, **kwargs: ReadsItsHeadsWeights(**kwargs))
    cfg = config(fm, max_steps=1)
    with caplog.at_level("WARNING", logger="q8"):
        summary = trainer.train(cfg, tmp_path / "bypass")
    assert summary["coverage"]["bypassed_layers"] == ["head"] and summary["coverage"]["quantized"] == {"Conv2d": 1}
    assert "BYPASSED" in caplog.text and "(head)" in caplog.text
