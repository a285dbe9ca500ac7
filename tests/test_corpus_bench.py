"""The bad-input corpus, bench family (issue 12): every field of a bench YAML with the wrong type, a non-finite or
out-of-range value, missing or unknown, in the config and in its profiles; a dataset that does not fit the teacher.

Each case is refused with exit status 2, one line naming the field (a dotted path such as ``profiles.quick.n``),
no traceback and nothing written (tests/corpus.py).  The base config names a teacher folder that does not exist and
has no ``teacher.train``: a bad value that were accepted would end at "teacher folder ... is missing", which the
case's pattern does not match, so a wrongly accepted case fails fast instead of training or sampling.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from corpus import refused

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BASE = {
    "name": "corpus",
    "data": "digits",
    "out": "out",
    "teacher": {"folder": "teacher"},
    "n": 200,
    "samplers": ["ddim"],
    "nfe": [1],
    "baselines": [],
    "teacher_reference": {"sampler": "ddim", "steps": 1},
    "profiles": {"quick": {"n": 200, "nfe": [1]}},
}
TRAIN = {"preset": "test8", "steps": 1, "batch": 8}  # what a case with teacher.train trains if wrongly accepted
DELETE = object()
NAN, INF = float("nan"), float("inf")
CASES: list[tuple[str, object]] = []


def case(name: str, build, pattern: str) -> None:
    CASES.append((name, (build, pattern)))


def _set(obj: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        obj = obj.setdefault(p, {})
    if value is DELETE:
        del obj[last]
    else:
        obj[last] = value


def _write(tmp: Path, cfg: dict | str | bytes) -> Path:
    path = tmp / "bench.yaml"
    if isinstance(cfg, bytes):
        path.write_bytes(cfg)
    else:
        path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return path


def field_case(dotted: str, value, pattern: str | None = None, profile: str | None = None, train: bool = False,
               teacher=None) -> None:
    """BASE with ``dotted`` set to ``value`` (or deleted); ``profile``: run that profile; ``train``: the config has a
    (tiny) teacher.train section; ``teacher``: ``"model"`` points teacher.folder at the fixture model."""
    def build(tmp, fx):
        import copy

        cfg = copy.deepcopy(BASE)
        if train:
            cfg["teacher"]["train"] = dict(TRAIN)
        if teacher == "model":
            cfg["teacher"]["folder"] = str(fx.model)
        _set(cfg, dotted, value)
        argv = ["bench", str(_write(tmp, cfg))]
        return argv + (["--profile", profile] if profile else [])

    shown = "missing" if value is DELETE else repr(value)
    case(f"{dotted}={shown}" + (f" --profile {profile}" if profile else ""), build,
         pattern if pattern is not None else r"bench\.yaml.*" + dotted.replace(".", r"\."))


# --- the file --------------------------------------------------------------------------------------------------
case("not UTF-8", lambda t, f: ["bench", str(_write(t, "name: caf\xe9\n".encode("latin-1")))], r"bench\.yaml.*YAML")
case("broken YAML", lambda t, f: ["bench", str(_write(t, "name: [1, 2\n"))], r"bench\.yaml.*YAML")
case("a list", lambda t, f: ["bench", str(_write(t, "- 1\n- 2\n"))], r"bench\.yaml.*mapping")
case("empty", lambda t, f: ["bench", str(_write(t, ""))], r"bench\.yaml.*mapping")
case("a folder", lambda t, f: ["bench", str(t)], r"bench")
# --- top-level fields --------------------------------------------------------------------------------------------
field_case("sampler", ["ddim"], r"bench\.yaml.*sampler.*samplers")  # a typo: unknown keys are refused, known listed
field_case("teacher_folder", "x")  # BenchConfig's own fields are not config keys
field_case("raw", {})
field_case("name", 5)
field_case("name", ["a"])
field_case("name", DELETE)
field_case("data", 5)
field_case("data", ["digits"])
field_case("data", DELETE)
field_case("data", "cifar", r"bench\.yaml.*data")
field_case("data", {"source": 5}, r"bench\.yaml.*data")
field_case("data", "mnist", r"shape \(1, 8, 8\).*mnist", teacher="model")  # does not fit the teacher, as evaluate
field_case("data", "gmm", r"shape \(1, 8, 8\).*gmm", teacher="model")
field_case("out", 5)
field_case("out", ["a"])
field_case("out", None)
field_case("n", "abc")
field_case("n", "200")
field_case("n", -1)
field_case("n", 0)
field_case("n", 2.5)
field_case("n", True)
field_case("n", 100, r"--n 100|\bn\b.*100")  # too few for image data (check_n)
field_case("seed", "abc")
field_case("seed", -1)
field_case("seed", 1.5)
field_case("seed", 2**70)
field_case("guidance", "abc")
field_case("guidance", NAN)
field_case("guidance", INF)
field_case("guidance", -1.0)
field_case("samplers", "ddim")
field_case("samplers", [5])
field_case("samplers", ["euler-a"], r"bench\.yaml.*samplers.*euler-a")
field_case("samplers", {"ddim": 1})
field_case("nfe", "1,2")
field_case("nfe", 4)
field_case("nfe", [0])
field_case("nfe", [-1])
field_case("nfe", ["a"])
field_case("nfe", [1.5])
field_case("nfe", [])
field_case("baselines", "DDIM")
field_case("baselines", ["DDPM"])
field_case("baselines", [5])
field_case("baseline_spacing", "random")
field_case("baseline_spacing", 5)
field_case("teacher_reference", "dpmpp-2m")
field_case("teacher_reference", {"sampler": "ddim"})
field_case("teacher_reference.sampler", "nope")
field_case("teacher_reference.steps", "abc")
field_case("teacher_reference.steps", 0)
field_case("teacher_reference.extra", 1)
field_case("students", "pd")
field_case("students", [5], r"bench\.yaml.*students\.0")
field_case("students", [{"name": "pd"}], r"bench\.yaml.*students\.0\.model")
field_case("students", [{"name": "pd", "model": "x", "steps": "a"}], r"bench\.yaml.*students\.0\.steps")
field_case("students", [{"name": "pd", "model": "x", "steps": []}], r"bench\.yaml.*students\.0\.steps")
field_case("students", [{"name": "pd", "model": "x", "steps": [0]}], r"bench\.yaml.*students\.0\.steps")
field_case("students", [{"name": "pd", "model": "x", "steps": True}], r"bench\.yaml.*students\.0\.steps")
field_case("students", [{"name": "pd", "model": 5}], r"bench\.yaml.*students\.0\.model")
field_case("students", [{"name": 5, "model": "x"}], r"bench\.yaml.*students\.0\.name")
field_case("students", [{"name": "pd", "model": "x", "stpes": 1}], r"bench\.yaml.*students\.0\.stpes")
# --- the teacher -------------------------------------------------------------------------------------------------
field_case("teacher", "cache/t")
field_case("teacher", [])
field_case("teacher", DELETE)
field_case("teacher.folder", 5)
field_case("teacher.folder", None)
field_case("teacher.folder", DELETE)
field_case("teacher.extra", 1)
field_case("teacher.train", [1])
field_case("teacher.train", "fast")
field_case("teacher.train.lr", "abc", train=True)
field_case("teacher.train.lr", -1.0, train=True)
field_case("teacher.train.lr", NAN, train=True)
field_case("teacher.train.steps", 0, train=True)
field_case("teacher.train.steps", "abc", train=True)
field_case("teacher.train.batch", 0, train=True)
field_case("teacher.train.ema_decay", 2.0, train=True)
field_case("teacher.train.preset", "huge", train=True)
field_case("teacher.train.objective", "gan", train=True)
field_case("teacher.train.mixed_precision", "fp8", train=True)
field_case("teacher.train.stesp", 10, r"bench\.yaml.*teacher\.train.*stesp.*steps", train=True)
# --- profiles ----------------------------------------------------------------------------------------------------
field_case("profiles", [])
field_case("profiles", "quick")
field_case("profiles.quick", [], profile="quick")
field_case("profiles.quick.n", "abc", profile="quick")
field_case("profiles.quick.n", "abc")  # a profile not run is checked too
field_case("profiles.quick.nfe", "1,2", profile="quick")
field_case("profiles.quick.guidance", NAN, profile="quick")
field_case("profiles.quick.typo_key", 1, profile="quick")
field_case("profiles.quick.profiles", {}, profile="quick")
field_case("profiles.quick.teacher", {"folder": 5}, r"bench\.yaml.*profiles\.quick\.teacher\.folder", profile="quick")
field_case("profiles.quick.teacher", {"train": {"lr": "abc"}}, r"bench\.yaml.*teacher\.train\.lr", profile="quick")
field_case("profiles.quick.students", [{"name": "pd"}], r"bench\.yaml.*profiles\.quick\.students\.0\.model",
           profile="quick")
field_case("profiles.slow", {"n": 200}, r"profile 'slowest'.*quick, slow", profile="slowest")


@pytest.mark.parametrize("name,spec", CASES, ids=[c[0] for c in CASES])
def test_refused(name, spec, fx, tmp_path):
    build, pattern = spec
    argv = build(tmp_path, fx)
    refused(argv, watch=[tmp_path, fx.root], pattern=pattern)


def test_corpus_size():
    assert len(CASES) >= 50, len(CASES)


def _profiles(path: Path) -> list[str]:
    return ["full", *(yaml.safe_load(path.read_text()).get("profiles") or {})]


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_benchmark_loads(path):
    """Every profile of every committed benchmark passes the schema, as it is (its data folder may be missing on a
    fresh clone: the config is still read)."""
    from fewstep.evaluate.bench import load_bench_config

    for profile in _profiles(path):
        cfg = load_bench_config(path, profile)
        assert cfg.name and cfg.nfe and cfg.teacher_folder.is_relative_to(path.parent)


def test_the_schema_keeps_what_yaml_gives(tmp_path):
    """YAML 1.1 reads `lr: 1e-3` as text: the teacher's float settings still take it; the loaded config is typed."""
    from fewstep.evaluate.bench import load_bench_config

    path = _write(tmp_path, {**BASE, "teacher": {"folder": "t", "train": {"lr": "1e-3", "steps": 10}},
                             "students": [{"name": "pd", "model": "s", "steps": [1, 2]}]})
    cfg = load_bench_config(path, "quick")
    assert cfg.teacher_train == {"lr": "1e-3", "steps": 10} and cfg.n == 200 and cfg.nfe == [1]
    assert cfg.teacher_folder == tmp_path / "t" and cfg.out == tmp_path / "out"
    assert cfg.students == [{"name": "pd", "model": str(tmp_path / "s"), "steps": [1, 2]}]
