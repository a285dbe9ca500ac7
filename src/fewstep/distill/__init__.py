"""Distillation methods, one module each, all behind :mod:`fewstep.distill.base` (registry, options, stages).

Importing this package registers every method: progressive (Salimans & Ho 2022), guided (Meng et al. 2023),
consistency distillation (Song et al. 2023 / LCM), consistency training (Song & Dhariwal 2023) and rectified-flow
reflow (Liu et al. 2022 / InstaFlow).
"""

from importlib import import_module

from fewstep.distill.base import METHODS, DistillContext, DistillOptions, DistillResult, distill, get_method

for _module in ("progressive", "guided", "consistency", "ct", "reflow"):
    import_module(f"fewstep.distill.{_module}")

__all__ = ["METHODS", "DistillContext", "DistillOptions", "DistillResult", "distill", "get_method"]
