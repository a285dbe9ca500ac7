"""Own data at scale (issue 11): a 4 GB .npy trains with resident memory far below its size, and a folder of
50,000 PNGs streams through DataLoader workers at a rate compared with in-memory data.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_scale.py [--work DIR] [--quick]

Builds (once, in --work, default /tmp/fewstep-data-scale) a uint8 .npy of mnist images tiled to 4 GB and a folder
of 50,000 mnist PNGs in class sub-folders; then
  1. trains `fewstep train --data BIG.npy --preset test8` for 300 steps in a subprocess and samples the resident
     memory (RSS and PSS) of its whole process tree (the trainer and its DataLoader workers) every 0.2 s;
  2. reads the same 200 random batches of 64 from the PNG folder through LazyImages.loader (2 workers) and from
     the folder loaded into memory, and trains 50 steps each way, reporting images/s and it/s.
Writes benchmarks/results/data_scale.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent


def build_npy(path: Path, gigabytes: float) -> int:
    from fewstep.data.datasets import load_dataset

    mnist = load_dataset("mnist", "train")
    base = ((mnist.x[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()  # (4000, 28, 28)
    n = int(gigabytes * 1e9) // (28 * 28)
    if path.is_file() and path.stat().st_size > n * 784:
        return n
    arr = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.uint8, shape=(n, 28, 28))
    for lo in range(0, n, len(base)):
        k = min(len(base), n - lo)
        arr[lo:lo + k] = base[:k]
    arr.flush()
    del arr
    os.replace(path.with_suffix(".tmp.npy"), path)
    return n


def build_pngs(folder: Path, n: int) -> None:
    from PIL import Image

    from fewstep.data.datasets import load_dataset

    if (folder / ".done").is_file():
        return
    mnist = load_dataset("mnist", "train")
    base = ((mnist.x[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    for i in range(n):
        j = i % len(base)
        d = folder / str(int(mnist.y[j]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(base[j]).save(d / f"{i:06d}.png")
    (folder / ".done").write_text("ok")


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) summed over a process and its children, in MiB.  RSS counts the pages the processes share (torch's
    libraries, forked DataLoader workers) once per process; PSS divides each shared page among its sharers, so its
    sum is the tree's real footprint."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    rss = pss = 0
    for q in procs:
        try:
            info = q.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except psutil.NoSuchProcess:
            pass
    return rss / 2**20, pss / 2**20


def train_big(npy: Path, out: Path, steps: int) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "fewstep", "train", "--data", str(npy), "--preset", "test8", "--steps", str(steps),
           "--batch", "64", "--ckpt-every", str(steps), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0, 0.0]

    def watch() -> None:
        while proc.poll() is None:
            rss, pss = tree_memory_mb(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.2)

    t = threading.Thread(target=watch)
    t.start()
    stdout, stderr = proc.communicate()
    t.join()
    if proc.returncode:
        raise SystemExit(f"training on {npy} failed:\n{stderr[-2000:]}")
    cfg = json.loads((out / "config.json").read_text())
    return {"command": " ".join(cmd), "npy_bytes": npy.stat().st_size, "peak_tree_rss_mb": round(peak[0], 1),
            "peak_tree_pss_mb": round(peak[1], 1),
            "wall_seconds": round(time.perf_counter() - t0, 1), "steps": steps,
            "train_wall_seconds": cfg["training"]["wall_seconds"], "n_train": cfg["data_record"]["n_train"],
            "stdout": stdout.strip()}


def stream_pngs(folder: Path, batches: int, steps: int) -> dict:
    import torch

    from fewstep.data import datasets as D
    from fewstep.data.spec import data_key
    from fewstep.models.backbones import preset_backbone
    from fewstep.training.loop import TrainConfig, batch_indices, train
    from fewstep.training.teacher import TeacherMethod, TeacherSpec

    key = data_key(str(folder), test_fraction=0.0)
    t0 = time.perf_counter()
    os.environ["FEWSTEP_MEMORY_BUDGET"] = "1M"
    lazy = D.load_dataset(key, "train")
    open_s = time.perf_counter() - t0
    assert isinstance(lazy.x, D.LazyImages)
    n = len(lazy.x)
    idx = [batch_indices(s, n, 64, 0).numpy() for s in range(batches)]
    t0 = time.perf_counter()
    for _ in lazy.x.loader(idx, workers=2):
        pass
    lazy_rate = batches * 64 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for b in idx:
        lazy.x[b]
    lazy0_rate = batches * 64 / (time.perf_counter() - t0)
    os.environ["FEWSTEP_MEMORY_BUDGET"] = "8G"
    t0 = time.perf_counter()
    mem = D.load_dataset(key, "train")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in idx:
        mem.x[torch.from_numpy(b)]
    mem_rate = batches * 64 / (time.perf_counter() - t0)

    def fit(x, out):
        torch.manual_seed(0)
        kind, cfg = preset_backbone("test8", (1, 28, 28))
        m = TeacherMethod(TeacherSpec(backbone=kind, backbone_config=cfg, sample_shape=(1, 28, 28)))
        r = train(m, (x, None), TrainConfig(steps=steps, batch=64, log_every=steps, ckpt_every=10 * steps,
                                            progress=False), out)
        return steps / r.wall_seconds

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        lazy_its = fit(lazy.x, Path(tmp) / "lazy")
        mem_its = fit(mem.x, Path(tmp) / "mem")
    return {"images": n, "open_seconds_lazy": round(open_s, 1), "load_seconds_in_memory": round(load_s, 1),
            "images_per_s_workers2": round(lazy_rate), "images_per_s_no_workers": round(lazy0_rate),
            "images_per_s_in_memory": round(mem_rate), "train_it_s_lazy": round(lazy_its, 2),
            "train_it_s_in_memory": round(mem_its, 2), "batches": batches, "batch": 64, "train_steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/fewstep-data-scale"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "data_scale.json")
    ap.add_argument("--quick", action="store_true", help="0.2 GB and 5,000 PNGs (a check that the script runs)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    gb, pngs = (0.2, 5000) if a.quick else (4.0, 50_000)
    npy = a.work / f"mnist-{gb:g}GB.npy"
    t0 = time.perf_counter()
    build_npy(npy, gb)
    print(f"npy {npy} ({npy.stat().st_size / 1e9:.2f} GB) ready in {time.perf_counter() - t0:.0f} s", flush=True)
    big = train_big(npy, a.work / "big-run", 300)
    print(json.dumps(big), flush=True)
    folder = a.work / f"png{pngs}"
    t0 = time.perf_counter()
    build_pngs(folder, pngs)
    print(f"{pngs} PNGs ready in {time.perf_counter() - t0:.0f} s", flush=True)
    stream = stream_pngs(folder, 200, 50)
    print(json.dumps(stream), flush=True)
    import torch

    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_scale.py" + (" --quick" if a.quick else "")
    result = {"npy": big, "png_folder": stream, "torch_threads": torch.get_num_threads(), "command": command}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
