"""Metrics against known answers (issue 3): FD, KID, precision/recall, 2-D distances."""

import numpy as np
import pytest
import torch
from scipy import linalg

from fewstep.evaluate import metrics as M


def _feats(n=600, d=16, shift=0.0, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) * scale + shift


def test_fd_of_a_set_with_itself_is_zero_and_matches_a_direct_computation():
    x, y = _feats(seed=0), _feats(shift=0.3, scale=1.2, seed=1)
    assert M.fd(x, x) == pytest.approx(0.0, abs=1e-8)
    # direct: ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    r1 = linalg.sqrtm(s1).real
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()
    assert M.fd(x, y) == pytest.approx(direct, rel=1e-6)


def test_fd_matches_torchmetrics_with_a_custom_feature_module():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Flat(torch.nn.Module):  # the "feature network": flatten 1x4x4 images to 16 features
        num_features = 16

        def forward(self, x):
            return x.flatten(1).double()

    x, y = _feats(seed=2), _feats(shift=0.5, seed=3)
    fid = FrechetInceptionDistance(feature=Flat(), normalize=True, input_img_size=(1, 4, 4))
    fid.update(torch.tensor(x).float().reshape(-1, 1, 4, 4), real=True)
    fid.update(torch.tensor(y).float().reshape(-1, 1, 4, 4), real=False)
    assert float(fid.compute()) == pytest.approx(M.fd(x, y), rel=1e-3)


def test_fd_grows_monotonically_with_noise_and_blur():
    from fewstep.data.datasets import load_dataset  # noqa: I001
    from fewstep.evaluate.runner import measure

    x = load_dataset("digits", "train").x[:500]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    fds = [measure("digits", x + s * noise, None, bootstrap=0).fd for s in (0.0, 0.2, 0.5, 1.0)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    blur = torch.nn.functional.avg_pool2d
    blurred = [x, blur(x, 3, 1, 1, count_include_pad=False), blur(blur(x, 3, 1, 1, count_include_pad=False), 3, 1, 1,
                                                                   count_include_pad=False)]
    fb = [measure("digits", b, None, bootstrap=0).fd for b in blurred]
    assert fb[0] < fb[1] < fb[2], fb


def test_precision_recall_identical_and_disjoint():
    x = _feats(n=300, seed=4)
    assert M.precision_recall(x, x, k=3) == (1.0, 1.0)
    far = x + 100.0
    assert M.precision_recall(x, far, k=3) == (0.0, 0.0)
    # a fake set covering half the real modes: precision stays high, recall drops
    real = np.concatenate([_feats(n=200, d=2, seed=5) * 0.1, _feats(n=200, d=2, seed=6) * 0.1 + 5])
    fake = _feats(n=200, d=2, seed=7) * 0.1
    p, r = M.precision_recall(real, fake, k=3)
    assert p > 0.9 and 0.4 < r < 0.6


def test_kid_is_unbiased_near_zero_for_the_same_distribution():
    vals = [M.kid(_feats(n=400, seed=s), _feats(n=400, seed=100 + s), subsets=20, subset_size=200)[0]
            for s in range(5)]
    assert abs(np.mean(vals)) < 2e-3  # unbiased: scatters around 0, not above it
    assert min(vals) < 0 or abs(np.mean(vals)) < 5e-4
    assert M.kid(_feats(n=400, seed=1), _feats(n=400, shift=0.5, seed=2), subset_size=200)[0] > 0.05


def test_2d_distances():
    x, y = _feats(n=2000, d=2, seed=8), _feats(n=2000, d=2, seed=9)
    z = _feats(n=2000, d=2, shift=1.0, seed=10)
    assert M.sliced_wasserstein(x, y) < 0.1 < M.sliced_wasserstein(x, z)
    # SWD of a pure shift by c along a direction averages |c . u| over random unit u; in 2-D that is 2|c|/pi
    assert M.sliced_wasserstein(x, x + np.array([1.0, 0.0]), projections=4096) == pytest.approx(2 / np.pi, rel=0.05)
    assert abs(M.mmd_rbf(x[:500], y[:500])) < 0.01 < M.mmd_rbf(x[:500], z[:500])


def test_fd_difference_paired_resolves_what_unpaired_cannot():
    """Two sets that share their noise (b = a shifted a little, as a student's and a teacher's samples share each
    sample's noise): the paired interval excludes 0 and is much narrower than the unpaired one."""
    rng = np.random.default_rng(0)
    ref = M.Gaussian.fit(rng.normal(size=(4000, 8)))
    a = rng.normal(size=(1000, 8))
    b = a + 0.08
    d, lo, hi = M.fd_difference(a, b, ref)
    fa = M.frechet_distance(M.Gaussian.fit(a), ref)
    fb = M.frechet_distance(M.Gaussian.fit(b), ref)
    assert d == pytest.approx(fa - fb) and lo <= d <= hi
    _, ulo, uhi = M.fd_difference(a, b, ref, paired=False)
    assert (hi - lo) < 0.8 * (uhi - ulo), (lo, hi, ulo, uhi)  # measured 0.63x: the covariance terms cancel
    assert hi < 0 or lo > 0  # resolved when paired
    same = M.fd_difference(a, a.copy(), ref)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="one size"):
        M.fd_difference(a, a[:10], ref)
