"""Fine-tuning, personalization and erasure methods, one module each, on the same recipe layer as distillation
(:mod:`fewstep.training.recipe`): a module registers ``Recipe(name, "finetune", run, summary, Options)`` and is
found without a list; its runs record ``OUT/finetune.json`` and resume like a distillation.  None yet.
"""
