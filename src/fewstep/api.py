"""The functions behind ``import fewstep`` (see :mod:`fewstep`): train a teacher, distil it, sample and evaluate
models, with the CLI's defaults and checks, taking folders or loaded models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fewstep.evaluate.runner import evaluate_model
from fewstep.generate import sample_model as sample
from fewstep.training.loop import TrainConfig, TrainResult
from fewstep.training.recipe import RunResult, start
from fewstep.training.teacher import TeacherOptions
from fewstep.training.teacher import train_teacher as _train_teacher

__all__ = ["distill_model", "evaluate_model", "sample", "train_teacher"]


def train_teacher(data: str, out: str | Path, *, preset: str | None = None, objective: str = "ddpm",
                  prediction: str | None = None, conditional: bool = False, beta_schedule: str = "linear",
                  steps: int = 3000, batch: int = 64, lr: float = 1e-3, ema_decay: float = 0.999,
                  ckpt_every: int = 500, seed: int = 0, grad_accum: int = 1, mixed_precision: str = "no",
                  resume: bool = False, progress: bool = False, log_with: str | None = None) -> TrainResult:
    """Train a teacher into the model folder ``out`` exactly as ``fewstep train`` does (same defaults)."""
    cfg = TrainConfig(steps=steps, batch=batch, lr=lr, ema_decay=ema_decay, ckpt_every=ckpt_every, seed=seed,
                      grad_accum=grad_accum, mixed_precision=mixed_precision, progress=progress, log_with=log_with)
    opts = TeacherOptions(data=data, preset=preset, objective=objective, prediction=prediction,
                          conditional=conditional, beta_schedule=beta_schedule, seed=seed)
    return _train_teacher(opts, cfg, Path(out), resume=resume)


def distill_model(method: str, out: str | Path, *, teacher: str | Path | None = None, data: str | None = None,
                  config: str | Path | None = None, resume: bool = False, progress: bool = False,
                  **options: Any) -> RunResult:
    """Distil ``teacher`` with ``method`` into ``out`` (the student is ``out/student``) as ``fewstep distill``
    does.  ``options`` are the method's and the loop's options by name (``steps=1, iters=500, lr=5e-4``); values
    in the YAML file ``config`` sit below them.  An unknown name raises FewstepError listing the method's."""
    return start("distill", method, Path(out), teacher=None if teacher is None else Path(teacher), data=data,
                 config=None if config is None else Path(config), values=options, resume=resume, progress=progress,
                 quality=_train_quality)


def _train_quality(dataset: str, n: int):  # noqa: ANN202 - the loop's quality callback (eval_every), as the CLI's
    from fewstep.evaluate.runner import train_quality

    return train_quality(dataset, n)

