"""Model folders: fewstep's own (safetensors + JSON config + model card) and diffusers' layouts.

A fewstep model folder holds
  - ``config.json``: how to rebuild the network (backbone kind + config), its parameterization, its noise
    schedule, classes, data and how to sample it (sampler, steps or timesteps, guidance);
  - ``model.safetensors``: the weights that are sampled and exported (the EMA weights of a teacher);
  - ``README.md``: a short model card.
``load_model`` also reads a diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``), a
``unet/`` + ``scheduler/`` pair without ``model_index.json``, a bare ``UNet2DModel`` folder, and a run folder (the
``--out`` of ``fewstep distill``: its final stage ``student/``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from torch import nn

import fewstep
from fewstep.diffusion.param import PARAMETERIZATIONS
from fewstep.diffusion.schedules import MODEL_SPACINGS, NoiseSchedule, check_timesteps
from fewstep.errors import FewstepError
from fewstep.io import load_tensors, read_json, save_tensors, write_json, write_text
from fewstep.models.backbones import BACKBONES, UNet2DFolderConfig, UNetBackbone, build_backbone, check_backbone_config
from fewstep.models.denoiser import Denoiser
from fewstep.models.scheduler_config import VPProcess, VPSchedule
from fewstep.schema import FieldProblem, Finite, NonNegInt, PosInt, Strict, check, describe_value, non_finite

FORMAT = "fewstep-model/1"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
FINAL_STAGE = "student"  # a run folder's (the --out of distill) final model


@dataclass
class SamplingDefaults:
    """How a model is sampled when the user gives no flag (students record their distilled timesteps)."""

    sampler: str = "dpmpp-2m"
    steps: int = 25
    spacing: str = "trailing"
    timesteps: list[float] | None = None
    guidance: float = 1.0
    eta: float = 0.0


@dataclass
class ModelConfig:
    """Everything needed to rebuild and sample a model.  ``schedule`` is ``{"type": "vp", ...VPProcess}``,
    ``{"type": "flow", "num_train_timesteps": T}`` or ``{"type": "karras", "num_train_timesteps": T,
    "sigma_min": .., "sigma_max": ..}``."""

    backbone: str
    backbone_config: dict[str, Any]
    prediction: str
    schedule: dict[str, Any]
    sample_shape: list[int]
    num_classes: int = 0
    null_class: int | None = None  # the label that means "no class" (classifier-free guidance)
    data: str | None = None  # a built-in data set's name or a user's data key (fewstep.data.spec)
    data_record: dict[str, Any] | None = None  # a user's data: content hashes, split, sizes (fewstep.data.datasets)
    role: str = "teacher"
    boundary: str | None = None  # "lcm": consistency-model boundary condition applied to the prediction
    guidance_range: list[float] | None = None  # the network takes the guidance scale as an input (trained range)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    training: dict[str, Any] = field(default_factory=dict)  # objective, steps, wall time, method, ...

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("boundary", "guidance_range", "data_record"):  # absent unless set (older configs stay equal)
            if d[k] is None:
                del d[k]
        return {"format": FORMAT, "fewstep_version": fewstep.__version__, **d}

    @staticmethod
    def from_json(obj: dict[str, Any], where: str) -> ModelConfig:
        """The config a model folder's ``config.json`` holds, checked field by field (:func:`check_config`): a value
        of the wrong type, not finite or out of range is one FewstepError line naming ``where`` and the field."""
        check_config(obj, where)
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        kw = {k: v for k, v in obj.items() if k in known}
        kw["sampling"] = SamplingDefaults(**kw.get("sampling", {}))
        return ModelConfig(**kw)

    def vp_process(self) -> VPProcess | None:
        if self.schedule.get("type") != "vp":
            return None
        fields = {k: v for k, v in self.schedule.items() if k != "type"}
        if fields.get("trained_betas"):
            fields["trained_betas"] = tuple(fields["trained_betas"])
        # the schedule dict leaves out the prediction (vp_schedule_dict pops it): take the model's own, else a
        # v-prediction teacher would export (and run as a diffusers baseline) as epsilon-prediction
        fields["prediction"] = self.prediction
        return VPProcess(**fields)

    def noise_schedule(self) -> NoiseSchedule:
        kind = self.schedule.get("type")
        T = int(self.schedule.get("num_train_timesteps", 1000))
        if kind == "vp":
            return self.vp_process().schedule()  # type: ignore[union-attr]
        if kind == "flow":
            return NoiseSchedule.flow(T)
        if kind == "karras":
            return NoiseSchedule.karras(T, self.schedule.get("sigma_min", 0.002), self.schedule.get("sigma_max", 80.0))
        raise FewstepError(f"unknown schedule type {kind!r} in model config")

    def x0_clip(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        p = self.vp_process()
        return p.x0_clip() if p else None

    def ddpm_variance(self) -> str:
        p = self.vp_process()
        return p.variance_type if p else "fixed_small"


# --- the schema of config.json ---------------------------------------------------------------------------------
NonNegFinite = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, description="a finite number >= 0")]


class SamplingSchema(Strict):
    sampler: str = Field("dpmpp-2m", description="a sampler's name")
    steps: PosInt = Field(25, description="a whole number >= 1")
    spacing: Literal[MODEL_SPACINGS] = Field("trailing",  # type: ignore[valid-type]
                                             description=", ".join(MODEL_SPACINGS))
    timesteps: list[Finite] | None = Field(None, min_length=1, description="a non-empty list of numbers, or null")
    guidance: NonNegFinite = 1.0
    eta: NonNegFinite = 0.0

    @field_validator("sampler")
    @classmethod
    def _known(cls, v: str) -> str:
        from fewstep.samplers import SAMPLERS

        if v not in SAMPLERS:
            raise ValueError(f"use one of {', '.join(SAMPLERS)}")
        return v


class DataRecordSchema(Strict):
    """What ``fewstep.data`` records about a user's data (other keys may follow in later versions)."""

    model_config = ConfigDict(strict=True, extra="allow")
    hash: str | None = None
    test_hash: str | None = None
    n_train: NonNegInt | None = None
    n_test: NonNegInt | None = None
    num_classes: NonNegInt | None = None
    class_names: list[str] | None = Field(None, description="a list of names, or null")
    sample_shape: list[PosInt] | None = None


class TrainingRecordSchema(Strict):
    """The training record is provenance (any keys); the ones fewstep reads back are typed."""

    model_config = ConfigDict(strict=True, extra="allow")
    steps: NonNegInt = Field(0, description="a whole number >= 0")
    wall_seconds: NonNegFinite = 0.0
    distill_wall_seconds: NonNegFinite = 0.0
    distilled_guidance: NonNegFinite = 1.0


class ConfigSchema(Strict):
    format: str
    fewstep_version: str = Field("", description="a version string")
    backbone: str = Field(description="one of " + ", ".join(BACKBONES))
    backbone_config: dict[str, Any] = Field(description="a mapping of the network's settings (a name or path is "
                                                        "never looked up)")
    prediction: str = Field(description="one of " + ", ".join(PARAMETERIZATIONS))
    schedule: dict[str, Any] = Field(description="a mapping with `type` vp, flow or karras")
    sample_shape: list[PosInt] = Field(description="[channels, height, width] or [dim], whole numbers >= 1")
    num_classes: NonNegInt = Field(0, description="a whole number >= 0 (0: unconditional)")
    null_class: NonNegInt | None = Field(None, description="a whole number >= 0 or null")
    data: str | None = Field(None, description="a data set's name or data key, or null")
    data_record: DataRecordSchema | None = Field(None, description="a mapping (what fewstep recorded about the data) "
                                                                   "or null")
    role: str = Field("teacher", description="a text such as teacher or student")
    boundary: Literal["lcm"] | None = Field(None, description="lcm or null")
    guidance_range: list[NonNegFinite] | None = Field(None, description="[low, high], finite numbers >= 0, or null")
    sampling: SamplingSchema = Field(default_factory=SamplingSchema, description="a mapping")
    training: TrainingRecordSchema = Field(default_factory=TrainingRecordSchema, description="a mapping")

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, v: str) -> str:
        if v not in BACKBONES:
            raise ValueError(f"unknown backbone {v!r}: use one of {', '.join(BACKBONES)}")
        return v

    @field_validator("prediction")
    @classmethod
    def _prediction(cls, v: str) -> str:
        if v not in PARAMETERIZATIONS:
            raise ValueError(f"unknown prediction {v!r}: use one of {', '.join(PARAMETERIZATIONS)}")
        return v

    @field_validator("sample_shape")
    @classmethod
    def _rank(cls, v: list[int]) -> list[int]:
        if len(v) not in (1, 3):
            raise ValueError("give [channels, height, width] for images or [dim] for vectors")
        return v

    @field_validator("guidance_range")
    @classmethod
    def _range(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 2 or v[0] > v[1]):
            raise ValueError("give [low, high] with low <= high")
        return v

    @model_validator(mode="after")
    def _classes(self) -> ConfigSchema:
        if self.null_class is not None and self.null_class < self.num_classes:
            raise FieldProblem("null_class", self.null_class, f"the null class is not one of the classes 0.."
                               f"{self.num_classes - 1} (num_classes = {self.num_classes}): give {self.num_classes} or "
                               "more, or null")
        if self.null_class is not None and not self.num_classes:
            raise FieldProblem("null_class", self.null_class, "an unconditional model (num_classes 0) has no null "
                               "class: give null")
        return self


class FlowSchedule(Strict):
    type: Literal["flow"]
    num_train_timesteps: PosInt = 1000


class KarrasSchedule(Strict):
    type: Literal["karras"]
    num_train_timesteps: int = Field(1000, strict=True, ge=2, description="a whole number >= 2")
    sigma_min: float = Field(0.002, strict=True, allow_inf_nan=False, gt=0, description="a finite number > 0")
    sigma_max: float = Field(80.0, strict=True, allow_inf_nan=False, gt=0, description="a finite number > 0")

    @model_validator(mode="after")
    def _order(self) -> KarrasSchedule:
        if not self.sigma_min < self.sigma_max:
            raise FieldProblem("sigma_min", self.sigma_min, f"give a sigma_min below sigma_max ({self.sigma_max})")
        return self


SCHEDULES: dict[str, type[Strict]] = {"vp": VPSchedule, "flow": FlowSchedule, "karras": KarrasSchedule}


def check_config(obj: Any, where: str) -> None:
    """A model config as ``config.json`` holds it: every field typed, finite and in range; the schedule's, the
    backbone's and the sampling defaults' own keys; timesteps inside the schedule.  One FewstepError line naming
    ``where`` and the field otherwise.  A config names no code and nothing to download: the backbone is one of
    fewstep's own kinds and its config a mapping of that kind's keys."""
    if not isinstance(obj, dict):
        raise FewstepError(f"{where}: should hold a JSON object")
    fmt = obj.get("format")
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith("fewstep-model/"):
            raise FewstepError(f"{where}: format = {fmt!r}: this fewstep reads {FORMAT} (the folder was written by "
                               "another version: upgrade fewstep, or re-export the model with the version that "
                               "wrote it)")
        raise FewstepError(f"{where}: format = {describe_value(fmt)}: not a fewstep model config (format {FORMAT})")
    top = check(ConfigSchema, obj, where)
    sched = obj["schedule"]
    kind = sched.get("type")
    if "type" not in sched:
        raise FewstepError(f"{where}: `schedule.type` is missing: give one of {', '.join(SCHEDULES)}")
    if kind not in SCHEDULES:
        raise FewstepError(f"{where}: schedule.type = {describe_value(kind)}: use one of {', '.join(SCHEDULES)}")
    check(SCHEDULES[kind], sched, where, "schedule")
    check_backbone_config(top.backbone, obj["backbone_config"], where)  # type: ignore[attr-defined]
    ts = top.sampling.timesteps  # type: ignore[attr-defined]
    if ts is not None:
        try:
            check_timesteps(ts, sched.get("num_train_timesteps", 1000))
        except FewstepError as e:
            raise FewstepError(f"{where}: sampling.timesteps = {describe_value(ts)}: {e}") from None


def check_fits(config: ModelConfig, net: nn.Module, where: str) -> None:
    """The network a config describes makes its samples and embeds its classes."""
    shape = tuple(net.sample_shape)  # type: ignore[attr-defined]
    if shape != tuple(config.sample_shape):
        raise FewstepError(f"{where}: sample_shape = {list(config.sample_shape)} but the network "
                           f"(backbone_config) makes samples of shape {list(shape)}: restore or recreate the folder")
    embeds = net.num_class_embeds  # type: ignore[attr-defined]
    k, null = config.num_classes, config.null_class
    if k and embeds < k + (null is not None):
        raise FewstepError(f"{where}: num_classes = {k}" + (f" with null_class {null}" if null is not None else "") +
                           f" but the network embeds {embeds} class labels (num_class_embeds)")
    if null is not None and null >= embeds:
        raise FewstepError(f"{where}: null_class = {null} is outside the network's {embeds} class embeddings")
    if embeds and not k and isinstance(net, UNetBackbone):
        raise FewstepError(f"{where}: num_classes = 0 but the network is class-conditional ({embeds} class "
                           "embeddings): give the number of classes")


def check_finite_weights(state: dict[str, torch.Tensor], where: str, doing: str) -> None:
    """Refuse weights holding NaN or inf: ``doing`` says what is refused (a file read, a folder written)."""
    bad, first = non_finite(state)
    if bad:
        raise FewstepError(f"{where} holds {bad} NaN or infinite values (first in {first}): {doing}")


def vp_schedule_dict(process: VPProcess) -> dict[str, Any]:
    d = dataclasses.asdict(process)
    d["trained_betas"] = list(process.trained_betas) if process.trained_betas else None
    d.pop("prediction")
    return {"type": "vp", **d}


@dataclass
class LoadedModel:
    """A model ready to sample: its denoiser (eval mode), its config, where it came from."""

    denoiser: Denoiser
    config: ModelConfig
    source: str  # "fewstep", "diffusers-pipeline", "diffusers-unet"
    path: Path

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.config.sample_shape)


def build_denoiser(config: ModelConfig, net: nn.Module | None = None) -> Denoiser:
    net = net if net is not None else build_backbone(config.backbone, config.backbone_config)
    return Denoiser(net, config.noise_schedule(), config.prediction, config.num_classes, config.null_class,
                    config.boundary)


def model_card(config: ModelConfig, extra: str = "") -> str:
    s = config.sampling
    how = f"--timesteps {','.join(str(t) for t in s.timesteps)}" if s.timesteps else f"--steps {s.steps}"
    cls = (f"{config.num_classes} classes (null class {config.null_class} for guidance)" if config.num_classes
           else "unconditional")
    w_input = (f"; takes the guidance scale as an input (trained for {config.guidance_range[0]}.."
               f"{config.guidance_range[1]})" if config.guidance_range else "")
    return (
        f"# fewstep {config.role}\n\n"
        f"- data: {config.data or 'unknown'}; samples of shape {tuple(config.sample_shape)}; {cls}\n"
        f"- network: {config.backbone} predicting `{config.prediction}`; schedule: {config.schedule.get('type')}"
        f"{'; consistency boundary: ' + config.boundary if config.boundary else ''}{w_input}\n"
        f"- training: {', '.join(f'{k}={v}' for k, v in config.training.items()) or 'n/a'}\n\n"
        f"Sample it with:\n\n```\nfewstep sample --model THIS_FOLDER --sampler {s.sampler} {how} "
        "--out samples.png\n```\n"
        f"{extra}"
    )


def save_model(path: Path, config: ModelConfig, net: nn.Module, card_extra: str = "") -> None:
    """Write a model folder atomically file by file (weights first, config last)."""
    path = Path(path)
    state = net.state_dict()
    check_finite_weights(state, "the network to save", f"training diverged (a lower learning rate may help); nothing "
                         f"written to {path}")
    save_tensors(path / "model.safetensors", state, metadata={"format": FORMAT})
    write_text(path / "README.md", model_card(config, card_extra))
    write_json(path / "config.json", config.to_json())


def weights_file(folder: Path) -> Path:
    """The weights file of a fewstep folder, a diffusers pipeline folder or a bare UNet folder."""
    for rel in ("model.safetensors", f"unet/{DIFFUSERS_WEIGHTS}", DIFFUSERS_WEIGHTS):
        if (Path(folder) / rel).is_file():
            return Path(folder) / rel
    raise FewstepError(f"{folder} has no weights file")


def _load_state(net: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:  # name the first mismatch, not torch's generic "Error(s) in loading ..." header
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = (lines[1] if len(lines) > 1 else lines[0])[:160]
        raise FewstepError(f"weights in {where} do not fit the network its config describes ({first})") from None


def _is_model(path: Path) -> bool:
    return any((path / f).exists() for f in ("config.json", "model_index.json", "unet", DIFFUSERS_WEIGHTS))


def _run_record(path: Path) -> Path | None:
    """The run record of a run folder (``distill.json`` and the like: a JSON file naming a method and options)."""
    import json

    for f in sorted(path.glob("*.json")):
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(obj, dict) and "method" in obj and "options" in obj:
            return f
    return None


def model_folder(path: str | Path) -> Path:
    """The model folder ``path`` names: itself, or for a run folder (the ``--out`` of ``fewstep distill``) its
    final stage ``student/``."""
    path = Path(path)
    if path.is_dir() and not _is_model(path):
        if (path / FINAL_STAGE / "config.json").is_file():
            return path / FINAL_STAGE
        record = _run_record(path)
        if record is not None:
            raise FewstepError(f"{path} is a training run ({record.name}) without its final model {FINAL_STAGE}/ yet: "
                               "finish it with --resume, or pass one of its stage folders")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load any model folder fewstep understands (see module docstring), in eval mode.  A run folder (the
    ``--out`` of ``fewstep distill``) loads its final stage."""
    path = Path(path)
    if not path.exists():
        raise FewstepError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise FewstepError(f"{path} is not a folder: --model takes a fewstep or diffusers model folder")
    path = model_folder(path)
    if (path / "config.json").is_file() and "format" in (raw := read_json(path / "config.json")):
        where = str(path / "config.json")
        config = ModelConfig.from_json(raw, where)
        try:
            den = build_denoiser(config)
        except FewstepError:
            raise
        except Exception as e:  # noqa: BLE001 - an edited/corrupt config makes diffusers or torch raise anything
            raise FewstepError(f"{where} describes a network that cannot be built "
                               f"({str(e).splitlines()[0][:120]}): restore or recreate the model folder") from None
        check_fits(config, den.net, where)
        state = load_tensors(path / "model.safetensors")
        check_finite_weights(state, str(path / "model.safetensors"), "the training diverged or the file is damaged: "
                             "retrain or restore the model")
        _load_state(den.net, state, path)
        return LoadedModel(den.to(device).eval(), config, "fewstep", path)
    return _load_diffusers(path, device)


class SidecarSchema(Strict):
    """``fewstep.json`` beside an exported diffusers folder: what diffusers' configs cannot say."""

    num_classes: NonNegInt = Field(0, description="a whole number >= 0")
    null_class: NonNegInt | None = Field(None, description="a whole number >= 0 or null")
    data: str | None = Field(None, description="a data set's name or data key, or null")
    role: str = "teacher"

    @model_validator(mode="after")
    def _classes(self) -> SidecarSchema:
        if self.null_class is not None and not self.num_classes:
            raise FieldProblem("null_class", self.null_class, "an unconditional model (num_classes 0) has no null "
                               "class: give null")
        if self.null_class is not None and self.null_class < self.num_classes:
            raise FieldProblem("null_class", self.null_class, f"the null class is not one of the classes 0.."
                               f"{self.num_classes - 1} (num_classes = {self.num_classes}): give {self.num_classes} or "
                               "more, or null")
        return self


def _check_index(index: dict[str, Any], where: str) -> None:
    """A pipeline's ``model_index.json``: fewstep reads its unet (a diffusers UNet2DModel) and its scheduler's config;
    no class it names is looked up.  A pipeline with other parts (a VAE, a text encoder) works in another space than
    the samples fewstep writes, so it is refused."""
    if "unet" not in index:
        raise FewstepError(f"{where}: the pipeline has no `unet` (only UNet2DModel pipelines are supported)")
    if index["unet"] != ["diffusers", "UNet2DModel"]:
        raise FewstepError(f"{where}: unet = {describe_value(index['unet'])}: fewstep reads a diffusers UNet2DModel "
                           "only ([\"diffusers\", \"UNet2DModel\"])")
    extra = [k for k, v in index.items() if not k.startswith("_") and k not in ("unet", "scheduler")
             and v not in (None, [None, None])]
    if extra:
        raise FewstepError(f"{where}: the pipeline also has {', '.join(extra)}: fewstep samples pixel-space pipelines "
                           "of a unet and a scheduler only")


def _load_diffusers(path: Path, device) -> LoadedModel:
    from diffusers import UNet2DModel

    if (path / "unet").is_dir():
        unet_dir, sched_dir, source = path / "unet", path / "scheduler", "diffusers-pipeline"
        if (path / "model_index.json").is_file():
            _check_index(read_json(path / "model_index.json", "model_index"), str(path / "model_index.json"))
    elif (path / "config.json").is_file():
        unet_dir, sched_dir, source = path, path.parent / "scheduler", "diffusers-unet"
    else:
        raise FewstepError(f"{path} is not a model folder: no config.json, model_index.json or unet/ inside")
    ucfg = read_json(unet_dir / "config.json", "UNet config")
    uwhere = str(unet_dir / "config.json")
    if "_class_name" not in ucfg:
        raise FewstepError(f"{uwhere} is neither a fewstep model config (no `format`) nor a diffusers UNet2DModel "
                           "config (no `_class_name`)")
    if ucfg["_class_name"] != "UNet2DModel":
        raise FewstepError(f"{uwhere}: _class_name = {describe_value(ucfg['_class_name'])}: fewstep reads UNet2DModel "
                           "folders only (no other class is looked up)")
    check(UNet2DFolderConfig, ucfg, uwhere)
    if ucfg.get("sample_size") is None:
        raise FewstepError(f"{uwhere}: `sample_size` is missing: give a whole number >= 1 or [height, width]")
    if not (unet_dir / DIFFUSERS_WEIGHTS).is_file():
        raise FewstepError(f"{unet_dir} has no {DIFFUSERS_WEIGHTS}: fewstep loads safetensors weights only "
                           "(convert .bin with diffusers' save_pretrained(safe_serialization=True))")
    if (sched_dir / "scheduler_config.json").is_file():
        swhere = str(sched_dir / "scheduler_config.json")
        process = VPProcess.from_diffusers(read_json(sched_dir / "scheduler_config.json", "scheduler config"), swhere)
        note = ""
    else:  # a bare UNet: assume diffusers' DDPMScheduler defaults, and say so in `info`
        process, note = VPProcess.from_diffusers({"_class_name": "DDPMScheduler"}), "no scheduler config"
    side_file = path / "fewstep.json"
    side = read_json(side_file, "fewstep sidecar") if side_file.is_file() else {}
    check(SidecarSchema, side, str(side_file))
    weights = unet_dir / DIFFUSERS_WEIGHTS
    # fail with our one-line message when it is corrupt or holds NaN
    state = load_tensors(weights)
    check_finite_weights(state, str(weights), "the training diverged or the file is damaged: retrain or restore the "
                         "model")
    _check_unet_weights(ucfg, state, weights, uwhere)
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True)
    except FewstepError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds; the user needs one line
        raise FewstepError(f"could not load the UNet in {unet_dir} ({str(e).splitlines()[0][:100]})") from None
    n_embeds = unet.config.num_class_embeds or 0
    num_classes = int(side.get("num_classes", n_embeds))
    null_class = side.get("null_class")
    size = unet.config.sample_size
    shape = [unet.config.in_channels, *((size, size) if isinstance(size, int) else size)]
    config = ModelConfig(
        backbone="unet2d", backbone_config=UNetBackbone(unet).config, prediction=process.prediction,
        schedule=vp_schedule_dict(process), sample_shape=shape, num_classes=num_classes, null_class=null_class,
        data=side.get("data"), role=side.get("role", "teacher"), sampling=SamplingDefaults(sampler="ddim", steps=50),
        training={"source": source, **({"note": note} if note else {})},
    )
    check_fits(config, UNetBackbone(unet), str(side_file) if side else uwhere)
    den = Denoiser(UNetBackbone(unet), process.schedule(), process.prediction, num_classes, null_class)
    return LoadedModel(den.to(device).eval(), config, source, path)


def _check_unet_weights(ucfg: dict[str, Any], state: dict[str, torch.Tensor], weights: Path, uwhere: str) -> None:
    """The weights are the network the config describes: the same tensor names and shapes (diffusers only warns
    about unexpected tensors, so weights of another network with a few extra tensors would load half-used)."""
    from diffusers import UNet2DModel

    kw = {k: v for k, v in ucfg.items() if not k.startswith("_") and k in UNet2DFolderConfig.model_fields}
    try:
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in UNet2DModel(**kw).state_dict().items()}
    except Exception as e:  # noqa: BLE001 - a config diffusers cannot build: one line
        raise FewstepError(f"{uwhere} describes a network that cannot be built ({str(e).splitlines()[0][:100]})") \
            from None
    legacy = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # what diffusers renames
    have = {re.sub(r"\.(query|key|value|proj_attn)\.(weight|bias)$", lambda m: f".{legacy[m[1]]}.{m[2]}", k):
            tuple(v.shape) for k, v in state.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or shapes:
        what = (f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else
                f"{len(extra)} tensors the network does not have (e.g. {extra[0]})" if extra else
                f"{shapes[0]} has shape {list(have[shapes[0]])}, the config's network {list(want[shapes[0]])}")
        raise FewstepError(f"{weights} does not fit {uwhere}: {what}; the weights belong to another network: restore "
                           "the folder's own weights or config")


def export_diffusers(model: LoadedModel, out: Path) -> str:
    """Write what diffusers can represent; returns a description.  Raises FewstepError otherwise."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    cfg = model.config
    out = Path(out)
    if cfg.boundary or cfg.guidance_range:
        raise FewstepError("this student is a consistency model or takes the guidance scale as an input: no diffusers "
                           "pipeline samples it correctly, so fewstep does not export it (use the fewstep folder)")
    if cfg.backbone != "unet2d":
        raise FewstepError(f"diffusers has no pipeline for a {cfg.backbone} network: only UNet2DModel models export")
    process = cfg.vp_process()
    if process is None or cfg.prediction not in ("eps", "v", "x0"):
        raise FewstepError(
            f"diffusers' DDPMScheduler cannot represent a {cfg.prediction!r} model on a {cfg.schedule.get('type')} "
            "schedule: only eps/v/x0 prediction on a discrete VP schedule exports (use the fewstep folder instead)"
        )
    if cfg.sampling.timesteps is not None or cfg.role != "teacher":
        raise FewstepError("this model is a few-step student; diffusers' DDPMScheduler would sample it with the "
                           "wrong steps, so fewstep does not export it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FewstepError(f"{out} exists and is not an empty folder: choose a new output folder")
    unet: UNet2DModel = model.denoiser.net.unet  # type: ignore[union-attr]
    check_finite_weights(unet.state_dict(), "the model to export", f"nothing written to {out}")
    scheduler = DDPMScheduler.from_config(process.to_diffusers())
    if cfg.num_classes:
        unet.save_pretrained(str(out / "unet"), safe_serialization=True)
        scheduler.save_pretrained(str(out / "scheduler"))
        write_json(out / "fewstep.json", {"num_classes": cfg.num_classes, "null_class": cfg.null_class,
                                          "data": cfg.data})
        return f"class-conditional UNet2DModel in {out}/unet and DDPMScheduler in {out}/scheduler"
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
    if cfg.data:
        write_json(out / "fewstep.json", {"num_classes": 0, "null_class": None, "data": cfg.data})
    return f"DDPMPipeline in {out} (DDPMPipeline.from_pretrained({str(out)!r}) loads it)"


def describe(model: LoadedModel) -> list[tuple[str, str]]:
    """Rows for `fewstep info`."""
    c = model.config
    n_params = sum(p.numel() for p in model.denoiser.parameters())
    sched = c.schedule.get("type")
    if sched == "vp":
        sched = (f"discrete VP, {c.schedule['beta_schedule']}, T={c.schedule['num_train_timesteps']}"
                 + (", zero terminal SNR" if c.schedule.get("rescale_betas_zero_snr") else "")
                 + (", clip_sample" if c.schedule.get("clip_sample") else "")
                 + (", thresholding" if c.schedule.get("thresholding") else ""))
    s = c.sampling
    how = f"timesteps {s.timesteps}" if s.timesteps else f"{s.steps} steps ({s.spacing})"
    rows = [
        ("folder", f"{model.path} ({model.source})"), ("role", c.role),
        ("network", f"{c.backbone}, {n_params / 1e6:.2f} M parameters"), ("prediction", c.prediction),
        ("schedule", str(sched)), ("sample shape", str(tuple(c.sample_shape))),
        ("classes", f"{c.num_classes}" + (f" (null class {c.null_class})" if c.null_class is not None else "")),
        ("data", c.data or "unknown (pass --data where needed)"),
        ("sampling", f"{s.sampler}, {how}, guidance {s.guidance}"),
    ]
    r = c.data_record
    if r:
        names = f"; classes {', '.join(r['class_names'])}" if r.get("class_names") else ""
        rows.insert(-1, ("data record", f"{r.get('n_train')} train / {r.get('n_test')} test images ({r.get('split')}); "
                                        f"content hash {r.get('hash')}{names}"))
    if c.boundary:
        rows.append(("boundary", f"{c.boundary} (a consistency model: f(x, sigma_min) = x)"))
    if c.guidance_range:
        rows.append(("guidance input", f"w in {c.guidance_range[0]}..{c.guidance_range[1]} (1 NFE per step)"))
    rows += [(f"training.{k}", str(v)) for k, v in c.training.items()]
    return rows
