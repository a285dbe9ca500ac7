"""The bad-input corpus, command-line family (issue 12): numbers, names, paths and outputs of every command.

Each case is refused with exit status 2, one line (at most two) starting with ``error:``, no traceback, and
nothing written (tests/corpus.py).  Add a case here for every new command and option (README: contributing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from corpus import refused

NUMS = {  # flag -> bad values (each one a case), per command below
    "nonneg_int": ["-1", "abc", "1.5"],
    "pos_int": ["0", "-1", "abc", "1.5", "1e12"],
    "float": ["nan", "inf", "-inf", "abc"],
}


def _train(tmp: Path, fx, *extra: str) -> list[str]:
    return ["train", "--data", "digits", "--preset", "test8", "--steps", "2", "--out", str(tmp / "run"), *extra]


def _deep(tmp: Path) -> Path:
    """A model folder whose config.json is an array nested 100,000 deep (json's recursion limit)."""
    (tmp / "m").mkdir()
    (tmp / "m" / "config.json").write_text("[" * 100000 + "]" * 100000)
    (tmp / "m" / "model.safetensors").write_bytes(b"")
    return tmp / "m"


def _sample(tmp: Path, fx, *extra: str) -> list[str]:
    return ["sample", "--model", str(fx.model), "--out", str(tmp / "x.npy"), "--n", "4", *extra]


def _evaluate(tmp: Path, fx, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(fx.model), "--n", "200", "--steps", "1", *extra]


def _distill(tmp: Path, fx, method: str, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(fx.model), "--method", method, "--iters", "2", "--out", str(tmp / "d"),
            *extra]


BENCH = str(Path(__file__).resolve().parent.parent / "benchmarks" / "digits.yaml")
CASES: list[tuple[str, object]] = []


def case(name: str, build, pattern: str | None = None) -> None:
    CASES.append((name, (build, pattern)))


# --- train: numbers ------------------------------------------------------------------------------------------
for flag in ("--steps", "--batch", "--ckpt-every", "--grad-accum"):
    for v in NUMS["pos_int"]:
        case(f"train {flag} {v}", lambda t, f, fl=flag, v=v: _train(t, f, fl, v), flag)
for v in ["-1", "0", "nan", "inf", "abc", "-inf"]:
    case(f"train --lr {v}", lambda t, f, v=v: _train(t, f, "--lr", v), "--lr")
for v in ["nan", "2", "-1", "1", "inf"]:
    case(f"train --ema-decay {v}", lambda t, f, v=v: _train(t, f, "--ema-decay", v), "--ema-decay")
for v in ["-1", str(2**70), "abc"]:
    case(f"train --seed {v}", lambda t, f, v=v: _train(t, f, "--seed", v), "--seed")
for flag, v in [("--mixed-precision", "fp8"), ("--objective", "gan"), ("--prediction", "score"),
                ("--beta-schedule", "cosine2"), ("--preset", "huge"), ("--log-with", "mlflow2"),
                ("--threads", "0"), ("--threads", "-2"), ("--threads", "abc"), ("--data", "cifar"),
                ("--data", "/nonexistent/folder"), ("--nope", "1")]:
    case(f"train {flag} {v}", lambda t, f, fl=flag, v=v: _train(t, f, fl, v) if fl != "--data"
         else ["train", "--data", v, "--out", str(t / "run"), "--steps", "2"], flag.lstrip("-").replace("-", "."))
case("train --prediction v with edm", lambda t, f: _train(t, f, "--objective", "edm", "--prediction", "v"))
case("train --batch not divisible by grad-accum", lambda t, f: _train(t, f, "--batch", "10", "--grad-accum", "3"),
     "--batch")
case("train no --out", lambda t, f: ["train", "--data", "digits"], "--out")
case("train no --data", lambda t, f: ["train", "--out", str(t / "run")], "--data")
# --- train: own-data flags ---------------------------------------------------------------------------------
for flag, v in [("--test-fraction", "nan"), ("--test-fraction", "-0.1"), ("--test-fraction", "1.5"),
                ("--test-fraction", "inf"), ("--resolution", "0"), ("--resolution", "-4"), ("--channels", "2"),
                ("--channels", "0"), ("--range", "abc"), ("--range", "0,2"), ("--range", "nan,1"),
                ("--memory-budget", "abc"), ("--memory-budget", "-1G"), ("--labels", "/nonexistent.npy"),
                ("--data-test", "/nonexistent")]:
    case(f"train own data {flag} {v}",
         lambda t, f, fl=flag, v=v: ["train", "--data", str(_own(t)), "--out", str(t / "run"), "--steps", "2", fl, v])
case("train --labels with a built-in set", lambda t, f: _train(t, f, "--labels", str(t / "y.npy")), "--labels")
case("train data flags without --data",
     lambda t, f: ["sample", "--model", str(f.model), "--out", str(t / "x.npy"), "--range", "0,1"])


def _own(tmp: Path) -> Path:
    """A small valid array source (a bad flag, not bad data, is what the case tests)."""
    path = tmp / "own.npy"
    if not path.exists():
        np.save(path, np.random.default_rng(0).integers(0, 255, (40, 8, 8), dtype=np.uint8))
    return path


# --- train: outputs ----------------------------------------------------------------------------------------
def _file(tmp: Path, name: str = "afile") -> Path:
    (tmp / name).write_text("not a folder")
    return tmp / name


def _full(tmp: Path) -> Path:
    """A folder that holds something else."""
    (tmp / "full").mkdir()
    (tmp / "full" / "notes.txt").write_text("mine")
    return tmp / "full"


case("train --out is a file", lambda t, f: ["train", "--data", "digits", "--steps", "2", "--out", str(_file(t))],
     "is a file")
case("train --out below a file",
     lambda t, f: ["train", "--data", "digits", "--steps", "2", "--out", str(_file(t) / "run")], "below it")
case("train --out non-empty folder", lambda t, f: ["train", "--data", "digits", "--steps", "2", "--out", str(_full(t))],
     "not an empty folder")
case("train --out holds a finished run (no --resume)", lambda t, f: ["train", "--data", "digits", "--steps", "2",
                                                                      "--out", str(f.run)], "--resume")
case("train --resume on another data set", lambda t, f: ["train", "--data", "mnist", "--steps", "8", "--resume",
                                                          "--out", str(f.copy(f.run, t / "r"))])

# --- sample ------------------------------------------------------------------------------------------------
for flag in ("--steps", "--n", "--batch-size"):
    for v in NUMS["pos_int"]:
        case(f"sample {flag} {v}", lambda t, f, fl=flag, v=v: _sample(t, f, fl, v), flag)
case("sample --n 10**12", lambda t, f: _sample(t, f, "--n", str(10**12)), "memory")
for flag in ("--eta", "--guidance"):
    for v in NUMS["float"]:
        case(f"sample {flag} {v}", lambda t, f, fl=flag, v=v: _sample(t, f, fl, v), flag)
case("sample --eta -1", lambda t, f: _sample(t, f, "--eta", "-1"), "--eta")
for v in ["-1", str(2**70), "abc"]:
    case(f"sample --seed {v}", lambda t, f, v=v: _sample(t, f, "--seed", v), "--seed")
for v in ["-1", "99", "10", "abc"]:
    case(f"sample --class {v}", lambda t, f, v=v: _sample(t, f, "--class", v), "class")
for flag, v in [("--sampler", "plms"), ("--spacing", "random"), ("--timesteps", "abc"),
                ("--timesteps", "1,500,999"), ("--timesteps", "5000,10"), ("--timesteps", "999,-5"),
                ("--timesteps", "nan,10"), ("--timesteps", "999,999"), ("--timesteps", ","),
                ("--threads", "0"), ("--threads", "-1")]:
    case(f"sample {flag} {v}", lambda t, f, fl=flag, v=v: _sample(t, f, fl, v), flag.lstrip("-").rstrip("s"))
def _latents_of(t: Path, dtype: str) -> str:
    import numpy as np

    np.save(t / "lat.npy", np.ones((4, 1, 8, 8), dtype=dtype))
    return str(t / "lat.npy")


for dtype in ("complex64", "bool"):
    case(f"sample --latents of {dtype}", lambda t, f, d=dtype: _sample(t, f, "--latents", _latents_of(t, d)),
         "real numbers")
case("train --batch 10**12", lambda t, f: ["train", "--data", "digits", "--preset", "test8", "--steps", "2",
                                           "--batch", str(10**12), "--out", str(t / "o")], "--batch")
case("train --out with a name too long", lambda t, f: ["train", "--data", "digits", "--preset", "test8", "--steps",
                                                       "2", "--out", str(t / ("a" * 300))], "too long")
case("sample --out with a name too long", lambda t, f: _sample(t, f)[:-2] + ["--out", str(t / ("b" * 300 + ".npy")),
                                                                            "--n", "4"], "too long")
def _labelled(t: Path, top: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(t / "x.npy", rng.integers(0, 255, (40, 8, 8), dtype=np.uint8))
    np.save(t / "y.npy", np.arange(40) % top)
    return ["--data", str(t / "x.npy"), "--labels", str(t / "y.npy")]


case("distill --data with labels beyond the teacher's classes",
     lambda t, f: _distill(t, f, "progressive", *_labelled(t, 40)), "labels up to 39")
case("train --seed 2**53+1", lambda t, f: ["train", "--data", "digits", "--preset", "test8", "--steps", "2",
                                           "--seed", str(2**53 + 1), "--out", str(t / "o")], "--seed")
case("distill --set seed=2**53+1", lambda t, f: _distill(t, f, "progressive", "--set", f"seed={2**53 + 1}"), "seed")
case("info on a config nested 100,000 deep", lambda t, f: ["info", str(_deep(t))], "config")
case("sample --guidance on a student distilled without guidance",
     lambda t, f: ["sample", "--model", str(f.distilled / "student"), "--guidance", "2", "--out", str(t / "x.npy")],
     "baked in")
case("sample --spacing grid on a model with no training grid", lambda t, f: _sample(t, f, "--spacing", "grid"),
     "no training grid")
case("sample --out .txt", lambda t, f: ["sample", "--model", str(f.model), "--out", str(t / "x.txt")], ".npy")
case("sample --out is a folder", lambda t, f: ["sample", "--model", str(f.model), "--out",
                                               str((t / "d.npy").mkdir() or t / "d.npy")], "folder")
case("sample --out below a file", lambda t, f: ["sample", "--model", str(f.model), "--out",
                                                str(_file(t) / "x.npy")], "below it")
case("sample --model missing", lambda t, f: ["sample", "--model", str(t / "nope"), "--out", str(t / "x.npy")])
case("sample --model a file", lambda t, f: ["sample", "--model", str(_file(t)), "--out", str(t / "x.npy")])
case("sample --model an empty folder", lambda t, f: ["sample", "--model", str((t / "e").mkdir() or t / "e"),
                                                     "--out", str(t / "x.npy")])


def _latents(tmp: Path, arr) -> Path:
    np.save(tmp / "lat.npy", arr, allow_pickle=True)
    return tmp / "lat.npy"


for name, make in [("nan", lambda: np.full((4, 1, 8, 8), np.nan, np.float32)),
                   ("inf", lambda: np.full((4, 1, 8, 8), np.inf, np.float32)),
                   ("one nan", lambda: np.where(np.arange(256).reshape(4, 1, 8, 8) == 7, np.nan, 0).astype(
                       np.float32)),
                   ("wrong shape", lambda: np.zeros((4, 3, 8, 8), np.float32)),
                   ("wrong size", lambda: np.zeros((4, 1, 16, 16), np.float32)),
                   ("2-D", lambda: np.zeros((4, 64), np.float32)),
                   ("empty", lambda: np.zeros((0, 1, 8, 8), np.float32)),
                   ("object (pickle)", lambda: np.array([{"a": 1}], dtype=object)),
                   ("strings", lambda: np.array(["a", "b"]))]:
    case(f"sample --latents {name}", lambda t, f, m=make: _sample(t, f, "--latents", str(_latents(t, m()))),
         "--latents")
case("sample --latents missing", lambda t, f: _sample(t, f, "--latents", str(t / "none.npy")), "--latents")
case("sample --latents not npy", lambda t, f: _sample(t, f, "--latents", str(_file(t, "l.npy"))), "--latents")

# --- info, export ------------------------------------------------------------------------------------------
case("info missing", lambda t, f: ["info", str(t / "nope")])
case("info a file", lambda t, f: ["info", str(_file(t))])
case("info empty folder", lambda t, f: ["info", str((t / "e").mkdir() or t / "e")])
case("info no argument", lambda t, f: ["info"])
case("export missing model", lambda t, f: ["export", str(t / "nope"), str(t / "out")])
case("export out is a file", lambda t, f: ["export", str(f.model), str(_file(t))], "file")
case("export out below a file", lambda t, f: ["export", str(f.model), str(_file(t) / "out")], "below it")
case("export out non-empty", lambda t, f: ["export", str(f.model), str(_full(t))])
case("export to the model itself", lambda t, f: ["export", str(f.model), str(f.model)])

# --- evaluate ----------------------------------------------------------------------------------------------
for v in ["0", "1", "2", "-1", "199", "abc", "1e12", str(10**9)]:
    case(f"evaluate --n {v}", lambda t, f, v=v: ["evaluate", "--model", str(f.model), "--n", v], "--n|n ")
for flag in ("--guidance", "--eta"):
    for v in NUMS["float"]:
        case(f"evaluate {flag} {v}", lambda t, f, fl=flag, v=v: _evaluate(t, f, fl, v), flag)
for flag, v in [("--seed", "-1"), ("--seed", str(2**70)), ("--batch-size", "0"), ("--steps", "0"),
                ("--sampler", "plms"), ("--spacing", "odd"), ("--timesteps", "abc"), ("--timesteps", "1,2"),
                ("--data", "cifar"), ("--data", "mnist"), ("--data", "gmm"), ("--eta", "-1"),
                ("--data", "/nonexistent.npy")]:
    case(f"evaluate {flag} {v}", lambda t, f, fl=flag, v=v: _evaluate(t, f, fl, v), None)
case("evaluate --json is a folder", lambda t, f: _evaluate(t, f, "--json", str(t)), "--json")
case("evaluate --json below a file", lambda t, f: _evaluate(t, f, "--json", str(_file(t) / "r.json")), "--json")
case("evaluate --model missing", lambda t, f: ["evaluate", "--model", str(t / "nope")])

# --- distill -----------------------------------------------------------------------------------------------
METHOD_BAD = {  # option -> bad values, for --set (and the flag of the same name where there is one)
    "iters": ["0", "-1", "abc", "1.5"],
    "batch": ["0", str(2**30), "abc"],
    "lr": ["0", "-1", "nan", "inf", "abc"],
    "ema_decay": ["nan", "2", "-1", "1"],
    "seed": ["-1", str(2**70)],
    "grad_accum": ["0", "-2"],
    "mixed_precision": ["fp8"],
    "warmup": ["-1", "nan"],
    "weight_decay": ["-1", "nan"],
    "grad_clip": ["-1", "inf"],
    "ckpt_every": ["0"],
    "log_every": ["0"],
    "hflip": ["maybe"],
    "log_with": ["mlflow2"],
}
FLAGGED = {"iters", "batch", "lr", "ema_decay", "seed", "grad_accum", "mixed_precision"}
for key, values in METHOD_BAD.items():
    for v in values:
        case(f"distill --set {key}={v}", lambda t, f, k=key, v=v: _distill(t, f, "progressive", "--set", f"{k}={v}"),
             key.replace("_", "."))
        if key in FLAGGED:
            flag = "--" + key.replace("_", "-")
            case(f"distill {flag} {v}", lambda t, f, fl=flag, v=v: _distill(t, f, "progressive", fl, v),
                 key.replace("_", "."))
OWN_BAD = {
    "progressive": {"steps": ["0", "3", "-1", "2048"], "start_steps": ["0", "3", "2048"],
                    "guidance": ["nan", "-1", "inf"], "reparam_iters": ["0"]},
    "guided": {"guidance_range": ["abc", "4,1", "nan,1", "-1,2", "1"], "steps": ["0", "3"], "start_steps": ["5"]},
    "consistency": {"teacher_steps": ["0", "-1", "1e9", "2000", "abc"], "ema_target": ["2", "-1", "nan", "1"],
                    "loss": ["l1"], "guidance": ["nan", "-2"], "steps": ["0"]},
    "ct": {"steps": ["0", "-1"], "loss": ["l3"], "preset": ["huge"]},
    "reflow": {"pairs": ["0", "-1", "1e12"], "teacher_steps": ["0", "5000"], "steps": ["0"], "loss": ["x"],
               "guidance": ["nan"]},
    "dmd2": {"steps": ["0", "-1", "17", "1.5"], "fake_updates": ["0", "-1", "abc"], "gan": ["maybe", "2"],
             "gan_g": ["nan", "-1", "inf"], "gan_d": ["-0.5", "nan"], "guidance": ["nan", "-1"],
             "reparam_iters": ["0"]},
    "boot": {"grid_steps": ["0", "-1", "1000", "abc", "1e9"], "guidance": ["nan", "-1", "inf"],
             "weighting": ["x", "d3", "1"], "zero_out": ["maybe", "2"]},
}
for method, opts in OWN_BAD.items():
    for key, values in opts.items():
        for v in values:
            case(f"distill {method} --set {key}={v}",
                 lambda t, f, m=method, k=key, v=v: _distill(t, f, m, "--set", f"{k}={v}"), None)
for flag, v in [("--teacher-steps", "0"), ("--teacher-steps", "1000000000"), ("--ema-target", "2"),
                ("--ema-target", "-1"), ("--ema-target", "nan"), ("--guidance", "nan"), ("--guidance", "inf"),
                ("--guidance-range", "nan,2"), ("--loss", "l1")]:
    case(f"distill consistency {flag} {v}", lambda t, f, fl=flag, v=v: _distill(t, f, "consistency", fl, v), None)
case("distill dmd2 --guidance on an unconditional teacher",
     lambda t, f: ["distill", "--teacher", str(f.uncond), "--method", "dmd2", "--guidance", "2", "--iters", "2",
                   "--out", str(t / "d")], "null class")
case("distill dmd2 --set teacher_steps (another method's option)",
     lambda t, f: _distill(t, f, "dmd2", "--set", "teacher_steps=4"), "teacher_steps")
case("distill boot --guidance on an unconditional teacher",
     lambda t, f: ["distill", "--teacher", str(f.uncond), "--method", "boot", "--guidance", "2", "--iters", "2",
                   "--out", str(t / "d")], "null class")
for method in ("dmd2", "boot"):
    case(f"distill {method} from a distilled student",
         lambda t, f, m=method: ["distill", "--teacher", str(f.distilled / "student"), "--method", m, "--iters", "2",
                                 "--out", str(t / "d")], "distilled student")
case("distill consistency --steps above --teacher-steps",
     lambda t, f: _distill(t, f, "consistency", "--steps", "8", "--teacher-steps", "4"), "teacher_steps")
case("distill boot --steps 2 (one-step method)", lambda t, f: _distill(t, f, "boot", "--steps", "2"), "steps")
for method in ("progressive", "guided", "consistency", "ct", "reflow", "dmd2", "boot"):
    case(f"distill {method} --set unknown", lambda t, f, m=method: _distill(t, f, m, "--set", "nope=1"), "nope")
    case(f"distill {method} --set no value", lambda t, f, m=method: _distill(t, f, m, "--set", "iters"), "iters")
    case(f"distill {method} --out is a file",
         lambda t, f, m=method: ["distill", "--teacher", str(f.model), "--method", m, "--out", str(_file(t))],
         "file")
    case(f"distill {method} --out below a file",
         lambda t, f, m=method: ["distill", "--teacher", str(f.model), "--method", m, "--out",
                                 str(_file(t) / "d")], "below it")


def _gan(tmp: Path, *extra: str) -> list[str]:
    return ["distill", "--method", "gan", "--data", "digits", "--iters", "2", "--out", str(tmp / "d"), *extra]


GAN_BAD = {"variant": ["x", "wgan"], "codes": ["1", "0", "abc", "1e9"], "n_dis": ["0", "-1", "1.5"], "loss": ["l2"],
           "width": ["0", "3", "1e9"], "z_dim": ["0", "-5"], "steps": ["2", "0"], "info_weight": ["-1", "nan"],
           "eval_every": ["0", "-1", "abc"], "eval_n": ["5", "1e9"]}
for key, values in GAN_BAD.items():
    for v in values:
        case(f"distill gan --set {key}={v}", lambda t, f, k=key, v=v: _gan(t, "--set", f"{k}={v}"), None)
case("distill gan with --teacher", lambda t, f: [*_gan(t), "--teacher", str(f.model)], "no teacher")
case("distill gan without --data", lambda t, f: ["distill", "--method", "gan", "--out", str(t / "d")], "--data")
case("distill gan codes without infogan", lambda t, f: _gan(t, "--set", "codes=4"), "variant=infogan")
case("distill gan info_weight without infogan", lambda t, f: _gan(t, "--set", "info_weight=2"), "infogan")
case("distill gan cgan on unlabelled data",
     lambda t, f: ["distill", "--method", "gan", "--data", "moons", "--set", "variant=cgan", "--iters", "2", "--out",
                   str(t / "d")], "labelled data")
case("distill gan --guidance", lambda t, f: _gan(t, "--guidance", "2"), "guidance")
case("distill gan eval_n above the train split", lambda t, f: _gan(t, "--set", "eval_every=1", "--set",
                                                                   "eval_n=5000"), "eval_n")
case("sample --code on a model without codes",
     lambda t, f: ["sample", "--model", str(f.model), "--code", "1", "--out", str(t / "x.npy")], "--code")
case("distill unknown method", lambda t, f: _distill(t, f, "dmd9"), "dmd9")
case("distill teacher missing", lambda t, f: ["distill", "--teacher", str(t / "nope"), "--out", str(t / "d")])
case("distill no teacher", lambda t, f: ["distill", "--out", str(t / "d")], "teacher")
case("distill --steps with ct flag", lambda t, f: _distill(t, f, "progressive", "--pairs", "10"), "pairs")


def _config(tmp: Path, text: str | bytes) -> Path:
    p = tmp / "opts.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


for name, text in [("a list", "- 1\n- 2\n"), ("not yaml", "a: [1, 2\n"), ("not utf-8", b"iters: \xff\xfe\n"),
                   ("unknown key", "nope: 1\n"), ("bad number", "iters: abc\n"), ("nan lr", "lr: .nan\n"),
                   ("nested", "iters: {a: 1}\n"), ("a string", "hello\n"), ("negative batch", "batch: -4\n")]:
    case(f"distill --config {name}", lambda t, f, x=text: _distill(t, f, "progressive", "--config",
                                                                    str(_config(t, x))), "--config")
case("distill --config missing", lambda t, f: _distill(t, f, "progressive", "--config", str(t / "none.yaml")),
     "--config")

# --- bench (the YAML itself is tests/test_corpus_bench.py) --------------------------------------------------
case("bench config missing", lambda t, f: ["bench", str(t / "none.yaml")])
case("bench config a folder", lambda t, f: ["bench", str(t)])
case("bench --threads 0", lambda t, f: ["bench", BENCH, "--threads", "0"], "threads")
case("bench unknown profile", lambda t, f: ["bench", BENCH, "--profile", "medium"], "medium")
case("bench --out below a file", lambda t, f: ["bench", BENCH, "--profile", "quick", "--out",
                                               str(_file(t) / "b")], "below it")
case("bench --out is a file", lambda t, f: ["bench", BENCH, "--profile", "quick", "--out",
                                            str(_file(t))], "file")
# --- usage errors (one line, not typer's panel) -------------------------------------------------------------
for cmd in ("train", "sample", "evaluate", "distill", "bench", "export", "info"):
    case(f"{cmd} unknown option", lambda t, f, c=cmd: [c, "--no-such-flag"], "no-such-flag|Missing")
case("unknown command", lambda t, f: ["trian"], "trian")


@pytest.mark.parametrize("name,spec", CASES, ids=[c[0] for c in CASES])
def test_refused(name, spec, fx, tmp_path):
    build, pattern = spec
    argv = build(tmp_path, fx)
    refused(argv, watch=[tmp_path, fx.root], pattern=pattern)


def test_corpus_size():
    assert len(CASES) >= 200, len(CASES)


READ_ONLY = {  # a read-only filesystem or a folder without write permission (os.access says no for both)
    "train": lambda t, f: ["train", "--data", "digits", "--steps", "2", "--out", str(t / "ro" / "run")],
    "sample": lambda t, f: ["sample", "--model", str(f.model), "--out", str(t / "ro" / "x.npy")],
    "sample (replace a file)": lambda t, f: ["sample", "--model", str(f.model), "--out", str(_file(t / "ro", "x.npy"))],
    "export": lambda t, f: ["export", str(f.model), str(t / "ro" / "exp")],
    "distill": lambda t, f: _distill(t / "ro", f, "progressive"),
    "evaluate --json": lambda t, f: _evaluate(t, f, "--json", str(t / "ro" / "r.json")),
    "bench --out": lambda t, f: ["bench", BENCH, "--profile", "quick", "--out", str(t / "ro" / "b")],
}


@pytest.mark.parametrize("name", list(READ_ONLY))
def test_read_only_output(name, fx, tmp_path, monkeypatch):
    import os

    (tmp_path / "ro").mkdir()
    argv = READ_ONLY[name](tmp_path, fx)
    real = os.access
    ro = str(tmp_path / "ro")
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(ro) and mode & os.W_OK
                        else real(p, mode, **kw))
    refused(argv, watch=[tmp_path, fx.root], pattern="not writable|cannot be replaced")


@pytest.mark.parametrize("err", ["ENOSPC", "EDQUOT", "EROFS"])
def test_full_disk_while_writing_samples(err, fx, tmp_path, monkeypatch):
    """A disk that fills (or turns read-only) after the checks: one line, exit 2, no traceback."""
    import errno
    import os

    import fewstep.images

    def full(path, x):
        raise OSError(getattr(errno, err), os.strerror(getattr(errno, err)), str(path))

    monkeypatch.setattr(fewstep.images, "write_samples", full)
    refused(_sample(tmp_path, fx), watch=[tmp_path, fx.root], pattern="free space")
