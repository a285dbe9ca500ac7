"""Real multi-process training: two ranks of one gloo group on the CPU (``torchrun``, ``ACCELERATE_USE_CPU=true``).

``accelerate launch --cpu --num_processes 2`` starts a single process with accelerate 1.15, so these tests use
torchrun and assert the world size the worker saw.  Each launch costs ~8 s (two interpreters importing torch).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("mp_worker.py")


def _env() -> dict[str, str]:
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(kind: str, out: Path, procs: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    if procs == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--standalone",
               str(WORKER)]
    res = subprocess.run([*cmd, kind, str(out), *args], env=_env(), capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"worker failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def world(out: Path) -> dict:
    return json.loads((out / "world.json").read_text())


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_two_processes_match_one_on_a_deterministic_two_network_method(tmp_path):
    """Same global batch: DDP's gradient mean over 2 x 32 equals the 1-process mean over 64, so the weights agree
    up to float summation order.  Two networks, each phase's loss through the other (frozen) one: the routing of
    trained modules through DDP only in their own phase, and the per-phase gradient isolation, both take part."""
    run("pair", tmp_path / "one", 1)
    run("pair", tmp_path / "two", 2)
    assert world(tmp_path / "one")["world"] == 1 and world(tmp_path / "two")["world"] == 2
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    run("pair", tmp_path / "early", 1, "--steps", "1")  # the weights really moved since the first step
    early = weights(tmp_path / "early")
    moved = max((a[k] - early[k]).abs().max().item() for k in a)
    assert moved > 1e-2, moved
    # measured: max |difference| ~1e-7 after 40 steps (float32 summation order only)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5, diff
    # the logged losses are the mean over processes: the same curve
    la = [r["loss/a"] for r in world(tmp_path / "one")["history"]]
    lb = [r["loss/a"] for r in world(tmp_path / "two")["history"]]
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4


def test_teacher_objective_on_two_processes_follows_the_one_process_curve(tmp_path):
    """The noise differs per rank, so the curves differ by sampling noise only.  Measured (mean loss over steps
    51-150, seeds 0-4): one process 0.348-0.366 (std 0.008), two processes (seeds 0-2) 0.350-0.362; the bound
    below is about six of those standard deviations."""
    steps = ["--steps", "150", "--ckpt-every", "1000"]
    run("teacher", tmp_path / "one", 1, *steps)
    run("teacher", tmp_path / "two", 2, *steps)
    assert world(tmp_path / "two")["world"] == 2

    def tail(name: str) -> float:  # mean loss over the last 100 steps
        h = world(tmp_path / name)["history"]
        return sum(r["loss/denoise"] for r in h[-100:]) / 100

    first = world(tmp_path / "two")["history"][0]["loss/denoise"]
    one, two = tail("one"), tail("two")
    assert two < 0.5 * first, (first, two)  # it learns
    assert abs(two - one) < 0.05, (one, two)


def test_two_process_run_killed_after_a_checkpoint_resumes_bitwise(tmp_path):
    """Each rank draws its own noise: the checkpoint holds every rank's RNG state, so a run killed after its
    step-20 checkpoint and resumed on 2 processes ends bitwise equal to an uninterrupted one."""
    run("teacher", tmp_path / "straight", 2)
    res = run("teacher", tmp_path / "split", 2, "--die-at", "27", check=False)
    assert res.returncode != 0
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    run("teacher", tmp_path / "split", 2, "--resume")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca = load_file(str(tmp_path / "straight" / "checkpoints" / "step_00000040" / "modules.safetensors"))
    cb = load_file(str(tmp_path / "split" / "checkpoints" / "step_00000040" / "modules.safetensors"))
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    # another process count is refused in one line (the random state of a rank would be missing)
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_00000040")
    (tmp_path / "split" / "checkpoints" / "latest").write_text("step_00000020")
    res = run("teacher", tmp_path / "split", 1, "--resume", check=False)
    assert res.returncode != 0 and "resume with the same process count" in res.stderr


def test_a_failing_quality_measure_on_the_main_process_stops_every_rank(tmp_path):
    """The quality callback runs on rank 0 while the others wait in a broadcast: when it raises, every rank stops
    with the reason (before: rank 0 died alone and the others waited in the broadcast until the launcher killed
    them, saying nothing; a launcher that does not kill them would hang)."""
    res = run("pair", tmp_path / "q", 2, "--steps", "20", "--quality-fails-at", "10", check=False)
    assert res.returncode != 0
    assert "the feature network is missing" in res.stderr
    assert "quality measure failed on the main process at step 10" in res.stderr  # what the other rank says


@pytest.mark.parametrize("procs", [2])
def test_global_batch_must_divide_by_processes_times_accumulation(tmp_path, procs):
    res = run("pair", tmp_path / "x", procs, "--grad-accum", "3", check=False)
    assert res.returncode != 0 and "must divide by processes x --grad-accum = 2 x 3" in res.stderr


def test_cli_distillation_on_two_processes_without_accelerate_settings(tmp_path, gmm_cond_teacher):
    """`torchrun --nproc_per_node 2 -m fewstep distill ...` on a machine without GPUs and without
    ACCELERATE_USE_CPU: the two processes form one group (each would otherwise train alone into the same folder),
    every process checks OUT before any writes, and only the main process writes the shared files (it raced
    before: 'student already holds a model' on one rank)."""
    env = {k: v for k, v in _env().items() if k != "ACCELERATE_USE_CPU"}
    for i in range(2):
        out = tmp_path / f"run{i}"
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                              "-m", "fewstep", "distill", "--teacher", str(gmm_cond_teacher), "--method", "reflow",
                              "--guidance", "2", "--pairs", "256", "--teacher-steps", "4", "--iters", "6",
                              "--batch", "64", "--out", str(out)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert res.stdout.count("student (1 steps, reflow)") == 1  # one process reports
        config = json.loads((out / "student" / "config.json").read_text())
        assert config["training"]["processes"] == 2 and config["training"]["distill_wall_seconds"] > 0


def test_cli_quality_measure_is_built_on_the_main_process_and_its_failure_stops_every_rank(tmp_path,
                                                                                          gmm_cond_teacher):
    """eval_every under torchrun: the measure (its reference, a feature network for images) is built by rank 0
    alone and logged once per figure; when building it fails there (eval_n larger than the train split), the other
    rank stops with that reason instead of waiting in a collective."""
    env = {k: v for k, v in _env().items() if k != "ACCELERATE_USE_CPU"}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "fewstep",
            "distill", "--teacher", str(gmm_cond_teacher), "--method", "reflow", "--guidance", "2", "--pairs", "256",
            "--teacher-steps", "4", "--iters", "6", "--batch", "64", "--set", "eval_every=3"]
    res = subprocess.run([*base, "--set", "eval_n=64", "--out", str(tmp_path / "ok")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ok" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "quality/swd" in r] == [3, 6]
    res = subprocess.run([*base, "--set", "eval_n=99999", "--out", str(tmp_path / "bad")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "eval_n 99999 exceeds" in res.stderr
    assert "building the quality measure (eval_every) failed on the main process" in res.stderr
