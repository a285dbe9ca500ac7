import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# feature networks and other caches go to a fresh folder: tests never read or write the user's cache
os.environ["FEWSTEP_CACHE"] = tempfile.mkdtemp(prefix="fewstep-test-cache-")
# tiny networks: one thread is as fast and immune to oversubscription on a shared 2-core machine
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """A tiny class-conditional DDPM teacher on digits (test8 preset, 800 steps, ~30 s), shared by tests."""
    from fewstep.data.datasets import load_dataset
    from fewstep.models.backbones import preset_backbone
    from fewstep.training.loop import TrainConfig, train
    from fewstep.training.teacher import TeacherMethod, TeacherSpec

    out = tmp_path_factory.mktemp("teacher") / "digits"
    ds = load_dataset("digits", "train")
    kind, cfg = preset_backbone("test8", ds.sample_shape, ds.num_classes)
    torch.manual_seed(0)
    method = TeacherMethod(TeacherSpec(backbone=kind, backbone_config=cfg, sample_shape=ds.sample_shape,
                                       num_classes=ds.num_classes, data="digits"))
    result = train(method, (ds.x, ds.y), TrainConfig(steps=800, lr=2e-3, warmup=20, ckpt_every=400, log_every=20,
                                                     ema_decay=0.995, progress=False), out)
    return out, result


def _gmm_teacher(root, conditional: bool):
    from fewstep.data.datasets import load_dataset
    from fewstep.models.backbones import preset_backbone
    from fewstep.training.loop import TrainConfig, train
    from fewstep.training.teacher import TeacherMethod, TeacherSpec

    ds = load_dataset("gmm", "train")
    k = ds.num_classes if conditional else 0
    kind, cfg = preset_backbone("mlp", ds.sample_shape, k)
    torch.manual_seed(0)
    method = TeacherMethod(TeacherSpec(backbone=kind, backbone_config=cfg, sample_shape=ds.sample_shape, data="gmm",
                                       num_classes=k))
    train(method, (ds.x, ds.y if conditional else None),
          TrainConfig(steps=1000, batch=256, lr=2e-3, warmup=20, ckpt_every=10**6, ema_decay=0.99, progress=False),
          root)
    return root


@pytest.fixture(scope="session")
def gmm_teacher(tmp_path_factory):
    """An unconditional DDPM (eps) MLP teacher on the 2-D Gaussian mixture (1,000 steps, ~15 s), shared by tests."""
    return _gmm_teacher(tmp_path_factory.mktemp("gmm") / "teacher", conditional=False)


@pytest.fixture(scope="session")
def gmm_cond_teacher(tmp_path_factory):
    """The same, class-conditional (8 components as classes, null class for guidance)."""
    return _gmm_teacher(tmp_path_factory.mktemp("gmm") / "cond-teacher", conditional=True)


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    """The bad-input corpus's shared inputs (tests/corpus.py): a tiny run, a model, a distillation run."""
    from corpus import Fixtures

    return Fixtures(tmp_path_factory.mktemp("corpus"))
