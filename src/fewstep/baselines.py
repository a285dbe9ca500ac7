"""What a user would do instead: sample a diffusers-representable model with diffusers' own schedulers.

The loop is diffusers' (``set_timesteps``, ``init_noise_sigma``, ``scale_model_input``, the UNet, ``step``)
with classifier-free guidance combined on the model output, started from the same per-index initial noise
fewstep's samplers use, so rows compare on common random numbers.
"""

from __future__ import annotations

import time

import torch

from fewstep.errors import FewstepError
from fewstep.generate import SampleResult
from fewstep.models.folder import LoadedModel
from fewstep.samplers import IndexedNoise

DIFFUSERS_SCHEDULERS = ("DDIM", "DPMSolverMultistep", "UniPC", "Euler")


def _scheduler(name: str, config: dict, spacing: str):
    import diffusers

    classes = {"DDIM": diffusers.DDIMScheduler, "DPMSolverMultistep": diffusers.DPMSolverMultistepScheduler,
               "UniPC": diffusers.UniPCMultistepScheduler, "Euler": diffusers.EulerDiscreteScheduler}
    if name not in classes:
        raise FewstepError(f"unknown diffusers scheduler {name!r}: use one of {', '.join(DIFFUSERS_SCHEDULERS)}")
    cfg = {k: v for k, v in config.items() if k != "_class_name"}
    return classes[name].from_config({**cfg, "timestep_spacing": spacing})


@torch.no_grad()
def diffusers_generate(model: LoadedModel, scheduler: str, steps: int, n: int, seed: int = 0,
                       labels: torch.Tensor | None = None, guidance: float = 1.0, spacing: str = "trailing",
                       batch_size: int = 256) -> SampleResult:
    cfg = model.config
    process = cfg.vp_process()
    if cfg.backbone != "unet2d" or process is None or cfg.prediction not in ("eps", "v", "x0"):
        raise FewstepError("diffusers' schedulers need a UNet predicting eps, v or x0 on a discrete VP schedule")
    if cfg.sampling.timesteps is not None:
        raise FewstepError("diffusers' schedulers do not apply to a few-step student")
    unet = model.denoiser.net.unet  # type: ignore[union-attr]
    device = next(unet.parameters()).device
    guided = guidance != 1.0
    if guided and cfg.null_class is None:
        raise FewstepError("guidance needs a model with a null class")
    sched = _scheduler(scheduler, process.to_diffusers(), spacing)
    nfe = 0
    outs = []
    t0 = time.perf_counter()
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        sched.set_timesteps(steps)
        x = IndexedNoise.range(seed, lo, hi).initial(model.sample_shape).to(device) * sched.init_noise_sigma
        y = labels[lo:hi].to(device) if labels is not None else None
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t)
            if guided:
                null = torch.full_like(y, cfg.null_class)
                out_c, out_u = unet(torch.cat([inp, inp]), t, class_labels=torch.cat([y, null])).sample.chunk(2)
                out = out_u + guidance * (out_c - out_u)
            else:
                out = unet(inp, t, class_labels=y if cfg.num_classes else None).sample
            x = sched.step(out, t, x).prev_sample
            nfe += 2 if guided else 1
        outs.append(x.cpu())
    wall = time.perf_counter() - t0
    batches = (n + batch_size - 1) // batch_size
    return SampleResult(torch.cat(outs), labels, f"diffusers:{scheduler}", [float(t) for t in sched.timesteps],
                        guidance, nfe // batches, wall)
