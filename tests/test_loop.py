"""The loop with several networks (issue 10): gradient isolation between phases, the LR schedule on the global
step, per-phase optimizer settings, named scalars and shared work, seeded ``before_step``, the grad scaler in the
checkpoint, and placement of every network and schedule table on the run's device."""

import copy
import shutil

import pytest
import torch
from placement_check import check_placement
from safetensors.torch import load_file
from torch import nn

from fewstep.data.datasets import load_dataset
from fewstep.diffusion.schedules import NoiseSchedule
from fewstep.errors import FewstepError
from fewstep.io import load_torch_state
from fewstep.models.backbones import preset_backbone
from fewstep.training import loop
from fewstep.training.loop import TrainConfig, lr_factor, place, train
from fewstep.training.method import LossOutput, Networks, Phase
from fewstep.training.teacher import TeacherMethod, TeacherSpec

X = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=10, batch=32, lr=1e-2, warmup=4, ckpt_every=10**6, log_every=1, ema_decay=0.9,
                                 progress=False), **kw})


class GenCritic:
    """A generator phase whose loss flows through the critic, and a critic phase whose own gradient is exactly zero:
    with gradients isolated per phase, AdamW (no weight decay) leaves the critic where it started."""

    name = "gen-critic"

    def __init__(self, critic_first: bool = False):
        torch.manual_seed(0)
        self.gen, self.critic = nn.Linear(2, 2), nn.Linear(2, 1)
        self.critic_first = critic_first

    def networks(self) -> Networks:
        return Networks(trained={"gen": self.gen, "critic": self.critic})

    def modules(self) -> dict[str, nn.Module]:  # the loop's interface before issue 10 (to show the old defect)
        return {"gen": self.gen, "critic": self.critic}

    def phases(self) -> list[Phase]:
        def gen_loss(batch, ctx):
            return -self.critic(self.gen(batch[0])).squeeze(1)

        def critic_loss(batch, ctx):
            return 0.0 * self.critic(self.gen(batch[0]).detach()).squeeze(1)

        phases = [Phase("gen", self.gen, gen_loss), Phase("critic", self.critic, critic_loss)]
        return phases[::-1] if self.critic_first else phases

    def ema_target(self) -> nn.Module:
        return self.gen

    def after_step(self, step: int) -> None:
        pass

    def save_model(self, out, net, training) -> None:
        pass


@pytest.mark.parametrize("critic_first", [False, True])
def test_a_phase_never_sees_gradients_left_by_another(tmp_path, critic_first):
    """Before issue 10 the generator's backward filled the critic's .grad, and the critic's step applied it."""
    m = GenCritic(critic_first)
    critic0, gen0 = copy.deepcopy(m.critic.state_dict()), copy.deepcopy(m.gen.state_dict())
    train(m, (X, None), _cfg(weight_decay=0.0), tmp_path / "run")
    assert all(torch.equal(critic0[k], v) for k, v in m.critic.state_dict().items())
    assert any(not torch.equal(gen0[k], v) for k, v in m.gen.state_dict().items())  # the generator did learn
    assert all(p.requires_grad for p in [*m.gen.parameters(), *m.critic.parameters()])  # restored after the run


class EveryOther:
    """One phase every other step, with its own AdamW settings."""

    name = "every-other"

    def __init__(self):
        torch.manual_seed(0)
        self.net = nn.Linear(2, 2)

    def networks(self) -> Networks:
        return Networks(trained={"net": self.net})

    def phases(self) -> list[Phase]:
        def loss(batch, ctx):
            return (self.net(batch[0]) - 1).pow(2).mean(1)
        return [Phase("fit", self.net, loss, every=2, lr_scale=0.5, betas=(0.0, 0.9), eps=1e-6, weight_decay=0.25,
                      grad_clip=0.0)]

    def ema_target(self) -> nn.Module:
        return self.net

    def save_model(self, out, net, training) -> None:
        pass


def test_lr_schedule_follows_the_global_step_and_phases_keep_their_optimizer_settings(tmp_path):
    """Steps 0, 2, 4, 6, 8 update: the last update runs at global step 8, so its learning rate is lr x 0.5 x
    lr_factor(8) (before issue 10 the schedule counted the phase's 5 updates: lr_factor(5))."""
    cfg = _cfg(steps=10, warmup=4, ckpt_every=10)
    train(EveryOther(), (X, None), cfg, tmp_path / "run")
    state = load_torch_state(tmp_path / "run" / "checkpoints" / "step_00000010" / "optim.pt")
    group = state["fit"]["optim"]["param_groups"][0]
    assert group["lr"] == pytest.approx(cfg.lr * 0.5 * lr_factor(8, cfg.warmup, cfg.steps), rel=1e-12)
    assert tuple(group["betas"]) == (0.0, 0.9) and group["eps"] == 1e-6 and group["weight_decay"] == 0.25
    assert lr_factor(8, 4, 10) != lr_factor(5, 4, 10)


def test_the_ema_updates_only_at_steps_that_moved_its_weights(tmp_path):
    """A generator stepped every other step is averaged once per update (a GAN's or dmd2's generator was averaged at
    every discriminator step, so its decay was in effect decay^n_dis); the exported EMA equals the replayed average
    of the weights after each update."""
    import json

    m = EveryOther()
    seen = []
    m.after_step = lambda step: seen.append((step, copy.deepcopy(m.net.state_dict())))
    cfg = _cfg(steps=10, warmup=4, ckpt_every=10)
    train(m, (X, None), cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000010"
    assert json.loads((ckpt / "state.json").read_text())["ema_updates"] == 5
    ema, n = copy.deepcopy(EveryOther().net.state_dict()), 0  # the weights before step 0 (same seed)
    for step, w in seen:
        if step % 2:
            continue
        d = min(cfg.ema_decay, (1 + n) / (10 + n))
        ema = {k: d * ema[k] + (1 - d) * w[k] for k in ema}
        n += 1
    saved = load_file(ckpt / "ema.safetensors")
    assert all(torch.allclose(saved[k], ema[k], atol=1e-6) for k in ema)


class Shared:
    """Two phases share one expensive output per step (``ctx.share``); the first logs named scalars; ``before_step``
    draws from the loop's generator and the losses use the draw."""

    name = "shared"

    def __init__(self):
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        self.calls = 0
        self.offset: torch.Tensor | None = None

    def networks(self) -> Networks:
        return Networks(trained={"a": self.a, "b": self.b})

    def before_step(self, step, gen):
        self.offset = torch.randn(2, generator=gen)

    def phases(self) -> list[Phase]:
        def target(x):
            self.calls += 1
            return x.flip(1) + self.offset

        def loss_a(batch, ctx):
            t = ctx.share("target", lambda: target(batch[0]))
            err = (self.a(batch[0]) - t).pow(2).mean(1)
            return LossOutput(err, {"max_err": err.max().detach(), "mean_t": t.mean()})

        def loss_b(batch, ctx):
            t = ctx.share("target", lambda: target(batch[0]))
            return (self.b(batch[0]) - t).pow(2).mean(1) + torch.rand(batch[0].shape[0], generator=ctx.gen) * 0

        return [Phase("a", self.a, loss_a), Phase("b", self.b, loss_b)]

    def ema_target(self) -> nn.Module:
        return self.a

    def save_model(self, out, net, training) -> None:
        from fewstep.io import save_tensors

        save_tensors(out / "model.safetensors", {"a": self.a.weight, "b": self.b.weight})


def test_shared_work_named_scalars_and_seeded_before_step(tmp_path):
    m = Shared()
    res = train(m, (X, None), _cfg(steps=10, grad_accum=2), tmp_path / "run")
    assert m.calls == 10 * 2  # once per step and micro-batch, not once per phase
    rec = res.history[-1]
    assert {"loss/a", "loss/b", "a/max_err", "a/mean_t", "lr"} <= set(rec)
    assert rec["a/max_err"] >= rec["loss/a"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert '"a/max_err"' in lines[-1]

    # a run killed after its step-4 checkpoint resumes bitwise: before_step's draws come from the saved generator
    straight = tmp_path / "straight"
    train(Shared(), (X, None), _cfg(steps=8, ckpt_every=4), straight)
    split = tmp_path / "split"
    shutil.copytree(straight, split)
    shutil.rmtree(split / "checkpoints" / "step_00000008")
    (split / "checkpoints" / "latest").write_text("step_00000004")
    train(Shared(), (X, None), _cfg(steps=8, ckpt_every=4), split, resume=True)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grad_scaler_state_is_checkpointed_and_restored(tmp_path, monkeypatch):
    """A stand-in for fp16's scaler on the CPU: its scale doubles every 2 finite steps.  A run killed after its
    step-6 checkpoint and resumed ends with the same scale (and weights) as an uninterrupted one; without the
    scaler in the checkpoint it would restart from the initial scale."""
    original = loop.make_accelerator

    def with_scaler(cfg, find_unused_parameters=False, out=None):
        acc = original(cfg, find_unused_parameters, out)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=2)
        return acc

    monkeypatch.setattr(loop, "make_accelerator", with_scaler)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(EveryOther(), (X, None), _cfg(steps=12, ckpt_every=6), straight)
    shutil.copytree(straight, split)
    shutil.rmtree(split / "checkpoints" / "step_00000012")
    (split / "checkpoints" / "latest").write_text("step_00000006")
    train(EveryOther(), (X, None), _cfg(steps=12, ckpt_every=6), split, resume=True)

    def scale(run):
        return load_torch_state(run / "checkpoints" / "step_00000012" / "optim.pt")["_grad_scaler"]["scale"]

    assert scale(straight) == scale(split) > 2.0**4
    a = load_file(str(straight / "checkpoints" / "step_00000012" / "modules.safetensors"))
    b = load_file(str(split / "checkpoints" / "step_00000012" / "modules.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- placement ---------------------------------------------------------------------------------------------
def test_teacher_placement_reaches_the_schedule_tables():
    ds = load_dataset("digits", "train")
    kind, cfg = preset_backbone("test8", ds.sample_shape, ds.num_classes)
    method = TeacherMethod(TeacherSpec(backbone=kind, backbone_config=cfg, sample_shape=ds.sample_shape,
                                       num_classes=ds.num_classes))
    check_placement(method)
    m = copy.deepcopy(method)
    place(m, "meta")
    assert m.denoiser.schedule.sigmas.device.type == "meta"
    phase = m.phases()[0]  # built after placement: its noise distribution indexes the placed table
    assert phase.module is m.denoiser.net


def test_the_walk_catches_a_frozen_network_left_undeclared():
    from fewstep.models.denoiser import Denoiser

    class Sloppy(EveryOther):
        def __init__(self):
            super().__init__()
            self.teacher = Denoiser(nn.Linear(2, 2), NoiseSchedule.flow(10), "flow")  # used, not declared

    with pytest.raises(AssertionError, match="left behind"):
        check_placement(Sloppy())


def test_frozen_networks_are_eval_without_gradients_and_never_checkpointed(tmp_path):
    class WithTeacher(EveryOther):
        def __init__(self):
            super().__init__()
            self.teacher = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()

        def networks(self):
            return Networks(trained={"net": self.net}, frozen={"teacher": self.teacher})

    m = WithTeacher()
    train(m, (X, None), _cfg(steps=2, ckpt_every=2), tmp_path / "run")
    assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000002" / "modules.safetensors"))
    assert saved and all(k.startswith("net.") for k in saved)


def test_batch_must_divide_by_accumulation(tmp_path):
    with pytest.raises(FewstepError, match="must divide by processes x --grad-accum = 1 x 3"):
        train(EveryOther(), (X, None), _cfg(batch=32, grad_accum=3), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_runs_in_other_precisions_in_one_process_and_the_record_says_where(tmp_path):
    """accelerate keeps one state per process; a second run with another --mixed-precision used to fail."""
    import json

    for mp in ("no", "bf16"):
        m = EveryOther()
        train(m, (X, None), _cfg(steps=2, mixed_precision=mp), tmp_path / mp)
        assert "forward" not in vars(m.net) and "_original_forward" not in vars(m.net)  # as the method gave it
        state = json.loads((tmp_path / mp / "checkpoints" / "step_00000002" / "state.json").read_text())
        assert state["config"]["mixed_precision"] == mp and state["processes"] == 1


def test_a_dtype_change_keeps_the_schedule_where_it_is():
    from fewstep.models.denoiser import Denoiser

    den = Denoiser(nn.Linear(2, 2), NoiseSchedule.flow(10), "flow").to("meta")
    den.to(torch.float16)  # probed on the CPU, this moved the tables back (and failed to copy out of meta)
    assert den.schedule.sigmas.device.type == "meta" and den.schedule.sigmas.dtype == torch.float64
