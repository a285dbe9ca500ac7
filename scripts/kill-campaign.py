#!/usr/bin/env python
"""Kill campaign: SIGKILL `fewstep train` (or `distill`) at random moments, resume it with --resume until it
finishes, and check that the result is bitwise equal to an uninterrupted run and that no temporary file is left.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/kill-campaign.py --kills 20 --seed 0 [--distill] [--work DIR]

Each trial runs the command, waits a random time in [--min, --max] seconds (drawn from the seed), sends SIGKILL, then
runs it again with --resume (killing again with probability --again) until one run exits 0.  A trial whose first run
finished before the kill counts as "finished early" (reported, not a failure).  Exit status 1 when any trial ends
with different bytes, a temporary file, a non-zero exit other than the kill, or a traceback.  Deterministic kills at
chosen writes are in tests/test_crash.py; this script finds the moments nobody thought of.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["train", "--data", "digits", "--preset", "test8", "--conditional", "--steps", "40", "--ckpt-every", "5",
         "--batch", "16"]


def fewstep(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "fewstep", *argv]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_killed(argv: list[str], after: float) -> tuple[int, str]:
    """Run ``argv``, SIGKILL it ``after`` seconds in (if still running); (exit status, stderr)."""
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(fewstep(argv), env=env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            p.wait(timeout=after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
        err.seek(0)
        return p.returncode, err.read().decode(errors="replace")


def final_weights(out: Path, distill: bool) -> bytes:
    return ((out / "student" if distill else out) / "model.safetensors").read_bytes()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="trials (each starts with one kill)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min", type=float, default=2.0, help="earliest kill, seconds after start (imports take ~3 s)")
    ap.add_argument("--max", type=float, default=12.0, help="latest kill, seconds after start")
    ap.add_argument("--again", type=float, default=0.3, help="probability of killing a resumed run too")
    ap.add_argument("--distill", action="store_true", help="kill a progressive distillation instead of training")
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="kill-campaign-"))
    work.mkdir(parents=True, exist_ok=True)

    if args.distill:
        teacher = work / "teacher"
        if not (teacher / "model.safetensors").exists():
            subprocess.run(fewstep([*TRAIN, "--out", str(teacher)]), env=env(), check=True)
        argv = ["distill", "--teacher", str(teacher), "--method", "progressive", "--steps", "1", "--start-steps", "2",
                "--iters", "10", "--reparam-iters", "10", "--batch", "16", "--set", "ckpt_every=2"]
    else:
        argv = TRAIN
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(fewstep([*argv, "--out", str(ref)]), env=env(), check=True, stdout=subprocess.DEVNULL)
    print(f"uninterrupted run: {time.perf_counter() - t0:.1f} s", flush=True)
    want = final_weights(ref, args.distill)

    failures, early, kills = 0, 0, 0
    for trial in range(args.kills):
        out = work / f"trial_{trial:03d}"
        shutil.rmtree(out, ignore_errors=True)
        first = True
        log = []
        while True:
            resume = [] if first else ["--resume"]
            kill = first or rng.random() < args.again
            after = rng.uniform(args.min, args.max) if kill else 1e9
            code, err = run_killed([*argv, "--out", str(out), *resume], after)
            log.append(f"{'run' if first else 'resume'} kill@{after:.1f}s -> {code}" if kill else f"resume -> {code}")
            if code == -signal.SIGKILL:
                kills += 1
                first = False
                continue
            if code != 0 or "Traceback" in err:
                print(f"trial {trial}: FAILED ({'; '.join(log)}): {err.strip().splitlines()[-1:]}", flush=True)
                failures += 1
                break
            if first:
                early += 1
            tmp = [str(p.relative_to(out)) for p in out.rglob("*.tmp")]
            same = final_weights(out, args.distill) == want
            status = "ok" if same and not tmp else f"FAILED (bitwise equal: {same}, temporary files: {tmp})"
            failures += status != "ok"
            print(f"trial {trial}: {status} ({'; '.join(log)})", flush=True)
            break
    print(f"{args.kills} trials, {kills} kills, {early} finished before the kill, {failures} failed; work: {work}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
