"""A user's images, read and checked: image folders, ``.npy`` / ``.npz`` arrays, and ``datasets`` folders.

Every source is opened once: its files are checked (a bad one is one error naming it), its content hashed
(SHA-256 of the bytes the images come from, so a changed source is noticed), its labels and native size and
channels found.  ``read(idx)`` then gives images ``idx`` as float32 (k, C, H, W) in [-1, 1], brought to the
spec's channels and resolution by one transform shared by all sources (torch's antialiased bilinear resize of
the shorter side, then a center crop), whatever the source.

What counts as the data range: uint8 (and other integer) arrays and image files are 0-255; a float array must
say its range (``--range``); values outside it are clipped, with one warning line saying how many.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fewstep.data.spec import DataSpec
from fewstep.errors import FewstepError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"})
# PIL's "F" (32-bit float) grayscale is read through its conversion to "L" (values taken as 0-255)
HASH_LENGTH = 16
READ_CHUNK = 4096  # images per chunk when a whole split is read into memory


def warn(message: str) -> None:
    """One warning line on stderr (data problems that are fixed, not fatal)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass
class Source:
    """An opened source: n images (indices 0..n-1), their labels and how to read them."""

    spec: DataSpec
    path: Path
    n: int
    channels: int  # native: 1 (grayscale) or 3
    size: tuple[int, int] | None  # native (H, W) when every image has it
    content_hash: str
    labels: np.ndarray | None = None  # int64 (n,)
    num_classes: int = 0
    class_names: list[str] | None = None
    official: dict[str, np.ndarray] | None = None  # a split the source itself defines
    skipped: int = 0  # bad images skipped (--skip-bad-images)
    _kept: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # decoded during the scan

    @property
    def out_channels(self) -> int:
        return self.spec.channels or self.channels

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        r = self.spec.resolution
        if r is not None:
            return (self.out_channels, r, r)
        assert self.size is not None
        return (self.out_channels, *self.size)

    def nbytes(self, k: int) -> int:
        """Memory that k images take as float32 tensors."""
        return 4 * k * int(np.prod(self.sample_shape))

    def read(self, idx: np.ndarray) -> torch.Tensor:
        """Images ``idx`` as float32 (k, C, H, W) in [-1, 1], transformed."""
        raise NotImplementedError

    def forget_scan(self) -> None:
        """Drop the images kept from the scan (the split is read lazily)."""
        self._kept = {}


# ---------------------------------------------------------------------------------------------- transforms


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(k, C0, H, W) in [-1, 1] -> ``channels`` (1: ITU-R 601 luma, as PIL's "L"; 3: gray repeated)."""
    c0 = x.shape[1]
    if c0 == 4 or c0 == 2:  # drop alpha
        x = x[:, :c0 - 1]
        c0 -= 1
    if c0 == channels:
        return x
    if channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.expand(-1, 3, -1, -1).contiguous()


def resize_crop(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` (antialiased bilinear) and center-crop a square."""
    if resolution is None:
        return x
    h, w = x.shape[-2:]
    if (h, w) != (resolution, resolution):
        scale = resolution / min(h, w)
        nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
        x = x[..., top:top + resolution, left:left + resolution]
    return x.clamp(-1, 1).contiguous()


def transform(x: torch.Tensor, spec: DataSpec, native_channels: int) -> torch.Tensor:
    return resize_crop(to_channels(x, spec.channels or native_channels), spec.resolution)


def uint8_to_unit(a: np.ndarray) -> torch.Tensor:
    """0..255 -> [-1, 1] in float32 ((a - 127.5) / 127.5, exact as the built-in sets)."""
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:
        a = a.copy()
    return (torch.from_numpy(a).float() - 127.5) / 127.5


# ---------------------------------------------------------------------------------------------- hashing


_HASHES: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def files_hash(files: list[Path], root: Path | None) -> str:
    """SHA-256 over (path relative to ``root``, or the file name without one; content digest) of ``files``:
    renaming, adding or editing one changes it."""
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root) if root is not None else p.name).encode() + b"\0")
        h.update(_file_digest(p).encode())
    return h.hexdigest()[:HASH_LENGTH]


# ---------------------------------------------------------------------------------------------- arrays


def _check_labels(y: Any, n: int, where: str) -> tuple[np.ndarray, int]:
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        raise FewstepError(f"labels in {where} are {y.dtype}, not integers: save them as an integer array "
                           "(e.g. y.astype('int64'))")
    if y.ndim != 1 or len(y) != n:
        raise FewstepError(f"labels in {where} have shape {tuple(y.shape)} but there are {n} images: give one "
                           "integer label per image")
    if n and y.min() < 0:
        raise FewstepError(f"labels in {where} include {int(y.min())}: labels are class ids 0, 1, 2, ...")
    y = y.astype(np.int64)
    return y, int(y.max()) + 1 if n else 0


def _layout(shape: tuple[int, ...], where: str) -> str:
    """NHW, NHWC or NCHW."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        last, second = shape[3] in (1, 3, 4), shape[1] in (1, 3, 4)
        if last and not second:
            return "NHWC"
        if second:
            return "NCHW"
    raise FewstepError(f"{where} holds an array of shape {shape}: images must be (N, H, W), (N, H, W, C) or "
                       "(N, C, H, W) with C = 1, 3 or 4")


class ArraySource(Source):
    """A ``.npy`` (memory-mapped) or the ``x`` of a ``.npz`` (read, or extracted to a ``.npy`` cache first when
    larger than the memory budget)."""

    array: np.ndarray
    layout: str
    lo: float
    hi: float

    @staticmethod
    def open(spec: DataSpec, budget: int) -> ArraySource:
        path = Path(spec.source)
        where = str(path)
        labels = None
        files = [path]
        if path.suffix == ".npy":
            try:
                x = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise FewstepError(f"{where} is not a readable .npy array ({str(e)[:80]})") from None
        else:
            try:
                z = np.load(path, allow_pickle=False)
                keys = list(z.files)
            except (ValueError, OSError, EOFError, Exception) as e:  # noqa: BLE001 - zip errors of every kind
                raise FewstepError(f"{where} is not a readable .npz archive ({str(e)[:80]})") from None
            if "x" not in keys:
                raise FewstepError(f"{where} has no array named x (it has {', '.join(keys) or 'none'}): save the "
                                   "images as x (np.savez(path, x=images, y=labels))")
            if "y" in keys and spec.labels:
                raise FewstepError(f"{where} holds its labels in y: drop --labels")
            try:
                x = _npz_array(z, path, budget)
                labels = z["y"] if "y" in keys else None
            except (ValueError, OSError, EOFError, Exception) as e:  # noqa: BLE001 - object arrays, bad CRC, ...
                raise FewstepError(f"{where}: an array in it cannot be read ({str(e)[:80]}): save numbers only, "
                                   "with np.savez") from None
        if spec.labels:
            lp = Path(spec.labels)
            if not lp.is_file():
                raise FewstepError(f"--labels {lp} does not exist")
            try:
                labels = np.load(lp, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise FewstepError(f"--labels {lp} is not a readable .npy array ({str(e)[:80]})") from None
            files.append(lp)
        if x.dtype.kind not in "uif" or x.dtype.kind == "b":
            raise FewstepError(f"{where} holds {x.dtype} values: images must be numbers (uint8 0-255, or float "
                               "with --range)")
        layout = _layout(tuple(x.shape), where)
        if x.shape[0] == 0:
            raise FewstepError(f"{where} holds no images (its first dimension is 0)")
        if x.dtype.kind == "f":
            if spec.range is None:
                raise FewstepError(f"{where} holds {x.dtype} values: say their range with --range 0,1 or --range -1,1")
            lo, hi = spec.range_values  # type: ignore[misc]
        else:
            if spec.range is not None:
                raise FewstepError(f"--range applies to float arrays; {where} holds {x.dtype} (read as 0-255): drop "
                                   "--range")
            lo, hi = 0.0, 255.0
        h, w, c = _hwc(x.shape, layout)
        src = ArraySource(spec=spec, path=path, n=int(x.shape[0]), channels=1 if c == 1 else 3, size=(h, w),
                          content_hash=files_hash(files, None))
        src.array, src.layout, src.lo, src.hi = x, layout, lo, hi
        if labels is not None:
            src.labels, src.num_classes = _check_labels(labels, src.n, spec.labels or f"{where} (y)")
        outside = src._count_outside()
        if outside:
            warn(f"{where}: clipped {outside} of {x.size} values outside [{lo:g}, {hi:g}] to the range")
        return src

    def _count_outside(self) -> int:
        if self.array.dtype == np.uint8:
            return 0
        count = 0
        for lo in range(0, self.n, READ_CHUNK):
            c = self._rows(np.arange(lo, min(self.n, lo + READ_CHUNK)))
            count += int(np.count_nonzero((c < self.lo) | (c > self.hi) | ~np.isfinite(c)))
        return count

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (sorted) of the array.  A memory-mapped .npy is read with ``os.pread``, one call per run of
        consecutive rows, not through the map: pages a map touches stay in the process's resident memory (and a
        page cache of large folios maps up to megabytes per touched row), so a long run over a 4 GB file would
        end with gigabytes resident; pread leaves them in the kernel's page cache, which is not ours."""
        a = self.array
        if not isinstance(a, np.memmap) or not a.flags.c_contiguous or len(idx) == 0:
            return np.asarray(a[idx])
        row = int(np.prod(a.shape[1:])) * a.itemsize
        out = np.empty((len(idx), *a.shape[1:]), dtype=a.dtype)
        flat = out.reshape(len(idx), -1).view(np.uint8)
        fd = self._fd()
        starts = np.flatnonzero(np.diff(idx, prepend=idx[:1] - 2) != 1) if len(idx) else np.array([], int)
        ends = np.append(starts[1:], len(idx))
        for s, e in zip(starts.tolist(), ends.tolist()):
            want = (e - s) * row
            data = os.pread(fd, want, a.offset + int(idx[s]) * row)
            if len(data) != want:
                raise FewstepError(f"{self.path} is shorter than its header says: it changed or is truncated")
            flat[s:e] = np.frombuffer(data, dtype=np.uint8).reshape(e - s, row)
        return out

    def _fd(self) -> int:
        """This process's descriptor of the mapped file (the .npy, or a big .npz's extracted cache; DataLoader
        workers are forked: each opens its own)."""
        pid = os.getpid()
        if getattr(self, "_fd_pid", None) != pid:
            self._file = open(self.array.filename, "rb")  # noqa: SIM115 - kept open for the source's lifetime
            self._fd_pid = pid
        return self._file.fileno()

    def read(self, idx: np.ndarray) -> torch.Tensor:
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # read in file order, then put back
        a = self._rows(idx[order])
        if self.layout == "NHW":
            a = a[:, None]
        elif self.layout == "NHWC":
            a = a.transpose(0, 3, 1, 2)
        if a.dtype == np.uint8:
            x = uint8_to_unit(a)
        else:
            a = np.nan_to_num(a.astype(np.float64), nan=self.lo, posinf=self.hi, neginf=self.lo)
            x = torch.from_numpy(((np.clip(a, self.lo, self.hi) - self.lo) / (self.hi - self.lo) * 2 - 1)
                                 .astype(np.float32))
        out = torch.empty_like(x)
        out[torch.from_numpy(order)] = x
        return transform(out, self.spec, self.channels)


def _hwc(shape: tuple[int, ...], layout: str) -> tuple[int, int, int]:
    if layout == "NHW":
        return shape[1], shape[2], 1
    if layout == "NHWC":
        return shape[1], shape[2], shape[3]
    return shape[2], shape[3], shape[1]


def _npz_array(z: Any, path: Path, budget: int) -> np.ndarray:
    """``x`` of a .npz: in memory when it fits the budget, else extracted once to a cached .npy and mapped."""
    info = z.zip.getinfo("x.npy")
    if info.file_size <= budget:
        return z["x"]
    with z.zip.open("x.npy") as f:  # check the header before extracting gigabytes
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = header(f)
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    from fewstep.io import _atomic, cache_dir

    digest = _file_digest(path)[:HASH_LENGTH]
    cached = cache_dir() / "arrays" / f"{path.stem}-{digest}-x.npy"
    if not cached.is_file():
        def write(tmp: str) -> None:
            with z.zip.open("x.npy") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)

        _atomic(cached, write)
    return np.load(cached, mmap_mode="r", allow_pickle=False)


# ---------------------------------------------------------------------------------------------- image folders


def _decode(data: bytes, mode: str | None = None) -> Any:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im if mode is None or im.mode == mode else im.convert(mode)


WIDE_GRAY = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})  # 16-bit (and 32-bit integer) grayscale


def _pixels(im: Any, channels: int) -> np.ndarray:
    """A PIL image as uint8 (C, H, W) with ``channels`` (1: "L", 3: "RGB", through PIL's conversions).  16-bit
    grayscale is scaled to 8 bits (PIL's own conversion to "L" clips it at 255, turning most pixels white)."""
    if im.mode in WIDE_GRAY:
        a = np.asarray(im).astype(np.float64)
        wide = im.mode != "I" or float(a.max(initial=0)) > 255  # "I" holding 0-255 values is 8-bit data
        a = np.clip(np.round(a / 257.0) if wide else a, 0, 255).astype(np.uint8)
        return np.repeat(a[None], channels, axis=0)
    mode = "L" if channels == 1 else "RGB"
    if im.mode != mode:
        im = im.convert(mode)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


class ImageScan:
    """Scans decoded images one by one: sizes, modes, and the pixels while they fit the budget."""

    def __init__(self, budget: int, skip_bad: bool):
        self.budget, self.skip_bad = budget, skip_bad
        self.sizes: list[tuple[int, int]] = []
        self.gray: list[bool] = []
        self.kept: list[Any] = []  # decoded PIL images (dropped when over budget)
        self.kept_bytes = 0
        self.bad = 0
        self.first: dict[tuple[int, int], str] = {}

    def add(self, im: Any, name: str) -> None:
        """A decoded PIL image, or an array cell already as float (C, H, W)."""
        if isinstance(im, torch.Tensor):
            (h, w), gray = tuple(im.shape[-2:]), im.shape[0] in (1, 2)
        else:
            (w, h), gray = im.size, im.mode in GRAY_MODES
        self.sizes.append((h, w))
        self.first.setdefault((h, w), name)
        self.gray.append(gray)
        if self.kept is not None:
            self.kept_bytes += 4 * h * w * (1 if gray else 3)
            if self.kept_bytes <= self.budget:
                self.kept.append(im)
            else:
                self.kept = None  # type: ignore[assignment]

    def bad_image(self, name: str, error: Exception) -> None:
        if not self.skip_bad:
            raise FewstepError(f"{name} is not a readable image ({str(error)[:80]}): remove or replace it, or pass "
                               "--skip-bad-images")
        self.bad += 1

    def size(self, resolution: int | None) -> tuple[int, int] | None:
        if len(self.first) > 1 and resolution is None:
            (s1, f1), (s2, f2) = list(self.first.items())[:2]
            raise FewstepError(f"images differ in size ({f1} is {s1[1]}x{s1[0]}, {f2} is {s2[1]}x{s2[0]}): pass "
                               "--resolution R to resize and center-crop them to RxR")
        return next(iter(self.first)) if len(self.first) == 1 else None


def walk_files(folder: Path) -> list[Path]:
    """Every file below ``folder`` (hidden ones skipped), sorted, following symbolic links to folders as
    torchvision's ImageFolder does (a link back up the tree is followed once)."""
    out: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


class FolderSource(Source):
    """A folder of PNG/JPEG images; sub-folders name the classes (sorted, as torchvision's ImageFolder), images
    directly in the folder mean no labels."""

    files: list[Path]

    @staticmethod
    def open(spec: DataSpec, budget: int) -> FolderSource:
        root = Path(spec.source)
        entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
        dirs = [p for p in entries if p.is_dir()]
        loose = [p for p in entries if not p.is_dir()]
        if dirs and any(p.suffix.lower() in IMAGE_SUFFIXES for p in loose):
            raise FewstepError(f"{root} has both images and sub-folders: put every image in a class sub-folder "
                               "(labelled data) or none in sub-folders (unlabelled)")
        skipped = 0
        candidates: list[tuple[Path, int]] = []
        if dirs:
            for c, d in enumerate(dirs):
                candidates += [(p, c) for p in walk_files(d)]
        else:
            candidates = [(p, -1) for p in loose]
        files: list[tuple[Path, int]] = []
        for p, c in candidates:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                files.append((p, c))
            elif spec.skip_bad_images:
                skipped += 1
            else:
                raise FewstepError(f"{p} is not an image (fewstep reads {', '.join(IMAGE_SUFFIXES)} files): move it "
                                   "out of the folder, or pass --skip-bad-images")
        if not files:
            raise FewstepError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)} files, directly or in class "
                               "sub-folders)")
        scan = ImageScan(budget, spec.skip_bad_images)
        good: list[tuple[Path, int]] = []
        digests = hashlib.sha256()
        for p, c in files:
            try:
                data = p.read_bytes()
                im = _decode(data)
            except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a damaged file
                scan.bad_image(str(p), e)
                continue
            digests.update(str(p.relative_to(root)).encode() + b"\0" + hashlib.sha256(data).digest())
            scan.add(im, str(p))
            good.append((p, c))
        if not good:
            raise FewstepError(f"{root}: none of its {len(files)} images could be read")
        src = FolderSource(spec=spec, path=root, n=len(good), channels=1 if all(scan.gray) else 3,
                           size=scan.size(spec.resolution), content_hash=digests.hexdigest()[:HASH_LENGTH],
                           skipped=skipped + scan.bad)
        src.files = [p for p, _ in good]
        if dirs:
            src.labels = np.array([c for _, c in good], dtype=np.int64)
            src.class_names = [d.name for d in dirs]
            src.num_classes = len(dirs)
        if scan.kept is not None:
            src._kept = dict(enumerate(scan.kept))
        if src.skipped:
            warn(f"{root}: skipped {src.skipped} unreadable or non-image files (--skip-bad-images)")
        return src

    def read(self, idx: np.ndarray) -> torch.Tensor:
        c = self.channels
        out = []
        for i in np.asarray(idx, dtype=np.int64).tolist():
            im = self._kept.get(i)
            if im is None:
                try:
                    im = _decode(self.files[i].read_bytes())
                except Exception as e:  # noqa: BLE001
                    raise FewstepError(f"{self.files[i]} can no longer be read ({str(e)[:80]}): it changed after "
                                       "the folder was opened") from None
            out.append(transform(uint8_to_unit(_pixels(im, c))[None], self.spec, c))
        return torch.cat(out) if out else torch.empty((0, *self.sample_shape))


# ---------------------------------------------------------------------------------------------- datasets folders


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or
                              ((path / "dataset_info.json").is_file() and (path / "state.json").is_file()))


class HFSource(Source):
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict whose train and test (or
    validation) splits are used as they are).  Images are decoded here from the bytes stored in the folder, never
    by datasets: a cell that only names an outside file (a path or URL) is refused, so nothing outside the hashed
    folder is read and nothing is downloaded.  Array columns (H, W[, C]) follow the rules of arrays (uint8 0-255, a
    float column needs --range)."""

    parts: list[Any]  # datasets.Dataset per part (train [, test]), the image column not decoded
    rows: list[tuple[int, int]]  # (part, row) of every good image
    image_column: str

    @staticmethod
    def open(spec: DataSpec, budget: int) -> HFSource:
        try:
            import datasets
        except ImportError:
            raise FewstepError(f"{spec.source} is a Hugging Face datasets folder: reading it needs "
                               "`pip install fewstep[datasets]`") from None
        root = Path(spec.source)
        try:
            ds = datasets.load_from_disk(str(root))
        except Exception as e:  # noqa: BLE001 - arrow and json errors of every kind
            raise FewstepError(f"{root} is not a readable datasets folder ({str(e)[:80]})") from None
        if isinstance(ds, datasets.DatasetDict):
            names = list(ds)
            test = next((s for s in ("test", "validation") if s in ds), None)
            train = "train" if "train" in ds else names[0]
            parts = [ds[train]] + ([ds[test]] if test and test != train else [])
        else:
            parts = [ds]
        features = parts[0].features
        image_col = spec.image_column or next(
            (k for k, f in features.items() if isinstance(f, datasets.Image)),
            next((k for k in ("image", "img", "pixel_values") if k in features), None))
        if image_col is None or image_col not in features:
            raise FewstepError(f"{root} has no image column {'named ' + repr(image_col) if image_col else ''} "
                               f"(columns: {', '.join(features)}): pass --image-column NAME")
        label_col = spec.label_column or next(
            (k for k, f in features.items() if isinstance(f, datasets.ClassLabel)),
            next((k for k in ("label", "labels") if k in features), None))
        if spec.label_column and spec.label_column not in features:
            raise FewstepError(f"{root} has no column {spec.label_column!r} (columns: {', '.join(features)}): fix "
                               "--label-column")
        encoded = isinstance(features[image_col], datasets.Image)
        if encoded and spec.range is not None:
            raise FewstepError(f"--range applies to float array columns; {root}'s column {image_col!r} holds "
                               "encoded images (0-255): drop --range")
        try:
            parts = [p.cast_column(image_col, datasets.Image(decode=False)) if encoded else p for p in parts]
        except Exception as e:  # noqa: BLE001
            raise FewstepError(f"{root}: column {image_col!r} cannot be read ({str(e)[:80]})") from None
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        scan = ImageScan(budget, spec.skip_bad_images)
        rows: list[tuple[int, int]] = []
        clipped = [0, 0]
        for k, part in enumerate(parts):
            col = part.select_columns([image_col])
            for i in range(len(col)):
                name = f"{root} ({'test' if k else 'train'} row {i})" if len(parts) > 1 else f"{root} (row {i})"
                try:
                    item = _hf_cell(col[i][image_col], spec, name, clipped)
                except FewstepError:
                    raise
                except Exception as e:  # noqa: BLE001 - PIL and arrow errors of every kind
                    scan.bad_image(name, e)
                    continue
                scan.add(item, name)
                rows.append((k, i))
        if not rows:
            raise FewstepError(f"{root} holds no {'readable ' if scan.bad else ''}rows")
        src = HFSource(spec=spec, path=root, n=len(rows), channels=1 if all(scan.gray) else 3,
                       size=scan.size(spec.resolution), content_hash=files_hash(files, root), skipped=scan.bad)
        src.parts, src.rows, src.image_column = parts, rows, image_col
        part_of = np.array([k for k, _ in rows])
        if len(parts) > 1:
            src.official = {"train": np.flatnonzero(part_of == 0), "test": np.flatnonzero(part_of == 1)}
        if label_col is not None:
            try:
                columns = [np.asarray(p[label_col]) for p in parts]
                y = np.array([columns[k][i] for k, i in rows])
            except Exception as e:  # noqa: BLE001
                raise FewstepError(f"{root}: label column {label_col!r} cannot be read ({str(e)[:80]})") from None
            src.labels, src.num_classes = _check_labels(y, src.n, f"{root} (column {label_col})")
            feat = features[label_col]
            if isinstance(feat, datasets.ClassLabel):
                src.num_classes = max(src.num_classes, feat.num_classes)
                src.class_names = list(feat.names)
        if scan.kept is not None:
            src._kept = dict(enumerate(scan.kept))
        if clipped[0]:
            warn(f"{root}: clipped {clipped[0]} of {clipped[1]} values outside [{spec.range}] to the range")
        if scan.bad:
            warn(f"{root}: skipped {scan.bad} unreadable rows (--skip-bad-images)")
        return src

    def read(self, idx: np.ndarray) -> torch.Tensor:
        c = self.channels
        out = []
        for i in np.asarray(idx, dtype=np.int64).tolist():
            item = self._kept.get(i)
            if item is None:
                k, row = self.rows[i]
                item = _hf_cell(self.parts[k][row][self.image_column], self.spec, str(self.path), [0, 0])
            x = item[None] if isinstance(item, torch.Tensor) else uint8_to_unit(_pixels(item, c))[None]
            out.append(transform(x, self.spec, c))
        return torch.cat(out) if out else torch.empty((0, *self.sample_shape))


def _hf_cell(value: Any, spec: DataSpec, where: str, clipped: list[int]) -> Any:
    """A datasets cell: an encoded image (bytes stored in the folder) as a PIL image, or an array cell as float32
    (C, H, W) in [-1, 1] (``clipped`` counts values outside the range, and values seen)."""
    if isinstance(value, dict):
        if not value.get("bytes"):
            raise FewstepError(f"{where}: the image is not stored in the folder (it names {value.get('path')!r}): "
                               "fewstep reads only images saved inside the datasets folder; save the images "
                               "themselves (e.g. cast the column to datasets.Image() and save_to_disk again)")
        return _decode(value["bytes"])
    a = np.asarray(value)
    if a.dtype.kind not in "uif" or a.ndim not in (2, 3):
        raise ValueError(f"a cell of shape {a.shape} and type {a.dtype} is not an image")
    if a.ndim == 2:
        a = a[None]
    elif a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3, 4):
        a = a.transpose(2, 0, 1)
    if a.dtype.kind == "f":
        if spec.range is None:
            raise FewstepError(f"{where} holds {a.dtype} images: say their range with --range 0,1 or --range -1,1")
        lo, hi = spec.range_values  # type: ignore[misc]
    else:
        if spec.range is not None:
            raise FewstepError(f"--range applies to float arrays; {where} holds {a.dtype} (read as 0-255): drop "
                               "--range")
        lo, hi = 0.0, 255.0
    a = a.astype(np.float64)
    clipped[0] += int(np.count_nonzero((a < lo) | (a > hi) | ~np.isfinite(a)))
    clipped[1] += a.size
    a = np.clip(np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo), lo, hi)
    return torch.from_numpy(((a - lo) / (hi - lo) * 2 - 1).astype(np.float32))


# ---------------------------------------------------------------------------------------------- opening


def _refuse(spec: DataSpec, names: tuple[str, ...], why: str) -> None:
    """Options that do not apply to this kind of source are an error, never silently ignored."""
    from fewstep.data.spec import FLAGS

    given = [FLAGS[n] for n in names if getattr(spec, n) not in (None, False)]
    if given:
        raise FewstepError(f"{', '.join(given)} do not apply here: {why}; drop {'it' if len(given) == 1 else 'them'}")


def open_source(spec: DataSpec, budget: int) -> Source:
    """Open the source ``spec`` names (kind from the path), or one clear error."""
    path = Path(spec.source)
    if not path.exists():
        raise FewstepError(f"--data {spec.source}: no such file or folder (built-in data sets: digits, mnist, "
                           "fashion, gmm, moons, swissroll, checkerboard)")
    if is_hf_folder(path):
        _refuse(spec, ("labels",), f"{path} is a datasets folder (labels come from its label column)")
        return HFSource.open(spec, budget)
    if path.is_dir():
        _refuse(spec, ("labels", "range", "image_column", "label_column"), f"{path} is an image folder (labels "
                "come from its class sub-folders; images are 0-255)")
        return FolderSource.open(spec, budget)
    if path.suffix in (".npy", ".npz"):
        _refuse(spec, ("image_column", "label_column", "skip_bad_images"), f"{path} is an array")
        return ArraySource.open(spec, budget)
    raise FewstepError(f"--data {path}: not a folder, .npy or .npz file (fewstep reads image folders, .npy/.npz "
                       "arrays and datasets folders)")
