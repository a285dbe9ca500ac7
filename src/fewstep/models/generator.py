"""The one-step generator of fewstep's GAN baselines (``fewstep distill --method gan``): noise -> sample in one call.

It has the backbone call ``net(x, t, class_labels)`` so that a GAN is a model folder like every student: ``x`` is the
unit-variance starting noise (the ``gan`` parameterization hands the sampler's first state over as exactly that
noise), ``t`` is ignored, ``class_labels`` are a cGAN's classes.

- **Latent**: the first ``z_dim`` entries of the flattened noise are z (128 as in SNGAN and the projection cGAN);
  the rest of the noise is unused, so a seed still fixes a sample and samples never depend on the batch.
- **InfoGAN's code** (``codes`` = K > 0): the *last* entry u of the flattened noise is the categorical code
  c = floor(K Phi(u)) (Phi the normal CDF: c is uniform on 0..K-1, as InfoGAN's Cat(K) prior), so the code is part
  of the latent as in the paper and a seeded sample keeps its code; ``fewstep sample --code k`` sets u to the middle
  of bin k (:func:`code_latent`).  The code conditions the generator like a class.
- **Images** (C, H, W with sides divisible by 4): SNGAN's ResNet generator (Miyato et al. 2018; pfnet-research
  sngan_projection gen_models/resnet.py, read for the layout): z -> linear -> (4w, H/4, W/4) -> two up-sampling
  residual blocks (4w -> 2w -> w) -> norm, ReLU, 3x3 conv, tanh.  Class (or code) conditioning through the
  normalization's gain and bias, as the projection cGAN's conditional batch norm; ours normalizes with GroupNorm, not
  BatchNorm, so a sample depends on its own noise only (no batch statistics, and the exported EMA weights need no
  re-estimated running statistics).
- **Vectors** (D,): a residual MLP on z (z_dim = D, or D - 1 with a code), the class or code embedding added at
  each block.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from fewstep.schema import FieldProblem, NonNegInt, PosInt, Strict


class GANGeneratorConfig(Strict):
    sample_shape: list[PosInt] = Field(description="[channels, height, width] (sides divisible by 4) or [dim]")
    width: PosInt = 64
    z_dim: PosInt = 128
    num_class_embeds: PosInt | None = None
    codes: NonNegInt = 0
    hidden: PosInt = 256
    depth: PosInt = 3

    @model_validator(mode="after")
    def _shape(self) -> GANGeneratorConfig:
        s = self.sample_shape
        if len(s) not in (1, 3):
            raise FieldProblem("sample_shape", s, "give [channels, height, width] or [dim]")
        if len(s) == 3 and (s[1] % 4 or s[2] % 4):
            raise FieldProblem("sample_shape", s, "the generator up-samples twice: image sides must divide by 4")
        if self.codes and self.num_class_embeds:
            raise FieldProblem("codes", self.codes, "a generator takes classes or InfoGAN codes, not both")
        if self.codes == 1:
            raise FieldProblem("codes", self.codes, "a categorical code needs at least 2 values (0: none)")
        if math.prod(s) - (1 if self.codes else 0) < 1:
            raise FieldProblem("sample_shape", s, "the noise has no entry left for z besides the code")
        return self


def code_of(noise: torch.Tensor, codes: int) -> torch.Tensor:
    """InfoGAN's categorical code (B,) of unit-variance noise: floor(K Phi(u)) of its last flattened entry u."""
    u = noise.flatten(1)[:, -1].double()
    p = 0.5 * (1 + torch.erf(u / math.sqrt(2)))
    return (p * codes).floor().clamp(0, codes - 1).long()


def code_latent(k: int, codes: int) -> float:
    """The noise value u whose code is ``k`` (the middle of its bin): Phi^-1((k + 0.5) / K)."""
    p = torch.tensor((k + 0.5) / codes, dtype=torch.float64)
    return float(math.sqrt(2) * torch.erfinv(2 * p - 1))


def _groups(c: int) -> int:
    return next(g for g in (16, 8, 4, 2, 1) if c % g == 0)


class CondNorm(nn.Module):
    """GroupNorm whose gain and bias are chosen by the class (or code); plain affine without classes."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, affine=False)
        n = max(classes, 1)
        self.gain = nn.Embedding(n, channels)
        self.bias = nn.Embedding(n, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.norm(h) * self.gain(c)[:, :, None, None] + self.bias(c)[:, :, None, None]


class UpBlock(nn.Module):
    """SNGAN's generator block: norm, ReLU, x2 nearest up-sampling, 3x3 conv, norm, ReLU, 3x3 conv; 1x1 skip."""

    def __init__(self, cin: int, cout: int, classes: int):
        super().__init__()
        self.n1, self.n2 = CondNorm(cin, classes), CondNorm(cout, classes)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(h, scale_factor=2, mode="nearest")
        r = self.c1(F.interpolate(F.relu(self.n1(h, c)), scale_factor=2, mode="nearest"))
        return self.skip(up) + self.c2(F.relu(self.n2(r, c)))


class GANGenerator(nn.Module):
    """noise (B, *sample_shape) -> sample (B, *sample_shape); see the module docstring."""

    kind = "gan-generator"
    config_schema = GANGeneratorConfig

    def __init__(self, sample_shape: list[int] | tuple[int, ...], width: int = 64, z_dim: int = 128,
                 num_class_embeds: int | None = None, codes: int = 0, hidden: int = 256, depth: int = 3):
        super().__init__()
        shape = [int(s) for s in sample_shape]
        self._config = dict(sample_shape=shape, width=width, z_dim=z_dim, num_class_embeds=num_class_embeds,
                            codes=codes, hidden=hidden, depth=depth)
        self.codes = codes
        self.z_used = min(z_dim, math.prod(shape) - (1 if codes else 0))
        conds = codes or num_class_embeds or 0
        self.image = len(shape) == 3
        if self.image:
            c, h, w = shape
            self.start = (4 * width, h // 4, w // 4)
            self.fc = nn.Linear(self.z_used, math.prod(self.start))
            self.blocks = nn.ModuleList([UpBlock(4 * width, 2 * width, conds), UpBlock(2 * width, width, conds)])
            self.n_out = CondNorm(width, conds)
            self.out = nn.Conv2d(width, c, 3, padding=1)
        else:
            self.inp = nn.Linear(self.z_used, hidden)
            self.cemb = nn.Embedding(conds, hidden) if conds else None
            self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.ReLU(),
                                                   nn.Linear(hidden, hidden)) for _ in range(depth))
            self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, shape[0]))

    @staticmethod
    def from_config(config: dict[str, Any]) -> GANGenerator:
        return GANGenerator(**config)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    @property
    def num_class_embeds(self) -> int:
        return self._config["num_class_embeds"] or 0

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self._config["sample_shape"])

    def condition(self, noise: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """What the normalizations are conditioned on: the InfoGAN code of the noise, the class, or 0."""
        if self.codes:
            return code_of(noise, self.codes).to(noise.device)
        if class_labels is not None and self.num_class_embeds:
            return class_labels.long()
        return torch.zeros(noise.shape[0], dtype=torch.long, device=noise.device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.condition(x, class_labels)
        z = x.flatten(1)[:, :self.z_used]
        if self.image:
            h = self.fc(z).view(x.shape[0], *self.start)
            for block in self.blocks:
                h = block(h, c)
            return torch.tanh(self.out(F.relu(self.n_out(h, c))))
        h = self.inp(z)
        emb = self.cemb(c) if self.cemb is not None else 0.0
        for block in self.mlp:
            h = h + block(h + emb)
        return self.head(h)
