"""The `fewstep` command line: thin wrappers that parse, build a config and call the library."""

from __future__ import annotations

import errno
import functools
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from fewstep.checks import at_least, fits_in_memory, output_file, output_folder, plain_numbers, within
from fewstep.cli_data import data_options
from fewstep.errors import FewstepError
from fewstep.threads import THREADS_HELP, apply_threads, default_threads
from fewstep.training.trackers import LOG_WITH_HELP


class _OneLineGroup(TyperGroup):
    """Usage errors (an unknown option, a value of the wrong type, a missing option) as one line naming the
    option and pointing to ``--help``, exit status 2 (click's and typer's panels are 5-6 lines)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        # typer vendors click (typer._click) and exports only Exit and Abort: the exceptions come from there
        from typer._click import exceptions as click

        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.NoArgsIsHelpError as e:  # `fewstep` or `fewstep train` alone: the help, as before
            out_console.print(e.format_message(), markup=False, highlight=False, end="")
            rv = e.exit_code
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "fewstep"
            msg = " ".join(e.format_message().split())
            console.print(f"[red]error:[/red] {escape(msg)} (see `{escape(where)} --help`)", highlight=False,
                          soft_wrap=True)
            rv = 2
        except click.ClickException as e:
            console.print(f"[red]error:[/red] {escape(' '.join(e.format_message().split()))}", highlight=False,
                          soft_wrap=True)
            rv = e.exit_code
        except typer.Abort:
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=_OneLineGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fewstep: train diffusion teachers, sample them, distill them into few-step students, "
                       "and measure quality against speed.")
console = Console(stderr=True)
out_console = Console()

TIMESTEP_HELP = ("Explicit evaluation timesteps, comma-separated, in [0, T-1] (fractional allowed), strictly "
                 "decreasing; one network evaluation each (Heun: 2n-1 in all); after the last the sampler "
                 "lands on clean data (alpha_bar = 1, sigma = 0).")
STEPS_HELP = "Number of sampling steps, spaced by --spacing (default: the model's recorded steps)."
SPACING_HELP = ("trailing (default: starts at T-1, which matters at 1-2 steps), leading or linspace, as "
                "diffusers' timestep_spacing; grid: on a consistency student's training grid (its default).")


_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
FLAG_NAMES = {"json_out": "--json", "set_": "--set", "range_": "--range"}


def _friendly(fn):
    """Bad input -> one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            plain_numbers(kwargs, FLAG_NAMES)  # no nan, inf or 2**70 reaches the library
            return fn(*args, **kwargs)
        except FewstepError as e:
            # escape: messages quote user paths and values, which may hold "[...]" (rich markup)
            console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as e:  # a full disk or a place that turned read-only while writing: one line, not a traceback
            if e.errno == errno.ENAMETOOLONG:
                name = escape(str(e.filename)[:80])
                console.print(f"[red]error:[/red] a file name is too long for the filesystem ({name}...): choose a "
                              "shorter path", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            if e.errno in (errno.ENOTDIR, errno.EISDIR):
                console.print(f"[red]error:[/red] {escape(e.strerror or str(e))} ({escape(str(e.filename))}): a file "
                              "stands where a folder goes or the other way round (check --out and FEWSTEP_CACHE)",
                              highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            if e.errno not in _WRITE_ERRORS:
                raise
            where = f" ({e.filename})" if e.filename else ""
            console.print(f"[red]error:[/red] {escape(e.strerror or str(e))}{escape(where)}: free space or choose "
                          "a writable place, then run the command again (a training run continues with --resume from "
                          "its last checkpoint)", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("interrupted: the last checkpoint is kept (continue with --resume)")
            raise typer.Exit(130) from None

    return wrapper


def _parse_timesteps(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise FewstepError(f"--timesteps {text!r}: give comma-separated numbers, e.g. 999,666,333") from None


DATA_HELP = ("Data: digits, mnist, fashion, gmm, moons, swissroll, checkerboard, or your own: a folder of PNG/JPEG "
             "images (class sub-folders give labels), a .npy or .npz (x, optional y) array, or a datasets "
             "save_to_disk folder (see the 'Your own data' flags).")


@app.command()
@_friendly
@data_options
def train(
    data: Annotated[str, typer.Option(help=DATA_HELP)],
    out: Annotated[Path, typer.Option(help="Run folder: becomes a model folder (plus checkpoints/, metrics.jsonl).")],
    preset: Annotated[str | None, typer.Option(help="Network preset: tiny8, tiny28, small28, base32, test8, mlp, "
                                                  "mlp-small (default: by data shape).")] = None,
    objective: Annotated[str, typer.Option(help="ddpm, edm or flow.")] = "ddpm",
    prediction: Annotated[str | None, typer.Option(help="ddpm only: eps (default), v or x0.")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 3000,
    batch: Annotated[int, typer.Option(help="Global batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = 1e-3,
    conditional: Annotated[bool, typer.Option("--conditional", help="Class-conditional with a null class for "
                                              "classifier-free guidance (10% label dropout).")] = False,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the exported weights.")] = 0.999,
    ckpt_every: Annotated[int, typer.Option(help="Checkpoint (and refresh the model folder) every N steps.")] = 500,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly, with its saved "
                                         "settings (other training flags are ignored).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of initialization, data order and noise.")] = 0,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16 (through accelerate).")] = "no",
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step (the global batch must divide "
                                            "by processes x grad_accum).")] = 1,
    beta_schedule: Annotated[str, typer.Option(help="ddpm: linear, scaled_linear or squaredcos_cap_v2.")] = "linear",
    hflip: Annotated[bool, typer.Option("--hflip", help="Random horizontal flips of the training images (off by "
                                        "default; --resume repeats them exactly).")] = False,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    log_with: Annotated[str | None, typer.Option(help=LOG_WITH_HELP)] = None,
) -> None:
    """Train a teacher (DDPM, EDM or flow matching). Works unchanged under `accelerate launch -m fewstep train`."""
    for flag, v in (("--steps", steps), ("--batch", batch), ("--ckpt-every", ckpt_every), ("--grad-accum", grad_accum)):
        at_least(flag, v, 1)
    at_least("--lr", lr, 0, open_=True)
    at_least("--seed", seed, 0)
    within("--batch", batch, 1, 2**20)  # as distill's batch: a batch of 10**12 is an allocation error, not a run
    within("--seed", seed, 0, 2**32 - 1)  # the loop derives generator seeds from it (seed x 1,000,003 + step)
    within("--ema-decay", ema_decay, 0, 1, high_open=True)
    output_folder(out)
    apply_threads(threads)
    from fewstep.training.loop import TrainConfig
    from fewstep.training.teacher import TeacherOptions, train_teacher

    cfg = TrainConfig(steps=steps, batch=batch, lr=lr, ema_decay=ema_decay, ckpt_every=ckpt_every, seed=seed,
                      grad_accum=grad_accum, mixed_precision=mixed_precision, progress=sys.stderr.isatty(),
                      hflip=hflip, log_with=log_with)
    result = train_teacher(TeacherOptions(data=data, preset=preset, objective=objective, prediction=prediction,
                                          conditional=conditional, beta_schedule=beta_schedule, seed=seed),
                           cfg, out, resume=resume)
    loss = ", ".join(f"{k} {v:.4f}" for k, v in result.final_loss.items())
    loss = f"final loss {loss}" if loss else "the run had already finished: nothing to do"
    out_console.print(f"trained {result.steps} steps in {result.wall_seconds:.1f} s ({loss}); model folder: {out}",
                      markup=False, soft_wrap=True)


@app.command()
@_friendly
def sample(
    model: Annotated[Path, typer.Option(help="A fewstep model folder, a diffusers pipeline or a UNet folder, or a "
                                        "distillation run (--out of distill: its student).")],
    out: Annotated[Path, typer.Option(help=".npy: raw array (N, C, H, W) in the data range; .png: a grid.")],
    sampler: Annotated[str | None, typer.Option(help="ddpm, ddim, euler, heun, dpmpp-2m or consistency (default: the "
                                                   "model's recorded sampler).")] = None,
    steps: Annotated[int | None, typer.Option(help=STEPS_HELP)] = None,
    spacing: Annotated[str | None, typer.Option(help=SPACING_HELP)] = None,
    timesteps: Annotated[str | None, typer.Option(help=TIMESTEP_HELP)] = None,
    eta: Annotated[float, typer.Option(help="DDIM eta (0: deterministic).")] = 0.0,
    guidance: Annotated[float | None, typer.Option(
        help="Classifier-free guidance scale w: x0_u + w (x0_c - x0_u); 1 = conditional only; each guided step "
             "costs 2 NFE.")] = None,
    class_: Annotated[int | None, typer.Option("--class", help="Class of every sample (default: cycle "
                                                  "through the classes).")] = None,
    code: Annotated[int | None, typer.Option(help="InfoGAN's categorical code of every sample (a GAN distilled "
                                                  "with --set variant=infogan; default: drawn from each sample's "
                                                  "noise).")] = None,
    n: Annotated[int, typer.Option(help="Number of samples.")] = 64,
    seed: Annotated[int, typer.Option(help="Noise seed; sample i's noise depends only on (seed, i).")] = 0,
    latents: Annotated[Path | None, typer.Option(help="Initial noise as .npy (n, C, H, W), unit-variance eps "
                                                    "(the VP state at the first timestep).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per network call.")] = 256,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
) -> None:
    """Sample a model with a standard solver, optionally guided."""
    apply_threads(threads)
    import numpy as np
    import torch

    from fewstep.generate import sample_model
    from fewstep.images import write_samples

    if out.suffix not in (".npy", ".png"):
        raise FewstepError(f"--out {out}: use a .npy (raw array) or .png (picture) file name")
    output_file(out)
    for flag, v in (("--steps", steps), ("--n", n), ("--batch-size", batch_size)):
        at_least(flag, v, 1)
    at_least("--seed", seed, 0)
    at_least("--eta", eta, 0)
    lat = None
    if latents is not None:
        if not latents.is_file():
            raise FewstepError(f"--latents file {latents} does not exist")
        try:
            arr = np.load(latents, allow_pickle=False)
        except (ValueError, TypeError, EOFError, OSError) as e:
            raise FewstepError(f"--latents {latents} is not a numeric .npy array ({e})") from None
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
            kind = getattr(arr, "dtype", type(arr).__name__)
            raise FewstepError(f"--latents {latents} holds {kind} values: give real numbers (float noise)")
        lat = torch.from_numpy(arr.astype(np.float32))
        if lat.ndim == 0 or lat.shape[0] == 0:
            raise FewstepError(f"--latents {latents} holds no samples: give an array (n, C, H, W) with n >= 1")
        bad = int((~torch.isfinite(lat)).sum())
        if bad:
            raise FewstepError(f"--latents {latents} holds {bad} NaN or infinite values: give finite noise")
    from fewstep.models.folder import load_model

    m = load_model(model)
    fits_in_memory("--n", n, 4 * math.prod(m.config.sample_shape) * 3)  # the samples, the state and a prediction
    res = sample_model(m, n, sampler=sampler, steps=steps, spacing=spacing, timesteps=_parse_timesteps(timesteps),
                       guidance=guidance, class_id=class_, seed=seed, eta=eta, latents=lat, batch_size=batch_size,
                       code=code)
    n, ts = res.x.shape[0], res.timesteps
    write_samples(out, res.x)
    out_console.print(f"{n} samples with {res.sampler} at {len(ts)} steps ({res.nfe} NFE per sample) in "
                      f"{res.wall_seconds:.2f} s ({res.samples_per_s:.1f} samples/s) -> {out}",
                      markup=False, soft_wrap=True)


@app.command()
@_friendly
def info(model: Annotated[Path, typer.Argument(help="A model folder.")]) -> None:
    """Print what a model folder is and how it samples."""
    from fewstep.models.folder import describe, load_model

    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # long values (a data key, a path) wrap, never end in "..."
    for k, v in describe(load_model(model)):
        table.add_row(f"[bold]{k}[/bold]", escape(v))
    out_console.print(table)


@app.command()
@_friendly
def export(
    model: Annotated[Path, typer.Argument(help="A model folder.")],
    out: Annotated[Path, typer.Argument(help="New folder to write (must not exist or be empty).")],
) -> None:
    """Write a model as a diffusers folder: DDPMPipeline (unconditional) or unet/ + scheduler/ (conditional)."""
    output_folder(out, "OUT")
    from fewstep.models.folder import export_diffusers, load_model

    out_console.print("wrote " + export_diffusers(load_model(model), out), markup=False, soft_wrap=True)


from fewstep.cli_eval import register as _register_eval  # noqa: E402

_register_eval(app, _friendly, out_console, _parse_timesteps,
               {"steps": STEPS_HELP, "spacing": SPACING_HELP, "timesteps": TIMESTEP_HELP})

from fewstep.cli_distill import register as _register_distill  # noqa: E402

_register_distill(app, _friendly, out_console)


def main() -> None:
    import os

    if os.environ.get("RANK", "0") != "0":  # torchrun / accelerate launch: one process reports, every one errs
        out_console.quiet = True
    default_threads(sys.argv[1:])  # before anything imports torch (fewstep.threads)
    try:
        app()
    finally:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # leave together, so no process exits while another still talks to it


if __name__ == "__main__":
    main()
