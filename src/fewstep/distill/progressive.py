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
- Guidance: ``--guidance W`` distils the classifier-free-guided teacher at one scale (baked into round 0 or the
  first round).  With a guidance range, every stage draws w ~ U[lo, hi] per example and the student takes w as
  an input: that is guided distillation (:mod:`fewstep.distill.guided`), which reuses these stages.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.diffusion.param import Prediction, bcast
from fewstep.distill.base import KIND, STUDENT, Options, Recipe, RunContext, StudentStage, opt, register
from fewstep.errors import FewstepError
from fewstep.models.backbones import GuidanceEmbedded
from fewstep.models.denoiser import Cond, Denoiser
from fewstep.models.folder import ModelConfig, SamplingDefaults, load_model, save_model
from fewstep.samplers.guidance import guide
from fewstep.training.method import Batch, Phase, StepContext


def student_timesteps(num_train_timesteps: int, n: int) -> list[float]:
    """The N evaluation timesteps of an N-step student: (T-1) i / N for i = N..1 (then clean data)."""
    return [(num_train_timesteps - 1) * i / n for i in range(n, 0, -1)]


def _ddim(p: Prediction, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step in VE form: x_next = x0 + s_next * (x - x0) / s."""
    return p.x0 + bcast(s_next / s, x) * (x - p.x0)


def guided_prediction(den: Denoiser, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor,
                      w: torch.Tensor) -> Prediction:
    """Classifier-free guidance with a scale per sample: x0_u + w (x0_c - x0_u), one doubled batch."""
    null = torch.full_like(labels, den.null_class)
    p = den(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
    (x0_c, x0_u), (eps_c, eps_u) = p.x0.chunk(2), p.eps.chunk(2)
    wb = bcast(w, x)
    return Prediction(x0=x0_u + wb * (x0_c - x0_u), eps=eps_u + wb * (eps_c - eps_u))


class _Base(StudentStage):
    """Shared plumbing: a frozen teacher denoiser and a trainable v-predicting student copied from it.

    ``guidance``: one scale baked into the targets.  ``w_range``: a scale drawn per example from [lo, hi] and fed
    to the student (and to the teacher when it already takes w); the student gets a guidance embedding."""

    def __init__(self, teacher: Denoiser, config: ModelConfig, guidance: float = 1.0,
                 w_range: tuple[float, float] | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_fn = guide(self.teacher, guidance if config.null_class is not None else None,
                                config.null_class)
        self.w_range = tuple(w_range) if w_range else None
        if self.w_range and not teacher.takes_guidance and teacher.null_class is None:
            raise ValueError("a guidance range needs a class-conditional teacher with a null class")
        net = copy.deepcopy(teacher.net)
        if self.w_range and not teacher.takes_guidance:
            net = GuidanceEmbedded.wrap(net)
        self.student = Denoiser(net.requires_grad_(True), teacher.schedule, "v", teacher.num_classes,
                                None if self.w_range else teacher.null_class)
        self.base_config = config
        self.guidance = guidance

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.teacher.schedule.sigma(t)

    @staticmethod
    def _noised(x0: torch.Tensor, sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The VE state x0 + sigma eps for fresh eps."""
        eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        return x0 + bcast(sigma, x0) * eps

    def _conds(self, y: torch.Tensor | None, n: int, gen: torch.Generator, device) -> tuple[Any, Any]:
        """(teacher's cond, student's cond) for a batch: labels, plus w per example under a guidance range."""
        if not self.w_range:
            return y, y
        lo, hi = self.w_range
        w = lo + (hi - lo) * torch.rand(n, generator=gen, device=device)
        return (Cond(y, w) if self.teacher.takes_guidance else (y, w)), Cond(y, w)

    def _teach(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> Prediction:
        if isinstance(cond, tuple):  # a CFG teacher at a per-example scale
            return guided_prediction(self.teacher, x, sigma, *cond)
        return self.teacher_fn(x, sigma, cond)

    def _config(self, role: str) -> ModelConfig:
        cfg = copy.deepcopy(self.base_config)
        cfg.prediction, cfg.role = "v", role
        if cfg.schedule.get("type") == "vp":  # trained on unclipped DDIM steps: sample it the same way
            cfg.schedule = {**cfg.schedule, "clip_sample": False, "thresholding": False}
        if self.w_range:
            cfg.backbone, cfg.backbone_config = self.student.net.kind, self.student.net.config
            cfg.guidance_range, cfg.null_class = list(self.w_range), None
            lo, hi = self.w_range
            cfg.sampling.guidance = cfg.sampling.guidance if lo <= cfg.sampling.guidance <= hi else (lo + hi) / 2
        elif cfg.null_class is not None:
            # trained on the teacher's (guided or plain) conditional outputs only: the unconditional branch was
            # never trained, so the student offers no guidance (sample refuses --guidance, saying why)
            cfg.null_class = None
            cfg.training["distilled_guidance"] = self.guidance
            cfg.sampling.guidance = 1.0
        return cfg


class Reparameterize(_Base):
    """Round 0: a v-predicting copy of the teacher learns to give the teacher's x0 (weighted max(SNR, 1))."""

    name = "progressive-reparam"

    def phases(self) -> list[Phase]:
        T = self.teacher.schedule.num_train_timesteps

        def loss(batch: Batch, ctx: StepContext) -> torch.Tensor:
            x0, y = batch
            gen = ctx.gen
            t = torch.rand(x0.shape[0], generator=gen, device=x0.device, dtype=torch.float64) * (T - 1)
            sigma = self._sigma(t).to(x0.device)
            x = self._noised(x0, sigma, gen)
            c_teacher, c_student = self._conds(y, x0.shape[0], gen, x0.device)
            with torch.no_grad():
                target = self._teach(x, sigma, c_teacher).x0
            w = torch.clamp(1 / sigma**2, min=1.0).to(x0.dtype)
            return w * (self.student(x, sigma, c_student).x0 - target).pow(2).flatten(1).mean(1)

        return [Phase("reparam", self.student.net, loss)]

    def save_model(self, out: Path, net: nn.Module, training: dict[str, Any]) -> None:
        cfg = self._config("teacher")
        cfg.training = {**cfg.training, "reparameterized": f"{self.base_config.prediction}->v", **training}
        save_model(out, cfg, net)


class ProgressiveRound(_Base):
    """One round: an N-step student matches two DDIM steps of the (2N-step) teacher."""

    def __init__(self, teacher: Denoiser, config: ModelConfig, n: int, guidance: float = 1.0,
                 w_range: tuple[float, float] | None = None):
        super().__init__(teacher, config, guidance, w_range)
        self.n = n
        self.name = f"progressive-{n}"

    def phases(self) -> list[Phase]:
        T = self.teacher.schedule.num_train_timesteps
        dt = (T - 1) / self.n

        def loss(batch: Batch, ctx: StepContext) -> torch.Tensor:
            x0, y = batch
            gen = ctx.gen
            i = torch.randint(1, self.n + 1, (x0.shape[0],), generator=gen, device=x0.device).to(torch.float64)
            s = self._sigma(i * dt).to(x0.device)
            s_mid = self._sigma((i - 0.5) * dt).to(x0.device)
            s_next = torch.where(i > 1, self._sigma(((i - 1) * dt).clamp(min=0)).to(x0.device), torch.zeros_like(s))
            x = self._noised(x0, s, gen)
            c_teacher, c_student = self._conds(y, x0.shape[0], gen, x0.device)
            with torch.no_grad():
                x_mid = _ddim(self._teach(x, s, c_teacher), x, s, s_mid)
                x_next = _ddim(self._teach(x_mid, s_mid, c_teacher), x_mid, s_mid, s_next)
                ratio = bcast(s_next / s, x0)
                target = (x_next - ratio * x) / (1 - ratio)  # Algorithm 2: the x0 one DDIM step would need
            w = torch.clamp(1 / s**2, min=1.0).to(x0.dtype)
            return w * (self.student(x, s, c_student).x0 - target).pow(2).flatten(1).mean(1)

        return [Phase("distill", self.student.net, loss)]

    def save_model(self, out: Path, net: nn.Module, training: dict[str, Any]) -> None:
        cfg = self._config("student")
        T = self.teacher.schedule.num_train_timesteps
        cfg.sampling = SamplingDefaults(sampler="ddim", steps=self.n, timesteps=student_timesteps(T, self.n),
                                        guidance=cfg.sampling.guidance)
        cfg.training = {**cfg.training, "student_steps": self.n, **training}
        save_model(out, cfg, net)


def _power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def check_rounds(steps: int, start_steps: int) -> None:
    if not (_power_of_two(steps) and _power_of_two(start_steps) and start_steps >= steps):
        raise FewstepError(f"steps {steps} and start_steps {start_steps}: both must be powers of two with "
                           "start_steps >= steps")


def check_iters(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise FewstepError(f"{name} {value}: give at least 1")


@dataclass
class ProgressiveOptions(Options):
    steps: int = opt(1, "student sampling steps (NFE per sample), a power of two", ge=1, le=1024)
    start_steps: int = opt(32, "student steps of the first round (the teacher takes twice as many DDIM steps), a "
                               "power of two >= steps", ge=1, le=1024)
    guidance: float = opt(1.0, "distil the teacher guided at this scale (1: none; needs a class-conditional "
                               "teacher with a null class)", ge=0)
    reparam_iters: int | None = opt(None, "steps of the eps -> v re-parameterization stage (default: iters)", ge=1)

    hints = {"guidance_range": "progressive distils one guidance scale; for a range use --method guided"}

    def validate(self) -> None:
        check_rounds(self.steps, self.start_steps)
        check_iters("reparam_iters", self.reparam_iters)

    @classmethod
    def for_tests(cls) -> ProgressiveOptions:
        return cls(steps=1, start_steps=2)


def progressive_stages(ctx: RunContext, steps: int, start_steps: int, guidance: float = 1.0,
                       w_range: tuple[float, float] | None = None, reparam_iters: int | None = None) -> Path:
    """Round 0 (to v, and to a guidance input under ``w_range``) when needed, then rounds N = start_steps, ...,
    steps; the last round is ``ctx.out / STUDENT``, earlier ones ``round_<N>``."""
    check_rounds(steps, start_steps)
    model = ctx.teacher
    assert model is not None
    if model.denoiser.takes_guidance:
        raise FewstepError("this teacher takes the guidance scale as an input (a guided student): distil the "
                           "original teacher instead")
    if guidance != 1.0 and model.config.null_class is None:
        raise FewstepError("--guidance needs a class-conditional teacher with a null class: drop --guidance")
    if w_range and (model.config.null_class is None or not model.config.num_classes):
        raise FewstepError("guided distillation needs a class-conditional teacher trained with a null class")
    if model.config.prediction != "v" or w_range:
        stage = Reparameterize(model.denoiser, model.config, guidance, w_range)
        # the guidance is now baked in (or an input)
        model, guidance = load_model(ctx.stage(stage, "round_reparam", reparam_iters, measure=False)), 1.0
    n = start_steps
    while True:
        name = STUDENT if n == steps else f"round_{n}"
        folder = ctx.stage(ProgressiveRound(model.denoiser, model.config, n, guidance, w_range), name)
        if n == steps:
            return folder
        model, guidance, n = load_model(folder), 1.0, n // 2


def _progressive(ctx: RunContext) -> Path:
    o: ProgressiveOptions = ctx.options
    return progressive_stages(ctx, o.steps, o.start_steps, o.guidance, reparam_iters=o.reparam_iters)


register(Recipe(
    "progressive", KIND, _progressive,
    "Salimans & Ho 2022: rounds halve the DDIM steps (start_steps -> steps); v-prediction student.",
    ProgressiveOptions))
