"""Sample-quality metrics as pure functions of feature arrays (float64 numpy), each tested on known answers.

- Frechet distance (Heusel et al. 2017) between Gaussians fitted to two feature sets;
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, averaged over subsets;
- precision / recall (Kynkaanniemi et al. 2019) with k-NN radii (a point is not its own neighbour);
- on 2-D data: sliced Wasserstein distance and an RBF-kernel MMD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Gaussian:
    mu: np.ndarray
    sigma: np.ndarray

    @staticmethod
    def fit(feats: np.ndarray) -> Gaussian:
        f = np.asarray(feats, dtype=np.float64)
        return Gaussian(f.mean(0), np.cov(f, rowvar=False))


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017, eq. 6)."""
    diff = a.mu - b.mu
    # Tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues) of the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2)
    w, v = np.linalg.eigh(a.sigma)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root_a @ b.sigma @ root_a)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def fd(x: np.ndarray, y: np.ndarray) -> float:
    return frechet_distance(Gaussian.fit(x), Gaussian.fit(y))


def bootstrap_fd(x: np.ndarray, ref: Gaussian, rounds: int = 20, seed: int = 0) -> tuple[float, float]:
    """A 90% interval of FD(x, ref) from resampling the generated set with replacement (same size).

    Resampling with replacement inflates FD (duplicates shrink the covariance), so the percentile interval is
    shifted by the bootstrap bias (mean of the resampled FDs minus the FD itself): a bias-corrected percentile
    interval, centred where the FD is."""
    rng = np.random.default_rng(seed)
    vals = np.array([frechet_distance(Gaussian.fit(x[rng.integers(0, len(x), len(x))]), ref) for _ in range(rounds)])
    bias = vals.mean() - frechet_distance(Gaussian.fit(x), ref)
    lo, hi = np.percentile(vals, [5, 95]) - bias
    return float(max(lo, 0.0)), float(hi)


def fd_difference(a: np.ndarray, b: np.ndarray, ref: Gaussian, rounds: int = 100, seed: int = 0,
                  paired: bool = True) -> tuple[float, float, float]:
    """FD(a, ref) - FD(b, ref) and a 90% bootstrap interval of it (bias-corrected as :func:`bootstrap_fd`).

    ``paired``: each round resamples the same indices of both sets, for rows whose sample i shares its noise and
    label (fewstep's rows do), so most of the sampling noise cancels and a small difference can be resolved;
    otherwise (a GAN shares no noise path with a diffusion model) the two sets are resampled independently.  The
    reference is the same for both and is not resampled."""
    if paired and len(a) != len(b):
        raise ValueError(f"a paired difference needs sets of one size, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    d0 = frechet_distance(Gaussian.fit(a), ref) - frechet_distance(Gaussian.fit(b), ref)
    vals = []
    for _ in range(rounds):
        ia = rng.integers(0, len(a), len(a))
        ib = ia if paired else rng.integers(0, len(b), len(b))
        vals.append(frechet_distance(Gaussian.fit(a[ia]), ref) - frechet_distance(Gaussian.fit(b[ib]), ref))
    bias = float(np.mean(vals)) - d0
    lo, hi = np.percentile(vals, [5, 95]) - bias
    return float(d0), float(lo), float(hi)


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(x: np.ndarray, y: np.ndarray, subsets: int = 50, subset_size: int = 500, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance in a given feature space: (mean, std) of unbiased MMD^2 over subsets."""
    rng = np.random.default_rng(seed)
    size = min(subset_size, len(x), len(y))
    vals = [_poly_mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
            for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals))


def _knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    d = _pdist(feats, feats)
    np.fill_diagonal(d, np.inf)  # a point is not its own neighbour
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _pdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019: precision = share of fake points inside some real point's k-NN ball;
    recall = share of real points inside some fake point's k-NN ball."""
    r_real, r_fake = _knn_radii(real, k), _knn_radii(fake, k)
    d = _pdist(fake, real)  # (n_fake, n_real)
    precision = float((d <= r_real[None]).any(1).mean())
    recall = float((d.T <= r_fake[None]).any(1).mean())
    return precision, recall


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance (equal sizes: sorted projections compared point by point)."""
    rng = np.random.default_rng(seed)
    n = min(len(x), len(y))
    x, y = x[:n], y[:n]
    dirs = rng.normal(size=(projections, x.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    px, py = np.sort(x @ dirs.T, axis=0), np.sort(y @ dirs.T, axis=0)
    return float(np.abs(px - py).mean())


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 with a Gaussian kernel (bandwidth: median pairwise distance of y by default)."""
    dxx, dyy, dxy = _pdist(x, x), _pdist(y, y), _pdist(x, y)
    h = bandwidth or float(np.median(dyy[np.triu_indices(len(y), 1)]))
    k = lambda d: np.exp(-(d**2) / (2 * h**2))  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy = k(dxx), k(dyy)
    return float((kxx.sum() - m) / (m * (m - 1)) + (kyy.sum() - n) / (n * (n - 1)) - 2 * k(dxy).mean())
