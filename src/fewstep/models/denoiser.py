"""The one denoiser contract: ``denoiser(x, sigma, cond) -> Prediction``.

``x`` is the VE state ``x0 + sigma * eps`` (shape (B, ...)), ``sigma`` the VE noise level per sample
(shape (B,), float64 preferred so timesteps round-trip exactly), ``cond`` integer class labels (B,)
or None.  The returned :class:`~fewstep.diffusion.param.Prediction` holds x0 and eps.  Teachers and
students, fewstep's and diffusers' networks, all look like this to samplers and methods.
"""

from __future__ import annotations

import torch
from torch import nn

from fewstep.diffusion.param import Parameterization, Prediction, get_parameterization
from fewstep.diffusion.schedules import NoiseSchedule


class Denoiser(nn.Module):
    """Wraps a network ``net(net_input, time_input, class_labels) -> output`` with its parameterization.

    The network knows nothing about schedules; the parameterization adapter converts the VE state
    and noise level into what it was trained on and its output back into x0 / eps.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: str, num_classes: int = 0,
                 null_class: int | None = None):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.num_classes = num_classes
        self.null_class = null_class  # the 'no class' label of classifier-free guidance, if trained with one
        self.param: Parameterization = get_parameterization(prediction)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> Prediction:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if self.num_classes and cond is None:
            if self.null_class is None:
                raise ValueError("this class-conditional model has no null class: give class labels")
            cond = torch.full((x.shape[0],), self.null_class, device=x.device, dtype=torch.long)
        net_in, time_in = self.param.inputs(x, sigma, self.schedule)
        out = self.net(net_in, time_in, cond if self.num_classes else None)
        return self.param.predict(out.to(x.dtype), x, sigma)

    def raw(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The network's own output (eps, v, x0, velocity or EDM's F) at VE state x and noise sigma."""
        net_in, time_in = self.param.inputs(x, sigma, self.schedule)
        return self.net(net_in, time_in, cond if self.num_classes else None)
