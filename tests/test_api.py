"""The public API: everything a user needs is a name of `import fewstep` (no private module paths), and
importing it stays cheap."""

import subprocess
import sys

import pytest
import torch

import fewstep


def test_import_fewstep_is_cheap_and_names_resolve_lazily():
    code = ("import sys, fewstep; heavy = [m for m in ('torch', 'diffusers', 'typer') if m in sys.modules]; "
            "assert not heavy, heavy; fewstep.load_model; assert 'torch' in sys.modules; print(fewstep.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in fewstep.__all__:
        assert getattr(fewstep, name) is not None, name
    assert set(fewstep.__all__) <= set(dir(fewstep))
    with pytest.raises(AttributeError):
        fewstep.no_such_name  # noqa: B018


def test_train_distill_sample_evaluate_with_public_names_only(tmp_path):
    teacher = tmp_path / "teacher"
    res = fewstep.train_teacher("gmm", teacher, preset="mlp-small", conditional=True, steps=60, batch=64, lr=2e-3)
    assert res.steps == 60 and (teacher / "model.safetensors").is_file()

    run = fewstep.distill_model("progressive", tmp_path / "pd", teacher=teacher, steps=1, start_steps=2, iters=5,
                                batch=32, guidance=2.0)
    assert run.student == tmp_path / "pd" / "student" and run.options.start_steps == 2
    with pytest.raises(fewstep.FewstepError, match="progressive has no option pairs"):
        fewstep.distill_model("progressive", tmp_path / "bad", teacher=teacher, pairs=10)
    assert not (tmp_path / "bad").exists()
    assert {"progressive", "consistency"} <= set(fewstep.methods("distill"))

    student = fewstep.load_model(tmp_path / "pd")  # the run folder: its student
    assert student.config.role == "student"
    s = fewstep.sample(student, 8, seed=1)
    assert s.x.shape == (8, 2) and s.nfe == 1 and torch.isfinite(s.x).all()
    assert torch.equal(fewstep.sample(tmp_path / "pd" / "student", 8, seed=1).x, s.x)  # folders work too

    # a sampler by hand: pure functions over explicit noise levels
    t = fewstep.load_model(teacher)
    sigmas = t.denoiser.schedule.sampling_sigmas(fewstep.spaced_timesteps(10))
    x = fewstep.sample_heun(t.denoiser, torch.randn(16, 2), sigmas, cond=torch.full((16,), 3))
    assert x.shape == (16, 2) and torch.isfinite(x).all()
    assert set(fewstep.SAMPLERS) >= {"ddim", "heun", "dpmpp-2m", "euler", "ddpm", "consistency"}

    row = fewstep.evaluate_model(teacher, sampler="dpmpp-2m", steps=10, n=500, seed=0)
    assert row.dataset == "gmm" and row.nfe == 10 and row.quality.swd is not None
    assert row.quality.swd > 0 and row.quality.floor.swd > 0


def test_train_loop_with_a_custom_method_through_the_public_names(tmp_path):
    """`fewstep.train` is the one training loop: any method (here a teacher built by the library) runs on it."""
    from fewstep.training.teacher import TeacherOptions, build_teacher

    method, data = build_teacher(TeacherOptions(data="gmm", preset="mlp-small"))
    res = fewstep.train(method, data, fewstep.TrainConfig(steps=5, batch=32, progress=False), tmp_path / "t")
    assert res.steps == 5 and fewstep.load_model(tmp_path / "t").config.training["steps"] == 5
