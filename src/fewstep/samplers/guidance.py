"""Classifier-free guidance and network-evaluation counting, as wrappers around a denoiser.

Guidance form (Ho & Salimans 2022): ``x0_w = x0_u + w (x0_c - x0_u)`` (same for eps): w = 1 is the
plain conditional model, w = 0 the unconditional one.  Meng et al. write ``(1 + w') x0_c - w' x0_u``,
i.e. their w' is our w - 1.  A guided call evaluates the network on a doubled batch and costs 2 NFE.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fewstep.diffusion.param import Prediction

DenoiserFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], Prediction]


class Guided:
    """``Guided(denoiser, scale, null_class)(x, sigma, cond)``: a CFG-combined prediction (cost 2)."""

    cost = 2

    def __init__(self, denoiser: DenoiserFn, scale: float, null_class: int):
        self.denoiser, self.scale, self.null_class = denoiser, float(scale), null_class

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> Prediction:
        if cond is None:
            raise ValueError("guidance needs class labels")
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        null = torch.full_like(cond, self.null_class)
        p = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, null]))
        (x0_c, x0_u), (eps_c, eps_u) = p.x0.chunk(2), p.eps.chunk(2)
        w = self.scale
        return Prediction(x0=x0_u + w * (x0_c - x0_u), eps=eps_u + w * (eps_c - eps_u))


def guide(denoiser: DenoiserFn, scale: float | None, null_class: int | None) -> DenoiserFn:
    """Wrap ``denoiser`` for guidance scale ``scale``; scale None or 1 returns it unchanged (cost 1)."""
    if scale is None or scale == 1.0 or null_class is None:
        return denoiser
    return Guided(denoiser, scale, null_class)


class NFECounter:
    """Counts network evaluations per sample: each call adds the wrapped denoiser's ``cost`` (1 or 2)."""

    def __init__(self, denoiser: DenoiserFn):
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> Prediction:
        self.nfe += getattr(self.denoiser, "cost", 1)
        return self.denoiser(x, sigma, cond)
