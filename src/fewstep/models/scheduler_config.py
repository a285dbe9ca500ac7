"""Read a diffusers scheduler config: every field that changes the math becomes fewstep's own terms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fewstep.diffusion.param import DIFFUSERS_PREDICTION, make_x0_clip
from fewstep.diffusion.schedules import NoiseSchedule, alphas_cumprod_from_betas, make_betas
from fewstep.errors import FewstepError

# Scheduler classes whose config describes a discrete VP (DDPM-family) training process.
VP_SCHEDULERS = {
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
    "DEISMultistepScheduler", "DDPMWuerstchenScheduler", "LCMScheduler", "TCDScheduler",
}


@dataclass(frozen=True)
class VPProcess:
    """The training process of a discrete VP teacher, as a diffusers scheduler config states it."""

    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    trained_betas: tuple[float, ...] | None = None
    rescale_betas_zero_snr: bool = False
    prediction: str = "eps"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    variance_type: str = "fixed_small"

    def alphas_cumprod(self) -> torch.Tensor:
        betas = make_betas(
            self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end,
            list(self.trained_betas) if self.trained_betas else None, self.rescale_betas_zero_snr,
        )
        return alphas_cumprod_from_betas(betas)

    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_alphas_cumprod(self.alphas_cumprod())

    def x0_clip(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return make_x0_clip(self.clip_sample, self.clip_sample_range, self.thresholding,
                            self.dynamic_thresholding_ratio, self.sample_max_value)

    @staticmethod
    def from_diffusers(cfg: dict[str, Any]) -> VPProcess:
        cls = cfg.get("_class_name", "DDPMScheduler")
        if cls not in VP_SCHEDULERS:
            raise FewstepError(f"scheduler {cls} is not a discrete DDPM-family scheduler fewstep can read")
        pred = cfg.get("prediction_type", "epsilon")
        if pred not in DIFFUSERS_PREDICTION:
            raise FewstepError(f"prediction_type {pred!r} is not supported: use epsilon, v_prediction or sample")
        variance = cfg.get("variance_type") or "fixed_small"
        if variance not in ("fixed_small", "fixed_large", "fixed_small_log", "fixed_large_log"):
            raise FewstepError(f"variance_type {variance!r} (learned variance) is not supported")
        betas = cfg.get("trained_betas")
        return VPProcess(
            beta_schedule=cfg.get("beta_schedule", "linear"),
            num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
            beta_start=float(cfg.get("beta_start", 0.0001)),
            beta_end=float(cfg.get("beta_end", 0.02)),
            trained_betas=tuple(betas) if betas else None,
            rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
            prediction=DIFFUSERS_PREDICTION[pred],
            # DDPM/DDIMScheduler default clip_sample to True; other schedulers have no such field.
            clip_sample=bool(cfg.get("clip_sample", cls in ("DDPMScheduler", "DDIMScheduler"))),
            clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
            thresholding=bool(cfg.get("thresholding", False)),
            dynamic_thresholding_ratio=float(cfg.get("dynamic_thresholding_ratio", 0.995)),
            sample_max_value=float(cfg.get("sample_max_value", 1.0)),
            variance_type="fixed_large" if variance.startswith("fixed_large") else "fixed_small",
        )

    def to_diffusers(self) -> dict[str, Any]:
        """A DDPMScheduler config that reproduces this process."""
        inv = {v: k for k, v in DIFFUSERS_PREDICTION.items()}
        return {
            "_class_name": "DDPMScheduler", "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule, "beta_start": self.beta_start, "beta_end": self.beta_end,
            "trained_betas": list(self.trained_betas) if self.trained_betas else None,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr, "prediction_type": inv[self.prediction],
            "clip_sample": self.clip_sample, "clip_sample_range": self.clip_sample_range,
            "thresholding": self.thresholding, "dynamic_thresholding_ratio": self.dynamic_thresholding_ratio,
            "sample_max_value": self.sample_max_value, "variance_type": self.variance_type,
            "timestep_spacing": "trailing",
        }
