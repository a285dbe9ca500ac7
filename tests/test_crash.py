"""No dead ends after a crash (issue 12): a real SIGKILL at chosen writes, a disk that fills at a checkpoint and a loss
that turns NaN.  After each, the same command with --resume ends bitwise equal to the uninterrupted run, and leaves
no temporary files.  (scripts/kill-campaign.py does the same with kills at random times.)"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from corpus import invoke

from fewstep.errors import FewstepError

HERE = Path(__file__).parent
TRAIN = ["train", "--data", "digits", "--preset", "test8", "--conditional", "--steps", "8", "--ckpt-every", "4",
         "--batch", "16"]


def _run(argv: list[str], kill: tuple[str, int] = ("-", 0)) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(HERE / "crash_worker.py"), kill[0], str(kill[1]), *argv],
                          env=env, capture_output=True, text=True, timeout=600)


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, in a subprocess like the killed ones (same threads, same numerics)."""
    out = tmp_path_factory.mktemp("crash") / "ref"
    res = _run([*TRAIN, "--out", str(out)])
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.parametrize("kill", [("optim.pt", 1), ("latest", 2), ("model.safetensors", 2)],
                         ids=["first-checkpoint", "second-pointer", "export-after-commit"])
def test_sigkill_then_resume_is_exact(kill, reference, tmp_path):
    out = tmp_path / "run"
    killed = _run([*TRAIN, "--out", str(out)], kill)
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    assert _tmp_files(out), "the kill should have left a temporary file"
    again = _run([*TRAIN, "--out", str(out)])  # without --resume: refused, pointing at it
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr, again.stderr
    resumed = _run([*TRAIN, "--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert not _tmp_files(out)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000008"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000004", "step_00000008"]


def test_distill_sigkill_then_resume_is_exact(fx, tmp_path):
    argv = ["distill", "--teacher", str(fx.model), "--method", "progressive", "--steps", "1", "--start-steps", "1",
            "--iters", "4", "--reparam-iters", "4", "--batch", "16"]  # checkpoints every step
    ref = _run([*argv, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    killed = _run([*argv, "--out", str(out)], ("optim.pt", 6))  # the student stage's second checkpoint
    assert killed.returncode == -9, killed.stderr
    resumed = _run([*argv, "--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "student" / "model.safetensors").read_bytes() == \
        (tmp_path / "ref" / "student" / "model.safetensors").read_bytes()
    assert not _tmp_files(out)


# --- a full disk at a checkpoint ----------------------------------------------------------------------------------
def _fill_at(monkeypatch, step_folder: str) -> None:
    import fewstep.training.loop as loop

    real = loop.save_torch_state

    def full(path, obj):
        if step_folder in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, obj)

    monkeypatch.setattr(loop, "save_torch_state", full)


def _one_line_exit_2(res) -> str:
    assert res.code == 2, (res.code, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


def test_full_disk_at_second_checkpoint_keeps_the_first(fx, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fill_at(m, "step_00000008")
        line = _one_line_exit_2(invoke([*TRAIN, "--out", str(out)]))
    assert "step_00000004" in line and "is kept" in line and "--resume" in line, line
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert not (out / "checkpoints" / "step_00000008").exists()  # half a checkpoint is not left to confuse anyone
    res = invoke([*TRAIN, "--out", str(out), "--resume"])
    assert res.code == 0, res.stderr
    assert (out / "model.safetensors").read_bytes() == (fx.run / "model.safetensors").read_bytes()
    assert not _tmp_files(out)


def test_full_disk_at_first_checkpoint_then_resume_restarts(fx, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fill_at(m, "step_00000004")
        line = _one_line_exit_2(invoke([*TRAIN, "--out", str(out)]))
    assert "no checkpoint was complete" in line, line
    res = invoke([*TRAIN, "--out", str(out), "--resume"])
    assert res.code == 0, res.stderr
    assert "restarting" in res.stderr
    assert (out / "model.safetensors").read_bytes() == (fx.run / "model.safetensors").read_bytes()


# --- the NaN guard says what is true ------------------------------------------------------------------------------
def _nan_from(monkeypatch, step: int) -> None:
    """The loss turns NaN at ``step`` (the teacher has one phase and no accumulation: one loss per step)."""
    import fewstep.training.loop as loop

    real, calls = loop.loss_value, [0]

    def value(out):
        per_sample, extra = real(out)
        calls[0] += 1
        return (per_sample * float("nan") if calls[0] > step else per_sample), extra

    monkeypatch.setattr(loop, "loss_value", value)


def test_nan_before_any_checkpoint_says_none_is_kept(tmp_path, monkeypatch):
    _nan_from(monkeypatch, 2)
    res = invoke([*TRAIN, "--out", str(tmp_path / "run")])
    line = _one_line_exit_2(res)
    assert "loss is nan at step 2" in line and "no checkpoint was complete" in line and "--lr" in line, line
    assert "is kept" not in line


def test_nan_after_a_checkpoint_names_it_and_what_to_change(tmp_path, monkeypatch):
    _nan_from(monkeypatch, 6)
    out = tmp_path / "run"
    line = _one_line_exit_2(invoke([*TRAIN, "--out", str(out)]))
    assert "step_00000004" in line and "is kept" in line, line
    assert "repeats this at step 6" in line and "lower --lr" in line and "grad_clip" in line, line
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"


def test_diverged_message_lists_mixed_precision_only_when_on():
    from fewstep.training.loop import TrainConfig, _diverged

    class Phase:
        grad_clip, lr_scale = None, 1.0

    msg = _diverged("denoise", float("nan"), 3, TrainConfig(steps=5, batch=2, mixed_precision="bf16"), Phase(), None)
    assert "--mixed-precision no" in msg
    msg = _diverged("denoise", float("nan"), 3, TrainConfig(steps=5, batch=2), Phase(), Path("c/step_00000002"))
    assert "--mixed-precision" not in msg and "step_00000002" in msg


def test_fewstep_error_is_what_the_guard_raises(tmp_path, monkeypatch):
    from fewstep.data.datasets import load_dataset
    from fewstep.models.backbones import preset_backbone
    from fewstep.training.loop import TrainConfig, train
    from fewstep.training.teacher import TeacherMethod, TeacherSpec

    _nan_from(monkeypatch, 0)
    ds = load_dataset("digits", "train")
    kind, cfg = preset_backbone("test8", ds.sample_shape, 0)
    method = TeacherMethod(TeacherSpec(backbone=kind, backbone_config=cfg, sample_shape=ds.sample_shape))
    with pytest.raises(FewstepError, match="loss is nan at step 0"):
        train(method, (ds.x, None), TrainConfig(steps=5, batch=8, progress=False), tmp_path / "nan")
