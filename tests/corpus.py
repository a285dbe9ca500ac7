"""The bad-input corpus harness (issue 12): run a `fewstep` command in-process and assert the promise made to a
user who typed something wrong: exit status 2, no traceback, at most two lines on stderr, and nothing written.

Every corpus test file (tests/test_corpus_*.py) builds its cases as ``(id, setup)`` pairs, where
``setup(tmp, fx) -> argv | (argv, pattern)`` prepares whatever bad file the case needs under ``tmp`` and returns
the command line (and optionally a regular expression the error line must match); ``refused(argv, watch=...)``
then runs it.  ``fx`` is the session's :class:`Fixtures` (a tiny trained model, a run with checkpoints, a
distillation run, a bench config), each shared read-only: a case that damages a file copies the folder first
(:meth:`Fixtures.copy`).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

MAX_LINES = 2


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots``: path -> (size, mtime_ns); folders have size -1."""
    out: dict[str, tuple[int, int]] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        if root.is_file():
            st = root.stat()
            out[str(root)] = (st.st_size, st.st_mtime_ns)
            continue
        for dirpath, dirs, files in os.walk(root):
            for d in dirs:
                out[os.path.join(dirpath, d)] = (-1, 0)
            for f in files:
                p = os.path.join(dirpath, f)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                out[p] = (st.st_size, st.st_mtime_ns)
    return out


@dataclass
class Outcome:
    code: int
    stderr: str
    stdout: str


def invoke(argv: list[str]) -> Outcome:
    """``fewstep argv`` in this process (the environment is restored after: --memory-budget sets a variable)."""
    from fewstep.cli import app

    env = dict(os.environ)
    try:
        res = CliRunner().invoke(app, [str(a) for a in argv])
    finally:
        os.environ.clear()
        os.environ.update(env)
    err = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        err += "".join(traceback.format_exception(res.exception))
        return Outcome(1, err, res.stdout)
    return Outcome(res.exit_code, err, res.stdout)


def refused(argv: list[str], watch: tuple[Path, ...] | list[Path] = (), pattern: str | None = None) -> Outcome:
    """Assert ``fewstep argv`` is refused as promised; ``watch`` are folders that must not change (a case's tmp
    folder, the fixtures it reads)."""
    before = tree(*watch)
    res = invoke(argv)
    shown = f"fewstep {' '.join(map(str, argv))}\n--- stderr ---\n{res.stderr}--- stdout ---\n{res.stdout}"
    assert "Traceback" not in res.stderr, shown
    assert res.code == 2, f"exit {res.code}\n{shown}"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= MAX_LINES, f"{len(lines)} lines\n{shown}"
    assert lines[0].startswith("error:"), shown
    if pattern is not None:
        assert re.search(pattern, res.stderr.replace("\n", " ")), f"no match for {pattern!r}\n{shown}"
    after = tree(*watch)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"files changed: {changed[:5]}\n{shown}"
    return res


class Fixtures:
    """Small real inputs shared by the corpus (built once per session, ~20 s in all)."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, Path] = {}

    def _once(self, name: str, build) -> Path:
        if name not in self._cache:
            path = self.root / name
            build(path)
            self._cache[name] = path
        return self._cache[name]

    @property
    def run(self) -> Path:
        """A finished test8 conditional digits run (model folder + checkpoints at steps 4 and 8)."""
        def build(path: Path) -> None:
            out = invoke(["train", "--data", "digits", "--preset", "test8", "--conditional", "--steps", "8",
                          "--ckpt-every", "4", "--batch", "16", "--out", str(path)])
            assert out.code == 0, out.stderr
        return self._once("run", build)

    @property
    def model(self) -> Path:
        """The same run as a model folder (reads only)."""
        return self.run

    @property
    def uncond(self) -> Path:
        """An unconditional test8 digits model (4 steps)."""
        def build(path: Path) -> None:
            out = invoke(["train", "--data", "digits", "--preset", "test8", "--steps", "4", "--batch", "16",
                          "--out", str(path)])
            assert out.code == 0, out.stderr
        return self._once("uncond", build)

    @property
    def distilled(self) -> Path:
        """A progressive distillation run of :attr:`model` (one 1-step stage of 4 iterations)."""
        def build(path: Path) -> None:
            out = invoke(["distill", "--teacher", str(self.model), "--method", "progressive", "--steps", "1",
                          "--start-steps", "1", "--iters", "4", "--reparam-iters", "4", "--batch", "16",
                          "--out", str(path)])
            assert out.code == 0, out.stderr
        return self._once("distilled", build)

    @property
    def latents(self) -> Path:
        import numpy as np

        def build(path: Path) -> None:
            np.save(path, np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32))
        return self._once("latents.npy", build)

    def copy(self, src: Path, dst: Path) -> Path:
        """A private copy of a fixture folder, to damage."""
        shutil.copytree(src, dst, symlinks=True)
        return dst
