"""Datasets and transforms: Fashion-MNIST, CIFAR-10/100 (torchvision) and ImageNet (ImageFolder)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import datasets
from torchvision import transforms as T

from .errors import ConfigError, DataError
from .train_config import DataConfig

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_channels: int
    image_size: int
    load: Callable[[DataConfig, bool], Dataset]  # (cfg, train) -> dataset with transforms


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "q8"


# ---- Fashion-MNIST -----------------------------------------------------------------------------


def _fashion_folder(root: Optional[str], fresh: bool = False) -> Optional[Path]:
    """A folder in torchvision's FashionMNIST layout, made from the first place holding the files.

    Looks in data.root when set (torchvision layout, or the four .gz files directly), else in
    the Debian package's folder; .gz files are decompressed once into the cache, under a key
    of their path, sizes and modification times (replaced files get a new entry).
    fresh=True decompresses again over the cache entry (a broken one).
    """
    places = [Path(root)] if root else [DEBIAN_FASHION_MNIST]
    for place in places:
        if all((place / "FashionMNIST" / "raw" / f).exists() for f in FASHION_FILES):
            return place
        sources = [place / f"{f}.gz" for f in FASHION_FILES]
        if all(src.exists() for src in sources):
            key = [str(place.resolve())] + [f"{st.st_size}:{st.st_mtime_ns}" for st in (src.stat() for src in sources)]
            target = cache_dir() / f"fashion_mnist-{hashlib.sha1('|'.join(key).encode()).hexdigest()[:12]}"
            raw = target / "FashionMNIST" / "raw"
            if fresh or not all((raw / f).exists() for f in FASHION_FILES):
                raw.mkdir(parents=True, exist_ok=True)
                for src, f in zip(sources, FASHION_FILES):
                    _gunzip(src, raw / f)
            return target
    return None


def _gunzip(src: Path, dst: Path) -> None:
    import gzip

    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name + ".")
    try:
        with gzip.open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, dst)  # atomic: concurrent processes never read a half-written file
    except (OSError, EOFError) as err:
        os.unlink(tmp)
        raise DataError(f"cannot read {src}: {err}") from None


def _fashion_mnist(cfg: DataConfig, train: bool) -> Dataset:
    norm = T.Normalize((0.2860,), (0.3530,))
    tf = T.Compose(
        ([T.RandomCrop(28, padding=2), T.RandomHorizontalFlip()] if train and cfg.augment else []) + [T.ToTensor(), norm]
    )
    folder = _fashion_folder(cfg.root)
    if folder is None:
        if not cfg.download:
            where = f"data.root={cfg.root}" if cfg.root else str(DEBIAN_FASHION_MNIST)
            raise DataError(
                f"Fashion-MNIST not found in {where}. Install it with `apt-get install dataset-fashion-mnist`, "
                f"put {', '.join(f + '.gz' for f in FASHION_FILES)} in data.root, or set data.download=true."
            )
        folder = Path(cfg.root) if cfg.root else cache_dir()
    try:
        return _open(datasets.FashionMNIST, str(folder), train=train, transform=tf, download=cfg.download)
    except DataError:
        if not folder.is_relative_to(cache_dir()):
            raise
    # A cache entry that does not read (a crash while it was written, a disk error): make it again,
    # once, from the .gz files; if it still fails, the files themselves are at fault.
    folder = _fashion_folder(cfg.root, fresh=True)
    try:
        return _open(datasets.FashionMNIST, str(folder), train=train, transform=tf, download=False)
    except DataError as err:
        source = cfg.root or DEBIAN_FASHION_MNIST
        raise DataError(f"the Fashion-MNIST files in {source} do not read ({err}; decompressed into {folder})") from None


# ---- CIFAR and ImageNet ------------------------------------------------------------------------

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _cifar(kind):
    def load(cfg: DataConfig, train: bool) -> Dataset:
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train and cfg.augment else []
        tf = T.Compose(aug + [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
        root = cfg.root or str(cache_dir())
        return _open(kind, root, train=train, transform=tf, download=cfg.download)

    return load


def _imagenet(cfg: DataConfig, train: bool) -> Dataset:
    """ImageFolder over root/train and root/val (one folder per class), the paper's transforms."""
    if not cfg.root:
        raise DataError("ImageNet needs data.root: a folder with train/ and val/, one sub-folder per class")
    folder = Path(cfg.root) / ("train" if train else "val")
    if not folder.is_dir():
        raise DataError(
            f"ImageNet split not found: {folder}. data.root must hold train/ and val/ with one sub-folder "
            "per class (the usual ILSVRC-2012 layout after valprep)."
        )
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        aug = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if cfg.augment else [T.Resize(256), T.CenterCrop(224)]
        tf = T.Compose(aug + [T.ToTensor(), norm])
    else:
        tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    try:
        return datasets.ImageFolder(str(folder), transform=tf)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"cannot read ImageNet at {folder}: {err}") from None


def _open(kind, root: str, **kwargs) -> Dataset:
    try:
        return kind(root, **kwargs)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        name = kind.__name__
        raise DataError(
            f"{name} not found or corrupted under {root}: {str(err).rstrip('.')}. Put torchvision's {name} files there "
            "(data.root) or set data.download=true on a machine with internet."
        ) from None
    except Exception as err:  # noqa: BLE001 - torchvision's readers assert on bad headers, numpy raises on short files
        detail = str(err).strip().splitlines()[0] if str(err).strip() else "the file does not have the expected layout"
        raise DataError(f"cannot read {kind.__name__} under {root}: {type(err).__name__}: {detail}") from None


DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(10, 1, 28, _fashion_mnist),
    "cifar10": DatasetInfo(10, 3, 32, _cifar(datasets.CIFAR10)),
    "cifar100": DatasetInfo(100, 3, 32, _cifar(datasets.CIFAR100)),
    "imagenet": DatasetInfo(1000, 3, 224, _imagenet),
}


# ---- deterministic loading ---------------------------------------------------------------------


class SeededAugment(Dataset):
    """Seeds the random transforms of each example from (seed, epoch, index), so augmentation
    does not depend on worker count or on where a resumed epoch starts. Keys are
    (epoch, index) pairs from EpochSampler, so persistent workers see the current epoch."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]


class EpochSampler(Sampler[int]):
    """This process's share of a seeded permutation of the epoch, from a given position.

    Shard r of W takes positions r, r + W, ...; the permutation depends only on (seed, epoch),
    and the sampler can start `skip` examples in, so a resumed epoch continues where it stopped.
    With shuffle=False it walks the dataset in order without padding (every example once).
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1,
                 drop_last: bool = True, with_epoch: bool = False):
        self.size, self.seed, self.shuffle, self.rank, self.world = size, seed, shuffle, rank, world
        self.drop_last, self.with_epoch = drop_last, with_epoch
        self.epoch, self.skip = 0, 0

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.drop_last:  # equal shares, so every process runs the same number of steps
            order = order[: self.size - self.size % self.world]
        return order[self.rank :: self.world]

    def __iter__(self):
        indices = self._indices()[self.skip :]
        return iter([(self.epoch, i) for i in indices] if self.with_epoch else indices)

    def __len__(self) -> int:
        return len(self._indices()) - self.skip


def fixed_subset(dataset: Dataset, n: Optional[int], salt: int) -> Dataset:
    """The same n examples for every run and seed (a fixed random choice), or all."""
    if n is None or n >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(1234 + salt)
    return Subset(dataset, torch.randperm(len(dataset), generator=g)[:n].sort().values.tolist())


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _loader_options(cfg: DataConfig) -> dict:
    # A generator of its own keeps the loader from drawing on the global RNG (which stochastic
    # rounding uses), so a resumed run draws the same numbers as an uninterrupted one.
    return dict(
        num_workers=cfg.workers, pin_memory=cfg.pin_memory, generator=torch.Generator(),
        persistent_workers=cfg.persistent_workers and cfg.workers > 0,
    )


def val_loader(cfg: DataConfig) -> tuple[DataLoader, DatasetInfo]:
    """The validation loader: this process's share, every example exactly once, no padding."""
    info = DATASETS[cfg.name]
    val_set = fixed_subset(info.load(cfg, False), cfg.val_subset, 1)
    rank, world = rank_and_world()
    sampler = EpochSampler(len(val_set), shuffle=False, rank=rank, world=world, drop_last=False)
    return DataLoader(val_set, batch_size=cfg.eval_batch_size, sampler=sampler, **_loader_options(cfg)), info


def loaders(cfg: DataConfig, seed: int) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    """Training and validation loaders (training: an EpochSampler over a SeededAugment; move it
    with `set_epoch`). data.batch_size is the global batch, split evenly over processes."""
    info = DATASETS[cfg.name]
    rank, world = rank_and_world()
    if cfg.batch_size % world:
        raise ConfigError(f"data.batch_size={cfg.batch_size} is not divisible by the {world} processes")
    train_set = SeededAugment(fixed_subset(info.load(cfg, True), cfg.train_subset, 0), seed)
    if len(train_set) < cfg.batch_size:
        raise ConfigError(f"data.batch_size={cfg.batch_size} exceeds the {len(train_set)} training examples")
    train = DataLoader(
        train_set, batch_size=cfg.batch_size // world, drop_last=True,
        sampler=EpochSampler(len(train_set), seed, True, rank, world, with_epoch=True), **_loader_options(cfg),
    )
    val, _ = val_loader(cfg)
    return train, val, info


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Point a training loader at an epoch, starting `skip_batches` batches in."""
    loader.sampler.epoch = epoch
    loader.sampler.skip = skip_batches * loader.batch_size
