"""--log-with (issue 11, item 7): the loop's records also go to accelerate's trackers; unknown or missing trackers
are one line; a checkpoint written before the option existed still resumes."""

import json
import shutil

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.errors import FewstepError
from fewstep.training import trackers
from fewstep.training.loop import TrainConfig, check_config, train
from fewstep.training.method import Networks, Phase

X = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))


class Fit:
    """A linear map fitted to zero: a loss that falls, and nothing to export."""

    name = "fit"

    def __init__(self):
        torch.manual_seed(0)
        self.net = nn.Linear(2, 2)

    def networks(self) -> Networks:
        return Networks(trained={"net": self.net})

    def phases(self) -> list[Phase]:
        return [Phase("fit", self.net, lambda batch, ctx: self.net(batch[0]).pow(2).mean(1))]

    def ema_target(self) -> nn.Module:
        return self.net

    def save_model(self, out, net, training) -> None:
        pass


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=6, batch=32, lr=1e-2, warmup=1, ckpt_every=3, log_every=1, progress=False),
                          **kw})


def _metrics(out) -> dict[int, float]:
    return {r["step"]: r["loss/fit"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _scalars(out, tag: str) -> dict[int, float]:
    """What TensorBoard shows for ``tag`` (each step once: asserted)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / trackers.PROJECT))
    acc.Reload()
    events = acc.Scalars(tag)
    assert len({e.step for e in events}) == len(events), [e.step for e in events]
    return {e.step: e.value for e in events}


def test_tensorboard_holds_the_logged_loss(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(Fit(), (X, None), _cfg(log_with="tensorboard"), out)
    logged = _scalars(out, "loss/fit")
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert logged == pytest.approx(_metrics(out), rel=1e-6)  # the same numbers as metrics.jsonl
    assert set(_scalars(out, "lr")) == set(logged) and set(_scalars(out, "it_s")) == set(logged)


def test_resume_continues_the_tracker_without_repeating_steps(tmp_path):
    """Killed after the step-3 checkpoint (steps 4-6 were logged) and resumed: each step is in the log once, with
    the resumed run's values, as in metrics.jsonl."""
    pytest.importorskip("tensorboard")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(Fit(), (X, None), _cfg(log_with="tensorboard"), straight)
    shutil.copytree(straight, split)
    (split / "checkpoints" / "latest").write_text("step_00000003")
    train(Fit(), (X, None), _cfg(), split, resume=True)  # the saved setting keeps logging to tensorboard
    logged = _scalars(split, "loss/fit")
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert logged == pytest.approx(_metrics(split), rel=1e-6)


def test_a_checkpoint_from_before_log_with_still_resumes(tmp_path):
    out = tmp_path / "run"
    train(Fit(), (X, None), _cfg(), out)
    (out / "checkpoints" / "latest").write_text("step_00000003")
    state_file = out / "checkpoints" / "step_00000003" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["log_with"]  # as written by an older fewstep
    state_file.write_text(json.dumps(state))
    res = train(Fit(), (X, None), _cfg(), out, resume=True)
    assert res.steps == 6 and not (out / trackers.PROJECT).exists()


def _one_line_error(args, out):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert not out.exists()  # nothing written
    return lines[0]


def test_unknown_tracker_is_one_line(tmp_path):
    out = tmp_path / "t"
    line = _one_line_error(["train", "--data", "digits", "--preset", "test8", "--steps", "2", "--out", str(out),
                            "--log-with", "mlflow"], out)
    assert "--log-with 'mlflow': use tensorboard or wandb" in line


def test_missing_tracker_package_is_one_line(tmp_path, monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith(("tensorboard", "wandb")) else real(name, *a))
    out = tmp_path / "t"
    for name in ("tensorboard", "wandb"):
        line = _one_line_error(["train", "--data", "digits", "--preset", "test8", "--steps", "2", "--out", str(out),
                                "--log-with", name], out)
        assert f"--log-with {name} needs `pip install {name}`" in line


def test_distill_checks_the_tracker_before_anything_is_written():
    from fewstep.training.recipe import get_recipe, resolve_options

    resolved = resolve_options(get_recipe("distill", "progressive"), sets=["log_with=nosuch"])
    with pytest.raises(FewstepError, match="--log-with 'nosuch'"):
        check_config(resolved.loop.train_config(), 1)  # what prepare() runs before the run record
    resolved = resolve_options(get_recipe("distill", "progressive"), values={"log_with": "tensorboard"})
    assert resolved.loop.train_config().log_with == "tensorboard"


def test_wandb_runs_offline_unless_configured(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert trackers.tracker_kwargs("wandb", tmp_path / "run", None)["wandb"]["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert "mode" not in trackers.tracker_kwargs("wandb", tmp_path / "run", None)["wandb"]
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert "mode" not in trackers.tracker_kwargs("wandb", tmp_path / "run", None)["wandb"]
