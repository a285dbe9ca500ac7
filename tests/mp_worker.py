"""One process of the multi-process tests (tests/test_multiprocess.py): run under ``torchrun`` (several ranks of one
gloo group, ``ACCELERATE_USE_CPU=true``) or plain ``python`` (one process).

    python tests/mp_worker.py KIND OUT [--steps N] [--resume] [--die-at STEP] [--seed S]

KIND ``pair``: a two-network method whose losses draw no randomness (each phase's loss flows through the other,
frozen, network); ``teacher``: the DDPM teacher objective on the 2-D mixture.  Writes ``OUT/world.json`` with the
world size and the loss history; ``--die-at`` ends the process abruptly (``os._exit``) after that step;
``--quality-fails-at`` measures quality every 5 steps with a callback that raises from that step on.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn

from fewstep.data.datasets import load_dataset
from fewstep.io import write_json
from fewstep.models.backbones import preset_backbone
from fewstep.training.loop import TrainConfig, train
from fewstep.training.method import Batch, LossOutput, Networks, Phase, StepContext
from fewstep.training.teacher import TeacherMethod, TeacherSpec


class Pair:
    """Two small MLPs, ``a`` and ``b``: phase ``a`` fits ``b(a(x)) ~ x`` (b frozen), phase ``b`` (every other step)
    fits ``b(a(x).detach()) ~ x`` and pulls ``b`` towards zero.  Deterministic given the batch."""

    name = "pair"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 2))
        self.b = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 2))
        # a hook changes the output: run twice per call (as through a naive DDP wrapper), 2 processes would differ
        self.a.register_forward_hook(lambda module, args, out: 0.5 * out)

    def networks(self) -> Networks:
        return Networks(trained={"a": self.a, "b": self.b})

    def phases(self) -> list[Phase]:
        def loss_a(batch: Batch, ctx: StepContext) -> LossOutput:
            x = batch[0]
            err = (self.b(self.a(x)) - x).pow(2).mean(1)
            return LossOutput(err, {"err": err.mean().detach()})

        def loss_b(batch: Batch, ctx: StepContext) -> torch.Tensor:
            x = batch[0]
            with torch.no_grad():
                h = self.a(x)
            return (self.b(h) - x).pow(2).mean(1) + 1e-3 * sum(p.pow(2).sum() for p in self.b.parameters())

        return [Phase("a", self.a, loss_a), Phase("b", self.b, loss_b, every=2, lr_scale=0.5, betas=(0.5, 0.9))]

    def ema_target(self) -> nn.Module:
        return self.a

    def save_model(self, out: Path, net: nn.Module, training: dict) -> None:
        from fewstep.io import save_tensors

        save_tensors(out / "model.safetensors", {**{f"a.{k}": v for k, v in self.a.state_dict().items()},
                                                 **{f"b.{k}": v for k, v in self.b.state_dict().items()}})


def teacher() -> TeacherMethod:
    ds = load_dataset("gmm", "train")
    kind, cfg = preset_backbone("mlp-small", ds.sample_shape, 0)
    torch.manual_seed(0)
    return TeacherMethod(TeacherSpec(backbone=kind, backbone_config=cfg, sample_shape=ds.sample_shape, data="gmm"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["pair", "teacher"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ckpt-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--die-at", type=int, default=None)
    ap.add_argument("--quality-fails-at", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    method = Pair() if args.kind == "pair" else teacher()
    if args.die_at is not None:
        def after_step(step: int) -> None:
            if step == args.die_at:
                os._exit(17)  # no cleanup, no final checkpoint: as kill -9 would leave it
        method.after_step = after_step
    quality = None
    if args.quality_fails_at is not None:  # a quality measure (rank 0 only) that raises at that step
        def quality(folder: Path, step: int) -> dict[str, float]:
            if step >= args.quality_fails_at:
                raise ValueError("the feature network is missing")
            return {"fd": 1.0}
    x = load_dataset("gmm", "train").x[:4096]
    cfg = TrainConfig(steps=args.steps, batch=64, lr=1e-2 if args.kind == "pair" else 2e-3, warmup=5,
                      ckpt_every=args.ckpt_every, log_every=1, seed=args.seed, ema_decay=0.9,
                      grad_accum=args.grad_accum, progress=False, eval_every=5 if quality else None)
    res = train(method, (x, None), cfg, args.out, resume=args.resume, quality=quality)
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if rank == 0:
        write_json(args.out / "world.json", {"world": world, "history": res.history})
    print(json.dumps({"rank": rank, "world": world}))
    if world > 1:  # leave together: a rank that exits while another still talks to it can abort the pair
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
