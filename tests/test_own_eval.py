"""Evaluation on a user's own data (issue 11, item 4): feature networks keyed by the data's content, an autoencoder
for unlabelled data, FD refused below its minimum n, and `fewstep evaluate --model` finding (and checking) the
data a model was trained on."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.data.datasets import LazyImages, load_dataset
from fewstep.data.shapes import CLASSES, shape_image, write_shapes
from fewstep.data.spec import data_key
from fewstep.errors import FewstepError
from fewstep.evaluate import features
from fewstep.evaluate import runner as R
from fewstep.evaluate.features import feature_extractor

cli = CliRunner()


@pytest.fixture(autouse=True)
def _small(tmp_path, monkeypatch):
    """A cache of this test's own, and feature networks of about 20 epochs here (500 8x8 images): seconds."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(features, "PIXEL_BUDGET", 600_000)


def _repaint(path):
    """Change one image of a source (another colour, same size)."""
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(path)


def test_labelled_folder_gets_a_classifier_cached_by_key_and_content(tmp_path, monkeypatch):
    src = write_shapes(tmp_path / "shapes", 600, size=8)
    key = data_key(str(src), test_fraction=0.2)
    fx = feature_extractor(key)
    assert fx.kind == "classifier" and fx.test_accuracy > 0.5  # three shapes, chance is 1/3
    folder = features._folder(key)
    assert folder.parent == tmp_path / "cache" / "features" and folder.name.startswith("data-")
    info = json.loads((folder / "info.json").read_text())
    assert info["kind"] == "classifier" and info["test_accuracy"] == fx.test_accuracy and info["num_classes"] == 3
    assert info["epochs"] == features.own_epochs(480, (3, 8, 8)) == 20
    assert info["n_train"] == 480 and info["n_test"] == 120 and info["data_hash"]
    test = load_dataset(key, "test")
    f, pred = fx(test.x)
    assert f.shape == (120, features.FEATURE_DIM) and float((pred == test.y).float().mean()) == fx.test_accuracy
    monkeypatch.setattr(features, "train_feature_net", lambda *a, **k: pytest.fail("retrained"))
    again = feature_extractor(key)  # read back from the cache
    assert torch.equal(again(test.x)[0], f)
    # other options (channels, split) name other data; so does an edited source
    assert features._folder(data_key(str(src), test_fraction=0.2, channels=1)) != folder
    assert features._folder(data_key(str(src), test_fraction=0.3)) != folder
    _repaint(src / "disk" / "00001.png")
    assert features._folder(key) != folder


def test_unlabelled_array_gets_an_autoencoder(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", np.stack([shape_image(CLASSES[i % 3], 8, rng) for i in range(600)]))  # no labels
    key = data_key(str(tmp_path / "x.npy"), test_fraction=0.4)
    fx = feature_extractor(key)
    assert fx.kind == "autoencoder" and fx.test_accuracy is None and 0 < fx.test_error < 1
    info = json.loads((features._folder(key) / "info.json").read_text())
    assert info["kind"] == "autoencoder" and info["test_error"] == fx.test_error and info["test_accuracy"] is None
    test = load_dataset(key, "test")
    f, pred = fx(test.x)
    assert f.shape == (240, features.FEATURE_DIM) and pred is None
    train = load_dataset(key, "train").x
    q = R.measure(key, train[torch.randperm(len(train))[:240]], None, bootstrap=0)
    assert q.fd is not None and q.kid is not None and q.precision is not None and q.floor.fd is not None
    assert q.feature_accuracy is None and q.feature_error == fx.test_error and q.accuracy is None
    noisy = R.measure(key, torch.rand(240, 3, 8, 8) * 2 - 1, None, bootstrap=0)
    assert noisy.fd > 10 * q.fd


def test_fd_is_refused_below_its_minimum_naming_the_n_available(tmp_path):
    src = write_shapes(tmp_path / "few", 500, size=8)  # 10% held out: 50 test images
    key = data_key(str(src))
    with pytest.raises(FewstepError, match=rf"the test split of .*few has 50 images; .* at least {R.MIN_IMAGE_N}: "
                                           r"hold out more images \(--test-fraction\)"):
        R.default_n(key)
    with pytest.raises(FewstepError, match="has 50 images"):
        R.measure(key, torch.zeros(50, 3, 8, 8))
    more = data_key(str(src), test_fraction=0.5)  # 250 test images: enough, but not for --n 50
    with pytest.raises(FewstepError, match=rf"--n 50 is too few .* at least {R.MIN_IMAGE_N} samples \(the test "
                                           r"split of .* has 250\)"):
        R.check_n(more, 50)
    assert R.default_n(more) == 250 and R.default_n("digits") == 500  # the built-in sets are above it
    R.check_n("gmm", 10)  # 2-D points have no minimum


def test_evaluate_finds_the_models_data_and_refuses_a_changed_source(tmp_path):
    src = write_shapes(tmp_path / "shapes", 600, size=8)
    r = cli.invoke(app, ["train", "--data", str(src), "--test-fraction", "0.4", "--conditional", "--preset", "test8",
                         "--steps", "5", "--batch", "8", "--out", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    args = ["evaluate", "--model", str(tmp_path / "t"), "--sampler", "ddim", "--steps", "1"]
    r = cli.invoke(app, [*args, "--json", str(tmp_path / "e.json")])  # no --data: the recorded key and split
    assert r.exit_code == 0, r.output
    js = json.loads((tmp_path / "e.json").read_text())
    assert js["n"] == 240 and js["dataset"] == data_key(str(src), test_fraction=0.4)
    assert js["fd"] is not None and js["accuracy"] is not None and js["feature_accuracy"] > 0.5
    r = cli.invoke(app, [*args, "--n", "50"])
    assert r.exit_code == 2 and "--n 50 is too few for image data" in r.output
    _repaint(src / "square" / "00000.png")
    r = cli.invoke(app, args)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "has changed since" in r.output and "--data" in r.output
    r = cli.invoke(app, [*args, "--data", str(src), "--test-fraction", "0.4"])  # as it is now, asked for by name
    assert r.exit_code == 0, r.output


def test_a_lazy_split_trains_and_measures_as_in_memory(tmp_path, monkeypatch):
    src = write_shapes(tmp_path / "shapes", 600, size=8)
    key = data_key(str(src), test_fraction=0.4)
    mem = features.train_feature_net(key)
    monkeypatch.setenv("FEWSTEP_MEMORY_BUDGET", "1K")  # every split larger than this is read on demand
    monkeypatch.setenv("FEWSTEP_DATA_WORKERS", "0")
    assert isinstance(load_dataset(key, "train").x, LazyImages) and isinstance(load_dataset(key, "test").x, LazyImages)
    lazy = features.train_feature_net(key)
    assert lazy.test_accuracy == mem.test_accuracy
    assert all(torch.equal(a, b) for a, b in zip(lazy.net.state_dict().values(), mem.net.state_dict().values()))
    q = R.measure(key, load_dataset(key, "train").x[torch.arange(200)], None, bootstrap=0)
    assert q.fd is not None and q.feature_accuracy is not None
