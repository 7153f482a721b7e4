"""Small fake datasets in the real on-disk formats, for tests that cannot download."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def _idx(path: Path, array: np.ndarray) -> None:
    dims = array.shape
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fashion_mnist(root: Path, n_train: int = 256, n_test: int = 128, seed: int = 0) -> Path:
    """The four IDX .gz files as the Debian package ships them. Labels are learnable: each
    class has its own bright square."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 5)
            images[i, 4 + 10 * r : 12 + 10 * r, 2 + 5 * col : 6 + 5 * col] = 250
        _idx(root / f"{split}-images-idx3-ubyte.gz", images)
        _idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def cifar10(root: Path, n_per_batch: int = 20, seed: int = 0) -> Path:
    """cifar-10-batches-py with five training batches and a test batch (md5 not matching)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n_per_batch).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


def imagenet(root: Path, classes: int = 3, per_class: int = 2, size: int = 40) -> Path:
    """train/ and val/ ImageFolder trees of small JPEGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)).save(d / f"img{i}.JPEG")
    return root
