"""The one interface every training method implements: teachers, distillation, fine-tuning and alignment.

A method owns its networks and declares them (:class:`Networks`): which are *trained* by its phases, which
carry *state* changed outside the optimizer (an EMA target network), and which are *frozen* (teachers).  It
exposes *phases*: which module's parameters a phase updates, its per-sample loss, how often it runs and its
optimizer settings.  Alternating updates (a generator and a critic) are two phases, so the loop needs no mode
flags.  The shared loop (``fewstep.training.loop``) owns everything else: optimizers, learning-rate schedules,
EMA, accumulation, devices, mixed precision, multi-process training, checkpoints, exact resume, progress and
logs.

Rules the loop relies on (and enforces where it can):

- A phase's backward reaches only its own parameters: while a phase runs, every other trained parameter has
  ``requires_grad`` off, so a generator loss that flows through a critic leaves the critic's gradients alone.
- A trained module is called through its own ``forward`` (``module(...)``, as :class:`Denoiser` calls its
  ``net``): in a multi-process run the loop routes exactly that call through DistributedDataParallel while the
  phase that trains it runs, and through the bare module otherwise.  Call it at most once with gradients per
  micro-batch (DDP marks each parameter ready once per backward).
- Networks a loss uses are attributes of the method (or reachable from them), not hidden in closures built in
  ``__init__``: the loop moves what :meth:`Method.networks` declares, and a test walks every tensor reachable
  from the method to check that nothing stayed behind.  Build closures in :meth:`Method.phases`, which the loop
  calls after it placed the networks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor | None]  # (x0, labels or None)


@dataclass
class StepContext:
    """What a loss gets besides its batch: the step, the loop's seeded generator (the only randomness a loss may
    use, so resume is exact) and a per-step, per-micro-batch store for work that several phases share.

    ``ctx.share("fake", lambda: generator(z))`` computes once per step and micro-batch and returns the same value
    to every phase that asks (in phase order: a phase that needs gradients through the shared value must come
    first, or compute its own)."""

    step: int
    gen: torch.Generator
    micro: int = 0
    shared: dict[str, Any] = field(default_factory=dict)

    def share(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.shared:
            self.shared[key] = compute()
        return self.shared[key]


@dataclass
class LossOutput:
    """A loss's result: per-sample losses (B,) that the loop reduces, plus named scalars to log (for example
    D(real) and D(fake)); they reach ``metrics.jsonl`` as ``<phase>/<name>`` and the progress bar."""

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


LossFn = Callable[[Batch, StepContext], "torch.Tensor | LossOutput"]  # -> per-sample losses (B,) or LossOutput


@dataclass
class Phase:
    """One kind of update: ``loss(batch, ctx)`` returns per-sample losses, optimized w.r.t. ``module``'s trainable
    parameters every ``every`` steps (at steps where ``step % every == 0``).

    Optimizer settings (AdamW): ``lr_scale`` scales the run's learning rate (the run's warm-up and cosine
    schedule, which follows the global step); ``betas`` and ``eps`` as in AdamW; ``weight_decay`` and
    ``grad_clip`` default (None) to the run's; ``grad_clip=0`` turns clipping off for this phase."""

    name: str
    module: nn.Module
    loss: LossFn
    every: int = 1
    lr_scale: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float | None = None
    grad_clip: float | None = None


@dataclass
class Networks:
    """Every module a method uses, by a stable name (the checkpoint's key prefix for trained and state modules).

    - ``trained``: updated by phases; checkpointed; wrapped for multi-process training.
    - ``state``: changed outside the optimizer (e.g. an EMA target network); checkpointed, never optimized.
    - ``frozen``: fixed for the run (teachers); placed on the device, set to eval mode with gradients off, never
      written into a checkpoint.

    A :class:`~fewstep.models.denoiser.Denoiser` may stand for its network: the loop places the whole denoiser
    (its noise-schedule tables too) and checkpoints its ``net``."""

    trained: dict[str, nn.Module]
    state: dict[str, nn.Module] = field(default_factory=dict)
    frozen: dict[str, nn.Module] = field(default_factory=dict)

    def checkpointed(self) -> dict[str, nn.Module]:
        both = {**self.trained, **self.state}
        if len(both) != len(self.trained) + len(self.state):
            raise ValueError("a network name is used twice in Networks.trained and Networks.state")
        return both

    def all(self) -> dict[str, nn.Module]:
        return {**self.checkpointed(), **self.frozen}


class Method(Protocol):
    """What the loop needs from a method.

    Optional hooks: ``before_step(step, gen)`` runs before each step (also right after a resume) with the loop's
    seeded generator, for losses that depend on the step (a curriculum) or draw at the start of a step;
    ``after_step(step)`` runs after each step's updates (e.g. to update a target network)."""

    name: str

    def networks(self) -> Networks:
        """Every module the method uses: trained, state and frozen (see :class:`Networks`)."""
        ...

    def phases(self) -> list[Phase]:
        """Called once, after the networks are placed on the device."""
        ...

    def ema_target(self) -> nn.Module:
        """The module whose EMA is the exported model."""
        ...

    def save_model(self, out: Path, net: nn.Module, training: dict[str, Any]) -> None:
        """Write the model folder for ``net`` (the EMA of ``ema_target()``)."""
        ...


def loss_value(out: torch.Tensor | LossOutput) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
    """(per-sample losses, named scalars) of what a loss returned."""
    if isinstance(out, LossOutput):
        return out.loss, out.logs
    return out, {}
