"""The distillation interface: a registry of methods, their options, and the stages they run on the shared loop.

A method is a :class:`DistillMethod` registered by its module (``register(DistillMethod(...))``); its ``run``
takes a :class:`DistillContext` (teacher, data, options, output folder) and trains one or more *stages*, each a
:class:`~fewstep.training.method.Method` run by the shared loop in its own sub-folder.  The final stage is
always ``OUT/student``: a model folder whose config says how to sample it.  ``--resume`` skips finished stages
and resumes the interrupted one exactly (the loop's checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewstep.errors import FewstepError
from fewstep.io import file_sha256, read_json, write_json
from fewstep.models.folder import LoadedModel, weights_file
from fewstep.training.method import Method, Networks

STUDENT = "student"  # the final stage's folder, for every method


@dataclass
class DistillOptions:
    """What a user chooses on `fewstep distill` (each method reads the fields it needs)."""

    steps: int = 1  # student sampling steps (NFE per sample)
    iters: int = 1000  # optimizer steps per stage
    reparam_iters: int | None = None  # the eps -> v (and guidance) re-parameterization stage (default: iters)
    guidance: float = 1.0  # teacher guidance baked into the student (1: none)
    guidance_range: tuple[float, float] | None = None  # guided: the student's w range; CD: w sampled per example
    loss: str = "huber"  # "l2" or "huber" (pseudo-Huber), where a method offers both
    start_steps: int = 32  # progressive / guided: student steps of the first round
    teacher_steps: int = 50  # CD: the skipping-step grid's N; reflow: teacher solver steps for its pairs
    pairs: int = 4000  # reflow: noise -> sample pairs drawn from the teacher
    preset: str | None = None  # consistency training (no teacher): network preset
    ema_target: float = 0.95  # CD: the target network's EMA decay (Song et al. 2023: 0.95 on CIFAR-10)


@dataclass
class DistillContext:
    """Everything a method's ``run`` needs.  ``teacher`` is None only for methods with ``needs_teacher=False``."""

    teacher: LoadedModel | None
    teacher_folder: Path | None
    data: tuple[torch.Tensor, torch.Tensor | None]
    data_name: str
    out: Path
    options: DistillOptions
    train_config: Any  # fewstep.training.loop.TrainConfig
    resume: bool = False
    train_fn: Callable[..., Any] | None = None  # the shared loop (tests wrap it)
    stages: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] | None = None  # what OUT/distill.json holds (set by `distill`)

    def stage(self, method: Method, name: str, iters: int | None = None,
              data: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> Path:
        """Train ``method`` for ``iters`` (default: options.iters) steps on ``data`` (default: the dataset) into
        ``out/name``; skip it when a resumed run already finished it.  Returns the stage folder (a model folder)."""
        from fewstep.training.loop import TrainConfig, train

        run = self.train_fn or train
        self.begin()
        folder = self.out / name
        cfg: TrainConfig = dataclasses.replace(self.train_config, steps=iters or self.options.iters)
        latest = folder / "checkpoints" / "latest"
        if self.resume and latest.is_file():
            state = read_json(folder / "checkpoints" / latest.read_text().strip() / "state.json", "checkpoint state")
            saved = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
            # unfinished, or finished but killed between the checkpoint and the model folder: the loop completes it
            if state["step"] < state["config"]["steps"] or saved.get("training", {}).get("steps") != state["step"]:
                run(method, data or self.data, cfg, folder, resume=True)
        else:
            if self.resume and folder.exists():  # started but never checkpointed: nothing worth keeping
                shutil.rmtree(folder)
            run(method, data or self.data, cfg, folder)
        config = read_json(folder / "config.json", "stage config")
        self.stages.append({"stage": name, "method": method.name,
                            "wall_seconds": config.get("training", {}).get("wall_seconds")})
        # every stage folder is a model: record what the distillation cost up to and including it
        config["training"] = {**config.get("training", {}), "distill_wall_seconds": self.total_seconds()}
        write_json(folder / "config.json", config)
        return folder

    def total_seconds(self) -> float:
        return round(sum(s["wall_seconds"] or 0.0 for s in self.stages), 1)

    def begin(self) -> None:
        """Write ``OUT/distill.json`` before the first thing worth resuming is written (stages call it)."""
        if self.record is not None and not (self.out / RUN_FILE).is_file():
            write_json(self.out / RUN_FILE, self.record)

    def extra_seconds(self, name: str, seconds: float) -> None:
        """Record time spent outside the loop (e.g. drawing teacher samples) in the distillation total."""
        self.stages.append({"stage": name, "method": name, "wall_seconds": round(seconds, 1)})


class StudentStage:
    """What most stages share: one trainable ``self.student`` (a Denoiser) whose EMA is exported, no hook."""

    student: Any

    def networks(self) -> Networks:
        return Networks(trained={"student": self.student}, frozen=self.frozen())

    def frozen(self) -> dict[str, torch.nn.Module]:
        """The fixed networks the stage's losses use (a teacher): placed on the device, never checkpointed."""
        return {}

    def ema_target(self) -> torch.nn.Module:
        return self.student.net


@dataclass(frozen=True)
class DistillMethod:
    """A registered method: ``run(ctx) -> final student folder`` (``ctx.out / STUDENT``)."""

    name: str
    run: Callable[[DistillContext], Path]
    summary: str
    needs_teacher: bool = True
    needs_data: bool = True


METHODS: dict[str, DistillMethod] = {}


def register(method: DistillMethod) -> DistillMethod:
    if method.name in METHODS:
        raise ValueError(f"distillation method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> DistillMethod:
    import fewstep.distill  # noqa: F401 - importing the package registers every method

    if name not in METHODS:
        raise FewstepError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


@dataclass
class DistillResult:
    student: Path
    stages: list[dict[str, Any]]
    wall_seconds: float


RUN_FILE = "distill.json"


def _run_record(method: str, ctx: DistillContext) -> dict[str, Any]:
    """What a resumed run must share with the original: the method, its options, the teacher's weights, the data."""
    teacher = file_sha256(weights_file(ctx.teacher_folder)) if ctx.teacher_folder is not None else None
    opts = dataclasses.asdict(ctx.options)
    opts["guidance_range"] = list(opts["guidance_range"]) if opts["guidance_range"] else None
    return {"method": method, "options": opts, "teacher": teacher, "data": ctx.data_name,
            "seed": ctx.train_config.seed, "batch": ctx.train_config.batch, "lr": ctx.train_config.lr}


def distill(method: str, ctx: DistillContext) -> DistillResult:
    """Run ``method`` and record the whole distillation (stages, total wall time) in the student's config.

    ``OUT/distill.json`` records the method, options and teacher; a resumed run with anything different is
    refused (it would silently reuse stages built from other settings)."""
    m = get_method(method)
    if m.needs_teacher and ctx.teacher is None:
        raise FewstepError(f"method {method!r} needs --teacher")
    record = _run_record(method, ctx)
    run_file = ctx.out / RUN_FILE
    if ctx.resume and run_file.is_file():
        saved = read_json(run_file, "distillation record")
        diff = [k for k in record if k != "options" and saved.get(k) != record[k]]
        diff += [k for k, v in record["options"].items() if saved.get("options", {}).get(k) != v]
        if diff:
            raise FewstepError(f"{ctx.out} was distilled with other settings ({', '.join(diff)}): resume with the "
                               "same command, or choose a new --out")
    elif ctx.resume and ctx.out.is_dir() and any(ctx.out.iterdir()):
        raise FewstepError(f"{ctx.out} has no {RUN_FILE} (not a fewstep distillation run): choose a new --out")
    ctx.record = record  # written by the first stage, so options a method rejects leave nothing behind
    student = m.run(ctx)
    total = ctx.total_seconds()
    cfg = read_json(student / "config.json", "student config")
    cfg["training"] = {**cfg.get("training", {}), "method": method, "distill_stages": ctx.stages,
                       "distill_wall_seconds": total,
                       "teacher": str(ctx.teacher_folder) if ctx.teacher_folder else None}
    write_json(student / "config.json", cfg)
    return DistillResult(student, list(ctx.stages), total)


# --- losses shared by methods ----------------------------------------------------------------------------
def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Per-sample pseudo-Huber distance sqrt(||a - b||^2 + c^2) - c (Song & Dhariwal 2023, sec. 3.3) with
    c = 0.00054 sqrt(dim) by default."""
    d = a[0].numel()
    c = 0.00054 * math.sqrt(d) if c is None else c
    return torch.sqrt((a - b).pow(2).flatten(1).sum(1) + c * c) - c


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error."""
    return (a - b).pow(2).flatten(1).mean(1)


def distance(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    losses = {"l2": l2, "huber": pseudo_huber}
    if name not in losses:
        raise FewstepError(f"--loss {name!r}: use l2 or huber")
    return losses[name]


