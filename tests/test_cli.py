"""The `fewstep` command line through typer's CliRunner (and one real `python -m fewstep` subprocess).

Models are tiny untrained test8 networks saved as fewstep folders: the CLI's job is to pass the user's choices to
the library unchanged, so most tests compare the written array with the library's own `generate` output.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.diffusion.schedules import spaced_timesteps
from fewstep.generate import class_labels, generate, resolve_timesteps
from fewstep.models.backbones import preset_backbone
from fewstep.models.folder import SamplingDefaults, load_model, save_model
from fewstep.samplers import IndexedNoise
from fewstep.training.teacher import TeacherMethod, TeacherSpec

SHAPE = (1, 8, 8)


# conftest.py pins torch to one thread for the whole suite.


def _model(path: Path, num_classes: int = 0, sampling: SamplingDefaults | None = None, preset: str = "test8",
           shape: tuple[int, ...] = SHAPE, data: str = "digits") -> Path:
    kind, cfg = preset_backbone(preset, shape, num_classes)
    torch.manual_seed(0)
    method = TeacherMethod(TeacherSpec(backbone=kind, backbone_config=cfg, sample_shape=shape,
                                       num_classes=num_classes, data=data))
    with torch.no_grad():  # make the output depend on the weights everywhere (some layers start at zero)
        for p in method.denoiser.net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if sampling is not None:
        method.config.sampling = sampling
    save_model(path, method.config, method.denoiser.net)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-models")
    return {
        "uncond": _model(root / "uncond"),
        "cond": _model(root / "cond", num_classes=10),
        # recorded defaults that differ from every CLI default
        "defaults": _model(root / "defaults", num_classes=10,
                           sampling=SamplingDefaults(sampler="euler", steps=3, spacing="linspace", guidance=2.0)),
        "student": _model(root / "student", sampling=SamplingDefaults(sampler="ddim", timesteps=[999.0, 400.5])),
        "mlp": _model(root / "mlp", preset="mlp-small", shape=(2,), data="gmm"),
    }


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(*args) -> str:
    res = _run(*args)
    assert res.exit_code == 0, (res.exit_code, res.stdout, res.stderr, res.exception)
    return res.stdout


def _sample(model: Path, out: Path, *args) -> tuple[np.ndarray, str]:
    """Run `fewstep sample`, return the written array and the one printed line."""
    stdout = _ok("sample", "--model", model, "--out", out, *args)
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout  # one line even with a long path (no wrapping at 80 columns)
    return np.load(out), lines[0]


def _library(model_dir: Path, sampler: str, n: int, steps: int | None = None, spacing: str | None = None,
             timesteps: list[float] | None = None, seed: int = 0, class_id: int | None = None,
             guidance: float = 1.0) -> np.ndarray:
    m = load_model(model_dir)
    ts = resolve_timesteps(m, steps, spacing, timesteps)
    return generate(m, sampler, ts, n, seed=seed, labels=class_labels(m, n, class_id), guidance=guidance).x.numpy()


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float32 round-off: CPU kernels sum in a batch-size-dependent order (~1e-6 relative)."""
    assert a.shape == b.shape
    err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
    assert err < 1e-4, err


# --- bad input: exit status 2 and one line --------------------------------------------------------------
def _corrupt(models, tmp):
    shutil.copytree(models["cond"], tmp / "corrupt")
    (tmp / "corrupt" / "model.safetensors").write_bytes(b"\x00garbage")
    return tmp / "corrupt"


def _latents(models, tmp):
    np.save(tmp / "lat.npy", np.zeros((3, 1, 4, 4), np.float32))
    return tmp / "lat.npy"


def _sample_args(model_key, *extra):
    return lambda models, tmp: ["sample", "--model", models[model_key], "--out", tmp / "x.npy", *extra]


BAD_INPUT = {
    "unknown sampler": (_sample_args("uncond", "--sampler", "rk4"), "unknown sampler 'rk4'"),
    "unknown dataset": (lambda m, tmp: ["train", "--data", "nope", "--out", tmp / "run"],
                        r"--data .*nope: no such file or folder \(built-in data sets: digits"),
    "missing model folder": (lambda m, tmp: ["sample", "--model", tmp / "no_such", "--out", tmp / "x.npy"],
                             "does not exist"),
    "model is a file": (lambda m, tmp: ["sample", "--model", m["cond"] / "config.json", "--out", tmp / "x.npy"],
                        "is not a folder"),
    "corrupt model folder": (lambda m, tmp: ["sample", "--model", _corrupt(m, tmp), "--out", tmp / "x.npy"],
                             "is corrupt or not safetensors"),
    "class above the classes": (_sample_args("cond", "--class", "10"), "outside the model's classes 0..9"),
    "negative class": (_sample_args("cond", "--class", "-1"), "outside the model's classes 0..9"),
    "class on unconditional": (_sample_args("uncond", "--class", "3"), "the model is unconditional"),
    "timestep out of range": (_sample_args("uncond", "--timesteps", "1000,500"), r"outside \[0, 999\]"),
    "negative timestep": (_sample_args("uncond", "--timesteps", "500,-1"), r"outside \[0, 999\]"),
    "timesteps not decreasing": (_sample_args("uncond", "--timesteps", "100,500"), "strictly decreasing"),
    "repeated timestep": (_sample_args("uncond", "--timesteps", "500,500"), "strictly decreasing"),
    "non-numeric timesteps": (_sample_args("uncond", "--timesteps", "999,half"), "comma-separated numbers"),
    "steps and timesteps": (_sample_args("uncond", "--steps", "2", "--timesteps", "999"), "not both"),
    "zero steps": (_sample_args("uncond", "--steps", "0"), "at least 1"),
    "too many steps": (_sample_args("uncond", "--steps", "1001"), "exceeds the model's 1000"),
    "unknown spacing": (_sample_args("uncond", "--steps", "2", "--spacing", "cosine"), "unknown spacing"),
    "latents of the wrong shape": (lambda m, tmp: ["sample", "--model", m["uncond"], "--out", tmp / "x.npy",
                                                   "--latents", _latents(m, tmp)], r"expected \(3, 1, 8, 8\)"),
    "missing latents file": (_sample_args("uncond", "--latents", "/nonexistent/lat.npy"), "does not exist"),
    "bad --out suffix": (lambda m, tmp: ["sample", "--model", m["uncond"], "--out", tmp / "x.jpg"], r"\.npy .* \.png"),
    "guidance on unconditional": (_sample_args("uncond", "--guidance", "2"), "needs a class-conditional model"),
    "eta with another sampler": (_sample_args("uncond", "--eta", "0.5", "--sampler", "euler"), "ddim sampler only"),
    "zero samples": (_sample_args("uncond", "--n", "0", "--steps", "1"), "--n 0: give at least 1"),
    "zero batch size": (_sample_args("uncond", "--batch-size", "0", "--steps", "1"), "--batch-size 0"),
    "path that looks like markup": (lambda m, tmp: ["sample", "--model", tmp / "run[/b]" / "x[v2]",
                                                    "--out", tmp / "x.npy"], r"run\[/b\]/x\[v2\] does not exist"),
    "train into an existing run": (lambda m, tmp: ["train", "--data", "digits", "--preset", "test8", "--steps", "1",
                                                   "--out", m["uncond"]], "pass --resume or choose a new --out"),
    "export a 2-D model": (lambda m, tmp: ["export", m["mlp"], tmp / "exp"], "only UNet2DModel"),
    "info on a missing folder": (lambda m, tmp: ["info", tmp / "no_such"], "does not exist"),
    # distill: every option error comes before anything is written (--out is tmp/exp, checked to be absent)
    "distill: an option the method lacks": (lambda m, tmp: ["distill", "--teacher", m["mlp"], "--method", "progressive",
                                                            "--pairs", "10", "--out", tmp / "exp"],
                                            "progressive has no option pairs; its options: steps, start_steps"),
    "distill: --set of an unknown option": (lambda m, tmp: ["distill", "--teacher", m["mlp"], "--set",
                                                            "no_such_option=1", "--out", tmp / "exp"],
                                            "--set no_such_option=1: progressive has no option no_such_option"),
    "distill: --set of the wrong type": (lambda m, tmp: ["distill", "--teacher", m["mlp"], "--set", "iters=many",
                                                         "--out", tmp / "exp"], "iters=many: give a whole number"),
    "distill: unknown method": (lambda m, tmp: ["distill", "--teacher", m["mlp"], "--method", "nope", "--out",
                                                tmp / "exp"], "unknown method 'nope'"),
    "distill: --config that is missing": (lambda m, tmp: ["distill", "--teacher", m["mlp"], "--config",
                                                          tmp / "no.yaml", "--out", tmp / "exp"], "does not exist"),
    "train: batch not divisible by --grad-accum": (lambda m, tmp: ["train", "--data", "gmm", "--preset", "mlp-small",
                                                                   "--steps", "1", "--batch", "3", "--grad-accum",
                                                                   "2", "--out", tmp / "exp"], "must divide by"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_exit_2_and_one_line(case, models, tmp_path):
    build, match = BAD_INPUT[case]
    before = {p: p.read_bytes() for p in models["uncond"].iterdir()}
    res = _run(*build(models, tmp_path))
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    assert isinstance(res.exception, SystemExit)  # raised by the CLI, not an escaped exception
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output and res.stdout == ""
    assert re.search(match, lines[0]), (match, lines[0])
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "exp").exists()  # nothing half-written
    assert {p: p.read_bytes() for p in models["uncond"].iterdir()} == before  # an existing run is not touched


# --- sample: output files and what the printed line says ------------------------------------------------
def test_sample_npy_is_the_library_output_in_the_data_range(models, tmp_path):
    x, line = _sample(models["cond"], tmp_path / "x.npy", "--n", "5", "--sampler", "ddpm", "--steps", "4",
                      "--class", "3", "--seed", "7")
    assert x.shape == (5, 1, 8, 8) and x.dtype == np.float32
    assert -1 <= x.min() < 0 < x.max() <= 1 and x.std() > 0.1  # images in [-1, 1]: ddpm clips x0 (clip_sample)
    np.testing.assert_array_equal(x, _library(models["cond"], "ddpm", 5, steps=4, seed=7, class_id=3))
    assert line.startswith("5 samples with ddpm at 4 steps (4 NFE per sample)") and line.endswith("x.npy")


def test_sample_png_is_a_valid_picture(models, tmp_path):
    line = _ok("sample", "--model", models["uncond"], "--out", tmp_path / "grid.png", "--n", "4", "--steps", "2",
               "--sampler", "ddim")
    assert line.startswith("4 samples with ddim") and line.strip().endswith("grid.png")
    with Image.open(tmp_path / "grid.png") as img:
        img.verify()
    with Image.open(tmp_path / "grid.png") as img:
        assert img.format == "PNG" and img.mode == "L"
        assert img.size == (4 * (2 * 9 + 1),) * 2  # 2x2 grid of 8x8 images, 1-pixel gaps, scale 4
        assert len(set(np.asarray(img).ravel().tolist())) > 10  # pictures, not a blank canvas
    _ok("sample", "--model", models["mlp"], "--out", tmp_path / "points.png", "--n", "50", "--steps", "2")
    with Image.open(tmp_path / "points.png") as img:  # 2-D data: a scatter plot
        assert img.format == "PNG" and img.size[0] > 100


@pytest.mark.parametrize("sampler, steps, guidance, nfe", [
    ("euler", 3, None, 3), ("euler", 3, "2.5", 6), ("heun", 3, None, 5), ("heun", 3, "2.5", 10),
    ("dpmpp-2m", 1, "0", 2), ("ddim", 2, "1", 2),
])
def test_printed_nfe_counts_guided_steps_twice_and_heun_2n_minus_1(sampler, steps, guidance, nfe, models,
                                                                    tmp_path):
    args = ["--n", "3", "--batch-size", "2", "--sampler", sampler, "--steps", steps]
    args += ["--guidance", guidance] if guidance is not None else []
    x, line = _sample(models["cond"], tmp_path / "x.npy", *args)
    assert f"3 samples with {sampler} at {steps} steps ({nfe} NFE per sample)" in line
    assert np.isfinite(x).all()


# --- noise is drawn per sample index -------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "ddpm"])
def test_samples_do_not_depend_on_batch_size_or_n(sampler, models, tmp_path):
    common = ["--sampler", sampler, "--steps", "3"]
    six_by_two, _ = _sample(models["uncond"], tmp_path / "a.npy", "--n", "6", "--batch-size", "2", *common)
    six_at_once, _ = _sample(models["uncond"], tmp_path / "b.npy", "--n", "6", "--batch-size", "6", *common)
    three, _ = _sample(models["uncond"], tmp_path / "c.npy", "--n", "3", *common)
    other_seed, _ = _sample(models["uncond"], tmp_path / "d.npy", "--n", "6", "--seed", "1", *common)
    _close(six_by_two, six_at_once)
    _close(three, six_at_once[:3])
    # the tolerance above is far below what a different seed (or a shuffled sample order) changes
    assert np.abs(other_seed - six_at_once).max() > 0.1
    assert np.abs(six_at_once[1:] - six_at_once[:-1]).max() > 0.1


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "ddpm"])
def test_latents_reproduce_the_seeded_noise(sampler, models, tmp_path):
    noise = IndexedNoise.range(3, 0, 4).initial(SHAPE).numpy()
    np.save(tmp_path / "lat.npy", noise)
    seeded, _ = _sample(models["uncond"], tmp_path / "a.npy", "--n", "4", "--seed", "3", "--sampler", sampler,
                        "--steps", "3")
    given, line = _sample(models["uncond"], tmp_path / "b.npy", "--latents", tmp_path / "lat.npy", "--seed", "3",
                          "--sampler", sampler, "--steps", "3")
    assert line.startswith("4 samples")  # --latents sets n
    np.testing.assert_array_equal(given, seeded)
    np.save(tmp_path / "lat2.npy", np.flip(noise, 0).copy())  # the same latents in reverse order
    flipped, _ = _sample(models["uncond"], tmp_path / "c.npy", "--latents", tmp_path / "lat2.npy", "--seed", "3",
                         "--sampler", sampler, "--steps", "3")
    if sampler == "dpmpp-2m":  # deterministic: the samples follow their latents
        _close(flipped, np.flip(seeded, 0).copy())
    else:  # ddpm: the per-step noise still belongs to the sample index, so the samples change
        assert np.abs(flipped - np.flip(seeded, 0)).max() > 0.1


# --- which timesteps ----------------------------------------------------------------------------------
def test_no_flags_use_the_models_recorded_defaults(models, tmp_path):
    x, line = _sample(models["defaults"], tmp_path / "a.npy", "--n", "4")
    assert "with euler at 3 steps (6 NFE per sample)" in line  # recorded guidance 2.0: 2 NFE per step
    np.testing.assert_array_equal(x, _library(models["defaults"], "euler", 4, steps=3, spacing="linspace",
                                              guidance=2.0))
    explicit, _ = _sample(models["defaults"], tmp_path / "b.npy", "--n", "4", "--sampler", "euler", "--steps", "3",
                          "--spacing", "linspace", "--guidance", "2")
    np.testing.assert_array_equal(x, explicit)
    # a student records its own timesteps
    y, line = _sample(models["student"], tmp_path / "c.npy", "--n", "2")
    assert "with ddim at 2 steps (2 NFE per sample)" in line
    np.testing.assert_array_equal(y, _library(models["student"], "ddim", 2, timesteps=[999.0, 400.5]))
    # and --steps overrides them
    _, line = _sample(models["student"], tmp_path / "d.npy", "--n", "2", "--steps", "4")
    assert "at 4 steps" in line


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_steps_with_spacing(spacing, models, tmp_path):
    x, line = _sample(models["uncond"], tmp_path / "a.npy", "--n", "3", "--sampler", "euler", "--steps", "3",
                      "--spacing", spacing)
    assert "at 3 steps (3 NFE" in line
    ts = [float(t) for t in spaced_timesteps(3, 1000, spacing)]
    np.testing.assert_array_equal(x, _library(models["uncond"], "euler", 3, timesteps=ts))
    other = {"leading": "trailing", "trailing": "linspace", "linspace": "leading"}[spacing]
    y, _ = _sample(models["uncond"], tmp_path / "b.npy", "--n", "3", "--sampler", "euler", "--steps", "3",
                   "--spacing", other)
    assert np.abs(x - y).max() > 1e-3  # the spacing reached the sampler


def test_explicit_timesteps(models, tmp_path):
    x, line = _sample(models["uncond"], tmp_path / "a.npy", "--n", "3", "--sampler", "ddim",
                      "--timesteps", "999,500,100")
    assert "with ddim at 3 steps (3 NFE per sample)" in line
    np.testing.assert_array_equal(x, _library(models["uncond"], "ddim", 3, timesteps=[999.0, 500.0, 100.0]))
    y, _ = _sample(models["uncond"], tmp_path / "b.npy", "--n", "3", "--sampler", "ddim",
                   "--timesteps", "999, 500.5 ,100")  # fractional and spaced values are fine
    assert np.abs(x - y).max() > 0


# --- info and export ----------------------------------------------------------------------------------
def test_info_prints_the_rows(models):
    out = _ok("info", models["cond"])
    rows = {line.split(None, 1)[0]: line.split(None, 1)[1].strip() for line in out.splitlines() if line.strip()}
    assert rows["role"] == "teacher" and rows["prediction"] == "eps" and rows["data"] == "digits"
    assert rows["classes"] == "10 (null class 10)"
    assert rows["network"].startswith("unet2d,") and "M parameters" in rows["network"]
    assert rows["schedule"].startswith("discrete VP, linear, T=1000") and "clip_sample" in rows["schedule"]
    assert rows["sampling"] == "dpmpp-2m, 25 steps (trailing), guidance 1.0"
    assert rows["training.objective"] == "ddpm" and "(fewstep)" in out
    assert "timesteps [999.0, 400.5]" in _ok("info", models["student"])


def test_export_writes_a_loadable_folder(models, tmp_path):
    from diffusers import DDPMPipeline

    out = _ok("export", models["uncond"], tmp_path / "exp")
    assert out.startswith("wrote DDPMPipeline") and len(out.strip().splitlines()) == 1
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "exp"))
    assert pipe.unet.config.sample_size == 8
    assert "diffusers-pipeline" in _ok("info", tmp_path / "exp")
    # sampling the export through the CLI gives the original's samples (same weights, same process)
    a, _ = _sample(models["uncond"], tmp_path / "a.npy", "--n", "2", "--sampler", "ddim", "--steps", "3")
    b, _ = _sample(tmp_path / "exp", tmp_path / "b.npy", "--n", "2", "--sampler", "ddim", "--steps", "3")
    np.testing.assert_array_equal(a, b)
    _ok("export", models["cond"], tmp_path / "exp_cond")
    assert (tmp_path / "exp_cond" / "unet").is_dir() and (tmp_path / "exp_cond" / "scheduler").is_dir()
    assert "10 (null class 10)" in _ok("info", tmp_path / "exp_cond")
    assert _run("export", models["cond"], tmp_path / "exp_cond").exit_code == 2  # never overwrites


# --- train ---------------------------------------------------------------------------------------------
def test_train_then_resume(tmp_path):
    args = ["train", "--data", "gmm", "--preset", "mlp-small", "--steps", "30", "--ckpt-every", "10",
            "--batch", "32"]
    out = _ok(*args, "--out", tmp_path / "run")
    assert out.startswith("trained 30 steps") and "final loss denoise" in out and len(out.strip().splitlines()) == 1
    model = load_model(tmp_path / "run")
    assert model.config.data == "gmm" and model.config.backbone == "mlp" and model.config.training["steps"] == 30
    weights = load_file(tmp_path / "run" / "model.safetensors")

    # a run that crashed after its step-20 checkpoint resumes to the same weights as the uninterrupted run
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "run", crashed)
    shutil.rmtree(crashed / "checkpoints" / "step_00000030")
    (crashed / "checkpoints" / "latest").write_text("step_00000020")
    (crashed / "model.safetensors").unlink()
    assert _ok(*args, "--out", crashed, "--resume").startswith("trained 30 steps")
    resumed = load_file(crashed / "model.safetensors")
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)

    # resuming a finished run with the same arguments works and changes nothing
    out = _ok(*args, "--out", tmp_path / "run", "--resume")
    assert out.startswith("trained 30 steps") and "already finished" in out
    again = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    # with another network it refuses (exit 2, one line)
    res = _run("train", "--data", "gmm", "--preset", "mlp", "--steps", "30", "--out", tmp_path / "run", "--resume")
    assert res.exit_code == 2 and "other settings" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    # --resume where no run exists yet (killed before it made its folder) starts it, saying so
    res = _run(*args, "--out", tmp_path / "fresh", "--resume")
    assert res.exit_code == 0 and "holds no run yet" in res.stderr
    fresh = load_file(tmp_path / "fresh" / "model.safetensors")
    assert all(torch.equal(fresh[k], weights[k]) for k in weights)


def test_train_grad_accum_reaches_the_loop(tmp_path):
    _ok("train", "--data", "gmm", "--preset", "mlp-small", "--steps", "4", "--batch", "32", "--grad-accum", "2",
        "--out", tmp_path / "run")
    state = (tmp_path / "run" / "checkpoints" / "step_00000004" / "state.json").read_text()
    assert '"grad_accum": 2' in state


def test_python_dash_m_fewstep_help():
    proc = subprocess.run([sys.executable, "-m", "fewstep", "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "sample", "info", "export"):
        assert command in proc.stdout
    assert "Traceback" not in proc.stderr


def test_train_resume_of_a_unet_run_and_refusals(tmp_path):
    """UNet configs hold tuples in memory and lists on disk: --resume must still recognise the run."""
    from typer.testing import CliRunner

    from fewstep.cli import app

    r = CliRunner()
    args = ["train", "--data", "digits", "--preset", "test8", "--conditional", "--steps", "4", "--batch", "8",
            "--ckpt-every", "2", "--out", str(tmp_path / "u")]
    assert r.invoke(app, args).exit_code == 0
    assert r.invoke(app, [*args, "--resume"]).exit_code == 0
    bad = r.invoke(app, [*args[:-2], "--out", str(tmp_path / "u"), "--beta-schedule", "scaled_linear", "--resume"])
    assert bad.exit_code == 2 and "schedule" in bad.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README.md").write_text("mine")
    busy = r.invoke(app, [*args[:-2], "--out", str(tmp_path / "other")])
    assert busy.exit_code == 2 and (tmp_path / "other" / "README.md").read_text() == "mine"
    assert r.invoke(app, [*args[:-2], "--out", str(tmp_path / "z"), "--ckpt-every", "0"]).exit_code == 2
    assert r.invoke(app, [*args[:-2], "--out", str(tmp_path / "z"), "--mixed-precision", "fp8"]).exit_code == 2
