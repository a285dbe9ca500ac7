"""Read a diffusers scheduler config: every field that changes the math becomes fewstep's own terms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import ConfigDict, Field, model_validator

from fewstep.diffusion.param import DIFFUSERS_PREDICTION, make_x0_clip
from fewstep.diffusion.schedules import NoiseSchedule, alphas_cumprod_from_betas, make_betas
from fewstep.errors import FewstepError
from fewstep.schema import FieldProblem, PosInt, Strict, check

# Scheduler classes whose config describes a discrete VP (DDPM-family) training process.
VP_SCHEDULERS = {
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
    "DEISMultistepScheduler", "DDPMWuerstchenScheduler", "LCMScheduler", "TCDScheduler",
}


Beta = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, lt=1,
                               description="a number in (0, 1)")]
Positive = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, description="a finite number > 0")]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]  # = diffusion.schedules.BETA_SCHEDULES


class VPFields(Strict):
    """The fields of a discrete VP process, in a fewstep config's ``schedule`` (with ``type: vp``) and in a diffusers
    scheduler config (whose other keys are diffusers' business)."""

    beta_schedule: BetaSchedule = Field("linear", description="linear, scaled_linear or squaredcos_cap_v2")
    num_train_timesteps: PosInt = Field(1000, description="a whole number >= 1")
    beta_start: Beta = 0.0001
    beta_end: Beta = 0.02
    trained_betas: list[Beta] | None = Field(None, min_length=1, description="a list of numbers in (0, 1), one per "
                                                                             "training timestep, or null")
    rescale_betas_zero_snr: bool = Field(False, description="true or false")
    clip_sample: bool = Field(False, description="true or false")
    clip_sample_range: Positive = 1.0
    thresholding: bool = Field(False, description="true or false")
    dynamic_thresholding_ratio: float = Field(0.995, strict=True, allow_inf_nan=False, gt=0, le=1,
                                              description="a number in (0, 1]")
    sample_max_value: Positive = 1.0
    variance_type: Literal["fixed_small", "fixed_large"] = Field("fixed_small", description="fixed_small or "
                                                                                            "fixed_large")

    @model_validator(mode="after")
    def _betas(self) -> VPFields:
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise FieldProblem("trained_betas", self.trained_betas, f"give one beta per training timestep: "
                               f"{len(self.trained_betas)} given, num_train_timesteps is {self.num_train_timesteps}")
        if self.trained_betas is None and self.beta_schedule != "squaredcos_cap_v2" and \
                not self.beta_start < self.beta_end:
            raise FieldProblem("beta_start", self.beta_start, f"give a beta_start below beta_end ({self.beta_end})")
        return self


class VPSchedule(VPFields):
    """A fewstep config's ``schedule`` for a discrete VP model."""

    type: Literal["vp"]


class DiffusersScheduler(VPFields):
    """What fewstep reads of a diffusers scheduler config; the other keys (timestep_spacing, steps_offset, ...) are
    how diffusers samples, not the training process."""

    model_config = ConfigDict(strict=True, extra="ignore")
    variance_type: str | None = Field(None, description="fixed_small or fixed_large")  # checked below, by name
    prediction_type: str = "epsilon"
    clip_sample_range: Positive = 1.0
    sample_max_value: Positive = 1.0


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
    def from_diffusers(cfg: dict[str, Any], where: str = "scheduler config") -> VPProcess:
        """The process a diffusers scheduler config describes; a value of the wrong type or out of range is one line
        naming ``where`` (the file) and the field."""
        cls = cfg.get("_class_name", "DDPMScheduler")
        if cls not in VP_SCHEDULERS:
            raise FewstepError(f"{where}: _class_name = {cls!r}: not a discrete DDPM-family scheduler fewstep can "
                               "read (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler and their family; no other "
                               "class is looked up)")
        check(DiffusersScheduler, cfg, where)
        pred = cfg.get("prediction_type", "epsilon")
        if pred not in DIFFUSERS_PREDICTION:
            raise FewstepError(f"{where}: prediction_type {pred!r} is not supported: use epsilon, v_prediction or "
                               "sample")
        variance = cfg.get("variance_type") or "fixed_small"
        if variance not in ("fixed_small", "fixed_large", "fixed_small_log", "fixed_large_log"):
            raise FewstepError(f"{where}: variance_type {variance!r} (learned variance) is not supported: use "
                               "fixed_small or fixed_large")
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
