"""The GAN baselines (issue 13): a projection cGAN learns the classes of the 2-D Gaussian mixture, InfoGAN's code
comes to control which mode a sample lands in, `fewstep sample --code K` picks a code, and the refusals a GAN
folder needs (no teacher, one step, codes only on an InfoGAN)."""

import numpy as np
import pytest
import torch
from corpus import invoke

from fewstep.data.datasets import load_dataset
from fewstep.data.toy import gmm8
from fewstep.distill import distill
from fewstep.distill.gan import GANOptions
from fewstep.errors import FewstepError
from fewstep.evaluate import metrics as M
from fewstep.generate import generate, resolve_timesteps, sample_model
from fewstep.models.backbones import build_backbone
from fewstep.models.folder import load_model
from fewstep.models.generator import code_latent, code_of
from fewstep.training.loop import TrainConfig
from fewstep.training.recipe import RunContext


def _gan(tmp_path, name: str, options: GANOptions, steps: int = 1500, labels: bool = True):
    ds = load_dataset("gmm", "train")
    cfg = TrainConfig(steps=steps, batch=256, lr=1e-3, warmup=0, grad_clip=0.0, ckpt_every=10**6, ema_decay=0.99,
                      progress=False)
    ctx = RunContext(None, None, (ds.x, ds.y if labels else None), "gmm", tmp_path / name, options, cfg)
    return load_model(distill("gan", ctx).student)


def _modes(x: torch.Tensor) -> torch.Tensor:
    """The index of the mixture component nearest to each point."""
    return torch.cdist(x.double(), gmm8().means).argmin(1)


@pytest.mark.parametrize("k", [2, 10, 37])
def test_code_of_noise_is_uniform_and_code_latent_inverts_it(k):
    noise = torch.randn(40000, 3, generator=torch.Generator().manual_seed(k))
    counts = torch.bincount(code_of(noise, k), minlength=k).double()
    assert counts.min() > 0.8 * 40000 / k and counts.max() < 1.2 * 40000 / k
    for code in range(k):
        z = torch.zeros(1, 3)
        z[0, -1] = code_latent(code, k)
        assert int(code_of(z, k)) == code


def test_generator_config_is_checked():
    with pytest.raises(FewstepError, match="divide by 4"):
        build_backbone("gan-generator", {"sample_shape": [1, 30, 30]})
    with pytest.raises(FewstepError, match="classes or InfoGAN codes"):
        build_backbone("gan-generator", {"sample_shape": [2], "num_class_embeds": 8, "codes": 8})
    net = build_backbone("gan-generator", {"sample_shape": [1, 8, 8], "width": 8, "num_class_embeds": 10})
    assert net(torch.randn(3, 1, 8, 8), torch.zeros(3), torch.tensor([0, 1, 2])).shape == (3, 1, 8, 8)


def test_cgan_learns_the_classes_of_the_mixture(tmp_path):
    g = _gan(tmp_path, "c", GANOptions(n_dis=1))
    assert g.config.num_classes == 8 and g.config.training["variant"] == "cgan" and g.config.prediction == "gan"
    labels = torch.arange(2000) % 8
    x = generate(g, g.config.sampling.sampler, resolve_timesteps(g), 2000, seed=0, labels=labels).x
    acc = float((_modes(x) == labels).double().mean())
    test = load_dataset("gmm", "test").x.double().numpy()
    swd = M.sliced_wasserstein(x.double().numpy(), test)
    # measured: accuracy 0.998, SWD 0.032 (the untrained generator: accuracy 0.093, SWD 1.37)
    assert acc > 0.8 and swd < 0.3, (acc, swd)


def _code_mode_information(g) -> float:
    """I(code; mode) in nats from 400 samples per code (at most log 8 = 2.08)."""
    joint = torch.stack([torch.bincount(_modes(sample_model(g, 400, seed=1, code=k).x), minlength=8)
                         for k in range(8)]).double()
    p = joint / joint.sum()
    return float((p * (p / (p.sum(0, keepdim=True) * p.sum(1, keepdim=True))).log()).nan_to_num().sum())


def test_infogan_code_controls_the_mode_and_sample_code_picks_it(tmp_path):
    g = _gan(tmp_path, "i", GANOptions(variant="infogan", codes=8, n_dis=1), labels=False)
    assert g.config.num_classes == 0 and g.config.training["codes"] == 8
    # the mutual-information term is what ties the code to the mode: measured 2.08 (= log 8), 0.73 with
    # info_weight=0 and 0.001 untrained (the untrained generator puts every code in the same mode)
    off = _gan(tmp_path, "off", GANOptions(variant="infogan", codes=8, n_dis=1, info_weight=0.0),
               labels=False)
    assert _code_mode_information(g) > 1.7 > 1.2 > _code_mode_information(off)
    out = tmp_path / "code3.npy"
    res = invoke(["sample", "--model", str(tmp_path / "i"), "--code", "3", "--n", "16", "--out", str(out)])
    assert res.code == 0, res.stderr
    assert np.allclose(np.load(out), sample_model(g, 16, code=3).x.numpy(), atol=1e-6)
    res = invoke(["sample", "--model", str(tmp_path / "i"), "--code", "8", "--out", str(tmp_path / "x.npy")])
    assert res.code == 2 and "outside the model's codes 0..7" in res.stderr


def test_gan_refusals(tmp_path, fx):
    res = invoke(["distill", "--method", "gan", "--teacher", str(fx.model), "--data", "digits", "--out",
                  str(tmp_path / "t")])
    assert res.code == 2 and "no teacher" in res.stderr and not (tmp_path / "t").exists()
    res = invoke(["distill", "--method", "gan", "--data", "digits", "--set", "codes=4", "--out", str(tmp_path / "c")])
    assert res.code == 2 and "variant=infogan" in res.stderr
    res = invoke(["distill", "--method", "gan", "--data", "moons", "--set", "variant=cgan", "--iters", "2", "--out",
                  str(tmp_path / "m")])
    assert res.code == 2 and "labelled data" in res.stderr
    res = invoke(["distill", "--method", "gan", "--data", "digits", "--iters", "4", "--batch", "8", "--set", "width=8",
                  "--out", str(tmp_path / "g")])
    assert res.code == 0, res.stderr
    g = load_model(tmp_path / "g")
    assert g.config.num_classes == 10 and g.config.training["lr"] == 2e-4  # the paper's Adam lr, the method's default
    res = invoke(["sample", "--model", str(tmp_path / "g"), "--code", "1", "--out", str(tmp_path / "x.npy")])
    assert res.code == 2 and "--code picks an InfoGAN" in res.stderr
    res = invoke(["sample", "--model", str(tmp_path / "g"), "--steps", "2", "--out", str(tmp_path / "x.npy")])
    assert res.code == 2 and "a GAN maps the starting noise" in res.stderr
    res = invoke(["sample", "--model", str(tmp_path / "g"), "--guidance", "2", "--out", str(tmp_path / "x.npy")])
    assert res.code == 2
