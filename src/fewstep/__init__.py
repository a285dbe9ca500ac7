"""fewstep: train, sample, distill and benchmark few-step diffusion models.

The public API (``import fewstep`` stays cheap: each name is imported on first use)::

    import fewstep

    fewstep.train_teacher("gmm", "runs/gmm", preset="mlp", steps=2000)       # a teacher model folder
    run = fewstep.distill_model("progressive", "runs/pd", teacher="runs/gmm", steps=1, start_steps=8, iters=500)
    model = fewstep.load_model("runs/pd")                  # any model folder; a distill run loads its student
    res = fewstep.sample(model, 16, class_id=None)         # SampleResult: x, labels, nfe, wall time
    row = fewstep.evaluate_model(model)                     # EvalResult: quality against the test split, cost

- ``load_model(path)``: a fewstep folder, a diffusers folder, or a distillation run (its final stage);
- ``sample(model, n, sampler=, steps=, timesteps=, guidance=, class_id=, seed=)``: sampling with the model's
  recorded defaults for what is not given;
- the samplers, pure functions over explicit noise levels: ``sample_ddpm``, ``sample_ddim``, ``sample_euler``,
  ``sample_heun``, ``sample_dpmpp_2m``, ``sample_consistency`` (``SAMPLERS`` by name), and ``spaced_timesteps``;
- ``train_teacher(data, out, ...)`` (``fewstep train``), ``train(method, data, TrainConfig(...), out)`` (the one
  training loop, for any method of :mod:`fewstep.training.method`), ``TrainConfig``;
- ``distill_model(method, out, teacher=, **options)`` (``fewstep distill``); ``methods(kind)``: the registered
  recipes; ``evaluate_model(model, ...)`` (``fewstep evaluate``);
- ``FewstepError``: every user error (one line naming the problem).

``fewstep.distill`` and ``fewstep.evaluate`` are the packages of those names, so the functions are
``distill_model`` and ``evaluate_model``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {  # public name -> (module, attribute)
    "load_model": ("fewstep.models.folder", "load_model"),
    "sample": ("fewstep.api", "sample"),
    "sample_ddpm": ("fewstep.samplers", "sample_ddpm"),
    "sample_ddim": ("fewstep.samplers", "sample_ddim"),
    "sample_euler": ("fewstep.samplers", "sample_euler"),
    "sample_heun": ("fewstep.samplers", "sample_heun"),
    "sample_dpmpp_2m": ("fewstep.samplers", "sample_dpmpp_2m"),
    "sample_consistency": ("fewstep.samplers", "sample_consistency"),
    "SAMPLERS": ("fewstep.samplers", "SAMPLERS"),
    "spaced_timesteps": ("fewstep.diffusion.schedules", "spaced_timesteps"),
    "train": ("fewstep.training.loop", "train"),
    "TrainConfig": ("fewstep.training.loop", "TrainConfig"),
    "train_teacher": ("fewstep.api", "train_teacher"),
    "distill_model": ("fewstep.api", "distill_model"),
    "methods": ("fewstep.training.recipe", "discover"),
    "evaluate_model": ("fewstep.api", "evaluate_model"),
    "FewstepError": ("fewstep.errors", "FewstepError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
