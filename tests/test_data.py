"""Datasets from files the tests make, clear errors, and deterministic sharded sampling."""

import pytest
import torch
import torchvision

from q8 import data
from q8.errors import ConfigError, DataError
from q8.train_config import DataConfig
from tests import fakedata


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_fashion_mnist_from_gz_files(tmp_path):
    root = fakedata.fashion_mnist(tmp_path / "fm", n_train=64, n_test=32)
    cfg = DataConfig(root=str(root), batch_size=16, eval_batch_size=10, workers=0)
    train, val, info = data.loaders(cfg, seed=0)
    x, y = next(iter(train))
    assert x.shape == (16, 1, 28, 28) and y.dtype == torch.int64 and info.num_classes == 10
    assert sum(len(b[1]) for b in val) == 32


def test_missing_fashion_mnist_says_where_and_how(tmp_path):
    with pytest.raises(DataError, match=r"data.root=.*nothing.*apt-get install dataset-fashion-mnist"):
        data.loaders(DataConfig(root=str(tmp_path / "nothing"), workers=0), seed=0)


def test_corrupt_fashion_mnist_names_the_file(tmp_path):
    root = fakedata.fashion_mnist(tmp_path / "fm", n_train=8, n_test=8)
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        data.loaders(DataConfig(root=str(root), batch_size=4, workers=0), seed=0)


def test_cifar10_through_torchvision(tmp_path, monkeypatch):
    root = fakedata.cifar10(tmp_path / "c10")
    with pytest.raises(DataError, match="CIFAR10 not found or corrupted"):  # md5 of fake files fails
        data.loaders(DataConfig(name="cifar10", root=str(root), batch_size=8, workers=0), seed=0)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    train, val, info = data.loaders(DataConfig(name="cifar10", root=str(root), batch_size=8, workers=0), seed=0)
    x, _ = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and len(train.dataset) == 100 and info.in_channels == 3


def test_imagenet_folders_with_the_papers_transforms(tmp_path):
    root = fakedata.imagenet(tmp_path / "in")
    train, val, info = data.loaders(DataConfig(name="imagenet", root=str(root), batch_size=2, eval_batch_size=4, workers=0), seed=0)
    assert next(iter(train))[0].shape == (2, 3, 224, 224)
    assert next(iter(val))[0].shape == (4, 3, 224, 224)
    with pytest.raises(DataError, match="val"):
        (root / "val").rename(root / "validation")
        data.loaders(DataConfig(name="imagenet", root=str(root), batch_size=2, workers=0), seed=0)


def test_batch_must_split_over_processes(tmp_path, monkeypatch):
    root = fakedata.fashion_mnist(tmp_path / "fm", n_train=64, n_test=8)
    monkeypatch.setattr(data, "rank_and_world", lambda: (0, 3))
    with pytest.raises(ConfigError, match="data.batch_size=16"):
        data.loaders(DataConfig(root=str(root), batch_size=16, workers=0), seed=0)


def test_validation_shards_cover_every_example_once():
    shards = [list(data.EpochSampler(103, shuffle=False, rank=r, world=3, drop_last=False)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(103))


def test_training_shards_are_equal_disjoint_and_resumable():
    samplers = [data.EpochSampler(103, seed=5, rank=r, world=2) for r in range(2)]
    a, b = (list(s) for s in samplers)
    assert len(a) == len(b) == 51 and not set(a) & set(b)
    s = data.EpochSampler(103, seed=5)
    s.epoch = 3
    full = list(s)
    s.skip = 40
    assert list(s) == full[40:]
    s.epoch, s.skip = 4, 0
    assert list(s) != full  # a new permutation each epoch


def test_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    root = fakedata.fashion_mnist(tmp_path / "fm", n_train=16, n_test=8)
    cfg = DataConfig(root=str(root), workers=0)
    ds = data.SeededAugment(data.DATASETS["fashion_mnist"].load(cfg, True), seed=1)
    torch.manual_seed(123)
    a = ds[(2, 5)][0]
    torch.manual_seed(456)  # the global RNG neither matters nor moves
    state = torch.get_rng_state()
    assert torch.equal(a, ds[(2, 5)][0]) and torch.equal(state, torch.get_rng_state())
    assert not all(torch.equal(ds[(e, 5)][0], a) for e in range(3, 8))


def test_fixed_subset_is_the_same_for_every_seed():
    ds = list(range(100))
    assert list(data.fixed_subset(ds, 10, 0)) == list(data.fixed_subset(ds, 10, 0))
    assert len(data.fixed_subset(ds, 10, 0)) == 10 and data.fixed_subset(ds, None, 0) is ds
