"""Atomic file writes and safe reads: a crash never leaves a half-written file where a good one was."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fewstep.errors import FewstepError

# the temporary files _atomic writes: ".NAME.XXXXXXXX.tmp" (tempfile.mkstemp's 8 random characters)
_TMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def _atomic(path: Path, write) -> None:
    """Write through ``write(tmp)`` into a temporary file beside ``path``, flush it to disk, then rename it over
    ``path``: a reader (or a crash) sees the old file or the new one, never half of one.  A process killed in
    between leaves the temporary file; :func:`remove_orphans` clears those when a run starts again."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)  # the data on disk before the name points at it (power loss)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_orphan(name: str) -> bool:
    """``name`` is a temporary file :func:`_atomic` writes (left behind only by a killed process)."""
    return _TMP.fullmatch(name) is not None


def remove_orphans(root: Path) -> list[Path]:
    """Delete the temporary files killed writers left in ``root`` and the folders under it (symbolic links are
    not followed); returns what was deleted.  Call it only where no other process is writing (a run's start)."""
    gone: list[Path] = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if is_orphan(f):
                p = Path(dirpath) / f
                try:
                    p.unlink()
                    gone.append(p)
                except FileNotFoundError:
                    pass
    return gone


def write_failure(e: BaseException) -> str | None:
    """What a failed write says about the disk, in words (a full disk, a read-only one...), or None when ``e`` is
    not about the disk.  Covers OSError, safetensors' ``SafetensorError`` ("No space left on device" in its text)
    and torch.save's "PytorchStreamWriter failed writing file ... file write failed"."""
    if isinstance(e, OSError) and e.errno is not None:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space left on the device"
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG):
            return e.strerror or os.strerror(e.errno)
        return None
    text = str(e)
    if "No space left" in text or "Disk quota exceeded" in text:
        return "no space left on the device"
    if "file write failed" in text or "PytorchStreamWriter failed" in text:
        return "a write failed (is the disk full?)"
    return None


def write_text(path: Path, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, w)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str = "config") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"{what} file {path} is missing")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested thousands deep
        raise FewstepError(f"{what} file {path} is not valid JSON ({e.__class__.__name__}): restore or recreate it"
                           ) from None
    if not isinstance(obj, dict):
        raise FewstepError(f"{what} file {path} should hold a JSON object")
    return obj


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file through the safe loader (``what`` names it in errors: ``"--config x.yaml"``); None if empty."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"{what} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise FewstepError(f"{what} is not valid YAML ({str(e).splitlines()[0]})") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: Path, what: str = "weights") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"{what} file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FewstepError(f"{what} file {path} is corrupt or not safetensors ({str(e)[:80]}): restore or retrain"
                           ) from None


def save_torch_state(path: Path, obj: Any) -> None:
    """Optimizer-style state (tensors, numbers, lists, dicts): torch.save, read back only with weights_only."""
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def load_torch_state(path: Path, what: str = "optimizer state") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"{what} file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a corrupt file to the user
        raise FewstepError(f"{what} file {path} is corrupt or unsafe ({e.__class__.__name__}): restore or restart"
                           ) from None


def cache_dir() -> Path:
    """``$FEWSTEP_CACHE`` or ``~/.cache/fewstep``: feature networks, extracted arrays."""
    return Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep"))


def file_sha256(path: Path, length: int = 16) -> str:
    """The first ``length`` hex digits of a file's SHA-256 (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]
