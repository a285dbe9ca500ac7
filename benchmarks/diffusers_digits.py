"""Issue 13's diffusers check: dmd2 and boot with their defaults on an unconditional diffusers DDPMPipeline digits
teacher (eps, linear betas, clip_sample on, leading spacing), one thread each.

    OMP_NUM_THREADS=1 python benchmarks/diffusers_digits.py [--out benchmarks/cache/diffusers-digits]

Trains a fewstep digits teacher (tiny8, 4,000 steps) unless it is there, exports it as a DDPMPipeline folder (the
teacher every distillation below reads: a diffusers folder, not fewstep's), then times

    fewstep distill --teacher T --method dmd2 --steps 1 --data digits --out O    (defaults, --threads 1)
    fewstep distill --teacher T --method boot --out O                            (no --data)

as whole commands and measures each student against the teacher's DDIM-50 FD (n = 500, the digits test split) and
by class entropy: the entropy of the histogram of classes the feature network's classifier assigns to the samples,
against the same for the test split's images.  Targets (issue 13): at most 15 minutes per command, FD at most 1.5x
the teacher's DDIM-50 FD, class entropy at least 0.95x the test split's.  Writes OUT/results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fewstep(*args: str, threads: bool = True) -> float:
    """Run the CLI with one thread; returns its wall time."""
    t = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "fewstep", *args, *(["--threads", "1"] if threads else [])], check=True,
                   env=env)
    return time.perf_counter() - t


def class_entropy(x) -> float:
    import torch

    from fewstep.evaluate.features import feature_extractor

    _, pred = feature_extractor("digits")(x.float())
    p = torch.bincount(torch.as_tensor(pred).long(), minlength=10).double()
    p = p / p.sum()
    return float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(10)  # in units of log 10 (1: uniform)


def measure(model: Path, **kw) -> dict:
    from fewstep.data.datasets import load_dataset
    from fewstep.evaluate.runner import evaluate_model
    from fewstep.generate import sample_model

    r = evaluate_model(model, data="digits", n=500, **kw)
    x = sample_model(model, 500, seed=0, **kw).x
    q = r.quality
    return {"fd": q.fd, "fd_ci": q.fd_ci, "precision": q.precision, "recall": q.recall, "nfe": r.nfe,
            "class_entropy": class_entropy(x), "test_class_entropy": class_entropy(load_dataset("digits", "test").x)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "cache" / "diffusers-digits")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    native, pipe = out / "teacher-fewstep", out / "teacher-diffusers"
    if not (native / "model.safetensors").is_file():
        fewstep("train", "--data", "digits", "--preset", "tiny8", "--steps", "4000", "--lr", "1e-3", "--out",
                str(native))
    if not (pipe / "model_index.json").is_file():
        fewstep("export", str(native), str(pipe), threads=False)
    sched_file = pipe / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text())
    if sched.get("timestep_spacing") != "leading":  # as the hub's DDPMPipeline checkpoints (google/ddpm-*): leading
        sched["timestep_spacing"] = "leading"
        sched_file.write_text(json.dumps(sched, indent=2) + "\n")
    assert sched["_class_name"] == "DDPMScheduler" and sched.get("clip_sample") is True, sched
    assert sched.get("beta_schedule") == "linear" and sched.get("prediction_type") == "epsilon", sched
    assert sched.get("timestep_spacing", "leading") == "leading", sched
    results = {"teacher_ddim50": measure(pipe, sampler="ddim", steps=50), "scheduler": sched}
    for method, extra in (("dmd2", ["--steps", "1", "--data", "digits"]), ("boot", [])):
        folder = out / method
        if not (folder / "student" / "config.json").is_file():
            seconds = fewstep("distill", "--teacher", str(pipe), "--method", method, *extra, "--out", str(folder))
            (out / f"{method}.seconds").write_text(f"{seconds:.1f}\n")
        seconds = float((out / f"{method}.seconds").read_text())
        results[method] = {"command_seconds": seconds, **measure(folder / "student")}
    t = results["teacher_ddim50"]
    print(f"teacher DDIM-50: FD {t['fd']:.3f}, class entropy {t['class_entropy']:.3f} (test split "
          f"{t['test_class_entropy']:.3f})")
    for method in ("dmd2", "boot"):
        r = results[method]
        ratio = r["class_entropy"] / r["test_class_entropy"]
        ok = (r["command_seconds"] <= 900, r["fd"] <= 1.5 * t["fd"], ratio >= 0.95)
        r["targets_met"] = dict(zip(("time", "fd", "entropy"), ok))
        print(f"{method}: {r['command_seconds'] / 60:.1f} min, FD {r['fd']:.3f} ({r['fd'] / t['fd']:.2f}x the "
              f"teacher's DDIM-50), class entropy {r['class_entropy']:.3f} ({ratio:.3f}x "
              f"the test split's); targets met: {r['targets_met']}")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
