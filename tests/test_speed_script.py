"""benchmarks/speed.py's process comparison still runs: a few steps of the tiny8 teacher in two processes
(torchrun, gloo, ``ACCELERATE_USE_CPU=true``), whose child asserts the world size it saw (~20 s)."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("fewstep_speed_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_two_process_run_reports_two_processes(speed, tmp_path):
    run = speed.run_procs(2, steps=3, warmup=2, batch=16, work=tmp_path / "two")
    assert run.processes == 2 and run.batch == 16
    assert len(run.rank_steps_s) == 2  # one timing file per rank, each reporting a world of 2 (checked by run_procs)
    assert run.steps_s > 0 and run.samples_s == pytest.approx(16 * run.steps_s)
    assert run.cpu_ms_per_step > 0 and run.allreduce_grads_ms > 0 and run.allreduce_scalar_ms > 0


def test_procs_table_and_json_fields(speed):
    runs = [speed.ProcRun(0, 1, 64, 10.0, 640.0, 100.0, [10.0]),
            speed.ProcRun(0, 2, 64, 12.0, 768.0, 150.0, [12.0, 12.0], 0.3, 5.0),
            speed.ProcRun(0, 1, 32, 16.0, 512.0, 60.0, [16.0])]
    res = speed.ProcsResult(64, 40, 5, 1, 2, runs, 10.0, 12.0, 16.0, 1.2, 1.5, 1.6)
    rep = speed.Report("quick", "speed.py", {}, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 1.0, None, [], res)
    (title, cols, rows), = speed._tables(rep)
    assert "2 processes" in title and "1.20" in title and "2-CPU" in title
    assert rows[1][-1] == "1.20" and rows[2][-1] == "1.60"
