"""Guided distillation (issue 4) on a class-conditional 2-D teacher: one network evaluation per step at any
guidance scale in the trained range, close to the data at w = 1 and to the guided teacher at w = 3."""

import pytest

from fewstep.data.datasets import load_dataset
from fewstep.distill import DistillContext, DistillOptions, distill
from fewstep.distill.progressive import student_timesteps
from fewstep.errors import FewstepError
from fewstep.evaluate import metrics as M
from fewstep.generate import class_labels, generate, resolve_timesteps
from fewstep.models.folder import load_model
from fewstep.training.loop import TrainConfig


def test_guided_students_take_the_scale_as_an_input(gmm_cond_teacher, tmp_path):
    ds = load_dataset("gmm", "train")
    test = load_dataset("gmm", "test").x.double().numpy()
    ctx = DistillContext(load_model(gmm_cond_teacher), gmm_cond_teacher, (ds.x, ds.y), "gmm", tmp_path / "g",
                         DistillOptions(steps=1, start_steps=4, iters=300, guidance_range=(1.0, 3.0)),
                         TrainConfig(batch=256, lr=1e-3, warmup=10, ckpt_every=10**6, ema_decay=0.99, log_every=25,
                                     progress=False))
    res = distill("guided", ctx)
    t = load_model(gmm_cond_teacher)
    labels = class_labels(t, 2000, None)
    for n, folder in ((1, res.student), (2, tmp_path / "g" / "round_2")):
        s = load_model(folder)
        assert s.config.guidance_range == [1.0, 3.0] and s.config.null_class is None
        assert s.denoiser.takes_guidance and s.config.sampling.timesteps == student_timesteps(1000, n)

        def sample(model, sampler, w, timesteps=None):
            return generate(model, sampler, timesteps or resolve_timesteps(model), 2000, seed=0, labels=labels,
                            guidance=w)

        r1 = sample(s, "ddim", 1.0)
        assert r1.nfe == n  # one evaluation per step, guided or not
        teacher_ddim = sample(t, "ddim", 1.0, student_timesteps(1000, n)).x.double().numpy()
        swd_s, swd_t = M.sliced_wasserstein(r1.x.double().numpy(), test), M.sliced_wasserstein(teacher_ddim, test)
        # measured at 2 steps (300 iterations a stage): student 0.12, teacher DDIM 0.22: a class-conditional
        # teacher's 2-step DDIM is already close, hence a looser ratio there than in the unconditional tests
        assert swd_s < (0.5 if n == 1 else 0.7) * swd_t, (n, swd_s, swd_t)
        # at w = 3 the student follows the guided teacher (25 steps), not its own w = 1 output
        r3 = sample(s, "ddim", 3.0)
        assert r3.nfe == n
        ref3 = sample(t, "dpmpp-2m", 3.0, resolve_timesteps(t, steps=25)).x.double().numpy()
        d3, d1 = M.sliced_wasserstein(r3.x.double().numpy(), ref3), M.sliced_wasserstein(r1.x.double().numpy(), ref3)
        assert d3 < 0.7 * d1, (n, d3, d1)
    with pytest.raises(FewstepError, match="guidance scales 1.0..3.0"):
        generate(load_model(res.student), "ddim", student_timesteps(1000, 1), 4, guidance=4.0, labels=labels[:4])
