"""fewstep speed benchmark: training throughput and sampling time per NFE, each against plain PyTorch/diffusers.

1. Training: steps/s of ``fewstep.training.loop.train`` with a ``TeacherMethod`` (what ``fewstep train --data digits
   --preset tiny8 --conditional`` runs: lr 1e-3, EMA, grad clipping, logging; checkpoints off but the final save,
   progress off) against a minimal hand loop on the same ``UNet2DModel`` config and batch (randint timesteps,
   ``DDPMScheduler.add_noise``, eps-MSE, AdamW step, nothing else).  Measured two ways: alternating rounds of whole
   runs (order flipped each round), and one run where the two loops alternate step by step (the hand step runs in
   the method's ``after_step`` hook, outside fewstep's timed span), so both see the same machine load.  With
   ``--breakdown`` (always in the full profile, and whenever the target is missed) every piece of per-step work
   the fewstep loop adds is timed alone, next to the saving it takes (fused AdamW).
   Then processes: steps/s and samples/s of the same ``train`` run at the same *global* batch in 1 process and
   in 2 processes (``torchrun --nproc_per_node 2 --standalone``, DDP over gloo through accelerate, each process
   one torch thread and half the batch), both started as subprocesses running this script; the 2-process /
   1-process ratio is reported as a figure, not against a target.
2. Sampling: seconds per network evaluation of fewstep's ddim / euler / dpmpp-2m (``fewstep.generate.generate``,
   and the bare sampler function + ``Denoiser``) against the diffusers scheduler loop (set_timesteps,
   scale_model_input, unet, step) on the same UNet, batch, timesteps, labels and (for the bare function) noise,
   under ``torch.no_grad``; a parity column checks they compute the same thing, and a second table times each
   loop with the UNet replaced by a stub (the loops' own cost, free of the network's noise).

The machine is shared and noisy: contestants alternate within every round, warm-up is excluded, tables report
medians and medians of per-round ratios, and the load average before and after.

    python benchmarks/speed.py --quick            # about 1.5 minutes
    python benchmarks/speed.py --json speed.json  # the full profile (about 13 minutes on a busy 2-core box)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from fewstep.data.datasets import load_dataset
from fewstep.diffusion.schedules import spaced_timesteps
from fewstep.generate import class_labels, generate
from fewstep.models.backbones import UNetBackbone, preset_backbone
from fewstep.models.denoiser import Denoiser
from fewstep.models.folder import LoadedModel, load_model, save_model
from fewstep.samplers import SAMPLERS, SamplerOptions
from fewstep.training.loop import TrainConfig, train
from fewstep.training.teacher import TeacherMethod, TeacherSpec

SAMPLER_NAMES = ("ddim", "euler", "dpmpp-2m")
TRAIN_TARGET = 0.95  # fewstep steps/s >= 95% of the hand loop's
SAMPLE_TARGET = 1.0  # fewstep time per NFE <= diffusers'


@dataclass(frozen=True)
class Profile:
    name: str
    train_rounds: int
    train_steps: int  # timed steps per round and contestant
    train_warmup: int  # untimed steps at the start of every run
    interleaved_steps: int  # timed steps of each step-by-step paired run
    sample_rounds: int
    sample_steps: tuple[int, ...]
    procs_rounds: int = 1  # rounds of (1 process, 2 processes, 1 process at half the batch), who goes first rotating
    procs_steps: int = 30  # timed steps of each run
    procs_warmup: int = 5  # untimed steps at the start of each run (DDP builds its buckets in the first)


# Even train_rounds balance the order (hand first / fewstep first); sample_rounds a multiple of 3 lets each of the
# three sampling contestants go first, second and third equally often, and procs_rounds the three process runs.
QUICK = Profile("quick", train_rounds=2, train_steps=20, train_warmup=5, interleaved_steps=30, sample_rounds=3,
                sample_steps=(5,), procs_rounds=1, procs_steps=40, procs_warmup=5)
FULL = Profile("full", train_rounds=4, train_steps=60, train_warmup=10, interleaved_steps=120, sample_rounds=6,
               sample_steps=(10, 25), procs_rounds=3, procs_steps=120, procs_warmup=10)


# --- results ---------------------------------------------------------------------------------------------
@dataclass
class TrainRound:
    order: str  # "hand,fewstep" or "fewstep,hand"
    hand_steps_s: float  # steps per wall-clock second
    fewstep_steps_s: float
    hand_cpu_steps_s: float  # steps per CPU second of this process (insensitive to other jobs at 1 thread)
    fewstep_cpu_steps_s: float
    ratio: float = 0.0  # fewstep / hand, wall clock
    cpu_ratio: float = 0.0  # fewstep / hand, CPU time

    def __post_init__(self) -> None:
        self.ratio = self.fewstep_steps_s / self.hand_steps_s
        self.cpu_ratio = self.fewstep_cpu_steps_s / self.hand_cpu_steps_s


@dataclass
class Component:
    """Something the fewstep loop does per step that the hand loop does not, timed alone (median, ms)."""

    name: str
    ms_per_step: float
    note: str = ""


@dataclass
class Paired:
    """The hand loop and a contestant alternating step by step, so both see the same machine load.

    Times are medians of per-step times (wall, and CPU time of this process).  For the fewstep loop itself the hand
    step runs inside the method's after_step hook, outside fewstep's timed span."""

    contestant: str
    steps: int
    hand_ms: float
    contestant_ms: float
    ratio: float  # hand_ms / contestant_ms = contestant steps/s over hand steps/s
    ratio_of_sums: float  # the same from total times
    hand_cpu_ms: float
    contestant_cpu_ms: float
    cpu_ratio: float


@dataclass
class TrainResult:
    batch: int
    timed_steps: int
    warmup_steps: int
    params: int
    rounds: list[TrainRound]
    hand_steps_s: float  # medians over rounds (wall clock)
    fewstep_steps_s: float
    ratio: float  # median of the per-round fewstep/hand wall ratios (1.0 = as fast; target >= 0.95)
    cpu_ratio: float  # the same in CPU time
    overhead_ms_per_step: float  # median per-round (1/fewstep - 1/hand), wall ms
    cpu_overhead_ms_per_step: float
    meets_target: bool  # wall ratio >= 0.95
    meets_target_cpu: bool
    paired: list[Paired] = field(default_factory=list)  # [0]: hand vs hand (calibration), [1]: hand vs fewstep
    breakdown: list[Component] = field(default_factory=list)
    savings: list[Component] = field(default_factory=list)


@dataclass
class ProcRun:
    """One training run in ``processes`` processes, a subprocess of this script; times from each process's
    ``after_step`` stamps after the warm-up (the processes meet in DDP's all-reduce every step)."""

    round: int
    processes: int
    batch: int  # the global batch; each process takes batch / processes
    steps_s: float  # wall-clock steps/s of the global batch (rank 0)
    samples_s: float  # steps_s x the global batch
    cpu_ms_per_step: float  # CPU ms per step, summed over the processes
    rank_steps_s: list[float] = field(default_factory=list)  # every process's own wall steps/s
    allreduce_scalar_ms: float = 0.0  # 2+ processes: median all-reduce of one float (the loop's non-finite check)
    allreduce_grads_ms: float = 0.0  # ... of one float32 tensor the size of all gradients (DDP's traffic, unbucketed)
    run_seconds: float = 0.0  # the whole subprocess, start-up and final save included


@dataclass
class ProcsResult:
    """The same ``train`` run at the same global batch in 1 process and in 2 (torchrun, DDP over gloo), and as a
    reference 1 process at half the batch: the work each of the 2 processes does, without communication."""

    batch: int  # the global batch; each of the 2 processes takes half
    timed_steps: int
    warmup_steps: int
    threads: int  # torch threads per process
    cpus: int
    runs: list[ProcRun]
    one_steps_s: float  # medians over rounds
    two_steps_s: float
    half_steps_s: float  # 1 process at half the batch
    ratio: float  # median of the per-round 2-process / 1-process steps/s: a figure, not a target
    cpu_ratio: float  # median per-round CPU ms per step, 2 processes summed / 1 process (the cost of splitting)
    ideal_ratio: float  # median per-round (1 process at half the batch) / 1 process: what 2 processes would reach
    # with two free cores and free communication


@dataclass
class SampleRow:
    sampler: str
    steps: int
    nfe: int
    n: int  # samples per batch (one batch)
    # medians over rounds of seconds per NFE for the whole batch: wall clock, and CPU time of this process
    diffusers_s_per_nfe: float
    generate_s_per_nfe: float
    sampler_fn_s_per_nfe: float
    diffusers_cpu_s_per_nfe: float
    generate_cpu_s_per_nfe: float
    sampler_fn_cpu_s_per_nfe: float
    # medians of per-round fewstep / diffusers time ratios (<= 1.0 is the target)
    generate_ratio: float
    sampler_fn_ratio: float
    generate_cpu_ratio: float
    sampler_fn_cpu_ratio: float
    rel_diff: float  # max |fewstep - diffusers| / max |diffusers|, same noise (parity: the same computation)
    # ratios of the fastest round of each (interference only ever adds time, so minimums are a robust estimate)
    generate_min_ratio: float = 0.0
    sampler_fn_min_ratio: float = 0.0
    # CPU ms per step spent outside the network (the UNet replaced by a stub), median: the loops' own cost
    diffusers_outside_ms: float = 0.0
    generate_outside_ms: float = 0.0
    sampler_fn_outside_ms: float = 0.0
    rounds: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Report:
    profile: str
    command: str
    env: dict[str, Any]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    wall_seconds: float
    train: TrainResult | None
    sampling: list[SampleRow]
    procs: ProcsResult | None = None


@dataclass(frozen=True)
class Stamp:
    wall: float
    cpu: float


def now() -> Stamp:
    return Stamp(time.perf_counter(), time.process_time())


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


# --- training ----------------------------------------------------------------------------------------------
class HandLoop:
    """The minimal loop a user would write: randint timesteps, add noise, eps-MSE, AdamW step; nothing else.

    ``extras=True`` adds what fewstep's loop does on top (its batch_indices, grad-norm clipping, its EMA update) as a
    control, and ``fused=True`` uses ``AdamW(fused=True)``: neither is part of the baseline."""

    def __init__(self, unet_cfg: dict[str, Any], x: torch.Tensor, y: torch.Tensor, batch: int, seed: int = 0,
                 extras: bool = False, fused: bool = False):
        from diffusers import DDPMScheduler, UNet2DModel

        from fewstep.training.ema import EMA

        torch.manual_seed(seed)
        self.unet = UNet2DModel.from_config(unet_cfg).train()
        self.sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-3, weight_decay=0.0,
                                     **({"fused": True} if fused else {}))
        self.x, self.y, self.batch = x, y, batch
        self.ema = EMA(self.unet, 0.999) if extras else None
        self.k = 0

    def step(self) -> None:
        from fewstep.training.loop import batch_indices

        if self.ema is not None:
            idx = batch_indices(self.k, self.x.shape[0], self.batch, 0)
        else:
            idx = torch.randint(0, self.x.shape[0], (self.batch,))
        x0, labels = self.x[idx], self.y[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (self.batch,))
        loss = F.mse_loss(self.unet(self.sched.add_noise(x0, noise, t), t, class_labels=labels).sample, noise)
        loss.backward()
        if self.ema is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.unet.parameters() if p.grad is not None], 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.unet)
        self.k += 1


class _TimedTeacher(TeacherMethod):
    """A TeacherMethod whose (otherwise empty) ``after_step`` hook records when each step ends; the loop itself is
    untouched.  With a ``partner``, the hook also runs one partner step and records when it ends, which is when
    fewstep's next step starts: the two loops then alternate step by step under the same machine load."""

    def __init__(self, spec: TeacherSpec, partner: Callable[[], None] | None = None):
        super().__init__(spec)
        self.partner = partner
        self.ends: list[Stamp] = []  # end of each fewstep step
        self.partner_ends: list[Stamp] = []  # end of the partner step that follows it

    def after_step(self, step: int) -> None:
        self.ends.append(now())
        if self.partner is not None:
            self.partner()
            self.partner_ends.append(now())


def _rates(stamps: list[Stamp], warmup: int) -> tuple[float, float]:
    """(wall, CPU) steps per second from the end of the last warm-up step to the end of the last step."""
    a, b = stamps[warmup - 1], stamps[-1]
    n = len(stamps) - warmup
    return n / (b.wall - a.wall), n / max(b.cpu - a.cpu, 1e-9)


def _teacher_spec(preset: str = "tiny8") -> tuple[TeacherSpec, dict[str, Any], Any]:
    """What `fewstep train --data digits --preset tiny8 --conditional` builds."""
    ds = load_dataset("digits", "train")
    kind, bcfg = preset_backbone(preset, ds.sample_shape, ds.num_classes)
    spec = TeacherSpec(objective="ddpm", backbone=kind, backbone_config=bcfg, sample_shape=ds.sample_shape,
                       num_classes=ds.num_classes, data="digits")
    return spec, bcfg, ds


def _train_config(steps: int, batch: int, seed: int = 0) -> TrainConfig:
    # `fewstep train` defaults (lr 1e-3, EMA 0.999, clip 1.0, log every 25); checkpoints off but the final save
    return TrainConfig(steps=steps, batch=batch, lr=1e-3, ckpt_every=10**9, seed=seed, progress=False)


def run_fewstep_train(spec: TeacherSpec, data: tuple[torch.Tensor, torch.Tensor | None], steps: int, warmup: int,
                      batch: int, out: Path, seed: int = 0) -> tuple[float, float]:
    torch.manual_seed(seed)  # as `fewstep train` does before building the method
    method = _TimedTeacher(spec)
    train(method, data, _train_config(warmup + steps, batch, seed), out)
    return _rates(method.ends, warmup)


def run_hand_train(unet_cfg: dict[str, Any], x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int, batch: int,
                   seed: int = 0) -> tuple[float, float]:
    loop = HandLoop(unet_cfg, x, y, batch, seed)
    stamps = []
    for _ in range(warmup + steps):
        loop.step()
        stamps.append(now())
    return _rates(stamps, warmup)


def _paired(name: str, hand: list[tuple[Stamp, Stamp]], other: list[tuple[Stamp, Stamp]]) -> Paired:
    h = [b.wall - a.wall for a, b in hand]
    o = [b.wall - a.wall for a, b in other]
    hc = [b.cpu - a.cpu for a, b in hand]
    oc = [b.cpu - a.cpu for a, b in other]
    return Paired(name, len(h), 1e3 * median(h), 1e3 * median(o), median(h) / median(o), sum(h) / sum(o),
                  1e3 * median(hc), 1e3 * median(oc), median(hc) / median(oc))


def pair_loops(name: str, hand: HandLoop, other: HandLoop, steps: int, warmup: int) -> Paired:
    """Two hand-style loops alternating step by step."""
    hs, os_ = [], []
    for k in range(warmup + steps):
        a = now()
        hand.step()
        b = now()
        other.step()
        c = now()
        if k >= warmup:
            hs.append((a, b))
            os_.append((b, c))
    return _paired(name, hs, os_)


def pair_fewstep(spec: TeacherSpec, hand: HandLoop, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int,
                 batch: int, out: Path) -> Paired:
    """fewstep's loop with one hand step run inside each ``after_step``; fewstep's step k spans from the end of the
    hand step after step k-1 to the end of step k."""
    torch.manual_seed(0)
    method = _TimedTeacher(spec, partner=hand.step)
    train(method, (x, y), _train_config(warmup + steps, batch), out)
    e, p, ks = method.ends, method.partner_ends, range(warmup, warmup + steps)
    return _paired("fewstep train", [(e[k], p[k]) for k in ks], [(p[k - 1], e[k]) for k in ks])


def bench_train(prof: Profile, batch: int, work: Path, log: Callable[[str], None],
                breakdown: bool | None = None) -> TrainResult:
    spec, bcfg, ds = _teacher_spec()
    data = (ds.x, ds.y)
    # one untimed short run of each first: the first run in a process pays for imports, allocator growth and
    # first-touch page faults, which would otherwise handicap whoever goes first in round 1
    run_hand_train(bcfg, ds.x, ds.y, 5, 1, batch)
    run_fewstep_train(spec, data, 5, 1, batch, work / "train_warmup")
    rounds: list[TrainRound] = []
    for r in range(prof.train_rounds):
        order = ("hand", "fewstep") if r % 2 == 0 else ("fewstep", "hand")
        rate: dict[str, tuple[float, float]] = {}
        for who in order:
            if who == "hand":
                rate[who] = run_hand_train(bcfg, ds.x, ds.y, prof.train_steps, prof.train_warmup, batch)
            else:
                rate[who] = run_fewstep_train(spec, data, prof.train_steps, prof.train_warmup, batch,
                                              work / f"train_round{r}")
        rd = TrainRound(",".join(order), rate["hand"][0], rate["fewstep"][0], rate["hand"][1], rate["fewstep"][1])
        rounds.append(rd)
        log(f"train round {r + 1}/{prof.train_rounds} ({rd.order}): hand {rd.hand_steps_s:.2f} steps/s, fewstep "
            f"{rd.fewstep_steps_s:.2f} steps/s, ratio {rd.ratio:.3f} (CPU time {rd.cpu_ratio:.3f})")
    n, w = prof.interleaved_steps, prof.train_warmup

    def paired(pr: Paired) -> Paired:
        log(f"train step by step, hand vs {pr.contestant} ({pr.steps} steps): {pr.hand_ms:.1f} vs "
            f"{pr.contestant_ms:.1f} ms (medians), ratio {pr.ratio:.3f} (CPU {pr.cpu_ratio:.3f}, of sums "
            f"{pr.ratio_of_sums:.3f})")
        return pr

    pairs = [paired(pair_loops("hand loop (calibration)", HandLoop(bcfg, ds.x, ds.y, batch),
                               HandLoop(bcfg, ds.x, ds.y, batch, seed=1), n, w)),
             paired(pair_fewstep(spec, HandLoop(bcfg, ds.x, ds.y, batch), ds.x, ds.y, n, w, batch,
                                 work / "train_paired"))]
    ratio, cpu_ratio = median([rd.ratio for rd in rounds]), median([rd.cpu_ratio for rd in rounds])
    params = sum(p.numel() for p in TeacherMethod(spec).denoiser.net.parameters())
    res = TrainResult(
        batch, prof.train_steps, prof.train_warmup, params, rounds,
        median([rd.hand_steps_s for rd in rounds]), median([rd.fewstep_steps_s for rd in rounds]), ratio, cpu_ratio,
        1e3 * median([1 / rd.fewstep_steps_s - 1 / rd.hand_steps_s for rd in rounds]),
        1e3 * median([1 / rd.fewstep_cpu_steps_s - 1 / rd.hand_cpu_steps_s for rd in rounds]),
        ratio >= TRAIN_TARGET, cpu_ratio >= TRAIN_TARGET, pairs)
    if breakdown or (breakdown is None and not (res.meets_target and pairs[1].ratio >= TRAIN_TARGET)):
        log("timing what the fewstep loop adds per step")
        res.breakdown = overhead_breakdown(spec, ds.x, ds.y, batch)
        res.savings = possible_savings(spec)
    if breakdown:  # controls: the hand loop plus fewstep's extra work, without and with the fused optimizer
        res.paired.append(paired(pair_loops("hand + fewstep's extras (batch_indices, clip, EMA)",
                                            HandLoop(bcfg, ds.x, ds.y, batch),
                                            HandLoop(bcfg, ds.x, ds.y, batch, extras=True), n, w)))
        res.paired.append(paired(pair_loops("hand + extras + AdamW(fused=True)", HandLoop(bcfg, ds.x, ds.y, batch),
                                            HandLoop(bcfg, ds.x, ds.y, batch, extras=True, fused=True), n, w)))
    return res


# --- processes -------------------------------------------------------------------------------------------
PROCS_CHILD = "--procs-child"  # hidden first argument: this script as one process of a measured training run


def procs_command(processes: int, args: list[str]) -> list[str]:
    """The command line running this script's child with ``args`` in ``processes`` processes: plain python for 1
    (what ``fewstep train`` is), ``torchrun --nproc_per_node N --standalone`` otherwise (``accelerate launch --cpu
    --num_processes 2`` starts one process with accelerate 1.15)."""
    script = [str(Path(__file__).resolve()), PROCS_CHILD, *args]
    if processes == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone",
            *script]


def run_procs(processes: int, steps: int, warmup: int, batch: int, work: Path, threads: int = 1,
              round_: int = 0, timeout: float = 900) -> ProcRun:
    """One training run of the tiny8 teacher in ``processes`` processes on the CPU (each with ``threads`` torch
    threads), ``batch`` the global batch; every process writes its timing to ``work/rank<r>.json``."""
    work.mkdir(parents=True, exist_ok=False)
    cmd = procs_command(processes, ["--out", str(work), "--processes", str(processes), "--steps", str(steps),
                                    "--warmup", str(warmup), "--batch", str(batch), "--threads", str(threads)])
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        tail = (proc.stdout + proc.stderr).strip()[-6000:]
        raise RuntimeError(f"{processes}-process training run failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"{tail}")
    recs = sorted((json.loads(f.read_text()) for f in work.glob("rank*.json")), key=lambda r: r["rank"])
    if [r["rank"] for r in recs] != list(range(processes)) or any(r["world"] != processes for r in recs):
        raise RuntimeError(f"{processes}-process run reported ranks {[(r['rank'], r['world']) for r in recs]}")
    head = recs[0]
    return ProcRun(round_, processes, batch, head["steps_s"], head["steps_s"] * batch,
                   sum(1e3 / r["cpu_steps_s"] for r in recs), [r["steps_s"] for r in recs],
                   head.get("allreduce_scalar_ms", 0.0), head.get("allreduce_grads_ms", 0.0), seconds)


def _allreduce_ms(t: torch.Tensor, reps: int = 30, warm: int = 3) -> float:
    import torch.distributed as dist

    ts = []
    for k in range(warm + reps):
        dist.barrier()
        a = time.perf_counter()
        dist.all_reduce(t)
        if k >= warm:
            ts.append(time.perf_counter() - a)
    return 1e3 * median(ts)


def procs_child(argv: list[str]) -> None:
    """One process of a measured run (started by :func:`run_procs`): the same ``train`` as the training section."""
    ap = argparse.ArgumentParser(prog=f"speed.py {PROCS_CHILD}")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--processes", type=int, required=True, help="the world size this run must have")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True, help="the global batch")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec, _, ds = _teacher_spec()
    torch.manual_seed(0)
    method = _TimedTeacher(spec)
    with quiet():
        train(method, (ds.x, ds.y), _train_config(args.warmup + args.steps, args.batch), args.out / "run")
    import torch.distributed as dist

    dist_on = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist_on else (1, 0)
    if world != args.processes:
        raise SystemExit(f"this run has {world} process(es), {args.processes} were asked for")
    wall, cpu = _rates(method.ends, args.warmup)
    rec: dict[str, Any] = {"rank": rank, "world": world, "threads": torch.get_num_threads(), "steps_s": wall,
                           "cpu_steps_s": cpu, "steps": len(method.ends)}
    if world > 1:
        n_params = sum(p.numel() for p in method.denoiser.net.parameters())
        rec["allreduce_scalar_ms"] = _allreduce_ms(torch.zeros(()))
        rec["allreduce_grads_ms"] = _allreduce_ms(torch.zeros(n_params))
    (args.out / f"rank{rank}.json").write_text(json.dumps(rec) + "\n")
    if dist_on:  # leave together: a process that exits while its peer still reads the last all-reduce aborts it
        dist.barrier()
        dist.destroy_process_group()


def bench_procs(prof: Profile, batch: int, work: Path, log: Callable[[str], None], threads: int = 1) -> ProcsResult:
    """Rounds of three runs: 1 process and 2 processes at the global ``batch``, and 1 process at half of it (the
    work of one of the 2 processes, without communication); who goes first rotates each round."""
    if batch % 2:
        raise SystemExit(f"--batch {batch}: the 2-process run splits the global batch in two, use an even batch")
    kinds = [(1, batch), (2, batch), (1, batch // 2)]
    runs: list[ProcRun] = []
    for r in range(prof.procs_rounds):
        for k, b in kinds[r % 3:] + kinds[:r % 3]:
            run = run_procs(k, prof.procs_steps, prof.procs_warmup, b, work / f"procs_round{r}_{k}x{b}", threads, r)
            runs.append(run)
            extra = (f"; all-reduce of 1 float {run.allreduce_scalar_ms:.2f} ms, of the gradients "
                     f"{run.allreduce_grads_ms:.1f} ms" if k > 1 else "")
            log(f"processes round {r + 1}/{prof.procs_rounds}: {k} process(es) x {threads} thread(s), global batch "
                f"{b}: {run.steps_s:.2f} steps/s, {run.samples_s:.0f} samples/s, {run.cpu_ms_per_step:.0f} CPU "
                f"ms/step (all processes){extra}; {run.run_seconds:.0f} s with start-up")
    one = {x.round: x for x in runs if x.processes == 1 and x.batch == batch}
    two = {x.round: x for x in runs if x.processes == 2}
    half = {x.round: x for x in runs if x.processes == 1 and x.batch != batch}
    return ProcsResult(batch, prof.procs_steps, prof.procs_warmup, threads, os.cpu_count() or 0, runs,
                       median([x.steps_s for x in one.values()]), median([x.steps_s for x in two.values()]),
                       median([x.steps_s for x in half.values()]),
                       median([two[r].steps_s / one[r].steps_s for r in one]),
                       median([two[r].cpu_ms_per_step / one[r].cpu_ms_per_step for r in one]),
                       median([half[r].steps_s / one[r].steps_s for r in one]))


def _time_ms(fn: Callable[[], Any], reps: int = 30, warm: int = 3) -> float:
    """Median CPU milliseconds of this process per call (robust to other jobs at 1 thread)."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return 1e3 * median(ts)


def overhead_breakdown(spec: TeacherSpec, x: torch.Tensor, y: torch.Tensor, batch: int) -> list[Component]:
    """Time, one at a time on the same network, each per-step piece of the fewstep loop the hand loop lacks."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from rich.progress import Progress

    from fewstep.training.ema import EMA
    from fewstep.training.loop import _sync, batch_indices, lr_factor
    from fewstep.training.method import StepContext, loss_value

    torch.manual_seed(0)
    method = TeacherMethod(spec)
    net = method.denoiser.net
    acc = Accelerator(mixed_precision="no")
    loss_fn = method.phases()[0].loss
    gen = torch.Generator().manual_seed(0)
    n = x.shape[0]
    xb, yb = x[:batch], y[:batch]
    loss_fn((xb, yb), StepContext(0, gen)).mean().backward()  # populate .grad
    params = list(net.parameters())  # the loop's phase parameters, listed once before the loop
    ema = EMA(net, 0.999)
    base = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    empty = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # no grads: step() is bookkeeping only
    wrapped = acc.prepare_optimizer(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]))
    step = [0]

    def draw() -> None:
        step[0] += 1
        i = batch_indices(step[0], n, batch, 0)
        _ = x[i], y[i]

    def hand_draw() -> None:
        i = torch.randint(0, n, (batch,))
        _ = x[i], y[i]

    ddpm = DDPMScheduler(num_train_timesteps=1000)

    def hand_loss() -> None:
        noise = torch.randn_like(xb)
        t = torch.randint(0, 1000, (batch,))
        F.mse_loss(ddpm.add_noise(xb, noise, t), noise)

    class _Identity(torch.nn.Module):
        def forward(self, a: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
            return a

    def set_lr() -> None:  # what the loop does instead of an LR scheduler
        step[0] += 1
        factor = lr_factor(step[0], 100, 10_000)
        for g in base.param_groups:
            g["lr"] = 1e-3 * factor

    def contexts() -> None:  # per step and micro-batch: the context managers around the loss, and its bookkeeping
        ctx = [StepContext(step[0], gen, 0)]
        with _sync([], last=True), acc.autocast():
            per_sample, extra = loss_value(xb[:, 0, 0, 0])
            loss = per_sample.float().mean() / 1
        total = float(loss.detach())
        del ctx, extra, total

    method.denoiser.net = _Identity()  # fewstep's loss around the network, the network replaced by the identity
    fs_loss = _time_ms(lambda: loss_fn((xb, yb), StepContext(0, gen)).float().mean())
    method.denoiser.net = net
    progress = Progress(disable=True)
    task = progress.add_task("x", total=10**9)

    return [
        Component("EMA.update", _time_ms(lambda: ema.update(net)), "foreach lerp over all parameters + buffers"),
        Component("clip_grad_norm_", _time_ms(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)), "grad_clip=1.0"),
        Component("batch_indices", _time_ms(draw) - _time_ms(hand_draw),
                  "seeded epoch permutation + 64-iteration Python loop, minus randint + index"),
        Component("AcceleratedOptimizer.step wrapper", _time_ms(wrapped.step, 100) - _time_ms(empty.step, 100),
                  "accelerate's per-step checks (is_lomo_available -> importlib find_spec, twice)"),
        Component("learning rate set per param group", _time_ms(set_lr, 100), "warm-up + cosine of the global step"),
        Component("regression_loss outside the network", fs_loss - _time_ms(hand_loss),
                  "StepContext, float64 sigma, timestep lookup, label dropout; minus hand add_noise + MSE"),
        Component("sync + autocast contexts, loss bookkeeping", _time_ms(contexts, 100),
                  "_sync, accelerate autocast (off), loss_value, mean, float(loss): per micro-batch"),
        Component("rich Progress.update (disabled)", _time_ms(lambda: progress.update(task, advance=1), 100)),
    ]


def possible_savings(spec: TeacherSpec) -> list[Component]:
    """Per-step savings the fewstep loop takes over the hand loop, measured on the same network (CPU ms, median)."""
    torch.manual_seed(0)
    net = TeacherMethod(spec).denoiser.net
    for q in net.parameters():
        q.grad = torch.randn_like(q)
    adam = {kind: torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0, **kw)
            for kind, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True}))}
    ms = {kind: _time_ms(o.step, 20) for kind, o in adam.items()}
    return [
        Component("AdamW(fused=True) instead of the default for-loop", ms["default"] - ms["fused"],
                  f"AdamW.step {ms['default']:.2f} -> {ms['fused']:.2f} ms (foreach=True: {ms['foreach']:.2f}); the "
                  "loop takes it (fused where supported), the hand loop does not"),
    ]


def profile_train(spec: TeacherSpec, data: tuple[torch.Tensor, torch.Tensor | None], steps: int, batch: int,
                  out: Path, top: int = 30) -> str:
    """cProfile of one fewstep training run, sorted by own time, for ``--profile``."""
    prof = cProfile.Profile()
    method = _TimedTeacher(spec)
    cfg = TrainConfig(steps=steps, batch=batch, lr=1e-3, ckpt_every=10**9, progress=False)
    prof.enable()
    train(method, data, cfg, out)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# --- sampling ----------------------------------------------------------------------------------------------
def build_model(work: Path) -> LoadedModel:
    """An untrained tiny8 class-conditional DDPM teacher saved as a fewstep folder (weights do not change speed)."""
    spec, _, _ = _teacher_spec()
    torch.manual_seed(0)
    method = TeacherMethod(spec)
    save_model(work / "teacher", method.config, method.denoiser.net)
    return load_model(work / "teacher")


def diffusers_scheduler(name: str, model: LoadedModel) -> Any:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    process = model.config.vp_process()
    if process is None or not isinstance(model.denoiser.net, UNetBackbone):
        raise SystemExit("the diffusers baseline needs a UNet2DModel on a discrete VP schedule (eps, v or x0)")
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp-2m": DPMSolverMultistepScheduler}[name]
    # DPMSolverMultistep defaults: dpmsolver++, order 2, lower_order_final, final sigma 0 (= fewstep's dpmpp-2m)
    return cls.from_config(process.to_diffusers())  # timestep_spacing="trailing", fewstep's default


@torch.no_grad()
def diffusers_loop(unet: Any, sched: Any, steps: int, noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(x, t), t, class_labels=labels).sample
        x = sched.step(eps, t, x).prev_sample
    return x


@torch.no_grad()
def fewstep_sampler_fn(model: LoadedModel, name: str, steps: int, noise: torch.Tensor,
                       labels: torch.Tensor | None) -> torch.Tensor:
    den = model.denoiser
    sigmas = den.schedule.sampling_sigmas(spaced_timesteps(steps, den.schedule.num_train_timesteps, "trailing"))
    opts = SamplerOptions(clip_x0=model.config.x0_clip(), ddpm_variance=model.config.ddpm_variance())
    return SAMPLERS[name].fn(den, noise, sigmas, labels, opts)


class _StubNet(torch.nn.Module):
    """Stands in for the UNet so that only the code around it is timed (one cheap op, like any network's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # generate() reads the device from a parameter

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> Any:
        return 0.1 * x


def _stub_unet(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> Any:
    return SimpleNamespace(sample=0.1 * x)


def outside_network_ms(model: LoadedModel, name: str, steps: int, noise: torch.Tensor,
                       labels: torch.Tensor | None, reps: int = 15) -> dict[str, float]:
    """CPU ms per step each contestant spends outside the network, with the network replaced by a stub."""
    den = model.denoiser
    stub = replace(model, denoiser=Denoiser(_StubNet(), den.schedule, den.prediction, den.num_classes,
                                            den.null_class).eval())
    timesteps = [float(t) for t in spaced_timesteps(steps, den.schedule.num_train_timesteps, "trailing")]
    sched = diffusers_scheduler(name, model)
    runs = {"diffusers": partial(diffusers_loop, _stub_unet, sched, steps, noise, labels),
            "generate": partial(generate, stub, name, timesteps, noise.shape[0], labels=labels,
                                batch_size=noise.shape[0]),
            "sampler_fn": partial(fewstep_sampler_fn, stub, name, steps, noise, labels)}
    return {who: _time_ms(fn, reps) / SAMPLERS[name].nfe(steps) for who, fn in runs.items()}


def bench_sampling(model: LoadedModel, prof: Profile, n: int, log: Callable[[str], None]) -> list[SampleRow]:
    unet = model.denoiser.net.unet  # type: ignore[union-attr]
    labels = class_labels(model, n, None)
    noise = torch.randn((n, *model.sample_shape), generator=torch.Generator().manual_seed(0))
    T = model.denoiser.schedule.num_train_timesteps
    rows = []
    for steps in prof.sample_steps:
        timesteps = [float(t) for t in spaced_timesteps(steps, T, "trailing")]
        for name in SAMPLER_NAMES:
            sched = diffusers_scheduler(name, model)
            runs: dict[str, Callable[[], Any]] = {
                "diffusers": partial(diffusers_loop, unet, sched, steps, noise, labels),
                "generate": partial(generate, model, name, timesteps, n, labels=labels, batch_size=n),
                "sampler_fn": partial(fewstep_sampler_fn, model, name, steps, noise, labels),
            }
            # untimed warm-up, which is also the parity check (same noise, labels and timesteps)
            ref, ours = runs["diffusers"](), runs["sampler_fn"]()
            rel = float((ours - ref).abs().max() / ref.abs().max())
            nfe = SAMPLERS[name].nfe(steps)
            per: list[dict[str, float]] = []
            names = list(runs)
            for r in range(prof.sample_rounds):
                t: dict[str, float] = {}
                for who in names[r % 3:] + names[:r % 3]:  # rotate who goes first
                    a = now()
                    runs[who]()
                    b = now()
                    t[who], t[f"{who}_cpu"] = (b.wall - a.wall) / nfe, (b.cpu - a.cpu) / nfe
                per.append(t)

            def med(key: str, per: list[dict[str, float]] = per) -> float:
                return median([p[key] for p in per])

            def ratio(key: str, per: list[dict[str, float]] = per) -> float:
                base = "diffusers_cpu" if key.endswith("_cpu") else "diffusers"
                return median([p[key] / p[base] for p in per])

            row = SampleRow(name, steps, nfe, n, med("diffusers"), med("generate"), med("sampler_fn"),
                            med("diffusers_cpu"), med("generate_cpu"), med("sampler_fn_cpu"), ratio("generate"),
                            ratio("sampler_fn"), ratio("generate_cpu"), ratio("sampler_fn_cpu"), rel, rounds=per)
            best = {k: min(p[k] for p in per) for k in names}
            row.generate_min_ratio = best["generate"] / best["diffusers"]
            row.sampler_fn_min_ratio = best["sampler_fn"] / best["diffusers"]
            row.diffusers_outside_ms, row.generate_outside_ms, row.sampler_fn_outside_ms = \
                outside_network_ms(model, name, steps, noise, labels).values()
            rows.append(row)
            log(f"sampling {name} {steps} steps: diffusers {1e3 * row.diffusers_s_per_nfe:.1f} ms/NFE; generate "
                f"{1e3 * row.generate_s_per_nfe:.1f} (ratio {row.generate_ratio:.3f}, CPU {row.generate_cpu_ratio:.3f})"
                f"; sampler fn {1e3 * row.sampler_fn_s_per_nfe:.1f} (ratio {row.sampler_fn_ratio:.3f}, CPU "
                f"{row.sampler_fn_cpu_ratio:.3f}); rel. diff {rel:.1e}; outside the network "
                f"{row.diffusers_outside_ms:.2f} / {row.generate_outside_ms:.2f} / {row.sampler_fn_outside_ms:.2f} "
                "ms/step (diffusers / generate / sampler fn)")
    return rows


# --- output ------------------------------------------------------------------------------------------------
Table = tuple[str, list[str], list[list[str]]]  # title, columns, rows


def _verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def _tables(rep: Report) -> list[Table]:
    out: list[Table] = []
    if rep.train is not None:
        tr = rep.train
        rows = [[f"{i + 1}", rd.order, f"{rd.hand_steps_s:.2f}", f"{rd.fewstep_steps_s:.2f}", f"{rd.ratio:.3f}",
                 f"{rd.cpu_ratio:.3f}"] for i, rd in enumerate(tr.rounds)]
        rows.append(["median", "", f"{tr.hand_steps_s:.2f}", f"{tr.fewstep_steps_s:.2f}", f"{tr.ratio:.3f}",
                     f"{tr.cpu_ratio:.3f}"])
        rows.append(["", "", "", "", _verdict(tr.meets_target), _verdict(tr.meets_target_cpu)])
        if len(tr.paired) > 1:
            it = tr.paired[1]
            rows.append(["step by step", f"{it.steps} steps", f"{1e3 / it.hand_ms:.2f}",
                         f"{1e3 / it.contestant_ms:.2f}", f"{it.ratio:.3f}", f"{it.cpu_ratio:.3f}"])
            rows.append(["", "", "", "", _verdict(it.ratio >= TRAIN_TARGET), _verdict(it.cpu_ratio >= TRAIN_TARGET)])
        extra = ""
        if len(tr.paired) > 1:
            it = tr.paired[1]
            extra = (f"; step by step (medians of per-step times) {it.contestant_ms - it.hand_ms:+.1f} ms wall, "
                     f"{it.contestant_cpu_ms - it.hand_cpu_ms:+.1f} ms CPU")
        out.append((f"Training throughput: fewstep train vs a hand loop; tiny8 UNet2DModel ({tr.params / 1e6:.2f} M "
                    f"params), digits 8x8 class-conditional, batch {tr.batch}, {tr.timed_steps} timed steps after "
                    f"{tr.warmup_steps} warm-up per run. fewstep/hand >= {TRAIN_TARGET} is the target. fewstep's "
                    f"extra time per step: rounds {tr.overhead_ms_per_step:+.1f} ms wall, "
                    f"{tr.cpu_overhead_ms_per_step:+.1f} ms CPU{extra}",
                    ["round", "order", "hand steps/s", "fewstep steps/s", "fewstep/hand", "CPU-time ratio"], rows))
        if tr.paired:
            out.append(("Step by step: the hand loop and a contestant alternating steps under the same load "
                        "(medians of per-step times; ratio = contestant steps/s over hand steps/s)",
                        ["contestant", "steps", "hand ms", "contestant ms", "ratio", "CPU ratio", "ratio of sums"],
                        [[pr.contestant, str(pr.steps), f"{pr.hand_ms:.1f}", f"{pr.contestant_ms:.1f}",
                          f"{pr.ratio:.3f}", f"{pr.cpu_ratio:.3f}", f"{pr.ratio_of_sums:.3f}"] for pr in tr.paired]))
        if tr.breakdown:
            total = sum(c.ms_per_step for c in tr.breakdown)
            rows = [[c.name, f"{c.ms_per_step:.2f}", c.note] for c in tr.breakdown]
            hand_cpu_ms = 1e3 / median([rd.hand_cpu_steps_s for rd in tr.rounds])
            rows.append(["sum", f"{total:.2f}", f"{100 * total / hand_cpu_ms:.1f}% of a hand step "
                         f"({hand_cpu_ms:.0f} CPU ms)"])
            rows += [[f"saving: {c.name}", f"{-c.ms_per_step:.2f}", c.note] for c in tr.savings]
            out.append(("What the fewstep loop does per step beyond the hand loop, each timed alone (CPU ms, median)",
                        ["component", "ms/step", "note"], rows))
    if rep.procs is not None:
        pr = rep.procs
        rows = []
        for x in pr.runs:
            base = next(o for o in pr.runs if o.round == x.round and o.processes == 1 and o.batch == pr.batch)
            rows.append([str(x.round + 1), str(x.processes), str(x.batch), str(x.batch // x.processes),
                         f"{x.steps_s:.2f}", f"{x.samples_s:.0f}", f"{x.cpu_ms_per_step:.0f}",
                         f"{x.steps_s / base.steps_s:.2f}" if x is not base else ""])
        half = pr.batch // 2
        rows += [["median", "1", str(pr.batch), str(pr.batch), f"{pr.one_steps_s:.2f}",
                  f"{pr.one_steps_s * pr.batch:.0f}", "", ""],
                 ["median", "2", str(pr.batch), str(half), f"{pr.two_steps_s:.2f}", f"{pr.two_steps_s * pr.batch:.0f}",
                  "", f"{pr.ratio:.2f}"],
                 ["median", "1", str(half), str(half), f"{pr.half_steps_s:.2f}", f"{pr.half_steps_s * half:.0f}", "",
                  f"{pr.ideal_ratio:.2f}"]]
        two = [x for x in pr.runs if x.processes > 1]
        comm = (f" Between the 2 processes an all-reduce of the gradients (one tensor) took "
                f"{median([x.allreduce_grads_ms for x in two]):.1f} ms and of one float (the loop's per-step "
                f"non-finite check) {median([x.allreduce_scalar_ms for x in two]):.2f} ms (medians).") if two else ""
        out.append((f"Processes: the same fewstep train run (tiny8, digits, global batch {pr.batch}, {pr.timed_steps} "
                    f"timed steps after {pr.warmup_steps} warm-up) in 1 process x {pr.threads} torch thread (python) "
                    f"and in 2 processes x {pr.threads} thread each (torchrun, DDP over gloo, half the batch each) "
                    f"on this {pr.cpus}-CPU machine. 2-process / 1-process steps/s: {pr.ratio:.2f} (median of "
                    f"per-round ratios; a figure, not a target: 2.00 would be perfect use of a second core); CPU "
                    f"per step, both processes together / one: {pr.cpu_ratio:.2f}. The third run, 1 process at "
                    f"batch {half} (one process's share, no communication), bounds what 2 processes can reach: "
                    f"{pr.ideal_ratio:.2f}.{comm}",
                    ["round", "processes", "global batch", "batch/process", "steps/s", "samples/s",
                     "CPU ms/step (all)", "steps/s vs 1 process"], rows))
    if rep.sampling:
        rows = [[s.sampler, str(s.steps), str(s.nfe), str(s.n), f"{1e3 * s.diffusers_s_per_nfe:.1f}",
                 f"{1e3 * s.generate_s_per_nfe:.1f}", f"{s.generate_ratio:.3f}", f"{s.generate_min_ratio:.3f}",
                 f"{1e3 * s.sampler_fn_s_per_nfe:.1f}", f"{s.sampler_fn_ratio:.3f}", f"{s.sampler_fn_min_ratio:.3f}",
                 f"{s.rel_diff:.1e}"] for s in rep.sampling]
        n_rounds = len(rep.sampling[0].rounds)
        out.append((f"Sampling: wall ms per NFE for the whole batch (median of {n_rounds} rounds); ratio = fewstep / "
                    f"diffusers time, median of the per-round ratios (target <= {SAMPLE_TARGET}); min = ratio of the "
                    "fastest rounds; rel. diff = max|fewstep - diffusers| / max|diffusers| from the same noise",
                    ["sampler", "steps", "NFE", "batch", "diffusers ms", "generate ms", "ratio", "min",
                     "sampler fn ms", "ratio", "min", "rel. diff"], rows))
        rows = [[s.sampler, str(s.steps), f"{s.diffusers_outside_ms:.2f}", f"{s.generate_outside_ms:.2f}",
                 f"{s.sampler_fn_outside_ms:.2f}",
                 f"{100 * (s.generate_outside_ms - s.diffusers_outside_ms) / (1e3 * s.diffusers_s_per_nfe):+.2f}%",
                 f"{100 * (s.sampler_fn_outside_ms - s.diffusers_outside_ms) / (1e3 * s.diffusers_s_per_nfe):+.2f}%"]
                for s in rep.sampling]
        out.append(("Sampling loops' own cost: CPU ms per step outside the network (UNet replaced by a stub, median); "
                    "the last columns are fewstep's extra as a share of a diffusers step with the real UNet",
                    ["sampler", "steps", "diffusers", "generate", "sampler fn", "generate extra", "sampler fn extra"],
                    rows))
    return out


def print_report(rep: Report, plain: bool) -> None:
    head = (f"fewstep speed ({rep.profile}): torch {rep.env['torch']}, diffusers {rep.env['diffusers']}, "
            f"{rep.env['threads']} torch thread(s), {rep.env['cpus']} CPUs; load average "
            f"{rep.load_before[0]:.2f} before, {rep.load_after[0]:.2f} after; {rep.wall_seconds:.0f} s")
    tables = _tables(rep)
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table as RichTable
            from rich.text import Text
        except ImportError:
            plain = True
    if plain:
        print(head)
        for title, cols, rows in tables:
            widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
            print(f"\n{title}")
            print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
            for r in rows:
                print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        return
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(head, highlight=False)
    for title, cols, rows in tables:
        table = RichTable(title=title, title_justify="left")
        for c in cols:
            left = ("round", "order", "sampler", "component", "note", "contestant", "processes")
            table.add_column(c, justify="left" if c in left else "right")
        for r in rows:
            table.add_row(*(Text(v) for v in r))  # Text: no markup parsing of "[...]" in notes
        console.print(table)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """diffusers' chatter (config keys a scheduler ignores) and warnings off for the run."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            dlog.set_verbosity(level)


def main(argv: list[str] | None = None) -> Report:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds (about 1.5 minutes)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    ap.add_argument("--model", type=Path, metavar="DIR", help="model folder to sample (default: an untrained tiny8 "
                    "class-conditional teacher built in a temporary folder)")
    ap.add_argument("--n", type=int, default=256, help="samples per batch for the sampling benchmark")
    ap.add_argument("--batch", type=int, default=64, help="training batch size")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: on a shared 2-core "
                    "machine 2 OpenMP threads per process can stall 10-100x when other jobs run)")
    ap.add_argument("--only", choices=("train", "procs", "sample"), help="run one part only: train (the training "
                    "half: fewstep vs the hand loop, then 1 vs 2 processes), procs (1 vs 2 processes only) or sample")
    ap.add_argument("--breakdown", action="store_true", help="time what the fewstep loop adds per step in --quick too "
                    "(the full profile always does, --quick when the target is missed)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile (by own time) of one fewstep run")
    ap.add_argument("--plain", action="store_true", help="plain-text table instead of rich")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    prof = QUICK if args.quick else FULL
    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine()}
    load_before = loadavg()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    log(f"profile {prof.name}; load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    t0 = time.perf_counter()
    with quiet(), tempfile.TemporaryDirectory(prefix="fewstep-speed-") as tmp:
        work = Path(tmp)
        train_res = None
        if args.only in (None, "train"):
            breakdown = True if args.breakdown or not args.quick else None  # None: only when the target is missed
            train_res = bench_train(prof, args.batch, work, log, breakdown=breakdown)
            if args.profile:
                spec, _, ds = _teacher_spec()
                print(profile_train(spec, (ds.x, ds.y), prof.train_warmup + prof.train_steps, args.batch,
                                    work / "profile"))
        procs_res = None
        if args.only in (None, "train", "procs"):
            procs_res = bench_procs(prof, args.batch, work, log, args.threads)
        rows: list[SampleRow] = []
        if args.only in (None, "sample"):
            model = load_model(args.model) if args.model else build_model(work)
            rows = bench_sampling(model, prof, args.n, log)
    rep = Report(prof.name, " ".join([Path(sys.executable).name, *sys.argv]), env, load_before, loadavg(),
                 time.perf_counter() - t0, train_res, rows, procs_res)
    print_report(rep, args.plain)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(rep), indent=2) + "\n")
        log(f"wrote {args.json}")
    return rep


if __name__ == "__main__":
    if sys.argv[1:2] == [PROCS_CHILD]:
        procs_child(sys.argv[2:])
    else:
        main()
