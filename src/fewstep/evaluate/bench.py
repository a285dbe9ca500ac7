"""`fewstep bench`: one teacher, every sampler x NFE, diffusers' schedulers as baselines, students; cached rows.

Orchestration only: it trains the teacher if its folder is missing (resuming an interrupted run), then
evaluates rows through :mod:`fewstep.evaluate.runner`.  Each row is cached in an append-only SQLite database
by a key over the weights (model, teacher, feature network), the models' sampling configs (not their training
records) and the row's settings, so an interrupted bench resumes, an unchanged config reuses everything, and so
does a bit-identical retrain of the teacher on another machine.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import platform
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

import fewstep
from fewstep.data.datasets import is_image_data
from fewstep.errors import FewstepError
from fewstep.evaluate.features import feature_weights_sha256
from fewstep.io import file_sha256, read_json, read_yaml, write_text
from fewstep.schema import NonNegInt, PosInt, Strict, YamlFinite, check, describe_value

METRICS_VERSION = 1
SPACINGS = ("trailing", "leading", "linspace")


@dataclass
class Row:
    """One line of the benchmark: how samples are produced."""

    method: str  # "fewstep", "diffusers", "teacher-best", "student"
    name: str  # sampler / scheduler / student name
    steps: int | None = None
    spacing: str | None = None
    model: str | None = None  # student folder

    @property
    def label(self) -> str:
        if self.method == "student":
            sp = f" {self.spacing}" if self.spacing else ""
            return f"student:{self.name}" + (f" x{self.steps}" if self.steps else "") + sp
        sp = f" {self.spacing}" if self.spacing and self.method == "diffusers" else ""
        return f"{self.method}:{self.name} x{self.steps}{sp}"


@dataclass
class BenchConfig:
    name: str
    data: str
    out: Path
    teacher_folder: Path
    teacher_train: dict[str, Any] = field(default_factory=dict)
    n: int | None = None
    seed: int = 0
    guidance: float = 1.0
    samplers: list[str] = field(default_factory=lambda: ["ddim", "euler", "heun", "dpmpp-2m"])
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    baselines: list[str] = field(default_factory=lambda: ["DDIM", "DPMSolverMultistep", "UniPC", "Euler"])
    baseline_spacing: str = "best"  # "best": try each spacing on a small subset and keep the best FD
    teacher_reference: dict[str, Any] = field(default_factory=lambda: {"sampler": "dpmpp-2m", "steps": 50})
    students: list[dict[str, str]] = field(default_factory=list)
    features: str = "full"  # "quick": a built-in set's quick feature network (features.quick_features)
    raw: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the config file (named in errors)

    @property
    def where(self) -> str:
        return f"bench config {self.path}" if self.path else "bench config"


# --- the schema of a bench YAML -------------------------------------------------------------------------------
def _known(kind: str, names: list[str]) -> list[str]:
    """``names`` are all known samplers (``kind`` "sampler") or diffusers schedulers ("baseline")."""
    if kind == "sampler":
        from fewstep.samplers import SAMPLERS as known
    else:
        from fewstep.baselines import DIFFUSERS_SCHEDULERS as known
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {kind} {name!r}: use {', '.join(known)}")
    return names


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


class StudentEntry(Strict):
    name: str = Field(description="the row's name (text)")
    model: str = Field(description="a model folder or distillation run, relative to the config's folder")
    steps: Any = Field(None, description="a whole number >= 1 or a non-empty list of them")
    spacing: Literal["grid", "trailing", "leading", "linspace"] | None = Field(
        None, description="grid, trailing, leading or linspace (a consistency student's timesteps; default: its own)")

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: Any) -> Any:
        if not (v is None or _positive_int(v) or (isinstance(v, list) and v and all(map(_positive_int, v)))):
            raise ValueError("give a whole number >= 1 or a non-empty list of them (the steps to sample the student "
                             "at)")
        return v


class TeacherReference(Strict):
    sampler: str = Field(description="a sampler's name")
    steps: PosInt = Field(description="a whole number >= 1")

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str) -> str:
        return _known("sampler", [v])[0]


class TeacherSection(Strict):
    folder: str = Field(None, description="the teacher's model folder, relative to the config's folder")
    train: dict[str, Any] | None = Field(None, description="a mapping of `fewstep train` settings (see "
                                                           "benchmarks/digits.yaml), or null")


class BenchFields(Strict):
    """What a bench config (or one of its profiles) may set; a value left out keeps its default."""

    name: str = Field(None, description="the benchmark's name (text)")
    data: Any = Field(None, description="a data set's name, a path, or a mapping {source: PATH, ...--data's options}")
    out: str = Field(None, description="the output folder, relative to the config's folder")
    teacher: TeacherSection = Field(None, description="a mapping {folder: PATH, train: {...}}")
    n: PosInt | None = Field(None, description="a whole number >= 1 (samples per row), or null for the test split's "
                                               "size")
    seed: NonNegInt = Field(0, description="a whole number >= 0 and below 2**63")
    guidance: YamlFinite = Field(1.0, ge=0, description="a finite number >= 0")
    samplers: list[str] = Field(None, description="a list of sampler names")
    nfe: list[PosInt] = Field(None, min_length=1, description="a non-empty list of whole numbers >= 1")
    baselines: list[str] = Field(None, description="a list of diffusers schedulers (DDIM, DPMSolverMultistep, "
                                                   "UniPC, Euler)")
    baseline_spacing: Literal["best", "trailing", "leading", "linspace"] = Field(
        "best", description="best, trailing, leading or linspace")
    teacher_reference: TeacherReference | None = Field(None, description="a mapping {sampler: NAME, steps: N}, or "
                                                                         "null for no reference row")
    students: list[StudentEntry] | None = Field(None, description="a list of {name, model, steps} mappings")
    features: Literal["full", "quick"] = Field("full", description="full or quick (a built-in set's quick feature "
                                                                   "network: smoke runs, FD not comparable)")

    @field_validator("data")
    @classmethod
    def _data(cls, v: Any) -> Any:
        if not (isinstance(v, str) and v) and not (isinstance(v, dict) and isinstance(v.get("source"), str)):
            raise ValueError("give a data set's name, a path, or a mapping with a `source` path and --data's options")
        return v

    @field_validator("samplers")
    @classmethod
    def _samplers(cls, v: list[str]) -> list[str]:
        return _known("sampler", v)

    @field_validator("baselines")
    @classmethod
    def _baselines(cls, v: list[str]) -> list[str]:
        return _known("baseline", v)

    @field_validator("teacher_reference", mode="before")
    @classmethod
    def _no_reference(cls, v: Any) -> Any:
        return None if v == {} else v  # `teacher_reference: {}`: no reference row, as null


class BenchFile(BenchFields):
    profiles: dict[str, BenchFields] | None = Field(None, description="a mapping of profile names to settings")


class TeacherTrain(Strict):
    """The ranges of ``teacher.train``'s values once typed (teacher_recipe: its keys and types)."""

    model_config = Strict.model_config | {"extra": "allow"}
    preset: str | None = None
    objective: str = "ddpm"
    prediction: Literal["eps", "v", "x0"] | None = Field(None, description="eps, v, x0 or null")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "linear", description="linear, scaled_linear or squaredcos_cap_v2")
    seed: NonNegInt = 0
    steps: PosInt = 1
    batch: PosInt = 1
    grad_accum: PosInt = 1
    ckpt_every: PosInt = 1
    log_every: PosInt = 1
    warmup: NonNegInt = 0
    lr: YamlFinite = Field(1e-3, gt=0, description="a finite number > 0")
    weight_decay: YamlFinite = Field(0.0, ge=0, description="a finite number >= 0")
    grad_clip: YamlFinite = Field(1.0, ge=0, description="a finite number >= 0 (0: off)")
    ema_decay: YamlFinite = Field(0.999, ge=0, lt=1, description="a number in [0, 1)")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="no, fp16 or bf16")
    log_with: Literal["tensorboard", "wandb"] | None = Field(None, description="tensorboard, wandb or null")

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str | None) -> str | None:
        from fewstep.models.backbones import MLP_PRESETS, UNET_PRESETS

        if v is not None and v not in (*UNET_PRESETS, *MLP_PRESETS):
            raise ValueError(f"use one of {', '.join([*UNET_PRESETS, *MLP_PRESETS])} (or null: by the data's shape)")
        return v

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str) -> str:
        from fewstep.training.teacher import OBJECTIVES

        if v not in OBJECTIVES:
            raise ValueError(f"use one of {', '.join(OBJECTIVES)}")
        return v


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def bench_data(value: Any, base: Path, path: Path) -> str:
    """A bench config's ``data``: a data set's name, a source path (relative to the config's folder), or a mapping
    ``{source: PATH, resolution: 16, ...}`` with the options of ``--data`` (labels, range, resolution, channels,
    test_fraction, test, image_column, label_column, skip_bad_images); returns the data key."""
    from fewstep.data.spec import data_key, is_builtin

    if isinstance(value, str):
        if is_builtin(value):
            return value
        value = {"source": value}
    if not isinstance(value, dict) or not isinstance(value.get("source"), str):
        raise FewstepError(f"bench config {path}: data is a data set's name, a path, or a mapping with a `source` "
                           f"path and --data's options, got {value!r}")
    opts = dict(value)
    source = opts.pop("source")
    if not is_builtin(source) and not Path(source).is_absolute():
        source = str(base / source)
    for k in ("labels", "test"):  # paths relative to the config's folder
        if isinstance(opts.get(k), str) and not Path(opts[k]).is_absolute():
            opts[k] = str(base / opts[k])
    from fewstep.data.spec import FLAGS

    unknown = set(opts) - set(FLAGS)
    if unknown:
        raise FewstepError(f"bench config {path}: data has unknown keys {', '.join(sorted(unknown))}: use source, "
                           f"{', '.join(FLAGS)}")
    if is_builtin(source) and not opts:
        return source
    return data_key(source, **opts)


def load_bench_config(path: Path, profile: str = "full") -> BenchConfig:
    """A bench YAML, checked whole (every profile, not only ``profile``) before any work: a value of the wrong type,
    not finite or out of range, an unknown key (a typo) or a missing one is one FewstepError line naming the field
    as a dotted path (``profiles.quick.n``) and what is allowed.  Then ``profile``'s settings over the config's."""
    path = Path(path)
    where = f"bench config {path}"
    raw = read_yaml(path, where)  # not UTF-8 is one line too
    if not isinstance(raw, dict):
        raise FewstepError(f"{where} should be a YAML mapping of settings (see benchmarks/digits.yaml), got "
                           f"{describe_value(raw)}")
    check(BenchFile, raw, where)
    profiles = raw.pop("profiles", None) or {}
    if profile not in profiles and profile != "full":
        raise FewstepError(f"profile {profile!r} is not in {path}: choose one of {', '.join(['full', *profiles])}")
    raw = _merge(raw, profiles.get(profile) or {})
    in_profile = f" (in the config or its profile {profile})" if profile in profiles else ""
    for key, what in (("name", "the benchmark's name"), ("data", "the data set's name or a path"),
                      ("teacher", "a mapping {folder: PATH, train: {...}}")):
        if key not in raw:
            raise FewstepError(f"{where}: `{key}` is missing{in_profile}: give {what}")
    teacher = raw.pop("teacher")
    if "folder" not in teacher:
        raise FewstepError(f"{where}: `teacher.folder` is missing{in_profile}: give the teacher's model folder")
    base = path.parent
    raw["data"] = bench_data(raw["data"], base, path)
    train = teacher.get("train") or {}
    if train:
        check_teacher_train(raw["data"], train, where)
    students = [{**s, "model": str(base / s["model"])} for s in raw.pop("students", None) or []]
    cfg = BenchConfig(**{**raw, "out": base / raw.get("out", f"results/{raw['name']}"), "students": students,
                         "teacher_folder": base / teacher["folder"], "teacher_train": train,
                         "raw": {**raw, "students": students, "teacher": teacher, "profile": profile}, "path": path})
    return cfg


def check_teacher_train(data: str, train: dict[str, Any], where: str) -> None:
    """``teacher.train``: `fewstep train`'s settings by name (teacher_recipe: keys and types), in range."""
    opts, loop = teacher_recipe(data, train, where)
    typed = {k: getattr(opts, k) if hasattr(opts, k) else getattr(loop, k) for k in train}
    check(TeacherTrain, typed, where, "teacher.train")


# --- results database ---------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (run_id INTEGER PRIMARY KEY AUTOINCREMENT, started TEXT, config TEXT,
    git_commit TEXT, machine TEXT);
CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER, key TEXT, label TEXT,
    method TEXT, name TEXT, steps INTEGER, nfe INTEGER, fd REAL, kid REAL, wall_seconds REAL, result TEXT,
    created TEXT);
CREATE INDEX IF NOT EXISTS rows_key ON rows (key);
"""


class ResultsDB:
    """Append-only SQLite store: a run per bench invocation, a row per evaluated line (never updated)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path))
        self.conn.executescript(SCHEMA)

    def start_run(self, config: dict[str, Any]) -> int:
        cur = self.conn.execute(
            "INSERT INTO runs (started, config, git_commit, machine) VALUES (?, ?, ?, ?)",
            (time.strftime("%Y-%m-%dT%H:%M:%S"), json.dumps(config, default=str), _git_commit(), _machine()))
        self.conn.commit()
        return int(cur.lastrowid)

    def cached(self, key: str) -> dict[str, Any] | None:
        r = self.conn.execute("SELECT result FROM rows WHERE key = ? ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        return json.loads(r[0]) if r else None

    def add(self, run_id: int, key: str, row: Row, result: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT INTO rows (run_id, key, label, method, name, steps, nfe, fd, kid, wall_seconds, result, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, key, row.label, row.method, row.name, row.steps, result.get("nfe"), result.get("fd"),
             result.get("kid"), result.get("wall_seconds"), json.dumps(result), time.strftime("%Y-%m-%dT%H:%M:%S")))
        self.conn.commit()


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _machine() -> str:
    import os

    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, torch {torch.__version__}"


# --- the teacher --------------------------------------------------------------------------------
TEACHER_LOOP = {"steps": 3000, "batch": 64, "lr": 1e-3, "ema_decay": 0.999, "ckpt_every": 500}  # = `fewstep train`


def teacher_recipe(data: str, train: dict[str, Any], where: str = "bench config") -> tuple[Any, Any]:
    """(TeacherOptions, TrainConfig) of a bench config's ``teacher.train`` section: the teacher's options (preset,
    objective, prediction, conditional, beta_schedule, seed) and the loop's (steps, batch, lr, ...), with
    `fewstep train`'s defaults."""
    from fewstep.training.loop import TrainConfig
    from fewstep.training.teacher import TeacherOptions

    teacher_keys = {f.name for f in dataclasses.fields(TeacherOptions)} - {"data"}
    loop_keys = {f.name for f in dataclasses.fields(TrainConfig)} - {"progress"}
    unknown = set(train) - teacher_keys - loop_keys
    if unknown:
        raise FewstepError(f"{where}: teacher.train has unknown keys {', '.join(sorted(unknown))}: use "
                           f"{', '.join(sorted(teacher_keys | loop_keys))}")
    from fewstep.training.recipe import coerce, option_fields

    def typed(cls: type, keys: set[str]) -> dict[str, Any]:  # YAML gives `lr: 1e-3` as text: the fields' types
        types = option_fields(cls)
        return {k: coerce(v, types[k][0], f"{where}: teacher.train.{k}") for k, v in train.items() if k in keys}

    opts = TeacherOptions(data=data, **typed(TeacherOptions, teacher_keys))
    loop = {**TEACHER_LOOP, **typed(TrainConfig, loop_keys)}
    return opts, TrainConfig(**{**loop, "seed": opts.seed, "progress": False})


def ensure_teacher(cfg: BenchConfig, log: Callable[[str], None]) -> Path:
    """The teacher folder, trained (or resumed) here if it is missing or unfinished."""
    from fewstep.training.teacher import train_teacher

    folder = cfg.teacher_folder
    t = dict(cfg.teacher_train)
    latest = folder / "checkpoints" / "latest"
    opts, train_cfg = teacher_recipe(cfg.data, t, cfg.where) if t else (None, None)
    steps = train_cfg.steps if train_cfg is not None else 0
    if _has_model(folder):
        if not t or not latest.is_file():
            return folder  # an external (e.g. diffusers) teacher, or one this config does not train
        trained = json.loads((folder / "config.json").read_text()).get("training", {}).get("steps", 0)
        if trained >= steps:
            return folder
    if not t:
        raise FewstepError(f"teacher folder {folder} is missing and the config has no teacher.train section")
    if latest.is_file():
        state = folder / "checkpoints" / latest.read_text().strip() / "state.json"
        planned = json.loads(state.read_text())["config"]["steps"] if state.is_file() else steps
        if planned != steps:
            raise FewstepError(f"the teacher run in {folder} was started for {planned} steps but the config asks for "
                               f"{steps}: delete {folder} to retrain, or set teacher.train.steps: {planned}")
    log(f"training the teacher into {folder} ({steps} steps{', resuming' if latest.is_file() else ''})")
    train_teacher(opts, train_cfg, folder, resume=latest.is_file())
    return folder


# --- rows ---------------------------------------------------------------------------------------
def plan_rows(cfg: BenchConfig) -> list[Row]:
    from fewstep.samplers import SAMPLERS

    rows: list[Row] = []
    for s in cfg.samplers:
        if s not in SAMPLERS:
            raise FewstepError(f"bench config: unknown sampler {s!r}")
        seen = set()
        for nfe in cfg.nfe:
            steps = max(1, (nfe + 1) // 2) if s == "heun" else nfe
            if steps not in seen:
                seen.add(steps)
                rows.append(Row("fewstep", s, steps))
    for b in cfg.baselines:
        for nfe in cfg.nfe:
            rows.append(Row("diffusers", b, nfe, cfg.baseline_spacing))
    ref = cfg.teacher_reference
    if ref:
        rows.append(Row("teacher-best", ref["sampler"], int(ref["steps"])))
    for s in cfg.students:  # `steps`: sample a student that can take several step counts (consistency, flow)
        steps = s.get("steps")
        for k in ([steps] if isinstance(steps, int) else steps or [None]):
            rows.append(Row("student", s["name"], steps=k, spacing=s.get("spacing"), model=s["model"]))
    return rows


def _sample_row(row: Row, teacher, cfg: BenchConfig, n: int, spacing: str | None = None):
    from fewstep.baselines import diffusers_generate
    from fewstep.generate import class_labels, generate, resolve_timesteps
    from fewstep.models.folder import load_model

    if row.method == "student":
        m = load_model(row.model)
        d = m.config.sampling
        if m.denoiser.takes_guidance:  # a guided-distilled student: the bench's scale, as one input
            w = cfg.guidance
        else:
            w = d.guidance if m.config.null_class is not None else 1.0
            baked = m.config.training.get("distilled_guidance")
            if baked is not None and teacher.config.null_class is not None and baked != cfg.guidance:
                raise FewstepError(f"student {row.name!r} was distilled at guidance {baked}, the bench samples the "
                                   f"teacher at {cfg.guidance}: the rows would not compare like with like")
        # distilled for its recorded timesteps (progressive, guided); a consistency model samples at any steps
        fixed = d.timesteps is not None and (row.steps in (None, len(d.timesteps)) or d.sampler != "consistency")
        fixed = fixed and not (row.spacing and d.sampler == "consistency")
        if fixed and row.steps not in (None, len(d.timesteps)):
            raise FewstepError(f"student {row.name!r} was distilled for {len(d.timesteps)} steps, the bench asks "
                               f"for {row.steps}: list each round's folder instead")
        if fixed and row.spacing:
            raise FewstepError(f"student {row.name!r} samples at the timesteps it was distilled for: drop its "
                               f"`spacing: {row.spacing}` (a consistency student takes one)")
        timesteps = resolve_timesteps(m) if fixed else resolve_timesteps(m, steps=row.steps, spacing=row.spacing)
        return generate(m, d.sampler, timesteps, n, seed=cfg.seed,
                        labels=class_labels(m, n, None), guidance=w)
    labels = class_labels(teacher, n, None)
    guidance = cfg.guidance if teacher.config.null_class is not None else 1.0
    if row.method == "diffusers":
        return diffusers_generate(teacher, row.name, row.steps, n, seed=cfg.seed, labels=labels, guidance=guidance,
                                  spacing=spacing or "trailing")
    return generate(teacher, row.name, resolve_timesteps(teacher, steps=row.steps, spacing="trailing"), n,
                    seed=cfg.seed, labels=labels, guidance=guidance)


def _sampling_config_hash(config: dict[str, Any], length: int) -> str:
    """Hash of a model config without its provenance (the training record: recipe, losses, wall time; the
    version that wrote it): with the weights' hash, what decides the samples, so a bit-identical retrain
    reuses its rows."""
    kept = {k: v for k, v in config.items() if k not in ("training", "fewstep_version")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class KeyContext:
    """What every row key of one bench shares: the teacher's weights and sampling config, the feature network's
    weights (image data), n, seed, guidance, data."""

    teacher_sha256: str
    teacher_config: str  # _sampling_config_hash of the teacher's config (16 hex digits)
    n: int
    seed: int
    guidance: float
    data: str
    features: str | None

    @staticmethod
    def of(teacher: Any, n: int, seed: int, guidance: float, data: str, features: str | None) -> KeyContext:
        """For a loaded teacher (its folder's weights file and its config)."""
        from fewstep.models.folder import weights_file

        return KeyContext(file_sha256(weights_file(teacher.path)), _sampling_config_hash(teacher.config.to_json(), 16),
                          n, seed, guidance, data, features)


def model_hash(row: Row, keys: KeyContext) -> str:
    """The weights a row samples (the teacher's, or a student's plus how it samples: sampler, timesteps, ...)."""
    from fewstep.models.folder import model_folder, weights_file

    if not row.model:
        return keys.teacher_sha256
    folder = model_folder(row.model)
    return file_sha256(weights_file(folder)) + _sampling_config_hash(read_json(folder / "config.json"), 8)


def row_key(row: Row, keys: KeyContext, model: str | None = None) -> str:
    """A row's cache key.  A student's folder path is left out: its weights and config are in the model hash, and
    the path changes with the directory the bench runs from.  Pinned by tests/test_compat.py: a change here
    re-measures every published row."""
    key_obj = {"v": METRICS_VERSION, "fewstep": fewstep.__version__, "teacher": keys.teacher_sha256,
               "model": model or model_hash(row, keys), "row": dataclasses.asdict(dataclasses.replace(row, model=None)),
               "n": keys.n, "seed": keys.seed, "guidance": keys.guidance, "data": keys.data,
               "teacher_config": keys.teacher_config, "features": keys.features}
    return hashlib.sha256(json.dumps(key_obj, sort_keys=True).encode()).hexdigest()[:24]


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> Path:
    from fewstep.evaluate.features import quick_features

    with quick_features(cfg.features == "quick"):
        return _run_bench(cfg, log)


def _run_bench(cfg: BenchConfig, log: Callable[[str], None]) -> Path:
    from fewstep.evaluate.report import write_report
    from fewstep.evaluate.runner import check_n, default_n, evaluate_samples, measure, reference
    from fewstep.images import write_samples
    from fewstep.models.folder import load_model, model_folder

    try:
        n = cfg.n or default_n(cfg.data)
        check_n(cfg.data, n)  # too few (image data), or more than the splits hold: before training anything
    except FewstepError as e:  # the checks speak of `evaluate`'s flags: here they are the config's fields
        raise FewstepError(f"{cfg.where}: " + re.sub(r"--(n|data) ", r"\1 ", str(e))) from None
    check_models_fit(cfg)  # the data fits the teacher and the students, as `evaluate` checks: before any work
    folder = ensure_teacher(cfg, log)
    teacher = load_model(folder)
    out = Path(cfg.out)
    db = ResultsDB(out / "results.sqlite")
    run_id = db.start_run(cfg.raw)
    # the metrics' own network: a retrained (or differently trained) one measures differently
    features_hash = feature_weights_sha256(cfg.data) if is_image_data(cfg.data) else None
    keys = KeyContext.of(teacher, n, cfg.seed, cfg.guidance, cfg.data, features_hash)
    results: list[dict[str, Any]] = []
    rows = plan_rows(cfg)

    def ready(row: Row) -> bool:  # a student folder, or a distillation run with its student
        try:
            return not row.model or (model_folder(row.model) / "config.json").is_file()
        except FewstepError:  # a run folder without its student yet
            return False

    for row in [r for r in rows if not ready(r)]:
        log(f"{row.label}: no model folder at {row.model} yet (distil it first, e.g. benchmarks/students.sh): "
            "skipped in this run")
    rows = [r for r in rows if ready(r)]
    for i, row in enumerate(rows):
        mh = model_hash(row, keys)
        key = row_key(row, keys, mh)
        hit = db.cached(key)
        if hit is None:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            spacing = row.spacing
            if row.method == "diffusers" and row.spacing == "best":
                probe = min(n, 200)  # choose the spacing on a small subset, then measure it at full n
                scores = {}
                for s in SPACINGS:
                    q = measure(cfg.data, _sample_row(row, teacher, cfg, probe, s).x, None, 0)
                    scores[s] = q.fd if q.fd is not None else q.swd
                spacing = min(scores, key=scores.get)
            res = _sample_row(row, teacher, cfg, n, spacing)
            # featurized once: the metrics and the paired differences (features/<key>.npy) read the same features
            feats = reference(cfg.data, n).featurize(res.x.float()) if features_hash is not None else None
            ev = evaluate_samples(cfg.data, row.label, res, cfg.seed, features=feats).to_json()
            trained = (read_json(model_folder(row.model) / "config.json").get("training", {})
                       .get("distill_wall_seconds") if row.model else teacher.config.training.get("wall_seconds"))
            ev.update(method=row.method, name=row.name, spacing=spacing, grid=f"grids/{key}.png", train_seconds=trained,
                      label=row.label.replace(" best", f" {spacing}"), model_sha256=mh[:16],
                      features_sha256=features_hash, paired=_shares_noise(row))
            write_samples(out / "grids" / f"{key}.png", res.x[:100], nrow=10 if res.x.ndim == 4 else None)
            if features_hash is not None:  # for the paired differences between rows (fd_difference)
                (out / "features").mkdir(parents=True, exist_ok=True)
                np.save(out / "features" / f"{key}.npy", feats[0].astype(np.float32))
                ev["features"] = f"features/{key}.npy"
            db.add(run_id, key, row, ev)
            hit = ev
            log(f"[{i + 1}/{len(rows)}] {ev['label']}: NFE {ev['nfe']}, FD {_f(ev.get('fd'))}, "
                f"SWD {_f(ev.get('swd'))}, {ev['samples_per_s']:.1f} samples/s")
        else:
            log(f"[{i + 1}/{len(rows)}] {hit['label']}: cached")
        if row.method != "student":  # rows cached before the column existed: the teacher's training time
            hit = {**hit, "train_seconds": hit.get("train_seconds", teacher.config.training.get("wall_seconds"))}
        results.append(hit)
    _write_csv(out / "results.csv", results)
    diffs = compare_rows(results, out, reference(cfg.data, n).gauss) if features_hash is not None else []
    if diffs:
        _write_csv(out / "comparisons.csv", diffs, list(diffs[0]))
    teacher_info = {"folder": str(folder), "training": teacher.config.training, "data": cfg.data,
                    "guidance": cfg.guidance, "n": n, "features": cfg.features}
    curves = {Row("student", s["name"], steps=s.get("steps") if isinstance(s.get("steps"), int) else None).label:
              quality_curve(s["model"]) for s in cfg.students if ready(Row("student", s["name"], model=s["model"]))}
    return write_report(out, cfg.name, results, teacher_info, {k: v for k, v in curves.items() if v}, diffs)


def _shares_noise(row: Row) -> bool:
    """Whether sample i of this row comes from the same noise path as the teacher's and the students' (a GAN maps the
    noise in a way no diffusion model does: its differences are bootstrapped unpaired)."""
    if not row.model:
        return True
    from fewstep.models.folder import model_folder

    return read_json(model_folder(row.model) / "config.json").get("training", {}).get("method") != "gan"


def compare_rows(results: list[dict[str, Any]], out: Path, ref: Any) -> list[dict[str, Any]]:
    """FD differences with 90% bootstrap intervals (metrics.fd_difference): every student row against the teacher's
    best row (the lowest FD among the teacher's rows, the reference included), and every two students at the same
    NFE.  Paired where both rows share their samples' noise and labels; rows without saved features (cached by an
    older fewstep) are left out."""
    from fewstep.evaluate import metrics as M

    have = [r for r in results if r.get("fd") is not None and r.get("features") and (out / r["features"]).is_file()]
    teacher = [r for r in have if r["method"] in ("fewstep", "diffusers", "teacher-best")]
    students = [r for r in have if r["method"] == "student"]
    pairs = []
    if teacher:
        best = min(teacher, key=lambda r: r["fd"])
        pairs += [(s, best) for s in students]
    pairs += [(a, b) for i, a in enumerate(students) for b in students[i + 1:] if a["nfe"] == b["nfe"]
              and a["name"] != b["name"]]
    rows = []
    for a, b in pairs:
        fa, fb = (np.load(out / r["features"]).astype(np.float64) for r in (a, b))
        paired = bool(a.get("paired", True) and b.get("paired", True) and len(fa) == len(fb))
        d, lo, hi = M.fd_difference(fa, fb, ref, paired=paired)
        verdict = "a lower" if hi < 0 else ("b lower" if lo > 0 else "not resolved")
        rows.append({"a": a["label"], "b": b["label"], "fd_a": a["fd"], "fd_b": b["fd"], "ratio": a["fd"] / b["fd"],
                     "difference": d, "lo": lo, "hi": hi, "paired": paired, "verdict": verdict})
    return rows


def quality_curve(model: str | Path) -> list[tuple[float, float]]:
    """(distillation seconds, quality) pairs a student's run logged while it trained (``--set eval_every``): every
    stage's ``quality/fd`` (or ``quality/swd``) at the stage's training time plus the time of the stages before it,
    so a two-stage method's curve starts where its first stage's time ends.  Empty without ``eval_every``."""
    from fewstep.models.folder import model_folder

    folder = model_folder(model)
    run = folder.parent
    stages = read_json(folder / "config.json").get("training", {}).get("distill_stages") or []
    points: list[tuple[float, float]] = []
    offset = 0.0
    for st in stages:
        metrics = run / str(st.get("stage", "")) / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                value = rec.get("quality/fd", rec.get("quality/swd"))
                if isinstance(value, (int, float)) and isinstance(rec.get("time"), (int, float)):
                    points.append((offset + float(rec["time"]), float(value)))
        offset += float(st.get("wall_seconds") or 0.0)
    return points


def _has_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "model_index.json").is_file() or (folder / "unet").is_dir()


def check_models_fit(cfg: BenchConfig) -> None:
    """The bench's data fits its teacher (when its folder already holds one) and every student folder there is,
    as ``fewstep evaluate --data`` checks a model (runner.model_dataset): sample shape and classes.  Loading them
    here also refuses a damaged config or weights before anything is trained or sampled."""
    from fewstep.evaluate.runner import model_dataset
    from fewstep.models.folder import load_model, model_folder

    folders = [("teacher", cfg.teacher_folder)] if _has_model(cfg.teacher_folder) else []
    for s in cfg.students:
        try:
            folder = model_folder(s["model"])
        except FewstepError:  # a distillation run without its student yet: skipped later, with a message
            continue
        if (folder / "config.json").is_file():
            folders.append((f"student {s['name']!r}", folder))
    for what, folder in folders:
        try:
            model_dataset(load_model(folder), cfg.data)
        except FewstepError as e:
            msg = str(e).split(": pass the --data")[0]
            raise FewstepError(f"{cfg.where}: data {cfg.data} does not fit the {what} in {folder}: {msg}") from None


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


CSV_FIELDS = ["label", "method", "name", "spacing", "steps", "nfe", "guidance", "n", "fd", "fd_ci", "kid", "kid_std",
              "precision", "recall", "accuracy", "swd", "mmd", "loglik", "wall_seconds", "samples_per_s",
              "peak_rss_mb", "train_seconds", "feature_accuracy", "floor"]


def _write_csv(path: Path, results: list[dict[str, Any]], fields: list[str] | None = None) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields or CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in results:
        w.writerow({k: json.dumps(v) if isinstance(v, (dict, list, tuple)) else v for k, v in r.items()})
    write_text(path, buf.getvalue())
