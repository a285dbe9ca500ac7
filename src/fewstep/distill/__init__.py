"""Distillation methods (issue 4, in progress): each module one method on the shared training loop.

So far: progressive distillation (:mod:`fewstep.distill.progressive`), library only; no `fewstep distill`
command yet.
"""
