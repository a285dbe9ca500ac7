"""BOOT: data-free distillation by bootstrapping (Gu et al. 2023, "BOOT: Data-free Distillation of Denoising
Diffusion Models with Bootstrapping").  No official code was found; this follows the paper's equations (see
``../shared/METHODS-2.md``) and says below where a detail is ours.

The student g(eps, t) reads only the starting noise eps and a time t, and predicts the *signal* of the teacher's
deterministic DDIM path from that noise: y_t = (z_t - s_t eps) / a_t, i.e. y_t = x_t - sigma_t eps in fewstep's VE
form (x_t = z_t / a_t).  y_0 is the sample, so one evaluation g(eps, 0) generates.

- Signal-ODE, discretized as DDIM: one exact DDIM step of the teacher from t to s < t moves the signal by
  y_s = y_t + d (x-hat(x_t, t) - y_t), d = 1 - sigma_s / sigma_t, with x_t = y_t + sigma_t eps.  A teacher whose
  scheduler clips x0 (``clip_sample``, thresholding: diffusers' DDPM pipelines) is followed the way its DDIM runs:
  x0 clipped, the raw eps kept, so y_s = clip(x-hat) + (sigma_s / sigma_t) (y_t - x-hat) (ours: the paper's
  teachers do not clip; without it an eps teacher's wild x-hat at high noise enters every target).
- Bootstrapping: on the teacher's DDIM grid t_n = (T-1) n / N (N = ``grid_steps``), n ~ U{1..N}: the target is one
  teacher step applied to the student's own prediction at the neighbouring, noisier time, under stop-gradient,
  sg[y^_t + d (x-hat(y^_t + sigma_t eps, t) - y^_t)] with y^_t = g(eps, t_n); the loss is
  ||g(eps, t_{n-1}) - target||^2 / d^2 (the 1/d^2 of the paper: a derivative-matching scale).  At n = N the signal
  is known exactly, y_T = x_T - sigma_T eps with x_T = eps sqrt(1 + sigma_T^2) (the samplers' start): that is the
  boundary condition the bootstrap grows from.
- The teacher's x-hat is classifier-free guided at ``--guidance`` (needs a null class); labels are drawn uniformly
  from its classes.  No data is read: the loop batches zeros of the teacher's sample shape (their shape only).
- The student is a copy of the teacher's network (weights and all) with eps in the input slot and the teacher's
  VP timestep as its time input; its raw output is the signal (ours: the paper initializes from the teacher but
  does not say how the output is read; a skip connection to eps would be wrong at t = 0, where the input is still
  pure noise).
- Sampling: one step, g(eps, 0) from the first timestep (prediction ``boot``); other step counts are refused.
- VP teachers only (eps, v, x0, fewstep's and diffusers folders): the student's time input is a VP timestep; EDM
  and flow teachers are refused with that reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.diffusion.param import bcast
from fewstep.distill.base import KIND, STUDENT, Options, Recipe, RunContext, eval_mode, opt, register
from fewstep.errors import FewstepError
from fewstep.models.denoiser import Denoiser
from fewstep.models.folder import LoadedModel, ModelConfig, SamplingDefaults, save_model
from fewstep.samplers.guidance import guide
from fewstep.training.method import Batch, Networks, Phase, StepContext


class Boot:
    """The BOOT stage: the student network g(eps, t) (trained, exported) and the frozen teacher."""

    name = "boot"

    def __init__(self, teacher: Denoiser, config: ModelConfig, grid: int = 32, guidance: float = 1.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.guidance = guidance
        self.real = guide(self.teacher, guidance if config.null_class is not None else None, config.null_class)
        self.student = copy.deepcopy(teacher.net).requires_grad_(True)
        self.grid = grid
        self.base_config = config
        self.clip = config.x0_clip()  # the teacher's DDIM clips x0 (clip_sample / thresholding): its path does too
        self.conditional = bool(config.num_classes)

    def networks(self) -> Networks:
        return Networks(trained={"student": self.student}, frozen={"teacher": self.teacher})

    def ema_target(self) -> nn.Module:
        return self.student

    def signal(self, eps: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """g(eps, t): the student's signal at (fractional) timesteps ``t``."""
        return self.student(eps, t.to(eps.dtype), labels if self.conditional else None)

    @torch.no_grad()
    def teacher_step(self, y_t: torch.Tensor, eps: torch.Tensor, sig_t: torch.Tensor, sig_s: torch.Tensor,
                     labels: torch.Tensor | None) -> torch.Tensor:
        """The signal after one DDIM step of the (guided) teacher from sigma_t to sigma_s on the path of noise
        ``eps``: x-hat + (sigma_s / sigma_t) (y_t - x-hat), with x-hat clipped where the teacher's DDIM clips it
        (the raw eps kept, as diffusers does); without clipping this is y_t + d (x-hat - y_t)."""
        x_t = y_t + bcast(sig_t, eps).to(y_t.dtype) * eps
        x_hat = self.real(x_t, sig_t, labels).x0
        r = bcast(sig_s / sig_t, eps).to(y_t.dtype)
        return (self.clip(x_hat) if self.clip is not None else x_hat) + r * (y_t - x_hat)

    def phases(self) -> list[Phase]:
        sched = self.teacher.schedule
        T = sched.num_train_timesteps
        sigma_T = float(sched.sigma(float(T - 1)))
        start = (1 + sigma_T**2) ** 0.5

        def loss(batch: Batch, ctx: StepContext) -> torch.Tensor:
            shape_of, y = batch  # zeros of the sample shape (data-free): only shape, device and dtype are read
            gen = ctx.gen
            b, device, dtype = shape_of.shape[0], shape_of.device, shape_of.dtype
            eps = torch.randn(shape_of.shape, generator=gen, device=device, dtype=dtype)
            n = torch.randint(1, self.grid + 1, (b,), generator=gen, device=device).to(torch.float64)
            t, s = (T - 1) * n / self.grid, (T - 1) * (n - 1) / self.grid
            sig_t, sig_s = sched.sigma(t).to(device), sched.sigma(s).to(device)
            with torch.no_grad(), eval_mode(self.student):  # the bootstrap target without dropout noise
                y_known = eps * (start - sigma_T)  # the signal at T: x_T - sigma_T eps
                known = (n == self.grid).view(-1, *[1] * (eps.dim() - 1))
                y_t = torch.where(known, y_known, self.signal(eps, t.to(device), y))
                target = self.teacher_step(y_t, eps, sig_t, sig_s, y)
            d = (1 - sig_s / sig_t).to(dtype)
            pred = self.signal(eps, s.to(device), y)
            return (pred.float() - target.float()).pow(2).flatten(1).mean(1) / d.float().pow(2)

        return [Phase("bootstrap", self.student, loss)]

    def save_model(self, out: Path, net: nn.Module, training: dict[str, Any]) -> None:
        cfg = copy.deepcopy(self.base_config)
        cfg.prediction, cfg.role, cfg.null_class, cfg.boundary = "boot", "student", None, None
        cfg.schedule = {**cfg.schedule, "clip_sample": False, "thresholding": False}
        T = self.teacher.schedule.num_train_timesteps
        cfg.sampling = SamplingDefaults(sampler="consistency", steps=1, timesteps=[float(T - 1)], guidance=1.0)
        cfg.training = {**cfg.training, "distilled_guidance": self.guidance, "grid_steps": self.grid,
                        "data_free": True, "student_steps": 1, **training}
        save_model(out, cfg, net)


@dataclass
class BootOptions(Options):
    steps: int = opt(1, "sampling steps: a BOOT student samples in one step (g(eps, 0))", ge=1, le=1)
    grid_steps: int = opt(32, "N of the teacher's DDIM grid the bootstrap walks (t_n = (T-1) n / N)", ge=1,
                          le=100000)
    guidance: float = opt(1.0, "classifier-free guidance of the teacher (needs a null class)", ge=0)

    hints = {"teacher_steps": "boot's grid is grid_steps"}

    def check_teacher(self, teacher: LoadedModel) -> None:
        if teacher.config.schedule.get("type", "vp") != "vp":
            raise FewstepError(f"boot needs a VP teacher (eps, v or x0 on a DDPM schedule): this one is "
                               f"{teacher.config.schedule.get('type')} (the student's time input is a VP timestep)")
        if teacher.denoiser.takes_guidance or teacher.config.role == "student" or teacher.config.boundary:
            raise FewstepError("boot distils a diffusion teacher and this model is a distilled student: distil its "
                               "teacher instead")
        if self.guidance != 1.0 and teacher.config.null_class is None:
            raise FewstepError(f"guidance {self.guidance:g} needs a class-conditional teacher with a null class: "
                               "drop --guidance")
        T = int(teacher.config.schedule.get("num_train_timesteps", 1000))
        if self.grid_steps > T - 1:
            raise FewstepError(f"grid_steps {self.grid_steps}: the teacher has {T} timesteps, so the grid takes at "
                               f"most {T - 1} steps")

    @classmethod
    def for_tests(cls) -> BootOptions:
        return cls(grid_steps=8)


def boot_stages(ctx: RunContext) -> Path:
    o: BootOptions = ctx.options
    model = ctx.teacher
    assert model is not None
    o.check_teacher(model)
    return ctx.stage(Boot(model.denoiser, model.config, o.grid_steps, o.guidance), STUDENT)


register(Recipe(
    "boot", KIND, boot_stages,
    "Gu et al. 2023: data-free; a student predicts the teacher's DDIM signal path from the noise by bootstrapping; "
    "1 step.", BootOptions, needs_data=False))
