"""Experiment trackers for the loop's logged metrics (``--log-with``), through accelerate's trackers.

Nothing is required by default, and nothing contacts the network by default: tensorboard writes event files into
the run folder (``OUT/fewstep/``); wandb runs offline (``mode="offline"``, files in ``OUT/wandb/``, upload later
with ``wandb sync``) unless the user set ``WANDB_MODE`` or ``WANDB_API_KEY``.  No torch here: the command line
imports the help text before torch loads.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from fewstep.errors import FewstepError

TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}  # name -> packages, any one
PROJECT = "fewstep"  # tensorboard: the folder under the run folder; wandb: the project
LOG_WITH_HELP = ("Also send the logged metrics to a tracker through accelerate: tensorboard (event files in "
                 "OUT/fewstep/) or wandb (offline unless WANDB_MODE or WANDB_API_KEY is set); needs its package.")


def check_tracker(name: str | None) -> None:
    """One-line error for an unknown tracker or one whose package is not installed."""
    if name is None:
        return
    if name not in TRACKERS:
        raise FewstepError(f"--log-with {name!r}: use {' or '.join(TRACKERS)}")
    if not any(importlib.util.find_spec(p) is not None for p in TRACKERS[name]):
        raise FewstepError(f"--log-with {name} needs `pip install {TRACKERS[name][0]}`")


def tracker_kwargs(name: str, out: Path, resume_step: int | None) -> dict[str, dict[str, Any]]:
    """accelerate ``init_trackers`` keyword arguments of tracker ``name`` for the run in ``out``; a run resumed from
    its checkpoint at ``resume_step`` drops what it logged after that step (as metrics.jsonl does)."""
    if name == "tensorboard":
        return {"tensorboard": {"purge_step": resume_step + 1}} if resume_step is not None else {}
    kw: dict[str, Any] = {"name": out.name, "dir": str(out)}
    if not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")):
        kw["mode"] = "offline"
    return {"wandb": kw}
