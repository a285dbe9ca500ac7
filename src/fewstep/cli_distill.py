"""`fewstep distill`: registered on the main typer app by fewstep.cli; methods and their options come from the
recipe layer (fewstep.training.recipe), never from a list here.

Options live in one namespace per method (its own and the loop's): `--set key=value` and `--config FILE.yaml` set
any of them; the flags below are the older spelling of the options of the same name and stay accepted, but a
flag the chosen method does not have is an error naming the options it has.  `--method NAME --help` prints
that method's options."""

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from fewstep.checks import output_folder
from fewstep.cli_data import data_options
from fewstep.errors import FewstepError
from fewstep.threads import THREADS_HELP, apply_threads
from fewstep.training.trackers import LOG_WITH_HELP


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise FewstepError(f"--guidance-range {text!r}: give two numbers LO,HI, e.g. 1,4") from None
    if not 0 <= lo <= hi:
        raise FewstepError(f"--guidance-range {text!r}: need 0 <= LO <= HI")
    return lo, hi


def _method_in(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--method" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return None


def _methods_epilog() -> str:
    from fewstep.training.recipe import discover

    found = discover("distill")
    return ("Methods: " + "; ".join(f"{name} ({r.summary.split(':')[0]})" for name, r in found.items())
            + ". `fewstep distill --method NAME --help` lists a method's options.")


def register(app: typer.Typer, friendly, out_console) -> None:
    def method_help(name: str) -> None:
        from fewstep.training.recipe import get_recipe, options_help

        out_console.print(options_help(get_recipe("distill", name)), markup=False, highlight=False, soft_wrap=True,
                          end="")

    class DistillCommand(TyperCommand):
        """`--help` together with `--method NAME` (in any order) prints that method's options; `--help` alone the
        command's help followed by the registered methods."""

        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            if "--help" in args:
                name = _method_in(args)
                if name is not None:
                    friendly(method_help)(name)
                    ctx.exit(0)
                self.epilog = _methods_epilog()
            return super().parse_args(ctx, args)

    @app.command(cls=DistillCommand)
    @friendly
    @data_options
    def distill(
        out: Annotated[Path, typer.Option(help="New folder (or the run to --resume): the student is OUT/student, "
                                          "earlier stages sit beside it; `--model OUT` loads the student.")],
        teacher: Annotated[Path | None, typer.Option(help="Teacher model folder (fewstep or diffusers); not "
                                                     "used by ct.")] = None,
        method: Annotated[str, typer.Option(help="The method (progressive, guided, consistency, ct, reflow, dmd2, "
                                            "boot, ...); `--method NAME --help` lists its options.")] = "progressive",
        data: Annotated[str | None, typer.Option(help="Training data: a data set's name or your own source (see "
                                                    "`fewstep train --help`; default: the teacher's recorded data; "
                                                    "boot reads none).")]
        = None,
        set_: Annotated[list[str] | None, typer.Option(
            "--set", help="KEY=VALUE: set one of the method's or the loop's options (repeatable; wins over the "
                          "flags and --config).")] = None,
        config: Annotated[Path | None, typer.Option(help="YAML mapping of option names to values (below the flags "
                                                    "and --set).")] = None,
        steps: Annotated[int | None, typer.Option(help="Student sampling steps (NFE per sample), e.g. 1, 2 or 4.")]
        = None,
        iters: Annotated[int | None, typer.Option(help="Optimizer steps per stage (default 1000).")] = None,
        reparam_iters: Annotated[int | None, typer.Option(help="progressive, guided, consistency: steps of the "
                                                          "eps -> v re-parameterization stage (default: --iters).")]
        = None,
        batch: Annotated[int | None, typer.Option(help="Global batch size (default 64).")] = None,
        lr: Annotated[float | None, typer.Option(help="Learning rate (default 3e-4).")] = None,
        guidance: Annotated[float | None, typer.Option(help="Distil the teacher guided at this scale (1: none).")]
        = None,
        guidance_range: Annotated[str | None, typer.Option(help="LO,HI: the student takes the guidance scale as "
                                                           "an input (guided; consistency as in LCM).")] = None,
        loss: Annotated[str | None, typer.Option(help="consistency, ct, reflow: huber (pseudo-Huber) or l2.")]
        = None,
        start_steps: Annotated[int | None, typer.Option(help="progressive, guided: student steps of the first round "
                                                        "(the teacher takes twice as many DDIM steps).")] = None,
        teacher_steps: Annotated[int | None, typer.Option(help="consistency: N of the skipping-step grid; reflow: "
                                                          "teacher solver steps for the pairs.")] = None,
        pairs: Annotated[int | None, typer.Option(help="reflow: noise -> sample pairs drawn from the teacher.")]
        = None,
        preset: Annotated[str | None, typer.Option(help="ct: network preset (default: by data shape).")] = None,
        ema_target: Annotated[float | None, typer.Option(help="consistency: target network EMA decay.")] = None,
        ema_decay: Annotated[float | None, typer.Option(help="Evaluation EMA decay (the exported weights).")] = None,
        seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
        grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
        mixed_precision: Annotated[str | None, typer.Option(help="no, fp16 or bf16 (through accelerate).")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in OUT exactly.")]
        = False,
        hflip: Annotated[bool, typer.Option("--hflip", help="Random horizontal flips of the training images.")]
        = False,
        threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
        log_with: Annotated[str | None, typer.Option(help=LOG_WITH_HELP)] = None,
    ) -> None:
        """Distil a teacher into a few-step student (a model folder that `sample`, `evaluate` and `bench` take).

        Every option error (an unknown name, a bad value) is reported before anything is written."""
        output_folder(out)
        apply_threads(threads)
        from fewstep.training.recipe import start

        given = dict(steps=steps, iters=iters, reparam_iters=reparam_iters, guidance=guidance,
                     guidance_range=_range(guidance_range), loss=loss, start_steps=start_steps,
                     teacher_steps=teacher_steps, pairs=pairs, preset=preset, ema_target=ema_target,
                     ema_decay=ema_decay, batch=batch, lr=lr, seed=seed, grad_accum=grad_accum,
                     mixed_precision=mixed_precision, hflip=hflip or None, log_with=log_with)
        values = {k: v for k, v in given.items() if v is not None}
        res = start("distill", method, out, teacher=teacher, data=data, config=config, values=values,
                    sets=set_ or (), resume=resume, label=_flag, quality=_train_quality)
        student_steps = getattr(res.options, "steps", None)
        what = f"{student_steps} steps, {method}" if student_steps is not None else method
        out_console.print(f"student ({what}): {res.student}  [distillation {res.wall_seconds:.0f} s]",
                          markup=False, soft_wrap=True)


def _train_quality(dataset: str, n: int):  # noqa: ANN202 - the loop's QualityFn
    """``--set eval_every=N``: FD on the train split, measured by fewstep.evaluate (distillation never imports it)."""
    from fewstep.evaluate.runner import train_quality

    return train_quality(dataset, n)
