"""`--set eval_every=N` (issue 13): a quality figure logged while a method trains, through a callback the caller
passes (distillation never imports evaluation); its time is left out of the training time and it leaves the run
bit-for-bit what it is without it."""

import json
import subprocess
import sys
import time

import pytest
import torch
from corpus import invoke

from fewstep.data.datasets import load_dataset
from fewstep.distill import distill
from fewstep.distill.gan import GANOptions
from fewstep.errors import FewstepError
from fewstep.io import load_tensors
from fewstep.training.loop import TrainConfig
from fewstep.training.recipe import RunContext, get_recipe, prepare, resolve_options


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _gan_ctx(out, eval_every=None, quality=None):
    ds = load_dataset("gmm", "train")
    cfg = TrainConfig(steps=30, batch=64, lr=1e-3, warmup=0, ckpt_every=10**6, log_every=7, ema_decay=0.9,
                      progress=False, eval_every=eval_every)
    return RunContext(None, None, (ds.x, ds.y), "gmm", out, GANOptions.for_tests(), cfg, quality=quality)


def test_quality_is_logged_at_its_steps_outside_the_training_time_and_changes_nothing(tmp_path):
    calls = []

    def slow_quality(folder, step):
        assert (folder / "config.json").is_file()  # a model folder of the current EMA weights
        calls.append(step)
        time.sleep(0.6)
        return {"fd": float(step)}

    with_q = distill("gan", _gan_ctx(tmp_path / "q", eval_every=10, quality=slow_quality))
    without = distill("gan", _gan_ctx(tmp_path / "n"))
    assert calls == [10, 20, 30]
    rows = _rows(with_q.student)
    logged = {r["step"]: r["quality/fd"] for r in rows if "quality/fd" in r}
    assert logged == {10: 10.0, 20: 20.0, 30: 30.0}
    assert all(r["quality/seconds"] >= 0.6 for r in rows if "quality/fd" in r)
    # the three 0.6 s measurements (1.8 s) are not in the training time: it is the time of the same run without them
    plain = _rows(without.student)[-1]["time"]
    assert rows[-1]["time"] < plain + 1.0 and with_q.wall_seconds < without.wall_seconds + 1.0, (rows[-1], plain)
    from fewstep.evaluate.bench import quality_curve
    from fewstep.evaluate.report import plot_curves

    curve = quality_curve(with_q.student)  # what the bench report plots against distillation time
    assert [v for _, v in curve] == [10.0, 20.0, 30.0] and [t for t, _ in curve] == sorted(t for t, _ in curve)
    assert quality_curve(without.student) == []
    assert plot_curves({"gan": curve}, "fd").startswith(b"\x89PNG")
    a, b = load_tensors(with_q.student / "model.safetensors"), load_tensors(without.student / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the callback draws nothing from the run's randomness


def test_eval_every_needs_a_measure_and_a_dataset(tmp_path, fx):
    recipe = get_recipe("distill", "gan")
    resolved = resolve_options(recipe, sets=["eval_every=5"])
    with pytest.raises(FewstepError, match="needs a quality measure"):
        prepare(recipe, resolved, tmp_path / "a", data="gmm")
    boot = get_recipe("distill", "boot")
    resolved = resolve_options(boot, sets=["eval_every=5"])
    ctx = prepare(boot, resolved, tmp_path / "b", teacher=fx.model, quality=lambda d, n: (d, n))
    assert ctx.quality == ("digits", 500)  # a data-free run is measured against its teacher's data


def test_a_resumed_run_keeps_measuring_without_repeating_eval_every(tmp_path):
    """The run record keeps eval_every and eval_n (not compared: they change no weight), so `--resume` without them
    goes on logging the curve instead of silently stopping it."""
    from fewstep.training.recipe import run_recipe

    recipe = get_recipe("distill", "gan")
    factory = lambda d, n: (lambda folder, step: {"swd": float(n)})  # noqa: E731
    sets = ["iters=4", "batch=16", "n_dis=1", "warmup=0"]
    run_recipe(recipe, prepare(recipe, resolve_options(recipe, sets=[*sets, "eval_every=2", "eval_n=300"]),
                               tmp_path / "g", data="gmm", quality=factory, progress=False))
    assert json.loads((tmp_path / "g" / "distill.json").read_text())["measure"] == {"eval_every": 2, "eval_n": 300}
    ctx = prepare(recipe, resolve_options(recipe, sets=sets), tmp_path / "g", data="gmm", resume=True,
                  quality=factory, progress=False)
    assert ctx.train_config.eval_every == 2 and ctx.quality(None, 0) == {"swd": 300.0}
    fresh = prepare(recipe, resolve_options(recipe, sets=sets), tmp_path / "new", data="gmm", quality=factory,
                    progress=False)
    assert fresh.quality is None and fresh.train_config.eval_every is None


def test_cli_logs_fd_on_the_train_split(tmp_path):
    res = invoke(["distill", "--method", "gan", "--data", "digits", "--iters", "6", "--batch", "16", "--set",
                  "width=8", "--set", "eval_every=3", "--set", "eval_n=200", "--out", str(tmp_path / "g")])
    assert res.code == 0, res.stderr
    fds = [r["quality/fd"] for r in _rows(tmp_path / "g" / "student") if "quality/fd" in r]
    assert len(fds) == 2 and all(f > 0 for f in fds)
    res = invoke(["distill", "--method", "gan", "--data", "digits", "--iters", "6", "--set", "eval_every=3", "--set",
                  "eval_n=100", "--out", str(tmp_path / "h")])
    assert res.code == 2 and "eval_n 100 is too few" in res.stderr and not (tmp_path / "h").exists()


def test_distillation_and_the_loop_never_import_evaluation():
    code = ("import sys, fewstep.distill as d, fewstep.training.loop, fewstep.training.recipe;"
            "d.methods(); bad = [m for m in sys.modules if m.startswith('fewstep.evaluate')]; print(bad);"
            "sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
