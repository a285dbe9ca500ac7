"""The evaluation feature networks: accuracy on digits, the on-disk cache, and clear errors."""

import json

import pytest
import torch

from fewstep.data.datasets import IMAGE_DATASETS, load_dataset
from fewstep.errors import FewstepError
from fewstep.evaluate import features
from fewstep.evaluate.features import VERSIONS, cache_dir, feature_extractor


def test_digits_feature_network_is_accurate_and_cached():
    """>= 97% test accuracy (the protocol's bar); a second call loads the same network from disk."""
    fx = feature_extractor("digits")  # trained once per test session (conftest points the cache at a temp dir)
    assert fx.test_accuracy >= 0.97
    test = load_dataset("digits", "test")
    f, pred = fx(test.x)
    assert f.shape == (len(test), features.FEATURE_DIM)
    assert float((pred == test.y).float().mean()) == pytest.approx(fx.test_accuracy)

    folder = cache_dir() / "features" / f"digits-v{VERSIONS['digits']}"
    info = json.loads((folder / "info.json").read_text())
    assert info["version"] == VERSIONS["digits"] and info["test_accuracy"] == fx.test_accuracy
    again = feature_extractor("digits")
    assert again.net is not fx.net  # read back from disk, not this object
    f2, pred2 = again(test.x)
    assert torch.equal(f, f2) and torch.equal(pred, pred2)


def test_every_image_dataset_has_a_recipe():
    assert set(VERSIONS) == set(IMAGE_DATASETS) and set(features.EPOCHS) == set(IMAGE_DATASETS)


def test_no_feature_network_for_a_toy_set():
    with pytest.raises(FewstepError, match="no feature network for 'gmm'"):
        feature_extractor("gmm")


def test_a_corrupt_cached_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    folder = tmp_path / "features" / f"mnist-v{VERSIONS['mnist']}"
    folder.mkdir(parents=True)
    (folder / "info.json").write_text(json.dumps({"channels": 1, "num_classes": 10, "test_accuracy": 0.9}))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FewstepError, match="feature network"):
        feature_extractor("mnist")


def test_the_quick_feature_network_is_its_own_cached_network_and_reference(monkeypatch):
    """Inside quick_features a built-in set's network is trained QUICK_EPOCHS on at most QUICK_SUBSET images, into
    its own cache folder (the full network and the references built on it are untouched), and the in-memory
    reference of the same (dataset, n) differs by variant."""
    from fewstep.evaluate.features import quick_features
    from fewstep.evaluate.runner import reference

    monkeypatch.setattr(features, "QUICK_SUBSET", 500)
    seen = []
    real = features._batches
    monkeypatch.setattr(features, "_batches", lambda x, perm, batch: (seen.append(len(x)), real(x, perm, batch))[1])
    full = feature_extractor("digits")
    seen.clear()
    with quick_features():
        quick = feature_extractor("digits")
        ref_quick = reference("digits", 200)
        assert features.features_variant("digits") == "quick"
    assert seen == [500] * features.QUICK_EPOCHS  # trained here: QUICK_EPOCHS passes over the subset
    folder = cache_dir() / "features" / f"digits-v{VERSIONS['digits']}-quick"
    assert json.loads((folder / "info.json").read_text())["variant"] == "quick"
    assert features.features_variant("digits") == "full" and feature_extractor("digits").test_accuracy == \
        full.test_accuracy
    assert not torch.equal(next(quick.net.parameters()), next(full.net.parameters()))
    assert ref_quick is not reference("digits", 200)
