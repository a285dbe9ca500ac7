"""The one training loop, shared by teacher objectives and every later method.

Setup: every network the method declares goes to the accelerator's device (frozen ones in eval mode with
gradients off, denoisers with their schedule tables); trained modules are prepared by accelerate (DDP in a
multi-process run); each phase gets its own AdamW with the phase's settings.

Per step: the global batch (a pure function of seed and step, so resume is exact; each process takes its
slice), the method's ``before_step(step, gen)``, then each due phase: only its parameters require gradients,
its loss runs under autocast per micro-batch (gradients synchronized by DDP on the last one), gradients are
clipped, the learning rate is set from the *global* step (warm-up then cosine) and the optimizer steps.  Then
the EMA update and the method's ``after_step``.  Every ``ckpt_every`` steps an atomic checkpoint (weights of
the trained and state modules, EMA, optimizers, every process's RNG state, the grad scaler, step) and the
exported model folder.

Crashes and resume: a checkpoint is complete once ``checkpoints/latest`` names it (written last, atomically).  A
resumed run first validates everything it will read (the pointer, ``state.json`` against :class:`CheckpointState`,
the weights, the optimizer and RNG state, ``metrics.jsonl``) and only then touches the folder: it removes what a
killed process left (temporary files, step folders newer than the pointer, a partial last line of the metrics log).
A run killed before its first complete checkpoint starts again from step 0 with ``resume``.  A full disk is one
line naming the folder; the last complete checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors import SafetensorError
from torch import nn

from fewstep.errors import FewstepError
from fewstep.io import (
    is_orphan,
    load_tensors,
    load_torch_state,
    read_json,
    remove_orphans,
    save_tensors,
    save_torch_state,
    write_failure,
    write_json,
    write_text,
)
from fewstep.schema import Finite, NonNegInt, PosInt, Strict, check
from fewstep.training.ema import EMA
from fewstep.training.method import Batch, Method, Networks, StepContext, loss_value
from fewstep.training.processes import expected_processes, use_cpu
from fewstep.training.trackers import PROJECT, check_tracker, tracker_kwargs

MIXED_PRECISION = ("no", "fp16", "bf16")
QualityFn = Callable[[Path, int], dict[str, float]]  # (a model folder, the step) -> figures to log (train's `quality`)


@dataclass
class TrainConfig:
    steps: int = 2000
    batch: int = 64  # the global batch: every process takes batch / processes, split in grad_accum micro-batches
    lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    grad_accum: int = 1
    ckpt_every: int = 500
    log_every: int = 25
    seed: int = 0
    mixed_precision: str = "no"  # "no", "fp16", "bf16" (through accelerate)
    progress: bool = True
    hflip: bool = False  # random horizontal flips of image batches (a function of seed and step: resume is exact)
    log_with: str | None = None  # also log the metrics to accelerate's "tensorboard" or "wandb" tracker (trackers.py)
    eval_every: int | None = None  # call train()'s `quality` every N steps (and at the end) and log what it returns


@dataclass
class TrainResult:
    out: Path
    steps: int
    wall_seconds: float
    final_loss: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at ``step``: epochs are seeded permutations of ``range(n)``."""
    pos = torch.arange(step * batch, (step + 1) * batch)
    epoch, offset = pos // n, pos % n
    out = torch.empty(batch, dtype=torch.long)
    for e in epoch.unique().tolist():  # a batch spans at most a few epochs
        perm = _epoch_permutation(n, seed, e)
        mask = epoch == e
        out[mask] = perm[offset[mask]]
    return out


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """One epoch's order (cached: drawing a permutation of millions of images every step would cost more than
    the step on small networks)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def flip_mask(step: int, batch: int, seed: int) -> torch.Tensor:
    """Which samples of the global batch at ``step`` are flipped (``hflip``): a function of seed and step only,
    so a resumed run flips the same images, whatever the process count."""
    return torch.rand(batch, generator=torch.Generator().manual_seed(seed * 1_000_003 + step + 17)) < 0.5


class _StepBatches:
    """The local index batches of steps ``start..steps-1`` (the sampler of a lazy data set's DataLoader)."""

    def __init__(self, start: int, cfg: TrainConfig, n: int, rank: int, local: int):
        self.start, self.cfg, self.n, self.rank, self.local = start, cfg, n, rank, local

    def __iter__(self) -> Iterator[Any]:
        for step in range(self.start, self.cfg.steps):
            idx = batch_indices(step, self.n, self.cfg.batch, self.cfg.seed)
            yield idx[self.rank * self.local:(self.rank + 1) * self.local].numpy()

    def __len__(self) -> int:
        return max(0, self.cfg.steps - self.start)


def _adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float, betas: tuple[float, float],
           eps: float) -> torch.optim.Optimizer:
    """AdamW, fused where this torch and device support it (on CPU ~6 ms/step less for a 1 M-parameter UNet)."""
    kw = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 0 at ``total``, as a function of the global step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


STEP_FOLDER = re.compile(r"step_\d{8}")
DAMAGED = "restore it from a copy, or start the run again in a new --out"


class _Checkpoints:
    """``out/checkpoints/step_N/`` folders and a ``latest`` pointer written last (atomically): a checkpoint is
    complete once ``latest`` names it."""

    def __init__(self, out: Path, keep: int = 2):
        self.root, self.keep = out / "checkpoints", keep

    def latest(self) -> Path | None:
        """The last complete checkpoint, None when there is none yet; a damaged pointer is one line."""
        ptr = self.root / "latest"
        if not ptr.exists() and not ptr.is_symlink():
            return None
        try:
            name = ptr.read_bytes().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise FewstepError(f"checkpoint pointer {ptr} cannot be read ({e.__class__.__name__}): write the name of "
                               "a complete step_NNNNNNNN folder into it, or start the run again in a new --out"
                               ) from None
        if not STEP_FOLDER.fullmatch(name):
            raise FewstepError(f"checkpoint pointer {ptr} holds {name[:40]!r}, not a step_NNNNNNNN folder name: "
                               "write the name of a complete checkpoint folder into it, or start the run again in a "
                               "new --out")
        path = self.root / name
        if not path.is_dir():
            raise FewstepError(f"checkpoint {path} named by {ptr} is missing: the run cannot resume ({DAMAGED})")
        return path

    def commit(self, step: int) -> Path:
        path = self.root / f"step_{step:08d}"
        write_text(self.root / "latest", path.name)
        older = [p for p in sorted(self.root.glob("step_*")) if p.name < path.name]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def uncommitted(self, latest: Path | None) -> list[Path]:
        """Step folders a killed run wrote after its last complete checkpoint (never named by ``latest``)."""
        if not self.root.is_dir():
            return []
        return [p for p in sorted(self.root.glob("step_*"))
                if p.is_dir() and (latest is None or p.name > latest.name)]


# --- the checkpoint's state.json, as a typed record ------------------------------------------------------------
class LoopState(Strict):
    """:class:`TrainConfig` as a checkpoint records it (fields added later have defaults: older runs resume)."""

    steps: PosInt
    batch: PosInt
    lr: Finite = Field(gt=0)
    warmup: NonNegInt
    weight_decay: Finite = Field(ge=0)
    grad_clip: Finite = Field(ge=0)
    ema_decay: Finite = Field(ge=0, le=1)
    grad_accum: PosInt = 1
    ckpt_every: PosInt
    log_every: PosInt = 25
    seed: int
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    progress: bool = True
    hflip: bool = False
    log_with: str | None = None
    eval_every: PosInt | None = None


class CheckpointState(Strict):
    """``checkpoints/step_N/state.json``: where the run was, and the loop settings it resumes with."""

    step: NonNegInt
    elapsed: Finite = Field(ge=0)
    ema_updates: NonNegInt
    method: str
    processes: PosInt = 1
    config: LoopState


def read_state(ckpt: Path) -> CheckpointState:
    """The validated ``state.json`` of checkpoint folder ``ckpt`` (one line naming the field on any damage)."""
    where = ckpt / "state.json"
    raw = read_json(where, "checkpoint state")
    try:
        state = check(CheckpointState, raw, f"checkpoint state {where}")
    except FewstepError as e:
        raise FewstepError(f"{e}; {DAMAGED}") from None
    assert isinstance(state, CheckpointState)
    if state.step > state.config.steps:
        raise FewstepError(f"checkpoint state {where}: step = {state.step} is past config.steps = "
                           f"{state.config.steps}; {DAMAGED}")
    if ckpt.name != f"step_{state.step:08d}":
        raise FewstepError(f"checkpoint state {where}: step = {state.step} but the folder is {ckpt.name}; {DAMAGED}")
    return state


def resume_point(out: Path) -> tuple[Path, CheckpointState] | None:
    """The last complete checkpoint of the run in ``out`` and its validated state, None when there is none."""
    start = _Checkpoints(Path(out)).latest()
    return None if start is None else (start, read_state(start))


def _restartable(out: Path) -> None:
    """``out`` holds a run that stopped before its first complete checkpoint (what a kill, or a full disk, at the
    start leaves: metrics.jsonl, half-written step folders, temporary files), or nothing; else one line."""
    if not out.exists():  # killed before it made the folder: a scripted "--resume until done" must not dead-end
        return
    if not out.is_dir():
        raise FewstepError(f"--resume: {out} is a file, not a training run's folder: choose the run's folder")
    if (out / "config.json").exists() or (out / "model.safetensors").exists():
        raise FewstepError(f"--resume: {out} holds a model but no checkpoint to resume from (checkpoints/latest): "
                           "train into a new --out")
    from fewstep.training.trackers import PROJECT

    run_files = {"checkpoints", "metrics.jsonl", PROJECT, "wandb"}
    other = sorted(p.name for p in out.iterdir() if p.name not in run_files and not is_orphan(p.name))
    if other:
        raise FewstepError(f"--resume: {out} has no checkpoint to resume from and holds {other[0]!r}, which no "
                           "fewstep run writes: choose the run's folder, or train without --resume into a new --out")


def _read_metrics(path: Path, step: int) -> list[str] | None:
    """The lines of the metrics log a run resumed at ``step`` keeps (None: no log).  A partial last line (a kill
    during an append) is dropped; a bad line inside the file is one line."""
    if not path.exists():
        return None
    if not path.is_file():
        raise FewstepError(f"metrics log {path} is not a file: move it away, then resume")
    *lines, last = path.read_bytes().split(b"\n")
    kept: list[str] = []
    for i, raw in enumerate([*lines, last], 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            ok = isinstance(rec, dict) and type(rec.get("step")) is int
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if not ok:
            if i == len(lines) + 1:  # the unterminated last line: what a kill during an append leaves
                continue
            raise FewstepError(f"metrics log {path} is damaged at line {i} (not a JSON record with a step): delete "
                               "that line (or the file: it is only a log), then resume")
        if rec["step"] <= step:
            kept.append(raw.decode("utf-8").strip())
    return kept


def _fit(module: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` does not fit ``module`` (keys, shapes), or None."""
    want = module.state_dict()
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        parts = [f"{len(missing)} tensors missing, e.g. {missing[0]}" if missing else "",
                 f"{len(extra)} unexpected, e.g. {extra[0]}" if extra else ""]
        return "; ".join(p for p in parts if p)
    for k, v in want.items():
        if tuple(state[k].shape) != tuple(v.shape):
            return f"{k} has shape {tuple(state[k].shape)}, the network needs {tuple(v.shape)}"
    return None


def core(module: nn.Module) -> nn.Module:
    """The network a declared module stands for: a Denoiser's ``net``, otherwise the module itself."""
    from fewstep.models.denoiser import Denoiser

    return module.net if isinstance(module, Denoiser) else module


def _prefixed(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, m in modules.items() for k, v in core(m).state_dict().items()}


def _load_prefixed(modules: dict[str, nn.Module], state: dict[str, torch.Tensor], where: Path) -> None:
    stray = sorted(k for k in state if not any(k.startswith(name + ".") for name in modules))
    if stray:
        raise FewstepError(f"checkpoint {where} does not fit this run's networks ({len(stray)} tensors of no module "
                           f"of it, e.g. {stray[0]}); {DAMAGED}")
    for name, m in modules.items():
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        why = _fit(core(m), sub)
        try:
            if why is None:
                core(m).load_state_dict(sub, strict=True)
        except RuntimeError as e:
            why = str(e).splitlines()[0][:100]
        if why is not None:
            raise FewstepError(f"checkpoint {where} does not fit module {name!r} ({why}); {DAMAGED}") from None


def place(method: Method, device: torch.device | str) -> Networks:
    """Put every network ``method`` declares on ``device`` (denoisers with their schedule tables).  One rule for
    modes, whatever a method built its networks from: trained networks in train mode (dropout on, as in any
    training loop), state networks (EMA targets) in eval mode, frozen ones in eval mode without gradients.
    Returns the declaration."""
    nets = method.networks()
    trained_params = {id(p) for m in nets.trained.values() for p in m.parameters()}
    for name, m in nets.frozen.items():
        if any(id(p) in trained_params for p in m.parameters()):
            raise ValueError(f"network {name!r} is declared frozen but shares parameters with a trained network")
        m.requires_grad_(False).eval()
    for m in nets.state.values():
        m.eval()
    for m in nets.trained.values():
        m.train()
    for m in nets.all().values():
        m.to(device)
    return nets


class _Shim(nn.Module):
    """What DDP wraps for a trained module: its parameters, and its ``forward`` without its hooks (the call of the
    module itself, which the method makes, has already run them once)."""

    def __init__(self, module: nn.Module, forward: Any):
        super().__init__()
        self.module, self._forward = module, forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)


class _Route:
    """Routes calls of a trained module through DDP while a phase that trains it runs (and gradients are on), and
    straight to its own forward otherwise (frozen uses in other phases, evaluation, the EMA).  The method keeps
    calling the module it owns; the loop flips ``active``."""

    def __init__(self, module: nn.Module, wrapped: nn.Module, forward: Any):
        self.module, self.wrapped, self.active = module, wrapped, False
        self._had_own_forward = "forward" in module.__dict__
        self._forward = forward

        def routed(*args: Any, **kwargs: Any) -> Any:
            if self.active and torch.is_grad_enabled():
                return self.wrapped(*args, **kwargs)
            return self._forward(*args, **kwargs)

        module.forward = routed

    def restore(self) -> None:
        if self._had_own_forward:
            self.module.forward = self._forward
        else:
            del self.module.forward


def make_accelerator(cfg: TrainConfig, find_unused_parameters: bool = False, out: Path | None = None) -> Any:
    """The accelerate ``Accelerator`` of a run in ``out`` (tests replace this to inject a stand-in grad scaler)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    def make() -> Any:
        return Accelerator(cpu=use_cpu(), mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=1,
                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
                           log_with=cfg.log_with, project_dir=None if out is None else str(out))

    try:
        return make()
    except ValueError as e:  # accelerate keeps one state per process: a second run in another precision resets it
        if "already been initialized" not in str(e):
            raise
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        return make()


def _rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"gen": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _check_rng(gen: torch.Generator, rng: dict[str, torch.Tensor], processes: int, where: Path) -> None:
    """``rng`` (a checkpoint's rng.safetensors) holds a generator and a torch state of the right size for every
    process, and nothing else."""
    sizes = {"gen": gen.get_state().numel(), "torch": torch.get_rng_state().numel()}
    if torch.cuda.is_available():
        sizes["cuda"] = torch.cuda.get_rng_state().numel()
    expected = {f"{k}{r}" for k in ("gen", "torch", "cuda") for r in range(processes)}
    extra = sorted(set(rng) - expected)
    missing = sorted({f"{k}{r}" for k in ("gen", "torch") for r in range(processes)} - set(rng))
    if extra or missing:
        what = f"no {missing[0]}" if missing else f"an unknown key {extra[0]!r}"
        raise FewstepError(f"checkpoint RNG state {where} is damaged (it has {what}; it should hold gen, torch and "
                           f"cuda states for {processes} process(es)): {DAMAGED}")
    for key, t in rng.items():
        kind = key.rstrip("0123456789")
        if t.dtype != torch.uint8 or t.dim() != 1 or (kind in sizes and t.numel() != sizes[kind]):
            raise FewstepError(f"checkpoint RNG state {where} is damaged ({key} is {str(t.dtype)[6:]} of shape "
                               f"{tuple(t.shape)}, not uint8 of shape ({sizes.get(kind, '?')},)): {DAMAGED}")


def _set_rng_state(gen: torch.Generator, rng: dict[str, torch.Tensor], rank: int, where: Path) -> None:
    try:
        gen.set_state(rng[f"gen{rank}"])
        torch.set_rng_state(rng[f"torch{rank}"])
        if f"cuda{rank}" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[f"cuda{rank}"])
    except (RuntimeError, ValueError, TypeError) as e:
        raise FewstepError(f"checkpoint RNG state {where} is damaged ({str(e)[:80]}): {DAMAGED}") from None


def _load_optimizers(opt_state: Any, phases: list[Any], optims: list[Any], scaler: Any, where: Path) -> None:
    """Check the saved optimizer state against this run's optimizers (phases, parameter groups, tensor shapes),
    then load it."""
    def bad(why: str) -> FewstepError:
        return FewstepError(f"optimizer state {where} does not fit this run ({why}): {DAMAGED}")

    if not isinstance(opt_state, dict):
        raise bad(f"it holds a {type(opt_state).__name__}, not a mapping of phases")
    for ph, o in zip(phases, optims):
        entry = opt_state.get(ph.name)
        sd = entry.get("optim") if isinstance(entry, dict) else None
        if not isinstance(sd, dict) or not isinstance(sd.get("param_groups"), list) \
                or not isinstance(sd.get("state"), dict):
            raise bad(f"no optimizer state for phase {ph.name!r}")
        groups = o.optimizer.param_groups if hasattr(o, "optimizer") else o.param_groups
        saved_groups = sd["param_groups"]
        if len(saved_groups) != len(groups) or any(
                not isinstance(sg, dict) or len(sg.get("params", ())) != len(g["params"])
                for sg, g in zip(saved_groups, groups)):
            raise bad(f"phase {ph.name!r}: {len(saved_groups)} parameter group(s) of other sizes than this run's "
                      f"{len(groups)}")
        params = {i: p for sg, g in zip(saved_groups, groups) for i, p in zip(sg["params"], g["params"])}
        for i, st in sd["state"].items():
            if i not in params or not isinstance(st, dict):
                raise bad(f"phase {ph.name!r}: state for an unknown parameter {i!r}")
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(params[i].shape):
                    raise bad(f"phase {ph.name!r}: {k} of parameter {i} has shape {tuple(v.shape)}, the parameter "
                              f"{tuple(params[i].shape)}")
    try:
        for ph, o in zip(phases, optims):
            o.load_state_dict(opt_state[ph.name]["optim"])
        if scaler is not None and "_grad_scaler" in opt_state:
            scaler.load_state_dict(opt_state["_grad_scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise bad(str(e).splitlines()[0][:100] if str(e) else e.__class__.__name__) from None


def check_config(cfg: TrainConfig, world: int) -> None:
    """One-line errors for loop settings that cannot work with ``world`` processes (checked before anything is
    written: the recipe layer calls this too, before its run record)."""
    if cfg.ckpt_every < 1 or cfg.steps < 1 or cfg.batch < 1 or cfg.grad_accum < 1:
        raise FewstepError("--steps, --batch, --ckpt-every and --grad-accum must be at least 1")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise FewstepError(f"--mixed-precision {cfg.mixed_precision!r}: use no, fp16 or bf16")
    check_tracker(cfg.log_with)
    if cfg.batch % (world * cfg.grad_accum):
        raise FewstepError(f"--batch {cfg.batch} (the global batch) must divide by processes x --grad-accum = "
                           f"{world} x {cfg.grad_accum}: choose a multiple of {world * cfg.grad_accum}")


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def train(method: Method, data: tuple[torch.Tensor, torch.Tensor | None], cfg: TrainConfig, out: Path,
          resume: bool = False, quality: QualityFn | None = None) -> TrainResult:
    """Run ``method`` for ``cfg.steps`` steps on ``data = (x, labels or None)``; write checkpoints and the model
    folder into ``out``.  Works unchanged in every process of ``accelerate launch`` / ``torchrun``.

    ``quality(folder, step) -> {name: number}``, called every ``cfg.eval_every`` steps and at the last one on the
    main process with a temporary model folder of the current EMA weights, logs a quality figure while the method
    trains (``quality/<name>`` in metrics.jsonl, beside the training time; the time it takes is logged as
    ``quality/seconds`` and left out of the training time).  The loop knows nothing of how it is measured: the CLI
    passes fewstep.evaluate's FD on the train split.  It uses no randomness of the run, so resume stays exact."""
    out = Path(out)
    ckpts = _Checkpoints(out)
    saved: CheckpointState | None = None
    start: Path | None = None
    restart = False  # resume asked, but the run stopped before its first complete checkpoint: start it again
    if resume:
        start = ckpts.latest()
        if start is None:
            _restartable(out)
            resume, restart = False, True
        else:
            saved = read_state(start)
            # where to also log is this command's choice when it makes one (an older state.json has no log_with)
            cfg = TrainConfig(**{**saved.config.model_dump(), "progress": cfg.progress,
                                 "log_with": cfg.log_with or saved.config.log_with,
                                 "eval_every": cfg.eval_every or saved.config.eval_every})
    elif (out / "config.json").exists():
        raise FewstepError(f"{out} already holds a model or training run: pass --resume or choose a new --out")
    elif (out / "checkpoints").exists() or (out / "metrics.jsonl").exists():
        raise FewstepError(f"{out} already holds a training run (stopped before or after a checkpoint): pass --resume "
                           "to continue it (or start it again when no checkpoint was complete), or choose a new --out")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FewstepError(f"{out} exists and is not an empty folder: choose a new --out (nothing was written)")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise FewstepError(f"--mixed-precision {cfg.mixed_precision!r}: use no, fp16 or bf16")
    check_tracker(cfg.log_with)

    acc = make_accelerator(cfg, bool(getattr(method, "find_unused_parameters", False)), out)
    device, world, rank = acc.device, acc.num_processes, acc.process_index
    if world != expected_processes():
        raise FewstepError(f"the launcher started {expected_processes()} processes but accelerate runs {world}: each "
                           "would train alone into the same folder; check the accelerate config (on CPUs set "
                           "ACCELERATE_USE_CPU=true)")
    if saved is not None and saved.processes != world:
        raise FewstepError(f"{out} was trained with {saved.processes} processes, this run has {world}: "
                           "resume with the same process count (each process's random state is in the checkpoint)")
    check_config(cfg, world)

    nets = place(method, device)
    phases = method.phases()
    if not phases:
        raise ValueError(f"method {method.name!r} has no phases")
    # what each phase optimizes: the parameters of its module that the method left trainable
    params = [[p for p in ph.module.parameters() if p.requires_grad] for ph in phases]
    trained_ids = {id(p) for m in nets.trained.values() for p in m.parameters()}
    for ph, ps in zip(phases, params):
        if not ps:
            raise ValueError(f"phase {ph.name!r} of {method.name!r} has no trainable parameters")
        if any(id(p) not in trained_ids for p in ps):
            raise ValueError(f"phase {ph.name!r} trains a module that {method.name!r} does not declare as trained")
    every_trainable = list({id(p): p for ps in params for p in ps}.values())
    toggle = len(phases) > 1  # several phases: only the running phase's parameters require gradients
    optims = [_adamw(ps, cfg.lr * ph.lr_scale, cfg.weight_decay if ph.weight_decay is None else ph.weight_decay,
                     ph.betas, ph.eps) for ph, ps in zip(phases, params)]

    ema = EMA(method.ema_target(), cfg.ema_decay)
    # the EMA follows the weights it averages: it updates at the steps where a phase training them ran (a GAN's or
    # dmd2's generator, stepped every n-th step, would otherwise be averaged n times per update, its decay in effect
    # decay^n); a target no phase trains is averaged every step
    ema_ids = {id(p) for p in method.ema_target().parameters()}
    moves_ema = [any(id(p) in ema_ids for p in ps) for ps in params]
    routes: dict[int, _Route] = {}
    try:  # from here on, the finally gives the method its networks back as they were (gradients, forward)
        # trained modules through accelerate: DDP in a multi-process run (the method's own module stays what it calls)
        for m in nets.trained.values():
            net = core(m)
            shim = _Shim(net, net.forward)
            wrapped = acc.prepare_model(shim)
            if "_original_forward" in vars(shim):  # the losses already run under autocast; keep outputs as they are
                shim.forward = vars(shim).pop("_original_forward")
            if wrapped is not shim:
                routes[id(net)] = _Route(net, wrapped, shim._forward)
        phase_routes = [[r for r in routes.values() if {id(p) for p in r.module.parameters()} & {id(p) for p in ps}]
                        for ps in params]

        gen = torch.Generator(device=device).manual_seed(cfg.seed * 7_919 + rank)
        step, elapsed = 0, 0.0
        checkpointed = nets.checkpointed()
        optims = [acc.prepare_optimizer(o, device_placement=False) for o in optims]  # grad scaling for fp16
        metrics_path = out / "metrics.jsonl"
        kept_metrics: list[str] | None = None
        if saved is not None and start is not None:  # every file is checked before the folder is touched
            _load_prefixed(checkpointed, load_tensors(start / "modules.safetensors", "checkpoint weights"), start)
            ema_file = start / "ema.safetensors"
            ema_state = load_tensors(ema_file, "checkpoint EMA weights")
            why = _fit(ema.module, ema_state)
            if why is not None:
                raise FewstepError(f"checkpoint EMA weights {ema_file} does not fit the network ({why}); {DAMAGED}")
            ema.module.load_state_dict(ema_state)
            _load_optimizers(load_torch_state(start / "optim.pt"), phases, optims, acc.scaler, start / "optim.pt")
            rng = load_tensors(start / "rng.safetensors", "checkpoint RNG state")
            _check_rng(gen, rng, world, start / "rng.safetensors")
            _set_rng_state(gen, rng, rank, start / "rng.safetensors")
            step, elapsed, ema.num_updates = saved.step, saved.elapsed, saved.ema_updates
            kept_metrics = _read_metrics(metrics_path, step)
        committed = start  # the last complete checkpoint
        if acc.is_main_process and (resume or restart):  # what a killed or failed run left behind
            if restart:
                if out.is_dir() and any(out.iterdir()):
                    print(f"note: {out} has no complete checkpoint (the run stopped before its first one): "
                          "restarting it from step 0", file=sys.stderr)
                else:
                    print(f"note: {out} holds no run yet: starting it from step 0", file=sys.stderr)
                shutil.rmtree(ckpts.root, ignore_errors=True)
                metrics_path.unlink(missing_ok=True)
            for stale in ckpts.uncommitted(start):
                shutil.rmtree(stale)
            if out.is_dir():
                remove_orphans(out)
        ema.module.to(device)

        x_all, y_all = data
        n = x_all.shape[0]
        local = cfg.batch // world
        # a data set read lazily (fewstep.data.datasets.LazyImages) is decoded ahead in DataLoader workers
        lazy = iter(x_all.loader(_StepBatches(step, cfg, n, rank, local))) if hasattr(x_all, "loader") else None
        out.mkdir(parents=True, exist_ok=True)
        if kept_metrics is not None and acc.is_main_process:  # drop what was logged after the checkpoint
            with _disk(out, lambda: committed):
                write_text(metrics_path, "".join(ln + "\n" for ln in kept_metrics))
        acc.wait_for_everyone()  # the main process has cleaned the folder before anyone writes to it
        if cfg.log_with is not None:  # the same records as metrics.jsonl (main process only, as accelerate does)
            acc.init_trackers(PROJECT, {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None},
                              tracker_kwargs(cfg.log_with, out, step if resume else (-1 if restart else None)))
        history: list[dict[str, Any]] = []
        running: dict[str, list[float]] = {}

        def write_checkpoint(path: Path, step: int, states: list[dict[str, torch.Tensor]]) -> None:
            save_tensors(path / "modules.safetensors", _prefixed(checkpointed))
            save_tensors(path / "ema.safetensors", ema.module.state_dict())
            state: dict[str, Any] = {ph.name: {"optim": o.state_dict()} for ph, o in zip(phases, optims)}
            if acc.scaler is not None:
                state["_grad_scaler"] = acc.scaler.state_dict()
            save_torch_state(path / "optim.pt", state)
            save_tensors(path / "rng.safetensors", {f"{k}{r}": v for r, s in enumerate(states) for k, v in s.items()})
            write_json(path / "state.json", {"step": step, "elapsed": elapsed + time.perf_counter() - t0,
                                             "ema_updates": ema.num_updates, "method": method.name,
                                             "processes": world, "config": dataclasses.asdict(cfg)})

        def save(step: int) -> None:
            nonlocal committed
            from accelerate.utils import gather_object

            states = gather_object([_rng_state(gen)])  # every process's RNG state (a collective: all ranks call save)
            if acc.is_main_process:
                path = ckpts.root / f"step_{step:08d}"
                if committed is None or committed.name != path.name:  # (a finished run resumed has it already)
                    try:
                        with _disk(out, lambda: committed):
                            write_checkpoint(path, step, states)
                            committed = ckpts.commit(step)
                    except FewstepError:
                        if committed is None or committed.name != path.name:
                            shutil.rmtree(path, ignore_errors=True)  # half a checkpoint: room for the next try
                        raise
                with _disk(out, lambda: committed):
                    method.save_model(out, ema.module, {"method": method.name, "steps": step,
                                                        "wall_seconds": round(elapsed + time.perf_counter() - t0, 1),
                                                        "batch": cfg.batch, "lr": cfg.lr, "seed": cfg.seed,
                                                        "ema_decay": cfg.ema_decay, "device": str(device),
                                                        "processes": world, "mixed_precision": cfg.mixed_precision})
            acc.wait_for_everyone()

        def log_record(step: int, now: float) -> dict[str, Any]:
            rec: dict[str, Any] = {"step": step, "it_s": round((step - step_log) / (now - t_log), 3),
                                   "lr": cfg.lr * phases[0].lr_scale * lr_factor(step - 1, cfg.warmup, cfg.steps),
                                   "time": round(elapsed + now - t0, 2)}
            means = {k: sum(v) / len(v) for k, v in running.items() if v}
            if world > 1:  # the mean over the processes that logged each name (all log at the same steps)
                from accelerate.utils import gather_object

                keys = sorted(set().union(*gather_object([sorted(means)])))
                t = torch.tensor([[means.get(k, 0.0), float(k in means)] for k in keys], device=device,
                                 dtype=torch.float64).reshape(-1, 2)
                t = acc.reduce(t, "sum")
                means = {k: float(t[i, 0] / t[i, 1]) for i, k in enumerate(keys)}
            rec.update(means)
            return rec

        def activate(i: int) -> None:
            """Phase ``i`` runs: only its parameters require gradients, its modules run through DDP."""
            if toggle:
                for p in every_trainable:
                    p.requires_grad_(False)
                for p in params[i]:
                    p.requires_grad_(True)
            for r in routes.values():
                r.active = r in phase_routes[i]

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                            disable=not (cfg.progress and acc.is_main_process))
        def measure_quality(step: int) -> dict[str, Any]:
            figures: list[Any] = [None]
            failure: BaseException | None = None
            if acc.is_main_process:
                try:
                    with tempfile.TemporaryDirectory(prefix="fewstep-quality-") as tmp, \
                            torch.random.fork_rng(devices=_cuda_devices()):  # loading a model draws from the RNG
                        folder = Path(tmp) / "model"
                        method.save_model(folder, ema.module, {"method": method.name, "steps": step})
                        figures[0] = {f"quality/{k}": v for k, v in quality(folder, step).items()}
                except BaseException as e:  # the other ranks wait in the broadcast below: tell them, then raise
                    if world == 1:
                        raise
                    failure, figures[0] = e, {"__failed__": f"{type(e).__name__}: {e}"}
            if world > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(figures)  # every process logs the same record
                if failure is not None:
                    raise failure
                if figures[0] and "__failed__" in figures[0]:
                    raise FewstepError(f"the quality measure failed on the main process at step {step}: "
                                       f"{figures[0]['__failed__']}")
            return dict(figures[0] or {})

        before_step = getattr(method, "before_step", None)
        after_step = getattr(method, "after_step", None)
        t0 = time.perf_counter()
        t_log, step_log = t0, step
        with progress:
            task = progress.add_task(method.name, total=cfg.steps, completed=step, info="")
            while step < cfg.steps:
                if before_step is not None:
                    with acc.autocast():
                        before_step(step, gen)
                idx = batch_indices(step, n, cfg.batch, cfg.seed)[rank * local:(rank + 1) * local]
                xb = (next(lazy) if lazy is not None else x_all[idx]).to(device, non_blocking=True)
                yb = y_all[idx].to(device) if y_all is not None else None
                if cfg.hflip and xb.dim() == 4:
                    flip = flip_mask(step, cfg.batch, cfg.seed)[rank * local:(rank + 1) * local].to(device)
                    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                micro = _micro(xb, yb, cfg.grad_accum)
                contexts = [StepContext(step, gen, j) for j in range(len(micro))]
                factor = lr_factor(step, cfg.warmup, cfg.steps)
                moved = not any(moves_ema)
                for i, (ph, ps, opt) in enumerate(zip(phases, params, optims)):
                    if step % ph.every:
                        continue
                    activate(i)
                    total, logs = 0.0, {}
                    for j, (batch, ctx) in enumerate(zip(micro, contexts)):
                        with _sync(phase_routes[i], last=j == len(micro) - 1), acc.autocast():
                            per_sample, extra = loss_value(ph.loss(batch, ctx))
                            loss = per_sample.float().mean() / cfg.grad_accum
                        acc.backward(loss)
                        total += float(loss.detach())
                        for k, v in extra.items():
                            logs[k] = logs.get(k, 0.0) + float(v) / len(micro)
                    if world > 1:  # every process stops together on a non-finite loss
                        total = float(acc.reduce(torch.tensor(total, device=device), "mean"))
                    if not math.isfinite(total):
                        raise FewstepError(_diverged(ph.name, total, step, cfg, ph, committed))
                    clip = cfg.grad_clip if ph.grad_clip is None else ph.grad_clip
                    if clip:
                        if acc.scaler is not None:  # fp16: clip the true gradients
                            acc.scaler.unscale_(opt.optimizer)
                        torch.nn.utils.clip_grad_norm_(ps, clip)
                    for g in opt.param_groups:  # the schedule follows the global step, whatever `every` is
                        g["lr"] = cfg.lr * ph.lr_scale * factor
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    moved = moved or moves_ema[i]
                    running.setdefault(f"loss/{ph.name}", []).append(total)
                    for k, v in logs.items():
                        running.setdefault(f"{ph.name}/{k}", []).append(v)
                del contexts, micro
                if moved:
                    ema.update(method.ema_target())
                if after_step is not None:
                    after_step(step)
                step += 1
                figures = None
                if quality is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    spent = time.perf_counter()
                    figures = measure_quality(step)
                    spent = time.perf_counter() - spent
                    t0 += spent  # measuring is not training: the training time leaves it out
                    t_log += spent
                    figures["quality/seconds"] = round(spent, 2)
                if step % cfg.log_every == 0 or step == cfg.steps or figures is not None:
                    now = time.perf_counter()
                    rec = log_record(step, now)
                    rec.update(figures or {})
                    running = {}
                    history.append(rec)
                    if acc.is_main_process:
                        with _disk(out, lambda: committed), open(metrics_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps(rec) + "\n")
                        acc.log({k: v for k, v in rec.items() if k != "step"}, step=step)
                    t_log, step_log = now, step
                    info = " ".join(f"{k.split('/', 1)[1] if k.startswith('loss/') else k} {v:.4f}"
                                    for k, v in rec.items() if "/" in k)
                    progress.update(task, completed=step, info=f"{info} {rec['it_s']:.1f} it/s")
                else:
                    progress.update(task, completed=step)
                if step % cfg.ckpt_every == 0 and step < cfg.steps:
                    save(step)
        save(step)
    finally:
        for tracker in acc.trackers:  # not acc.end_training(): that also ends the process group a later stage needs
            tracker.finish()
        for p in every_trainable:
            p.requires_grad_(True)
        for r in routes.values():
            r.restore()
    final = {k[5:]: v for k, v in (history[-1] if history else {}).items() if k.startswith("loss/")}
    return TrainResult(out, step, elapsed + time.perf_counter() - t0, final, history)


def _kept(committed: Path | None) -> str:
    if committed is None:
        return "no checkpoint was complete yet (--resume starts the run again)"
    return f"the last complete checkpoint, {committed}, is kept"


@contextlib.contextmanager
def _disk(out: Path, committed: Callable[[], Path | None]) -> Iterator[None]:
    """A write that fails for want of disk (full, read-only...) is one line naming the folder and what is kept."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        what = write_failure(e)
        if what is None:
            raise
        raise FewstepError(f"cannot write to {out}: {what}; {_kept(committed())}: free space, then run the same "
                           "command with --resume") from None


def _diverged(name: str, total: float, step: int, cfg: TrainConfig, ph: Any, committed: Path | None) -> str:
    """The NaN guard's line: what is kept (really), that a resume repeats it, and what to change."""
    clip = cfg.grad_clip if ph.grad_clip is None else ph.grad_clip
    fixes = [f"a lower --lr (it is {cfg.lr * ph.lr_scale:g})",
             "gradient clipping (grad_clip, now off)" if not clip else f"a tighter grad_clip (now {clip:g})"]
    if cfg.mixed_precision != "no":
        fixes.append("--mixed-precision no")
    return (f"{name} loss is {total} at step {step}: {_kept(committed)}; the run is exact, so resuming with the same "
            f"settings repeats this at step {step}: start again in a new --out with {', '.join(fixes)}, "
            "or check the data for non-finite values")


@contextlib.contextmanager
def _sync(routes: list[_Route], last: bool) -> Iterator[None]:
    """Gradient accumulation: DDP synchronizes gradients only on a step's last micro-batch."""
    if last or not routes:
        yield
        return
    with contextlib.ExitStack() as stack:
        for r in routes:
            stack.enter_context(r.wrapped.no_sync())
        yield


def _micro(x: torch.Tensor, y: torch.Tensor | None, k: int) -> list[Batch]:
    if k <= 1:
        return [(x, y)]
    xs = x.chunk(k)
    ys = y.chunk(k) if y is not None else [None] * len(xs)
    return list(zip(xs, ys))
