"""Exponential moving average of a module's parameters (buffers copied)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = decay_t * ema + (1 - decay_t) * online`` with warm-up ``decay_t = min(decay, (1+n)/(10+n))``
    (as diffusers' EMAModel), so short runs are not dominated by the initialization."""

    def __init__(self, module: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.num_updates = 0
        self._ema_params = list(self.module.parameters())
        self._ema_buffers = list(self.module.buffers())

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        d = self.current_decay()
        on_p = [p.detach() for p in online.parameters()]
        torch._foreach_lerp_(self._ema_params, on_p, 1 - d)
        for b_ema, b in zip(self._ema_buffers, online.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1
