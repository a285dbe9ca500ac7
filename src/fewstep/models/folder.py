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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fewstep
from fewstep.diffusion.schedules import NoiseSchedule
from fewstep.errors import FewstepError
from fewstep.io import load_tensors, read_json, save_tensors, write_json, write_text
from fewstep.models.backbones import UNetBackbone, build_backbone
from fewstep.models.denoiser import Denoiser
from fewstep.models.scheduler_config import VPProcess

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
        if obj.get("format") != FORMAT:
            raise FewstepError(f"{where} is not a fewstep model config (format {obj.get('format')!r})")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        kw = {k: v for k, v in obj.items() if k in known}
        try:
            kw["sampling"] = SamplingDefaults(**kw.get("sampling", {}))
            return ModelConfig(**kw)
        except TypeError as e:
            raise FewstepError(f"{where} has a malformed field ({e}): recreate the model folder") from None

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
    save_tensors(path / "model.safetensors", net.state_dict(), metadata={"format": FORMAT})
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
    if (path / "config.json").is_file() and read_json(path / "config.json").get("format") == FORMAT:
        config = ModelConfig.from_json(read_json(path / "config.json"), str(path / "config.json"))
        try:
            den = build_denoiser(config)
        except FewstepError:
            raise
        except Exception as e:  # noqa: BLE001 - an edited/corrupt config makes diffusers or torch raise anything
            raise FewstepError(f"{path / 'config.json'} describes a network that cannot be built "
                               f"({str(e).splitlines()[0][:120]}): restore or recreate the model folder") from None
        _load_state(den.net, load_tensors(path / "model.safetensors"), path)
        return LoadedModel(den.to(device).eval(), config, "fewstep", path)
    return _load_diffusers(path, device)


def _load_diffusers(path: Path, device) -> LoadedModel:
    from diffusers import UNet2DModel

    if (path / "unet").is_dir():
        unet_dir, sched_dir, source = path / "unet", path / "scheduler", "diffusers-pipeline"
        if (path / "model_index.json").is_file():
            index = read_json(path / "model_index.json", "model_index")
            if "unet" not in index:
                raise FewstepError(f"{path}: the pipeline has no `unet` (only UNet2DModel pipelines are supported)")
    elif (path / "config.json").is_file():
        unet_dir, sched_dir, source = path, path.parent / "scheduler", "diffusers-unet"
    else:
        raise FewstepError(f"{path} is not a model folder: no config.json, model_index.json or unet/ inside")
    ucfg = read_json(unet_dir / "config.json", "UNet config")
    if ucfg.get("_class_name") != "UNet2DModel":
        raise FewstepError(f"{unet_dir} holds a {ucfg.get('_class_name')}, fewstep reads UNet2DModel folders only")
    if not (unet_dir / DIFFUSERS_WEIGHTS).is_file():
        raise FewstepError(f"{unet_dir} has no {DIFFUSERS_WEIGHTS}: fewstep loads safetensors weights only "
                           "(convert .bin with diffusers' save_pretrained(safe_serialization=True))")
    if (sched_dir / "scheduler_config.json").is_file():
        process = VPProcess.from_diffusers(read_json(sched_dir / "scheduler_config.json", "scheduler config"))
        note = ""
    else:  # a bare UNet: assume diffusers' DDPMScheduler defaults, and say so in `info`
        process, note = VPProcess.from_diffusers({"_class_name": "DDPMScheduler"}), "no scheduler config"
    try:
        load_tensors(unet_dir / DIFFUSERS_WEIGHTS)  # fail with our one-line message when it is corrupt
        unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True)
    except FewstepError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds; the user needs one line
        raise FewstepError(f"could not load the UNet in {unet_dir} ({str(e).splitlines()[0][:100]})") from None
    side = read_json(path / "fewstep.json", "fewstep sidecar") if (path / "fewstep.json").is_file() else {}
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
    den = Denoiser(UNetBackbone(unet), process.schedule(), process.prediction, num_classes, null_class)
    return LoadedModel(den.to(device).eval(), config, source, path)


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
