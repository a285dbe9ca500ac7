"""Samplers as pure functions over an explicit list of noise levels, and guidance wrappers."""

from fewstep.samplers.guidance import Guided, NFECounter, guide
from fewstep.samplers.noise import IndexedNoise
from fewstep.samplers.solvers import (
    SAMPLERS,
    SamplerOptions,
    SamplerSpec,
    sample_consistency,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)

__all__ = [
    "SAMPLERS", "Guided", "IndexedNoise", "NFECounter", "SamplerOptions", "SamplerSpec", "guide",
    "sample_consistency", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_euler", "sample_heun",
]
