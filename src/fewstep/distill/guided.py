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

from pathlib import Path

from fewstep.distill.base import DistillContext, DistillMethod, register
from fewstep.distill.progressive import progressive_stages
from fewstep.errors import FewstepError


def guided_stages(ctx: DistillContext) -> Path:
    w_range = ctx.options.guidance_range
    if not w_range:
        raise FewstepError("guided distillation needs --guidance-range LO,HI (e.g. 1,4)")
    if ctx.options.guidance != 1.0:
        raise FewstepError("guided distillation takes --guidance-range, not --guidance")
    return progressive_stages(ctx, w_range)


register(DistillMethod(
    "guided", guided_stages,
    "Meng et al. 2023: a student that takes the guidance scale (--guidance-range), then progressive rounds."))
