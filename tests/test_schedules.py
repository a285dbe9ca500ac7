"""Schedules, timestep spacing and parameterization conversions against diffusers and known answers."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from fewstep.diffusion.param import PARAMETERIZATIONS, edm_coeffs, vp_alpha_sigma
from fewstep.diffusion.schedules import NoiseSchedule, karras_sigmas, spaced_timesteps
from fewstep.errors import FewstepError
from fewstep.models.scheduler_config import VPProcess


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_identical_to_diffusers(schedule, zero_snr):
    cfg = dict(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr, beta_start=0.00085, beta_end=0.012)
    ours = VPProcess(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr, beta_start=0.00085,
                     beta_end=0.012).alphas_cumprod()
    theirs = DDPMScheduler(**cfg).alphas_cumprod
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)


def test_fractional_timesteps_interpolate_log_snr_and_round_trip():
    sched = VPProcess().schedule()
    abar = VPProcess().alphas_cumprod().double()
    # on the grid: exactly the discrete schedule
    assert torch.allclose(sched.alphas_cumprod(torch.arange(1000.0)), abar, rtol=1e-12)
    # between grid points: log-SNR is the average of its neighbours
    logsnr = lambda a: (a / (1 - a)).log()  # noqa: E731
    mid = sched.alphas_cumprod(torch.tensor([10.5, 500.5]))
    expect = (logsnr(abar[[10, 500]]) + logsnr(abar[[11, 501]])) / 2
    assert torch.allclose(logsnr(mid), expect, rtol=1e-10)
    t = torch.tensor([0.0, 0.25, 17.3, 499.5, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(sched.timestep(sched.sigma(t)), t, atol=1e-9)
    # the clean end: sampling_sigmas appends sigma = 0 (alpha_bar = 1)
    assert sched.sampling_sigmas([999, 500])[-1] == 0


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 50])
def test_spacing_matches_diffusers_ddim(spacing, n):
    s = DDIMScheduler(timestep_spacing=spacing)
    s.set_timesteps(n)
    assert spaced_timesteps(n, 1000, spacing) == s.timesteps.tolist()


def test_trailing_starts_at_last_timestep_and_bad_requests_fail():
    assert spaced_timesteps(1) == [999]
    assert spaced_timesteps(2) == [999, 499]
    with pytest.raises(FewstepError, match="spacing"):
        spaced_timesteps(4, spacing="middle")
    sched = VPProcess().schedule()
    with pytest.raises(FewstepError, match="strictly decreasing"):
        sched.sampling_sigmas([500, 600])
    with pytest.raises(FewstepError, match="outside"):
        sched.sampling_sigmas([1000, 10])


def test_karras_sigmas_known_values():
    s = karras_sigmas(18, 0.002, 80.0)
    assert s[0] == pytest.approx(80.0) and s[-1] == pytest.approx(0.002)
    assert torch.all(s[1:] < s[:-1])
    # rho = 7: sigma^(1/7) is linear in the index
    r = s ** (1 / 7)
    assert torch.allclose(r[1:] - r[:-1], (r[1] - r[0]).expand(17), rtol=1e-9)


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_parameterizations_round_trip(name):
    """Feeding a network's exact target back through `predict` recovers x0 and eps."""
    torch.manual_seed(0)
    p = PARAMETERIZATIONS[name]
    sched = NoiseSchedule.flow() if name == "flow" else (NoiseSchedule.karras() if name == "edm"
                                                         else VPProcess().schedule())
    x0 = torch.randn(6, 3, dtype=torch.float64)
    eps = torch.randn(6, 3, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 50.0], dtype=torch.float64)
    x = x0 + sigma[:, None] * eps
    pred = p.predict(p.target(x0, eps, sigma), x, sigma)
    assert torch.allclose(pred.x0, x0, atol=1e-9) and torch.allclose(pred.eps, eps, atol=1e-9)
    net_in, t_in = p.inputs(x, sigma, sched)
    assert net_in.shape == x.shape and t_in.shape == (6,)


def test_vp_and_flow_inputs_are_the_states_the_papers_define():
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    sched = VPProcess().schedule()
    t = torch.tensor([0.0, 100.0, 500.0, 999.0], dtype=torch.float64)
    abar = sched.alphas_cumprod(t)
    sigma = sched.sigma(t)
    z, t_in = PARAMETERIZATIONS["eps"].inputs(x0 + sigma[:, None] * eps, sigma, sched)
    assert torch.allclose(z, abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * eps)  # DDPM eq. 4
    assert torch.allclose(t_in, t)
    ft = torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
    fs = ft / (1 - ft)
    xt, ft_in = PARAMETERIZATIONS["flow"].inputs(x0 + fs[:, None] * eps, fs, NoiseSchedule.flow())
    assert torch.allclose(xt, (1 - ft)[:, None] * x0 + ft[:, None] * eps)  # x_t = (1 - t) x0 + t eps
    assert torch.allclose(ft_in, 1000 * ft)
    a, s = vp_alpha_sigma(sigma)
    assert torch.allclose(a**2 + s**2, torch.ones_like(a))


def test_edm_boundary_condition():
    c_skip, c_out, c_in = edm_coeffs(torch.tensor([1e-8, 0.5, 80.0], dtype=torch.float64))
    assert c_skip[0] == pytest.approx(1.0) and c_out[0] == pytest.approx(0.0, abs=1e-7)
    assert c_skip[1] == pytest.approx(0.5) and c_in[1] == pytest.approx(1 / np.sqrt(0.5))
