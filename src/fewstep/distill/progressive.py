"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models", Algorithm 2), on the shared training loop.

A round trains a student for N deterministic DDIM steps to match two teacher DDIM steps with one; the student
then becomes the teacher and N halves.  Everything runs in the continuous-time view of a discrete teacher:
the student grid is t_i = (T-1) i / N (i = N..1, then clean data), the teacher's midpoints (T-1)(i - 1/2) / N
are fractional timesteps, and the last step lands on sigma = 0.

- Target (Algorithm 2, VE form): two teacher DDIM steps x -> x' -> x'' give the x0 that one DDIM step from
  sigma_t would need to land on x'': x~ = (x'' - (s''/s_t) x) / (1 - s''/s_t)  (x~ = x'' when s'' = 0).
- Loss: truncated-SNR weighting max(SNR, 1) ||x~ - x0_student||^2 with SNR = 1 / sigma^2 (VE).
- Parameterization: the student predicts v (eps is useless at SNR ~ 0, where a 1-step student starts).  An
  eps teacher is first re-parameterized: round 0 trains the v student to reproduce the teacher's x0 at
  training noise levels (the "equivalent documented step" of issue 4).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.diffusion.param import Prediction, bcast
from fewstep.models.denoiser import Denoiser
from fewstep.models.folder import ModelConfig, SamplingDefaults, save_model
from fewstep.samplers.guidance import guide
from fewstep.training.method import Batch, Phase


def student_timesteps(num_train_timesteps: int, n: int) -> list[float]:
    """The N evaluation timesteps of an N-step student: (T-1) i / N for i = N..1 (then clean data)."""
    return [(num_train_timesteps - 1) * i / n for i in range(n, 0, -1)]


def _ddim(p: Prediction, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step in VE form: x_next = x0 + s_next * (x - x0) / s."""
    return p.x0 + bcast(s_next / s, x) * (x - p.x0)


class _Base:
    """Shared plumbing: a frozen teacher denoiser, a trainable v-predicting student copied from it."""

    def __init__(self, teacher: Denoiser, config: ModelConfig, guidance: float = 1.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_fn = guide(self.teacher, guidance if config.null_class is not None else None,
                                config.null_class)
        self.student = Denoiser(copy.deepcopy(teacher.net).requires_grad_(True), teacher.schedule, "v",
                                teacher.num_classes, teacher.null_class)
        self.base_config = config
        self.guidance = guidance

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student.net}

    def ema_target(self) -> nn.Module:
        return self.student.net

    def after_step(self, step: int) -> None:
        pass

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.teacher.schedule.sigma(t)


class Reparameterize(_Base):
    """Round 0: a v-predicting copy of the teacher learns to give the teacher's x0 (weighted max(SNR, 1))."""

    name = "progressive-reparam"

    def phases(self) -> list[Phase]:
        T = self.teacher.schedule.num_train_timesteps

        def loss(batch: Batch, gen: torch.Generator) -> torch.Tensor:
            x0, y = batch
            t = torch.rand(x0.shape[0], generator=gen, device=x0.device, dtype=torch.float64) * (T - 1)
            sigma = self._sigma(t).to(x0.device)
            eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
            x = x0 + bcast(sigma, x0) * eps
            with torch.no_grad():
                target = self.teacher_fn(x, sigma, y).x0
            w = torch.clamp(1 / sigma**2, min=1.0).to(x0.dtype)
            return w * (self.student(x, sigma, y).x0 - target).pow(2).flatten(1).mean(1)

        return [Phase("reparam", self.student.net, loss)]

    def save_model(self, out: Path, net: nn.Module, training: dict[str, Any]) -> None:
        cfg = copy.deepcopy(self.base_config)
        cfg.prediction, cfg.role = "v", "teacher"
        cfg.training = {**cfg.training, "reparameterized": "eps->v", **training}
        if self.guidance != 1.0 and cfg.null_class is not None:
            cfg.null_class = None  # trained on guided outputs: no unconditional mode left
            cfg.training["distilled_guidance"] = self.guidance
        save_model(out, cfg, net)


class ProgressiveRound(_Base):
    """One round: an N-step student matches two DDIM steps of the (2N-step) teacher."""

    def __init__(self, teacher: Denoiser, config: ModelConfig, n: int, guidance: float = 1.0):
        super().__init__(teacher, config, guidance)
        self.n = n
        self.name = f"progressive-{n}"

    def phases(self) -> list[Phase]:
        T = self.teacher.schedule.num_train_timesteps
        dt = (T - 1) / self.n

        def loss(batch: Batch, gen: torch.Generator) -> torch.Tensor:
            x0, y = batch
            i = torch.randint(1, self.n + 1, (x0.shape[0],), generator=gen, device=x0.device).to(torch.float64)
            s = self._sigma(i * dt).to(x0.device)
            s_mid = self._sigma((i - 0.5) * dt).to(x0.device)
            s_next = torch.where(i > 1, self._sigma(((i - 1) * dt).clamp(min=0)).to(x0.device), torch.zeros_like(s))
            eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
            x = x0 + bcast(s, x0) * eps
            with torch.no_grad():
                x_mid = _ddim(self.teacher_fn(x, s, y), x, s, s_mid)
                x_next = _ddim(self.teacher_fn(x_mid, s_mid, y), x_mid, s_mid, s_next)
                ratio = bcast(s_next / s, x0)
                target = (x_next - ratio * x) / (1 - ratio)  # Algorithm 2: the x0 one DDIM step would need
            w = torch.clamp(1 / s**2, min=1.0).to(x0.dtype)
            return w * (self.student(x, s, y).x0 - target).pow(2).flatten(1).mean(1)

        return [Phase("distill", self.student.net, loss)]

    def save_model(self, out: Path, net: nn.Module, training: dict[str, Any]) -> None:
        cfg = copy.deepcopy(self.base_config)
        T = self.teacher.schedule.num_train_timesteps
        cfg.prediction, cfg.role = "v", "student"
        guided = self.guidance != 1.0 and cfg.null_class is not None
        # the guided teacher was distilled into a plain conditional student: sampled without guidance
        cfg.sampling = SamplingDefaults(sampler="ddim", steps=self.n, timesteps=student_timesteps(T, self.n),
                                        guidance=1.0)
        cfg.training = {**cfg.training, "method": "progressive", "student_steps": self.n,
                        "distilled_guidance": self.guidance if guided else None, **training}
        if guided:
            cfg.null_class = None  # the student bakes the guidance in; it has no unconditional mode
        save_model(out, cfg, net)


def progressive_distill(teacher_folder: Path, data: tuple[torch.Tensor, torch.Tensor | None], out: Path,
                        start_steps: int = 8, end_steps: int = 1, iters: int = 500, reparam_iters: int = 300,
                        guidance: float = 1.0, train: Callable[..., Any] | None = None,
                        train_config: Any = None) -> Path:
    """Run round 0 (eps -> v) if needed, then rounds N = start_steps, start_steps/2, ..., end_steps.
    Each round is a run of the shared loop in ``out/round_<N>``; the final student is ``out/round_<end>``."""
    import dataclasses

    from fewstep.models.folder import load_model
    from fewstep.training.loop import TrainConfig
    from fewstep.training.loop import train as run

    train = train or run
    base = train_config or TrainConfig(progress=False)
    out = Path(out)
    folder = Path(teacher_folder)
    model = load_model(folder)
    if model.config.prediction != "v":
        method = Reparameterize(model.denoiser, model.config, guidance)
        train(method, data, dataclasses.replace(base, steps=reparam_iters), out / "round_reparam")
        folder, guidance = out / "round_reparam", 1.0  # the guidance, if any, is now baked in
        model = load_model(folder)
    n = start_steps
    while n >= end_steps:
        method = ProgressiveRound(model.denoiser, model.config, n, guidance)
        train(method, data, dataclasses.replace(base, steps=iters), out / f"round_{n}")
        folder = out / f"round_{n}"
        model = load_model(folder)
        guidance = 1.0
        n //= 2
    return folder
