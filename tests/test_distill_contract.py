"""The contract every distillation method keeps (issue 4), run over the whole registry on a tiny 2-D teacher (the
registry is found from the package's modules, and each method gives its own test-sized options):

- a few dozen iterations lower each stage's loss;
- the student folder reloads and samples with no flags (its config says how);
- an interrupted run continues exactly with ``resume`` (bitwise-identical student weights);
- a student distilled from the real teacher ends closer to the data than one distilled from a randomly
  initialized teacher with the same budget (consistency training: than its untrained network).
"""

import dataclasses

import pytest
import torch

from fewstep.data.datasets import load_dataset
from fewstep.distill import distill, methods
from fewstep.evaluate import metrics as M
from fewstep.generate import class_labels, generate, resolve_timesteps
from fewstep.io import load_tensors
from fewstep.models.backbones import preset_backbone
from fewstep.models.folder import load_model
from fewstep.training.loop import TrainConfig, train
from fewstep.training.recipe import RunContext
from fewstep.training.teacher import TeacherMethod, TeacherSpec

ITERS = 40  # small budgets: the contract, not the quality (quality: the 2-D tests of each method)
METHODS = methods()


def _train_config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(batch=256, lr=1e-3, warmup=5, ckpt_every=10**6, ema_decay=0.9, log_every=5,
                                 progress=False), **kw})


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A class-conditional gmm teacher (trained) and the same network untrained."""
    root = tmp_path_factory.mktemp("teachers")
    ds = load_dataset("gmm", "train")
    kind, cfg = preset_backbone("mlp", ds.sample_shape, ds.num_classes)
    out = {}
    for name, steps, lr in (("real", 800, 2e-3), ("random", 1, 0.0)):
        torch.manual_seed(0)
        spec = TeacherSpec(backbone=kind, backbone_config=cfg, sample_shape=ds.sample_shape, data="gmm",
                           num_classes=ds.num_classes)
        train(TeacherMethod(spec), (ds.x, ds.y), _train_config(steps=steps, lr=lr, warmup=20, ema_decay=0.99),
              root / name)
        out[name] = root / name
    return out


def _context(method, teacher_folder, out, train_fn=None, resume=False, **cfg_kw) -> RunContext:
    ds = load_dataset("gmm", "train")
    recipe = METHODS[method]
    teacher = load_model(teacher_folder) if recipe.needs_teacher else None
    return RunContext(teacher, teacher_folder if teacher else None, (ds.x, ds.y), "gmm", out,
                      recipe.options.for_tests(), _train_config(**{"steps": ITERS, **cfg_kw}), resume=resume,
                      train_fn=train_fn)


def _swd(folder) -> float:
    s = load_model(folder)
    d = s.config.sampling
    x = generate(s, d.sampler, resolve_timesteps(s), 2000, seed=0, labels=class_labels(s, 2000, None),
                 guidance=d.guidance).x
    return M.sliced_wasserstein(x.double().numpy(), load_dataset("gmm", "test").x.double().numpy())


def test_every_method_module_is_registered():
    """No hand-kept list: every module of fewstep.distill except the shared base registers a method."""
    import pkgutil

    import fewstep.distill

    modules = {m.name for m in pkgutil.iter_modules(fewstep.distill.__path__)} - {"base"}
    assert set(METHODS) == modules and len(METHODS) >= 5
    for name, recipe in METHODS.items():
        assert recipe.kind == "distill" and recipe.name == name
        recipe.options.for_tests().validate()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_contract(method, teachers, tmp_path):
    histories = {}

    def recording(m, data, cfg, out, resume=False):
        res = train(m, data, cfg, out, resume=resume)
        histories[out.name] = res.history
        return res

    res = distill(method, _context(method, teachers["real"], tmp_path / "a", recording))
    assert res.student == tmp_path / "a" / "student"
    for stage, h in histories.items():  # every stage learns
        first = sum(next(iter(r[k] for k in r if k.startswith("loss/"))) for r in h[:2]) / 2
        last = sum(next(iter(r[k] for k in r if k.startswith("loss/"))) for r in h[-2:]) / 2
        assert last < first, (method, stage, first, last)
    student = load_model(res.student)
    assert student.config.role == "student" and student.config.training["method"] == method
    assert res.wall_seconds > 0 and student.config.training["distill_wall_seconds"] == res.wall_seconds
    x = generate(student, student.config.sampling.sampler, resolve_timesteps(student), 16, seed=1,
                 labels=class_labels(student, 16, None), guidance=student.config.sampling.guidance).x
    assert x.shape == (16, 2) and torch.isfinite(x).all()
    assert len(resolve_timesteps(student)) == 1  # distilled for --steps 1

    # interrupted in the last stage after its first checkpoint, then resumed: the same student, bit for bit
    class Interrupt(Exception):
        pass

    def interrupting(m, data, cfg, out, resume=False):
        if out.name == "student" and not resume:
            original = getattr(m, "after_step", lambda step: None)

            def after_step(step):
                original(step)
                if step == ITERS // 2 + 2:
                    raise Interrupt
            m.after_step = after_step
        return train(m, data, cfg, out, resume=resume)

    with pytest.raises(Interrupt):
        distill(method, _context(method, teachers["real"], tmp_path / "b", interrupting, ckpt_every=ITERS // 2))
    full = distill(method, _context(method, teachers["real"], tmp_path / "c", ckpt_every=ITERS // 2))
    resumed = distill(method, _context(method, teachers["real"], tmp_path / "b", resume=True, ckpt_every=ITERS // 2))
    w_full = load_tensors(full.student / "model.safetensors")
    w_res = load_tensors(resumed.student / "model.safetensors")
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full), method

    # the real teacher is what makes the student good
    if METHODS[method].needs_teacher:
        rand = distill(method, _context(method, teachers["random"], tmp_path / "r"))
        assert _swd(res.student) < 0.5 * _swd(rand.student), method
    else:
        untrained = _context(method, None, tmp_path / "u")
        untrained.train_config = dataclasses.replace(untrained.train_config, steps=1, lr=0.0)
        u = distill(method, untrained)
        assert _swd(res.student) < 0.5 * _swd(u.student), method
