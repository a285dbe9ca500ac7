"""Convergence order of the ODE samplers on a problem with an exact score (issue 2, item 3a).

The data is a 2-D mixture of isotropic Gaussians, so the ideal denoiser D(x, sigma) = E[x0 | x] is exact
(:class:`fewstep.data.toy.GaussianMixture`).  The reference is the probability-flow ODE
dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3) integrated by scipy's DOP853 at
rtol = atol = 1e-10 from sigma_max to sigma_min, followed by D(x, sigma_min), which is exactly what every
sampler's last step (to sigma = 0) does.  On Karras sigmas (rho = 7) with n noise levels, the global error
must fall like n^-1 for Euler and DDIM(eta = 0) and like n^-2 for Heun and DPM-Solver++(2M).  The same holds
on an irregular list (step lengths alternating 1:2 along the Karras ramp): samplers take any list of noise
levels, and a multistep formula that silently assumes equal steps (e.g. DPM-Solver++ with r = 1) drops to
first order there while staying second order on the smooth Karras list.

All in float64 on batches of 32 two-vectors; the whole module runs in a few seconds.  It runs on one thread:
these tensors are tiny, and with two threads on a busy 2-core machine OpenMP's waiting made it 10x slower.
"""

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from fewstep.data.toy import GaussianMixture
from fewstep.diffusion.schedules import karras_sigmas
from fewstep.samplers import sample_ddim, sample_dpmpp_2m, sample_euler, sample_heun

# sigma_min / max and component stds chosen so that the ODE is not stiff and every sampler is in its
# asymptotic regime from n = 8 on (local slopes measured: Euler 1.01-1.06, Heun 2.09-2.43, DPM++ 2.07-2.22).
SIGMA_MIN, SIGMA_MAX = 0.05, 20.0
NS = (8, 16, 32, 64)
BATCH = 32
SAMPLERS = {"euler": sample_euler, "ddim": sample_ddim, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}


@contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _mixture() -> GaussianMixture:
    means = torch.tensor([[-1.0, -0.5], [1.2, 0.3], [0.0, 1.5], [0.4, -1.3]], dtype=torch.float64)
    stds = torch.tensor([0.4, 0.6, 0.4, 0.48], dtype=torch.float64)
    return GaussianMixture(means, stds, torch.tensor([0.3, 0.2, 0.3, 0.2], dtype=torch.float64))


def _sigmas(n: int, schedule: str = "karras") -> torch.Tensor:
    """n decreasing noise levels from SIGMA_MAX to SIGMA_MIN (n odd for "irregular"), then 0."""
    if schedule == "karras":
        sigmas = karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)
    else:  # every third point of a finer Karras ramp dropped: steps of 1, 2, 1, 2, ... ramp units
        m = (n - 1) // 2
        sigmas = karras_sigmas(3 * m + 1, SIGMA_MIN, SIGMA_MAX)[[i for i in range(3 * m + 1) if i % 3 != 2]]
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


@pytest.fixture(scope="module")
def problem():
    denoiser = _mixture().as_denoiser()
    noise = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_start = noise * math.sqrt(1 + SIGMA_MAX**2)  # what every sampler starts from

    def rhs(sigma: float, y: np.ndarray) -> np.ndarray:  # (x - D(x, sigma)) / sigma = E[eps | x]
        x = torch.from_numpy(y.reshape(BATCH, 2))
        return denoiser(x, torch.tensor(sigma, dtype=torch.float64)).eps.numpy().reshape(-1)

    with _one_thread():
        sol = solve_ivp(rhs, (SIGMA_MAX, SIGMA_MIN), x_start.numpy().reshape(-1), method="DOP853",
                        rtol=1e-10, atol=1e-10)
    assert sol.success, sol.message
    x_min = torch.from_numpy(sol.y[:, -1].reshape(BATCH, 2).copy())
    reference = denoiser(x_min, torch.tensor(SIGMA_MIN, dtype=torch.float64)).x0
    return denoiser, noise, reference


@pytest.fixture(scope="module")
def errors(problem):
    """RMS distance (over the batch) to the reference, per (schedule, sampler) and number of noise levels."""
    denoiser, noise, reference = problem

    def err(fn, sigmas):
        return float((fn(denoiser, noise, sigmas) - reference).norm(dim=1).pow(2).mean().sqrt())

    out = {}
    with _one_thread():
        for name, fn in SAMPLERS.items():
            out["karras", name] = [err(fn, _sigmas(n)) for n in NS]
            out["irregular", name] = [err(fn, _sigmas(n + 1, "irregular")) for n in NS]
    return out


def _slope(errs: list[float]) -> float:
    """Least-squares order p in err ~ C n^-p."""
    return -float(np.polyfit(np.log(NS), np.log(errs), 1)[0])


@pytest.mark.parametrize("schedule", ["karras", "irregular"])
@pytest.mark.parametrize(("name", "lo", "hi"), [
    ("euler", 0.8, 1.3),
    ("ddim", 0.8, 1.3),
    ("heun", 1.7, 2.6),
    ("dpmpp_2m", 1.7, 2.6),
])
def test_order_of_convergence(errors, schedule, name, lo, hi):
    errs = errors[schedule, name]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), f"{name} errors do not shrink: {errs}"
    p = _slope(errs)
    assert lo <= p <= hi, f"{name} on {schedule} sigmas: order {p:.2f} not in [{lo}, {hi}]; errors {errs}"


@pytest.mark.parametrize("schedule", ["karras", "irregular"])
def test_second_order_samplers_are_far_more_accurate(errors, schedule):
    euler = errors[schedule, "euler"][-1]
    for name in ("heun", "dpmpp_2m"):
        err = errors[schedule, name][-1]
        assert err < euler / 10, f"{name} {err:.2e} vs euler {euler:.2e} at n={NS[-1]} ({schedule})"
        assert err < 5e-3  # and they converge to the reference itself


def test_ddim_eta0_is_euler(problem):
    denoiser, noise, _ = problem
    for n in (1, 2, 5, 16):
        with _one_thread():
            a = sample_ddim(denoiser, noise, _sigmas(n))
            b = sample_euler(denoiser, noise, _sigmas(n))
        assert (a - b).abs().max() < 1e-10
