"""Noise schedules as pure functions, and the continuous-time view of a discrete teacher.

Every model in fewstep is sampled in VE form: ``x = x0 + sigma * eps`` with ``sigma >= 0`` and
``sigma = 0`` meaning clean data.  A discrete VP teacher with ``alphas_cumprod`` has
``sigma_t = sqrt((1 - abar_t) / abar_t)``; its VP state is ``z_t = x / sqrt(1 + sigma^2)``.

A :class:`NoiseSchedule` is the table ``sigma(t)`` at integer timesteps ``t = 0 .. T-1`` (increasing),
interpolated linearly in ``log sigma`` between grid points (= linear in log-SNR) so that fractional
timesteps are meaningful.  It holds no state besides that table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fewstep.errors import FewstepError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("trailing", "leading", "linspace")  # diffusers' timestep_spacing
MODEL_SPACINGS = (*SPACINGS, "grid")  # what a model folder may record: grid = its training grid (consistency)


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2), s = 0.008.
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift sqrt(abar) so the last timestep has SNR 0."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def make_betas(
    schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    trained_betas: list[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """Betas exactly as diffusers' ``DDPMScheduler`` builds them (float32)."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise FewstepError(f"unknown beta schedule {schedule!r}: use one of {', '.join(BETA_SCHEDULES)}")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """``abar_t = prod_{s<=t} (1 - beta_s)``, float32 as in diffusers."""
    return torch.cumprod(1.0 - betas, dim=0)


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: ``n`` decreasing noise levels from sigma_max to sigma_min (no 0)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def spaced_timesteps(n: int, num_train_timesteps: int = 1000, spacing: str = "trailing") -> list[int]:
    """``n`` decreasing integer timesteps in ``[0, T-1]``, spaced as diffusers' DDIM/DDPM schedulers do.

    trailing starts at T-1 (Lin et al. 2023, Table 2), which matters at 1-2 steps; leading starts at
    ``(n-1) * (T // n)``; linspace spreads ``[0, T-1]`` evenly, both ends included.
    """
    T = num_train_timesteps
    if n < 1:
        raise FewstepError(f"--steps must be at least 1, got {n}")
    if n > T:
        raise FewstepError(f"--steps {n} exceeds the model's {T} training timesteps")
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64)
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    else:
        raise FewstepError(f"unknown spacing {spacing!r}: use one of {', '.join(SPACINGS)} (or grid, for a "
                           "consistency student)")
    return [int(t) for t in ts]


def grid_timesteps(n: int, num_train_timesteps: int, grid: int) -> list[float]:
    """``n`` timesteps on the grid t_k = (T-1) k / N a consistency model was trained on, as LCM's scheduler picks
    them: every (N // n)-th grid point from t_N = T-1 down (4 of 50: 999, 759.24, 519.48, 279.72)."""
    if n < 1:
        raise FewstepError(f"--steps must be at least 1, got {n}")
    if n > grid:
        raise FewstepError(f"--steps {n} exceeds the {grid} points of the grid this model was trained on: give at "
                           f"most {grid}, or --spacing trailing")
    skip = grid // n
    return [(num_train_timesteps - 1) * (grid - i * skip) / grid for i in range(n)]


@dataclass(frozen=True)
class NoiseSchedule:
    """The table of VE noise levels at integer training timesteps, with log-linear interpolation.

    ``sigmas[t]`` is increasing in ``t``.  ``sigma(t)`` for fractional ``t`` interpolates ``log sigma``
    linearly (= linear in log-SNR), ``timestep(sigma)`` is its inverse.  Times below 0 are not on the
    grid: the clean end of every sampling path is ``sigma = 0`` (alpha_bar = 1), which samplers append.
    """

    sigmas: torch.Tensor  # float64, shape (T,)

    def __post_init__(self) -> None:
        # log sigma is what both directions interpolate; computed once, not on every network call
        object.__setattr__(self, "_log_sigmas", self.sigmas.to(torch.float64).log())
        # copies of that table on other devices, made once each: sigma(t) and timestep(sigma) work on whatever
        # device their argument is on, wherever the schedule itself lives
        object.__setattr__(self, "_log_by_device", {self._log_sigmas.device: self._log_sigmas})

    def _log_on(self, device: torch.device) -> torch.Tensor:
        table = self._log_by_device.get(device)
        if table is None:
            table = self._log_sigmas.to(device)
            self._log_by_device[device] = table
        return table

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The same schedule with its tables on ``device`` (the training loop places every denoiser's schedule)."""
        device = torch.device(device)
        return self if self.sigmas.device == device else NoiseSchedule(self.sigmas.to(device))

    @staticmethod
    def from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> NoiseSchedule:
        # A zero-terminal-SNR schedule has abar_{T-1} = 0; keep it finite as diffusers' Euler does.
        abar = alphas_cumprod.to(torch.float64).clamp(min=2.0**-24)
        return NoiseSchedule(((1 - abar) / abar).sqrt())

    @staticmethod
    def flow(num_train_timesteps: int = 1000) -> NoiseSchedule:
        """Rectified-flow path x_t = (1 - t) x + t eps on the grid t_k = (k + 1) / (T + 1), sigma = t / (1 - t)."""
        t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / (num_train_timesteps + 1)
        return NoiseSchedule(t / (1 - t))

    @staticmethod
    def karras(num_train_timesteps: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0) -> NoiseSchedule:
        """EDM's noise levels (rho = 7) as a T-point grid, increasing."""
        return NoiseSchedule(karras_sigmas(num_train_timesteps, sigma_min, sigma_max).flip(0))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, t: torch.Tensor | float | list[float]) -> torch.Tensor:
        """VE sigma at (fractional) timesteps ``t`` in ``[0, T-1]``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        log_s = self._log_on(t.device)
        lo = t.floor().clamp(0, self.num_train_timesteps - 2).long()
        w = t - lo
        return (log_s[lo] * (1 - w) + log_s[lo + 1] * w).exp()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`sigma`: fractional timestep of each noise level, clamped to ``[0, T-1]``."""
        log_s = self._log_on(sigma.device)
        ls = sigma.to(torch.float64).clamp(min=1e-20).log()
        hi = torch.searchsorted(log_s, ls.contiguous()).clamp(1, self.num_train_timesteps - 1)
        lo = hi - 1
        w = ((ls - log_s[lo]) / (log_s[hi] - log_s[lo])).clamp(0, 1)
        return lo.to(torch.float64) + w

    def alphas_cumprod(self, t: torch.Tensor | float | list[float]) -> torch.Tensor:
        """VP alpha_bar at (fractional) timesteps (only meaningful for VP teachers)."""
        s = self.sigma(t)
        return 1 / (1 + s**2)

    def sampling_sigmas(self, timesteps: list[float]) -> torch.Tensor:
        """Noise levels for a list of evaluation timesteps, with the clean end ``sigma = 0`` appended."""
        check_timesteps(timesteps, self.num_train_timesteps)
        return torch.cat([self.sigma(list(timesteps)), torch.zeros(1, dtype=torch.float64)])


def check_timesteps(timesteps: list[float], num_train_timesteps: int) -> None:
    """Raise a one-line error unless ``timesteps`` is non-empty, strictly decreasing and within [0, T-1]."""
    if len(timesteps) == 0:
        raise FewstepError("empty timestep list: give at least one timestep, e.g. --timesteps 999")
    for t in timesteps:
        if not (0 <= t <= num_train_timesteps - 1) or math.isnan(t):
            raise FewstepError(f"timestep {t} is outside [0, {num_train_timesteps - 1}]")
    for a, b in zip(timesteps, timesteps[1:]):
        if not b < a:
            raise FewstepError(f"timesteps must be strictly decreasing, got {a} then {b}")
