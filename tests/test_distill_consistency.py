"""Consistency distillation (issue 4) on a 2-D Gaussian-mixture teacher: the 1- and 2-step students beat the
teacher's own DDIM at the same steps (sliced Wasserstein to fresh true samples), and the LCM boundary holds."""

import pytest
import torch

from fewstep.data.datasets import load_dataset
from fewstep.diffusion.param import lcm_boundary
from fewstep.distill import DistillContext, DistillOptions, distill
from fewstep.distill.progressive import student_timesteps
from fewstep.evaluate import metrics as M
from fewstep.generate import generate, resolve_timesteps
from fewstep.models.folder import load_model
from fewstep.training.loop import TrainConfig


def test_lcm_boundary_is_the_identity_at_t0_and_the_prediction_above():
    x, x0 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    sigma = torch.full((4,), 0.01, dtype=torch.float64)
    f0 = lcm_boundary(x, x0, sigma, torch.zeros(4, dtype=torch.float64)).x0
    assert torch.allclose(f0, x / (1 + 0.01**2) ** 0.5)  # f = z_0 = alpha x at t = 0
    f = lcm_boundary(x, x0, torch.full((4,), 5.0, dtype=torch.float64), torch.full((4,), 500.0,
                                                                                  dtype=torch.float64)).x0
    assert torch.allclose(f, x0, atol=1e-6)


def test_consistency_students_beat_teacher_ddim_at_1_and_2_steps(gmm_teacher, tmp_path):
    ds = load_dataset("gmm", "train")
    test = load_dataset("gmm", "test").x.double().numpy()
    ctx = DistillContext(load_model(gmm_teacher), gmm_teacher, (ds.x, None), "gmm", tmp_path / "cd",
                         DistillOptions(steps=1, iters=600, reparam_iters=300, teacher_steps=25),
                         TrainConfig(batch=256, lr=1e-3, warmup=10, ckpt_every=10**6, ema_decay=0.99, log_every=25,
                                     progress=False))
    res = distill("consistency", ctx)
    s, t = load_model(res.student), load_model(gmm_teacher)
    assert s.config.boundary == "lcm" and s.config.sampling.sampler == "consistency"
    assert [st["stage"] for st in res.stages] == ["round_reparam", "student"]
    # sampled on its training grid t_k = 999 k / 25, as LCM's scheduler does (4 steps: every 6th point)
    assert s.config.sampling.spacing == "grid" and s.config.training["grid_steps"] == 25
    assert resolve_timesteps(s, steps=4) == pytest.approx([999 * k / 25 for k in (25, 19, 13, 7)])
    assert resolve_timesteps(s) == [999.0]
    for n in (1, 2):
        xs = generate(s, "consistency", resolve_timesteps(s, steps=n), 2000, seed=0).x.double().numpy()
        xt = generate(t, "ddim", student_timesteps(1000, n), 2000, seed=0).x.double().numpy()
        swd_s, swd_t = M.sliced_wasserstein(xs, test), M.sliced_wasserstein(xt, test)
        # measured with the same recipe from the CLI (600 iterations, N = 25): students 0.09 (1 step), 0.11 (2 steps);
        # teacher DDIM 1.15, 0.71
        assert swd_s < 0.5 * swd_t, (n, swd_s, swd_t)


def test_guided_consistency_steps_with_the_teacher_and_starts_from_the_reparameterized_copy(gmm_cond_teacher, tmp_path,
                                                                                            monkeypatch):
    """LCM: the ODE step is the teacher's own guided prediction; the eps -> v copy only initializes the student."""
    import fewstep.distill.consistency as C
    from fewstep.samplers.guidance import guide

    seen = {}
    real = C.ConsistencyDistill.__init__

    def spy(self, teacher, config, *a, **kw):
        real(self, teacher, config, *a, **kw)
        seen["method"], seen["teacher"] = self, teacher

    monkeypatch.setattr(C.ConsistencyDistill, "__init__", spy)
    ds = load_dataset("gmm", "train")
    teacher = load_model(gmm_cond_teacher)
    ctx = DistillContext(teacher, gmm_cond_teacher, (ds.x, ds.y), "gmm", tmp_path / "cd",
                         DistillOptions(steps=1, iters=4, reparam_iters=4, teacher_steps=10, guidance=2.0),
                         TrainConfig(batch=32, ckpt_every=10**6, progress=False))
    distill("consistency", ctx)
    m = seen["method"]
    assert seen["teacher"] is teacher.denoiser and m.teacher.prediction == "eps"  # the teacher, not the v copy
    reparam = load_model(tmp_path / "cd" / "round_reparam")
    x, sig = torch.randn(8, 2), teacher.denoiser.schedule.sigma(torch.full((8,), 400.0)).float()
    y = torch.arange(8) % 8
    want = guide(teacher.denoiser, 2.0, teacher.config.null_class)(x, sig, y).x0
    assert torch.allclose(m._teach(x, sig, y).x0, want)  # guided at w = 2 on every step
    assert not torch.allclose(reparam.denoiser(x, sig, y).x0, want, atol=1e-3)  # (the copy would differ)
    assert m.student is not m.teacher and m.student.prediction == "v"
    student = load_model(tmp_path / "cd" / "student")
    assert student.config.null_class is None and student.config.training["distilled_guidance"] == 2.0
