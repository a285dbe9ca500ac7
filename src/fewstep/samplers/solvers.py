"""Samplers: short stateless functions with one signature (k-diffusion style).

``sample_X(denoiser, noise, sigmas, cond=None, opts=SamplerOptions()) -> x0 samples``

- ``noise`` is unit-variance eps: the VP state at the first noise level.  Every sampler runs on the VE
  state ``x = x0 + sigma eps`` and starts from ``noise * sqrt(1 + sigma_0^2)`` (identical to starting a
  VP sampler from ``noise``).
- ``sigmas`` are VE noise levels, strictly decreasing, ending with 0 (clean data, alpha_bar = 1):
  one network evaluation per entry except the last (Heun: 2 per step, 1 on the last step).
- DDPM and DDIM post-process x0 with ``opts.clip_x0`` as diffusers does (the raw eps is kept);
  Euler, Heun and DPM-Solver++ never clip.  diffusers' Euler and DPM-Solver++ do not either; its
  HeunDiscreteScheduler clamps x0 when the config sets ``clip_sample``, so with such a config fewstep's
  Heun (EDM's Algorithm 1, which has no clipping) differs from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fewstep.diffusion.param import Prediction
from fewstep.samplers.guidance import DenoiserFn

Tensor = torch.Tensor
StepNoise = Callable[[int, Tensor], Tensor]


@dataclass(frozen=True)
class SamplerOptions:
    """Options some samplers read: DDIM's eta, x0 clipping (DDPM/DDIM), the per-step noise source."""

    eta: float = 0.0
    clip_x0: Callable[[Tensor], Tensor] | None = None
    step_noise: StepNoise | None = None  # (step index, like) -> unit normal noise shaped like `like`
    ddpm_variance: str = "fixed_small"  # or "fixed_large"
    generator: torch.Generator | None = None  # used when step_noise is None


def _noise(opts: SamplerOptions, i: int, like: Tensor) -> Tensor:
    if opts.step_noise is not None:
        return opts.step_noise(i, like)
    return torch.randn(like.shape, generator=opts.generator, dtype=like.dtype).to(like.device)


def _start(noise: Tensor, sigmas: Tensor) -> Tensor:
    return noise * float((1 + sigmas[0] ** 2).sqrt())


def _clip(x0: Tensor, opts: SamplerOptions) -> Tensor:
    return opts.clip_x0(x0) if opts.clip_x0 is not None else x0


def _call(denoiser: DenoiserFn, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Prediction:
    return denoiser(x, sigma.to(x.device).expand(x.shape[0]), cond)


def to_d(x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    """Karras et al. 2022, eq. 3/4: the probability-flow ODE derivative dx/dsigma = (x - D(x)) / sigma."""
    return (x - x0) / float(sigma)


def sample_euler(denoiser: DenoiserFn, noise: Tensor, sigmas: Tensor, cond: Tensor | None = None,
                 opts: SamplerOptions = SamplerOptions()) -> Tensor:
    """Euler steps of the probability-flow ODE (Karras et al. 2022, eq. 3); equal to DDIM(eta=0) without clipping."""
    x = _start(noise, sigmas)
    for i in range(len(sigmas) - 1):
        p = _call(denoiser, x, sigmas[i], cond)
        x = x + to_d(x, sigmas[i], p.x0) * float(sigmas[i + 1] - sigmas[i])
    return x


def sample_heun(denoiser: DenoiserFn, noise: Tensor, sigmas: Tensor, cond: Tensor | None = None,
                opts: SamplerOptions = SamplerOptions()) -> Tensor:
    """Karras et al. 2022, Algorithm 1 (deterministic): Heun's 2nd order, Euler on the last step to sigma 0."""
    x = _start(noise, sigmas)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = to_d(x, s, _call(denoiser, x, s, cond).x0)
        x_next = x + d * float(s_next - s)
        if s_next > 0:  # Algorithm 1, lines 9-11: second-order correction
            d_next = to_d(x_next, s_next, _call(denoiser, x_next, s_next, cond).x0)
            x_next = x + (d + d_next) / 2 * float(s_next - s)
        x = x_next
    return x


def sample_dpmpp_2m(denoiser: DenoiserFn, noise: Tensor, sigmas: Tensor, cond: Tensor | None = None,
                    opts: SamplerOptions = SamplerOptions()) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in lambda = -log sigma; first order on the first
    and the last step (the last lands on sigma = 0), as diffusers' DPMSolverMultistepScheduler does."""
    x = _start(noise, sigmas)
    old_x0, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = _call(denoiser, x, s, cond).x0
        if s_next == 0:
            x = x0
            break
        h = float(s.log() - s_next.log())  # lambda_next - lambda
        if old_x0 is None:
            x0_d = x0
        else:
            r = h_last / h
            x0_d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
        # VE form of eq. (x_t = sigma_t/sigma_s x_s - alpha_t (e^{-h} - 1) D): alpha = 1 in VE.
        x = float(s_next / s) * x - float(torch.expm1(torch.tensor(-h))) * x0_d
        old_x0, h_last = x0, h
    return x


def sample_ddim(denoiser: DenoiserFn, noise: Tensor, sigmas: Tensor, cond: Tensor | None = None,
                opts: SamplerOptions = SamplerOptions()) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) with eta; x0 clipped by ``opts.clip_x0``, the raw eps kept."""
    x = _start(noise, sigmas)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        p = _call(denoiser, x, s, cond)
        x0 = _clip(p.x0, opts)
        ab_t, ab_s = 1 / (1 + s**2), 1 / (1 + s_next**2)
        var = (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)  # eq. 16 sigma_t(eta = 1)^2
        std = opts.eta * var.sqrt()
        z = ab_s.sqrt() * x0 + float((1 - ab_s - std**2).clamp(min=0).sqrt()) * p.eps
        if std > 0:
            z = z + float(std) * _noise(opts, i, x)
        x = z / float(ab_s.sqrt())
    return x


def sample_ddpm(denoiser: DenoiserFn, noise: Tensor, sigmas: Tensor, cond: Tensor | None = None,
                opts: SamplerOptions = SamplerOptions()) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7) between arbitrary timesteps, as diffusers'
    DDPMScheduler: posterior mean from the (clipped) x0 and z_t, variance "fixed_small" or "fixed_large"."""
    x = _start(noise, sigmas)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        p = _call(denoiser, x, s, cond)
        x0 = _clip(p.x0, opts)
        ab_t, ab_s = 1 / (1 + s**2), 1 / (1 + s_next**2)
        alpha, beta = ab_t / ab_s, 1 - ab_t / ab_s
        z_t = x * float(ab_t.sqrt())
        z = float(ab_s.sqrt() * beta / (1 - ab_t)) * x0 + float(alpha.sqrt() * (1 - ab_s) / (1 - ab_t)) * z_t
        if s_next > 0:
            var = beta if opts.ddpm_variance == "fixed_large" else ((1 - ab_s) / (1 - ab_t) * beta).clamp(min=1e-20)
            z = z + float(var.sqrt()) * _noise(opts, i, x)
        x = z / float(ab_s.sqrt())
    return x


def sample_consistency(denoiser: DenoiserFn, noise: Tensor, sigmas: Tensor, cond: Tensor | None = None,
                       opts: SamplerOptions = SamplerOptions()) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): x0 = f(x, sigma_0), then for each later
    sigma > 0 fresh noise x = x0 + sigma z and x0 = f(x, sigma).  The paper's sqrt(sigma^2 - sigma_min^2) is sigma
    here (sigma_min <= 0.01: a relative difference below 1e-4 at every level a student is sampled at)."""
    x = _start(noise, sigmas)
    for i in range(len(sigmas) - 1):
        x = _call(denoiser, x, sigmas[i], cond).x0
        if sigmas[i + 1] > 0:
            x = x + float(sigmas[i + 1]) * _noise(opts, i, x)
    return x


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function, its cost in NFE for n evaluation points, its traits."""

    fn: Callable[..., Tensor]
    nfe: Callable[[int], int]
    stochastic: bool = False
    clips: bool = False


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, lambda n: n, stochastic=True, clips=True),
    "ddim": SamplerSpec(sample_ddim, lambda n: n, stochastic=True, clips=True),
    "euler": SamplerSpec(sample_euler, lambda n: n),
    "heun": SamplerSpec(sample_heun, lambda n: 2 * n - 1),
    "dpmpp-2m": SamplerSpec(sample_dpmpp_2m, lambda n: n),
    "consistency": SamplerSpec(sample_consistency, lambda n: n, stochastic=True),
}
