"""The recipe layer (issue 10, item 4): a registry found from modules, per-method options in one namespace with
the loop's, `--set` / `--config` / flags with their precedence, per-method help, and a layer that a fine-tuning
method uses as it is (nothing in it is distillation's)."""

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, fields

import pytest
import torch
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.errors import FewstepError
from fewstep.training import recipe as R
from fewstep.training.recipe import LoopOptions, Options, get_recipe, opt, resolve_options


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _error_line(res) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny unconditional gmm teacher (20 steps): options are checked before it matters what it learned."""
    out = tmp_path_factory.mktemp("recipe") / "teacher"
    res = _run("train", "--data", "gmm", "--preset", "mlp-small", "--steps", "20", "--batch", "32", "--out", out)
    assert res.exit_code == 0, res.output
    return out


# --- per-method help -------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["method first", "help first"])
def test_method_help_lists_that_methods_options(order):
    args = ["--method", "consistency", "--help"] if order == "method first" else ["--help", "--method", "consistency"]
    res = _run("distill", *args)
    assert res.exit_code == 0, res.output
    out = res.stdout
    for name in ("ema_target", "teacher_steps", "guidance_range", "reparam_iters", "loss"):  # its own
        assert f"\n  {name} " in out, name
    for name in ("iters", "batch", "lr", "warmup", "ema_decay", "grad_accum", "mixed_precision"):  # the loop's
        assert f"\n  {name} " in out, name
    for name in ("pairs", "start_steps", "preset"):  # other methods' options are not listed
        assert name not in out, name
    assert "0.95" in out and "Song et al. 2023" in out  # defaults and help lines


def test_command_help_lists_the_registered_methods():
    res = _run("distill", "--help")
    assert res.exit_code == 0
    for name in ("progressive", "guided", "consistency", "ct", "reflow"):
        assert name in res.stdout


def test_help_for_an_unknown_method_is_one_line():
    assert "unknown method 'nope'" in _error_line(_run("distill", "--method", "nope", "--help"))


# --- errors before anything is written -------------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["--method", "consistency", "--set", "no_such_option=1"], "consistency has no option no_such_option; its "
                                                              "options: steps, teacher_steps"),
    (["--method", "progressive", "--pairs", "10"], r"--pairs: progressive has no option pairs; its options: steps, "
                                                   r"start_steps, guidance, reparam_iters; the loop's: iters"),
    (["--method", "progressive", "--loss", "l2"], "progressive has no option loss"),
    (["--method", "guided", "--guidance-range", "1,3", "--guidance", "2"], "guidance_range, and the student"),
    (["--method", "progressive", "--set", "lr"], "write KEY=VALUE"),
    (["--method", "progressive", "--set", "lr=fast"], "--set lr=fast: give a number, got 'fast'"),
    (["--method", "progressive", "--set", "iters=2.5"], "give a whole number"),
    (["--method", "consistency", "--set", "ema_target=2"], r"--set ema_target=2: 2.0 is out of range"),
    (["--method", "consistency", "--set", "guidance_range=1"], "give 2 comma-separated values"),
    (["--method", "progressive", "--set", "steps=3"], "powers of two"),
    (["--method", "progressive", "--set", "mixed_precision=fp8"], "mixed_precision 'fp8'"),
    (["--method", "ct", "--set", "loss=lpips"], "loss 'lpips': use l2 or huber"),
    (["--method", "progressive", "--config", "/nonexistent/x.yaml"], "does not exist"),
    # the loop's own checks run before the run record is written (a leftover distill.json blocked both a rerun
    # and --resume)
    (["--method", "progressive", "--grad-accum", "3"], r"must divide by processes x --grad-accum = 1 x 3"),
])
def test_option_errors_are_one_line_exit_2_and_write_nothing(args, match, teacher, tmp_path):
    import re

    line = _error_line(_run("distill", "--teacher", teacher, "--out", tmp_path / "out", "--iters", "2", *args))
    assert re.search(match, line), (match, line)
    assert not (tmp_path / "out").exists()


def test_config_file_errors(teacher, tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, match in (("pairs: 10\n", "--config .*bad.yaml: pairs: progressive has no option pairs"),
                        ("- 1\n- 2\n", "should be a YAML mapping"),
                        ("lr: [1, 2\n", "is not valid YAML"),
                        ("start_steps: many\n", "start_steps: give a whole number")):
        bad.write_text(text)
        import re

        line = _error_line(_run("distill", "--teacher", teacher, "--out", tmp_path / "out", "--config", bad))
        assert re.search(match, line), (match, line)
        assert not (tmp_path / "out").exists()


# --- the namespace ---------------------------------------------------------------------------------------
def test_precedence_defaults_file_flags_set(tmp_path):
    rec = get_recipe("distill", "progressive")
    f = tmp_path / "o.yaml"
    # YAML reads 1e-3 (no dot) as text: it is parsed by the field's type like a --set value
    f.write_text("lr: 1e-3\nstart_steps: 16\niters: 7\nguidance: 2\nbatch: 32\n")
    r = resolve_options(rec, file=f, values={"start_steps": 8, "batch": 16}, sets=["start_steps=4", "seed=3"])
    assert (r.options.start_steps, r.options.guidance, r.options.steps) == (4, 2.0, 1)  # --set > flag > file
    assert (r.loop.lr, r.loop.iters, r.loop.batch, r.loop.seed) == (1e-3, 7, 16, 3)  # file, file, flag, --set
    assert r.loop.ema_decay == 0.999 and r.options.reparam_iters is None  # defaults
    cfg = r.loop.train_config(progress=False)
    assert (cfg.steps, cfg.warmup, cfg.ckpt_every, cfg.lr) == (7, 0, 1, 1e-3)  # derived as before: iters/10, iters/4
    r = resolve_options(rec, sets=["reparam_iters=5", "reparam_iters=none", "ema-decay=0.99"])
    assert r.options.reparam_iters is None and r.loop.ema_decay == 0.99  # later --set wins; dashes allowed


def test_cli_config_flags_and_set_reach_the_run_record(teacher, tmp_path):
    f = tmp_path / "pd.yaml"
    f.write_text("iters: 3\nstart_steps: 4\nbatch: 16\nlr: 1.0e-3\n")
    out = tmp_path / "pd"
    res = _run("distill", "--teacher", teacher, "--out", out, "--config", f, "--start-steps", "2", "--batch", "32",
               "--set", "batch=64", "--grad-accum", "2", "--mixed-precision", "no")
    assert res.exit_code == 0, res.output
    record = json.loads((out / "distill.json").read_text())
    assert record["options"] == {"steps": 1, "start_steps": 2, "guidance": 1.0, "reparam_iters": None, "iters": 3}
    assert (record["loop"]["batch"], record["loop"]["lr"], record["loop"]["grad_accum"]) == (64, 1e-3, 2)
    state = json.loads((out / "student" / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["config"]["grad_accum"] == 2 and state["config"]["batch"] == 64


def test_values_are_parsed_by_the_fields_type():
    assert R.coerce("1,4", tuple[float, float], "x") == (1.0, 4.0)
    assert R.coerce([1, 4], tuple[float, float] | None, "x") == (1.0, 4.0)
    assert R.coerce("none", tuple[float, float] | None, "x") is None
    assert R.coerce("1e3", int, "x") == 1000 and R.coerce(" 7 ", int, "x") == 7
    assert R.coerce("5e-4", float, "x") == 5e-4 and R.coerce(2, float, "x") == 2.0
    assert R.coerce("yes", bool, "x") is True and R.coerce("0", bool, "x") is False
    assert R.coerce(" tiny8 ", str | None, "x") == "tiny8"
    for value, tp in (("1.5", int), (True, int), ("x", float), ("maybe", bool), (3, str), (None, int)):
        with pytest.raises(FewstepError, match="^where: "):
            R.coerce(value, tp, "where")


def test_every_method_declares_only_its_own_options():
    found = R.discover("distill")
    union = set()
    for name, rec in found.items():
        assert issubclass(rec.options, Options) and rec.kind == "distill"
        own = {f.name for f in fields(rec.options)}
        union |= own
        assert "steps" in own
        for f in fields(rec.options):
            assert f.metadata.get("help"), (name, f.name)  # every option has a help line
    for name in ("pairs", "preset", "ema_target", "teacher_steps", "loss", "guidance_range"):
        assert name not in {f.name for f in fields(found["progressive"].options)}
    assert {f.name for f in fields(found["ct"].options)} == {"steps", "preset", "loss"}
    assert not any({f.name for f in fields(r.options)} == union for r in found.values())  # no method is the union
    assert not union & {f.name for f in fields(LoopOptions)}  # one namespace: no name is both


# --- a layer for every kind of method ------------------------------------------------------------------
def test_the_recipe_layer_does_not_import_distillation():
    code = ("import sys, fewstep.training.recipe as r; assert 'fewstep.distill' not in sys.modules; "
            "print(sorted(r.discover('distill')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "progressive" in out.stdout


def test_a_new_method_is_one_module(tmp_path, monkeypatch):
    """Discovery imports every module of a kind's package: a module that registers is a method, no list edited."""
    pkg = tmp_path / "extra_finetune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "noop.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from fewstep.training.recipe import Options, Recipe, opt, register

        @dataclass
        class NoopOptions(Options):
            rank: int = opt(4, "adapter rank")

        register(Recipe("noop", "finetune", lambda ctx: ctx.out, "does nothing", NoopOptions))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(R.KIND_PACKAGES, "finetune", "extra_finetune")
    monkeypatch.setattr(R, "_REGISTRY", {k: dict(v) for k, v in R._REGISTRY.items()})
    monkeypatch.setattr(R, "_DISCOVERED", {k for k in R._DISCOVERED if k != "finetune"})
    found = R.discover("finetune")
    assert list(found) == ["noop"] and found["noop"].record_file == "finetune.json"
    assert resolve_options(found["noop"], sets=["rank=8", "lr=1e-4"]).options.rank == 8
    assert "rank" in R.options_help(found["noop"]) and "adapter rank" in R.options_help(found["noop"])


class _Shift:
    """A one-phase fine-tuning method: the copied teacher network learns to add ``shift`` to its output."""

    name = "shift"

    def __init__(self, teacher, shift: float):
        import copy

        self.teacher, self.shift = teacher, shift
        self.student = copy.deepcopy(teacher.denoiser).requires_grad_(True)

    def networks(self):
        from fewstep.training.method import Networks

        return Networks(trained={"student": self.student})

    def phases(self):
        from fewstep.training.method import Phase

        def loss(batch, ctx):
            x0, _ = batch
            sigma = torch.full((x0.shape[0],), 1.0, dtype=torch.float64)
            out = self.student.raw(x0, sigma, None)
            return (out - (x0 + self.shift)).pow(2).mean(1)

        return [Phase("shift", self.student.net, loss)]

    def ema_target(self):
        return self.student.net

    def save_model(self, out, net, training):
        import copy

        from fewstep.models.folder import save_model

        cfg = copy.deepcopy(self.teacher.config)
        cfg.training = {**cfg.training, **training}
        save_model(out, cfg, net)


@dataclass
class ShiftOptions(Options):
    shift: float = opt(1.0, "what the network learns to add")


def _finetune(ctx):
    return ctx.stage(_Shift(ctx.teacher, ctx.options.shift), R.STUDENT)


def test_a_finetuning_method_runs_on_the_same_layer(teacher, tmp_path, monkeypatch):
    """A fine-tuning recipe registers under its own kind and gets stages, resume, the run record and the time
    accounting without posing as distillation."""
    from fewstep.models.folder import load_model

    monkeypatch.setattr(R, "_REGISTRY", {k: dict(v) for k, v in R._REGISTRY.items()})
    monkeypatch.setattr(R, "_DISCOVERED", R._DISCOVERED | {"finetune"})
    R.register(R.Recipe("shift", "finetune", _finetune, "learn an offset", ShiftOptions))
    out = tmp_path / "ft"
    kw = dict(teacher=teacher, data="gmm", values={"iters": 6, "batch": 32, "shift": 0.5}, progress=False)
    res = R.start("finetune", "shift", out, **kw)
    assert res.student == out / "student" and res.wall_seconds > 0
    record = json.loads((out / "finetune.json").read_text())
    assert record["method"] == "shift" and record["kind"] == "finetune" and record["options"]["shift"] == 0.5
    assert not (out / "distill.json").exists()
    cfg = load_model(out).config  # the run folder loads its final stage
    assert cfg.training["finetune_wall_seconds"] == res.wall_seconds and cfg.training["method"] == "shift"
    again = R.start("finetune", "shift", out, resume=True, **kw)  # finished: every stage skipped
    assert again.stages == res.stages
    with pytest.raises(FewstepError, match=r"other settings \(shift\)"):
        R.start("finetune", "shift", out, resume=True, **{**kw, "values": {**kw["values"], "shift": 0.25}})
    with pytest.raises(FewstepError, match="shift has no option pairs"):
        R.start("finetune", "shift", tmp_path / "new", **{**kw, "values": {"pairs": 3}})
    assert not (tmp_path / "new").exists()


def test_options_field_names_cannot_shadow_the_loop(monkeypatch):
    monkeypatch.setattr(R, "_REGISTRY", {})

    @dataclass
    class Clash(Options):
        lr: float = opt(1.0, "x")

    with pytest.raises(ValueError, match="loop's or the record's"):
        R.register(R.Recipe("clash", "finetune", lambda ctx: ctx.out, "x", Clash))


def test_yaml_words_that_yaml_reads_as_booleans(tmp_path):
    """`mixed_precision: no` (as the help text writes it) is YAML 1.1's boolean false: it still means "no"."""
    f = tmp_path / "o.yaml"
    f.write_text("mixed_precision: no\n")
    assert resolve_options(get_recipe("distill", "progressive"), file=f).loop.mixed_precision == "no"


def test_bench_teacher_settings_are_parsed_by_type():
    """YAML reads `lr: 1e-3` as text; the bench used to pass it on as a string (a traceback in AdamW)."""
    from fewstep.evaluate.bench import teacher_recipe

    opts, cfg = teacher_recipe("digits", {"lr": "1e-3", "steps": "100", "conditional": True})
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float) and cfg.steps == 100 and opts.conditional is True
    with pytest.raises(FewstepError, match="teacher.train.batch: give a whole number"):
        teacher_recipe("digits", {"batch": "many"})


def test_yaml_files_that_cannot_be_read_are_one_line(tmp_path):
    """--config and bench configs go through one reader: missing, not UTF-8 and broken YAML are one-line errors (a
    bench config that was not UTF-8 gave a UnicodeDecodeError traceback)."""
    from fewstep.evaluate.bench import load_bench_config

    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [1, 2\n")
    for path, match in ((tmp_path / "missing.yaml", "does not exist"), (latin, "is not valid YAML"),
                        (broken, "is not valid YAML")):
        with pytest.raises(FewstepError, match=f"bench config .*{path.name} {match}"):
            load_bench_config(path)
        with pytest.raises(FewstepError, match=f"--config .*{path.name} {match}"):
            resolve_options(get_recipe("distill", "progressive"), file=path)
