"""Progressive distillation (issue 4) on a 2-D Gaussian-mixture teacher: the 1- and 2-step students beat the
teacher's own DDIM at the same steps (sliced Wasserstein to fresh true samples)."""

from fewstep.data.datasets import load_dataset
from fewstep.distill import DistillContext, DistillOptions, distill
from fewstep.distill.progressive import student_timesteps
from fewstep.evaluate import metrics as M
from fewstep.generate import generate
from fewstep.models.folder import load_model
from fewstep.training.loop import TrainConfig, train


def test_progressive_students_beat_teacher_ddim_at_1_and_2_steps(gmm_teacher, tmp_path):
    ds = load_dataset("gmm", "train")
    test = load_dataset("gmm", "test").x.double().numpy()
    histories = {}

    def recording_train(method, data, cfg, out, resume=False):
        histories[method.name] = train(method, data, cfg, out, resume=resume).history

    ctx = DistillContext(load_model(gmm_teacher), gmm_teacher, (ds.x, None), "gmm", tmp_path / "pd",
                         DistillOptions(steps=1, start_steps=4, iters=300),
                         TrainConfig(batch=256, lr=1e-3, warmup=10, ckpt_every=10**6, ema_decay=0.99, log_every=10,
                                     progress=False), train_fn=recording_train)
    res = distill("progressive", ctx)
    assert res.student == tmp_path / "pd" / "student"
    assert [s["stage"] for s in res.stages] == ["round_reparam", "round_4", "round_2", "student"]
    assert set(histories) == {"progressive-reparam", "progressive-4", "progressive-2", "progressive-1"}
    for name, h in histories.items():  # each round learns
        key = f"loss/{'reparam' if 'reparam' in name else 'distill'}"
        assert h[-1][key] < h[0][key], name
    t = load_model(gmm_teacher)
    for n, folder in ((1, res.student), (2, tmp_path / "pd" / "round_2")):
        s = load_model(folder)
        assert s.config.role == "student" and s.config.prediction == "v"
        assert s.config.sampling.timesteps == student_timesteps(1000, n)
        xs = generate(s, "ddim", s.config.sampling.timesteps, 2000, seed=0).x.double().numpy()
        xt = generate(t, "ddim", student_timesteps(1000, n), 2000, seed=0).x.double().numpy()
        swd_s, swd_t = M.sliced_wasserstein(xs, test), M.sliced_wasserstein(xt, test)
        # measured (4 -> 1, 300 iterations a round): students ~0.09, teacher DDIM ~0.5-1.2 (1 step), ~0.7 (2 steps)
        assert swd_s < 0.5 * swd_t, (n, swd_s, swd_t)


def test_distill_cli_writes_a_student_that_samples_with_no_flags(tmp_path):
    from typer.testing import CliRunner

    from fewstep.cli import app

    r = CliRunner()
    assert r.invoke(app, ["train", "--data", "gmm", "--preset", "mlp-small", "--steps", "20", "--batch", "64",
                          "--out", str(tmp_path / "t")]).exit_code == 0
    res = r.invoke(app, ["distill", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "s"), "--steps", "1",
                         "--start-steps", "2", "--iters", "5", "--batch", "32"])
    assert res.exit_code == 0, res.output
    student = tmp_path / "s" / "student"
    out = r.invoke(app, ["sample", "--model", str(student), "--n", "8", "--out", str(tmp_path / "x.npy")])
    assert out.exit_code == 0 and "1 steps (1 NFE per sample)" in out.output
    again = r.invoke(app, ["distill", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "s"), "--steps", "1",
                           "--start-steps", "2", "--iters", "5", "--batch", "32", "--resume"])
    assert again.exit_code == 0, again.output  # everything finished: resume skips every stage
    for args, msg in (
        (["--method", "nope"], "unknown method"),
        (["--method", "progressive", "--guidance-range", "1,3"], "--method guided"),
        (["--method", "guided"], "--guidance-range"),
        (["--method", "guided", "--guidance-range", "3,x"], "two numbers"),
        (["--steps", "3"], "powers of two"),
    ):
        bad = r.invoke(app, ["distill", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "s2"), *args])
        assert bad.exit_code == 2 and msg in bad.output, (args, bad.output)
        assert "Traceback" not in bad.output
    busy = r.invoke(app, ["distill", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "s")])
    assert busy.exit_code == 2 and "not empty" in busy.output
    # resuming with other settings would silently reuse stages built from the old ones: refused
    other = r.invoke(app, ["distill", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "s"), "--steps", "1",
                           "--start-steps", "2", "--iters", "6", "--batch", "32", "--resume"])
    assert other.exit_code == 2 and "other settings (iters)" in other.output, other.output


def test_quality_figures_skip_the_reparameterization_stage(gmm_teacher, tmp_path):
    """eval_every measures students, not the eps -> v copy of the teacher (sampled at the teacher's many steps)."""
    ds = load_dataset("gmm", "train")
    measured = {}

    def recording_train(method, data, cfg, out, resume=False, quality=None):
        measured[out.name] = quality is not None
        return train(method, data, cfg, out, resume=resume)

    ctx = DistillContext(load_model(gmm_teacher), gmm_teacher, (ds.x, None), "gmm", tmp_path / "pd",
                         DistillOptions(steps=1, start_steps=2, iters=3),
                         TrainConfig(batch=16, warmup=0, ckpt_every=10**6, progress=False), train_fn=recording_train,
                         quality=lambda folder, step: {"swd": 0.0})
    distill("progressive", ctx)
    assert measured.pop("round_reparam") is False
    assert measured and all(measured.values()), measured  # every student round is measured
