"""`fewstep distill`: registered on the main typer app by fewstep.cli; methods come from fewstep.distill's registry."""

from pathlib import Path
from typing import Annotated

import typer

from fewstep.errors import FewstepError


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


def register(app: typer.Typer, friendly, out_console) -> None:
    @app.command()
    @friendly
    def distill(
        out: Annotated[Path, typer.Option(help="New folder (or the run to --resume): the student is OUT/student, "
                                          "earlier stages sit beside it.")],
        teacher: Annotated[Path | None, typer.Option(help="Teacher model folder (fewstep or diffusers); not "
                                                     "used by ct.")] = None,
        method: Annotated[str, typer.Option(help="progressive, guided, consistency, ct or reflow.")] = "progressive",
        steps: Annotated[int, typer.Option(help="Student sampling steps (NFE per sample), e.g. 1, 2 or 4.")] = 1,
        data: Annotated[str | None, typer.Option(help="Training data (default: the teacher's recorded dataset).")]
        = None,
        iters: Annotated[int, typer.Option(help="Optimizer steps per stage.")] = 1000,
        reparam_iters: Annotated[int | None, typer.Option(help="progressive, guided, consistency: steps of the "
                                                          "eps -> v re-parameterization stage (default: --iters).")]
        = None,
        batch: Annotated[int, typer.Option(help="Batch size.")] = 64,
        lr: Annotated[float, typer.Option(help="Learning rate.")] = 3e-4,
        guidance: Annotated[float, typer.Option(help="Distil the teacher guided at this scale (1: none).")] = 1.0,
        guidance_range: Annotated[str | None, typer.Option(help="LO,HI: the student takes the guidance scale as "
                                                           "an input (guided; consistency as in LCM).")] = None,
        loss: Annotated[str, typer.Option(help="consistency, ct, reflow: huber (pseudo-Huber) or l2.")] = "huber",
        start_steps: Annotated[int, typer.Option(help="progressive, guided: student steps of the first round "
                                                 "(the teacher takes twice as many DDIM steps).")] = 32,
        teacher_steps: Annotated[int, typer.Option(help="consistency: N of the skipping-step grid; reflow: "
                                                   "teacher solver steps for the pairs.")] = 50,
        pairs: Annotated[int, typer.Option(help="reflow: noise -> sample pairs drawn from the teacher.")] = 4000,
        preset: Annotated[str | None, typer.Option(help="ct: network preset (default: by data shape).")] = None,
        ema_target: Annotated[float, typer.Option(help="consistency: target network EMA decay.")] = 0.95,
        ema_decay: Annotated[float, typer.Option(help="Evaluation EMA decay (the exported weights).")] = 0.999,
        seed: Annotated[int, typer.Option(help="Seed.")] = 0,
        resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in OUT exactly.")]
        = False,
    ) -> None:
        """Distil a teacher into a few-step student (a model folder that `sample`, `evaluate` and `bench` take)."""
        from fewstep.data.datasets import load_dataset
        from fewstep.distill import DistillContext, DistillOptions, get_method
        from fewstep.distill import distill as run
        from fewstep.models.folder import load_model
        from fewstep.training.loop import TrainConfig

        m = get_method(method)
        if resume and not out.is_dir():
            raise FewstepError(f"--resume: {out} does not exist (run without --resume first)")
        if not resume and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FewstepError(f"{out} exists and is not empty: choose a new --out or pass --resume")
        if steps < 1 or iters < 1 or batch < 1:
            raise FewstepError("--steps, --iters and --batch must be at least 1")
        if m.needs_teacher and teacher is None:
            raise FewstepError(f"method {method!r} needs --teacher")
        model = load_model(teacher) if teacher is not None and m.needs_teacher else None
        name = data or (model.config.data if model else None)
        if name is None:
            raise FewstepError(f"{teacher or 'the method'} does not record its dataset: pass --data")
        ds = load_dataset(name, "train")
        if model is not None and tuple(ds.sample_shape) != tuple(model.sample_shape):
            raise FewstepError(f"--data {name} has samples of shape {ds.sample_shape}, the teacher makes "
                               f"{tuple(model.sample_shape)}")
        labels = ds.y if (model.config.num_classes if model else ds.num_classes) else None
        opts = DistillOptions(steps=steps, iters=iters, reparam_iters=reparam_iters, guidance=guidance,
                              guidance_range=_range(guidance_range),
                              loss=loss, start_steps=start_steps, teacher_steps=teacher_steps, pairs=pairs,
                              preset=preset, ema_target=ema_target)
        cfg = TrainConfig(batch=batch, lr=lr, warmup=min(100, iters // 10), seed=seed, ckpt_every=max(1, iters // 4),
                          ema_decay=ema_decay, progress=True)
        ctx = DistillContext(model, teacher if model else None, (ds.x, labels), name, out, opts, cfg, resume=resume)
        res = run(method, ctx)
        out_console.print(f"student ({steps} steps, {method}): {res.student}  [distillation {res.wall_seconds:.0f} s]",
                          markup=False, soft_wrap=True)
