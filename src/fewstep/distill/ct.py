"""Improved consistency training (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models",
iCT): a consistency model learned from data alone, no teacher.

- Network: a fresh (randomly initialized) backbone of ``--preset`` (default: by data shape), class-conditional
  when the data has labels (no null class: it is never dropped).  Consistency function f = c_skip x + c_out F(c_in
  x, c_noise) with EDM's c_in, c_noise = 250 ln sigma and c_skip, c_out such that f(x, 0.002) = x (the ``cm``
  prediction, :func:`fewstep.diffusion.param.cm_coeffs`, sigma_data 0.5).
- Curriculum (sec. 3.4): at iteration k of K (K = ``--iters``) the grid has N(k) = min(s0 2^floor(k / K'), s1) + 1
  levels, s0 = 10, s1 = 1280, K' = floor(K / (log2 floor(s1 / s0) + 1)) (= K / 8; at least 1): N doubles from 11
  to 1281 over the run, whatever K is.  The grid is Karras et al.'s (rho = 7) from sigma_min = 0.002 to sigma_max
  = 80, indexed upward: sigma_1 < ... < sigma_N.
- Noise levels (sec. 3.5): n is drawn with p(n) proportional to erf((ln sigma_{n+1} - P_mean) / (sqrt2 P_std)) -
  erf((ln sigma_n - P_mean) / (sqrt2 P_std)), P_mean = -1.1, P_std = 2.0 (a discretized lognormal).
- Loss: lambda(sigma_n) d(f_theta(x + sigma_{n+1} eps, sigma_{n+1}), f_theta-(x + sigma_n eps, sigma_n)) with one
  eps for both points, lambda = 1 / (sigma_{n+1} - sigma_n) (sec. 3.1), d the pseudo-Huber distance sqrt(||a -
  b||^2 + c^2) - c with c = 0.00054 sqrt(dim) (sec. 3.3; ``--loss l2``: per-sample mean squared error instead).
  theta- = stop-grad(theta): no target EMA (sec. 3.2).  The loop's EMA of theta is only the evaluation model, the
  one the student folder exports (the paper keeps one too).
- Dropout (sec. 3.1 finds it important): the UNet presets get ``UNET_DROPOUT`` in every ResNet block (diffusers'
  ``UNet2DModel(dropout=...)``), the same mask in both passes (theta- = theta, dropout included, as diffusers'
  iCT example script), drawn from the loop's generator so a resumed run stays exact.  The MLP preset for 2-D data has no
  dropout.  The paper used 0.3 (CIFAR-10) and 0.2 (ImageNet 64) on much larger networks and longer runs.
- Sampling: multistep consistency sampling (the ``consistency`` sampler, Song et al. 2023, Algorithm 1) on a
  1000-point Karras table from 0.002 to 80 (it only maps timesteps to sigmas).  The student records ``--steps``:
  1 step: sigma_max = 80 (timestep T-1); 2 steps: 80 then sigma_mid = 0.821 (iCT's two-step choice on CIFAR-10);
  k > 2 steps: the timesteps (T-1) i / k, i = k..1, i.e. Karras's rho = 7 spacing of k + 1 levels from 80 to
  0.002 without the last.  Any other steps or timesteps can be given at sampling time.

Not as in the paper: the network and its size (diffusers' UNet2DModel or an MLP, not NCSN++), the optimizer and
learning-rate schedule (the shared loop: AdamW, warm-up then cosine, gradient clipping; iCT: Adam at a constant
lr), the noise embedding (sinusoidal of c_noise = 250 ln sigma; iCT: Fourier features of scale 0.02, sec. 3.1)
and the evaluation EMA decay (the run's ``ema_decay``; iCT: 0.99993 on CIFAR-10).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.diffusion.param import CM_SIGMA_MIN, bcast
from fewstep.diffusion.schedules import NoiseSchedule, karras_sigmas
from fewstep.distill.base import KIND, STUDENT, Options, Recipe, RunContext, check_loss, distance, opt, register
from fewstep.errors import FewstepError
from fewstep.models.backbones import default_preset, preset_backbone
from fewstep.models.denoiser import Denoiser
from fewstep.models.folder import ModelConfig, SamplingDefaults, build_denoiser, save_model
from fewstep.training.method import Batch, Networks, Phase, StepContext

S0, S1 = 10, 1280  # curriculum: initial and final number of grid intervals
P_MEAN, P_STD = -1.1, 2.0  # the discretized lognormal over grid levels
SIGMA_MIN, SIGMA_MAX, RHO = CM_SIGMA_MIN, 80.0, 7.0
NUM_TIMESTEPS = 1000  # points of the sampling table (timestep -> sigma)
SIGMA_MID = 0.821  # iCT's intermediate noise level for 2-step sampling (CIFAR-10)
UNET_DROPOUT = 0.2  # dropout of the UNet presets' ResNet blocks (the paper: 0.3 on CIFAR-10, 0.2 on ImageNet 64)


def discretization_steps(k: int, total: int, s0: int = S0, s1: int = S1) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1)) (at least 1)."""
    k_prime = max(1, math.floor(total / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // k_prime), s1) + 1


def ct_sigmas(n: int) -> torch.Tensor:
    """The N(k) training levels sigma_1 < ... < sigma_N: Karras's grid (rho = 7) from 0.002 to 80, float64."""
    return karras_sigmas(n, SIGMA_MIN, SIGMA_MAX, RHO).flip(0)


def level_probabilities(sigmas: torch.Tensor, p_mean: float = P_MEAN, p_std: float = P_STD) -> torch.Tensor:
    """p(n) for n = 1..N-1 (the pair sigma_n, sigma_{n+1}) of the discretized lognormal (iCT, eq. 10)."""
    cdf = torch.special.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def ct_timesteps(schedule: NoiseSchedule, steps: int) -> list[float]:
    """Sampling timesteps of a k-step student on the Karras table (see the module docstring)."""
    if steps < 1:
        raise FewstepError(f"--steps {steps}: give at least 1")
    T = schedule.num_train_timesteps
    if steps == 1:
        return [float(T - 1)]
    if steps == 2:
        return [float(T - 1), float(schedule.timestep(torch.tensor([SIGMA_MID], dtype=torch.float64))[0])]
    return [(T - 1) * i / steps for i in range(steps, 0, -1)]


def _has_dropout(net: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in net.modules())


class ConsistencyTraining:
    """iCT as a method of the shared loop: one phase, the curriculum's k set by ``before_step``."""

    name = "ct"

    def __init__(self, config: ModelConfig, total_iters: int, loss: str = "huber"):
        self.config = config
        self.model: Denoiser = build_denoiser(config)
        self.model.net.requires_grad_(True).train()
        self.total = total_iters
        self.dist: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = distance(loss)
        self.sync_dropout = _has_dropout(self.model.net)
        self.k = 0
        self._grid: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (N, sigmas, probabilities)

    def networks(self) -> Networks:
        return Networks(trained={"net": self.model})

    def ema_target(self) -> nn.Module:
        return self.model.net

    def before_step(self, step: int, gen: torch.Generator | None = None) -> None:
        self.k = step

    def grid(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(N, sigmas, p) at the current iteration k (recomputed when N changes)."""
        n = discretization_steps(self.k, self.total)
        if self._grid is None or self._grid[0] != n:
            sigmas = ct_sigmas(n)
            self._grid = (n, sigmas, level_probabilities(sigmas))
        return self._grid

    def _f(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None, seed: int | None) -> torch.Tensor:
        if seed is None:
            return self.model(x, sigma, y).x0
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)  # dropout masks: a function of the loop's generator, the same in both passes
            return self.model(x, sigma, y).x0

    def phases(self) -> list[Phase]:
        def loss(batch: Batch, ctx: StepContext) -> torch.Tensor:
            x0, y = batch
            gen = ctx.gen
            _, sigmas, p = self.grid()
            dev = x0.device
            n = torch.multinomial(p.to(dev), x0.shape[0], replacement=True, generator=gen)
            s_lo, s_hi = sigmas.to(dev)[n], sigmas.to(dev)[n + 1]
            eps = torch.randn(x0.shape, generator=gen, device=dev, dtype=x0.dtype)
            seed = (int(torch.randint(0, 2**62, (1,), generator=gen, device=dev))
                    if self.sync_dropout else None)
            with torch.no_grad():
                target = self._f(x0 + bcast(s_lo, x0) * eps, s_lo, y, seed)
            online = self._f(x0 + bcast(s_hi, x0) * eps, s_hi, y, seed)
            weight = (1 / (s_hi - s_lo)).to(online.dtype)
            return weight * self.dist(online.float(), target.float())

        return [Phase("consistency", self.model.net, loss)]

    def save_model(self, out: Path, net: nn.Module, training: dict[str, Any]) -> None:
        self.config.training = {
            "method": "ct", "s0": S0, "s1": S1, "p_mean": P_MEAN, "p_std": P_STD, "curriculum_iters": self.total,
            "final_levels": discretization_steps(max(0, training.get("steps", self.total) - 1), self.total),
            **training,
        }
        save_model(out, self.config, net)


def ct_config(sample_shape: tuple[int, ...], num_classes: int, steps: int, preset: str | None = None,
              data: str | None = None, dropout: float = UNET_DROPOUT) -> ModelConfig:
    """The student's model config: a fresh ``preset`` network predicting ``cm`` on the 1000-point Karras table."""
    shape = tuple(sample_shape)
    kind, bcfg = preset_backbone(preset or default_preset(shape), shape, num_classes)
    if kind == "unet2d" and dropout:
        bcfg["dropout"] = dropout
    schedule = {"type": "karras", "num_train_timesteps": NUM_TIMESTEPS, "sigma_min": SIGMA_MIN,
                "sigma_max": SIGMA_MAX}
    ts = ct_timesteps(NoiseSchedule.karras(NUM_TIMESTEPS, SIGMA_MIN, SIGMA_MAX), steps)
    return ModelConfig(backbone=kind, backbone_config=bcfg, prediction="cm", schedule=schedule,
                       sample_shape=list(shape), num_classes=num_classes, null_class=None, data=data, role="student",
                       sampling=SamplingDefaults(sampler="consistency", steps=steps, timesteps=ts),
                       training={"method": "ct"})


@dataclass
class CTOptions(Options):
    steps: int = opt(1, "sampling steps the student records (1: sigma 80; 2: iCT's 80 then 0.821)", ge=1)
    preset: str | None = opt(None, "network preset (default: by data shape)")
    loss: str = opt("huber", "huber (pseudo-Huber, the paper's) or l2")

    def validate(self) -> None:
        if self.steps < 1:
            raise FewstepError(f"steps {self.steps}: give at least 1")
        check_loss(self.loss)

    @classmethod
    def for_tests(cls) -> CTOptions:
        return cls(steps=1, preset="mlp")


def _num_classes(ctx: RunContext) -> int:
    y = ctx.data[1]
    if y is None:
        return 0
    from fewstep.data.datasets import dataset_info

    try:
        return dataset_info(ctx.data_name)[1] or int(y.max()) + 1
    except FewstepError:  # data not from the registry: the labels say
        return int(y.max()) + 1


def consistency_training(ctx: RunContext) -> Path:
    """One stage, ``ctx.out / STUDENT``: iCT for ``iters`` iterations (the curriculum's K)."""
    o: CTOptions = ctx.options
    config = ct_config(tuple(ctx.data[0].shape[1:]), _num_classes(ctx), o.steps, o.preset, ctx.data_name)
    with torch.random.fork_rng(devices=[]):  # the initialization follows the run's seed, global RNG untouched
        torch.manual_seed(getattr(ctx.train_config, "seed", 0))
        method = ConsistencyTraining(config, ctx.iters, o.loss)
    return ctx.stage(method, STUDENT)


register(Recipe(
    "ct", KIND, consistency_training,
    "Song & Dhariwal 2023 (iCT): consistency training from data, no teacher (preset, loss huber|l2).",
    CTOptions, needs_teacher=False))
