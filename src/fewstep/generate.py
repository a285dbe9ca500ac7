"""Sampling a loaded model: timesteps, classes, initial noise, guidance, batching, NFE and timing.

This sits above ``models`` and ``samplers``: it turns user-level choices (a sampler name, ``--steps`` with a
spacing or explicit timesteps, a class, a guidance scale, a seed) into the pure sampler call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep.diffusion.param import ONE_EVALUATION
from fewstep.diffusion.schedules import grid_timesteps, spaced_timesteps
from fewstep.errors import FewstepError
from fewstep.images import check_finite_samples
from fewstep.models.denoiser import Cond
from fewstep.models.folder import LoadedModel
from fewstep.samplers import SAMPLERS, IndexedNoise, NFECounter, SamplerOptions, guide


@dataclass
class SampleResult:
    """Samples in the data range, their labels, and what they cost."""

    x: torch.Tensor  # (N, *sample_shape)
    labels: torch.Tensor | None
    sampler: str
    timesteps: list[float]
    guidance: float
    nfe: int  # network evaluations per sample (a guided step counts 2)
    wall_seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.x.shape[0] / self.wall_seconds if self.wall_seconds > 0 else float("inf")


def resolve_timesteps(model: LoadedModel, steps: int | None = None, spacing: str | None = None,
                      timesteps: list[float] | None = None) -> list[float]:
    """Explicit timesteps win; then ``steps`` with ``spacing``; then the model's own recorded defaults."""
    T = model.denoiser.schedule.num_train_timesteps
    d = model.config.sampling
    if timesteps is not None:
        if steps is not None:
            raise FewstepError("give either --steps or --timesteps, not both")
        return [float(t) for t in timesteps]
    if steps is None and d.timesteps is not None and spacing is None:
        return [float(t) for t in d.timesteps]
    # `steps is None`, not `steps or`: --steps 0 must fail, not silently mean the default
    n, spacing = d.steps if steps is None else steps, spacing or d.spacing
    if spacing == "grid":  # a consistency student: on the grid it was trained on (LCM's scheduler)
        grid = model.config.training.get("grid_steps")
        if type(grid) is not int or grid < 1:
            raise FewstepError("--spacing grid: this model records no training grid (consistency students do): use "
                               "trailing, leading or linspace")
        return grid_timesteps(n, T, grid)
    return [float(t) for t in spaced_timesteps(n, T, spacing)]


def class_labels(model: LoadedModel, n: int, class_id: int | None) -> torch.Tensor | None:
    """Labels for n samples: all ``class_id``, or cycling through the classes; None for unconditional models."""
    k = model.config.num_classes
    if not k:
        if class_id is not None:
            raise FewstepError("--class given but the model is unconditional: drop --class")
        return None
    if class_id is None:
        return torch.arange(n) % k
    if not 0 <= class_id < k:
        raise FewstepError(f"--class {class_id} is outside the model's classes 0..{k - 1}")
    return torch.full((n,), class_id, dtype=torch.long)


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise FewstepError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")


@torch.no_grad()
def generate(model: LoadedModel, sampler: str, timesteps: list[float], n: int, seed: int = 0,
             labels: torch.Tensor | None = None, guidance: float = 1.0, eta: float = 0.0,
             latents: torch.Tensor | None = None, batch_size: int = 256, start_index: int = 0,
             code: int | None = None) -> SampleResult:
    """Draw ``n`` samples.  Sample ``i`` uses noise seeded by ``(seed, start_index + i)``, so it does not
    depend on ``batch_size``; ``latents`` (unit-variance eps, shape (n, *sample_shape)) replaces that noise.  ``code``
    picks an InfoGAN generator's categorical code (the noise's code entry is set to it; nothing else changes)."""
    check_sampler(sampler)
    codes = int(getattr(model.denoiser.net, "codes", 0) or 0)
    if code is not None and not codes:
        raise FewstepError("--code picks an InfoGAN's categorical code and this model has none (a GAN distilled with "
                           "--set variant=infogan has one): drop --code (--class picks a class)")
    if code is not None and not 0 <= code < codes:
        raise FewstepError(f"--code {code} is outside the model's codes 0..{codes - 1}")
    if n < 1:
        raise FewstepError(f"--n {n}: ask for at least one sample")
    if batch_size < 1:
        raise FewstepError(f"--batch-size {batch_size}: give at least 1")
    spec = SAMPLERS[sampler]
    den = model.denoiser
    shape = model.sample_shape
    if latents is not None and tuple(latents.shape) != (n, *shape):
        raise FewstepError(f"--latents has shape {tuple(latents.shape)}, expected {(n, *shape)} (n={n})")
    if latents is not None and not torch.isfinite(latents).all():
        raise FewstepError(f"--latents holds {int((~torch.isfinite(latents)).sum())} NaN or infinite values: give "
                           "finite noise")
    w_input = model.denoiser.takes_guidance
    if w_input:
        lo, hi = model.config.guidance_range or (guidance, guidance)
        if not lo - 1e-9 <= guidance <= hi + 1e-9:
            raise FewstepError(f"--guidance {guidance}: this student was distilled for guidance scales {lo}..{hi}")
    elif guidance != 1.0 and model.config.null_class is None:
        baked = model.config.training.get("distilled_guidance")
        if baked is not None and model.config.num_classes:
            raise FewstepError(f"--guidance {guidance:g}: this student was distilled from the teacher at guidance "
                               f"{baked:g} (baked in; its unconditional branch was never trained): drop --guidance, "
                               "or distill again with --guidance W, or with guided distillation for any scale")
        raise FewstepError("--guidance needs a class-conditional model trained with a null class "
                           f"(this one has {model.config.num_classes} classes and none)")
    T = den.schedule.num_train_timesteps
    if model.config.prediction in ONE_EVALUATION and [float(t) for t in timesteps] != [float(T - 1)]:
        what = "a BOOT student" if model.config.prediction == "boot" else "a GAN"
        raise FewstepError(f"{what} maps the starting noise to a sample in one evaluation from t = {T - 1}: sample "
                           "it with its defaults (no --steps/--timesteps/--spacing)")
    trained = model.config.training.get("trained_timesteps")  # a generator trained at these inputs only (dmd2)
    if trained and [float(t) for t in timesteps] != [float(t) for t in trained]:
        raise FewstepError(f"this student was trained to sample at timesteps {trained} only (its generator never saw "
                           f"inputs at {[round(float(t), 2) for t in timesteps]}): sample it with its defaults (no "
                           "--steps/--timesteps/--spacing), or distil it again with --steps K")
    if eta != 0.0 and sampler != "ddim":
        raise FewstepError(f"--eta applies to the ddim sampler only, not {sampler}")
    sigmas = den.schedule.sampling_sigmas(timesteps)
    device = next(den.parameters()).device
    # a guidance-conditioned student takes w as an input: one evaluation per step, no unconditional pass
    counter = NFECounter(den if w_input else guide(den, guidance, model.config.null_class))
    outs = []
    t0 = time.perf_counter()
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        source = IndexedNoise.range(seed, start_index + lo, start_index + hi)
        noise = latents[lo:hi].float() if latents is not None else source.initial(shape)
        if code is not None:
            from fewstep.models.generator import code_latent

            noise = noise.clone()
            noise.view(noise.shape[0], -1)[:, -1] = code_latent(code, codes)
        opts = SamplerOptions(eta=eta, clip_x0=model.config.x0_clip(), ddpm_variance=model.config.ddpm_variance(),
                              step_noise=source.step if spec.stochastic else None)
        cond = labels[lo:hi].to(device) if labels is not None else None
        if w_input:
            cond = Cond(cond, torch.full((hi - lo,), float(guidance), device=device))
        outs.append(spec.fn(counter, noise.to(device), sigmas, cond, opts).cpu())
    wall = time.perf_counter() - t0
    batches = (n + batch_size - 1) // batch_size
    x = torch.cat(outs)
    w_note = f"the guidance scale {guidance:g} may be too large, " if guidance != 1.0 else ""
    check_finite_samples(x, f"the sampler diverged: {w_note}or the model's weights or its config ({sampler} at "
                            f"{len(timesteps)} steps) do not fit each other")
    return SampleResult(x, labels, sampler, list(timesteps), guidance, counter.nfe // max(1, batches),
                        wall)


def sample_model(model: LoadedModel | str | Path, n: int = 64, *, sampler: str | None = None, steps: int | None = None,
                 spacing: str | None = None, timesteps: list[float] | None = None, guidance: float | None = None,
                 class_id: int | None = None, seed: int = 0, eta: float = 0.0, latents: torch.Tensor | None = None,
                 batch_size: int = 256, code: int | None = None) -> SampleResult:
    """Sample a model (a loaded one or any folder :func:`~fewstep.models.folder.load_model` takes) the way ``fewstep
    sample`` does: what is not given comes from the model's recorded defaults (sampler, steps or timesteps,
    guidance); labels cycle through the classes unless ``class_id`` is given; ``latents`` (n, *shape) replace the
    seeded noise; ``code`` picks an InfoGAN's code."""
    if not isinstance(model, LoadedModel):
        from fewstep.models.folder import load_model

        model = load_model(model)
    d = model.config.sampling
    ts = resolve_timesteps(model, steps, spacing, timesteps)
    if latents is not None and latents.ndim > 0:
        n = latents.shape[0]
    return generate(model, sampler or d.sampler, ts, n, seed=seed, labels=class_labels(model, n, class_id),
                    guidance=d.guidance if guidance is None else guidance, eta=eta, latents=latents,
                    batch_size=batch_size, code=code)
