"""scripts/gpu-smoke.sh cannot rot: its --cpu mode (the same steps as on a GPU, smaller) runs here."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_smoke_script_runs_in_cpu_mode(tmp_path):
    env = {**os.environ, "SMOKE_OUT": str(tmp_path / "smoke"), "OMP_NUM_THREADS": "1"}
    env.pop("FEWSTEP_CACHE", None)  # the script sets its own
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-smoke.sh"), "--cpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[-1].startswith("all steps passed") and "cpu mode" in lines[-1]
    for name in ("teacher-fp32", "teacher-bf16", "sample-student", "evaluate-student", "fp16-kill", "fp16-resume",
                 "check-runs"):
        assert any(ln.startswith(f"ok   {name} ") for ln in lines), name
    assert sum(ln.startswith("ok   distill-") for ln in lines) >= 5
    assert "killed after step_" in res.stdout
