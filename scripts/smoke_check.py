"""Checks for scripts/gpu-smoke.sh: every run folder below ROOT logged only finite losses and ran on DEVICE.

    python scripts/smoke_check.py ROOT DEVICE [--scaler]

DEVICE is ``cuda`` or ``cpu`` (the device type each run's config records); ``--scaler``: the run's checkpoints hold
a grad-scaler state with a finite scale (fp16 on CUDA).  Prints one line per run; exits 1 on the first problem.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def check_run(run: Path, device: str, scaler: bool, root: Path) -> str:
    losses = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        losses += [(k, v) for k, v in rec.items() if k.startswith("loss/")]
    if not losses:
        raise SystemExit(f"{run}: no loss was logged")
    bad = [(k, v) for k, v in losses if not math.isfinite(v)]
    if bad:
        raise SystemExit(f"{run}: non-finite losses {bad[:3]}")
    training = json.loads((run / "config.json").read_text()).get("training", {})
    ran_on = str(training.get("device", "?"))
    if ran_on.split(":")[0] != device:
        raise SystemExit(f"{run}: ran on {ran_on}, expected {device}")
    note = ""
    if scaler:
        import torch

        latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
        state = torch.load(latest / "optim.pt", map_location="cpu", weights_only=True)
        if "_grad_scaler" not in state or not math.isfinite(float(state["_grad_scaler"]["scale"])):
            raise SystemExit(f"{run}: no finite grad-scaler state in {latest}")
        note = f", grad scale {float(state['_grad_scaler']['scale']):g}"
    name = run.relative_to(root) if run != root else run.name
    last = f"{losses[-1][0]} {losses[-1][1]:.4f}"
    return f"{name}: {len(losses)} losses finite, last {last}, on {ran_on}{note}"


def main() -> None:
    root, device = Path(sys.argv[1]), sys.argv[2]
    scaler = "--scaler" in sys.argv[3:]
    runs = sorted({p.parent for p in root.rglob("metrics.jsonl")})
    if not runs:
        raise SystemExit(f"{root}: no training run found")
    for run in runs:
        print("  " + check_run(run, device, scaler, root))


if __name__ == "__main__":
    main()
