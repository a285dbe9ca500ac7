"""What distillation methods share on top of the recipe layer (:mod:`fewstep.training.recipe`): the
:func:`distill` entry point, the one-student stage, the distances their losses use, and :class:`DistillOptions`,
the options of every method in one record as they were before each method declared its own (still accepted).

A method is one module of this package: an options dataclass (:class:`~fewstep.training.recipe.Options`, fields
made with :func:`~fewstep.training.recipe.opt`) and ``register(Recipe(name, "distill", run, summary, Options))``.
Its ``run`` takes a :class:`RunContext` (teacher, data, its options, the loop's config, output folder) and trains
one or more *stages* with ``ctx.stage(...)``, each a :class:`~fewstep.training.method.Method` run by the shared
loop in its own sub-folder.  The final stage is always ``OUT/student``: a model folder whose config says how to
sample it.  ``--resume`` skips finished stages and resumes the interrupted one exactly (the loop's checkpoints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fewstep.errors import FewstepError
from fewstep.training.method import Networks
from fewstep.training.recipe import (
    STUDENT,
    Options,
    Recipe,
    RunContext,
    RunResult,
    get_recipe,
    opt,
    option_fields,
    register,
    run_recipe,
    unknown_option,
)

KIND = "distill"
DistillContext = RunContext  # the name before the recipe layer
DistillResult = RunResult
LOSSES = ("huber", "l2")

__all__ = ["KIND", "LOSSES", "STUDENT", "DistillContext", "DistillOptions", "DistillResult", "Options", "Recipe",
           "RunContext", "RunResult", "StudentStage", "check_loss", "distance", "distill", "eval_mode", "get_method",
           "l2", "opt", "pseudo_huber", "register"]


class StudentStage:
    """What most stages share: one trainable ``self.student`` (a Denoiser) whose EMA is exported, no hook."""

    student: Any

    def networks(self) -> Networks:
        return Networks(trained={"student": self.student}, frozen=self.frozen())

    def frozen(self) -> dict[str, torch.nn.Module]:
        """The fixed networks the stage's losses use (a teacher): placed on the device, never checkpointed."""
        return {}

    def ema_target(self) -> torch.nn.Module:
        return self.student.net


def get_method(name: str) -> Recipe:
    """The registered distillation method ``name`` (every module of this package is imported on first use)."""
    return get_recipe(KIND, name)


@dataclass
class DistillOptions:
    """Every method's options in one record, as ``fewstep.distill`` took them before each method declared its own
    (kept so that code written then still runs).  :func:`distill` converts it to the method's own options: a
    field the method does not have must keep its default here, and ``iters`` becomes the loop's steps."""

    steps: int = 1
    iters: int = 1000
    reparam_iters: int | None = None
    guidance: float = 1.0
    guidance_range: tuple[float, float] | None = None
    loss: str = "huber"
    start_steps: int = 32
    teacher_steps: int = 50
    pairs: int = 4000
    preset: str | None = None
    ema_target: float = 0.95

    def to_recipe(self, recipe: Recipe) -> tuple[Options, int]:
        """(the method's options, iters)."""
        own = option_fields(recipe.options)
        kw = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in own:
                kw[f.name] = value
            elif f.name != "iters" and value != f.default:
                raise unknown_option(recipe, f.name, f"DistillOptions({f.name}={value!r})")
        return recipe.options(**kw), self.iters


def distill(method: str, ctx: RunContext) -> RunResult:
    """Run the distillation ``method`` on ``ctx`` (see :func:`fewstep.training.recipe.run_recipe`).  ``ctx.options``
    are the method's own options (``get_method(method).options``), or a :class:`DistillOptions`."""
    recipe = get_method(method)
    if isinstance(ctx.options, DistillOptions):
        options, iters = ctx.options.to_recipe(recipe)
        ctx = dataclasses.replace(ctx, options=options, train_config=dataclasses.replace(ctx.train_config,
                                                                                            steps=iters))
    return run_recipe(recipe, ctx)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode for a while (a trained network queried without gradients for a target: no dropout
    noise in it), then in its own mode again."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


# --- losses shared by methods ----------------------------------------------------------------------------
def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Per-sample pseudo-Huber distance sqrt(||a - b||^2 + c^2) - c (Song & Dhariwal 2023, sec. 3.3) with
    c = 0.00054 sqrt(dim) by default."""
    d = a[0].numel()
    c = 0.00054 * math.sqrt(d) if c is None else c
    return torch.sqrt((a - b).pow(2).flatten(1).sum(1) + c * c) - c


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error."""
    return (a - b).pow(2).flatten(1).mean(1)


def check_loss(name: str) -> None:
    if name not in LOSSES:
        raise FewstepError(f"loss {name!r}: use l2 or huber")


def distance(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    check_loss(name)
    return {"l2": l2, "huber": pseudo_huber}[name]


