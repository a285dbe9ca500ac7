"""boot's ablation on the diffusers digits teacher and the fashion teacher (issue 13; benchmarks/README.md,
"One-step students II").

    OMP_NUM_THREADS=1 python benchmarks/boot_ablation.py [VARIANT ...]      (needs diffusers_digits.py's teacher)
    OMP_NUM_THREADS=1 python benchmarks/boot_ablation.py --teacher T --guidance W [VARIANT ...]  (another teacher,
                                                    e.g. teachers/fashion-tiny28 at guidance 2: the fashion-* ones)
    OMP_NUM_THREADS=1 python benchmarks/boot_ablation.py --teacher-rows      (the teacher's DDIM-50/32/16/8 rows)
    OMP_NUM_THREADS=1 python benchmarks/boot_ablation.py --diagnose FOLDER [--teacher T]  (a student against the
                                                                              true path; T: the run's teacher)

Each variant is `fewstep distill --method boot` on the DDPMPipeline folder (or ``--teacher``) with the flags below,
measured by FD at n = 1,000 against the **train** split of the teacher's data (digits for the diffusers folder; the
quality callback's measure: tuning never reads the test split) and the class entropy of 1,000 samples.
``--diagnose`` prints, per grid step, the mean square of the student's signal against the teacher's true DDIM
signal path from the same noise, against its own one-step bootstrap target, and of the true signal itself.
Results append to benchmarks/cache/boot-ablation/results.jsonl.
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

import torch

HERE = Path(__file__).resolve().parent
TEACHER = HERE / "cache" / "diffusers-digits" / "teacher-diffusers"
OUT = HERE / "cache" / "boot-ablation"
PAPER = ["--set", "weighting=d2", "--set", "zero_out=false", "--iters", "1000"]
OURS = ["--set", "weighting=z-d2", "--set", "zero_out=true", "--iters", "1000"]
VARIANTS = {  # as run on 2026-12-02 (lr 3e-4 unless given)
    "paper": PAPER,
    "weighting-none": [*PAPER, "--set", "weighting=none"],
    "weighting-z": [*PAPER, "--set", "weighting=z"],
    "weighting-z-d2": [*PAPER, "--set", "weighting=z-d2"],
    "grid-16": [*PAPER, "--set", "grid_steps=16"],
    "lr-1e-3": [*PAPER, "--lr", "1e-3"],
    "zero-out": [*PAPER, "--set", "zero_out=true"],
    "ours": OURS,
    "ours-grid-16": [*OURS, "--set", "grid_steps=16"],
    "ours-lr-1e-3": [*OURS, "--lr", "1e-3"],
    "defaults": [],  # 3,000 iterations
    "ours-4000": ["--iters", "4000"],
    "ours-4000-lr-1e-3": ["--iters", "4000", "--lr", "1e-3"],
    # for the class-conditional fashion teacher (--teacher teachers/fashion-tiny28 --guidance 2), where the defaults
    # fail (benchmarks/README.md, "boot on fashion"): 600 iterations at lr 1e-3 each
    "fashion-base": ["--iters", "600", "--lr", "1e-3"],
    "fashion-d2": ["--iters", "600", "--lr", "1e-3", "--set", "weighting=d2"],
    "fashion-grid-16": ["--iters", "600", "--lr", "1e-3", "--set", "grid_steps=16"],
    "fashion-grid-8": ["--iters", "600", "--lr", "1e-3", "--set", "grid_steps=8"],
}


def class_entropy(x: torch.Tensor, dataset: str = "digits") -> float:
    from fewstep.evaluate.features import feature_extractor

    _, pred = feature_extractor(dataset)(x.float())
    p = torch.bincount(torch.as_tensor(pred).long(), minlength=10).double()
    p = p / p.sum()
    return float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(10)


def variant(name: str, teacher: Path = TEACHER, guidance: float | None = None) -> dict:
    from fewstep.evaluate.runner import train_quality
    from fewstep.generate import sample_model
    from fewstep.models.folder import load_model

    dataset = load_model(teacher).config.data or "digits"  # the diffusers folder records none: digits
    out = OUT / name if teacher == TEACHER else OUT / teacher.name / name
    extra = ["--guidance", str(guidance)] if guidance is not None else []
    t = time.perf_counter()
    if not (out / "student" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "fewstep", "distill", "--teacher", str(teacher), "--method", "boot",
                        "--out", str(out), "--threads", "1", *extra, *VARIANTS[name]], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t
    fd = train_quality(dataset, 1000)(out / "student", 0)["fd"]
    ent = class_entropy(sample_model(load_model(out / "student"), 1000, seed=0).x, dataset)
    return {"name": name, "teacher": str(teacher), "args": [*extra, *VARIANTS[name]], "seconds": round(seconds, 1),
            "train_fd": fd, "entropy": round(ent, 3)}


def teacher_rows() -> list[dict]:
    import fewstep.generate as generate
    from fewstep.evaluate.runner import train_quality

    real = generate.sample_model
    rows = []
    for steps in (50, 32, 16, 8):  # train_quality samples a model at its defaults: pin DDIM at `steps` here
        generate.sample_model = lambda m, n, steps=steps, **kw: real(m, n, sampler="ddim", steps=steps, **kw)
        try:
            rows.append({"name": f"teacher-ddim-{steps}", "train_fd": train_quality("digits", 1000)(TEACHER, 0)["fd"]})
        finally:
            generate.sample_model = real
    return rows


@torch.no_grad()
def diagnose(folder: Path, teacher_folder: Path = TEACHER, n: int = 256) -> None:
    from fewstep.distill.boot import Boot
    from fewstep.models.folder import load_model

    teacher, student = load_model(teacher_folder), load_model(folder / "student")
    sched = teacher.denoiser.schedule
    training = student.config.training
    boot = Boot(teacher.denoiser, teacher.config, int(training.get("grid_steps", 32)),
                guidance=float(training.get("distilled_guidance", 1.0)), zero_out=False)
    boot.student = student.denoiser.net.eval()
    T, N = sched.num_train_timesteps, boot.grid
    sigma_T = float(sched.sigma(float(T - 1)))
    eps = torch.randn(n, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    y = eps * ((1 + sigma_T**2) ** 0.5 - sigma_T)  # the true signal at T
    labels = torch.arange(n) % teacher.config.num_classes if teacher.config.num_classes else None
    print("step  d      student-vs-path  student-vs-target  |y|^2")
    for k in range(N, 0, -1):
        t = torch.full((n,), (T - 1) * k / N, dtype=torch.float64)
        s = torch.full((n,), (T - 1) * (k - 1) / N, dtype=torch.float64)
        own = boot.signal(eps, t.float(), labels) if k < N else y
        target = boot.teacher_step(own, eps, sched.sigma(t), sched.sigma(s), labels)
        y = boot.teacher_step(y, eps, sched.sigma(t), sched.sigma(s), labels)
        g = boot.signal(eps, s.float(), labels)
        d = 1 - float(sched.sigma(s)[0] / sched.sigma(t)[0])
        print(f"{k - 1:4d}  {d:.3f}  {float((g - y).pow(2).mean()):15.4f}  {float((g - target).pow(2).mean()):17.4f}"
              f"  {float(y.pow(2).mean()):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", help=f"of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--teacher-rows", action="store_true")
    ap.add_argument("--diagnose", type=Path, default=None, help="a boot run folder")
    ap.add_argument("--teacher", type=Path, default=TEACHER, help="the teacher (default: the diffusers digits "
                                                                   "teacher); with --diagnose, the run's teacher")
    ap.add_argument("--guidance", type=float, default=None, help="variants: distil the teacher at this guidance")
    args = ap.parse_args()
    if args.diagnose is not None:
        diagnose(args.diagnose, args.teacher)
        return
    if args.teacher == TEACHER and not (TEACHER / "model_index.json").is_file():
        sys.exit(f"no teacher in {TEACHER}: run benchmarks/diffusers_digits.py first")
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    default = [v for v in VARIANTS if v.startswith("fashion-") == (args.teacher != TEACHER)]
    rows = teacher_rows() if args.teacher_rows else [variant(v, args.teacher.resolve(), args.guidance)
                                                     for v in (args.variants or default)]
    with open(OUT / "results.jsonl", "a") as f:
        for r in rows:
            print(json.dumps(r))
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
