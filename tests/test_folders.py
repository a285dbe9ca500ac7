"""Model folders: fewstep's own format, corrupt inputs, and diffusers folders in (load) and out (export).

Interop tests use tiny untrained networks (the test8 preset, ~60 k parameters): what is checked is that the
same numbers come out of the same weights and the same process, which needs no training.
"""

import dataclasses
import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from fewstep.diffusion.schedules import alphas_cumprod_from_betas, make_betas, spaced_timesteps
from fewstep.errors import FewstepError
from fewstep.generate import generate
from fewstep.models.backbones import preset_backbone
from fewstep.models.denoiser import Denoiser
from fewstep.models.folder import LoadedModel, SamplingDefaults, export_diffusers, load_model, save_model
from fewstep.samplers import IndexedNoise
from fewstep.training.teacher import TeacherMethod, TeacherSpec

SHAPE = (1, 8, 8)


# conftest.py pins torch to one thread for the whole suite.


# --- helpers ------------------------------------------------------------------------------------------
def _teacher(num_classes: int = 0, objective: str = "ddpm", prediction: str | None = None, preset: str = "test8",
             shape: tuple[int, ...] = SHAPE, data: str | None = "digits") -> TeacherMethod:
    kind, cfg = preset_backbone(preset, shape, num_classes)
    torch.manual_seed(0)
    method = TeacherMethod(TeacherSpec(objective=objective, prediction=prediction, backbone=kind, backbone_config=cfg,
                                       sample_shape=shape, num_classes=num_classes, data=data))
    with torch.no_grad():  # untrained nets can have zero output layers: make every output depend on the weights
        for p in method.denoiser.net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return method


def _saved(path: Path, method: TeacherMethod) -> Path:
    save_model(path, method.config, method.denoiser.net)
    return path


def _tiny_unet(num_class_embeds: int | None = None) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=num_class_embeds,
    )


def _probe(den: Denoiser, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and eps of a denoiser on a fixed input at four noise levels (from very noisy to almost clean)."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(4, *den.net.sample_shape, generator=g)
    sigma = den.schedule.sigma([999.0, 500.0, 50.0, 3.0])
    with torch.no_grad():
        p = den(x * (1 + sigma.float().view(-1, *[1] * (x.ndim - 1)) ** 2).sqrt(), sigma, cond)
    return p.x0, p.eps


def _assert_same_outputs(a: Denoiser, b: Denoiser, cond: torch.Tensor | None = None) -> None:
    (xa, ea), (xb, eb) = _probe(a, cond), _probe(b, cond)
    assert torch.equal(xa, xb) and torch.equal(ea, eb)
    assert xa.abs().max() > 0.1  # the probe really exercised the network


def _pipeline_samples(folder: Path, n: int, steps: int, seed: int = 0) -> np.ndarray:
    """Run DDPMPipeline from ``folder`` with fewstep's per-sample noise (initial, then one draw per noisy step)."""
    src = IndexedNoise.range(seed, 0, n)
    init = src.initial(SHAPE)
    draws = iter([init] + [src.step(i, init) for i in range(steps)])
    pipe = DDPMPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    with mock.patch("diffusers.pipelines.ddpm.pipeline_ddpm.randn_tensor", lambda *a, **k: next(draws)), \
            mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor", lambda *a, **k: next(draws)):
        return pipe(batch_size=n, num_inference_steps=steps, output_type="np").images  # (n, H, W, C) in [0, 1]


def _as_pipeline_images(x: torch.Tensor) -> np.ndarray:
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and len(msg) < 400, msg
    return msg


# --- fewstep folders ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conditional-eps", "unconditional-v", "mlp"])
def test_fewstep_folder_round_trip(kind, tmp_path):
    if kind == "mlp":
        method = _teacher(num_classes=8, preset="mlp-small", shape=(2,), data="gmm")
    else:
        method = _teacher(num_classes=10 if kind == "conditional-eps" else 0, prediction=kind.split("-")[1])
    method.config.sampling = SamplingDefaults(sampler="euler", steps=7, spacing="linspace", guidance=2.5)
    path = _saved(tmp_path / "model", method)
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "fewstep sample --model THIS_FOLDER --sampler euler --steps 7" in (path / "README.md").read_text()

    model = load_model(path)
    assert model.source == "fewstep" and not model.denoiser.training
    cfg = model.config
    assert cfg.to_json() == json.loads(json.dumps(method.config.to_json()))  # every field, schedule included
    assert cfg.sampling == SamplingDefaults(sampler="euler", steps=7, spacing="linspace", guidance=2.5)
    raw = json.loads((path / "config.json").read_text())
    assert raw["format"] == "fewstep-model/1"
    if kind == "mlp":
        assert (raw["data"], raw["num_classes"], raw["null_class"], raw["backbone"]) == ("gmm", 8, 8, "mlp")
        cond = torch.tensor([0, 3, 7, 8])  # 8 = the null class
    elif kind == "conditional-eps":
        assert (raw["data"], raw["num_classes"], raw["null_class"], raw["prediction"]) == ("digits", 10, 10, "eps")
        assert raw["schedule"]["type"] == "vp" and raw["schedule"]["clip_sample"] is True
        cond = torch.tensor([0, 3, 9, 10])
    else:
        assert (raw["num_classes"], raw["null_class"], raw["prediction"]) == (0, None, "v")
        cond = None
    _assert_same_outputs(method.denoiser.eval(), model.denoiser, cond)
    if cond is not None:  # and the class really matters, so the labels went through
        assert not torch.equal(_probe(model.denoiser, cond)[0], _probe(model.denoiser, cond.flip(0))[0])


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    return _saved(tmp_path_factory.mktemp("folders") / "good", _teacher(num_classes=10))


def _edit_config(change):
    def edit(p: Path) -> None:
        cfg = json.loads((p / "config.json").read_text())
        change(cfg)
        (p / "config.json").write_text(json.dumps(cfg))
    return edit


def _truncate(p: Path) -> None:
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])


def _other_weights(p: Path) -> None:
    m = _teacher(num_classes=0)  # same preset, but no class embedding
    save_model(p / "tmp", m.config, m.denoiser.net)
    shutil.move(p / "tmp" / "model.safetensors", p / "model.safetensors")
    shutil.rmtree(p / "tmp")


CORRUPTIONS = {
    "truncated weights": (_truncate, r"model\.safetensors is corrupt"),
    "garbage weights": (lambda p: (p / "model.safetensors").write_bytes(b"not safetensors at all " * 8),
                        r"model\.safetensors is corrupt"),
    "empty weights": (lambda p: (p / "model.safetensors").write_bytes(b""), r"model\.safetensors is corrupt"),
    "missing weights": (lambda p: (p / "model.safetensors").unlink(), r"model\.safetensors is missing"),
    "invalid JSON": (lambda p: (p / "config.json").write_text('{"format": "fewstep-model/1", "backbone": '),
                     r"config\.json is not valid JSON"),
    "JSON not an object": (lambda p: (p / "config.json").write_text("[1, 2]"), "should hold a JSON object"),
    "missing config field": (_edit_config(lambda c: c.pop("backbone")), "malformed field"),
    "weights of another size": (_edit_config(lambda c: c["backbone_config"].update(block_out_channels=[16, 64])),
                                "do not fit the network its config describes .*size mismatch"),
    "weights without class embedding": (_other_weights, "do not fit the network its config describes .*Missing"),
    "unbuildable network": (_edit_config(lambda c: c["backbone_config"].update(block_out_channels=[16, 32, 64])),
                            "describes a network that cannot be built"),
    "unknown backbone": (_edit_config(lambda c: c.update(backbone="transformer")), "unknown backbone"),
    "unknown prediction": (_edit_config(lambda c: c.update(prediction="score")), "unknown prediction"),
    "no model inside": (lambda p: [f.unlink() for f in p.iterdir()], "is not a model folder"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_fewstep_folder_is_a_one_line_error(name, good_folder, tmp_path):
    corrupt, match = CORRUPTIONS[name]
    path = tmp_path / "model"
    shutil.copytree(good_folder, path)
    corrupt(path)
    with pytest.raises(FewstepError, match=match) as e:
        load_model(path)
    _one_line(e)


def test_missing_folder_and_file_instead_of_folder(tmp_path, good_folder):
    with pytest.raises(FewstepError, match="does not exist") as e:
        load_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in _one_line(e)
    with pytest.raises(FewstepError, match="is not a folder"):
        load_model(good_folder / "model.safetensors")


@pytest.mark.parametrize("which", ["pipeline", "unet"])
def test_diffusers_bin_weights_are_refused_without_unpickling(which, tmp_path, monkeypatch):
    DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(str(tmp_path),
                                                                            safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert not (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load called on a .bin file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(FewstepError, match="safetensors weights only") as e:
        load_model(tmp_path if which == "pipeline" else tmp_path / "unet")
    _one_line(e)


def _diffusers_folder(path: Path, **sched) -> Path:
    DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler(**sched)).save_pretrained(str(path))
    return path


DIFFUSERS_BREAKAGES = {
    "truncated UNet weights": (lambda p: (p / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08"),
                               "corrupt"),
    "invalid scheduler JSON": (lambda p: (p / "scheduler" / "scheduler_config.json").write_text("{"),
                               "not valid JSON"),
    "not a UNet2DModel": (lambda p: _edit_json(p / "unet" / "config.json", _class_name="UNet2DConditionModel"),
                          "UNet2DModel folders only"),
    "learned variance": (lambda p: _edit_json(p / "scheduler" / "scheduler_config.json", variance_type="learned"),
                         "learned variance"),
    "not a DDPM-family scheduler": (lambda p: _edit_json(p / "scheduler" / "scheduler_config.json",
                                                         _class_name="ScoreSdeVeScheduler"), "ScoreSdeVeScheduler"),
    "UNet config that does not fit the weights": (
        lambda p: _edit_json(p / "unet" / "config.json", block_out_channels=[16, 64]),
        "does not fit .*restore the folder"),
}


def _edit_json(path: Path, **fields) -> None:
    obj = json.loads(path.read_text())
    obj.update(fields)
    path.write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    return _diffusers_folder(tmp_path_factory.mktemp("diffusers") / "pipe")


@pytest.mark.parametrize("name", DIFFUSERS_BREAKAGES)
def test_broken_diffusers_folder_is_a_one_line_error(name, diffusers_folder, tmp_path):
    breakage, match = DIFFUSERS_BREAKAGES[name]
    path = tmp_path / "pipe"
    shutil.copytree(diffusers_folder, path)
    breakage(path)
    with pytest.raises(FewstepError, match=match) as e:
        load_model(path)
    _one_line(e)


# --- diffusers folders in -------------------------------------------------------------------------------
SCHEDULER_VARIANTS = {
    "eps, clip_sample": dict(prediction_type="epsilon", clip_sample=True),
    "v, clip_sample": dict(prediction_type="v_prediction", clip_sample=True),
    "v, zero SNR, scaled_linear": dict(prediction_type="v_prediction", clip_sample=False, rescale_betas_zero_snr=True,
                                       beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "eps, thresholding, cosine, fixed_large": dict(
        prediction_type="epsilon", clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.9,
        sample_max_value=3.0, beta_schedule="squaredcos_cap_v2", variance_type="fixed_large"),
}


@pytest.mark.parametrize("variant", SCHEDULER_VARIANTS)
def test_ddpm_pipeline_folder_loads_and_samples_like_the_pipeline(variant, tmp_path):
    sched = SCHEDULER_VARIANTS[variant]
    path = _diffusers_folder(tmp_path / "pipe", **sched)
    model = load_model(path)
    cfg = model.config
    assert model.source == "diffusers-pipeline" and tuple(cfg.sample_shape) == SHAPE
    assert (cfg.num_classes, cfg.null_class) == (0, None)
    assert cfg.prediction == {"epsilon": "eps", "v_prediction": "v"}[sched["prediction_type"]]
    s = cfg.schedule
    assert s["type"] == "vp" and s["beta_schedule"] == sched.get("beta_schedule", "linear")
    for key in ("clip_sample", "thresholding", "rescale_betas_zero_snr", "dynamic_thresholding_ratio",
                "sample_max_value", "variance_type", "beta_start", "beta_end"):
        if key in sched:
            assert s[key] == sched[key], key
    # the noise levels are exactly the scheduler's alphas_cumprod (zero terminal SNR kept finite)
    ref = DDPMScheduler(**sched).alphas_cumprod.double().clamp(min=2.0**-24)
    torch.testing.assert_close(model.denoiser.schedule.sigmas, ((1 - ref) / ref).sqrt(), rtol=1e-12, atol=0)

    # sampling: fewstep's ddpm sampler at diffusers' default (leading) timesteps, same noise -> same images
    n, steps = 3, 4
    timesteps = spaced_timesteps(steps, 1000, "leading")
    ours = generate(model, "ddpm", [float(t) for t in timesteps], n, seed=5).x
    theirs = _pipeline_samples(path, n, steps, seed=5)
    assert theirs.shape == (n, 8, 8, 1)
    inside = ((theirs > 0.01) & (theirs < 0.99)).mean()
    assert inside > 0.25 and theirs.std() > 0.05, (inside, theirs.std())  # not all clipped: the comparison bites
    np.testing.assert_allclose(_as_pipeline_images(ours), theirs, atol=2e-5, rtol=0)


def test_pipeline_comparison_detects_a_wrong_prediction_type(tmp_path):
    """Negative control for the parity test: reading a v-prediction UNet as eps gives other images."""
    path = _diffusers_folder(tmp_path / "pipe", prediction_type="v_prediction", clip_sample=True)
    model = load_model(path)
    wrong = dataclasses.replace(model, denoiser=Denoiser(model.denoiser.net, model.denoiser.schedule, "eps"))
    theirs = _pipeline_samples(path, 3, 4)
    ours = generate(wrong, "ddpm", [750.0, 500.0, 250.0, 0.0], 3).x
    assert np.abs(_as_pipeline_images(ours) - theirs).max() > 0.05


def test_bare_unet_and_unet_scheduler_pair_load(tmp_path):
    pipe = _diffusers_folder(tmp_path / "pipe", prediction_type="v_prediction", clip_sample=False,
                             beta_schedule="scaled_linear")
    full = load_model(pipe)

    # a UNet folder alone: diffusers' DDPMScheduler defaults, and `info` says the scheduler was missing
    shutil.copytree(pipe / "unet", tmp_path / "alone" / "unet_only")
    bare = load_model(tmp_path / "alone" / "unet_only")
    assert bare.source == "diffusers-unet" and bare.config.prediction == "eps"
    d = DDPMScheduler()
    assert bare.config.schedule["beta_schedule"] == d.config.beta_schedule == "linear"
    assert bare.config.schedule["clip_sample"] is True and bare.config.training["note"] == "no scheduler config"
    _assert_same_outputs_raw(full, bare)

    # the unet/ folder of a pipeline reads its sibling scheduler/
    sibling = load_model(pipe / "unet")
    assert sibling.config.prediction == "v" and sibling.config.schedule == full.config.schedule

    # unet/ + scheduler/ without model_index.json
    pair = tmp_path / "pair"
    shutil.copytree(pipe, pair)
    (pair / "model_index.json").unlink()
    loaded = load_model(pair)
    assert loaded.config.prediction == "v" and loaded.config.schedule == full.config.schedule
    assert loaded.config.schedule["beta_schedule"] == "scaled_linear" and loaded.config.schedule["clip_sample"] is False
    _assert_same_outputs(full.denoiser, loaded.denoiser)


def _assert_same_outputs_raw(a: LoadedModel, b: LoadedModel) -> None:
    """Same UNet weights: same raw network output (the two may read it as different parameterizations)."""
    x, t = torch.randn(2, *SHAPE), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        assert torch.equal(a.denoiser.net(x, t), b.denoiser.net(x, t))


# --- export to diffusers --------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_unconditional_teacher_exports_a_ddpm_pipeline(prediction, tmp_path):
    original = load_model(_saved(tmp_path / "teacher", _teacher(prediction=prediction)))
    out = tmp_path / "export"
    assert "DDPMPipeline" in export_diffusers(original, out)
    assert (out / "model_index.json").is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    sched = DDPMScheduler.from_pretrained(str(out / "scheduler"))
    assert sched.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[prediction]
    assert sched.config.clip_sample is True and sched.config.beta_schedule == "linear"
    torch.testing.assert_close(sched.alphas_cumprod, alphas_cumprod_from_betas(make_betas()), rtol=0, atol=0)

    # diffusers runs it, and (same noise) its images are fewstep's ddpm samples of the original teacher
    images = _pipeline_samples(out, 2, 3)
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    exported_steps = [float(t) for t in spaced_timesteps(3, 1000, sched.config.timestep_spacing)]
    ours = generate(original, "ddpm", exported_steps, 2).x
    np.testing.assert_allclose(_as_pipeline_images(ours), images, atol=2e-5, rtol=0)

    # round trip: the exported folder loads back into the same denoiser and process
    back = load_model(out)
    assert back.source == "diffusers-pipeline" and back.config.prediction == prediction
    assert back.config.schedule == original.config.schedule and back.config.data == "digits"
    _assert_same_outputs(original.denoiser, back.denoiser)


def test_exported_pipeline_runs_with_its_own_noise(tmp_path):
    original = load_model(_saved(tmp_path / "teacher", _teacher()))
    export_diffusers(original, tmp_path / "export")
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "export"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1) and images.min() >= 0 and images.max() <= 1 and images.std() > 0


def test_conditional_teacher_exports_unet_and_scheduler(tmp_path):
    original = load_model(_saved(tmp_path / "teacher", _teacher(num_classes=10)))
    out = tmp_path / "export"
    msg = export_diffusers(original, out)
    assert "unet" in msg and "scheduler" in msg
    assert not (out / "model_index.json").exists()  # DDPMPipeline has no class labels: no pipeline is claimed
    unet = UNet2DModel.from_pretrained(str(out / "unet"))
    sched = DDPMScheduler.from_pretrained(str(out / "scheduler"))
    assert unet.config.num_class_embeds == 11 and sched.config.prediction_type == "epsilon"
    x, t, y = torch.randn(3, *SHAPE), torch.tensor([999, 400, 5]), torch.tensor([0, 9, 10])
    with torch.no_grad():
        assert torch.equal(unet(x, t, class_labels=y).sample, original.denoiser.net(x, t.float(), y))

    back = load_model(out)
    assert (back.config.num_classes, back.config.null_class, back.config.data) == (10, 10, "digits")
    assert back.config.schedule == original.config.schedule
    _assert_same_outputs(original.denoiser, back.denoiser, torch.tensor([0, 4, 9, 10]))
    # guidance works on the re-loaded export, as on the original
    a = generate(original, "euler", [999.0, 500.0], 2, labels=torch.tensor([1, 2]), guidance=3.0)
    b = generate(back, "euler", [999.0, 500.0], 2, labels=torch.tensor([1, 2]), guidance=3.0)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe == 4


@pytest.mark.parametrize("what", ["edm", "flow", "mlp", "student"])
def test_what_diffusers_cannot_represent_is_refused(what, tmp_path):
    if what == "mlp":
        method = _teacher(preset="mlp-small", shape=(2,), data="gmm")
    else:
        method = _teacher(objective=what if what != "student" else "ddpm")
    if what == "student":
        method.config.sampling = SamplingDefaults(sampler="ddim", timesteps=[999.0, 499.0])
    model = load_model(_saved(tmp_path / "model", method))
    with pytest.raises(FewstepError, match={"edm": "cannot represent a 'edm'", "flow": "cannot represent a 'flow'",
                                            "mlp": "only UNet2DModel", "student": "student"}[what]) as e:
        export_diffusers(model, tmp_path / "out")
    _one_line(e)
    assert not (tmp_path / "out").exists()


def test_export_never_writes_into_a_non_empty_folder_or_a_file(tmp_path):
    model = load_model(_saved(tmp_path / "model", _teacher()))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    (tmp_path / "a_file").write_text("keep me")
    for out in (tmp_path / "busy", tmp_path / "a_file"):
        with pytest.raises(FewstepError, match="not an empty folder") as e:
            export_diffusers(model, out)
        _one_line(e)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
    assert (tmp_path / "a_file").read_text() == "keep me"
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    export_diffusers(model, tmp_path / "empty")
    assert (tmp_path / "empty" / "model_index.json").is_file()
