"""Measure samples (or a model's sampling) against a dataset's test split: quality and cost, typed.

Images: FD, KID, precision/recall in the fewstep feature network's space, class accuracy of conditional
samples, and the floor (train split vs test split, same n, same computation).  2-D data: sliced Wasserstein
and MMD against fresh true samples, plus the exact log-likelihood under the true mixture for ``gmm``.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import torch

from fewstep.data.datasets import DATASETS, is_image_data, load_dataset, source_stamp
from fewstep.errors import FewstepError
from fewstep.evaluate import metrics as M
from fewstep.evaluate.features import feature_extractor, features_variant
from fewstep.generate import SampleResult


@dataclass
class Floor:
    """The same metrics between the train and test splits at the same n: what a perfect model scores."""

    fd: float | None = None
    kid: float | None = None
    swd: float | None = None
    mmd: float | None = None


@dataclass
class Quality:
    n: int
    fd: float | None = None
    fd_ci: tuple[float, float] | None = None  # 90% bootstrap interval over the generated set
    kid: float | None = None
    kid_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    accuracy: float | None = None  # class accuracy of conditional samples (feature network's prediction)
    swd: float | None = None
    mmd: float | None = None
    loglik: float | None = None  # mean exact log-likelihood under the true mixture (gmm only)
    floor: Floor = field(default_factory=Floor)
    feature_accuracy: float | None = None  # the feature network's own test accuracy (a classifier's)
    feature_error: float | None = None  # unlabelled data: the autoencoder feature network's test reconstruction MSE


@dataclass
class EvalResult:
    """One evaluated row: what was sampled, its quality and its cost."""

    dataset: str
    label: str
    sampler: str
    steps: int
    timesteps: list[float]
    guidance: float
    seed: int
    nfe: int
    wall_seconds: float
    samples_per_s: float
    peak_rss_mb: float
    quality: Quality

    def to_json(self) -> dict[str, Any]:
        q = dataclasses.asdict(self.quality)
        top = {k: v for k, v in dataclasses.asdict(self).items() if k != "quality"}
        return {**top, **q}


@dataclass
class Reference:
    """Cached per dataset and n: test-split features (or points) and the floor."""

    dataset: str
    n: int
    real: np.ndarray
    gauss: M.Gaussian | None
    floor: Floor
    feature_accuracy: float | None
    featurize: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray | None]]
    feature_error: float | None = None


def kid_subset(n: int) -> int:
    """KID subset size: half the set (at most 1000), so subsets differ and the spread means something."""
    return max(2, min(1000, n // 2))


# The least n at which image data are measured (FD, KID, precision/recall in the feature network's 64-d space).
# FD fits a 64x64 covariance to each set: below n = 65 it is singular (rank n - 1), and near that its small
# eigenvalues are badly underestimated (Marchenko-Pastur: sample eigenvalues spread over (1 +- sqrt(64/n))^2 times
# the true ones), so FD carries a bias that falls about as 1/n.  Measured on digits (train vs test, 20 draws each;
# this floor is printed beside every FD): 6.9 +- 2.9 at n = 50, 5.4 +- 2.2 at 65, 2.8 +- 1.0 at 100, 1.3 +- 0.6 at
# 200, 1.1 +- 0.45 at 256, 0.39 +- 0.15 at 500.  The minimum is 200 (d/n = 0.32): the estimate is full rank with a
# margin and the bias has fallen to about a third of its value at 65-100, where a model's FD is mostly the
# estimator's own; it is also the n of the quick bench profiles.  More is better (the default n is the whole test
# split, up to 5,000), and FD is always compared at equal n, beside its floor.
MIN_IMAGE_N = 200
MIN_POINT_N = 10  # 2-D points: MMD at n = 1 divides by zero; below ~10 SWD and MMD are noise, not a measurement


def _check_test_split(dataset: str, n_test: int) -> None:
    if is_image_data(dataset) and n_test < MIN_IMAGE_N:
        raise FewstepError(f"the test split of {dataset} has {n_test} images; FD, KID and precision/recall need at "
                           f"least {MIN_IMAGE_N}: hold out more images (--test-fraction) or pass a larger --data-test")


def default_n(dataset: str) -> int:
    """The size of the reference (test) split, capped at 5,000 for the 2-D sets and fashion; image data whose test
    split is smaller than MIN_IMAGE_N are refused (one error naming the n available)."""
    n = min(len(load_dataset(dataset, "test")), 5000)
    _check_test_split(dataset, n)
    return n


def check_n(dataset: str, n: int) -> None:
    """``n`` samples can be measured against ``dataset``: at least MIN_IMAGE_N for image data, and no more than
    either split holds (FD is computed at equal sizes).  Called before sampling, and again by :func:`reference`."""
    test, train = load_dataset(dataset, "test"), load_dataset(dataset, "train")
    _check_test_split(dataset, len(test))
    if is_image_data(dataset) and n < MIN_IMAGE_N:
        raise FewstepError(f"--n {n} is too few for image data: FD, KID and precision/recall in the 64-d feature "
                           f"space need at least {MIN_IMAGE_N} samples (the test split of {dataset} has {len(test)})")
    if not is_image_data(dataset) and n < MIN_POINT_N:
        raise FewstepError(f"--n {n} is too few for 2-D points: the unbiased MMD divides by n(n-1) and the sliced "
                           f"Wasserstein distance compares sorted samples, so give at least {MIN_POINT_N}")
    if n > len(test) or n > len(train):
        raise FewstepError(f"--n {n} exceeds {dataset}'s test split ({len(test)}) or train split ({len(train)}): "
                           "FD is biased by n, so it is computed at equal sizes; lower --n")


def _stamp(dataset: str) -> tuple:
    """A user's source's file stamps (an edited source is not served from the in-memory reference cache)."""
    return () if dataset in DATASETS else source_stamp(dataset)


def reference(dataset: str, n: int) -> Reference:
    """Test-split features (or points) of ``dataset`` at ``n`` and the floor, cached in memory."""
    return _reference(dataset, n, _stamp(dataset), features_variant(dataset))


def _features(featurize: Callable, x: torch.Tensor | Any, idx: torch.Tensor) -> np.ndarray:
    """Features of images ``x[idx]``; a lazy split is read 1,000 at a time (the feature network's batch)."""
    if isinstance(x, torch.Tensor):
        return featurize(x[idx])[0]
    return np.concatenate([featurize(x[idx[lo:lo + 1000]])[0] for lo in range(0, len(idx), 1000)])


@cache
def _reference(dataset: str, n: int, stamp: tuple, variant: str) -> Reference:  # variant: a cache key only
    check_n(dataset, n)
    test, train = load_dataset(dataset, "test"), load_dataset(dataset, "train")
    g = torch.Generator().manual_seed(1234)
    test_idx = torch.randperm(len(test), generator=g)[:n]
    train_idx = torch.randperm(len(train), generator=g)[:n]
    if is_image_data(dataset):
        fx = feature_extractor(dataset)

        def featurize(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
            f, pred = fx(x)
            return f.double().numpy(), (pred.numpy() if pred is not None else None)

        real, train_f = _features(featurize, test.x, test_idx), _features(featurize, train.x, train_idx)
        gauss = M.Gaussian.fit(real)
        floor = Floor(fd=M.frechet_distance(M.Gaussian.fit(train_f), gauss),
                      kid=M.kid(train_f, real, subset_size=kid_subset(n))[0])
        return Reference(dataset, n, real, gauss, floor, fx.test_accuracy, featurize, fx.test_error)
    test_x, train_x = test.x[test_idx], train.x[train_idx]
    real = test_x.double().numpy()
    fake = train_x.double().numpy()
    floor = Floor(swd=M.sliced_wasserstein(fake, real), mmd=M.mmd_rbf(fake[:2000], real[:2000]))
    return Reference(dataset, n, real, None, floor, None, lambda x: (x.double().numpy(), None))


def measure(dataset: str, x: torch.Tensor, labels: torch.Tensor | None = None, bootstrap: int = 20,
            features: tuple[np.ndarray, np.ndarray | None] | None = None) -> Quality:
    """Quality of samples ``x`` (N, ...) against ``dataset``'s test split at n = N.  ``features``: what
    ``reference(dataset, N).featurize(x)`` returned, when the caller has it already (the bench keeps it)."""
    n = len(x)
    ref = reference(dataset, n)
    x = x.float()
    if not torch.isfinite(x).all():
        raise FewstepError("samples contain NaN or inf: the model or sampler diverged")
    feats, pred = features if features is not None else ref.featurize(x)
    if ref.gauss is not None:
        q = Quality(n=n, fd=M.frechet_distance(M.Gaussian.fit(feats), ref.gauss),
                    fd_ci=M.bootstrap_fd(feats, ref.gauss, rounds=bootstrap) if bootstrap else None,
                    floor=ref.floor, feature_accuracy=ref.feature_accuracy, feature_error=ref.feature_error)
        q.kid, q.kid_std = M.kid(feats, ref.real, subset_size=kid_subset(n))
        q.precision, q.recall = M.precision_recall(ref.real, feats, k=3)
        if labels is not None and pred is not None:
            q.accuracy = float((pred == labels.numpy()).mean())
        return q
    q = Quality(n=n, swd=M.sliced_wasserstein(feats, ref.real), mmd=M.mmd_rbf(feats[:2000], ref.real[:2000]),
                floor=ref.floor)
    if dataset == "gmm":
        from fewstep.data.toy import gmm8

        q.loglik = float(gmm8().log_prob(x.double()).mean())
    return q


def peak_rss_mb() -> float:
    """CUDA: peak memory allocated on the device since the row started (the caller resets it).  CPU: the
    peak resident memory of the whole process so far (ru_maxrss), an upper bound that includes earlier work."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def evaluate_samples(dataset: str, label: str, res: SampleResult, seed: int, bootstrap: int = 20,
                     features: tuple[np.ndarray, np.ndarray | None] | None = None) -> EvalResult:
    q = measure(dataset, res.x, res.labels, bootstrap, features)
    return EvalResult(dataset=dataset, label=label, sampler=res.sampler, steps=len(res.timesteps),
                      timesteps=res.timesteps, guidance=res.guidance, seed=seed, nfe=res.nfe,
                      wall_seconds=res.wall_seconds, samples_per_s=res.samples_per_s, peak_rss_mb=peak_rss_mb(),
                      quality=q)


def model_dataset(model: Any, data: str | None = None) -> str:
    """The dataset a loaded model is measured against: ``data``, or the one it records (a user's source must still be
    what the model was trained on: a changed or missing source is an error); checked against the model's sample shape
    and classes."""
    from pathlib import Path

    from fewstep.data.datasets import check_recorded, dataset_info
    from fewstep.data.spec import data_key, parse_key

    dataset = data_key(data) if data else model.config.data  # a key as `--data` makes it (absolute paths)
    if dataset is None:
        raise FewstepError(f"{model.path} does not record its dataset: pass --data NAME (one of "
                           f"{', '.join(DATASETS)}) or your own data (an image folder, .npy/.npz, datasets folder)")
    if data is None:
        check_recorded(dataset, model.config.data_record, str(model.path))
    elif dataset not in DATASETS and not Path(parse_key(dataset).source).exists():
        raise FewstepError(f"unknown dataset {dataset!r}: neither a built-in one ({', '.join(DATASETS)}) nor an "
                           "existing folder or file")
    shape, classes = dataset_info(dataset)
    if tuple(model.sample_shape) != tuple(shape):
        raise FewstepError(f"the model makes samples of shape {tuple(model.sample_shape)} but {dataset} has "
                           f"{tuple(shape)}: pass the --data the model was trained on")
    if model.config.num_classes and model.config.num_classes != classes:
        raise FewstepError(f"the model has {model.config.num_classes} classes but {dataset} has {classes}")
    return dataset


def evaluate_model(model: Any, *, sampler: str | None = None, steps: int | None = None, spacing: str | None = None,
                   timesteps: list[float] | None = None, guidance: float | None = None, data: str | None = None,
                   n: int | None = None, seed: int = 0, eta: float = 0.0, batch_size: int = 500,
                   label: str | None = None, bootstrap: int = 20) -> EvalResult:
    """Sample a model (loaded, or any folder ``load_model`` takes) as ``fewstep evaluate`` does and measure it
    against ``data``'s test split (default: the dataset the model records; n: the split's size, at most 5,000)."""
    from fewstep.generate import sample_model
    from fewstep.models.folder import LoadedModel, load_model

    m = model if isinstance(model, LoadedModel) else load_model(model)
    dataset = model_dataset(m, data)
    n = n or default_n(dataset)
    check_n(dataset, n)  # before sampling
    res = sample_model(m, n, sampler=sampler, steps=steps, spacing=spacing, timesteps=timesteps, guidance=guidance,
                       seed=seed, eta=eta, batch_size=batch_size)
    return evaluate_samples(dataset, label or str(m.path), res, seed, bootstrap)


def train_quality(dataset: str, n: int) -> Callable[[Any, int], dict[str, float]]:
    """The training loop's quality callback (``--set eval_every=N``): ``(model folder, step) -> {"fd": ...}`` (2-D
    points: ``{"swd": ...}``), the model sampled with its own defaults (seed 0, labels cycling through the classes) at
    ``n`` samples against ``n`` images of the **train** split, never the test split (a figure watched while training
    is one a user tunes on).  Small n is fine here: the figure follows one run over time, at one n (FD's bias falls as
    1/n, so it is compared only at equal n).  The reference and the feature network are ready before this returns."""
    from pathlib import Path

    from fewstep.generate import sample_model
    from fewstep.models.folder import load_model

    train = load_dataset(dataset, "train")
    if n > len(train):
        raise FewstepError(f"eval_n {n} exceeds {dataset}'s train split ({len(train)}): lower eval_n")
    if is_image_data(dataset) and n < MIN_IMAGE_N:
        raise FewstepError(f"eval_n {n} is too few for image data: FD in the 64-d feature space needs at least "
                           f"{MIN_IMAGE_N} samples")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(4321))[:n]
    if is_image_data(dataset):
        fx = feature_extractor(dataset)
        real = _features(lambda x: (fx(x)[0].double().numpy(), None), train.x, idx)
        gauss = M.Gaussian.fit(real)

        def measure_images(folder: Path, step: int) -> dict[str, float]:
            x = sample_model(load_model(folder), n, seed=0, batch_size=500).x
            feats = fx(x.float())[0].double().numpy()
            return {"fd": round(M.frechet_distance(M.Gaussian.fit(feats), gauss), 4)}

        return measure_images
    points = train.x[idx].double().numpy()

    def measure_points(folder: Path, step: int) -> dict[str, float]:
        x = sample_model(load_model(folder), n, seed=0, batch_size=500).x
        return {"swd": round(M.sliced_wasserstein(x.double().numpy(), points), 4)}

    return measure_points
