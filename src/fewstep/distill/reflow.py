"""Rectified-flow reflow and one-step distillation (Liu et al. 2022, "Flow Straight and Fast: Learning to Generate
and Transfer Data with Rectified Flow", Algorithm 1; InstaFlow, Liu et al. 2023, "InstaFlow: One Step is Enough
for High-Quality Diffusion-Based Text-to-Image Generation", sec. 3-4), on the shared training loop.

Convention: diffusers' FlowMatch one, t = 1 is noise (Liu et al. write it reversed, X_0 noise):
x_t = (1 - t) x + t z, velocity dx_t/dt = z - x, sampled from t = 1 to 0 by Euler steps.  In fewstep's VE view
that is the "flow" parameterization: sigma = t / (1 - t), VE state x + sigma z = x_t / (1 - t).

- Pairs: noises z and the teacher's deterministic ODE solution x = T(z) (DPM-Solver++(2M), ``teacher_steps``
  trailing steps, the teacher's guidance baked in); saved to ``OUT/pairs.safetensors`` and reused on ``--resume``.
  The noises are seeded apart from ``fewstep sample --seed S`` (:data:`PAIRS_SEED`), so an evaluation never
  reuses a training noise.  Any teacher (VP eps/v/x0, EDM, flow) works: only its sampler is used.
- Stage ``reflow`` (the 2-rectified flow): a flow-matching network, initialized with a copy of the teacher's
  weights, regresses z - x at x_t on the straight line through each pair, t uniform on the flow grid (as a flow
  teacher trains).  Always L2: the velocity field is the conditional mean of z - x given x_t, which only the
  squared error recovers.  With ``--steps K > 1`` this stage is the student (``OUT/student``, K Euler steps).
- Stage ``student`` for ``--steps 1`` (InstaFlow's distillation): the one-step map g(z) = x0 prediction of the
  reflowed network at the sampler's first state (VE z sqrt(1 + sigma_max^2), sigma_max = the grid's top, exactly
  what one Euler step feeds it), initialized from stage ``reflow``, fit to x with ``--loss`` (l2 or pseudo-Huber;
  InstaFlow uses LPIPS on images).  InstaFlow distils the 2-rectified flow's own ODE; we fit the teacher's pairs
  that the reflow stage used: the same target map z -> T(z), without the reflowed ODE's error or a second
  sampling pass, while the reflow stage still gives the straightened initialization.

Students have no unconditional mode (any guidance is baked into the pairs) and sample with no flags.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from fewstep.diffusion.param import bcast
from fewstep.diffusion.schedules import NoiseSchedule
from fewstep.distill.base import (
    KIND,
    STUDENT,
    Options,
    Recipe,
    RunContext,
    StudentStage,
    check_loss,
    distance,
    l2,
    opt,
    register,
)
from fewstep.errors import FewstepError
from fewstep.generate import class_labels, generate, resolve_timesteps
from fewstep.io import load_tensors, save_tensors
from fewstep.models.denoiser import Denoiser
from fewstep.models.folder import LoadedModel, ModelConfig, SamplingDefaults, load_model, save_model
from fewstep.samplers import IndexedNoise
from fewstep.training.method import Batch, Phase, StepContext
from fewstep.training.processes import barrier, is_main
from fewstep.training.teacher import flow_noise

PAIRS_FILE = "pairs.safetensors"
PAIR_SAMPLER = "dpmpp-2m"
PAIRS_SEED = 0x5245_464C  # "REFL": pairs' noise seed = this + --seed, away from the seeds samples are drawn with
REFLOW_DEFAULT_STEPS = 4  # how an intermediate 2-rectified flow (not the student) samples with no flags


def draw_pairs(teacher: LoadedModel, n: int, steps: int, guidance: float, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(z, x = T(z), labels or None) for ``n`` noises: the teacher's deterministic DPM-Solver++(2M) with ``steps``
    trailing steps, guided at ``guidance``, labels cycling through the classes of a conditional teacher."""
    shape = teacher.sample_shape
    z = IndexedNoise.range((PAIRS_SEED + seed) & 0xFFFF_FFFF, 0, n).initial(shape)
    labels = class_labels(teacher, n, None)
    timesteps = resolve_timesteps(teacher, steps=steps, spacing="trailing")
    x = generate(teacher, PAIR_SAMPLER, timesteps, n, labels=labels, guidance=guidance, latents=z).x
    return z, x.float(), labels


def _load_pairs(path: Path, expect: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    pairs = load_tensors(path, "reflow pairs")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    wrong = {k: (meta.get(k), v) for k, v in expect.items() if meta.get(k) != v}
    if wrong:
        got = ", ".join(f"{k} {a} (now {b})" for k, (a, b) in wrong.items())
        raise FewstepError(f"{path} was drawn with other options ({got}): rerun with the same options, or delete it "
                           "and the stages after it")
    return pairs["z"], pairs["x"], pairs.get("labels"), float(meta.get("seconds", 0.0))


def pairs_for(ctx: RunContext, guidance: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Draw the pairs into ``OUT/pairs.safetensors`` (atomically), or reuse them on resume; records their time."""
    o, teacher = ctx.options, ctx.teacher
    assert teacher is not None
    path = ctx.out / PAIRS_FILE
    expect = {"pairs": str(o.pairs), "teacher_steps": str(o.teacher_steps), "guidance": repr(float(guidance)),
              "seed": str(ctx.train_config.seed), "sampler": PAIR_SAMPLER}
    fresh = not (ctx.resume and path.is_file())
    barrier()  # every process has decided before the main one writes
    if fresh:
        if is_main():  # one process draws and writes; every process then reads the same bits (a resume too)
            t0 = time.perf_counter()
            z, x, labels = draw_pairs(teacher, o.pairs, o.teacher_steps, guidance, ctx.train_config.seed)
            seconds = time.perf_counter() - t0
            ctx.begin()
            save_tensors(path, {"z": z, "x": x, **({"labels": labels} if labels is not None else {})},
                         metadata={**expect, "seconds": repr(seconds)})
        barrier()
    z, x, labels, seconds = _load_pairs(path, expect)
    if not torch.isfinite(x).all():
        raise FewstepError(f"the teacher's samples in {path} are not finite: check the teacher (fewstep sample)")
    ctx.extra_seconds("pairs", seconds)
    return z, x, labels


def _student_config(base: ModelConfig, T: int, role: str, steps: int, training: dict[str, Any],
                    timesteps: list[float] | None = None) -> ModelConfig:
    return ModelConfig(backbone=base.backbone, backbone_config=copy.deepcopy(base.backbone_config), prediction="flow",
                       schedule={"type": "flow", "num_train_timesteps": T}, sample_shape=list(base.sample_shape),
                       num_classes=base.num_classes, null_class=None, data=base.data, role=role,
                       sampling=SamplingDefaults(sampler="euler", steps=steps, spacing="trailing", timesteps=timesteps),
                       training=training)


class _Stage(StudentStage):
    """A trainable flow-matching copy of ``net`` (no null class: guidance lives in the pairs)."""

    name = "reflow"

    def __init__(self, base: ModelConfig, net: nn.Module, T: int, role: str, steps: int, info: dict[str, Any]):
        self.student = Denoiser(copy.deepcopy(net).requires_grad_(True), NoiseSchedule.flow(T), "flow",
                                base.num_classes, None)
        self.base, self.T, self.role, self.steps, self.info = base, T, role, steps, info

    fixed_timesteps: list[float] | None = None  # the one-step student is trained at t = T-1 only

    def save_model(self, out: Path, net: nn.Module, training: dict[str, Any]) -> None:
        save_model(out, _student_config(self.base, self.T, self.role, self.steps, {**self.info, **training},
                                        self.fixed_timesteps), net)


class Reflow(_Stage):
    """Flow matching on the coupled pairs: || u(x_t, t) - (z - x) ||^2, x_t = (1 - t) x + t z."""

    name = "reflow"

    def phases(self) -> list[Phase]:
        noise = flow_noise(self.student.schedule)  # t uniform inside the grid the sampler uses

        def loss(batch: Batch, ctx: StepContext) -> torch.Tensor:
            pair, y = batch
            gen = ctx.gen
            x, z = pair[:, 0], pair[:, 1]
            sigma = noise(x.shape[0], gen, x.device)
            xt = x + bcast(sigma, x) * z  # the VE state of (1 - t) x + t z
            return l2(self.student.raw(xt, sigma, y).float(), (z - x).float())

        return [Phase("reflow", self.student.net, loss)]


class OneStep(_Stage):
    """InstaFlow's distillation: the x0 prediction at the first Euler state, d(g(z), x)."""

    name = "reflow-distill"

    def __init__(self, base: ModelConfig, net: nn.Module, T: int, info: dict[str, Any], loss: str):
        super().__init__(base, net, T, "student", 1, info)
        self.fixed_timesteps = [float(T - 1)]
        self.dist = distance(loss)
        self.sigma = float(self.student.schedule.sigma(float(T - 1)))  # = sampling_sigmas(trailing 1 step)[0]

    def phases(self) -> list[Phase]:
        scale = (1 + torch.tensor(self.sigma, dtype=torch.float64) ** 2).sqrt().item()  # the sampler's start

        def loss(batch: Batch, ctx: StepContext) -> torch.Tensor:
            pair, y = batch
            x, z = pair[:, 0], pair[:, 1]
            sigma = torch.full((x.shape[0],), self.sigma, dtype=torch.float64, device=x.device)
            return self.dist(self.student(z * scale, sigma, y).x0.float(), x.float())

        return [Phase("distill", self.student.net, loss)]


@dataclass
class ReflowOptions(Options):
    steps: int = opt(1, "Euler steps of the student (1 adds InstaFlow's one-step distillation)", ge=1,
                     le=1000)
    pairs: int = opt(4000, "noise -> sample pairs drawn from the teacher", ge=1, le=10**7)
    teacher_steps: int = opt(50, "teacher DPM-Solver++(2M) steps per pair", ge=1, le=1000)
    guidance: float = opt(1.0, "guidance scale baked into the pairs (1: none)", ge=0)
    loss: str = opt("huber", "one-step distillation: huber (pseudo-Huber) or l2 (the reflow stage is always l2)")

    hints = {"guidance_range": "reflow bakes one guidance into its pairs; a range is for --method guided"}

    def validate(self) -> None:
        if self.steps < 1 or self.pairs < 1 or self.teacher_steps < 1:
            raise FewstepError(f"steps {self.steps}, pairs {self.pairs}, teacher_steps {self.teacher_steps}: give at "
                               "least 1")
        check_loss(self.loss)

    @classmethod
    def for_tests(cls) -> ReflowOptions:
        return cls(steps=1, pairs=1024, teacher_steps=10)


def reflow_stages(ctx: RunContext) -> Path:
    """Pairs, stage ``reflow`` (the student itself for --steps > 1), then the one-step distillation (--steps 1)."""
    o: ReflowOptions = ctx.options
    teacher = ctx.teacher
    assert teacher is not None
    if teacher.denoiser.takes_guidance:
        raise FewstepError("reflow needs a teacher without a guidance input (this one was distilled for a guidance "
                           "range): use the original teacher")
    if o.guidance != 1.0 and teacher.config.null_class is None:
        raise FewstepError("--guidance needs a class-conditional teacher with a null class: drop --guidance")
    guidance = o.guidance
    z, x, labels = pairs_for(ctx, guidance)
    T = teacher.denoiser.schedule.num_train_timesteps
    info = {"reflow_pairs": o.pairs, "pair_sampler": PAIR_SAMPLER, "teacher_steps": o.teacher_steps,
            "distilled_guidance": guidance, "student_steps": o.steps}
    data = (torch.stack([x, z], 1), labels)  # batches carry both ends of each pair
    if o.steps > 1:
        return ctx.stage(Reflow(teacher.config, teacher.denoiser.net, T, "student", o.steps, info), STUDENT, data=data)
    folder = ctx.stage(Reflow(teacher.config, teacher.denoiser.net, T, "teacher", REFLOW_DEFAULT_STEPS, info),
                       "reflow", data=data)
    rf = load_model(folder)
    return ctx.stage(OneStep(rf.config, rf.denoiser.net, T, {**info, "distill_loss": o.loss}, o.loss), STUDENT,
                     data=data)


register(Recipe(
    "reflow", KIND, reflow_stages,
    "Liu et al. 2022 / InstaFlow: reflow on teacher noise->sample pairs (pairs), Euler student; steps 1 "
    "adds the one-step distillation.", ReflowOptions, needs_data=False))
