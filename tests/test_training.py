"""The shared training loop and the teacher objectives: learning happens, resume is exact, errors are clear."""

import json

import pytest
import torch

from fewstep.data.datasets import load_dataset
from fewstep.data.toy import gmm8
from fewstep.errors import FewstepError
from fewstep.generate import generate, resolve_timesteps
from fewstep.models.backbones import preset_backbone
from fewstep.models.folder import load_model
from fewstep.training.loop import TrainConfig, batch_indices, train
from fewstep.training.teacher import TeacherMethod, TeacherSpec


def _nn_dist(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean distance from each row of a to its nearest row of ref."""
    return torch.cdist(a.flatten(1), ref.flatten(1)).min(dim=1).values.mean().item()


def test_digits_teacher_learns_and_samples_are_closer_to_data_than_noise(digits_teacher):
    out, result = digits_teacher
    losses = [h["loss/denoise"] for h in result.history]
    assert losses[-1] < 0.6 * losses[0], losses
    model = load_model(out)
    test = load_dataset("digits", "test")
    res = generate(model, "ddim", resolve_timesteps(model, steps=10), n=200, seed=1,
                   labels=torch.arange(200) % 10, guidance=2.0)
    d_samples, d_noise = _nn_dist(res.x, test.x), _nn_dist(torch.randn(200, 1, 8, 8), test.x)
    # measured: samples ~2.4, noise ~9.3, train split vs test ~2.4
    assert d_samples < 0.5 * d_noise, (d_samples, d_noise)
    assert res.nfe == 20  # 10 guided steps at 2 NFE each
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 800


@pytest.mark.parametrize("objective", ["ddpm", "edm", "flow"])
def test_every_objective_learns_a_2d_mixture(objective, tmp_path):
    ds = load_dataset("gmm", "train")
    kind, cfg = preset_backbone("mlp", ds.sample_shape, 0)
    torch.manual_seed(0)
    method = TeacherMethod(TeacherSpec(objective=objective, backbone=kind, backbone_config=cfg,
                                       sample_shape=ds.sample_shape, data="gmm"))
    res = train(method, (ds.x, None), TrainConfig(steps=1200, batch=256, lr=2e-3, warmup=20, ckpt_every=10_000,
                                                  log_every=50, ema_decay=0.99, progress=False), tmp_path / "m")
    losses = [h["loss/denoise"] for h in res.history]
    assert losses[-1] < 0.8 * losses[0], losses
    model = load_model(tmp_path / "m")
    sampler = {"ddpm": "dpmpp-2m", "edm": "heun", "flow": "euler"}[objective]
    x = generate(model, sampler, resolve_timesteps(model, steps=20), n=500, seed=0).x
    mix = gmm8()  # the exact density of the data
    ll_samples = mix.log_prob(x.double()).mean().item()
    ll_data = mix.log_prob(load_dataset("gmm", "test").x.double()).mean().item()
    ll_noise = mix.log_prob(torch.randn(500, 2, dtype=torch.float64) * 2).mean().item()
    # measured at 1500 steps: samples -2.7 (every objective), data -2.14, broad noise -17.5
    assert ll_samples > ll_data - 1.0 and ll_samples > ll_noise + 5.0, (ll_samples, ll_data, ll_noise)


def _tiny(tmp, steps, resume=False, ckpt_every=10):
    ds = load_dataset("digits", "train")
    kind, cfg = preset_backbone("test8", ds.sample_shape, ds.num_classes)
    torch.manual_seed(0)
    method = TeacherMethod(TeacherSpec(backbone=kind, backbone_config=cfg, sample_shape=ds.sample_shape,
                                       num_classes=ds.num_classes, data="digits"))
    cfg = TrainConfig(steps=steps, batch=16, lr=1e-3, warmup=5, ckpt_every=ckpt_every, log_every=5,
                      progress=False)
    return train(method, (ds.x, ds.y), cfg, tmp, resume=resume)


def test_resume_continues_exactly(tmp_path):
    """Interrupt a run after its step-10 checkpoint, resume it: same weights as the uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    straight, split = tmp_path / "straight", tmp_path / "split"
    _tiny(straight, 20, ckpt_every=10)
    shutil.copytree(straight, split)  # a run that crashed after its step-10 checkpoint:
    shutil.rmtree(split / "checkpoints" / "step_00000020")
    (split / "checkpoints" / "latest").write_text("step_00000010")
    for f in ("model.safetensors", "config.json"):
        (split / f).unlink()
    _tiny(split, 20, resume=True)
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = load_file(straight / "checkpoints" / "step_00000020" / "modules.safetensors")
    cb = load_file(split / "checkpoints" / "step_00000020" / "modules.safetensors")
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    # and the resumed run really trained: its weights moved away from the step-10 checkpoint
    c10 = load_file(split / "checkpoints" / "step_00000010" / "modules.safetensors")
    assert any(not torch.equal(c10[k], cb[k]) for k in cb)


def test_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(tmp_path):
    _tiny(tmp_path / "run", 5, ckpt_every=5)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(FewstepError, match="--resume"):
        _tiny(tmp_path / "run", 5)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a run")
    with pytest.raises(FewstepError, match="no checkpoint"):
        _tiny(tmp_path / "mine", 5, resume=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not a run"


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    ds = load_dataset("digits", "train")
    x = ds.x.clone()
    x[:] = float("nan")
    kind, cfg = preset_backbone("test8", ds.sample_shape, 0)
    method = TeacherMethod(TeacherSpec(backbone=kind, backbone_config=cfg, sample_shape=ds.sample_shape))
    with pytest.raises(FewstepError, match="loss is nan"):
        train(method, (x, None), TrainConfig(steps=5, batch=8, progress=False), tmp_path / "nan")


def test_batch_order_is_a_pure_function_of_seed_and_step():
    a = batch_indices(7, 100, 32, seed=3)
    assert torch.equal(a, batch_indices(7, 100, 32, seed=3))
    assert not torch.equal(a, batch_indices(7, 100, 32, seed=4))
    # one epoch covers every index exactly once
    epoch = torch.cat([batch_indices(s, 96, 32, 0) for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(96))


def test_edm_teacher_records_edms_own_18_step_grid():
    """EDM's sampler: 18 Karras levels (rho 7) from 80 down to 0.002, not trailing integer steps ending at 0.007."""
    from fewstep.diffusion.schedules import NoiseSchedule, karras_sigmas
    from fewstep.training.teacher import teacher_config

    kind, cfg = preset_backbone("mlp", (2,), 0)
    config = teacher_config(TeacherSpec(objective="edm", backbone=kind, backbone_config=cfg, sample_shape=(2,)))
    assert config.sampling.sampler == "heun" and len(config.sampling.timesteps) == 18
    sched = NoiseSchedule.karras(1000, 0.002, 80.0)
    got = sched.sigma(torch.tensor(config.sampling.timesteps))
    assert torch.allclose(got, karras_sigmas(18, 0.002, 80.0), rtol=1e-4)
    assert float(got[-1]) == pytest.approx(0.002, rel=1e-9)


def test_loop_puts_trained_networks_in_train_mode_and_state_networks_in_eval_mode():
    """One rule, whatever a method built its networks from (a copy of an eval-mode teacher, a fresh wrapper)."""
    from torch import nn

    from fewstep.training.loop import place
    from fewstep.training.method import Networks

    class M:
        name = "m"

        def __init__(self):
            self.a, self.b, self.c = nn.Dropout(0.5).eval(), nn.Dropout(0.5).train(), nn.Dropout(0.5).train()

        def networks(self):
            return Networks(trained={"a": self.a}, state={"b": self.b}, frozen={"c": self.c})

    m = M()
    place(m, "cpu")
    assert m.a.training and not m.b.training and not m.c.training
