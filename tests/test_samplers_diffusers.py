"""Parity of fewstep's samplers with diffusers' schedulers on a diffusers UNet2DModel (issue 2, item 3b).

Each test runs (in float64) the diffusers loop (set_timesteps, scale_model_input, unet, step) and fewstep's sampler
from the same initial noise on the same timesteps, and asserts agreement to ~1e-4 relative.
"""

from unittest import mock

import pytest
import torch
from diffusers import (  # noqa: I001
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UNet2DModel,
)

from fewstep.diffusion.schedules import spaced_timesteps
from fewstep.models.backbones import UNetBackbone
from fewstep.models.denoiser import Denoiser
from fewstep.models.scheduler_config import VPProcess
from fewstep.samplers import SamplerOptions, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler, sample_heun

RTOL = 1e-4


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )
    with torch.no_grad():  # make the output depend strongly on the input and on t
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # float64 on both sides: the perturbed net amplifies float32 round-off to ~1e-4 by itself, and in
    # float64 the two implementations agree to ~1e-13, so any real difference in a formula shows.
    return unet.eval().double()


def _cfg(clip: bool, prediction: str = "epsilon", schedule: str = "linear") -> dict:
    return {"num_train_timesteps": 1000, "beta_schedule": schedule, "beta_start": 0.0001, "beta_end": 0.02,
            "prediction_type": prediction, "clip_sample": clip, "clip_sample_range": 1.0}


def _fewstep(unet, cfg):
    process = VPProcess.from_diffusers({"_class_name": "DDPMScheduler", **cfg})
    return Denoiser(UNetBackbone(unet), process.schedule(), process.prediction), process


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    err = (a - b).abs().max() / b.abs().max()
    assert err < RTOL, f"relative max error {err:.2e}"


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@torch.no_grad()
def test_ddim_matches_diffusers(clip, prediction):
    unet = _unet()
    cfg = _cfg(clip, prediction)
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(10)
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    den, process = _fewstep(unet, cfg)
    sigmas = process.schedule().sampling_sigmas(sched.timesteps.tolist())
    ours = sample_ddim(den, noise, sigmas, opts=SamplerOptions(clip_x0=process.x0_clip()))
    _close(ours, x)


@pytest.mark.parametrize("clip", [False, True])
@torch.no_grad()
def test_ddpm_matches_diffusers_with_same_noise(clip):
    unet = _unet()
    cfg = _cfg(clip)
    sched = DDPMScheduler.from_config(cfg)
    sched.set_timesteps(8)
    noise = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    step_noise = [torch.randn(3, 1, 8, 8, dtype=torch.float64) for _ in sched.timesteps]
    calls = iter(step_noise)
    x = noise.clone()
    with mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor", lambda *a, **k: next(calls)):
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    den, process = _fewstep(unet, cfg)
    sigmas = process.schedule().sampling_sigmas(sched.timesteps.tolist())
    opts = SamplerOptions(clip_x0=process.x0_clip(), step_noise=lambda i, like: step_noise[i])
    _close(sample_ddpm(den, noise, sigmas, opts=opts), x)


def _check_karras_loop(scheduler_cls, sampler, cfg: dict, n: int) -> None:
    """A diffusers sigma-space scheduler (scale_model_input + step) against a fewstep sampler on the same
    trailing timesteps and the same initial state."""
    unet = _unet()
    timesteps = spaced_timesteps(n, 1000, "trailing")
    sched = scheduler_cls.from_config(cfg)
    sched.set_timesteps(timesteps=timesteps)
    den, process = _fewstep(unet, cfg)
    sigmas = process.schedule().sampling_sigmas(timesteps)
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    x = noise * (1 + sigmas[0] ** 2).sqrt()  # the same initial state for both loops
    for t in sched.timesteps:
        x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    _close(sampler(den, noise, sigmas), x)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("n", [1, 2, 5])
@torch.no_grad()
def test_euler_matches_diffusers(clip, n):
    _check_karras_loop(EulerDiscreteScheduler, sample_euler, _cfg(clip), n)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 2, 5])
@torch.no_grad()
def test_heun_matches_diffusers(prediction, n):
    """EDM's Heun (2 evaluations a step, Euler on the last one to sigma 0) = HeunDiscreteScheduler, whose
    second evaluation of each step runs at the next step's timestep (set_timesteps interleaves them).
    Without clip_sample only: diffusers' Heun clamps x0 when it is set, EDM's Algorithm 1 (ours) never does."""
    _check_karras_loop(HeunDiscreteScheduler, sample_heun, _cfg(False, prediction), n)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 3, 6])
@torch.no_grad()
def test_dpmpp_2m_matches_diffusers(clip, prediction, n):
    unet = _unet()
    cfg = _cfg(clip, prediction)
    timesteps = spaced_timesteps(n, 1000, "trailing")
    sched = DPMSolverMultistepScheduler.from_config(cfg)
    sched.set_timesteps(timesteps=timesteps)
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    den, process = _fewstep(unet, cfg)
    _close(sample_dpmpp_2m(den, noise, process.schedule().sampling_sigmas(timesteps)), x)


def test_ddim_parity_catches_a_wrong_coefficient():
    """The DDIM parity check can fail: scale the eps the DDIM steps use by 1.001 and it must."""
    import fewstep.samplers.solvers as solvers

    real_call = solvers._call

    def wrong_call(*args):
        p = real_call(*args)
        return solvers.Prediction(x0=p.x0, eps=1.001 * p.eps)

    with mock.patch.object(solvers, "_call", wrong_call), pytest.raises(AssertionError, match="relative max error"):
        test_ddim_matches_diffusers.__wrapped__(False, "epsilon") if hasattr(
            test_ddim_matches_diffusers, "__wrapped__") else test_ddim_matches_diffusers(False, "epsilon")
