"""Teacher objectives: DDPM (eps / v / x0 prediction), EDM (preconditioned) and flow matching (velocity).

All three are one regression, ``|| net(inputs(x0 + sigma eps, sigma)) - target(x0, eps, sigma) ||^2``, with
the parameterization adapter giving inputs and target; what differs is the *training noise
distribution* of sigma, kept separate from any sampling discretization:
  - ddpm: timesteps uniform on {0..T-1} (Ho et al. 2020), sigma from the discrete schedule;
  - edm:  ln sigma ~ N(-1.2, 1.2^2) (Karras et al. 2022, Table 1), loss weight folded into the target;
  - flow: t ~ U(0, 1) on the straight path (Lipman et al. 2023; Liu et al. 2022), sigma = t / (1 - t).
Class-conditional teachers drop labels to the null class with probability ``p_uncond`` (Ho & Salimans 2022).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.diffusion.param import bcast
from fewstep.diffusion.schedules import NoiseSchedule
from fewstep.errors import FewstepError
from fewstep.models.backbones import build_backbone
from fewstep.models.denoiser import Denoiser
from fewstep.models.folder import ModelConfig, SamplingDefaults, build_denoiser, save_model, vp_schedule_dict
from fewstep.models.scheduler_config import VPProcess
from fewstep.training.method import Batch, Networks, Phase, StepContext

OBJECTIVES = ("ddpm", "edm", "flow")
NoiseDist = Callable[[int, torch.Generator, torch.device], torch.Tensor]


def ddpm_noise(schedule: NoiseSchedule) -> NoiseDist:
    def draw(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        t = torch.randint(0, schedule.num_train_timesteps, (n,), generator=gen, device=device)
        return schedule.sigmas.to(device)[t]
    return draw


def lognormal_noise(p_mean: float = -1.2, p_std: float = 1.2) -> NoiseDist:
    def draw(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        return (p_mean + p_std * torch.randn(n, generator=gen, device=device, dtype=torch.float64)).exp()
    return draw


def flow_noise(schedule: NoiseSchedule) -> NoiseDist:
    lo, hi = schedule.sigma_min, schedule.sigma_max  # keep t inside the grid the sampler uses

    def draw(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        t = torch.rand(n, generator=gen, device=device, dtype=torch.float64)
        t_lo, t_hi = lo / (1 + lo), hi / (1 + hi)
        t = t_lo + (t_hi - t_lo) * t
        return t / (1 - t)
    return draw


def regression_loss(den: Denoiser, noise: NoiseDist, p_uncond: float = 0.1) -> Callable[[Batch, StepContext],
                                                                                        torch.Tensor]:
    """Per-sample MSE between the network output and its parameterization's target."""

    def loss(batch: Batch, ctx: StepContext) -> torch.Tensor:
        x0, y = batch
        gen = ctx.gen
        sigma = noise(x0.shape[0], gen, x0.device)
        eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        x = x0 + bcast(sigma, x0) * eps
        if y is not None and den.null_class is not None and p_uncond > 0:
            drop = torch.rand(y.shape, generator=gen, device=y.device) < p_uncond
            y = torch.where(drop, torch.full_like(y, den.null_class), y)
        out = den.raw(x, sigma, y)
        target = den.param.target(x0, eps, sigma)
        return (out.float() - target.float()).pow(2).flatten(1).mean(1)

    return loss


@dataclass
class TeacherSpec:
    """What to train: objective, prediction, network, classes and data."""

    objective: str = "ddpm"
    prediction: str | None = None  # ddpm: eps (default), v or x0; edm: edm; flow: flow
    backbone: str = "unet2d"
    backbone_config: dict[str, Any] | None = None
    sample_shape: tuple[int, ...] = (1, 8, 8)
    num_classes: int = 0
    p_uncond: float = 0.1
    data: str | None = None
    beta_schedule: str = "linear"


def teacher_config(spec: TeacherSpec) -> ModelConfig:
    if spec.objective not in OBJECTIVES:
        raise FewstepError(f"unknown objective {spec.objective!r}: use one of {', '.join(OBJECTIVES)}")
    if spec.objective == "ddpm":
        prediction = spec.prediction or "eps"
        if prediction not in ("eps", "v", "x0"):
            raise FewstepError(f"--prediction {prediction} does not apply to ddpm: use eps, v or x0")
        schedule = vp_schedule_dict(VPProcess(beta_schedule=spec.beta_schedule, prediction=prediction,
                                              clip_sample=len(spec.sample_shape) == 3))
        sampling = SamplingDefaults(sampler="dpmpp-2m", steps=25)
    else:
        prediction = {"edm": "edm", "flow": "flow"}[spec.objective]
        if spec.prediction not in (None, prediction):
            raise FewstepError(f"--prediction {spec.prediction} does not apply to {spec.objective} (it predicts "
                               f"{prediction}); drop the flag")
        schedule = ({"type": "karras", "num_train_timesteps": 1000, "sigma_min": 0.002, "sigma_max": 80.0}
                    if spec.objective == "edm" else {"type": "flow", "num_train_timesteps": 1000})
        # EDM's own grid: 18 Karras levels from sigma_max to sigma_min (rho 7) are evenly spaced timesteps of this
        # Karras table (t = 999 (17 - i) / 17, fractional), ending at 0.002; trailing integer steps would end at 0.007
        sampling = SamplingDefaults(sampler="heun", steps=18, spacing="linspace",
                                    timesteps=[999 * (17 - i) / 17 for i in range(18)]) \
            if spec.objective == "edm" else SamplingDefaults(sampler="euler", steps=32)
    return ModelConfig(
        backbone=spec.backbone, backbone_config=spec.backbone_config or {}, prediction=prediction,
        schedule=schedule, sample_shape=list(spec.sample_shape), num_classes=spec.num_classes,
        null_class=spec.num_classes if spec.num_classes else None, data=spec.data, role="teacher",
        sampling=sampling, training={"objective": spec.objective},
    )


@dataclass
class TeacherOptions:
    """A teacher to train, as the user names it (``fewstep train`` flags, a bench config's ``teacher.train``)."""

    data: str
    preset: str | None = None  # default: by data shape
    objective: str = "ddpm"
    prediction: str | None = None
    conditional: bool = False  # class-conditional with a null class for classifier-free guidance
    beta_schedule: str = "linear"  # ddpm
    seed: int = 0  # initialization (the loop's seed is TrainConfig.seed)


def build_teacher(opts: TeacherOptions) -> tuple[TeacherMethod, tuple[torch.Tensor, torch.Tensor | None]]:
    """The one place a teacher is built from its options: (method, training data).  Seeds torch's global RNG with
    ``opts.seed`` before initializing the network, so the same options give the same weights everywhere."""
    from fewstep.data.datasets import load_dataset
    from fewstep.data.spec import data_key
    from fewstep.models.backbones import default_preset, preset_backbone

    opts = dataclasses.replace(opts, data=data_key(opts.data))  # a path as given -> its key (absolute, canonical)
    ds = load_dataset(opts.data, "train")
    if opts.conditional and not ds.num_classes:
        raise FewstepError(f"--conditional needs labels and {opts.data} has none (a folder's labels are its class "
                           "sub-folders; an array's its y or --labels): drop --conditional")
    num_classes = ds.num_classes if opts.conditional else 0
    kind, bcfg = preset_backbone(opts.preset or default_preset(ds.sample_shape), ds.sample_shape, num_classes)
    torch.manual_seed(opts.seed)
    method = TeacherMethod(TeacherSpec(objective=opts.objective, prediction=opts.prediction, backbone=kind,
                                       backbone_config=bcfg, sample_shape=ds.sample_shape, num_classes=num_classes,
                                       data=opts.data, beta_schedule=opts.beta_schedule))
    return method, (ds.x, ds.y if num_classes else None)


RESUME_KEYS = ("backbone", "backbone_config", "prediction", "schedule", "data", "num_classes")


def check_resumable(method: TeacherMethod, out: Path) -> None:
    """A run in ``out`` was started with the network, schedule and data ``method`` builds (else it cannot resume)."""
    import json

    from fewstep.io import read_json

    saved = Path(out) / "config.json"
    if not saved.is_file():
        return
    prior = read_json(saved)
    now = json.loads(json.dumps(method.config.to_json()))  # tuples -> lists, as saved
    differ = [k for k in RESUME_KEYS if prior.get(k) != now.get(k)]
    before = (prior.get("data_record") or {}).get("hash")
    if before and method.spec.data is not None:
        from fewstep.data.datasets import data_record

        after = (data_record(method.spec.data) or {}).get("hash")
        if after != before:
            raise FewstepError(f"--resume: the data of {out} has changed since the run started (content hash "
                               f"{before} then, {after} now): restore it, or start a new run (a new --out)")
    if differ:
        raise FewstepError(f"--resume: {out} was started with other settings ({', '.join(differ)}): pass the "
                           "same --data/--preset/--objective/--prediction/--conditional/--beta-schedule")


def train_teacher(opts: TeacherOptions, cfg: Any, out: Path, resume: bool = False) -> Any:
    """Build the teacher ``opts`` names and train it into ``out`` with the loop's ``cfg`` (a TrainConfig); with
    ``resume``, continue the run there (refused if it was started with another network, schedule or data)."""
    from fewstep.training.loop import train

    method, data = build_teacher(opts)
    if resume:
        check_resumable(method, out)
    return train(method, data, cfg, out, resume=resume)


class TeacherMethod:
    """Trains a teacher from scratch with one of the objectives above."""

    def __init__(self, spec: TeacherSpec):
        self.spec = spec
        self.name = f"teacher-{spec.objective}"
        self.config = teacher_config(spec)
        self.denoiser = build_denoiser(self.config, build_backbone(spec.backbone, self.config.backbone_config))

    def networks(self) -> Networks:
        return Networks(trained={"net": self.denoiser})

    def phases(self) -> list[Phase]:
        sched = self.denoiser.schedule  # built here, after the loop placed the denoiser (and its tables)
        noise: NoiseDist = {"ddpm": lambda: ddpm_noise(sched), "edm": lognormal_noise,
                            "flow": lambda: flow_noise(sched)}[self.spec.objective]()
        return [Phase("denoise", self.denoiser.net, regression_loss(self.denoiser, noise, self.spec.p_uncond))]

    def ema_target(self) -> nn.Module:
        return self.denoiser.net

    def save_model(self, out: Path, net: nn.Module, training: dict[str, Any]) -> None:
        from fewstep.data.datasets import data_record

        self.config.training = {"objective": self.spec.objective, **training}
        if self.spec.data is not None and self.config.data_record is None:
            self.config.data_record = data_record(self.spec.data)
        save_model(out, self.config, net)
