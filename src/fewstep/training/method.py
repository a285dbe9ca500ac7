"""The one interface every training method implements: teachers now, distillation and fine-tuning later.

A method owns its networks and exposes *phases*: which module's parameters a phase updates, its
per-sample loss, and how often it runs.  Alternating updates (a generator and a critic) are two phases,
so the loop needs no mode flags.  The shared loop (``fewstep.training.loop``) owns everything else:
optimizers, EMA, accumulation, devices, mixed precision, checkpoints, exact resume, progress and logs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor | None]  # (x0, labels or None)
LossFn = Callable[[Batch, torch.Generator], torch.Tensor]  # -> per-sample losses (B,)


@dataclass
class Phase:
    """One kind of update: ``loss(batch, generator)`` returns per-sample losses, optimized w.r.t. ``module``'s
    parameters every ``every`` steps.  ``lr_scale`` scales the run's learning rate for this phase."""

    name: str
    module: nn.Module
    loss: LossFn
    every: int = 1
    lr_scale: float = 1.0


class Method(Protocol):
    """What the loop needs from a method."""

    name: str

    def modules(self) -> dict[str, nn.Module]:
        """Every module with state to checkpoint (trainable or not), by a stable name."""
        ...

    def phases(self) -> list[Phase]:
        ...

    def ema_target(self) -> nn.Module:
        """The module whose EMA is the exported model."""
        ...

    def after_step(self, step: int) -> None:
        """Hook after each optimizer step (e.g. update a target network). May do nothing.

        A method may also define ``before_step(step)``: the loop calls it before each step (also after a resume),
        for losses that depend on the step, e.g. a discretization curriculum."""
        ...

    def save_model(self, out: Path, net: nn.Module, training: dict[str, Any]) -> None:
        """Write the model folder for ``net`` (the EMA of ``ema_target()``)."""
        ...
