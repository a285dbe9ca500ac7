"""Rectified-flow reflow + one-step distillation (Liu et al. 2022; InstaFlow) on a 2-D Gaussian-mixture teacher:
each stage learns, and the 1-step (reflow + distill) and 2-step (reflow) students, sampled with no flags, beat the
teacher's own DDIM at the same steps (sliced Wasserstein to fresh true samples)."""

import pytest
import torch

from fewstep.data.datasets import load_dataset
from fewstep.distill import DistillContext, DistillOptions, distill
from fewstep.distill.progressive import student_timesteps
from fewstep.errors import FewstepError
from fewstep.evaluate import metrics as M
from fewstep.generate import generate, resolve_timesteps
from fewstep.io import load_tensors
from fewstep.models.backbones import preset_backbone
from fewstep.models.folder import load_model
from fewstep.training.loop import TrainConfig, train
from fewstep.training.teacher import TeacherMethod, TeacherSpec

BASE = TrainConfig(batch=256, lr=1e-3, warmup=10, ckpt_every=10**6, ema_decay=0.99, log_every=10, progress=False)


def _teacher(folder, steps, preset="mlp", num_classes=0):
    ds = load_dataset("gmm", "train")
    kind, cfg = preset_backbone(preset, ds.sample_shape, num_classes)
    torch.manual_seed(0)
    spec = TeacherSpec(backbone=kind, backbone_config=cfg, sample_shape=ds.sample_shape, data="gmm",
                       num_classes=num_classes)
    train(TeacherMethod(spec), (ds.x, ds.y if num_classes else None),
          TrainConfig(steps=steps, batch=256, lr=2e-3, warmup=20, ckpt_every=10**6, ema_decay=0.99, progress=False),
          folder)
    return load_model(folder)


def _ctx(teacher, folder, out, options, histories=None, resume=False):
    def recording_train(method, data, cfg, out, resume=False):
        result = train(method, data, cfg, out, resume=resume)
        if histories is not None:
            histories[method.name] = result.history
        return result

    return DistillContext(teacher, folder, (torch.zeros(0, 2), None), "gmm", out, options, BASE, resume=resume,
                          train_fn=recording_train)


def test_reflow_students_beat_teacher_ddim_at_1_and_2_steps(tmp_path, gmm_teacher):
    test = load_dataset("gmm", "test").x.double().numpy()
    t = load_model(gmm_teacher)
    for n in (1, 2):
        histories = {}
        opts = DistillOptions(steps=n, iters=300, pairs=4000, teacher_steps=25)
        res = distill("reflow", _ctx(t, gmm_teacher, tmp_path / f"rf{n}", opts, histories))
        assert res.student == tmp_path / f"rf{n}" / "student"
        assert [s["stage"] for s in res.stages] == (["pairs", "reflow", "student"] if n == 1 else ["pairs", "student"])
        assert set(histories) == ({"reflow", "reflow-distill"} if n == 1 else {"reflow"})
        for name, h in histories.items():  # each stage learns
            key = "loss/distill" if name == "reflow-distill" else "loss/reflow"
            assert h[-1][key] < 0.5 * h[0][key], (name, h[0][key], h[-1][key])
        s = load_model(res.student)
        c = s.config
        assert (c.role, c.prediction, c.schedule, c.null_class) == ("student", "flow",
                                                                    {"type": "flow", "num_train_timesteps": 1000}, None)
        assert (c.sampling.sampler, c.sampling.steps) == ("euler", n) and c.training["method"] == "reflow"
        xs = generate(s, c.sampling.sampler, resolve_timesteps(s), 2000, seed=0)
        assert xs.nfe == n
        xt = generate(t, "ddim", student_timesteps(1000, n), 2000, seed=0).x.double().numpy()
        swd_s, swd_t = M.sliced_wasserstein(xs.x.double().numpy(), test), M.sliced_wasserstein(xt, test)
        # measured (300 iterations a stage, 4000 pairs from 25 DPM-Solver++ steps): students 0.067 (1 step),
        # 0.074 (2 steps); teacher DDIM 0.78 (1 step), 0.72 (2 steps), teacher DPM-Solver++ 25 steps 0.068
        assert swd_s < 0.5 * swd_t, (n, swd_s, swd_t)


def test_reflow_conditional_guided_pairs_and_resume(tmp_path):
    t = _teacher(tmp_path / "teacher", 20, preset="mlp-small", num_classes=8)
    opts = DistillOptions(steps=1, iters=5, pairs=64, teacher_steps=4, guidance=2.0, loss="l2")
    out = tmp_path / "rf"
    res = distill("reflow", _ctx(t, tmp_path / "teacher", out, opts))
    pairs = load_tensors(out / "pairs.safetensors")
    assert pairs["z"].shape == pairs["x"].shape == (64, 2) and pairs["labels"].tolist() == [i % 8 for i in range(64)]
    s, r = load_model(res.student), load_model(out / "reflow")
    assert (r.config.role, r.config.null_class, s.config.null_class) == ("teacher", None, None)
    assert s.config.training["distilled_guidance"] == 2.0 and s.config.sampling.guidance == 1.0
    assert generate(s, "euler", resolve_timesteps(s), 16, labels=torch.arange(16) % 8).x.isfinite().all()
    # resume: finished stages are skipped and the saved pairs (and their recorded time) reused
    again = distill("reflow", _ctx(t, tmp_path / "teacher", out, opts, resume=True))
    assert again.stages == res.stages
    assert torch.equal(load_tensors(out / "pairs.safetensors")["x"], pairs["x"])
    with pytest.raises(FewstepError, match=r"other settings \(loss, pairs\)"):
        other = DistillOptions(steps=1, iters=5, pairs=32, teacher_steps=4, guidance=2.0)
        distill("reflow", _ctx(t, tmp_path / "teacher", out, other, resume=True))
