"""Parameterizations: how a network's inputs and outputs relate to the clean-data estimate.

Everything is written for the VE state ``x = x0 + sigma * eps`` (sigma = VE noise level).  A VP network
sees ``z = alpha * x`` with ``alpha = 1 / sqrt(1 + sigma^2)`` and VP noise ``s = sigma * alpha``; a
rectified-flow network sees ``x_t = (1 - t) x0 + t eps = x / (1 + sigma)`` with ``t = sigma / (1 + sigma)``.

Each :class:`Parameterization` is an adapter with three pure functions:
``inputs`` (what the network is fed), ``predict`` (network output -> :class:`Prediction`) and
``target`` (what the network should output for a known x0 and eps: the teacher's regression target).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fewstep.diffusion.schedules import NoiseSchedule
from fewstep.errors import FewstepError

Tensor = torch.Tensor


@dataclass
class Prediction:
    """A denoiser's output: the clean-data estimate and the matching noise estimate (VE: x = x0 + sigma eps)."""

    x0: Tensor
    eps: Tensor


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """Per-sample scalars (B,) -> shape (B, 1, ..., 1) matching ``like``, in its dtype."""
    v = torch.as_tensor(v, device=like.device)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def vp_alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """VE sigma -> VP (alpha_t, sigma_t), alpha^2 + sigma_t^2 = 1."""
    alpha = 1 / torch.sqrt(1 + sigma**2)
    return alpha, sigma * alpha


# --- conversions between predictions (VP form: z = alpha x0 + s eps) -----------------------------
def x0_from_eps(z: Tensor, eps: Tensor, alpha: Tensor, s: Tensor) -> Tensor:
    return (z - s * eps) / alpha


def eps_from_x0(z: Tensor, x0: Tensor, alpha: Tensor, s: Tensor) -> Tensor:
    return (z - alpha * x0) / s


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, s: Tensor) -> Tensor:
    # Salimans & Ho 2022, sec. 4: v = alpha eps - sigma x.
    return alpha * eps - s * x0


def x0_from_v(z: Tensor, v: Tensor, alpha: Tensor, s: Tensor) -> Tensor:
    return alpha * z - s * v


def eps_from_v(z: Tensor, v: Tensor, alpha: Tensor, s: Tensor) -> Tensor:
    return s * z + alpha * v


def velocity_from_x0_eps(x0: Tensor, eps: Tensor) -> Tensor:
    # Rectified flow (Liu et al. 2022): x_t = (1 - t) x0 + t eps, dx_t/dt = eps - x0.
    return eps - x0


def add_noise(x0: Tensor, eps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward noising of DDPM: z_t = sqrt(abar) x0 + sqrt(1 - abar) eps (abar per sample)."""
    abar = bcast(alphas_cumprod, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def flow_interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """The straight path of flow matching: x_t = (1 - t) x0 + t eps."""
    t = bcast(t, x0)
    return (1 - t) * x0 + t * eps


# --- adapters --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parameterization:
    """How one kind of network is fed and read.  ``uses_schedule``: its time input is a training timestep."""

    name: str
    inputs: Callable[[Tensor, Tensor, NoiseSchedule], tuple[Tensor, Tensor]]
    predict: Callable[[Tensor, Tensor, Tensor], Prediction]
    target: Callable[[Tensor, Tensor, Tensor], Tensor]


def _vp_inputs(x: Tensor, sigma: Tensor, schedule: NoiseSchedule) -> tuple[Tensor, Tensor]:
    alpha, _ = vp_alpha_sigma(bcast(sigma, x))
    return x * alpha, schedule.timestep(sigma).to(x.dtype)


def _eps_predict(out: Tensor, x: Tensor, sigma: Tensor) -> Prediction:
    s = bcast(sigma, x)
    return Prediction(x0=x - s * out, eps=out)


def _v_predict(out: Tensor, x: Tensor, sigma: Tensor) -> Prediction:
    alpha, s = vp_alpha_sigma(bcast(sigma, x))
    z = alpha * x
    return Prediction(x0=x0_from_v(z, out, alpha, s), eps=eps_from_v(z, out, alpha, s))


def _v_target(x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    alpha, s = vp_alpha_sigma(bcast(sigma, x0))
    return v_from_x0_eps(x0, eps, alpha, s)


def _x0_predict(out: Tensor, x: Tensor, sigma: Tensor) -> Prediction:
    return Prediction(x0=out, eps=(x - out) / bcast(sigma, x))


def _flow_inputs(x: Tensor, sigma: Tensor, schedule: NoiseSchedule) -> tuple[Tensor, Tensor]:
    t = sigma / (1 + sigma)
    return x / bcast(1 + sigma, x), (1000 * t).to(x.dtype)


def _flow_predict(out: Tensor, x: Tensor, sigma: Tensor) -> Prediction:
    t = bcast(sigma / (1 + sigma), x)
    xt = x * (1 - t)
    return Prediction(x0=xt - t * out, eps=xt + (1 - t) * out)


SIGMA_DATA = 0.5  # EDM's sigma_data for data in [-1, 1]


def edm_coeffs(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor, Tensor]:
    """Karras et al. 2022, Table 1: c_skip, c_out, c_in."""
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / torch.sqrt(sigma**2 + sd2)
    c_in = 1 / torch.sqrt(sigma**2 + sd2)
    return c_skip, c_out, c_in


def _edm_inputs(x: Tensor, sigma: Tensor, schedule: NoiseSchedule) -> tuple[Tensor, Tensor]:
    _, _, c_in = edm_coeffs(bcast(sigma, x))
    # c_noise = ln(sigma) / 4 (Table 1), times 250 so a sinusoidal embedding built for t in [0, 1000]
    # resolves it (diffusers' UNet frequencies go down to 1e-4).
    return x * c_in, (250 * sigma.log()).to(x.dtype)


def _edm_predict(out: Tensor, x: Tensor, sigma: Tensor) -> Prediction:
    s = bcast(sigma, x)
    c_skip, c_out, _ = edm_coeffs(s)
    x0 = c_skip * x + c_out * out
    return Prediction(x0=x0, eps=(x - x0) / s)


def _edm_target(x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    # Training F towards (x0 - c_skip x) / c_out equals EDM's lambda(sigma)-weighted loss on D (eq. 8).
    s = bcast(sigma, x0)
    c_skip, c_out, _ = edm_coeffs(s)
    return (x0 - c_skip * (x0 + s * eps)) / c_out


# --- consistency models: f(x, sigma_min) = x ----------------------------------------------------------------
CM_SIGMA_MIN = 0.002  # Song et al. 2023 / Song & Dhariwal 2023 (EDM's noise range)


def cm_coeffs(sigma: Tensor, sigma_min: float = CM_SIGMA_MIN, sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor]:
    """Song et al. 2023, Appendix C: c_skip = sd^2 / ((s - s_min)^2 + sd^2), c_out = sd (s - s_min) / sqrt(sd^2 + s^2),
    so f(x, sigma_min) = x exactly."""
    sd2 = sigma_data**2
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = sigma_data * (sigma - sigma_min) / torch.sqrt(sd2 + sigma**2)
    return c_skip, c_out


def _cm_predict(out: Tensor, x: Tensor, sigma: Tensor) -> Prediction:
    # Consistency training's f = c_skip x + c_out F(c_in x, c_noise) (Song & Dhariwal 2023), EDM's c_in / c_noise.
    s = bcast(sigma, x)
    c_skip, c_out = cm_coeffs(s)
    x0 = c_skip * x + c_out * out
    return Prediction(x0=x0, eps=(x - x0) / s)


def _cm_target(x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    # The F that makes f(x0 + sigma eps, sigma) = x0 (consistency training itself never regresses onto it).
    s = bcast(sigma, x0)
    c_skip, c_out = cm_coeffs(s)
    return (x0 - c_skip * (x0 + s * eps)) / c_out


def lcm_boundary(x: Tensor, x0: Tensor, sigma: Tensor, timestep: Tensor, sigma_data: float = SIGMA_DATA,
                 timestep_scaling: float = 10.0) -> Prediction:
    """Latent consistency models' boundary condition for a discrete VP teacher (Luo et al. 2023):
    f(z_t, t) = c_skip(t) z_t + c_out(t) x0(z_t, t) with c_skip = sd^2 / ((10 t)^2 + sd^2), c_out = 10 t / sqrt((10
    t)^2 + sd^2) and t the training timestep, so f = z_0 at t = 0 and f ~ x0 from t ~ 1 on.  Written for the VE
    state (z_t = alpha x)."""
    s = bcast(sigma, x)
    u = bcast(timestep * timestep_scaling, x)
    c_skip = sigma_data**2 / (u**2 + sigma_data**2)
    c_out = u / torch.sqrt(u**2 + sigma_data**2)
    alpha, _ = vp_alpha_sigma(s)
    f = c_skip * alpha * x + c_out * x0
    return Prediction(x0=f, eps=(x - f) / s)


def _boot_inputs(x: Tensor, sigma: Tensor, schedule: NoiseSchedule) -> tuple[Tensor, Tensor]:
    """A BOOT student (or a GAN's generator) reads the starting noise (the VP state at the first timestep, which is
    the unit-variance noise itself) and answers for t = 0."""
    alpha, _ = vp_alpha_sigma(bcast(sigma, x))
    return x * alpha, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


PARAMETERIZATIONS: dict[str, Parameterization] = {
    "eps": Parameterization("eps", _vp_inputs, _eps_predict, lambda x0, eps, sigma: eps),
    "v": Parameterization("v", _vp_inputs, _v_predict, _v_target),
    "x0": Parameterization("x0", _vp_inputs, _x0_predict, lambda x0, eps, sigma: x0),
    "flow": Parameterization("flow", _flow_inputs, _flow_predict, lambda x0, eps, sigma: eps - x0),
    "edm": Parameterization("edm", _edm_inputs, _edm_predict, _edm_target),
    # consistency training's network (trained by the consistency loss; the target is for completeness)
    "cm": Parameterization("cm", _edm_inputs, _cm_predict, _cm_target),
    # a BOOT student (Gu et al. 2023): noise -> the signal y_0 = x0 in one evaluation from the first timestep only
    # (its output is the signal at t = 0, the image itself: the target is x0; it is trained by bootstrapping)
    "boot": Parameterization("boot", _boot_inputs, _x0_predict, lambda x0, eps, sigma: x0),
    # a GAN's generator (fewstep.distill.gan): the same one evaluation, noise -> sample, trained adversarially
    "gan": Parameterization("gan", _boot_inputs, _x0_predict, lambda x0, eps, sigma: x0),
}
ONE_EVALUATION = ("boot", "gan")  # predictions that map the starting noise to a sample from the first timestep only

# diffusers' scheduler `prediction_type` -> ours
DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def get_parameterization(name: str) -> Parameterization:
    try:
        return PARAMETERIZATIONS[name]
    except KeyError:
        raise FewstepError(f"unknown prediction {name!r}: use one of {', '.join(PARAMETERIZATIONS)}") from None


# --- x0 clipping as diffusers' DDPM/DDIM schedulers do it ------------------------------------------
def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float = 1.0) -> Tensor:
    """Saharia et al. 2022 (Imagen) dynamic thresholding, as diffusers' ``_threshold_sample``."""
    flat = x0.reshape(x0.shape[0], -1).abs()
    s = torch.quantile(flat.float(), ratio, dim=1).to(x0.dtype).clamp(min=1, max=max_value)
    s = bcast(s, x0)
    return torch.clamp(x0, -s, s) / s


def make_x0_clip(
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
) -> Callable[[Tensor], Tensor] | None:
    """The x0 post-processing a diffusers scheduler config asks for (thresholding wins over clipping)."""
    if thresholding:
        return lambda x0: dynamic_threshold(x0, dynamic_thresholding_ratio, sample_max_value)
    if clip_sample:
        return lambda x0: x0.clamp(-clip_sample_range, clip_sample_range)
    return None
