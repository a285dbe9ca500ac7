"""Distillation methods, one module each, on the recipe layer (:mod:`fewstep.training.recipe`).

Every module of this package is imported on first use of the registry (``get_method``, ``fewstep distill``) and
registers its method, so adding a method is adding a module: progressive (Salimans & Ho 2022), guided (Meng et
al. 2023), consistency distillation (Song et al. 2023 / LCM), consistency training (Song & Dhariwal 2023),
rectified-flow reflow (Liu et al. 2022 / InstaFlow), distribution matching with a GAN term (DMD2, Yin et al.
2024) and data-free bootstrapping (BOOT, Gu et al. 2023) today.
"""

from fewstep.distill.base import DistillContext, DistillOptions, DistillResult, RunContext, distill, get_method


def methods() -> dict:
    """Every registered distillation method by name (name -> Recipe)."""
    from fewstep.training.recipe import discover

    return discover("distill")


def __getattr__(name: str):
    if name == "METHODS":  # the registry's name before the recipe layer (scripts use it): the discovered methods
        return methods()
    raise AttributeError(f"module 'fewstep.distill' has no attribute {name!r}")


__all__ = ["DistillContext", "DistillOptions", "DistillResult", "RunContext", "distill", "get_method", "methods"]
