"""DMD2: improved distribution matching distillation (Yin et al. 2024, "Improved Distribution Matching Distillation
for Fast Image Synthesis"; reference code tianweiy/DMD2, main/edm/edm_guidance.py and edm_unified_model.py, read
for the loss forms and the update schedule).

Three networks, all initialized from the teacher: the frozen teacher is the *real* score (classifier-free guided at
``--guidance``); a trained *fake* score copy learns the distribution of the generator's samples with the teacher's
own denoising objective; the *generator* (the student) maps noise to images in 1-4 steps.

- Generator: ``x = G(z, t_0)`` in one step from pure noise (t_0 = T - 1).  An eps teacher is first
  re-parameterized to v (progressive's round 0, guidance baked in): eps at t = 999 of a linear schedule amplifies
  errors about 150x (alpha ~ 0.006).  That stage counts in the distillation time.
- Distribution matching (the generator's loss): t ~ U{0.02 T .. 0.98 T}, x_t = x + sigma_t eps; without
  gradients p_r = x - x_real(x_t), p_f = x - x_fake(x_t), g = (p_r - p_f) / mean_CHW |p_r| per sample;
  L_DM = 0.5 mean (x - sg(x - g))^2, so dL/dx = g / numel: x moves toward the real score's denoised image and away
  from the fake one.  No regression loss anywhere.
- Fake score: the teacher's objective (its parameterization's MSE) on sg(x) at noise levels drawn uniformly over
  the T training levels, every level the DM loss queries (DMD2's EDM code; a VP teacher's own distribution), with
  the generator's labels (the fake is never guided).  While the generator's phase runs, the critic answers in
  eval mode (no dropout noise in p_fake).
- GAN: a small head on the fake network's bottleneck features (the UNet's mid block) of x + sigma' eps',
  sigma' over all T levels, trained on real data vs generator samples.  Non-saturating: the head's loss
  softplus(f(sg x)) + softplus(-f(x_real)) (weight ``gan_d``, 1e-2) joins the fake score's loss, so the shared
  encoder learns it too; the generator's softplus(-f(x)) (weight ``gan_g``, 3e-3 as on ImageNet) joins L_DM.  On a
  network with no bottleneck to tap (the 2-D MLP) the GAN term is off, and the student's config says so.
- Two time-scale updates: the generator updates every ``fake_updates`` steps (default 5), the fake score and head
  every step.  One loop step is one fake update; ``iters`` counts those.
- Multi-step students (``--steps K``, K <= 4 in the paper, any K here): timesteps t_k = trailing K of T (999, 749,
  499, 249 for 4).  Backward simulation: k ~ U{0..K-1} per sample; from pure noise, K-step sampling without
  gradients for k steps (x-hat = G(z_t, t), z_next = x-hat + sigma_next eps), then the generator is trained on
  G(z_{t_k}, t_k).  Sampling is the same loop (the ``consistency`` sampler: predict, re-noise with fresh noise),
  returning the last prediction.

Where this follows the reference code but the paper is silent: the normalizer uses |x - x_real| (not the fake's),
the DM timesteps avoid the ends (0.02 T .. 0.98 T), the GAN noise levels cover every timestep.  The head is ours
(DMD2's ImageNet head is sized for 8x8 features): conv3x3-GN-SiLU twice, global average, linear.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.diffusion.param import bcast
from fewstep.diffusion.schedules import spaced_timesteps
from fewstep.distill.base import KIND, STUDENT, Options, Recipe, RunContext, eval_mode, opt, register
from fewstep.distill.progressive import Reparameterize, check_iters
from fewstep.errors import FewstepError
from fewstep.models.denoiser import Denoiser
from fewstep.models.folder import LoadedModel, ModelConfig, SamplingDefaults, load_model, save_model
from fewstep.samplers.guidance import guide
from fewstep.training.method import Batch, LossOutput, Networks, Phase, StepContext
from fewstep.training.processes import is_main


def bottleneck(net: nn.Module) -> nn.Module | None:
    """The module whose output is the network's bottleneck (a diffusers UNet's ``mid_block``), or None."""
    for name, m in net.named_modules():
        if name.split(".")[-1] == "mid_block":
            return m
    return None


def _groups(c: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)


class GANHead(nn.Module):
    """Bottleneck features (B, C, H, W) -> one logit per sample."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(_groups(channels), channels), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(_groups(channels), channels), nn.SiLU())
        self.out = nn.Linear(channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(h).mean((2, 3))).squeeze(1)


class Critic(nn.Module):
    """The fake score network and the GAN head on its bottleneck: one module, so one phase trains both and one
    forward call per micro-batch serves the denoising loss and the discriminator together."""

    def __init__(self, fake: Denoiser, gan: bool, seed: int = 0):
        super().__init__()
        self.fake = fake
        tap = bottleneck(fake.net) if gan else None
        self.head: GANHead | None = None
        self._features: torch.Tensor | None = None
        if tap is not None:
            channels = self._probe_channels(fake, tap)
            with torch.random.fork_rng(devices=[]):  # the head's initialization is a function of the run's seed
                torch.manual_seed(seed)
                self.head = GANHead(channels)
            tap.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any, out: Any) -> None:
        self._features = out[0] if isinstance(out, tuple) else out

    @staticmethod
    def _probe_channels(fake: Denoiser, tap: nn.Module) -> int:
        seen: list[int] = []
        handle = tap.register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).shape[1]))
        try:
            p = next(fake.net.parameters())  # wherever an earlier stage left the teacher's copy
            with torch.no_grad():
                shape = fake.net.sample_shape
                labels = torch.zeros(1, dtype=torch.long, device=p.device) if fake.num_classes else None
                fake.net(torch.zeros(1, *shape, device=p.device, dtype=p.dtype),
                         torch.zeros(1, device=p.device, dtype=p.dtype), labels)
        finally:
            handle.remove()
        return seen[0]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor | None]:
        """(the fake network's raw output, GAN logits or None) at VE state ``x``."""
        self._features = None
        raw = self.fake.raw(x, sigma, cond)
        logits = self.head(self._features) if self.head is not None else None
        self._features = None
        return raw, logits


class DMD2:
    """The DMD2 stage: generator (trained, exported), critic = fake score + GAN head (trained), teacher (frozen)."""

    name = "dmd2"

    def __init__(self, teacher: Denoiser, config: ModelConfig, init: Denoiser, steps: int = 1, guidance: float = 1.0,
                 fake_updates: int = 5, gan: bool = True, gan_g: float = 3e-3, gan_d: float = 1e-2,
                 t_range: tuple[float, float] = (0.02, 0.98), seed: int = 0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.real = guide(self.teacher, guidance if config.null_class is not None else None, config.null_class)
        self.generator = Denoiser(copy.deepcopy(init.net).requires_grad_(True), teacher.schedule, init.prediction,
                                  teacher.num_classes, None)
        fake = Denoiser(copy.deepcopy(teacher.net).requires_grad_(True), teacher.schedule, teacher.prediction,
                        teacher.num_classes, teacher.null_class)
        self.critic = Critic(fake, gan, seed)
        self.gan = self.critic.head is not None
        self.gan_asked = gan
        self.steps, self.guidance, self.fake_updates = steps, guidance, fake_updates
        self.gan_g, self.gan_d, self.t_range = gan_g, gan_d, t_range
        self.base_config = config
        T = teacher.schedule.num_train_timesteps
        self.timesteps = [float(t) for t in spaced_timesteps(steps, T, "trailing")]

    def networks(self) -> Networks:
        return Networks(trained={"generator": self.generator, "critic": self.critic},
                        frozen={"teacher": self.teacher})

    def ema_target(self) -> nn.Module:
        return self.generator.net

    # --- the generator's samples, with backward simulation ------------------------------------------------
    def _sample(self, x0: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
        """G's output at a step k ~ U{0..K-1} of K-step sampling, drawn per sample (the first k steps without
        gradients): every generator update trains every one of the K inputs, not one per batch."""
        sched = self.generator.schedule
        sigmas = sched.sigma(torch.tensor(self.timesteps, dtype=torch.float64)).to(x0.device)
        b = x0.shape[0]
        k = (torch.randint(0, len(self.timesteps), (b,), generator=gen, device=x0.device) if self.steps > 1
             else torch.zeros(b, dtype=torch.long, device=x0.device))
        z = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        x = z * float((1 + sigmas[0] ** 2).sqrt())  # the samplers' start (VP in VE form)
        with torch.no_grad():
            for i in range(int(k.max())):
                x0_hat = self.generator(x, sigmas[i].expand(b), y).x0
                step = x0_hat + float(sigmas[i + 1]) * torch.randn(x.shape, generator=gen, device=x.device,
                                                                  dtype=x.dtype)
                x = torch.where((k > i).view(-1, *[1] * (x.dim() - 1)), step, x)  # k > i: this sample takes step i
        return self.generator(x, sigmas[k], y).x0

    def _dm_sigma(self, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        T = self.teacher.schedule.num_train_timesteps
        lo, hi = int(self.t_range[0] * T), max(int(self.t_range[0] * T) + 1, int(self.t_range[1] * T))
        t = torch.randint(lo, hi, (n,), generator=gen, device=device)
        return self.teacher.schedule.sigmas.to(device)[t]

    def _gan_sigma(self, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        T = self.teacher.schedule.num_train_timesteps
        t = torch.randint(0, T, (n,), generator=gen, device=device)
        return self.teacher.schedule.sigmas.to(device)[t]

    def phases(self) -> list[Phase]:
        def generator_loss(batch: Batch, ctx: StepContext) -> LossOutput:
            with eval_mode(self.critic):  # the critic only answers here: no dropout noise in p_fake or the logits
                return _generator_loss(batch, ctx)

        def _generator_loss(batch: Batch, ctx: StepContext) -> LossOutput:
            x0, y = batch
            gen = ctx.gen
            x = self._sample(x0, y, gen)
            ctx.shared["samples"] = x.detach()
            b = x.shape[0]
            sigma = self._dm_sigma(b, gen, x.device)
            x_t = x.detach() + bcast(sigma, x) * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            with torch.no_grad():
                p_real = x.detach() - self.real(x_t, sigma, y).x0
            if self.gan:  # one critic call: the fake's prediction at x_t (no gradient) and the logits of noised x
                s_gan = self._gan_sigma(b, gen, x.device)
                x_gan = x + bcast(s_gan, x) * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
                raw, logits = self.critic(torch.cat([x_t, x_gan]), torch.cat([sigma, s_gan]),
                                          None if y is None else torch.cat([y, y]))
                fake_x0 = self.critic.fake.param.predict(raw[:b].detach(), x_t, sigma).x0
                g_gan = F.softplus(-logits[b:])
            else:
                with torch.no_grad():
                    raw, _ = self.critic(x_t, sigma, y)
                    fake_x0 = self.critic.fake.param.predict(raw, x_t, sigma).x0
                g_gan = torch.zeros(b, device=x.device)
            p_fake = x.detach() - fake_x0.detach()
            norm = p_real.abs().flatten(1).mean(1).clamp(min=1e-8)
            grad = torch.nan_to_num((p_real - p_fake) / bcast(norm, x))
            dm = 0.5 * (x - (x - grad).detach()).pow(2).flatten(1).mean(1)
            logs = {"dm": dm.mean().detach()}
            if self.gan:
                logs["g_gan"] = g_gan.mean().detach()
            return LossOutput(dm + self.gan_g * g_gan, logs)

        def critic_loss(batch: Batch, ctx: StepContext) -> LossOutput:
            x0, y = batch
            gen = ctx.gen
            if "samples" in ctx.shared:  # this step updated the generator: the fake learns those same samples
                x = ctx.shared["samples"]
            else:
                with torch.no_grad():
                    x = self._sample(x0, y, gen)
            b = x.shape[0]
            sigma = self._gan_sigma(b, gen, x.device)  # every level the DM loss queries (as DMD2's EDM code)
            eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            x_t = x + bcast(sigma, x) * eps
            fake = self.critic.fake
            target = fake.param.target(x, eps, sigma)
            if not self.gan:
                raw, _ = self.critic(x_t, sigma, y)
                return LossOutput((raw.float() - target.float()).pow(2).flatten(1).mean(1))
            s_gan = self._gan_sigma(2 * b, gen, x.device)
            both = torch.cat([x, x0])  # generated (detached) and real
            noised = both + bcast(s_gan, both) * torch.randn(both.shape, generator=gen, device=x.device,
                                                             dtype=x.dtype)
            cond = None if y is None else torch.cat([y, y, y])
            raw, logits = self.critic(torch.cat([x_t, noised]), torch.cat([sigma, s_gan]), cond)
            denoise = (raw[:b].float() - target.float()).pow(2).flatten(1).mean(1)
            d_fake, d_real = logits[b:2 * b], logits[2 * b:]
            d_loss = F.softplus(d_fake) + F.softplus(-d_real)
            return LossOutput(denoise + self.gan_d * d_loss,
                              {"denoise": denoise.mean().detach(), "d_real": torch.sigmoid(d_real).mean().detach(),
                               "d_fake": torch.sigmoid(d_fake).mean().detach()})

        return [Phase("generator", self.generator, generator_loss, every=self.fake_updates),
                Phase("critic", self.critic, critic_loss)]

    def save_model(self, out: Path, net: nn.Module, training: dict[str, Any]) -> None:
        cfg = copy.deepcopy(self.base_config)
        cfg.prediction, cfg.role, cfg.null_class, cfg.boundary = self.generator.prediction, "student", None, None
        if cfg.schedule.get("type") == "vp":  # sampled without clipping, as it was trained
            cfg.schedule = {**cfg.schedule, "clip_sample": False, "thresholding": False}
        cfg.sampling = SamplingDefaults(sampler="consistency", steps=self.steps, timesteps=list(self.timesteps),
                                        guidance=1.0)
        gan = "on" if self.gan else ("off: the network has no bottleneck to tap" if self.gan_asked else "off")
        cfg.training = {**cfg.training, "distilled_guidance": self.guidance, "student_steps": self.steps,
                        "fake_updates": self.fake_updates, "gan": gan, "trained_timesteps": list(self.timesteps),
                        **training}
        save_model(out, cfg, net)


@dataclass
class DMD2Options(Options):
    steps: int = opt(1, "generator steps (NFE per sample); K > 1 trains with backward simulation", ge=1, le=16)
    guidance: float = opt(1.0, "classifier-free guidance of the real score (the teacher; needs a null class)", ge=0)
    fake_updates: int = opt(5, "fake-score (and GAN head) updates per generator update (two time-scale rule)", ge=1)
    gan: bool = opt(True, "the GAN term (a head on the fake score's bottleneck; off where there is none)")
    gan_g: float = opt(3e-3, "weight of the generator's GAN loss", ge=0)
    gan_d: float = opt(1e-2, "weight of the head's GAN loss in the fake score's loss", ge=0)
    reparam_iters: int | None = opt(None, "steps of the eps -> v re-parameterization stage (default: iters / "
                                          "fake_updates)", ge=1)

    hints = {"guidance_range": "dmd2 distils one guidance scale (--guidance W)",
             "teacher_steps": "dmd2 needs no teacher ODE steps: it matches distributions"}

    def validate(self) -> None:
        check_iters("reparam_iters", self.reparam_iters)
        if not self.gan and (self.gan_g != 3e-3 or self.gan_d != 1e-2):
            raise FewstepError("gan_g and gan_d weigh the GAN term, which gan=false turns off: drop them, or turn the "
                               "GAN term on")

    def check_teacher(self, teacher: LoadedModel) -> None:
        if self.guidance != 1.0 and teacher.config.null_class is None:
            raise FewstepError(f"guidance {self.guidance:g} needs a class-conditional teacher with a null class: "
                               "drop --guidance")
        if teacher.denoiser.takes_guidance or teacher.config.role == "student" or teacher.config.boundary:
            raise FewstepError("dmd2 distils a diffusion teacher and this model is a distilled student: distil its "
                               "teacher instead")

    @classmethod
    def for_tests(cls) -> DMD2Options:
        return cls(steps=1, fake_updates=2)


def dmd2_stages(ctx: RunContext) -> Path:
    o: DMD2Options = ctx.options
    model = ctx.teacher
    assert model is not None
    o.check_teacher(model)
    init = model.denoiser
    if model.config.prediction == "eps":
        stage = Reparameterize(model.denoiser, model.config, o.guidance)
        iters = o.reparam_iters or max(1, ctx.iters // o.fake_updates)
        init = load_model(ctx.stage(stage, "round_reparam", iters, measure=False)).denoiser
    method = DMD2(model.denoiser, model.config, init, o.steps, o.guidance, o.fake_updates, o.gan, o.gan_g, o.gan_d,
                  seed=ctx.train_config.seed)
    if o.gan and not method.gan and is_main():
        print("note: dmd2's GAN term is off: the network has no bottleneck to tap (a UNet's mid block)",
              file=sys.stderr)
    return ctx.stage(method, STUDENT)


register(Recipe(
    "dmd2", KIND, dmd2_stages,
    "Yin et al. 2024: distribution matching (real vs fake score) plus a GAN head on the fake score; 1-4 steps.",
    DMD2Options))
