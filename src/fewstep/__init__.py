"""fewstep: train, sample, distill and benchmark few-step diffusion models."""

__version__ = "0.1.0"
