"""The one denoiser contract: ``denoiser(x, sigma, cond) -> Prediction``.

``x`` is the VE state ``x0 + sigma * eps`` (shape (B, ...)), ``sigma`` the VE noise level per sample
(shape (B,), float64 preferred so timesteps round-trip exactly), ``cond`` integer class labels (B,)
or None, or a :class:`Cond` (labels and a per-sample guidance scale) for a guidance-conditioned student.
The returned :class:`~fewstep.diffusion.param.Prediction` holds x0 and eps.  Teachers and
students, fewstep's and diffusers' networks, all look like this to samplers and methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fewstep.diffusion.param import Parameterization, Prediction, get_parameterization, lcm_boundary
from fewstep.diffusion.schedules import NoiseSchedule
from fewstep.errors import FewstepError

BOUNDARIES = ("lcm",)


@dataclass
class Cond:
    """Conditioning for a network that also takes the guidance scale as an input (Meng et al. 2023):
    class labels (B,) or None, and the scale w per sample (B,)."""

    labels: torch.Tensor | None
    w: torch.Tensor

    def __getitem__(self, idx) -> Cond:
        return Cond(self.labels[idx] if self.labels is not None else None, self.w[idx])

    def to(self, device) -> Cond:
        return Cond(self.labels.to(device) if self.labels is not None else None, self.w.to(device))


class Denoiser(nn.Module):
    """Wraps a network ``net(net_input, time_input, class_labels) -> output`` with its parameterization.

    The network knows nothing about schedules; the parameterization adapter converts the VE state
    and noise level into what it was trained on and its output back into x0 / eps.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: str, num_classes: int = 0,
                 null_class: int | None = None, boundary: str | None = None):
        super().__init__()
        if boundary not in (None, *BOUNDARIES):
            raise FewstepError(f"unknown boundary condition {boundary!r}: use one of {', '.join(BOUNDARIES)}")
        self.boundary = boundary  # "lcm": a consistency model's f(x, sigma_min) = x on a discrete teacher
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.num_classes = num_classes
        self.null_class = null_class  # the 'no class' label of classifier-free guidance, if trained with one
        self.param: Parameterization = get_parameterization(prediction)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's own signature
        """``.to(device)`` (and every other move) takes the schedule's tables along: they are plain tensors, not
        buffers, so that ``.to(dtype)`` never rounds the float64 noise levels."""
        super()._apply(fn, recurse)
        device = fn(torch.zeros((), device=self.schedule.sigmas.device)).device  # a dtype change keeps the device
        self.schedule = self.schedule.to(device)
        return self

    @property
    def takes_guidance(self) -> bool:
        """True for a guidance-conditioned network (its ``cond`` must be a :class:`Cond`)."""
        return bool(getattr(self.net, "takes_guidance", False))

    def _net(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        labels, extra = cond, {}
        if isinstance(cond, Cond):
            labels, extra = cond.labels, {"w": cond.w}
        elif self.takes_guidance:
            raise ValueError("this network takes the guidance scale as an input: pass a Cond(labels, w)")
        if self.num_classes and labels is None:
            if self.null_class is None:
                raise ValueError("this class-conditional model has no null class: give class labels")
            labels = torch.full((x.shape[0],), self.null_class, device=x.device, dtype=torch.long)
        net_in, time_in = self.param.inputs(x, sigma, self.schedule)
        return self.net(net_in, time_in, labels if self.num_classes else None, **extra)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | Cond | None = None) -> Prediction:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        p = self.param.predict(self._net(x, sigma, cond).to(x.dtype), x, sigma)
        if self.boundary == "lcm":
            p = lcm_boundary(x, p.x0, sigma, self.schedule.timestep(sigma))
        return p

    def raw(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | Cond | None = None) -> torch.Tensor:
        """The network's own output (eps, v, x0, velocity or EDM's F) at VE state x and noise sigma."""
        sigma = torch.as_tensor(sigma, device=x.device)
        return self._net(x, sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma, cond)
