"""Guided distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", sec. 4).

Stage one: a student eta(z_t, w) with w ~ U[w_min, w_max] per example matches the classifier-free-guided teacher
x0_w = x0_u + w (x0_c - x0_u) (our w is Meng et al.'s w + 1) under the truncated-SNR weight max(SNR, 1); w is
embedded like the time and added to the time embedding (:class:`~fewstep.models.backbones.GuidanceEmbedded`,
zero-initialized, so the student starts as the teacher).  The student predicts v, so this stage is also the
eps -> v re-parameterization progressive distillation needs.  Stage two: progressive distillation of eta with w
kept as an input (each round draws w per example and gives the same w to teacher and student).

The student samples at any scale in the trained range with one network evaluation per step
(``fewstep sample --model STUDENT --guidance W``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fewstep.distill.base import KIND, Options, Recipe, RunContext, opt, register
from fewstep.distill.progressive import check_iters, check_rounds, progressive_stages
from fewstep.errors import FewstepError


def check_range(w_range: tuple[float, float] | None) -> None:
    if w_range is not None and not 0 <= w_range[0] <= w_range[1]:
        raise FewstepError(f"guidance_range {w_range[0]},{w_range[1]}: need 0 <= LO <= HI")


@dataclass
class GuidedOptions(Options):
    guidance_range: tuple[float, float] | None = opt(None, "LO,HI (required): the student takes the guidance scale "
                                                           "as an input, trained for w in this range")
    steps: int = opt(1, "student sampling steps (NFE per sample), a power of two", ge=1, le=1024)
    start_steps: int = opt(32, "student steps of the first progressive round, a power of two >= steps", ge=1,
                           le=1024)
    reparam_iters: int | None = opt(None, "steps of the first stage, the w-conditioned v student (default: iters)",
                                      ge=1)

    hints = {"guidance": "guided distillation takes guidance_range, and the student any scale in it"}

    def validate(self) -> None:
        if self.guidance_range is None:
            raise FewstepError("guided distillation needs --guidance-range LO,HI (e.g. 1,4)")
        check_range(self.guidance_range)
        check_rounds(self.steps, self.start_steps)
        check_iters("reparam_iters", self.reparam_iters)

    @classmethod
    def for_tests(cls) -> GuidedOptions:
        return cls(guidance_range=(1.0, 3.0), steps=1, start_steps=2)


def guided_stages(ctx: RunContext) -> Path:
    o: GuidedOptions = ctx.options
    return progressive_stages(ctx, o.steps, o.start_steps, 1.0, o.guidance_range, o.reparam_iters)


register(Recipe(
    "guided", KIND, guided_stages,
    "Meng et al. 2023: a student that takes the guidance scale (guidance_range), then progressive rounds.",
    GuidedOptions))
