"""Bad-input corpus (issue 12), resume family: `fewstep train --resume` and `fewstep distill --resume` on a run whose
checkpoint, pointer, metrics or state record is damaged.  Each is refused with one line (exit 2, no traceback) and
the run folder is left exactly as it was; the few kinds of "damage" a crash leaves behind on its own (a partial last
line of metrics.jsonl, no complete checkpoint yet, orphaned temporary files, a model folder half written) are not
errors: those resume, and end bitwise equal to the uninterrupted run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from corpus import invoke, refused
from safetensors.torch import load_file, save_file

TRAIN = ["train", "--data", "digits", "--preset", "test8", "--conditional", "--steps", "8", "--ckpt-every", "4",
         "--batch", "16"]


def distill_argv(fx, out: Path) -> list[str]:
    return ["distill", "--teacher", str(fx.model), "--method", "progressive", "--steps", "1", "--start-steps", "1",
            "--iters", "4", "--reparam-iters", "4", "--batch", "16", "--out", str(out), "--resume"]


# --- damage to one checkpoint folder --------------------------------------------------------------------------
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00\x13garbage, not what was saved\xff" * 7)


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _missing(p: Path) -> None:
    p.unlink()


def _reshaped(p: Path) -> None:
    """The same keys, one tensor of another shape."""
    t = load_file(p)
    k = sorted(t)[0]
    t[k] = torch.zeros(t[k].numel() + 3)
    save_file(t, p)


def _other_network(fx) -> Callable[[Path], None]:
    """The file of the same name from another network (the unconditional test8 run: no class embedding)."""
    def damage(p: Path) -> None:
        p.write_bytes((fx.uncond / "checkpoints" / "step_00000004" / p.name).read_bytes())
    return damage


def _from_train_run(fx) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        p.write_bytes((fx.run / "checkpoints" / "step_00000008" / p.name).read_bytes())
    return damage


def _torch(obj) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        torch.save(obj, p)
    return damage


def _optim_map(fn) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        state = torch.load(p, weights_only=True)
        torch.save(fn(state), p)
    return damage


def _extra_group(state):
    for v in state.values():
        g = dict(v["optim"]["param_groups"][0])
        g["params"] = [max(g["params"]) + 1]
        v["optim"]["param_groups"].append(g)
    return state


def _wrong_moment(state):
    for v in state.values():
        for s in v["optim"]["state"].values():
            s["exp_avg"] = torch.zeros(3)
            break
    return state


def _unsafe(p: Path) -> None:
    import pickle

    p.write_bytes(pickle.dumps(Path("/etc/passwd")))


def _rng_map(fn) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        save_file(fn(load_file(p)), p)
    return damage


def _rename_gen(t):
    t["foo0"] = t.pop("gen0")
    return t


def _short_gen(t):
    t["gen0"] = t["gen0"][:10].clone()
    return t


def _float_gen(t):
    t["gen0"] = t["gen0"].float()
    return t


def _short_torch(t):
    t["torch0"] = t["torch0"][:100].clone()
    return t


def _state(fn) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        s = json.loads(p.read_text())
        out = fn(s)
        p.write_text(json.dumps(s if out is None else out))
    return damage


def _set(path: str, value) -> Callable[[dict], None]:
    *parents, key = path.split(".")

    def fn(s: dict) -> None:
        for k in parents:
            s = s[k]
        s[key] = value
    return fn


def _drop(path: str) -> Callable[[dict], None]:
    *parents, key = path.split(".")

    def fn(s: dict) -> None:
        for k in parents:
            s = s[k]
        del s[key]
    return fn


def _bytes(data: bytes) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        p.write_bytes(data)
    return damage


def _metrics_middle(line: bytes) -> Callable[[Path], None]:
    """A bad line inside metrics.jsonl (complete lines after it): corruption, not a kill during an append."""
    def damage(p: Path) -> None:
        good = p.read_bytes()
        p.write_bytes(good + line + b"\n" + good)
    return damage


# (id, file in the checkpoint folder or "latest"/"metrics", damage, pattern); damage(path) or damage(fx)(path)
CKPT = [
    ("modules-truncated", "modules.safetensors", _truncate, r"modules\.safetensors"),
    ("modules-garbage", "modules.safetensors", _garbage, r"modules\.safetensors"),
    ("modules-empty", "modules.safetensors", _empty, r"modules\.safetensors"),
    ("modules-missing", "modules.safetensors", _missing, r"modules\.safetensors.*missing"),
    ("modules-other-network", "modules.safetensors", _other_network, r"does not fit"),
    ("modules-reshaped", "modules.safetensors", _reshaped, r"does not fit"),
    ("ema-truncated", "ema.safetensors", _truncate, r"ema\.safetensors"),
    ("ema-garbage", "ema.safetensors", _garbage, r"ema\.safetensors"),
    ("ema-missing", "ema.safetensors", _missing, r"ema\.safetensors.*missing"),
    ("ema-other-network", "ema.safetensors", _other_network, r"ema\.safetensors.*does not fit"),
    ("ema-reshaped", "ema.safetensors", _reshaped, r"ema\.safetensors.*does not fit"),
    ("optim-empty-dict", "optim.pt", _torch({}), r"optim\.pt"),
    ("optim-list", "optim.pt", _torch([1, 2, 3]), r"optim\.pt"),
    ("optim-other-groups", "optim.pt", _other_network, r"optim\.pt"),
    ("optim-extra-group", "optim.pt", _optim_map(_extra_group), r"optim\.pt"),
    ("optim-wrong-moment-shape", "optim.pt", _optim_map(_wrong_moment), r"optim\.pt"),
    ("optim-truncated", "optim.pt", _truncate, r"optim\.pt"),
    ("optim-garbage", "optim.pt", _garbage, r"optim\.pt"),
    ("optim-missing", "optim.pt", _missing, r"optim\.pt.*missing"),
    ("optim-unsafe-pickle", "optim.pt", _unsafe, r"optim\.pt"),
    ("rng-wrong-key", "rng.safetensors", _rng_map(_rename_gen), r"rng\.safetensors"),
    ("rng-wrong-size", "rng.safetensors", _rng_map(_short_gen), r"rng\.safetensors"),
    ("rng-wrong-dtype", "rng.safetensors", _rng_map(_float_gen), r"rng\.safetensors"),
    ("rng-torch-wrong-size", "rng.safetensors", _rng_map(_short_torch), r"rng\.safetensors"),
    ("rng-garbage", "rng.safetensors", _garbage, r"rng\.safetensors"),
    ("rng-missing", "rng.safetensors", _missing, r"rng\.safetensors.*missing"),
    ("state-not-json", "state.json", _truncate, r"state\.json"),
    ("state-not-utf8", "state.json", _bytes(b'{"step": "\xff\xfe"}'), r"state\.json"),
    ("state-a-list", "state.json", _bytes(b"[1, 2]"), r"state\.json"),
    ("state-missing", "state.json", _missing, r"state\.json.*missing"),
    ("state-no-config", "state.json", _state(_drop("config")), r"state\.json.*config.*missing"),
    ("state-no-step", "state.json", _state(_drop("step")), r"state\.json.*step.*missing"),
    ("state-unknown-key", "state.json", _state(_set("colour", "blue")), r"state\.json.*colour"),
    ("state-config-unknown-key", "state.json", _state(_set("config.speed", 3)), r"state\.json.*config\.speed"),
    ("state-step-string", "state.json", _state(_set("step", "8")), r"state\.json.*step.*'8'"),
    ("state-lr-string", "state.json", _state(_set("config.lr", "abc")), r"state\.json.*config\.lr.*'abc'"),
    ("state-steps-string", "state.json", _state(_set("config.steps", "8")), r"state\.json.*config\.steps"),
    ("state-step-negative", "state.json", _state(_set("step", -4)), r"state\.json.*step.*-4"),
    ("state-step-float", "state.json", _state(_set("step", 4.5)), r"state\.json.*step.*4\.5"),
    ("state-step-past-end", "state.json", _state(_set("step", 99)), r"state\.json.*step.*99"),
    ("state-batch-zero", "state.json", _state(_set("config.batch", 0)), r"state\.json.*config\.batch.*0"),
    ("state-precision", "state.json", _state(_set("config.mixed_precision", "fp8")),
     r"state\.json.*mixed_precision.*fp8"),
    ("state-ema-updates-null", "state.json", _state(_set("ema_updates", None)), r"state\.json.*ema_updates"),
    ("state-processes", "state.json", _state(_set("processes", 2)), r"2 processes"),
    ("latest-not-utf8", "latest", _bytes(b"step_\xff\xfe0004"), r"latest"),
    ("latest-nowhere", "latest", _bytes(b"step_00000099"), r"step_00000099.*missing"),
    ("latest-empty", "latest", _bytes(b""), r"latest"),
    ("latest-outside", "latest", _bytes(b"../../elsewhere"), r"latest"),
    ("latest-a-file", "latest", _bytes(b"latest"), r"latest"),
    ("metrics-not-utf8", "metrics", _metrics_middle(b'{"step": 1, "x": "\xff\xfe"}'), r"metrics\.jsonl.*line"),
    ("metrics-garbage-line", "metrics", _metrics_middle(b"{not json"), r"metrics\.jsonl.*line"),
    ("metrics-not-a-record", "metrics", _metrics_middle(b"[1, 2, 3]"), r"metrics\.jsonl.*line"),
]
# the distillation run gets the same damage in its last stage (a subset: the loading code is the same)
DISTILL = {"modules-garbage", "modules-other-network", "ema-other-network", "optim-empty-dict", "optim-other-groups",
           "rng-wrong-key", "rng-wrong-size", "state-not-json", "state-no-config", "state-unknown-key",
           "state-step-string", "state-lr-string", "latest-not-utf8", "latest-nowhere", "metrics-not-utf8",
           "metrics-garbage-line"}
DISTILL_SOURCE = {"modules-other-network": _from_train_run, "optim-other-groups": _from_train_run}


def _needs_fx(damage) -> bool:
    return damage in (_other_network, _from_train_run)


def _apply(run: Path, ckpt: Path, target: str, damage, fx) -> None:
    fn = damage(fx) if _needs_fx(damage) else damage
    if target == "latest":
        fn(run / "checkpoints" / "latest")
    elif target == "metrics":
        fn(run / "metrics.jsonl")
    else:
        fn(ckpt / target)


def _train_case(target, damage, pattern):
    def setup(tmp: Path, fx):
        run = fx.copy(fx.run, tmp / "run")
        _apply(run, run / "checkpoints" / "step_00000008", target, damage, fx)
        return [*TRAIN, "--out", str(run), "--resume"], pattern
    return setup


def _distill_copy(tmp: Path, fx) -> Path:
    """The distillation run as a kill after its last stage's step-3 checkpoint leaves it (step 4 not yet committed)."""
    run = fx.copy(fx.distilled, tmp / "dist")
    (run / "student" / "checkpoints" / "latest").write_text("step_00000003")
    return run


def _distill_case(name, target, damage, pattern):
    damage = DISTILL_SOURCE.get(name, damage)

    def setup(tmp: Path, fx):
        run = _distill_copy(tmp, fx)
        student = run / "student"
        _apply(student, student / "checkpoints" / "step_00000003", target, damage, fx)
        return distill_argv(fx, run), pattern
    return setup


CASES = [(f"train-{name}", _train_case(target, damage, pattern)) for name, target, damage, pattern in CKPT]
CASES += [(f"distill-{name}", _distill_case(name, target, damage, pattern))
          for name, target, damage, pattern in CKPT if name in DISTILL]


def _teacher_garbage(tmp: Path, fx):
    """The teacher a distillation resumes from is damaged."""
    teacher = fx.copy(fx.run, tmp / "teacher")
    _garbage(teacher / "model.safetensors")
    run = _distill_copy(tmp, fx)
    argv = distill_argv(fx, run)
    argv[argv.index("--teacher") + 1] = str(teacher)
    return argv, r"model\.safetensors"


def _config_garbage(tmp: Path, fx):
    run = fx.copy(fx.run, tmp / "run")
    _truncate(run / "config.json")
    return [*TRAIN, "--out", str(run), "--resume"], r"config\.json"


def _other_settings(tmp: Path, fx):
    run = fx.copy(fx.run, tmp / "run")
    argv = [*TRAIN, "--out", str(run), "--resume"]
    argv.remove("--conditional")
    return argv, r"other settings"


def _no_checkpoint_without_resume(tmp: Path, fx):
    """Killed before the first complete checkpoint: without --resume the error says to pass it."""
    run = _uncommitted(tmp, fx)
    return [*TRAIN, "--out", str(run)], r"--resume"


def _model_without_checkpoints(tmp: Path, fx):
    """A model folder whose checkpoints were deleted is not a run to restart (it would overwrite the model)."""
    run = fx.copy(fx.run, tmp / "run")
    import shutil

    shutil.rmtree(run / "checkpoints")
    return [*TRAIN, "--out", str(run), "--resume"], r"checkpoint"


def _resume_nothing(tmp: Path, fx):
    (tmp / "plain").mkdir()
    (tmp / "plain" / "notes.txt").write_text("mine")
    return [*TRAIN, "--out", str(tmp / "plain"), "--resume"], r"checkpoint"


CASES += [("distill-teacher-garbage", _teacher_garbage),
          ("train-config-garbage", _config_garbage),
          ("train-other-settings", _other_settings),
          ("train-uncommitted-without-resume", _no_checkpoint_without_resume),
          ("train-model-without-checkpoints", _model_without_checkpoints),
          ("train-resume-unrelated-folder", _resume_nothing)]


@pytest.mark.parametrize("setup", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_refused(setup, fx, tmp_path):
    got = setup(tmp_path, fx)
    argv, pattern = got if isinstance(got, tuple) else (got, None)
    refused(argv, watch=[tmp_path], pattern=pattern)


# --- what a crash leaves is not an error: resume, bitwise equal to the uninterrupted run -----------------------
def _same_model(a: Path, b: Path) -> None:
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def _no_tmp(root: Path) -> None:
    left = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert not left, left


def _ok(argv: list[str]):
    res = invoke(argv)
    assert res.code == 0, f"exit {res.code}\n{res.stderr}\n{res.stdout}"
    assert "Traceback" not in res.stderr
    return res


def _uncommitted(tmp: Path, fx) -> Path:
    """A kill during the first checkpoint: step_4 half written, no ``latest``, orphaned temporary files."""
    run = fx.copy(fx.run, tmp / "run")
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_00000008")
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "step_00000004" / "optim.pt").unlink()
    (run / "checkpoints" / "step_00000004" / ".optim.pt.k3j2_x9a.tmp").write_bytes(b"half")
    (run / ".model.safetensors.ab12cd34.tmp").write_bytes(b"half")
    for f in ("model.safetensors", "config.json", "README.md"):
        (run / f).unlink()
    return run


def test_partial_last_metrics_line_is_dropped(fx, tmp_path):
    run = fx.copy(fx.run, tmp_path / "run")
    (run / "checkpoints" / "latest").write_text("step_00000004")
    for f in ("model.safetensors", "config.json", "README.md"):
        (run / f).unlink()
    (run / "metrics.jsonl").write_text('{"step": 2, "it_s": 1.0}\n{"step": 8, "it_s": 3.1, "lr": 0.00')
    _ok([*TRAIN, "--out", str(run), "--resume"])
    _same_model(fx.run, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [2, 8]


def test_partial_last_metrics_line_not_utf8_is_dropped(fx, tmp_path):
    run = fx.copy(fx.run, tmp_path / "run")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 9, "x": "\xff')
    _ok([*TRAIN, "--out", str(run), "--resume"])
    assert all(json.loads(ln)["step"] <= 8 for ln in (run / "metrics.jsonl").read_text().splitlines())


def test_no_complete_checkpoint_restarts_cleanly(fx, tmp_path):
    run = _uncommitted(tmp_path, fx)
    res = _ok([*TRAIN, "--out", str(run), "--resume"])
    assert re.search(r"restart", res.stderr + res.stdout), res.stderr
    _same_model(fx.run, run)
    _no_tmp(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000004", "step_00000008"]


def test_only_metrics_and_an_empty_step_folder_restarts(fx, tmp_path):
    """A kill (or a full disk) at the first checkpoint: metrics.jsonl and an empty step folder, nothing else."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 2, "it_s": 1.0}\n')
    _ok([*TRAIN, "--out", str(run), "--resume"])
    _same_model(fx.run, run)


def test_damaged_model_folder_weights_are_rebuilt_from_the_checkpoint(fx, tmp_path):
    """The exported model.safetensors is rewritten from the checkpoint on resume: damage there is repaired."""
    run = fx.copy(fx.run, tmp_path / "run")
    _garbage(run / "model.safetensors")
    (run / "checkpoints" / "step_00000008" / ".ema.safetensors.zz9x8y7w.tmp").write_bytes(b"half")
    _ok([*TRAIN, "--out", str(run), "--resume"])
    _same_model(fx.run, run)
    _no_tmp(run)


def test_distill_partial_metrics_line_and_orphans(fx, tmp_path):
    run = _distill_copy(tmp_path, fx)
    with open(run / "student" / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 4, "it_s"')
    (run / ".distill.json.q1w2e3r4.tmp").write_bytes(b"half")
    (run / "round_reparam" / ".config.json.q1w2e3r4.tmp").write_bytes(b"half")
    _ok(distill_argv(fx, run))
    assert (run / "student" / "model.safetensors").read_bytes() == \
        (fx.distilled / "student" / "model.safetensors").read_bytes()
    _no_tmp(run)


def test_distill_stage_without_checkpoint_restarts(fx, tmp_path):
    run = fx.copy(fx.distilled, tmp_path / "dist")
    import shutil

    shutil.rmtree(run / "student" / "checkpoints" / "step_00000004")
    (run / "student" / "checkpoints" / "latest").unlink()
    for f in ("model.safetensors", "config.json", "README.md"):
        (run / "student" / f).unlink()
    _ok(distill_argv(fx, run))
    assert (run / "student" / "model.safetensors").read_bytes() == \
        (fx.distilled / "student" / "model.safetensors").read_bytes()


def test_distill_killed_while_writing_its_run_record_restarts(fx, tmp_path):
    """A kill while distill.json is written leaves only its temporary file: --resume starts the run."""
    run = tmp_path / "dist"
    run.mkdir()
    (run / ".distill.json.a1b2c3d4.tmp").write_bytes(b'{"recipe": "progr')
    _ok(distill_argv(fx, run))
    assert (run / "student" / "model.safetensors").read_bytes() == \
        (fx.distilled / "student" / "model.safetensors").read_bytes()
    _no_tmp(run)


def test_train_resume_where_no_folder_exists_starts_it(fx, tmp_path):
    """Killed before the folder was made: a scripted "run with --resume until it finishes" must not dead-end."""
    res = _ok([*TRAIN, "--out", str(tmp_path / "new"), "--resume"])
    assert "holds no run yet" in res.stderr
    _same_model(fx.run, tmp_path / "new")


def test_distill_resume_where_no_folder_exists_starts_it(fx, tmp_path):
    res = _ok(distill_argv(fx, tmp_path / "new"))
    assert "holds no run yet" in res.stderr
    assert (tmp_path / "new" / "student" / "model.safetensors").read_bytes() == \
        (fx.distilled / "student" / "model.safetensors").read_bytes()
