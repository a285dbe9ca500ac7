"""Bad own data: one line naming the file or folder, exit status 2, nothing written (issue 11, item 6)."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.data.shapes import write_shapes


def _png(path: Path, size=(8, 8), value=100, mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).convert(mode).save(path)
    return path


def _folder(tmp: Path, n=6) -> Path:
    for i in range(n):
        _png(tmp / "src" / f"{i}.png", value=20 * i)
    return tmp / "src"


def empty(tmp):
    (tmp / "src").mkdir()
    return [str(tmp / "src")], r"src holds no images"


def truncated(tmp):
    src = _folder(tmp)
    data = (src / "3.png").read_bytes()
    (src / "3.png").write_bytes(data[: len(data) // 2])
    return [str(src)], r"3\.png is not a readable image .*--skip-bad-images"


def not_an_image(tmp):
    src = _folder(tmp)
    (src / "notes.txt").write_text("hello")
    return [str(src)], r"notes\.txt is not an image"


def sizes_differ(tmp):
    src = _folder(tmp)
    _png(src / "big.png", size=(10, 12))
    return [str(src)], r"images differ in size \(.*0\.png is 8x8, .*big\.png is 10x12\): pass --resolution"


def mixed_folder(tmp):
    src = _folder(tmp)
    _png(src / "cls" / "a.png")
    return [str(src)], r"has both images and sub-folders"


def labels_float(tmp):
    np.save(tmp / "x.npy", np.zeros((5, 8, 8), np.uint8))
    np.save(tmp / "y.npy", np.zeros(5, np.float32))
    return [str(tmp / "x.npy"), "--labels", str(tmp / "y.npy")], r"y\.npy are float32, not integers"


def labels_count(tmp):
    np.save(tmp / "x.npy", np.zeros((5, 8, 8), np.uint8))
    np.save(tmp / "y.npy", np.zeros(4, np.int64))
    return [str(tmp / "x.npy"), "--labels", str(tmp / "y.npy")], r"y\.npy have shape \(4,\) but there are 5 images"


def npz_without_x(tmp):
    np.savez(tmp / "a.npz", images=np.zeros((5, 8, 8), np.uint8))
    return [str(tmp / "a.npz")], r"a\.npz has no array named x \(it has images\)"


def float_without_range(tmp):
    np.save(tmp / "x.npy", np.zeros((5, 8, 8), np.float32))
    return [str(tmp / "x.npy")], r"x\.npy holds float32 values: say their range with --range"


def range_on_uint8(tmp):
    np.save(tmp / "x.npy", np.zeros((5, 8, 8), np.uint8))
    return [str(tmp / "x.npy"), "--range", "0,1"], r"--range applies to float arrays"


def bad_range(tmp):
    np.save(tmp / "x.npy", np.zeros((5, 8, 8), np.float32))
    return [str(tmp / "x.npy"), "--range", "1,0"], r"--range '1,0': give two finite numbers"


def wrong_shape(tmp):
    np.save(tmp / "x.npy", np.zeros((5, 8), np.uint8))
    return [str(tmp / "x.npy")], r"x\.npy holds an array of shape \(5, 8\)"


def pickled_npy(tmp):
    np.save(tmp / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return [str(tmp / "x.npy")], r"x\.npy is not a readable \.npy array"


def missing(tmp):
    return [str(tmp / "nowhere")], r"nowhere: no such file or folder"


def unknown_suffix(tmp):
    (tmp / "data.csv").write_text("1,2")
    return [str(tmp / "data.csv")], r"data\.csv: not a folder, \.npy or \.npz"


def flags_on_built_in(tmp):
    return ["digits", "--resolution", "16"], r"--resolution apply to your own data; digits is built in"


def channels_two(tmp):
    return [str(_folder(tmp)), "--channels", "2"], r"--channels 2: use 1 \(grayscale\) or 3"


def preset_does_not_divide(tmp):
    for i in range(6):
        _png(tmp / "src" / f"{i}.png", size=(30, 30), value=20 * i)
    return [str(tmp / "src"), "--preset", "base32"], r"must divide by 8; the data is 30x30: pass --resolution 32"


def conditional_without_labels(tmp):
    return [str(_folder(tmp)), "--conditional"], r"--conditional needs labels and .* has none"


def held_out_too_big(tmp):
    return [str(_folder(tmp, n=1)), "--test-fraction", "0.5"], r"has 1 images: too few to hold out"


def bad_memory_budget(tmp):
    return [str(_folder(tmp)), "--memory-budget", "lots"], r"--memory-budget 'lots': give a size"


def broken_link(tmp):
    src = _folder(tmp)
    (src / "gone.png").symlink_to(tmp / "nowhere.png")
    return [str(src)], r"gone\.png is not a readable image"


def npz_object_array(tmp):
    np.savez(tmp / "o.npz", x=np.zeros((5, 8, 8), np.uint8), y=np.array([{"a": 1}] * 5, dtype=object))
    return [str(tmp / "o.npz")], r"o\.npz: an array in it cannot be read"


def range_on_a_folder(tmp):
    return [str(_folder(tmp)), "--range", "0,1"], r"--range do not apply here: .* is an image folder"


CASES = [empty, truncated, not_an_image, sizes_differ, mixed_folder, labels_float, labels_count, npz_without_x,
         float_without_range, range_on_uint8, bad_range, wrong_shape, pickled_npy, missing, unknown_suffix,
         flags_on_built_in, channels_two, preset_does_not_divide, conditional_without_labels, held_out_too_big,
         bad_memory_budget, broken_link, npz_object_array, range_on_a_folder]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_data_is_one_line_exit_2_and_nothing_written(case, tmp_path):
    args, match = case(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(app, ["train", "--data", *args, "--preset", "test8", "--steps", "1", "--batch", "2",
                                   "--out", str(tmp_path / "out")]
                             if "--preset" not in args else ["train", "--data", *args, "--steps", "1", "--batch",
                                                             "2", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert re.search(match, lines[0]), (match, lines[0])
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == before


def test_skip_bad_images_skips_and_counts(tmp_path):
    src = _folder(tmp_path)
    data = (src / "3.png").read_bytes()
    (src / "3.png").write_bytes(data[: len(data) // 2])
    (src / "notes.txt").write_text("hello")
    res = CliRunner().invoke(app, ["train", "--data", str(src), "--skip-bad-images", "--preset", "test8", "--steps",
                                   "1", "--batch", "2", "--test-fraction", "0", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert "skipped 2 unreadable or non-image files" in res.stderr
    import json

    assert json.loads((tmp_path / "out" / "config.json").read_text())["data_record"]["n_train"] == 5


def test_distill_and_evaluate_data_flags_without_data_are_refused(tmp_path):
    write_shapes(tmp_path / "s", 6, size=8)
    res = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "nope"), "--resolution", "8"])
    assert res.exit_code == 2 and "--resolution say how to read --data: pass --data too" in res.stderr


def labels_elsewhere_ok(tmp):  # not bad: labels in another folder (the hash once took paths relative to the data)
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    np.save(tmp / "a" / "x.npy", np.zeros((5, 8, 8), np.uint8))
    np.save(tmp / "b" / "y.npy", np.arange(5) % 2)
    return [str(tmp / "a" / "x.npy"), "--labels", str(tmp / "b" / "y.npy")]


def test_labels_in_another_folder_are_fine(tmp_path):
    res = CliRunner().invoke(app, ["train", "--data", *labels_elsewhere_ok(tmp_path), "--test-fraction", "0",
                                   "--preset", "test8", "--steps", "1", "--batch", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output

