"""Improved consistency training (Song & Dhariwal 2023) on 2-D data: no teacher, a fresh network learns to map noise
to data in one step; plus the curriculum, the level distribution, the recorded sampling and exact resume."""

import math

import pytest
import torch

import fewstep.distill.ct as ct
from fewstep.data.datasets import load_dataset
from fewstep.diffusion.schedules import NoiseSchedule
from fewstep.distill.base import DistillContext, DistillOptions, distill
from fewstep.errors import FewstepError
from fewstep.evaluate import metrics as M
from fewstep.generate import generate, resolve_timesteps
from fewstep.io import load_tensors
from fewstep.models.folder import LoadedModel, build_denoiser, load_model
from fewstep.training.loop import TrainConfig, train
from fewstep.training.method import StepContext

ITERS = 1000  # measured (gmm, batch 256, lr 1e-3, one thread, ~17 s): 1-step SWD 0.08-0.11 over seeds 0-2


def _swd(model: LoadedModel, timesteps: list[float], sampler: str, test) -> float:
    x = generate(model, sampler, timesteps, 2000, seed=0).x.double().numpy()
    return M.sliced_wasserstein(x, test)


def test_ct_student_from_scratch_beats_untrained_net_and_teacher_ddim(tmp_path, gmm_teacher):
    ds = load_dataset("gmm", "train")
    test = load_dataset("gmm", "test").x.double().numpy()
    methods = []

    def recording_train(method, data, cfg, out, resume=False):
        methods.append(method)
        return train(method, data, cfg, out, resume=resume)

    cfg = TrainConfig(batch=256, lr=1e-3, warmup=10, ckpt_every=10**6, ema_decay=0.99, log_every=10, progress=False)
    res = distill("ct", DistillContext(teacher=None, teacher_folder=None, data=(ds.x, None), data_name="gmm",
                                       out=tmp_path / "ct", options=DistillOptions(steps=1, iters=ITERS, preset="mlp"),
                                       train_config=cfg, train_fn=recording_train))
    assert res.student == tmp_path / "ct" / "student" and [s["stage"] for s in res.stages] == ["student"]
    (method,) = methods
    assert method.k == ITERS - 1 and method.grid()[0] == ct.S1 + 1  # before_step drove the curriculum to its end

    s = load_model(res.student)
    c = s.config
    assert (c.role, c.prediction, c.data, c.num_classes, c.null_class) == ("student", "cm", "gmm", 0, None)
    assert c.schedule == {"type": "karras", "num_train_timesteps": 1000, "sigma_min": 0.002, "sigma_max": 80.0}
    assert c.sampling.sampler == "consistency" and c.sampling.timesteps == [999.0]
    assert c.training["method"] == "ct" and c.training["teacher"] is None
    swd1 = _swd(s, resolve_timesteps(s), c.sampling.sampler, test)  # sampled with no flags
    ts2 = ct.ct_timesteps(s.denoiser.schedule, 2)
    assert s.denoiser.schedule.sigma(ts2).tolist() == pytest.approx([80.0, ct.SIGMA_MID])
    swd2 = _swd(s, ts2, "consistency", test)

    untrained = LoadedModel(build_denoiser(c).eval(), c, "fewstep", tmp_path)  # the same network, 0 iterations
    swd0 = _swd(untrained, [999.0], "consistency", test)

    t = load_model(gmm_teacher)  # a DDPM teacher on the same data (conftest), for its DDIM at 1-2 steps
    ddim1 = _swd(t, [999.0], "ddim", test)
    ddim2 = _swd(t, [999.0, 499.0], "ddim", test)
    # measured: untrained ~1.4; student 1 step 0.08-0.11, 2 steps 0.08-0.11; teacher DDIM 0.48 (1), 0.81 (2 steps)
    assert swd1 < 0.15 * swd0, (swd1, swd0)
    assert swd1 < 0.5 * ddim1, (swd1, ddim1)
    assert swd2 < 0.5 * ddim2 and swd2 < 0.5 * ddim1, (swd2, ddim1, ddim2)


def test_curriculum_levels_and_timesteps():
    K = 1000  # K' = floor(1000 / 8) = 125
    assert [ct.discretization_steps(k, K) for k in (0, 124, 125, 250, 874, 875, 999)] == \
        [11, 11, 21, 41, 641, 1281, 1281]
    assert ct.discretization_steps(3, 5) == 81  # K < 8: K' is clamped to 1
    sig = ct.ct_sigmas(11)
    assert sig[0] == pytest.approx(0.002) and sig[-1] == pytest.approx(80.0) and bool((sig.diff() > 0).all())
    p = ct.level_probabilities(sig)
    assert p.shape == (10,) and float(p.sum()) == pytest.approx(1.0)
    def phi(v: float) -> float:  # the lognormal's CDF
        return 0.5 * (1 + math.erf((math.log(v) - ct.P_MEAN) / (math.sqrt(2) * ct.P_STD)))

    mass = phi(float(sig[3])) - phi(float(sig[2]))
    total = phi(80.0) - phi(0.002)
    assert float(p[2]) == pytest.approx(mass / total, rel=1e-9)
    sched = NoiseSchedule.karras(ct.NUM_TIMESTEPS, ct.SIGMA_MIN, ct.SIGMA_MAX)
    assert ct.ct_timesteps(sched, 1) == [999.0]
    assert ct.ct_timesteps(sched, 4) == [999.0, 749.25, 499.5, 249.75]
    with pytest.raises(FewstepError):
        ct.ct_timesteps(sched, 0)


def test_ct_loss_is_weighted_pseudo_huber_between_adjacent_levels():
    cfg = ct.ct_config((2,), 0, 1, "mlp-small")
    m = ct.ConsistencyTraining(cfg, 100)
    m.before_step(0)
    x0 = torch.randn(64, 2)
    (phase,) = m.phases()
    gen = torch.Generator().manual_seed(3)
    got = phase.loss((x0, None), StepContext(0, gen))  # the loop's StepContext carries the seeded generator
    assert got.shape == (64,) and bool((got >= 0).all()) and got.requires_grad
    # replay the same draws by hand
    gen = torch.Generator().manual_seed(3)
    _, sig, p = m.grid()
    n = torch.multinomial(p, 64, replacement=True, generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    lo, hi = sig[n], sig[n + 1]
    with torch.no_grad():
        a = m.model(x0 + hi[:, None].float() * eps, hi).x0
        b = m.model(x0 + lo[:, None].float() * eps, lo).x0
    c = 0.00054 * math.sqrt(2)
    want = (torch.sqrt((a - b).pow(2).sum(1) + c * c) - c) / (hi - lo).float()
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-7)


def test_dropout_masks_are_shared_and_resume_is_exact(tmp_path):
    cfg = ct.ct_config((1, 8, 8), 3, 1, "test8")  # a UNet preset: dropout in its ResNet blocks
    assert cfg.backbone_config["dropout"] == ct.UNET_DROPOUT and cfg.num_classes == 3 and cfg.null_class is None
    m = ct.ConsistencyTraining(cfg, 6)
    assert m.sync_dropout
    x, sigma, y = torch.randn(4, 1, 8, 8), torch.full((4,), 1.0, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        same = [m._f(x, sigma, y, seed=7) for _ in range(2)]
        other = m._f(x, sigma, y, seed=8)
    torch.testing.assert_close(same[0], same[1])
    assert not torch.allclose(same[0], other)

    data = (torch.rand(32, 1, 8, 8) * 2 - 1, torch.arange(32) % 3)
    tc = TrainConfig(steps=6, batch=8, lr=1e-3, warmup=2, ckpt_every=3, ema_decay=0.9, progress=False)
    torch.manual_seed(0)
    train(ct.ConsistencyTraining(cfg, 6), data, tc, tmp_path / "a")
    torch.manual_seed(0)
    train(ct.ConsistencyTraining(cfg, 6), data, tc, tmp_path / "b")
    ck = tmp_path / "b" / "checkpoints"
    (ck / "latest").write_text("step_00000003")  # as if interrupted after the first checkpoint
    torch.manual_seed(1)  # a different global RNG state after the restart must not matter
    train(ct.ConsistencyTraining(cfg, 6), data, tc, tmp_path / "b", resume=True)
    a, b = (load_tensors(tmp_path / r / "model.safetensors") for r in ("a", "b"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
