"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2) in the discrete-time form of
latent consistency models (Luo et al. 2023, "Latent Consistency Models"), for a discrete VP teacher.

- Grid: the skipping-step DDIM grid of the teacher, t_n = (T-1) n / N, n = 0..N (N = ``--teacher-steps``,
  skip k = (T-1)/N timesteps); t_0 = 0 is the boundary (VE sigma_min ~ 0.01 for a linear 1000-step teacher, not
  EDM's 0.002).
- Consistency function: f(z_t, t) = c_skip(t) z_t + c_out(t) x0_theta(z_t, t) with LCM's c_skip = sd^2 / ((10 t)^2
  + sd^2), c_out = 10 t / sqrt((10 t)^2 + sd^2), so f is the identity at t = 0 (the student's ``boundary="lcm"``).
- Step: n ~ U{1..N}, x_n = x0 + sigma_n eps; one deterministic DDIM step of the teacher (guided at ``--guidance``,
  or at w ~ U[lo, hi] per example with ``--guidance-range``, LCM's w-conditioned student) from t_n to t_{n-1};
  loss d(f_theta(x_n, t_n), f_theta-(x^_{n-1}, t_{n-1})), d = pseudo-Huber (c = 0.00054 sqrt(dim)) or L2, theta-
  an EMA of theta with decay ``--ema-target`` (paper: 0.95).  The loop keeps a separate evaluation EMA of theta;
  that is what the student folder exports.
- Parameterization: the student predicts v.  An eps teacher (or a guided one) is first re-parameterized to a v
  network (the progressive module's round 0, guidance baked in), because an eps network's x0 at the top of a
  1000-step linear schedule (alpha ~ 0.006) is ~150x amplified noise: exactly where a 1-step consistency model is
  evaluated.  That copy is only the student's initialization: the ODE steps are the teacher's own guided
  predictions (LCM), so the copy's fitting error never enters the targets.
- Sampling: multistep consistency sampling (``consistency`` sampler) at any number of steps, on the training grid
  as LCM's scheduler does (spacing ``grid``: k steps take every (N // k)-th grid point from t_N = T-1 down, so
  4 steps of a 50-point grid are t = 999, 759.2, 519.5, 279.7); the student records ``--steps`` as its default.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.distill.base import KIND, STUDENT, Options, Recipe, RunContext, check_loss, distance, opt, register
from fewstep.distill.guided import check_range
from fewstep.distill.progressive import Reparameterize, _Base, _ddim, check_iters
from fewstep.errors import FewstepError
from fewstep.models.denoiser import Denoiser
from fewstep.models.folder import LoadedModel, ModelConfig, SamplingDefaults, load_model, save_model
from fewstep.training.method import Batch, Networks, Phase, StepContext


class ConsistencyDistill(_Base):
    """The consistency-distillation stage: a student with the LCM boundary and its EMA target network."""

    name = "consistency"

    def __init__(self, teacher: Denoiser, config: ModelConfig, steps: int, grid: int = 50, loss: str = "huber",
                 mu: float = 0.95, guidance: float = 1.0, w_range: tuple[float, float] | None = None,
                 init: Denoiser | None = None):
        super().__init__(teacher, config, guidance, w_range)
        if init is not None:  # the student starts from this v network (the re-parameterized teacher), not the teacher
            self.student = Denoiser(copy.deepcopy(init.net).requires_grad_(True), teacher.schedule, "v",
                                    teacher.num_classes, None if self.w_range else teacher.null_class)
        self.student.boundary = "lcm"
        self.target = Denoiser(copy.deepcopy(self.student.net).requires_grad_(False), teacher.schedule, "v",
                               self.student.num_classes, self.student.null_class, "lcm")
        self.steps, self.grid, self.mu = steps, grid, mu
        self._params: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (target, student): phases()
        self.dist = distance(loss)

    def networks(self) -> Networks:
        return Networks(trained={"student": self.student}, state={"target": self.target}, frozen=self.frozen())

    @torch.no_grad()
    def after_step(self, step: int) -> None:  # theta- <- mu theta- + (1 - mu) theta
        torch._foreach_lerp_(*self._params, 1 - self.mu)

    def phases(self) -> list[Phase]:
        # the parameter lists of the target update, taken after the loop placed the networks (a move to another
        # device may replace Parameter objects; loading a checkpoint later happens in place)
        self._params = (list(self.target.net.parameters()), list(self.student.net.parameters()))
        T = self.teacher.schedule.num_train_timesteps
        dt = (T - 1) / self.grid

        def loss(batch: Batch, ctx: StepContext) -> torch.Tensor:
            x0, y = batch
            gen = ctx.gen
            n = torch.randint(1, self.grid + 1, (x0.shape[0],), generator=gen, device=x0.device).to(torch.float64)
            s = self._sigma(n * dt).to(x0.device)
            s_prev = self._sigma((n - 1) * dt).to(x0.device)
            x = self._noised(x0, s, gen)
            c_teacher, c_student = self._conds(y, x0.shape[0], gen, x0.device)
            with torch.no_grad():
                x_prev = _ddim(self._teach(x, s, c_teacher), x, s, s_prev)  # one skipping-step ODE step
                target = self.target(x_prev, s_prev, c_student).x0
            return self.dist(self.student(x, s, c_student).x0, target)

        return [Phase("consistency", self.student.net, loss)]

    def save_model(self, out: Path, net: nn.Module, training: dict[str, Any]) -> None:
        cfg = self._config("student")
        cfg.boundary = "lcm"
        cfg.sampling = SamplingDefaults(sampler="consistency", steps=self.steps, spacing="grid",
                                        guidance=cfg.sampling.guidance)
        cfg.training = {**cfg.training, "grid_steps": self.grid, "target_ema": self.mu,
                        "exported": "evaluation EMA of the student (not the target network)", **training}
        save_model(out, cfg, net)


@dataclass
class ConsistencyOptions(Options):
    steps: int = opt(1, "sampling steps the student records (multistep consistency sampling takes any number)",
                     ge=1, le=1000)
    teacher_steps: int = opt(50, "N of the teacher's skipping-step DDIM grid (skip (T-1)/N timesteps)", ge=1,
                             le=100000)
    guidance: float = opt(1.0, "distil the teacher guided at this scale (1: none)", ge=0)
    guidance_range: tuple[float, float] | None = opt(None, "LO,HI: w drawn per example and given to the student "
                                                           "as an input (LCM); instead of guidance")
    loss: str = opt("huber", "huber (pseudo-Huber) or l2")
    ema_target: float = opt(0.95, "EMA decay of the target network (Song et al. 2023: 0.95)", ge=0, lt=1)
    reparam_iters: int | None = opt(None, "steps of the eps -> v re-parameterization stage (default: iters)",
                                     ge=1)

    def validate(self) -> None:
        if self.steps < 1 or self.teacher_steps < 1:
            raise FewstepError(f"steps {self.steps}, teacher_steps {self.teacher_steps}: give at least 1")
        if self.steps > self.teacher_steps:
            raise FewstepError(f"steps {self.steps} > teacher_steps {self.teacher_steps}: the student samples on the "
                               "training grid, so it takes at most teacher_steps steps")
        check_loss(self.loss)
        check_range(self.guidance_range)
        check_iters("reparam_iters", self.reparam_iters)
        if not 0.0 <= self.ema_target <= 1.0:
            raise FewstepError(f"ema_target {self.ema_target}: give a decay in [0, 1]")
        if self.guidance != 1.0 and self.guidance_range:
            raise FewstepError("give --guidance (one scale baked in) or --guidance-range (w as an input), not both")

    def check_teacher(self, teacher: LoadedModel) -> None:
        T = int(teacher.config.schedule.get("num_train_timesteps", 1000))
        if self.teacher_steps > T - 1:
            raise FewstepError(f"teacher_steps {self.teacher_steps}: the teacher has {T} timesteps, so the "
                               f"skipping-step grid takes at most {T - 1} steps")

    @classmethod
    def for_tests(cls) -> ConsistencyOptions:
        return cls(steps=1, teacher_steps=10)


def consistency_stages(ctx: RunContext) -> Path:
    o: ConsistencyOptions = ctx.options
    model, guidance, w_range = ctx.teacher, o.guidance, o.guidance_range
    assert model is not None
    if model.denoiser.takes_guidance:
        raise FewstepError("this teacher takes the guidance scale as an input: distil the original teacher instead")
    if guidance != 1.0 and (w_range or model.config.null_class is None):
        raise FewstepError("--guidance needs a class-conditional teacher with a null class and no --guidance-range")
    if w_range and model.config.null_class is None:
        raise FewstepError("--guidance-range needs a class-conditional teacher with a null class")
    init = None
    if model.config.prediction != "v" or w_range or (guidance != 1.0 and model.config.null_class is not None):
        stage = Reparameterize(model.denoiser, model.config, guidance, w_range)
        init = load_model(ctx.stage(stage, "round_reparam", o.reparam_iters, measure=False)).denoiser
    # the ODE steps are the teacher's own (guided) predictions, as in LCM; the re-parameterized copy is only the
    # student's initialization (a v network whose 1-step output is already close to the guided teacher's x0)
    method = ConsistencyDistill(model.denoiser, model.config, o.steps, o.teacher_steps, o.loss, o.ema_target,
                                guidance, w_range, init)
    return ctx.stage(method, STUDENT)


register(Recipe(
    "consistency", KIND, consistency_stages,
    "Song et al. 2023 / LCM: skipping-step DDIM teacher, EMA target, pseudo-Huber; multistep consistency sampling.",
    ConsistencyOptions))
