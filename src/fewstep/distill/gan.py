"""The lecture's GAN baselines, trained from scratch on the data (no teacher): one-step generators saved as model
folders, so ``sample``, ``evaluate`` and ``bench`` treat them like students (``fewstep distill --method gan --data D
--out O``; no ``--teacher``).

Variants (``--set variant=...``):

- ``gan``: an unconditional GAN with SNGAN's recipe (Miyato et al. 2018, "Spectral Normalization for Generative
  Adversarial Networks"): spectral norm on every discriminator layer, the hinge loss.
- ``cgan``: the class-conditional GAN with a projection discriminator (Miyato & Koyama 2018, "cGANs with Projection
  Discriminator"; pfnet-research/sngan_projection, read for the losses and the update schedule):
  D(x, y) = w.phi(x) + <V_y, phi(x)>, phi the sum-pooled features, V spectrally normalized too; the generator
  conditions its normalizations on y.  ``auto`` (the default) is ``cgan`` on labelled data, else ``gan``.
- ``infogan`` (Chen et al. 2016, "InfoGAN"; openai/InfoGAN, read for the loss): a categorical code c with
  ``codes`` values is part of the latent (the noise's last entry, see :mod:`fewstep.models.generator`); a head Q on
  the discriminator's features predicts it, and the mutual-information bound L_I = E log Q(c | G(z, c)) (weight
  ``info_weight``, 1 as in the paper) is maximized by both the generator and Q (Q updates with the discriminator's
  step).  ``fewstep sample --code K`` draws samples of code K.

The paper recipe (METHODS-2.md, the projection cGAN's CIFAR config): hinge loss L_D = E relu(1 - D(x, y)) +
E relu(1 + D(G(z, y), y)), L_G = -E D(G(z, y), y); Adam lr 2e-4, betas (0, 0.9), ``n_dis`` = 5 discriminator
updates per generator update, batch 64, z of 128 dimensions, no gradient clipping (the loop's defaults for this
method).  One loop step is one discriminator update: ``iters`` counts those, so the generator gets iters / n_dis
updates.  The exported generator is the EMA of its weights (the loop's ``ema_decay``; Yazici et al. 2019 show an
EMA generator scores better).  ``loss=ns`` switches to the non-saturating loss of the original GAN and InfoGAN.

Where ours differs, and why: InfoGAN here uses SNGAN's discriminator, hinge loss and optimizer (the 2016 recipe,
Adam beta1 0.5, no spectral norm, is less stable and would make a weaker baseline) and only the categorical code (no
continuous codes); the generators normalize with GroupNorm instead of BatchNorm (see the generator's docstring).
The discriminator is SNGAN's standard CNN (3x3 and 4x4-stride-2 convolutions, leaky ReLU 0.1) sized like the
generator (widths w, 2w, 4w), a residual MLP (4w hidden units) on vector data.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from fewstep.distill.base import KIND, STUDENT, Options, Recipe, RunContext, eval_mode, opt, register
from fewstep.errors import FewstepError
from fewstep.models.denoiser import Denoiser
from fewstep.models.folder import ModelConfig, SamplingDefaults, save_model, vp_schedule_dict
from fewstep.models.generator import GANGenerator, code_of
from fewstep.models.scheduler_config import VPProcess
from fewstep.training.method import Batch, LossOutput, Networks, Phase, StepContext

VARIANTS = ("auto", "gan", "cgan", "infogan")
GAN_LOSSES = ("hinge", "ns")


class Discriminator(nn.Module):
    """x (B, *shape), labels -> (logits (B,), InfoGAN code logits (B, K) or None); every layer but Q's spectrally
    normalized."""

    def __init__(self, shape: tuple[int, ...], width: int = 64, classes: int = 0, codes: int = 0,
                 hidden: int = 256):
        super().__init__()
        act = nn.LeakyReLU(0.1)
        if len(shape) == 3:
            c, w = shape[0], width
            layers = [nn.Conv2d(c, w, 3, padding=1), nn.Conv2d(w, 2 * w, 4, 2, 1),
                      nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.Conv2d(2 * w, 4 * w, 4, 2, 1),
                      nn.Conv2d(4 * w, 4 * w, 3, padding=1)]
            features = 4 * w
        else:
            layers = [nn.Linear(shape[0], hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)]
            features = hidden
        self.trunk = nn.Sequential(*[m for layer in layers for m in (spectral_norm(layer), act)])
        self.out = spectral_norm(nn.Linear(features, 1))
        self.embed = spectral_norm(nn.Embedding(classes, features)) if classes else None
        self.q = nn.Sequential(nn.Linear(features, 128), nn.LeakyReLU(0.1), nn.Linear(128, codes)) if codes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.trunk(x)
        phi = h.sum((2, 3)) if h.dim() == 4 else h  # sum pooling, as SNGAN's discriminators
        logits = self.out(phi).squeeze(1)
        if self.embed is not None and y is not None:
            logits = logits + (self.embed(y) * phi).sum(1)
        return logits, self.q(phi) if self.q is not None else None


class GAN:
    """One stage: the generator (trained, exported; a Denoiser with the ``gan`` parameterization, so training draws
    samples exactly as sampling does) and the discriminator (trained)."""

    name = "gan"

    def __init__(self, shape: tuple[int, ...], classes: int, options: GANOptions, variant: str, data: str,
                 seed: int = 0):
        o = options
        self.variant, self.codes = variant, (o.codes if variant == "infogan" else 0)
        self.classes = classes if variant == "cgan" else 0
        self.loss_kind, self.n_dis, self.info_weight = o.loss, o.n_dis, o.info_weight
        self.shape, self.data = tuple(shape), data
        self.process = VPProcess(clip_sample=False)  # the sampler's first state is the noise itself (see param.py)
        with torch.random.fork_rng(devices=[]):  # initialization (and spectral norm's u, v) from the run's seed
            torch.manual_seed(seed)
            net = GANGenerator(list(shape), width=o.width, z_dim=o.z_dim, num_class_embeds=self.classes or None,
                               codes=self.codes, hidden=4 * o.width)  # vectors: MLPs of 4 x width hidden units
            self.discriminator = Discriminator(self.shape, o.width, self.classes, self.codes, hidden=4 * o.width)
        self.generator = Denoiser(net, self.process.schedule(), "gan", self.classes, None)

    def networks(self) -> Networks:
        return Networks(trained={"generator": self.generator, "discriminator": self.discriminator})

    def ema_target(self) -> nn.Module:
        return self.generator.net

    def _fake(self, x0: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator) -> tuple[torch.Tensor,
                                                                                            torch.Tensor | None]:
        """(G(z, y) for fresh unit noise z, its InfoGAN codes or None), through the sampler's path."""
        sched = self.generator.schedule
        T = sched.num_train_timesteps
        sigma = sched.sigmas.to(x0.device)[T - 1].expand(x0.shape[0])
        z = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        start = z * float((1 + sched.sigmas[T - 1] ** 2).sqrt())  # the samplers' first state (VP in VE form)
        codes = None
        if self.codes:
            seen, _ = self.generator.param.inputs(start, sigma, sched)  # exactly the noise the network reads
            codes = code_of(seen, self.codes)
        return self.generator(start, sigma, y if self.classes else None).x0, codes

    def _d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "hinge":
            return F.relu(1 - real) + F.relu(1 + fake)
        return F.softplus(-real) + F.softplus(fake)

    def _g_loss(self, fake: torch.Tensor) -> torch.Tensor:
        return -fake if self.loss_kind == "hinge" else F.softplus(-fake)

    def phases(self) -> list[Phase]:
        def d_loss(batch: Batch, ctx: StepContext) -> LossOutput:
            x0, y = batch
            y = y if self.classes else None
            with torch.no_grad():
                fake, codes = self._fake(x0, y, ctx.gen)
            b = x0.shape[0]
            logits, q = self.discriminator(torch.cat([x0, fake]), None if y is None else torch.cat([y, y]))
            loss = self._d_loss(logits[:b], logits[b:])
            logs = {"d_real": logits[:b].mean().detach(), "d_fake": logits[b:].mean().detach()}
            if q is not None and codes is not None:
                info = F.cross_entropy(q[b:], codes.to(q.device), reduction="none")
                loss = loss + self.info_weight * info
                logs["info"] = info.mean().detach()
            return LossOutput(loss, logs)

        def g_loss(batch: Batch, ctx: StepContext) -> LossOutput:
            x0, y = batch
            y = y if self.classes else None
            fake, codes = self._fake(x0, y, ctx.gen)
            with eval_mode(self.discriminator):  # it only answers here: no power iteration of its spectral norms
                logits, q = self.discriminator(fake, y)
            loss = self._g_loss(logits)
            logs: dict[str, Any] = {}
            if q is not None and codes is not None:
                info = F.cross_entropy(q, codes.to(q.device), reduction="none")
                loss = loss + self.info_weight * info
                logs["info"] = info.mean().detach()
            return LossOutput(loss, logs)

        betas = (0.0, 0.9)
        return [Phase("discriminator", self.discriminator, d_loss, betas=betas),
                Phase("generator", self.generator, g_loss, every=self.n_dis, betas=betas)]

    def save_model(self, out: Path, net: nn.Module, training: dict[str, Any]) -> None:
        T = self.process.num_train_timesteps
        cfg = ModelConfig(
            backbone=GANGenerator.kind, backbone_config=copy.deepcopy(net.config), prediction="gan",
            schedule=vp_schedule_dict(self.process), sample_shape=list(self.shape), num_classes=self.classes,
            null_class=None, data=self.data or None, role="student",
            sampling=SamplingDefaults(sampler="consistency", steps=1, timesteps=[float(T - 1)], guidance=1.0),
            training={"variant": self.variant, "loss": self.loss_kind, "n_dis": self.n_dis, "codes": self.codes,
                      "student_steps": 1, **training})
        save_model(out, cfg, net)


@dataclass
class GANOptions(Options):
    variant: str = opt("auto", "gan, cgan (projection discriminator; needs labelled data), infogan (a categorical "
                               "code), or auto: cgan on labelled data, else gan")
    codes: int = opt(10, "infogan: values of its categorical code (`fewstep sample --code K` picks one)", ge=2,
                     le=4096)
    n_dis: int = opt(5, "discriminator updates per generator update", ge=1, le=1000)
    loss: str = opt("hinge", "hinge (SNGAN, projection cGAN) or ns (non-saturating, the original GAN's)")
    info_weight: float = opt(1.0, "infogan: weight lambda of the mutual-information term", ge=0)
    width: int = opt(64, "channels of the networks' first level (2x and 4x deeper); on vector data the MLPs "
                                "have 4 x width hidden units", ge=4, le=1024)
    z_dim: int = opt(128, "latent dimensions the generator reads (the first entries of the noise)", ge=1,
                     le=2**20)
    steps: int = opt(1, "sampling steps: a GAN samples in one step", ge=1, le=1)

    hints = {"guidance": "a GAN has no teacher to guide; a cGAN samples a class with --class",
             "teacher_steps": "a GAN has no teacher"}

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise FewstepError(f"variant {self.variant!r}: use one of {', '.join(VARIANTS)}")
        if self.loss not in GAN_LOSSES:
            raise FewstepError(f"loss {self.loss!r}: use hinge or ns")
        if self.variant != "infogan" and self.codes != 10:
            raise FewstepError(f"codes {self.codes}: the categorical code is InfoGAN's: add --set variant=infogan, "
                               "or drop codes")
        if self.variant != "infogan" and self.info_weight != 1.0:
            raise FewstepError("info_weight applies to --set variant=infogan only: drop it")

    @classmethod
    def for_tests(cls) -> GANOptions:
        return cls(n_dis=1)  # the width the contract (2-D data: MLPs of 256 units) was measured at


def gan_stages(ctx: RunContext) -> Path:
    o: GANOptions = ctx.options
    x, y = ctx.data
    shape = tuple(x.shape[1:])
    variant = o.variant if o.variant != "auto" else ("cgan" if y is not None else "gan")
    if variant == "cgan" and y is None:
        raise FewstepError(f"variant cgan needs labelled data and {ctx.data_name or 'this data'} has no labels: use "
                           "--set variant=gan, or labelled data (class sub-folders, a labels file)")
    if len(shape) == 3 and (shape[1] % 4 or shape[2] % 4):
        raise FewstepError(f"the GAN's generator up-samples twice, so image sides must divide by 4; the data is "
                           f"{shape[1]}x{shape[2]}: pass --resolution {max(4, round(shape[1] / 4) * 4)}")
    if len(shape) not in (1, 3):
        raise FewstepError(f"a GAN needs images (C, H, W) or vectors (D,), the data has samples of shape {shape}")
    classes = int(y.max()) + 1 if y is not None and len(y) else 0
    from fewstep.data.datasets import dataset_info

    if ctx.data_name and y is not None:
        try:
            classes = max(classes, int(dataset_info(ctx.data_name)[1] or 0))  # a class absent from train still counts
        except FewstepError:
            pass
    method = GAN(shape, classes, o, variant, ctx.data_name, seed=ctx.train_config.seed)
    return ctx.stage(method, STUDENT)


register(Recipe(
    "gan", KIND, gan_stages,
    "the GAN baselines (no teacher): SNGAN, the projection cGAN, InfoGAN's codes; hinge loss, spectral norm, "
    "Adam(0, 0.9), n_dis 5; 1 step.", GANOptions, needs_teacher=False,
    loop_defaults=(("lr", 2e-4), ("warmup", 0), ("grad_clip", 0.0))))
