"""`fewstep distill`: registered on the main typer app by fewstep.cli (issue 4; progressive only so far)."""

from pathlib import Path
from typing import Annotated

import typer

from fewstep.errors import FewstepError

METHODS = ("progressive",)


def register(app: typer.Typer, friendly, out_console) -> None:
    @app.command()
    @friendly
    def distill(
        teacher: Annotated[Path, typer.Option(help="Teacher model folder (fewstep or diffusers).")],
        out: Annotated[Path, typer.Option(help="New folder: one sub-folder per round; the last is the student.")],
        method: Annotated[str, typer.Option(help="Distillation method: progressive (more to come).")] = "progressive",
        steps: Annotated[int, typer.Option(help="Student sampling steps (a power of two, e.g. 1, 2, 4).")] = 1,
        start_steps: Annotated[int, typer.Option(help="progressive: student steps of the first round (the "
                                                 "teacher takes twice as many DDIM steps).")] = 32,
        data: Annotated[str | None, typer.Option(help="Training data (default: the teacher's recorded dataset).")]
        = None,
        iters: Annotated[int, typer.Option(help="Optimizer steps per round.")] = 1000,
        batch: Annotated[int, typer.Option(help="Batch size.")] = 64,
        lr: Annotated[float, typer.Option(help="Learning rate.")] = 3e-4,
        guidance: Annotated[float, typer.Option(help="Distil the teacher guided at this scale (1: none).")] = 1.0,
        seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    ) -> None:
        """Distil a teacher into a few-step student (a model folder that `sample`, `evaluate` and `bench` take)."""
        from fewstep.data.datasets import load_dataset
        from fewstep.distill.progressive import progressive_distill
        from fewstep.models.folder import load_model
        from fewstep.training.loop import TrainConfig

        if method not in METHODS:
            raise FewstepError(f"unknown method {method!r}: available so far: {', '.join(METHODS)}")
        if steps < 1 or start_steps < steps or (start_steps & (start_steps - 1)) or (steps & (steps - 1)):
            raise FewstepError("--steps and --start-steps must be powers of two with --start-steps >= --steps")
        if out.exists() and any(out.iterdir()):
            raise FewstepError(f"{out} exists and is not empty: choose a new --out")
        m = load_model(teacher)
        name = data or m.config.data
        if name is None:
            raise FewstepError(f"{teacher} does not record its dataset: pass --data")
        ds = load_dataset(name, "train")
        if tuple(ds.sample_shape) != tuple(m.sample_shape):
            raise FewstepError(f"--data {name} has samples of shape {ds.sample_shape}, the teacher makes "
                               f"{tuple(m.sample_shape)}")
        labels = ds.y if m.config.num_classes else None
        cfg = TrainConfig(batch=batch, lr=lr, warmup=min(100, iters // 10), seed=seed, ckpt_every=max(1, iters),
                          progress=False)
        final = progressive_distill(teacher, (ds.x, labels), out, start_steps=start_steps, end_steps=steps,
                                    iters=iters, reparam_iters=iters, guidance=guidance, train_config=cfg)
        out_console.print(f"student ({steps} steps): {final}", markup=False, soft_wrap=True)
