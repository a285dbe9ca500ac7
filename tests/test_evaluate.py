"""`fewstep evaluate` and `fewstep bench` end to end on the tiny digits teacher, and the report in Chromium."""

import csv
import json
import os
import re
import shutil
import sqlite3
import subprocess
import time

import pytest
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.evaluate import bench

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_evaluate_writes_every_metric_and_is_reproducible(digits_teacher, tmp_path):
    model, _ = digits_teacher
    outs = []
    for i in range(2):
        r = _run("evaluate", "--model", model, "--sampler", "ddim", "--steps", "4", "--guidance", "2", "--n", "200",
                 "--seed", "3", "--json", tmp_path / f"e{i}.json")
        assert r.exit_code == 0, r.output
        outs.append(json.loads((tmp_path / f"e{i}.json").read_text()))
    a, b = outs
    for key in ("fd", "kid", "precision", "recall", "accuracy", "nfe", "samples_per_s", "floor", "fd_ci"):
        assert key in a and a[key] is not None, key
    assert a["nfe"] == 8 and a["n"] == 200
    assert a["fd"] == b["fd"] and a["kid"] == b["kid"] and a["accuracy"] == b["accuracy"]  # same seed, same numbers
    assert a["fd_ci"][0] <= a["fd"] * 1.5 and a["floor"]["fd"] > 0
    assert a["accuracy"] > 0.5  # the tiny teacher draws the requested classes far above chance (0.1)
    # a 1-step sample is far worse than 4 DDIM steps on this teacher
    r = _run("evaluate", "--model", model, "--sampler", "ddim", "--steps", "1", "--guidance", "2", "--n", "200",
             "--seed", "3", "--json", tmp_path / "one.json")
    assert json.loads((tmp_path / "one.json").read_text())["fd"] > 2 * a["fd"]


def test_evaluate_needs_data_for_a_diffusers_folder(digits_teacher, tmp_path):
    from fewstep.models.folder import export_diffusers, load_model

    model, _ = digits_teacher
    export_diffusers(load_model(model), tmp_path / "d")
    (tmp_path / "d" / "fewstep.json").unlink()  # a foreign diffusers folder records no dataset
    r = _run("evaluate", "--model", tmp_path / "d", "--sampler", "ddim", "--steps", "2", "--n", "50")
    assert r.exit_code == 2 and "--data" in r.output
    r = _run("evaluate", "--model", tmp_path / "d", "--data", "nope", "--steps", "2", "--n", "50")
    assert r.exit_code == 2 and "unknown dataset" in r.output


def _bench_config(tmp_path, teacher, spacing="trailing"):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(f"""
name: tiny
data: digits
out: out
teacher: {{folder: {teacher}}}
guidance: 2.0
n: 200
samplers: [ddim, heun]
nfe: [1, 2]
baselines: [DDIM]
baseline_spacing: {spacing}
teacher_reference: {{sampler: ddim, steps: 8}}
""")
    return cfg


def test_bench_writes_db_csv_plots_report_and_caches_rows(digits_teacher, tmp_path, monkeypatch):
    model, _ = digits_teacher
    cfg = _bench_config(tmp_path, model)
    r = _run("bench", cfg)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    for f in ("results.csv", "results.sqlite", "fd_vs_nfe.png", "fd_vs_time.png", "report.html"):
        assert (out / f).is_file(), f
    csv_rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 6  # ddim x1, x2; heun x1; DDIM x1, x2; teacher reference
    db = sqlite3.connect(out / "results.sqlite")
    assert db.execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 6
    run = db.execute("SELECT git_commit, machine, config FROM runs").fetchone()
    assert run[1] and json.loads(run[2])["name"] == "tiny"
    results = {json.loads(j)["label"]: json.loads(j) for (j,) in db.execute("SELECT result FROM rows")}
    ours = results["fewstep:ddim x2"]
    theirs = next(v for k, v in results.items() if k.startswith("diffusers:DDIM x2"))
    assert theirs["spacing"] == "trailing"  # the same algorithm on the same noise: the same samples
    assert theirs["fd"] == pytest.approx(ours["fd"], rel=1e-3)
    assert len(list((out / "grids").glob("*.png"))) == 6
    # unchanged config: every row comes from the cache, nothing is appended
    r2 = _run("bench", cfg)
    assert r2.exit_code == 0 and r2.output.count("cached") == 6
    assert db.execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 6
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2
    assert ours["model_sha256"] and ours["features_sha256"]  # what each row was measured with
    # the same weights retrained elsewhere: only the training record differs, so every row is still reused
    copy = tmp_path / "retrained"
    shutil.copytree(model, copy)
    conf = json.loads((copy / "config.json").read_text())
    conf["training"]["wall_seconds"] = conf["training"].get("wall_seconds", 0) + 123.0
    (copy / "config.json").write_text(json.dumps(conf))
    cfg.write_text(cfg.read_text().replace(str(model), str(copy)))
    r3 = _run("bench", cfg)
    assert r3.exit_code == 0 and r3.output.count("cached") == 6, r3.output
    # another feature network (e.g. a new recipe, or a retrain that is not bit-identical): nothing is reused
    monkeypatch.setattr(bench, "feature_weights_sha256", lambda data: "0123456789abcdef")
    r4 = _run("bench", cfg)
    assert r4.exit_code == 0 and r4.output.count("cached") == 0
    assert db.execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 12


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI") == "true":  # in CI install it; never skip silently there
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=False, capture_output=True)
        if not shutil.which("chromium"):
            subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True)
        return shutil.which("chromium")
    return None


def test_report_renders_in_headless_chromium(digits_teacher, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (CI installs it: apt-get install chromium)")
    model, _ = digits_teacher
    cfg = _bench_config(tmp_path, model, spacing="best")  # also exercises the spacing probe
    assert _run("bench", cfg).exit_code == 0
    report = tmp_path / "out" / "report.html"
    t0 = time.time()
    dom = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=5000", "--dump-dom", report.as_uri()],
        capture_output=True, text=True, timeout=120).stdout
    assert dom, f"chromium printed no DOM after {time.time() - t0:.0f} s"
    body = re.search(r"<body[^>]*>", dom).group(0)
    n_img = int(re.search(r'data-images="(\d+)"', body).group(1))
    ok = int(re.search(r'data-images-ok="(\d+)"', body).group(1))
    rows = int(re.search(r'data-rows="(\d+)"', body).group(1))
    assert rows == 6
    assert n_img == 2 + 6 and ok == n_img  # two plots and a grid per row, all decoded
    assert "fewstep:ddim x2" in dom


def test_bench_student_rows(digits_teacher, tmp_path):
    """Students: a fixed-timestep student at its steps, a consistency student at several, distillation time as
    the row's training time, a missing folder skipped with a message, a wrong step count refused."""
    from fewstep.data.datasets import load_dataset
    from fewstep.distill import DistillContext, DistillOptions, distill
    from fewstep.models.folder import load_model
    from fewstep.training.loop import TrainConfig

    model, _ = digits_teacher
    ds = load_dataset("digits", "train")
    tc = TrainConfig(batch=32, lr=1e-3, warmup=1, ckpt_every=10**6, log_every=5, progress=False)
    for method, opts in (("progressive", DistillOptions(steps=1, start_steps=1, iters=5, guidance=2.0)),
                         ("consistency", DistillOptions(steps=1, iters=5, teacher_steps=10, guidance=2.0))):
        distill(method, DistillContext(load_model(model), model, (ds.x, ds.y), "digits", tmp_path / method, opts, tc))
    cfg = _bench_config(tmp_path, model)
    cfg.write_text(cfg.read_text().replace("samplers: [ddim, heun]", "samplers: [ddim]").replace(
        "baselines: [DDIM]", "baselines: []") + f"""students:
  - {{name: pd, model: {tmp_path / 'progressive' / 'student'}, steps: 1}}
  - {{name: cd, model: {tmp_path / 'consistency' / 'student'}, steps: [1, 2]}}
  - {{name: cd-trailing, model: {tmp_path / 'consistency' / 'student'}, steps: 2, spacing: trailing}}
  - {{name: later, model: {tmp_path / 'missing'}}}
  - {{name: wip, model: {tmp_path / 'unfinished'}}}
""")
    (tmp_path / "unfinished").mkdir()  # a distillation run still going: its run record, no student yet
    (tmp_path / "unfinished" / "distill.json").write_text('{"method": "progressive", "options": {}}')
    r = _run("bench", cfg)
    assert r.exit_code == 0, r.output
    assert "student:later" in r.output and "student:wip" in r.output and r.output.count("skipped") == 2
    db = sqlite3.connect(tmp_path / "out" / "results.sqlite")
    results = {json.loads(j)["label"]: json.loads(j) for (j,) in db.execute("SELECT result FROM rows")}
    assert {"student:pd x1", "student:cd x1", "student:cd x2"} <= set(results)
    assert results["student:pd x1"]["nfe"] == 1 and results["student:cd x2"]["nfe"] == 2  # guidance baked in
    # a consistency student samples on its training grid by default, or at a spacing its row names
    assert results["student:cd x2"]["timesteps"] == [999.0, 499.5]
    assert results["student:cd-trailing x2 trailing"]["timesteps"] == [999.0, 499.0]
    cd = load_model(tmp_path / "consistency" / "student")
    assert results["student:cd x1"]["train_seconds"] == cd.config.training["distill_wall_seconds"] > 0
    assert results["fewstep:ddim x1"]["train_seconds"] == load_model(model).config.training["wall_seconds"]
    assert "train s" in (tmp_path / "out" / "report.html").read_text()
    # every student against the teacher's best row, and the two 1-step students against each other, paired
    diffs = list(csv.DictReader((tmp_path / "out" / "comparisons.csv").open()))
    pairs = {(d["a"], d["b"]) for d in diffs}
    assert len(diffs) == 6 and ("student:pd x1", "student:cd x1") in pairs, pairs
    assert ("student:cd x2", "student:cd-trailing x2 trailing") in pairs  # the grid fix, paired
    assert all(d["paired"] == "True" and float(d["lo"]) <= float(d["difference"]) <= float(d["hi"]) for d in diffs)
    assert "Differences" in (tmp_path / "out" / "report.html").read_text()
    # the same student in another folder (a bench run from another directory sees another path): cached
    shutil.move(tmp_path / "consistency", tmp_path / "moved")
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "consistency"), str(tmp_path / "moved")))
    again = _run("bench", cfg)
    assert again.exit_code == 0 and again.output.count("cached") == 7, again.output  # every row
    cfg.write_text(cfg.read_text().replace("model: " + str(tmp_path / "progressive" / "student") + ", steps: 1",
                                           "model: " + str(tmp_path / "progressive" / "student") + ", steps: 2"))
    bad = _run("bench", cfg)
    assert bad.exit_code == 2 and "distilled for 1 steps" in bad.output
    cfg.write_text(cfg.read_text().replace("/student, steps: 2", "/student, steps: 1, spacing: leading", 1))
    bad = _run("bench", cfg)
    assert bad.exit_code == 2 and "samples at the timesteps it was distilled for" in bad.output, bad.output
