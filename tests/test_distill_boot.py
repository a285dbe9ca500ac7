"""BOOT (issue 13): data-free.  A 1-step student on the 2-D Gaussian mixture trained without reading any data
beats the teacher's own 1-step DDIM by far; `fewstep distill --method boot` runs with no --data and never loads a
dataset; the student samples only the way it was trained (one step)."""

import pytest
import torch
from corpus import invoke

from fewstep.distill import DistillContext, distill
from fewstep.distill.boot import BootOptions
from fewstep.distill.progressive import student_timesteps
from fewstep.errors import FewstepError
from fewstep.evaluate import metrics as M
from fewstep.generate import generate, resolve_timesteps
from fewstep.models.folder import load_model
from fewstep.training.loop import TrainConfig
from fewstep.training.recipe import no_data


def test_boot_one_step_student_without_data(gmm_teacher, tmp_path):
    from fewstep.data.datasets import load_dataset

    test = load_dataset("gmm", "test").x.double().numpy()
    t = load_model(gmm_teacher)
    ctx = DistillContext(t, gmm_teacher, no_data(t), "", tmp_path / "b", BootOptions(grid_steps=16),
                         TrainConfig(steps=600, batch=256, lr=1e-3, warmup=10, ckpt_every=10**6, ema_decay=0.99,
                                     progress=False))
    s = load_model(distill("boot", ctx).student)
    assert s.config.prediction == "boot" and s.config.training["data_free"] is True
    xs = generate(s, s.config.sampling.sampler, resolve_timesteps(s), 2000, seed=0).x.double().numpy()
    xt = generate(t, "ddim", student_timesteps(1000, 1), 2000, seed=0).x.double().numpy()
    swd_s, swd_t = M.sliced_wasserstein(xs, test), M.sliced_wasserstein(xt, test)
    # measured (1,000 iterations, grid 16): student 0.120; teacher DDIM-1 0.975, dpmpp-2m 25 steps 0.068
    assert swd_s < 0.4 * swd_t, (swd_s, swd_t)
    with pytest.raises(FewstepError, match="one evaluation"):
        generate(s, "euler", resolve_timesteps(s, steps=2), 4, seed=0)


def test_boot_cli_needs_no_data_and_never_loads_any(fx, tmp_path, monkeypatch):
    import fewstep.data.datasets as datasets

    teacher = fx.model  # built (trained on digits) before the patch

    def refuse(*a, **kw):
        raise AssertionError("boot loaded a dataset")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    res = invoke(["distill", "--teacher", str(teacher), "--method", "boot", "--guidance", "2", "--iters", "6",
                  "--batch", "8", "--set", "grid_steps=4", "--out", str(tmp_path / "b")])
    assert res.code == 0, res.stderr
    monkeypatch.undo()
    s = load_model(tmp_path / "b" / "student")
    assert s.config.training["distilled_guidance"] == 2.0 and s.config.num_classes == 10
    x = generate(s, s.config.sampling.sampler, resolve_timesteps(s), 10, seed=0, labels=torch.arange(10)).x
    assert x.shape == (10, 1, 8, 8) and torch.isfinite(x).all()
    assert (tmp_path / "b" / "distill.json").is_file()


def test_boot_target_is_one_step_of_the_teachers_clipping_ddim(fx):
    """The bootstrap target is exactly the signal after one step of the sampler the teacher runs: fewstep's (and
    diffusers') DDIM with clip_sample, x0 clipped and the raw eps kept."""
    from fewstep.distill.boot import Boot
    from fewstep.samplers import SAMPLERS, SamplerOptions
    from fewstep.samplers.guidance import guide

    t = load_model(fx.model)
    assert t.config.x0_clip() is not None  # an image teacher records clip_sample: true
    boot = Boot(t.denoiser, t.config, grid=8, guidance=2.0)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(6, *t.sample_shape, generator=g)
    y_t = 3 * torch.randn(6, *t.sample_shape, generator=g)  # far outside [-1, 1]: the clip matters
    labels = torch.arange(6)
    sig = t.denoiser.schedule.sigma(torch.tensor([874.125, 749.25], dtype=torch.float64))
    target = boot.teacher_step(y_t, eps, sig[0].expand(6), sig[1].expand(6), labels)
    x_t = y_t + sig[0] * eps
    den = guide(t.denoiser, 2.0, t.config.null_class)
    x_s = SAMPLERS["ddim"].fn(den, (x_t / (1 + sig[0] ** 2).sqrt()).float(), sig, labels,
                              SamplerOptions(clip_x0=t.config.x0_clip()))
    assert torch.allclose(target, x_s - sig[1] * eps, atol=1e-4), (target - (x_s - sig[1] * eps)).abs().max()
    unclipped = boot.teacher_step(y_t, eps, sig[0].expand(6), sig[1].expand(6), labels)
    boot.clip = None
    assert not torch.allclose(unclipped, boot.teacher_step(y_t, eps, sig[0].expand(6), sig[1].expand(6), labels))


def test_boot_student_starts_at_zero_and_weights_by_z_space(fx):
    """zero_out: the student's first output is 0 for every noise and time (not the teacher's eps-shaped output,
    which the bootstrap would have to unlearn); the default weighting z-d2 is the paper's 1/d^2 times a_s^2 =
    1 / (1 + sigma_s^2), the error measured in the VP state z_s = a_s (y_s + sigma_s eps)."""
    from fewstep.distill.boot import Boot
    from fewstep.training.method import StepContext

    t = load_model(fx.model)
    boot = Boot(t.denoiser, t.config, grid=8, guidance=2.0, zero_out=True)
    eps = torch.randn(5, *t.sample_shape, generator=torch.Generator().manual_seed(1))
    out = boot.signal(eps, torch.tensor([0.0, 100.0, 400.0, 800.0, 999.0]), torch.arange(5))
    assert out.abs().max() == 0
    assert boot.signal(eps, torch.full((5,), 500.0), torch.arange(5)).abs().max() == 0
    plain = Boot(t.denoiser, t.config, grid=8, guidance=2.0, zero_out=False)
    assert plain.signal(eps, torch.full((5,), 500.0), torch.arange(5)).abs().max() > 0.1

    batch = (torch.zeros(64, *t.sample_shape), torch.arange(64) % 10)
    losses = {}
    for w in ("d2", "z-d2"):
        b = Boot(t.denoiser, t.config, grid=8, guidance=2.0, weighting=w)
        b.student.load_state_dict(plain.student.state_dict())
        b.student.eval()  # no dropout: the two losses see the same network
        ctx = StepContext(step=0, gen=torch.Generator().manual_seed(3))
        losses[w] = b.phases()[0].loss(batch, ctx).detach()
    gen = torch.Generator().manual_seed(3)
    torch.randn(64, *t.sample_shape, generator=gen)
    n = torch.randint(1, 9, (64,), generator=gen).double()
    sig_s = t.denoiser.schedule.sigma(999 * (n - 1) / 8).float()
    assert torch.allclose(losses["z-d2"], losses["d2"] / (1 + sig_s**2), rtol=1e-4)
    assert not torch.allclose(losses["z-d2"], losses["d2"])


def test_zero_out_refuses_a_network_whose_last_layer_is_not_its_output(fx):
    from torch import nn

    from fewstep.distill.boot import Boot

    t = load_model(fx.model)
    t.denoiser.net.add_module("late_extra", nn.Linear(3, 3))  # registered last, never used in forward
    with pytest.raises(FewstepError, match="zero_out=false"):
        Boot(t.denoiser, t.config, grid=8)
    Boot(t.denoiser, t.config, grid=8, zero_out=False)  # the paper's initialization still works
