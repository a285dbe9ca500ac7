"""Distillation methods (issue 4, in progress): each module one method on the shared training loop.

So far: progressive distillation (:mod:`fewstep.distill.progressive`), behind `fewstep distill --method
progressive`.  Guided, consistency distillation/training and reflow are still to do.
"""
