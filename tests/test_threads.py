"""--threads and the default thread policy (issue 11, item 7): an explicit count wins, then the user's
OMP_NUM_THREADS, otherwise the cores free when the command starts, handed to torch before it loads."""

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import fewstep.threads as T
from fewstep.cli import app
from fewstep.errors import FewstepError


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored after the test (apply_threads sets it)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


FAILING = [  # each fails on a missing model or file, after --threads is applied
    ["sample", "--model", "/nonexistent/model", "--out", "x.png"],
    ["evaluate", "--model", "/nonexistent/model"],
    ["bench", "/nonexistent/bench.yaml"],
    ["distill", "--out", "OUT", "--teacher", "/nonexistent/model"],
]


@pytest.mark.parametrize("args", FAILING, ids=lambda a: a[0])
def test_every_network_command_applies_threads_first(args, tmp_path, restore_threads):
    """Applied before the command does anything else: the bad model still fails, with torch already set."""
    args = [str(tmp_path / "run") if a == "OUT" else a for a in args]
    res = CliRunner().invoke(app, [*args, "--threads", "3"])
    assert res.exit_code == 2, res.output
    assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"


@pytest.mark.slow
def test_train_threads(tmp_path, restore_threads):
    res = CliRunner().invoke(app, ["train", "--data", "digits", "--preset", "test8", "--steps", "2", "--batch", "8",
                                   "--out", str(tmp_path / "t"), "--threads", "2"])
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("args", [["train", "--data", "digits", "--out", "OUT"], *FAILING], ids=lambda a: a[0])
def test_threads_below_one_is_one_line(args, tmp_path, restore_threads):
    args = [str(tmp_path / "run") if a == "OUT" else a for a in args]
    res = CliRunner().invoke(app, [*args, "--threads", "0"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "--threads 0: give at least 1" in lines[0], res.output
    assert not (tmp_path / "run").exists()


def _fake_stat(monkeypatch, snapshots):
    it = iter(snapshots)
    monkeypatch.setattr(T, "_cpu_times", lambda cpus: next(it))
    monkeypatch.setattr(T.time, "sleep", lambda s: None)
    monkeypatch.setattr(T, "_quota_cores", lambda: None)
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})


def test_free_cores_counts_the_idle_cores(monkeypatch):
    # (idle, total) ticks per CPU: cpu0 busy throughout, cpu1 half busy, cpu2 and cpu3 idle -> 4 - 1.5 = 2.5 -> 2
    _fake_stat(monkeypatch, [{0: (0, 0), 1: (0, 0), 2: (0, 0), 3: (0, 0)},
                             {0: (0, 10), 1: (5, 10), 2: (10, 10), 3: (10, 10)}])
    assert T.free_cores() == 2
    _fake_stat(monkeypatch, [{c: (0, 0) for c in range(4)}, {c: (0, 10) for c in range(4)}])
    assert T.free_cores() == 1  # every core busy: still one thread
    _fake_stat(monkeypatch, [{c: (0, 0) for c in range(4)}, {c: (10, 10) for c in range(4)}])
    assert T.free_cores() == 4
    _fake_stat(monkeypatch, [{c: (0, 0) for c in range(4)}, {c: (10, 10) for c in range(4)}])
    monkeypatch.setattr(T, "_quota_cores", lambda: 2)  # a container limited to 2 CPUs of 4
    assert T.free_cores() == 2


def test_free_cores_on_this_machine_is_within_the_allowed_cores():
    assert 1 <= T.free_cores(0.05) <= len(os.sched_getaffinity(0))


def test_default_policy(monkeypatch):
    monkeypatch.setattr(T, "free_cores", lambda interval=0.1: 3)
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh `fewstep` process (only the check looks at it)
    env: dict[str, str] = {}
    assert T.default_threads(["train", "--data", "digits"], env) == 3 and env == {"OMP_NUM_THREADS": "3"}
    env = {"LOCAL_WORLD_SIZE": "2"}  # two launched processes on this machine share the free cores
    assert T.default_threads(["distill"], env) == 1 and env["OMP_NUM_THREADS"] == "1"
    for argv, env in [(["train", "--threads", "2"], {}), (["sample", "--threads=2"], {}), (["info", "m"], {}),
                      (["train", "--help"], {}), ([], {}), (["train"], {"OMP_NUM_THREADS": "4"}),
                      (["train"], {"MKL_NUM_THREADS": "4"})]:
        before = dict(env)
        assert T.default_threads(argv, env) is None and env == before, argv


def test_default_policy_leaves_a_loaded_torch_alone(monkeypatch):
    monkeypatch.setattr(T, "free_cores", lambda interval=0.1: 3)
    env: dict[str, str] = {}
    assert T.default_threads(["train"], env) is None and env == {}  # a test or notebook set torch up already
    with pytest.raises(FewstepError):
        T.apply_threads(-1)


RUN = """
import sys
import fewstep.threads
fewstep.threads.free_cores = lambda interval=0.1: {free}
from fewstep.cli import main
sys.argv = ["fewstep", "sample", "--model", "/nonexistent/model", "--out", "x.png", *{extra}]
try:
    main()
except SystemExit:
    pass
import torch
print("THREADS", torch.get_num_threads())
"""


@pytest.mark.parametrize("free,extra,user,expect", [
    (1, [], None, 1),  # the default: the free cores, set before torch loads
    (2, [], None, 2),
    (2, ["--threads", "1"], "2", 1),  # --threads wins over the user's OMP_NUM_THREADS (which the default keeps)
], ids=["free1", "free2", "flag-wins"])
def test_a_fewstep_process_starts_torch_with_the_policy(free, extra, user, expect, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in T.USER_VARS}
    if user:
        env["OMP_NUM_THREADS"] = user
    out = subprocess.run([sys.executable, "-c", RUN.format(free=free, extra=extra)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert f"THREADS {expect}" in out.stdout, out.stdout + out.stderr
