"""A user's own data as --data: image folders, .npy/.npz arrays, datasets folders; splits, transforms, laziness.

The round trip is exact: the built-in mnist splits written as PNG class folders read back as the same tensors
(in the folder's order), and a teacher trained on the folder has the same loss curve as one trained on the
built-in tensors in that order.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.data import datasets as D
from fewstep.data.datasets import LazyImages, load_dataset, own_data
from fewstep.data.shapes import write_shapes
from fewstep.data.spec import data_key, parse_key
from fewstep.errors import FewstepError
from fewstep.models.backbones import default_preset, preset_backbone
from fewstep.training.loop import TrainConfig, train
from fewstep.training.teacher import TeacherMethod, TeacherOptions, TeacherSpec, build_teacher

runner = CliRunner()


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def _export(ds, root: Path) -> list[int]:
    """Write a built-in split as class folders; return the built-in indices in the folder's order."""
    for i, (x, y) in enumerate(zip(ds.x, ds.y)):
        d = root / str(int(y))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_to_uint8(x[0])).save(d / f"{i:05d}.png")
    return sorted(range(len(ds)), key=lambda i: (int(ds.y[i]), i))


@pytest.fixture(scope="module")
def mnist_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist-png")
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    return root, _export(train, root / "train"), _export(test, root / "test")


def test_mnist_exported_to_png_folders_reads_back_exactly(mnist_folders):
    root, train_order, test_order = mnist_folders
    key = data_key(str(root / "train"), test=str(root / "test"))
    train, test = load_dataset(key, "train"), load_dataset(key, "test")
    ref_train, ref_test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    assert torch.equal(train.x, ref_train.x[train_order]) and torch.equal(train.y, ref_train.y[train_order])
    assert torch.equal(test.x, ref_test.x[test_order]) and torch.equal(test.y, ref_test.y[test_order])
    assert train.num_classes == 10 and train.sample_shape == (1, 28, 28)
    rec = own_data(key).record()
    assert rec["n_train"] == 4000 and rec["n_test"] == 1000 and rec["test_hash"] and rec["hash"] != rec["test_hash"]
    assert rec["class_names"] == [str(c) for c in range(10)]


def test_a_teacher_trained_on_the_folder_has_the_built_in_loss_curve(mnist_folders, tmp_path):
    root, train_order, _ = mnist_folders
    key = data_key(str(root / "train"), test=str(root / "test"))
    cfg = TrainConfig(steps=6, batch=8, lr=1e-3, warmup=2, log_every=1, ckpt_every=100, progress=False)
    method, data = build_teacher(TeacherOptions(data=key, preset="test8", conditional=True))
    folder = train(method, data, cfg, tmp_path / "folder")
    ref = load_dataset("mnist", "train")
    kind, bcfg = preset_backbone("test8", (1, 28, 28), 10)
    torch.manual_seed(0)  # build_teacher seeds with TeacherOptions.seed = 0 before initialising
    twin = TeacherMethod(TeacherSpec(backbone=kind, backbone_config=bcfg, sample_shape=(1, 28, 28), num_classes=10,
                                     data="mnist"))
    builtin = train(twin, (ref.x[train_order], ref.y[train_order]), cfg, tmp_path / "builtin")
    assert [r["loss/denoise"] for r in folder.history] == [r["loss/denoise"] for r in builtin.history]
    saved = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert saved["data"] == key and saved["data_record"]["hash"] == own_data(key).record()["hash"]


def test_arrays_npy_npz_layouts_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (30, 8, 8), dtype=np.uint8)
    labels = (np.arange(30) % 3).astype(np.int64)
    np.save(tmp_path / "x.npy", imgs)
    np.save(tmp_path / "y.npy", labels)
    np.save(tmp_path / "nhwc.npy", np.repeat(imgs[..., None], 3, axis=3))
    np.save(tmp_path / "nchw.npy", imgs[:, None])
    np.savez(tmp_path / "xy.npz", x=imgs, y=labels)
    expect = (torch.from_numpy(imgs).float()[:, None] - 127.5) / 127.5
    keys = {"npy": data_key(str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"), test_fraction=0.0),
            "npz": data_key(str(tmp_path / "xy.npz"), test_fraction=0.0),
            "nchw": data_key(str(tmp_path / "nchw.npy"), test_fraction=0.0)}
    for name, key in keys.items():
        ds = load_dataset(key, "train")
        assert torch.equal(ds.x, expect), name
    assert torch.equal(load_dataset(keys["npy"], "train").y, torch.from_numpy(labels))
    assert load_dataset(keys["npz"], "train").num_classes == 3
    rgb = load_dataset(data_key(str(tmp_path / "nhwc.npy"), test_fraction=0.0), "train")
    assert rgb.x.shape == (30, 3, 8, 8) and torch.equal(rgb.x[:, 1:2], expect)
    gray = load_dataset(data_key(str(tmp_path / "nhwc.npy"), test_fraction=0.0, channels=1), "train")
    assert torch.allclose(gray.x, expect, atol=1e-5)  # luma of a grey pixel is the pixel


def test_float_arrays_need_their_range_and_are_clipped_with_one_warning(tmp_path, capsys):
    x = np.linspace(-0.1, 1.1, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    np.save(tmp_path / "f.npy", x)
    with pytest.raises(FewstepError, match=r"float32 values: say their range with --range 0,1"):
        load_dataset(data_key(str(tmp_path / "f.npy")), "train")
    ds = load_dataset(data_key(str(tmp_path / "f.npy"), range="0,1", test_fraction=0.0), "train")
    err = capsys.readouterr().err.strip().splitlines()
    outside = int(((x < 0) | (x > 1)).sum())
    assert len(err) == 1 and f"clipped {outside} of {x.size} values outside [0, 1]" in err[0]
    assert float(ds.x.min()) == -1.0 and float(ds.x.max()) == 1.0
    inside = (x >= 0) & (x <= 1)
    assert torch.allclose(ds.x[:, 0][torch.from_numpy(inside)], torch.from_numpy(x[inside] * 2 - 1), atol=1e-6)


def test_rgb_folder_resized_to_16_with_class_labels(tmp_path):
    write_shapes(tmp_path / "shapes", 30, size=20)
    key = data_key(str(tmp_path / "shapes"), resolution=16, test_fraction=0.2)
    train, test = load_dataset(key, "train"), load_dataset(key, "test")
    assert train.x.shape == (24, 3, 16, 16) and test.x.shape == (6, 3, 16, 16)
    assert train.num_classes == 3 and sorted(set(train.y.tolist())) == [0, 1, 2]
    assert own_data(key).record()["class_names"] == ["disk", "square", "triangle"]  # sorted, as ImageFolder
    # deterministic: the same key opens the same split in a fresh cache
    D._own_cached.cache_clear()
    D._own_split_cached.cache_clear()
    assert torch.equal(load_dataset(key, "test").x, test.x)
    # the default preset for 16x16 adapts (tiny8's levels at 16, three channels)
    kind, cfg = preset_backbone(default_preset(train.sample_shape), train.sample_shape, 3)
    assert cfg["sample_size"] == 16 and cfg["in_channels"] == 3 and cfg["num_class_embeds"] == 4


def test_presets_refuse_sizes_their_levels_do_not_divide():
    with pytest.raises(FewstepError, match=r"must divide by 8; the data is 30x30: pass --resolution 32"):
        preset_backbone("base32", (3, 30, 30))
    kind, cfg = preset_backbone("base32", (3, 24, 40))
    assert cfg["sample_size"] == (24, 40)


def test_grayscale_images_in_rgb_files_are_one_channel_unless_told(tmp_path):
    (tmp_path / "g").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).convert("RGB").save(tmp_path / "g" / f"{i}.png")
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "g" / f"{i}b.png")
    # an RGB file holds colour as far as the header says: the folder is RGB (channels from the data)
    assert load_dataset(data_key(str(tmp_path / "g"), test_fraction=0.0), "train").x.shape[1] == 3
    one = load_dataset(data_key(str(tmp_path / "g"), test_fraction=0.0, channels=1), "train")
    assert one.x.shape == (8, 1, 8, 8)


def test_datasets_folders_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(20)]
    feats = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"picture": imgs, "kind": [i % 2 for i in range(20)]}, features=feats)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds.select(range(15)), "test": ds.select(range(15, 20))}).save_to_disk(
        str(tmp_path / "dict"))
    one = load_dataset(data_key(str(tmp_path / "one"), test_fraction=0.0), "train")
    expect = torch.stack([(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() - 127.5) / 127.5 for im in imgs])
    assert torch.equal(one.x, expect) and one.y.tolist() == [i % 2 for i in range(20)] and one.num_classes == 2
    key = data_key(str(tmp_path / "dict"))
    tr, te = load_dataset(key, "train"), load_dataset(key, "test")
    assert torch.equal(tr.x, expect[:15]) and torch.equal(te.x, expect[15:])
    assert own_data(key).record()["split"] == "the source's own test split"
    with pytest.raises(FewstepError, match="no column 'nope'"):
        load_dataset(data_key(str(tmp_path / "one"), label_column="nope"), "train")


def test_keys_round_trip_and_flags_do_not_apply_to_built_in_sets(tmp_path):
    key = data_key(str(tmp_path / "x.npy"), range="0,1", resolution=16, test_fraction=0.0)
    spec = parse_key(key)
    assert spec.range == "0,1" and spec.resolution == 16 and spec.test_fraction == 0.0 and spec.key() == key
    assert data_key("mnist") == "mnist"
    with pytest.raises(FewstepError, match="--resolution apply to your own data; mnist is built in"):
        data_key("mnist", resolution=16)
    with pytest.raises(FewstepError, match="unknown option 'colour'"):
        parse_key(str(tmp_path) + "?colour=1")


def _lazy(monkeypatch, key):
    monkeypatch.setenv("FEWSTEP_MEMORY_BUDGET", "1K")
    ds = load_dataset(key, "train")
    assert isinstance(ds.x, LazyImages)
    return ds


@pytest.mark.parametrize("source", ["folder", "npy"])
def test_lazy_data_trains_exactly_as_in_memory_and_resumes_exactly(tmp_path, monkeypatch, source):
    if source == "folder":
        path = write_shapes(tmp_path / "shapes", 48, size=8)
    else:
        path = tmp_path / "x.npy"
        np.save(path, np.random.default_rng(0).integers(0, 256, (48, 8, 8, 3), dtype=np.uint8))
    key = data_key(str(path), test_fraction=0.0)
    mem = load_dataset(key, "train")
    assert isinstance(mem.x, torch.Tensor)
    lazy = _lazy(monkeypatch, key)
    assert torch.equal(lazy.x[torch.tensor([5, 1, 5])], mem.x[[5, 1, 5]])
    cfg = TrainConfig(steps=6, batch=8, lr=1e-3, warmup=2, log_every=1, ckpt_every=3, progress=False, hflip=True)

    def run(data, out, resume=False, steps=6):
        torch.manual_seed(0)
        kind, bcfg = preset_backbone("test8", (3, 8, 8))
        m = TeacherMethod(TeacherSpec(backbone=kind, backbone_config=bcfg, sample_shape=(3, 8, 8)))
        return train(m, data, TrainConfig(**{**cfg.__dict__, "steps": steps}), out, resume=resume)

    ref = run((mem.x, None), tmp_path / "mem")
    got = run((lazy.x, None), tmp_path / "lazy")
    assert [r["loss/denoise"] for r in got.history] == [r["loss/denoise"] for r in ref.history]
    run((lazy.x, None), tmp_path / "cut")  # then roll it back to its step-3 checkpoint, as a crash leaves it
    (tmp_path / "cut" / "checkpoints" / "latest").write_text("step_00000003")
    (tmp_path / "cut" / "model.safetensors").unlink()
    run((lazy.x, None), tmp_path / "cut", resume=True)
    a, b = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hflip_flips_half_the_batch_as_a_function_of_seed_and_step():
    from fewstep.training.loop import flip_mask

    m = flip_mask(7, 64, 0)
    assert torch.equal(m, flip_mask(7, 64, 0)) and not torch.equal(m, flip_mask(8, 64, 0))
    assert 16 < int(m.sum()) < 48


def test_a_changed_source_is_noticed_by_the_in_memory_cache(tmp_path):
    write_shapes(tmp_path / "s", 12, size=8)
    key = data_key(str(tmp_path / "s"), test_fraction=0.0)
    before = own_data(key).record()["hash"]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "s" / "disk" / "00001.png")
    assert own_data(key).record()["hash"] != before


def test_cli_train_distill_on_a_folder_and_rgb_export(tmp_path):
    shapes = write_shapes(tmp_path / "shapes", 60, size=20)
    r = runner.invoke(app, ["train", "--data", str(shapes), "--resolution", "16", "--channels", "3", "--conditional",
                            "--preset", "test8", "--steps", "4", "--batch", "8", "--hflip", "--out",
                            str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["sample_shape"] == [3, 16, 16] and cfg["num_classes"] == 3 and cfg["data_record"]["n_train"] == 54
    r = runner.invoke(app, ["sample", "--model", str(tmp_path / "t"), "--n", "6", "--steps", "2", "--guidance", "2",
                            "--out", str(tmp_path / "grid.png")])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "grid.png").mode == "RGB"
    r = runner.invoke(app, ["distill", "--teacher", str(tmp_path / "t"), "--method", "progressive", "--start-steps",
                            "2", "--steps", "1", "--iters", "2", "--reparam-iters", "2", "--batch", "8", "--out",
                            str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    student = json.loads((tmp_path / "d" / "student" / "config.json").read_text())
    assert student["data"] == cfg["data"] == data_key(str(shapes), resolution=16, channels=3)
    assert student["data_record"]["hash"] == cfg["data_record"]["hash"]
    r = runner.invoke(app, ["export", str(tmp_path / "t"), str(tmp_path / "diffusers")])
    assert r.exit_code == 0, r.output
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(tmp_path / "diffusers" / "unet")
    assert unet.config.in_channels == 3 and unet.config.sample_size == 16 and unet.config.num_class_embeds == 4


def test_cli_trains_and_samples_from_an_npz_given_as_a_relative_path(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", x=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), y=np.arange(40) % 4)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["train", "--data", "x.npz", "--conditional", "--preset", "test8", "--steps", "3",
                            "--batch", "8", "--out", "t"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["data"] == str(tmp_path / "x.npz") and cfg["num_classes"] == 4 and cfg["sample_shape"] == [3, 8, 8]
    r = runner.invoke(app, ["sample", "--model", "t", "--n", "4", "--steps", "2", "--out", "s.npy"])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "s.npy").shape == (4, 3, 8, 8)


def test_a_big_npz_is_extracted_and_read_back_exactly(tmp_path, monkeypatch):
    x = np.random.default_rng(1).integers(0, 256, (50, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", x=x)
    key = data_key(str(tmp_path / "big.npz"), test_fraction=0.0)
    monkeypatch.setenv("FEWSTEP_MEMORY_BUDGET", "1K")  # over budget: extracted to the cache, read by pread
    lazy = load_dataset(key, "train")
    assert isinstance(lazy.x, LazyImages)
    assert torch.equal(lazy.x[torch.arange(50)], (torch.from_numpy(x).float()[:, None] - 127.5) / 127.5)


def test_a_test_folder_missing_a_class_keeps_the_training_class_ids(tmp_path):
    for split, classes in (("train", ("cat", "dog", "zebra")), ("test", ("cat", "zebra"))):
        for c, value in zip(classes, (40 if classes[0] == "cat" else 0, 120, 200) if split == "train" else (40, 200)):
            for i in range(3):
                (tmp_path / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / split / c / f"{i}.png")
    key = data_key(str(tmp_path / "train"), test=str(tmp_path / "test"))
    test = load_dataset(key, "test")
    zebra = test.x[:, 0, 0, 0] > 0.5  # pixel 200
    assert test.y[zebra].tolist() == [2, 2, 2] and test.y[~zebra].tolist() == [0, 0, 0] and test.num_classes == 3
    (tmp_path / "test" / "lion").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "test" / "lion" / "0.png")
    with pytest.raises(FewstepError, match=r"has classes the training data does not \(lion"):
        load_dataset(key, "test")


def test_sixteen_bit_grayscale_pngs_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)  # 0 .. 65520
    (tmp_path / "g").mkdir()
    Image.fromarray(ramp).save(tmp_path / "g" / "a.png")
    assert Image.open(tmp_path / "g" / "a.png").mode.startswith("I")
    x = load_dataset(data_key(str(tmp_path / "g"), test_fraction=0.0), "train").x
    expect = (torch.from_numpy(np.round(ramp / 257.0)).float() - 127.5) / 127.5
    assert x.shape == (1, 1, 8, 8) and torch.equal(x[0, 0], expect)


def test_datasets_float_array_columns_follow_the_range(tmp_path):
    datasets = pytest.importorskip("datasets")
    arr = np.linspace(0, 1, 6 * 8 * 8, dtype=np.float32).reshape(6, 8, 8)
    feats = datasets.Features({"pixels": datasets.Array2D((8, 8), "float32")})
    datasets.Dataset.from_dict({"pixels": list(arr)}, features=feats).save_to_disk(str(tmp_path / "f"))
    with pytest.raises(FewstepError, match=r"holds float\d+ images: say their range with --range"):
        load_dataset(data_key(str(tmp_path / "f"), image_column="pixels"), "train")
    x = load_dataset(data_key(str(tmp_path / "f"), image_column="pixels", range="0,1", test_fraction=0.0), "train").x
    assert torch.allclose(x[:, 0], torch.from_numpy(arr * 2 - 1), atol=1e-6)


def test_a_worker_error_is_one_line(tmp_path, monkeypatch):
    src = write_shapes(tmp_path / "s", 12, size=8)
    key = data_key(str(src), test_fraction=0.0)
    monkeypatch.setenv("FEWSTEP_MEMORY_BUDGET", "1K")
    lazy = load_dataset(key, "train").x
    (src / "square" / "00003.png").write_bytes(b"broken")  # not the one image the scan kept (disk/00001)
    with pytest.raises(FewstepError) as e:
        list(lazy.loader([np.arange(12)], workers=1))
    assert "\n" not in str(e.value) and "00003.png can no longer be read" in str(e.value)


def test_resuming_a_teacher_on_changed_data_is_refused(tmp_path):
    src = write_shapes(tmp_path / "s", 30, size=8)
    args = ["train", "--data", str(src), "--preset", "test8", "--steps", "4", "--batch", "4", "--ckpt-every", "2",
            "--out", str(tmp_path / "t")]
    assert runner.invoke(app, args).exit_code == 0
    (tmp_path / "t" / "checkpoints" / "latest").write_text("step_00000002")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "disk" / "00000.png")
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 2 and "has changed since the run started" in r.stderr, r.output
