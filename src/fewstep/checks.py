"""Checks at the edge, before any work starts: numbers a command line gives and the places its outputs go.

Every check raises :class:`FewstepError` with one line naming the flag, the value and what is allowed.  Outputs
are checked without writing anything: the path must not sit below a file, the nearest existing folder above it
must be writable (``os.access`` also reports a read-only filesystem), and a file output must not be a folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from fewstep.errors import FewstepError

INT64 = 2**63


def flag_name(param: str) -> str:
    """``class_`` -> ``--class``, ``batch_size`` -> ``--batch-size``."""
    return "--" + param.rstrip("_").replace("_", "-")


def plain_numbers(values: dict[str, Any], names: dict[str, str] | None = None) -> None:
    """Every float given is finite and every int fits in 64 bits (a seed of 2**70 reaches torch otherwise)."""
    for key, v in values.items():
        if isinstance(v, bool):
            continue
        flag = (names or {}).get(key) or flag_name(key)
        if isinstance(v, float) and not math.isfinite(v):
            raise FewstepError(f"{flag} {v}: give a finite number")
        if isinstance(v, int) and not -INT64 <= v < INT64:
            raise FewstepError(f"{flag} {v}: give a number below 2**63")


def at_least(flag: str, value: float | None, low: float, open_: bool = False) -> None:
    if value is None:
        return
    if value < low or (open_ and value == low):
        raise FewstepError(f"{flag} {value}: give " + (f"a value above {low:g}" if open_ else f"at least {low:g}"))


def within(flag: str, value: float | None, low: float, high: float, high_open: bool = False) -> None:
    if value is None:
        return
    if not low <= value <= high or (high_open and value == high):
        raise FewstepError(f"{flag} {value}: give a value in [{low:g}, {high:g}{')' if high_open else ']'}")


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and not p.is_symlink():
        if p.parent == p:
            break
        p = p.parent
    return p


def _writable_from(path: Path, flag: str) -> None:
    """``path`` (not yet existing, or a folder) can be created or written: its nearest existing ancestor is a
    writable folder."""
    base = _nearest_existing(path)
    if base.is_symlink() and not base.exists():
        raise FewstepError(f"{flag} {path}: {base} is a dangling link: remove it or choose another place")
    if not base.is_dir():
        raise FewstepError(f"{flag} {path}: {base} is a file, so nothing can be written below it: choose another "
                           "place")
    if not os.access(base, os.W_OK | os.X_OK):
        raise FewstepError(f"{flag} {path}: {base} is not writable (permissions or a read-only filesystem): choose "
                           "another place")


def output_file(path: Path, flag: str = "--out") -> None:
    """``path`` is a file this command may write (created or replaced)."""
    path = Path(path)
    if path.is_dir():
        raise FewstepError(f"{flag} {path} is a folder: give a file name")
    if path.exists():
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise FewstepError(f"{flag} {path} cannot be replaced (not writable): choose another file name")
        return
    _writable_from(path.parent if path.parent != path else path, flag)


def output_folder(path: Path, flag: str = "--out") -> None:
    """``path`` is a folder this command may create or write into (whether an existing one may be reused is the
    command's own rule)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FewstepError(f"{flag} {path} is a file: give a folder name")
    _writable_from(path, flag)


def memory_bytes() -> int:
    """This machine's physical memory (or 8 GiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def fits_in_memory(flag: str, n: int, item_bytes: int, what: str = "samples") -> None:
    """``n`` items of ``item_bytes`` each fit in half of this machine's memory (refused up front, not by an
    allocation failure after minutes of work)."""
    need, have = n * item_bytes, memory_bytes() // 2
    if need > have:
        raise FewstepError(f"{flag} {n}: {n} {what} need {need / 2**30:.1f} GiB, more than half this machine's "
                           f"memory ({have / 2**30:.1f} GiB): ask for at most {max(1, have // item_bytes)} per run "
                           "(and vary --seed)")
