"""What must keep working across the recipe layer (issue 10, item 5): published bench row keys, runs started before
it, the old Python options record, one teacher builder for the CLI and the bench, `--model RUN_FOLDER`."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import fewstep
from fewstep.cli import app
from fewstep.errors import FewstepError
from fewstep.io import file_sha256
from fewstep.models.folder import load_model, weights_file


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(*args) -> str:
    res = _run(*args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res.stdout


# --- bench row keys ----------------------------------------------------------------------------------------
def _pinned_teacher(out):
    """A deterministic mlp-small gmm teacher folder (weights from linspace, no training): the same folder the
    pinned keys were computed on with the bench of fewstep 0.1.0 before the recipe layer."""
    from fewstep.models.backbones import build_backbone, preset_backbone
    from fewstep.models.folder import save_model
    from fewstep.training.teacher import TeacherSpec, teacher_config

    kind, bcfg = preset_backbone("mlp-small", (2,), 0)
    cfg = teacher_config(TeacherSpec(backbone=kind, backbone_config=bcfg, sample_shape=(2,), data="gmm"))
    net = build_backbone(kind, bcfg)
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            p.copy_(torch.linspace(-0.1, 0.1, p.numel()).reshape(p.shape) * (i + 1))
    cfg.training = {"objective": "ddpm", "steps": 5, "wall_seconds": 1.0}
    save_model(out, cfg, net)
    return out


def test_bench_row_keys_are_pinned(tmp_path):
    """A change to the key re-measures every published row (benchmarks/results): these values are what the
    published rows' bench computed.  Change them only together with a re-measured table."""
    from fewstep.evaluate.bench import KeyContext, Row, row_key

    folder = _pinned_teacher(tmp_path / "teacher")
    assert fewstep.__version__ == "0.1.0"  # part of every key: bump it only when measured numbers change
    assert file_sha256(weights_file(folder)) == "35a7667370bdb995"
    keys = KeyContext.of(load_model(folder), n=500, seed=0, guidance=1.0, data="gmm", features=None)
    assert row_key(Row("fewstep", "dpmpp-2m", 4), keys) == "bfd3724a66a763a9d1714d7b"
    assert row_key(Row("diffusers", "DDIM", 2, "best"), keys) == "370a83e1c882ef4dfeb2b5be"
    assert row_key(Row("student", "pd", 1, model=str(folder)), keys) == "681dd06b9864d4d4e7254cff"
    # a student's path is not in its key; a distillation run folder names its student
    shutil.copytree(folder, tmp_path / "run" / "student")
    assert row_key(Row("student", "pd", 1, model=str(tmp_path / "run")), keys) == "681dd06b9864d4d4e7254cff"


# --- runs started before the recipe layer ---------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("compat") / "teacher"
    _ok("train", "--data", "gmm", "--preset", "mlp-small", "--conditional", "--steps", "30", "--batch", "32",
        "--out", out)
    return out


PD = ["--method", "progressive", "--guidance", "2", "--start-steps", "2", "--steps", "1", "--iters", "4",
      "--batch", "32", "--lr", "5e-4"]


def _old_record(teacher, **changes):
    """OUT/distill.json exactly as fewstep wrote it before the recipe layer, for the PD command above."""
    options = {"steps": 1, "iters": 4, "reparam_iters": None, "guidance": 2.0, "guidance_range": None,
               "loss": "huber", "start_steps": 2, "teacher_steps": 50, "pairs": 4000, "preset": None,
               "ema_target": 0.95}
    return {"method": "progressive", "options": {**options, **changes},
            "teacher": file_sha256(weights_file(teacher)), "data": "gmm", "seed": 0, "batch": 32, "lr": 0.0005}


def test_a_run_recorded_in_the_old_format_resumes_with_the_same_command(teacher, tmp_path):
    out = tmp_path / "pd"
    _ok("distill", "--teacher", teacher, "--out", out, *PD)
    # interrupted in the last stage before its first checkpoint, with the record of the old format
    weights = load_file(out / "student" / "model.safetensors")
    shutil.rmtree(out / "student")
    (out / "distill.json").write_text(json.dumps(_old_record(teacher), indent=2) + "\n")
    line = _ok("distill", "--teacher", teacher, "--out", out, *PD, "--resume")
    assert "student (1 steps, progressive)" in line
    again = load_file(out / "student" / "model.safetensors")
    assert all(torch.equal(again[k], weights[k]) for k in weights)  # the same student
    # another method's option the old record held (e.g. a --pairs the old CLI ignored) is not compared
    (out / "distill.json").write_text(json.dumps(_old_record(teacher, pairs=123, preset="mlp")))
    _ok("distill", "--teacher", teacher, "--out", out, *PD, "--resume")
    # an option of this method that differs is refused, as before
    res = _run("distill", "--teacher", teacher, "--out", out, *PD[:-2], "--lr", "1e-3", "--set", "start_steps=4",
               "--resume")
    assert res.exit_code == 2 and "other settings (lr, start_steps)" in res.stderr, res.output


def test_options_record_of_before_still_runs_from_python(teacher, tmp_path):
    from fewstep.data.datasets import load_dataset
    from fewstep.distill import DistillContext, DistillOptions, distill
    from fewstep.distill.progressive import ProgressiveOptions
    from fewstep.training.loop import TrainConfig

    ds = load_dataset("gmm", "train")
    tc = TrainConfig(batch=32, lr=1e-3, warmup=1, ckpt_every=10**6, progress=False)

    def ctx(options, out, steps=None):
        cfg = tc if steps is None else dataclasses.replace(tc, steps=steps)
        return DistillContext(load_model(teacher), teacher, (ds.x, ds.y), "gmm", tmp_path / out, options, cfg)

    old = distill("progressive", ctx(DistillOptions(steps=1, start_steps=1, iters=3, guidance=2.0), "a"))
    new = distill("progressive", ctx(ProgressiveOptions(steps=1, start_steps=1, guidance=2.0), "b", steps=3))
    a, b = load_file(old.student / "model.safetensors"), load_file(new.student / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FewstepError, match="progressive has no option pairs"):
        distill("progressive", ctx(DistillOptions(steps=1, start_steps=1, iters=3, pairs=10), "c"))


# --- one teacher builder ---------------------------------------------------------------------------------
def test_cli_and_bench_build_the_same_teacher_beta_schedule_included(tmp_path):
    from fewstep.evaluate.bench import BenchConfig, ensure_teacher

    _ok("train", "--data", "gmm", "--preset", "mlp-small", "--steps", "3", "--beta-schedule", "scaled_linear",
        "--out", tmp_path / "cli")
    cfg = BenchConfig(name="t", data="gmm", out=tmp_path / "b", teacher_folder=tmp_path / "bench",
                      teacher_train={"preset": "mlp-small", "steps": 3, "beta_schedule": "scaled_linear"})
    ensure_teacher(cfg, log=lambda s: None)
    a, b = load_model(tmp_path / "cli"), load_model(tmp_path / "bench")
    assert b.config.schedule["beta_schedule"] == "scaled_linear"
    assert {**a.config.to_json(), "training": None} == {**b.config.to_json(), "training": None}
    wa, wb = load_file(tmp_path / "cli" / "model.safetensors"), load_file(tmp_path / "bench" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same options, same weights
    cfg = dataclasses.replace(cfg, teacher_folder=tmp_path / "typo", teacher_train={"beta_shedule": "linear"})
    with pytest.raises(FewstepError, match="teacher.train has unknown keys beta_shedule"):
        ensure_teacher(cfg, log=lambda s: None)


# --- --model takes a run folder ----------------------------------------------------------------------------
def test_model_accepts_a_distillation_run_folder(teacher, tmp_path):
    out = tmp_path / "pd"
    _ok("distill", "--teacher", teacher, "--out", out, *PD)
    _ok("sample", "--model", out, "--n", "6", "--out", tmp_path / "run.npy")
    _ok("sample", "--model", out / "student", "--n", "6", "--out", tmp_path / "student.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "run.npy"), np.load(tmp_path / "student.npy"))
    assert "student" in _ok("info", out)
    shutil.rmtree(out / "student")  # a run without its final stage yet: one line saying so
    res = _run("sample", "--model", out, "--n", "6", "--out", tmp_path / "x.npy")
    assert res.exit_code == 2 and re.search(r"distill.json\) without its final model student/", res.stderr)


def test_the_registry_is_still_importable_by_its_old_name():
    """scripts/gpu-smoke.sh reads `fewstep.distill.METHODS`: it is the discovered registry."""
    from fewstep.distill import METHODS, methods

    assert list(METHODS) == list(methods()) and {"progressive", "ct", "reflow"} <= set(METHODS)
