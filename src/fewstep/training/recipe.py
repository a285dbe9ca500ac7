"""The recipe layer every kind of training method shares: distillation, fine-tuning and alignment.

A *recipe* is a registered method of one *kind* (``"distill"``, ``"finetune"``, ...): its name, its ``run``
function, a one-line summary, what it needs (a teacher, data) and its own options, a dataclass whose fields carry
defaults and a help line each (:func:`opt`) and which validates itself (:meth:`Options.validate`).

- **Found without a list**: every module of a kind's package (``fewstep.distill``, ``fewstep.finetune``) is
  imported on first use and registers itself (``register(Recipe(...))``), so a new method is one new module.
- **One namespace of options**: a recipe's own options and the loop's (:class:`LoopOptions`: iters, batch, lr,
  warmup, ema_decay, ...) are set together by name, with precedence (lowest first) defaults, a YAML file, named
  values (the CLI's flags, the Python API's keywords), ``--set key=value`` (:func:`resolve_options`).  A name the
  recipe does not have is an error that lists the ones it has.
- **Stages**: ``run(ctx)`` trains one or more stages, each a run of the shared loop in ``OUT/<stage>``
  (:meth:`RunContext.stage`); the final stage is ``OUT/student``.  ``--resume`` skips finished stages and resumes
  the interrupted one exactly.  Time spent inside and outside the loop adds up to the run's time.
- **The run record** ``OUT/<kind>.json`` (``distill.json`` for distillation): the recipe, its options, the loop's
  settings, the teacher's weights and the data.  A resumed run with other settings is refused, and a record
  written before this layer existed (every method's options in one mapping) still resumes with the same command.

Methods never import the CLI or evaluation; the training loop knows no recipe.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import pkgutil
import shutil
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from fewstep.errors import FewstepError
from fewstep.io import file_sha256, is_orphan, read_json, read_yaml, remove_orphans, write_json
from fewstep.models.folder import FINAL_STAGE, LoadedModel, model_folder, weights_file
from fewstep.training.method import Method
from fewstep.training.processes import barrier, expected_processes, is_main

STUDENT = FINAL_STAGE  # the final stage's folder, for every recipe
KIND_PACKAGES = {"distill": "fewstep.distill", "finetune": "fewstep.finetune"}
RESERVED = ("method", "kind", "teacher", "data", "data_hash")  # names of the run record's own entries


# --- options ---------------------------------------------------------------------------------------------
def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,  # noqa: A002
        le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with a default, the help line ``--method NAME --help`` prints, and the bounds its value
    must keep (``ge``/``gt``/``le``/``lt``), checked where options are resolved, before anything is written."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"help": help, "bounds": bounds})


_BOUND_TEXT = {"ge": ">= {}", "gt": "> {}", "le": "<= {}", "lt": "< {}"}
_BOUND_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b,
             "lt": lambda v, b: v < b}


def check_bounds(value: Any, f: dataclasses.Field, where: str) -> None:
    """``value`` keeps the bounds of option field ``f`` (each number of a tuple does)."""
    bounds = f.metadata.get("bounds") or {}
    if not bounds or value is None:
        return
    for v in value if isinstance(value, tuple) else (value,):
        if not all(_BOUND_OK[k](v, b) for k, b in bounds.items()):
            allowed = " and ".join(_BOUND_TEXT[k].format(f"{b:g}") for k, b in bounds.items())
            raise FewstepError(f"{where}: {value!r} is out of range (give a value {allowed})")


@dataclass
class Options:
    """Base of a recipe's options: a dataclass of fields made with :func:`opt`.

    ``validate`` raises :class:`FewstepError` with one line naming the option; ``for_tests`` gives options
    sized for the contract test (a tiny 2-D teacher, a few dozen iterations); ``hints`` names options of other
    methods a user may reach for, with what to do instead."""

    hints: ClassVar[dict[str, str]] = {}

    def validate(self) -> None:
        """Check values that need no teacher or data (those are checked when the run starts)."""

    def check_teacher(self, teacher: LoadedModel) -> None:
        """Check values against the loaded teacher, before anything is written (a grid finer than its timesteps)."""

    @classmethod
    def for_tests(cls) -> Options:
        return cls()


@dataclass
class LoopOptions(Options):
    """The shared loop's options, in every recipe's namespace (``iters`` is the loop's steps per stage)."""

    iters: int = opt(1000, "optimizer steps per stage", ge=1)
    batch: int = opt(64, "global batch size (split across processes and --grad-accum micro-batches)", ge=1,
                     le=2**20)
    lr: float = opt(3e-4, "peak learning rate (AdamW, linear warm-up then cosine decay)", gt=0)
    warmup: int | None = opt(None, "warm-up steps (default: min(100, iters / 10))", ge=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    grad_clip: float = opt(1.0, "gradient-norm clipping (0: off)", ge=0)
    ema_decay: float = opt(0.999, "decay of the evaluation EMA (the exported weights)", ge=0, lt=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)
    mixed_precision: str = opt("no", "no, fp16 or bf16 (through accelerate)")
    seed: int = opt(0, "seed of initialization, data order and noise", ge=0, le=2**32 - 1)
    ckpt_every: int | None = opt(None, "checkpoint every N steps (default: iters / 4)", ge=1)
    log_every: int = opt(25, "log the losses every N steps", ge=1)
    hflip: bool = opt(False, "random horizontal flips of the training images (a function of seed and step)")
    log_with: str | None = opt(None, "also log the metrics to tensorboard or wandb (accelerate's trackers; offline)")
    eval_every: int | None = opt(None, "log a quality figure every N steps of each stage and at its end: FD of eval_n "
                                       "samples against the train split (metrics.jsonl's quality/fd; the CLI measures "
                                       "it, and its time is not counted as training; --resume keeps it)", ge=1)
    eval_n: int = opt(500, "samples per quality figure (eval_every)", ge=10, le=100000)

    def validate(self) -> None:
        from fewstep.training.loop import MIXED_PRECISION

        for name in ("iters", "batch", "grad_accum", "ckpt_every", "log_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise FewstepError(f"{name} {v}: give at least 1")
        for name in ("lr", "weight_decay", "grad_clip", "warmup"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise FewstepError(f"{name} {v}: give a value >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise FewstepError(f"ema_decay {self.ema_decay}: give a decay in [0, 1)")
        if self.mixed_precision not in MIXED_PRECISION:
            raise FewstepError(f"mixed_precision {self.mixed_precision!r}: use {', '.join(MIXED_PRECISION)}")

    def train_config(self, progress: bool = True) -> Any:
        """The loop's TrainConfig (``steps`` = iters)."""
        from fewstep.training.loop import TrainConfig

        return TrainConfig(steps=self.iters, batch=self.batch, lr=self.lr,
                           warmup=min(100, self.iters // 10) if self.warmup is None else self.warmup,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip, ema_decay=self.ema_decay,
                           grad_accum=self.grad_accum, ckpt_every=self.ckpt_every or max(1, self.iters // 4),
                           log_every=self.log_every, seed=self.seed, mixed_precision=self.mixed_precision,
                           hflip=self.hflip, log_with=self.log_with, eval_every=self.eval_every,
                           progress=progress)


def option_fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """``name -> (type, field)`` of an options dataclass, types resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _type_name(cls: type, name: str) -> str:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` (text from ``--set`` or a YAML value) as type ``tp``: int, float, bool, str, a tuple of those,
    or any of them ``| None``.  Errors are one line starting with ``where``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower()
                                                       in ("none", "null", "~"))):
            return None
        if len(rest) == 1:
            return coerce(value, rest[0], where)
        raise TypeError(f"unsupported option type {tp}")
    if value is None:
        raise FewstepError(f"{where}: needs a value")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip().strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise FewstepError(f"{where}: give {len(args)} comma-separated values, got {value!r}")
        return tuple(coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise FewstepError(f"{where}: give true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise FewstepError(f"{where}: give a whole number, got {value!r}")
        if isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise FewstepError(f"{where}: give a whole number below 2**63, got {value!r}")
            return value
        try:
            f = float(str(value).strip())
        except ValueError:
            f = float("nan")
        if f == f and f.is_integer() and abs(f) < 2**63:
            return int(f)
        raise FewstepError(f"{where}: give a whole number below 2**63, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise FewstepError(f"{where}: give a number, got {value!r}")
        try:
            number = float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError, OverflowError):
            raise FewstepError(f"{where}: give a number, got {value!r}") from None
        if not math.isfinite(number):
            raise FewstepError(f"{where}: give a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value.strip()
        if isinstance(value, bool):  # YAML 1.1 reads `no` / `yes` (mixed_precision: no) as booleans
            return "yes" if value else "no"
        raise FewstepError(f"{where}: give a word, got {value!r}")
    raise TypeError(f"unsupported option type {tp}")


# --- the registry ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """A registered method: ``run(ctx) -> final model folder`` (``ctx.out / STUDENT``)."""

    name: str
    kind: str  # "distill", "finetune", ...
    run: Callable[[RunContext], Path]
    summary: str
    options: type[Options]
    needs_teacher: bool = True
    needs_data: bool = True
    # the method's own defaults for the loop's options, e.g. (("lr", 2e-4),) for a GAN's Adam: below a --config
    # file, flags and --set, above LoopOptions' defaults
    loop_defaults: tuple[tuple[str, Any], ...] = ()

    @property
    def record_file(self) -> str:
        """The run record in OUT (``distill.json`` for distillation)."""
        return f"{self.kind}.json"


_REGISTRY: dict[str, dict[str, Recipe]] = {}
_DISCOVERED: set[str] = set()


def register(recipe: Recipe) -> Recipe:
    """Add ``recipe`` to its kind (a method module calls this at import)."""
    if not (dataclasses.is_dataclass(recipe.options) and issubclass(recipe.options, Options)):
        raise TypeError(f"{recipe.name}: options must be a dataclass deriving from Options")
    clash = set(option_fields(recipe.options)) & (set(option_fields(LoopOptions)) | set(RESERVED))
    if clash:
        raise ValueError(f"{recipe.kind} {recipe.name!r}: option names {sorted(clash)} are the loop's or the record's")
    stray = set(dict(recipe.loop_defaults)) - set(option_fields(LoopOptions))
    if stray:
        raise ValueError(f"{recipe.kind} {recipe.name!r}: loop_defaults {sorted(stray)} are not the loop's options")
    kind = _REGISTRY.setdefault(recipe.kind, {})
    if recipe.name in kind:
        raise ValueError(f"{recipe.kind} method {recipe.name!r} registered twice")
    kind[recipe.name] = recipe
    return recipe


def discover(kind: str) -> dict[str, Recipe]:
    """Every recipe of ``kind``: each module of the kind's package is imported once and registers itself."""
    if kind not in KIND_PACKAGES:
        raise FewstepError(f"unknown kind of method {kind!r}: use one of {', '.join(KIND_PACKAGES)}")
    if kind not in _DISCOVERED:
        try:
            package = importlib.import_module(KIND_PACKAGES[kind])
        except ModuleNotFoundError as e:
            if e.name != KIND_PACKAGES[kind]:
                raise
            package = None
        if package is not None:
            for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{package.__name__}.{info.name}")
        _DISCOVERED.add(kind)
    return dict(sorted(_REGISTRY.get(kind, {}).items()))


def get_recipe(kind: str, name: str) -> Recipe:
    found = discover(kind)
    if name not in found:
        raise FewstepError(f"unknown method {name!r} for {kind}: use one of {', '.join(found) or '(none yet)'}")
    return found[name]


# --- resolving options -----------------------------------------------------------------------------------
@dataclass
class Resolved:
    """A recipe's options and the loop's, resolved from every source and validated."""

    options: Options
    loop: LoopOptions


def _namespace(recipe: Recipe) -> dict[str, tuple[str, Any, dataclasses.Field]]:
    own = {k: ("method", tp, f) for k, (tp, f) in option_fields(recipe.options).items()}
    return {**own, **{k: ("loop", tp, f) for k, (tp, f) in option_fields(LoopOptions).items()}}


def unknown_option(recipe: Recipe, name: str, where: str) -> FewstepError:
    hint = recipe.options.hints.get(name)
    own = ", ".join(option_fields(recipe.options)) or "none"
    loop = ", ".join(option_fields(LoopOptions))
    return FewstepError(f"{where}: {recipe.name} has no option {name}{f' ({hint})' if hint else ''}; its options: "
                        f"{own}; the loop's: {loop} (see `fewstep {recipe.kind} --method {recipe.name} --help`)")


def read_options_file(path: Path) -> dict[str, Any]:
    """A YAML mapping of option names to values."""
    raw = read_yaml(path, f"--config {path}")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise FewstepError(f"--config {path} should be a YAML mapping of option names to values, e.g. `lr: 5.0e-4`")
    return raw


def parse_sets(sets: Iterable[str]) -> list[tuple[str, str, str]]:
    """``key=value`` texts as (key, value, the text) triples."""
    out = []
    for text in sets:
        key, eq, value = text.partition("=")
        if not eq or not key.strip():
            raise FewstepError(f"--set {text!r}: write KEY=VALUE, e.g. --set lr=5e-4")
        out.append((key.strip(), value, text))
    return out


def resolve_options(recipe: Recipe, *, file: Path | None = None, values: Mapping[str, Any] | None = None,
                    sets: Iterable[str] = (), label: Callable[[str], str] = lambda k: k) -> Resolved:
    """The recipe's and the loop's options, from (lowest first) defaults, ``file`` (YAML), ``values`` (named values:
    the CLI's flags, labelled in errors by ``label``) and ``sets`` (``key=value`` texts).  Every error is raised
    before anything is written: an unknown name (listing the recipe's), a value of the wrong type, a value the
    options refuse (their ``validate``)."""
    space = _namespace(recipe)
    chosen: dict[str, Any] = {}
    layers: list[tuple[str, Any, str]] = [(k, v, f"{recipe.name}'s default {k}") for k, v in recipe.loop_defaults]
    if file is not None:
        layers += [(k, v, f"--config {file}: {k}") for k, v in read_options_file(file).items()]
    layers += [(k, v, label(k)) for k, v in (values or {}).items()]
    layers += [(k, v, f"--set {text}") for k, v, text in parse_sets(sets)]
    for key, value, where in layers:
        name = key.replace("-", "_")
        if name not in space:
            raise unknown_option(recipe, name, where)
        chosen[name] = coerce(value, space[name][1], where)
        check_bounds(chosen[name], space[name][2], where)
    own = recipe.options(**{k: v for k, v in chosen.items() if space[k][0] == "method"})
    loop = LoopOptions(**{k: v for k, v in chosen.items() if space[k][0] == "loop"})
    loop.validate()
    own.validate()
    return Resolved(own, loop)


def options_help(recipe: Recipe) -> str:
    """What ``fewstep KIND --method NAME --help`` prints: the recipe's options and the loop's, with types,
    defaults and help lines."""
    needs = [w for w, need in (("--teacher", recipe.needs_teacher), ("training data", recipe.needs_data)) if need]
    lines = [f"{recipe.kind} method {recipe.name}: {recipe.summary}",
             f"needs: {', '.join(needs) or 'nothing but its options'}", "",
             "Set options with --set KEY=VALUE (repeatable) and/or --config FILE.yaml (a mapping KEY: VALUE); the "
             "older flags (--steps, --iters, ...) set the option of the same name. Later wins: defaults, the file, "
             "flags, --set.", ""]

    def show(v: Any) -> str:
        if v is None:
            return "none"
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

    blocks = [(f"Options of {recipe.name}:", recipe.options), ("Options of the training loop (every method):",
                                                               LoopOptions)]
    own_defaults = dict(recipe.loop_defaults)
    rows = {title: [(name, _type_name(cls, name), show(own_defaults.get(name, f.default) if cls is LoopOptions
                                                       else f.default), f.metadata.get("help", ""))
                    for name, (_, f) in option_fields(cls).items()] for title, cls in blocks}
    every = [r for rs in rows.values() for r in rs]
    w = [max(len(r[i]) for r in every) for i in range(3)]
    for title, rs in rows.items():
        lines.append(title)
        lines.extend(f"  {a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rs)
        lines.append("  (none)" if not rs else "")
        if not rs:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --- running -----------------------------------------------------------------------------------------------
@dataclass
class RunContext:
    """Everything a recipe's ``run`` needs.  ``teacher`` is None only for recipes with ``needs_teacher=False``;
    ``options`` are the recipe's own (its dataclass); ``train_config`` is the loop's (``steps`` = iters per
    stage)."""

    teacher: LoadedModel | None
    teacher_folder: Path | None
    data: tuple[torch.Tensor, torch.Tensor | None]
    data_name: str
    out: Path
    options: Any
    train_config: Any  # fewstep.training.loop.TrainConfig
    resume: bool = False
    train_fn: Callable[..., Any] | None = None  # the shared loop (tests wrap it)
    stages: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] | None = None  # what the run record holds (set by run_recipe)
    kind: str = "distill"
    quality: Callable[[Path, int], dict[str, float]] | None = None  # the loop's quality callback (eval_every)
    eval_n: int | None = None  # the samples per quality figure, recorded so --resume keeps measuring

    @property
    def iters(self) -> int:
        """Optimizer steps per stage (the loop's ``steps``)."""
        return int(self.train_config.steps)

    @property
    def record_file(self) -> Path:
        return self.out / f"{self.kind}.json"

    def stage(self, method: Method, name: str, iters: int | None = None,
              data: tuple[torch.Tensor, torch.Tensor | None] | None = None, measure: bool = True) -> Path:
        """Train ``method`` for ``iters`` (default: the run's iters) steps on ``data`` (default: the dataset) into
        ``out/name``; skip it when a resumed run already finished it.  Returns the stage folder (a model folder).
        ``measure=False``: no quality figures for this stage (a re-parameterized teacher copy, which would be sampled
        at the teacher's many steps and is not a student)."""
        from fewstep.training.loop import resume_point, train

        run = self.train_fn or train
        self.begin()
        folder = self.out / name
        cfg = dataclasses.replace(self.train_config, steps=iters or self.iters)
        point = resume_point(folder) if self.resume else None  # a damaged pointer or state.json: one line
        if point is not None:
            state = point[1]
            saved = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
            # unfinished, or finished but killed between the checkpoint and the model folder: the loop completes it
            if state.step < state.config.steps or saved.get("training", {}).get("steps") != state.step:
                run(method, data or self.data, cfg, folder, resume=True, **self._quality(measure))
        else:
            if self.resume and folder.exists():  # started but never checkpointed: nothing worth keeping
                if is_main():
                    shutil.rmtree(folder)
                barrier()
            run(method, data or self.data, cfg, folder, **self._quality(measure))
        config = read_json(folder / "config.json", "stage config")
        self.stages.append({"stage": name, "method": method.name,
                            "wall_seconds": config.get("training", {}).get("wall_seconds")})
        # every stage folder is a model: record what the run cost up to and including it
        total = {f"{self.kind}_wall_seconds": self.total_seconds()}
        if is_main() and any(config.get("training", {}).get(k) != v for k, v in total.items()):
            write_json(folder / "config.json", {**config, "training": {**config.get("training", {}), **total}})
        barrier()
        return folder

    def _quality(self, measure: bool = True) -> dict[str, Any]:
        return {"quality": self.quality} if self.quality is not None and measure else {}

    def total_seconds(self) -> float:
        return round(sum(s["wall_seconds"] or 0.0 for s in self.stages), 1)

    def begin(self) -> None:
        """Write the run record before the first thing worth resuming is written (stages call it)."""
        if self.record is not None and not self.record_file.is_file() and is_main():
            write_json(self.record_file, self.record)

    def extra_seconds(self, name: str, seconds: float) -> None:
        """Record time spent outside the loop (e.g. drawing teacher samples) in the run's total."""
        self.stages.append({"stage": name, "method": name, "wall_seconds": round(seconds, 1)})


@dataclass
class RunResult:
    student: Path  # the final stage (a model folder)
    stages: list[dict[str, Any]]
    wall_seconds: float
    options: Any = None


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=list))


RECORDED_LOOP = ("seed", "batch", "lr", "warmup", "weight_decay", "grad_clip", "ema_decay", "grad_accum",
                 "mixed_precision")  # what changes the result (not ckpt_every, log_every, progress)


def run_record(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    """What a resumed run must share with the original: the recipe, its options and iters, the loop's settings,
    the teacher's weights, the data."""
    teacher = (file_sha256(weights_file(model_folder(ctx.teacher_folder))) if ctx.teacher_folder is not None
               else None)
    options = {**_jsonable(dataclasses.asdict(ctx.options)), "iters": ctx.iters}
    loop = {k: _jsonable(getattr(ctx.train_config, k)) for k in RECORDED_LOOP}
    from fewstep.data.datasets import data_record

    data_hash = (data_record(ctx.data_name) or {}).get("hash") if ctx.data_name else None
    measure = ({"eval_every": ctx.train_config.eval_every, "eval_n": ctx.eval_n} if ctx.quality is not None
               and ctx.train_config.eval_every else None)  # not compared on resume: it changes no weight
    return {"method": recipe.name, "kind": recipe.kind, "options": options, "loop": loop, "teacher": teacher,
            "data": ctx.data_name, "data_hash": data_hash, "measure": measure}


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A run record as one flat mapping.  A record written before the recipe layer (distill.json with every
    method's options under "options" and seed, batch, lr at the top) reads the same way; the options another
    method had there are simply not compared."""
    flat = {k: record[k] for k in ("method", "teacher", "data", "data_hash") if k in record}
    flat.update(record.get("options") or {})
    flat.update(record.get("loop") or {k: record[k] for k in ("seed", "batch", "lr") if k in record})
    return flat


def record_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Names whose value differs between a saved run record and this run's.  Only names both know are compared:
    a record from an older fewstep did not record every setting."""
    a, b = _comparable(saved), _comparable(now)
    return sorted(k for k in a if k in b and a[k] != b[k])


def run_recipe(recipe: Recipe, ctx: RunContext) -> RunResult:
    """Run ``recipe`` and record the whole run (stages, total wall time) in the final model's config.

    The run record (``OUT/<kind>.json``) holds the recipe, its options and the teacher; a resumed run with anything
    different is refused (it would silently reuse stages built from other settings)."""
    if not isinstance(ctx.options, recipe.options):
        raise TypeError(f"{recipe.name} takes {recipe.options.__name__}, got {type(ctx.options).__name__}")
    ctx.options.validate()
    if recipe.needs_teacher and ctx.teacher is None:
        raise FewstepError(f"method {recipe.name!r} needs --teacher")
    if ctx.teacher is not None:
        ctx.options.check_teacher(ctx.teacher)
    ctx.kind = recipe.kind
    barrier()  # every process has checked OUT (prepare) before any writes to it
    record = run_record(recipe, ctx)
    if ctx.resume and ctx.record_file.is_file():
        diff = record_differences(read_json(ctx.record_file, "run record"), record)
        if diff:
            raise FewstepError(f"{ctx.out} was {'distilled' if recipe.kind == 'distill' else 'trained'} with other "
                               f"settings ({', '.join(diff)}): resume with the same command, or choose a new --out")
    elif ctx.resume and ctx.out.is_dir() and any(not is_orphan(p.name) for p in ctx.out.iterdir()):
        raise FewstepError(f"{ctx.out} has no {ctx.record_file.name} (not a fewstep {recipe.kind} run): choose a new "
                           "--out")
    if ctx.resume and is_main():  # what a killed run's writers left (io._atomic's temporary files)
        remove_orphans(ctx.out)
    ctx.record = record  # written by the first stage, so options a method rejects leave nothing behind
    barrier()  # and every process has read what the checks above read before the first write
    final = recipe.run(ctx)
    total = ctx.total_seconds()
    cfg = read_json(final / "config.json", "final stage config")
    if ctx.data_name and cfg.get("data_record") is None:
        from fewstep.data.datasets import data_record

        record = data_record(ctx.data_name)
        if record is not None:
            cfg["data_record"] = record
    cfg["training"] = {**cfg.get("training", {}), "method": recipe.name, f"{recipe.kind}_stages": ctx.stages,
                       f"{recipe.kind}_wall_seconds": total,
                       "teacher": str(ctx.teacher_folder) if ctx.teacher_folder else None}
    if is_main():
        write_json(final / "config.json", cfg)
    barrier()
    return RunResult(final, list(ctx.stages), total, ctx.options)


def check_out(out: Path, resume: bool) -> None:
    """``out`` is a new (or empty) folder, or with ``resume`` an existing run."""
    out = Path(out)
    if resume and out.exists() and not out.is_dir():
        raise FewstepError(f"--resume: {out} is a file, not a run's folder: choose the run's folder")
    if resume and not out.exists() and is_main():  # killed before it made the folder: no dead end for a retry loop
        import sys

        print(f"note: {out} holds no run yet: starting it", file=sys.stderr)
    if not resume and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FewstepError(f"{out} exists and is not empty: choose a new --out or pass --resume")


NO_DATA_ROWS = 4096


def no_data(model: LoadedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the loop batches for a data-free method: zeros of the teacher's sample shape (only their shape, device
    and dtype are used) and, for a class-conditional teacher, labels cycling through its classes (so the loop's
    seeded shuffle draws classes uniformly)."""
    k = model.config.num_classes
    x = torch.zeros(NO_DATA_ROWS, *model.sample_shape)
    return x, (torch.arange(NO_DATA_ROWS) % k if k else None)


def _measured_on_main(folder: Path, step: int) -> dict[str, float]:
    """The quality callback of a process other than the main one: the loop never calls it there."""
    raise RuntimeError("the quality measure runs on the main process only")


QualityFactory = Callable[[str, int], Callable[[Path, int], dict[str, float]]]  # (dataset, n) -> the loop's quality


def prepare(recipe: Recipe, resolved: Resolved, out: Path, teacher: Path | None = None, data: str | None = None,
            resume: bool = False, progress: bool = True, quality: QualityFactory | None = None) -> RunContext:
    """The run's context: the teacher loaded (when the recipe needs one), the training data (default: the
    teacher's recorded dataset) checked against it, the loop's config.  Writes nothing.  With ``eval_every`` set,
    ``quality(dataset, eval_n)`` makes the loop's quality callback (the CLI passes fewstep.evaluate's; methods never
    import evaluation); the dataset is the training data, or for a data-free run the teacher's.  A resumed run
    given no eval_every keeps the one its run record holds (the curve goes on)."""
    if resume and resolved.loop.eval_every is None and quality is not None:
        record = Path(out) / recipe.record_file
        measure = (read_json(record, "run record").get("measure") if record.is_file() else None) or {}
        if measure.get("eval_every"):
            resolved = dataclasses.replace(resolved, loop=dataclasses.replace(
                resolved.loop, eval_every=int(measure["eval_every"]),
                eval_n=int(measure.get("eval_n") or resolved.loop.eval_n)))
    ctx = _prepare(recipe, resolved, out, teacher, data, resume, progress)
    if resolved.loop.eval_every is not None:
        if quality is None:
            raise FewstepError("eval_every needs a quality measure: the caller passes one (fewstep distill does)")
        dataset = ctx.data_name or (ctx.teacher.config.data if ctx.teacher is not None else None)
        if not dataset:
            raise FewstepError("eval_every measures FD against the training data's train split, and neither this run "
                               "nor its teacher records a dataset: drop eval_every")
        import torch

        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        from fewstep.training.processes import on_main

        def build() -> Callable[[Path, int], dict[str, float]]:
            with torch.random.fork_rng(devices=devices):  # a feature network trained here seeds the global RNG
                return quality(dataset, resolved.loop.eval_n)

        # the loop measures on the main process only: the others need no feature network or reference features
        ctx.quality = on_main(build, "building the quality measure (eval_every)") or _measured_on_main
        ctx.eval_n = resolved.loop.eval_n
    return ctx


def _prepare(recipe: Recipe, resolved: Resolved, out: Path, teacher: Path | None, data: str | None, resume: bool,
             progress: bool) -> RunContext:
    from fewstep.data.datasets import load_dataset
    from fewstep.models.folder import load_model

    out = Path(out)
    check_out(out, resume)
    if recipe.needs_teacher and teacher is None:
        raise FewstepError(f"method {recipe.name!r} needs --teacher")
    if not recipe.needs_teacher and teacher is not None:
        raise FewstepError(f"method {recipe.name!r} trains from the data alone (no teacher): drop --teacher and pass "
                           "--data")
    model = load_model(teacher) if teacher is not None and recipe.needs_teacher else None
    if not recipe.needs_data and data is None and model is not None:  # data-free: no dataset is loaded or read
        from fewstep.training.loop import check_config

        train_config = resolved.loop.train_config(progress)
        check_config(train_config, expected_processes())
        return RunContext(model, Path(teacher), no_data(model), "", out, resolved.options, train_config,
                          resume=resume, kind=recipe.kind)
    name = data or (model.config.data if model else None)
    if name is None:
        raise FewstepError(f"{teacher or 'the method'} does not record its dataset: pass --data")
    from fewstep.data.spec import data_key

    name = data_key(name)  # a path as given -> its key (absolute, canonical); a built-in name stays
    if data is None and model is not None:
        from fewstep.data.datasets import check_recorded

        check_recorded(name, model.config.data_record, str(teacher))
    ds = load_dataset(name, "train")
    if model is not None and tuple(ds.sample_shape) != tuple(model.sample_shape):
        raise FewstepError(f"--data {name} has samples of shape {tuple(ds.sample_shape)}, the teacher makes "
                           f"{tuple(model.sample_shape)}: pass the data it was trained on (or --resolution/--channels "
                           "to match)")
    labels = ds.y if (model.config.num_classes if model else ds.num_classes) else None
    if labels is not None and model is not None and len(labels) and int(labels.max()) >= model.config.num_classes:
        raise FewstepError(f"--data {name} has labels up to {int(labels.max())}, the teacher knows classes "
                           f"0..{model.config.num_classes - 1}: pass data with the teacher's classes")
    from fewstep.training.loop import check_config

    train_config = resolved.loop.train_config(progress)
    check_config(train_config, expected_processes())  # e.g. --batch vs processes x --grad-accum: before any write
    return RunContext(model, Path(teacher) if model is not None else None, (ds.x, labels), name, out,
                      resolved.options, train_config, resume=resume, kind=recipe.kind)


def start(kind: str, name: str, out: Path, *, teacher: Path | None = None, data: str | None = None,
          config: Path | None = None, values: Mapping[str, Any] | None = None, sets: Iterable[str] = (),
          resume: bool = False, progress: bool = True, label: Callable[[str], str] = lambda k: k,
          quality: QualityFactory | None = None) -> RunResult:
    """Resolve the options (nothing written on an error), prepare and run: what ``fewstep distill`` and
    :func:`fewstep.distill_model` do."""
    recipe = get_recipe(kind, name)
    resolved = resolve_options(recipe, file=config, values=values, sets=sets, label=label)
    return run_recipe(recipe, prepare(recipe, resolved, out, teacher, data, resume, progress, quality))
