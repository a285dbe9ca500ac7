"""What ``--data`` names: a built-in data set, or a user's source with the options that say how to read it.

A :class:`DataSpec` is written as one string, its *key*: the source alone when every option is at its default
(``/data/faces``), otherwise the source followed by the options in URL-query form
(``/data/x.npy?range=0,1&labels=/data/y.npy``).  The key is what a model folder records as its ``data``, what
caches (feature networks, evaluation references) are keyed by, and what ``--data`` also accepts verbatim, so a
recorded key reopens the same data the same way.  Paths in a key are absolute.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from fewstep.errors import FewstepError

DEFAULT_TEST_FRACTION = 0.1  # held out when a source has no split of its own and no --data-test
SPLIT_SEED = 0  # the permutation that picks the held-out images (as for the built-in digits and mnist)


@dataclass(frozen=True)
class DataSpec:
    """A user's data source and how to read it (every field but ``source`` optional)."""

    source: str  # an image folder, a .npy / .npz file, or a folder written by datasets' save_to_disk
    labels: str | None = None  # a .npy of integer labels for a .npy source
    range: str | None = None  # value range of a float array: "0,1", "-1,1" (or any "lo,hi")
    resolution: int | None = None  # resize the shorter side to this and center-crop a square
    channels: int | None = None  # 1 or 3 (default: 1 when every image is grayscale, else 3)
    test_fraction: float | None = None  # held-out share (default DEFAULT_TEST_FRACTION)
    test: str | None = None  # a second source that is the held-out split (read with the same options)
    image_column: str | None = None  # datasets folders: the image column (default: the Image feature)
    label_column: str | None = None  # datasets folders: the label column (default: the ClassLabel feature)
    skip_bad_images: bool = False  # skip unreadable images (and count them) instead of stopping

    def key(self) -> str:
        opts = [(f.name, _text(getattr(self, f.name))) for f in dataclasses.fields(self)
                if f.name != "source" and _given(getattr(self, f.name))]
        return self.source + ("?" + urlencode(opts, safe="/,:") if opts else "")

    @property
    def range_values(self) -> tuple[float, float] | None:
        if self.range is None:
            return None
        return parse_range(self.range)

    def for_test_source(self) -> DataSpec:
        """The spec that reads the ``test`` source with this spec's options."""
        assert self.test is not None
        return dataclasses.replace(self, source=self.test, test=None, test_fraction=None, labels=None)


def _given(v: object) -> bool:
    """An option that was set (0 and 0.0 are values; None and False are not)."""
    return v is not None and v is not False


def _text(v: object) -> str:
    return "1" if v is True else str(v)


def parse_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(t) for t in text.split(","))
    except ValueError:
        raise FewstepError(f"--range {text!r}: give the low and high value, e.g. 0,1 or -1,1") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise FewstepError(f"--range {text!r}: give two finite numbers, low before high (e.g. 0,1)")
    return lo, hi


def is_builtin(data: str) -> bool:
    from fewstep.data.datasets import DATASETS

    return data in DATASETS


_FIELDS = {f.name: f for f in dataclasses.fields(DataSpec)}
FLAGS = {"labels": "--labels", "range": "--range", "resolution": "--resolution", "channels": "--channels",
         "test_fraction": "--test-fraction", "test": "--data-test", "image_column": "--image-column",
         "label_column": "--label-column", "skip_bad_images": "--skip-bad-images"}  # the CLI's name of each option


def parse_key(key: str) -> DataSpec:
    """The spec a key (or a plain path) names; paths made absolute.  Unknown options are refused."""
    source, _, query = ("", "", "") if Path(key).exists() else key.partition("?")  # a path holding "?" is a path
    source = source or key
    if not source:
        raise FewstepError(f"--data {key!r}: name a data set or a source (folder, .npy, .npz)")
    values: dict[str, object] = {}
    for name, text in parse_qsl(query, keep_blank_values=True):
        if name not in _FIELDS or name == "source":
            raise FewstepError(f"--data {key!r}: unknown option {name!r} (known: "
                               f"{', '.join(n for n in _FIELDS if n != 'source')})")
        values[name] = _convert(name, text, key)
    return make_spec(source, **values)  # type: ignore[arg-type]


def _convert(name: str, text: str, key: str) -> object:
    kind = _FIELDS[name].type
    try:
        if "int" in str(kind):
            return int(text)
        if "float" in str(kind):
            return float(text)
        if "bool" in str(kind):
            return text.lower() in ("1", "true", "yes")
    except ValueError:
        raise FewstepError(f"--data {key!r}: option {name}={text!r} is not a number") from None
    return text


def make_spec(source: str, *, labels: str | None = None, range: str | None = None, resolution: int | None = None,
              channels: int | None = None, test_fraction: float | None = None, test: str | None = None,
              image_column: str | None = None, label_column: str | None = None,
              skip_bad_images: bool = False) -> DataSpec:
    """A checked spec for ``source`` (absolute paths; option values checked; nothing is read yet)."""
    if resolution is not None and resolution < 1:
        raise FewstepError(f"--resolution {resolution}: give a size of at least 1 pixel")
    if channels is not None and channels not in (1, 3):
        raise FewstepError(f"--channels {channels}: use 1 (grayscale) or 3 (RGB)")
    if test_fraction is not None and not (0.0 <= test_fraction < 1.0):
        raise FewstepError(f"--test-fraction {test_fraction}: give a share in [0, 1) of the images to hold out")
    if test is not None and test_fraction is not None:
        raise FewstepError("--data-test and --test-fraction both name the held-out split: give one")
    if range is not None:
        lo, hi = parse_range(range)
        range = f"{lo:g},{hi:g}"
    return DataSpec(source=_absolute(source), labels=_absolute(labels) if labels else None, range=range,
                    resolution=resolution, channels=channels, test_fraction=test_fraction,
                    test=_absolute(test) if test else None, image_column=image_column, label_column=label_column,
                    skip_bad_images=bool(skip_bad_images))


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def data_key(data: str, **options: object) -> str:
    """The key for ``--data`` and the CLI's data flags: a built-in name as it is (the flags are refused there);
    a source (or a key) with the flags merged in."""
    given = {k: v for k, v in options.items() if _given(v)}
    if is_builtin(data):
        if given:
            flags = ", ".join(FLAGS[k] for k in given)
            raise FewstepError(f"{flags} apply to your own data; {data} is built in, with fixed shape and splits: "
                               "drop them")
        return data
    spec = parse_key(data)
    merged = {**{f: getattr(spec, f) for f in _FIELDS if f != "source"}, **given}
    return make_spec(spec.source, **merged).key()  # type: ignore[arg-type]
