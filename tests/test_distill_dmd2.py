"""DMD2 (issue 13): a 1-step generator that matches the teacher's distribution on the 2-D Gaussian mixture (far
better than the teacher's own 1-step DDIM, close to its 25-step solver), and the GAN path on an image UNet: the head
on the fake score's bottleneck learns, its loss reaches the generator, and an interrupted run resumes bit for bit."""

import pytest
import torch

from fewstep.data.datasets import load_dataset
from fewstep.distill import DistillContext, distill
from fewstep.distill.dmd2 import DMD2, Critic, DMD2Options, bottleneck
from fewstep.distill.progressive import student_timesteps
from fewstep.errors import FewstepError
from fewstep.evaluate import metrics as M
from fewstep.generate import generate, resolve_timesteps
from fewstep.io import load_tensors
from fewstep.models.folder import load_model
from fewstep.training.loop import TrainConfig, train
from fewstep.training.method import StepContext


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(batch=256, lr=1e-3, warmup=10, ckpt_every=10**6, ema_decay=0.99, log_every=25,
                                 progress=False), **kw})


def test_dmd2_one_step_student_matches_the_teacher_distribution(gmm_teacher, tmp_path):
    ds = load_dataset("gmm", "train")
    test = load_dataset("gmm", "test").x.double().numpy()
    ctx = DistillContext(load_model(gmm_teacher), gmm_teacher, (ds.x, None), "gmm", tmp_path / "d",
                         DMD2Options(steps=1, fake_updates=5), _cfg(steps=400))
    res = distill("dmd2", ctx)
    s, t = load_model(res.student), load_model(gmm_teacher)
    assert [st["stage"] for st in res.stages] == ["round_reparam", "student"]  # eps teacher: to v first
    assert s.config.sampling.sampler == "consistency" and resolve_timesteps(s) == [999.0]
    assert s.config.training["gan"].startswith("off: the network has no bottleneck")
    xs = generate(s, "consistency", resolve_timesteps(s), 2000, seed=0).x.double().numpy()
    xt = generate(t, "ddim", student_timesteps(1000, 1), 2000, seed=0).x.double().numpy()
    swd_s, swd_t = M.sliced_wasserstein(xs, test), M.sliced_wasserstein(xt, test)
    # measured (600 iterations, lr 1e-3): student 0.094; teacher DDIM-1 0.975, DDIM-4 0.318, dpmpp-2m 25 steps 0.068
    assert swd_s < 0.25 * swd_t, (swd_s, swd_t)


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A tiny class-conditional UNet teacher (test8: a mid block to tap) on digits, 30 steps."""
    from fewstep.models.backbones import preset_backbone
    from fewstep.training.teacher import TeacherMethod, TeacherSpec

    ds = load_dataset("digits", "train")
    kind, cfg = preset_backbone("test8", ds.sample_shape, ds.num_classes)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("dmd2") / "teacher"
    spec = TeacherSpec(backbone=kind, backbone_config=cfg, sample_shape=ds.sample_shape, data="digits",
                       num_classes=ds.num_classes)
    train(TeacherMethod(spec), (ds.x, ds.y), _cfg(steps=30, batch=32, lr=2e-3, warmup=3), out)
    return out


def _method(teacher_folder, **kw) -> DMD2:
    t = load_model(teacher_folder)
    return DMD2(t.denoiser, t.config, t.denoiser, **{"steps": 1, "guidance": 2.0, **kw})


def test_gan_head_taps_the_unet_bottleneck_and_its_loss_reaches_the_generator(digits_teacher):
    m = _method(digits_teacher)
    assert m.gan and isinstance(m.critic, Critic) and bottleneck(m.critic.fake.net) is not None
    ds = load_dataset("digits", "train")
    batch = (ds.x[:8], ds.y[:8])
    gen_loss, critic_loss = [p.loss for p in m.phases()]
    grads = []
    for weight in (0.0, 1.0):
        m.gan_g = weight
        m.generator.net.zero_grad()
        m.critic.requires_grad_(False)  # as the loop does while the generator's phase runs
        out = gen_loss(batch, StepContext(0, torch.Generator().manual_seed(0)))
        out.loss.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.generator.net.parameters() if p.grad is not None]))
        assert all(p.grad is None for p in m.critic.parameters())  # the GAN loss moves the generator only
    assert not torch.allclose(grads[0], grads[1])  # the GAN term changes the generator's gradient
    m.critic.requires_grad_(True)
    out = critic_loss(batch, StepContext(0, torch.Generator().manual_seed(0)))
    assert {"denoise", "d_real", "d_fake"} <= set(out.logs)
    out.loss.mean().backward()
    assert m.critic.head.out.weight.grad is not None and m.critic.head.out.weight.grad.abs().sum() > 0


def test_backward_simulation_draws_every_step_per_sample_and_trains_the_last(digits_teacher):
    """k ~ U{0..K-1} per sample: one generator call per simulated step without gradients (as many as the batch's
    largest k), then one with gradients at each sample's own sigma_k; a sample whose k is 0 reads the start noise."""
    m = _method(digits_teacher, steps=4)
    assert m.timesteps == [999.0, 749.0, 499.0, 249.0]
    sigmas = m.generator.schedule.sigma(torch.tensor(m.timesteps, dtype=torch.float64)).float()
    ds = load_dataset("digits", "train")
    seen = []
    real = m.generator.forward

    def spy(x, sigma, cond=None):
        seen.append((x.detach().clone(), sigma.detach().float().clone(), torch.is_grad_enabled()))
        return real(x, sigma, cond)

    m.generator.forward = spy
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        seen.clear()
        m._sample(ds.x[:32], ds.y[:32], gen)
        assert [g for *_, g in seen] == [False] * (len(seen) - 1) + [True]  # only the last call has gradients
        last_sigma = seen[-1][1]
        k = torch.stack([(last_sigma - s).abs() < 1e-3 * s for s in sigmas]).float().argmax(0)
        assert torch.allclose(last_sigma, sigmas[k], rtol=1e-5)  # each sample at one of the K sigmas
        assert len(set(k.tolist())) >= 2 and len(seen) - 1 == int(k.max())  # per sample; max k simulated steps
        first = seen[0][0]  # the start noise
        assert torch.equal(seen[-1][0][k == 0], first[k == 0]) and not torch.equal(seen[-1][0][k > 0], first[k > 0])
    del m.generator.forward


def test_dmd2_with_gan_resumes_exactly_and_records_how_to_sample(digits_teacher, tmp_path):
    ds = load_dataset("digits", "train")

    def run(out, train_fn=None, resume=False):
        from fewstep.training.recipe import RunContext

        return distill("dmd2", RunContext(load_model(digits_teacher), digits_teacher, (ds.x, ds.y), "digits", out,
                                          DMD2Options(steps=2, guidance=2.0, fake_updates=2, reparam_iters=2),
                                          _cfg(steps=8, batch=16, ckpt_every=4), resume=resume, train_fn=train_fn))

    class Interrupt(Exception):
        pass

    def interrupting(m, data, cfg, out, resume=False):
        if out.name == "student" and not resume:
            def after_step(step):
                if step == 5:
                    raise Interrupt
            m.after_step = after_step
        return train(m, data, cfg, out, resume=resume)

    with pytest.raises(Interrupt):
        run(tmp_path / "b", interrupting)
    full = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=True)
    a, b = load_tensors(full.student / "model.safetensors"), load_tensors(resumed.student / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    s = load_model(full.student)
    assert s.config.training["gan"] == "on" and s.config.training["distilled_guidance"] == 2.0
    assert s.config.null_class is None and resolve_timesteps(s) == [999.0, 499.0]
    ckpt = load_tensors(full.student.parent / "student" / "checkpoints" / "step_00000008" / "modules.safetensors")
    assert any(k.startswith("critic.head.") for k in ckpt)  # the head is checkpointed with the fake score
    x = generate(s, "consistency", resolve_timesteps(s), 8, seed=0, labels=torch.arange(8)).x
    assert x.shape == (8, 1, 8, 8) and torch.isfinite(x).all()
    # its generator saw inputs at 999 and 499 only: other timesteps are refused, not sampled off-distribution
    with pytest.raises(FewstepError, match=r"trained to sample at timesteps \[999.0, 499.0\] only"):
        generate(s, "consistency", resolve_timesteps(s, steps=4), 8, seed=0, labels=torch.arange(8))
    with pytest.raises(FewstepError, match="gan=false turns off"):
        DMD2Options(gan=False, gan_g=0.1).validate()
