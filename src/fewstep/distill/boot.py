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
  sg[y^_t + d (x-hat(y^_t + sigma_t eps, t) - y^_t)] with y^_t = g(eps, t_n), regressed by g(eps, t_{n-1}).  At
  n = N the signal is known exactly, y_T = x_T - sigma_T eps with x_T = eps sqrt(1 + sigma_T^2) (the samplers'
  start): that is the boundary condition the bootstrap grows from.
- The loss weight (``weighting``).  The paper's is 1/d^2 (``d2``, a derivative-matching scale).  Ours, the default
  (``z-d2``), multiplies it by a_s^2 = 1 / (1 + sigma_s^2): the error measured in the VP state z_s = a_s (y_s + sigma_s
  eps) the teacher reads, not in the signal.  Why: at high noise an eps teacher's DDIM signal holds
  sigma_s (eps-hat - eps), which is large (mean square 4-5 on the digits teacher at the top of a 32-step grid,
  against 0.66 at t = 0) but moves z_s by a_s times that, almost nothing; under 1/d^2 alone those steps' errors were
  about 1,000x the last step's and took the whole gradient.
- The student is a copy of the teacher's network (weights and all) with eps in the input slot and the teacher's
  VP timestep as its time input; its raw output is the signal (ours: the paper initializes from the teacher but
  does not say how the output is read; a skip connection to eps would be wrong at t = 0, where the input is still
  pure noise).  Its output layer starts at zero (``zero_out``, ours): the copied layer outputs the teacher's eps
  estimate, about the input noise itself, which the bootstrap otherwise spends most of a short run unlearning (the
  samples kept a speckle of the input noise).
- Measured on the diffusers DDPMPipeline digits teacher (1,000 iterations, FD at n = 1,000 against the train split;
  the teacher's DDIM-50 scores 0.585): the paper's weighting and initialization 11.7; ``z-d2`` 6.4;
  ``zero_out`` 2.9; both 1.19, and 0.92 at 3,000 iterations (the default: 4,000 gave 0.92 too;
  ``benchmarks/README.md`` has the rest).
- The teacher's x-hat is classifier-free guided at ``--guidance`` (needs a null class); labels are drawn uniformly
  from its classes.  No data is read: the loop batches zeros of the teacher's sample shape (their shape only).
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


def zero_output_layer(net: nn.Module) -> None:
    """Zero the weights and bias of ``net``'s output layer (its last convolution or linear layer)."""
    last = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()


class Boot:
    """The BOOT stage: the student network g(eps, t) (trained, exported) and the frozen teacher."""

    name = "boot"

    def __init__(self, teacher: Denoiser, config: ModelConfig, grid: int = 32, guidance: float = 1.0,
                 weighting: str = "z-d2", zero_out: bool = True):
        self.teacher = teacher.eval().requires_grad_(False)
        self.guidance = guidance
        self.real = guide(self.teacher, guidance if config.null_class is not None else None, config.null_class)
        self.student = copy.deepcopy(teacher.net).requires_grad_(True)
        if zero_out:
            zero_output_layer(self.student)
            with torch.no_grad():  # the last convolution or linear layer must be the output: check it once
                dev = next(self.student.parameters()).device
                probe = torch.randn(1, *config.sample_shape, generator=torch.Generator().manual_seed(0)).to(dev)
                labels = torch.zeros(1, dtype=torch.long, device=dev) if config.num_classes else None
                if self.student(probe, torch.full((1,), 500.0, device=dev), labels).abs().max() != 0:
                    raise FewstepError("zero_out: this network's last convolution or linear layer is not its output "
                                       "layer: pass --set zero_out=false")
        self.grid = grid
        self.weighting = weighting
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
            err = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
            w = torch.ones_like(err)
            if self.weighting in ("d2", "z-d2"):
                w = w / d.float().pow(2)
            if self.weighting in ("z", "z-d2"):
                w = w / (1 + sig_s.to(err).pow(2))
            return err * w

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


WEIGHTINGS = ("d2", "z", "z-d2", "none")


@dataclass
class BootOptions(Options):
    steps: int = opt(1, "sampling steps: a BOOT student samples in one step (g(eps, 0))", ge=1, le=1)
    grid_steps: int = opt(32, "N of the teacher's DDIM grid the bootstrap walks (t_n = (T-1) n / N)", ge=1,
                          le=100000)
    guidance: float = opt(1.0, "classifier-free guidance of the teacher (needs a null class)", ge=0)
    zero_out: bool = opt(True, "start the student's output layer at zero (not the teacher's eps-shaped output)")
    weighting: str = opt("z-d2", "loss weight per grid step: z-d2 (1/d^2 times a_s^2: the error in the VP state; "
                                 "ours), d2 (1/d^2, the paper's), z (a_s^2) or none")

    hints = {"teacher_steps": "boot's grid is grid_steps"}

    def validate(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise FewstepError(f"weighting {self.weighting!r}: use one of {', '.join(WEIGHTINGS)}")

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
    return ctx.stage(Boot(model.denoiser, model.config, o.grid_steps, o.guidance, o.weighting, o.zero_out), STUDENT)


register(Recipe(
    "boot", KIND, boot_stages,
    "Gu et al. 2023: data-free; a student predicts the teacher's DDIM signal path from the noise by bootstrapping; "
    "1 step.", BootOptions, needs_data=False,
    # measured on the diffusers digits teacher (module docstring): the bootstrap needs more steps than the loop's 1,000
    loop_defaults=(("iters", 3000),)))
