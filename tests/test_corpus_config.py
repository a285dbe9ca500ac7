"""The bad-input corpus, model-folder family (issue 12): a model folder is data, never instructions.

Every field of a fewstep ``config.json`` with the wrong type, a non-finite or out-of-range value, missing or unknown;
a ``backbone_config`` that names a hub repository; diffusers folders whose configs name other classes or hold bad
values; weights holding NaN.  Each case is refused with exit status 2, one line (at most two) naming the file and the
field, no traceback, nothing written (tests/corpus.py), and no connection attempted: every case runs with the
network guarded (a connection raises :class:`NetworkAttempt`, which nothing in fewstep may catch) and with the hub's
offline mode off, as a user's machine has it.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from corpus import invoke, refused
from safetensors.torch import load_file, save_file

HUB = "google/ddpm-cifar10-32"


class NetworkAttempt(BaseException):
    """Raised by the guarded socket: a BaseException, so no ``except Exception`` on the way hides it."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    import huggingface_hub.constants

    def guard(*args, **kwargs):
        raise NetworkAttempt(f"fewstep tried to reach the network: {args[1:] or args}")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as on a user's machine
    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket.socket, "connect_ex", guard)
    monkeypatch.setattr(socket, "getaddrinfo", guard)
    monkeypatch.setattr(socket, "create_connection", guard)


# --- folders to damage --------------------------------------------------------------------------------------
FILES = ("config.json", "model.safetensors", "README.md")


def _model(tmp: Path, src: Path) -> Path:
    """A private copy of a fewstep model folder (its three files, not the run's checkpoints)."""
    m = tmp / "m"
    m.mkdir()
    for f in FILES:
        shutil.copy(src / f, m / f)
    return m


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))  # json writes NaN and Infinity as the literals Python's reader accepts


def _set(obj: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        obj = obj[p]
    if value is DELETE:
        del obj[last]
    else:
        obj[last] = value


DELETE = object()
NAN, INF = float("nan"), float("inf")


def _cmd(cmd: str, m: Path, tmp: Path) -> list[str]:
    return {"info": ["info", str(m)],
            "sample": ["sample", "--model", str(m), "--out", str(tmp / "s.npy"), "--n", "2", "--steps", "1"],
            "export": ["export", str(m), str(tmp / "exported")],
            "evaluate": ["evaluate", "--model", str(m), "--n", "200", "--steps", "1", "--json", str(tmp / "e.json")],
            }[cmd]


CASES: list[tuple[str, object]] = []


def case(name: str, build, pattern: str | None = None) -> None:
    CASES.append((name, (build, pattern)))


def config_case(dotted: str, value, pattern: str | None = None, cmd: str = "info", model: str = "model") -> None:
    """``config.json``'s ``dotted`` field set to ``value`` (or deleted); the error names the file and the field."""
    def build(tmp, fx):
        m = _model(tmp, getattr(fx, model))
        _edit_json(m / "config.json", lambda o: _set(o, dotted, value))
        return _cmd(cmd, m, tmp)

    shown = "missing" if value is DELETE else repr(value)
    case(f"config {dotted}={shown} ({cmd})", build,
         pattern if pattern is not None else r"config\.json.*" + dotted.replace(".", r"\."))


# --- top-level fields ---------------------------------------------------------------------------------------
config_case("format", "fewstep-model/99", r"config\.json.*format")
config_case("format", 1, r"config\.json")
config_case("fewstep_version", 5)
config_case("num_clases", 10, r"config\.json.*num_clases.*num_classes")  # a typo: unknown keys are refused
config_case("backbone", "transformer", r"config\.json.*backbone.*unet2d")
config_case("backbone", 5)
config_case("backbone", DELETE)
config_case("backbone_config", HUB, r"config\.json.*backbone_config.*mapping")  # the hub name: never fetched
config_case("backbone_config", HUB, r"config\.json.*backbone_config", cmd="sample")
config_case("backbone_config", HUB, r"config\.json.*backbone_config", cmd="export")
config_case("backbone_config", [16, 32])
config_case("backbone_config", DELETE)
config_case("backbone_config.sample_size", "abc")
config_case("backbone_config.sample_size", -8)
config_case("backbone_config.in_channels", 3, r"config\.json.*sample_shape")  # no longer fits the samples
config_case("backbone_config.block_out_channels", [16, -32])
config_case("backbone_config.block_out_channels", "16,32")
config_case("backbone_config.down_block_types", ["my_module.EvilBlock", "DownBlock2D"])
config_case("backbone_config.up_block_types", "UpBlock2D")
config_case("backbone_config.norm_num_groups", 0)
config_case("backbone_config.norm_eps", NAN)
config_case("backbone_config.num_class_embeds", NAN)
config_case("backbone_config.act_fn", "os.system")
config_case("backbone_config._class_name", "UNet2DConditionModel")  # nothing but the backbone's own keys
config_case("backbone_config._name_or_path", HUB)
config_case("backbone_config.pretrained_model_name_or_path", HUB)
config_case("prediction", "epsilon", r"config\.json.*prediction.*eps")
config_case("prediction", 3)
config_case("prediction", DELETE)
config_case("num_classes", NAN)
config_case("num_classes", -3)
config_case("num_classes", "10")
config_case("num_classes", 2.5)
config_case("num_classes", True)
config_case("num_classes", 40, r"config\.json.*num_classes")  # more classes than the network embeds
config_case("null_class", -1)
config_case("null_class", "10")
config_case("null_class", 99)  # outside the network's class embeddings
config_case("sample_shape", [2, 8, 8])
config_case("sample_shape", "abc")
config_case("sample_shape", [1, 8])
config_case("sample_shape", [1, 8, -8])
config_case("sample_shape", [1, 8.5, 8])
config_case("sample_shape", [])
config_case("sample_shape", DELETE)
config_case("data", 5)
config_case("data_record", [])
config_case("data_record", {"hash": "x", "class_names": [1, 2]}, r"config\.json.*data_record\.class_names")
config_case("role", 7)
config_case("boundary", "xyz")
config_case("guidance_range", [3.0, 1.0])
config_case("guidance_range", [NAN, 2.0])
config_case("guidance_range", "1..3")
config_case("guidance_range", [1.0])
config_case("training", [])
config_case("training", "abc")
config_case("training.steps", "many")
config_case("training.wall_seconds", NAN)
# --- schedule -----------------------------------------------------------------------------------------------
config_case("schedule", [])
config_case("schedule", "vp")
config_case("schedule.type", "cosine")
config_case("schedule.type", DELETE)
config_case("schedule.beta_start", -0.1)
config_case("schedule.beta_start", NAN)
config_case("schedule.beta_start", 0.5, r"config\.json.*beta_start.*beta_end")  # above beta_end
config_case("schedule.beta_start", "abc")
config_case("schedule.beta_end", 1.5)
config_case("schedule.beta_end", INF)
config_case("schedule.num_train_timesteps", 0)
config_case("schedule.num_train_timesteps", "1000")
config_case("schedule.num_train_timesteps", 10.5)
config_case("schedule.beta_schedule", "quadratic")
config_case("schedule.trained_betas", [0.1, "x"])
config_case("schedule.trained_betas", [0.1, 0.2], r"config\.json.*trained_betas.*1000")
config_case("schedule.trained_betas", "abc")
config_case("schedule.clip_sample", "yes")
config_case("schedule.clip_sample_range", -1.0)
config_case("schedule.dynamic_thresholding_ratio", 2.0)
config_case("schedule.sample_max_value", NAN)
config_case("schedule.variance_type", "learned")
config_case("schedule.rescale_betas_zero_snr", "no")
config_case("schedule.foo", 1)
# --- sampling -----------------------------------------------------------------------------------------------
config_case("sampling", [])
config_case("sampling.sampler", "euler-a")
config_case("sampling.sampler", "os.system")
config_case("sampling.steps", "abc")
config_case("sampling.steps", 0)
config_case("sampling.steps", -2)
config_case("sampling.steps", 2.5)
config_case("sampling.spacing", "random")
config_case("sampling.timesteps", [1.0, 500.0])
config_case("sampling.timesteps", [999.0, 2000.0])
config_case("sampling.timesteps", [])
config_case("sampling.timesteps", ["a"])
config_case("sampling.timesteps", [NAN])
config_case("sampling.guidance", NAN)
config_case("sampling.guidance", -1.0)
config_case("sampling.guidance", "2")
config_case("sampling.eta", NAN)
config_case("sampling.eta", -0.5)
config_case("sampling.cfg", 2.0)
# the same damage through the other commands that load a model
config_case("num_classes", "10", cmd="sample")
config_case("schedule.beta_start", -0.1, cmd="sample")
config_case("sampling.steps", "abc", cmd="sample")
config_case("schedule.beta_start", -0.1, cmd="export")
config_case("sample_shape", [2, 8, 8], cmd="export")
config_case("num_classes", -3, cmd="evaluate")
config_case("training", [], cmd="evaluate")
config_case("schedule.beta_start", NAN, cmd="info", model="uncond")
config_case("schedule.type", "flow", r"config\.json", cmd="export", model="uncond")  # flow: no diffusers pipeline


def _mlp_backbone(tmp, fx):
    m = _model(tmp, fx.model)
    _edit_json(m / "config.json", lambda o: o.update(backbone="mlp"))  # a UNet's config is no MLP's
    return _cmd("info", m, tmp)


case("backbone mlp with a UNet's config", _mlp_backbone, r"config\.json.*backbone_config")


def _guidance_embedded_hub(tmp, fx):
    m = _model(tmp, fx.model)
    _edit_json(m / "config.json", lambda o: o.update(
        backbone="guidance-embedded", backbone_config={"inner": "unet2d", "inner_config": HUB, "w_scale": 100.0}))
    return _cmd("info", m, tmp)


case("guidance-embedded inner_config names the hub", _guidance_embedded_hub,
     r"config\.json.*backbone_config\.inner_config")


def _not_an_object(tmp, fx):
    m = _model(tmp, fx.model)
    (m / "config.json").write_text("[1, 2]")
    return _cmd("info", m, tmp)


case("config.json is a list", _not_an_object, r"config\.json")


# --- weights holding NaN or inf -----------------------------------------------------------------------------
def _poison(path: Path, value: float) -> None:
    w = load_file(path)
    name = next(k for k, v in w.items() if v.is_floating_point() and v.numel() > 1)
    w[name] = w[name].clone()
    w[name].view(-1)[0] = value
    save_file(w, path)


def weights_case(cmd: str, value: float = NAN) -> None:
    def build(tmp, fx):
        m = _model(tmp, fx.model)
        _poison(m / "model.safetensors", value)
        return _cmd(cmd, m, tmp)

    case(f"weights hold {value} ({cmd})", build, r"model\.safetensors.*(NaN|inf)")


for c in ("info", "sample", "export", "evaluate"):
    weights_case(c)
weights_case("sample", INF)


def _nan_latents(tmp, fx):
    import numpy as np

    lat = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    lat[1, 0, 0, 0] = np.nan
    np.save(tmp / "lat.npy", lat)
    return ["sample", "--model", str(fx.model), "--out", str(tmp / "s.npy"), "--latents", str(tmp / "lat.npy")]


case("sample with NaN latents", _nan_latents, r"NaN")


def _overflowing_guidance(tmp, fx):  # a finite scale that overflows float32: every sample comes out non-finite
    return ["sample", "--model", str(fx.model), "--out", str(tmp / "s.npy"), "--n", "2", "--steps", "2",
            "--guidance", "1e38"]


case("sample whose guidance overflows", _overflowing_guidance, r"(NaN|inf).*guidance")


# --- diffusers folders --------------------------------------------------------------------------------------
def _diffusers(tmp: Path, fx, conditional: bool) -> Path:
    """The fixture model exported as a diffusers folder (conditional: unet/ + scheduler/ + fewstep.json;
    unconditional: a DDPMPipeline)."""
    out = tmp / "d"
    res = invoke(["export", str(fx.model if conditional else fx.uncond), str(out)])
    assert res.code == 0, res.stderr
    return out


def diffusers_case(name: str, rel: str, edit, pattern: str, conditional: bool = False, cmd: str = "info") -> None:
    def build(tmp, fx):
        d = _diffusers(tmp, fx, conditional)
        _edit_json(d / rel, edit)
        return _cmd(cmd, d, tmp)

    case(f"diffusers {name} ({cmd})", build, pattern)


UNET, SCHED, INDEX, SIDE = "unet/config.json", "scheduler/scheduler_config.json", "model_index.json", "fewstep.json"
diffusers_case("unet _class_name UNet2DConditionModel", UNET, lambda o: o.update(_class_name="UNet2DConditionModel"),
               r"UNet2DConditionModel.*UNet2DModel")
diffusers_case("unet _class_name a module path", UNET, lambda o: o.update(_class_name="my_pkg.EvilNet"),
               r"my_pkg\.EvilNet")
diffusers_case("unet _class_name missing", UNET, lambda o: o.pop("_class_name"), r"unet.*UNet2DModel")
diffusers_case("unet sample_size abc", UNET, lambda o: o.update(sample_size="abc"), r"unet.*sample_size")
diffusers_case("unet in_channels -1", UNET, lambda o: o.update(in_channels=-1), r"unet.*in_channels")
diffusers_case("unet norm_eps NaN", UNET, lambda o: o.update(norm_eps=NAN), r"unet.*norm_eps")
diffusers_case("unet down block from a module", UNET,
               lambda o: o.update(down_block_types=["evil.Block", "DownBlock2D"]), r"unet.*down_block_types")
diffusers_case("unet names the hub", UNET, lambda o: o.update(_name_or_path=HUB, sample_size=HUB), r"sample_size")
diffusers_case("scheduler _class_name unknown", SCHED, lambda o: o.update(_class_name="my_pkg.Scheduler"),
               r"my_pkg\.Scheduler")
diffusers_case("scheduler beta_start abc", SCHED, lambda o: o.update(beta_start="abc"),
               r"scheduler_config\.json.*beta_start")
diffusers_case("scheduler beta_start -1", SCHED, lambda o: o.update(beta_start=-1.0),
               r"scheduler_config\.json.*beta_start")
diffusers_case("scheduler beta_end NaN", SCHED, lambda o: o.update(beta_end=NAN), r"scheduler_config\.json.*beta_end")
diffusers_case("scheduler num_train_timesteps x", SCHED, lambda o: o.update(num_train_timesteps="x"),
               r"scheduler_config\.json.*num_train_timesteps")
diffusers_case("scheduler num_train_timesteps 0", SCHED, lambda o: o.update(num_train_timesteps=0),
               r"scheduler_config\.json.*num_train_timesteps")
diffusers_case("scheduler trained_betas abc", SCHED, lambda o: o.update(trained_betas="abc"),
               r"scheduler_config\.json.*trained_betas")
diffusers_case("scheduler prediction_type flow", SCHED, lambda o: o.update(prediction_type="flow"),
               r"prediction_type")
diffusers_case("scheduler beta_schedule unknown", SCHED, lambda o: o.update(beta_schedule="evil"),
               r"scheduler_config\.json.*beta_schedule")
diffusers_case("scheduler clip_sample_range NaN", SCHED, lambda o: o.update(clip_sample_range=NAN),
               r"scheduler_config\.json.*clip_sample_range")
diffusers_case("model_index unet from another library", INDEX, lambda o: o.update(unet=["my_pkg", "EvilUNet"]),
               r"model_index\.json.*unet")
diffusers_case("model_index with a vqvae (latent pipeline)", INDEX, lambda o: o.update(vqvae=["diffusers", "VQModel"]),
               r"model_index\.json.*vqvae")
diffusers_case("model_index unet missing", INDEX, lambda o: o.pop("unet"), r"unet")
diffusers_case("sidecar num_classes abc", SIDE, lambda o: o.update(num_classes="abc"),
               r"fewstep\.json.*num_classes", conditional=True)
diffusers_case("sidecar null_class x", SIDE, lambda o: o.update(null_class="x"), r"fewstep\.json.*null_class",
               conditional=True)
diffusers_case("sidecar num_classes -2", SIDE, lambda o: o.update(num_classes=-2), r"fewstep\.json.*num_classes",
               conditional=True)
diffusers_case("sidecar unknown key", SIDE, lambda o: o.update(pipeline="my_pkg.Pipe"), r"fewstep\.json.*pipeline",
               conditional=True)
diffusers_case("sidecar num_classes NaN", SIDE, lambda o: o.update(num_classes=NAN), r"fewstep\.json.*num_classes",
               conditional=True, cmd="sample")


def _diffusers_nan_weights(tmp, fx):
    d = _diffusers(tmp, fx, conditional=False)
    _poison(d / "unet" / "diffusion_pytorch_model.safetensors", NAN)
    return _cmd("sample", d, tmp)


case("diffusers weights hold NaN (sample)", _diffusers_nan_weights, r"diffusion_pytorch_model\.safetensors.*NaN")


def _diffusers_weights_edit(edit):
    def build(tmp, fx):
        d = _diffusers(tmp, fx, conditional=False)
        w = d / "unet" / "diffusion_pytorch_model.safetensors"
        state = load_file(str(w))
        edit(state)
        save_file(state, str(w))
        return _cmd("sample", d, tmp)
    return build


# diffusers itself only warns about tensors its network does not have: weights of another (deeper) network loaded
case("diffusers weights with an extra tensor (sample)",
     _diffusers_weights_edit(lambda st: st.update({"down_blocks.0.resnets.9.conv1.weight": torch.zeros(3)})),
     r"does not fit.*down_blocks\.0\.resnets\.9")
case("diffusers weights with a tensor missing (sample)",
     _diffusers_weights_edit(lambda st: st.pop("conv_in.bias")), r"does not fit.*missing.*conv_in\.bias")
case("diffusers weights with a tensor reshaped (sample)",
     _diffusers_weights_edit(lambda st: st.update({"conv_in.bias": torch.zeros(7)})), r"does not fit.*conv_in\.bias")


@pytest.mark.parametrize("name,spec", CASES, ids=[c[0] for c in CASES])
def test_refused(name, spec, fx, tmp_path):
    build, pattern = spec
    argv = build(tmp_path, fx)
    refused(argv, watch=[tmp_path, fx.root], pattern=pattern)


def test_corpus_size():
    assert len(CASES) >= 50, len(CASES)


# --- what is accepted, and what saving refuses ----------------------------------------------------------------
def test_diffusers_weights_with_legacy_attention_names_load(fx, tmp_path):
    """Checkpoints saved by older diffusers name attention tensors query/key/value/proj_attn; diffusers renames them
    when it loads, so the check that weights fit their config reads them the same way."""
    from fewstep.models.folder import load_model

    d = _diffusers(tmp_path, fx, conditional=False)
    w = d / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(w))
    renamed = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, str(w))
    a, b = load_model(d).denoiser.net.state_dict(), load_model(fx.uncond).denoiser.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_diffusers_pipeline_class_is_never_looked_up(fx, tmp_path):
    """model_index.json's pipeline class and private keys are not instructions: only UNet2DModel is built, offline."""
    d = _diffusers(tmp_path, fx, conditional=False)
    _edit_json(d / INDEX, lambda o: o.update(_class_name="my_pkg.EvilPipeline", _diffusers_version="0.0.0-evil",
                                             scheduler=["my_pkg", "EvilScheduler"]))
    res = invoke(["info", str(d)])
    assert res.code == 0, res.stderr
    assert "diffusers-pipeline" in res.stdout


def test_an_older_config_without_optional_fields_loads(fx, tmp_path):
    """Configs written before boundary, guidance_range, data_record (and data) existed still load."""
    m = _model(tmp_path, fx.model)
    _edit_json(m / "config.json", lambda o: [o.pop(k, None) for k in ("boundary", "guidance_range", "data_record",
                                                                        "data", "fewstep_version")])
    res = invoke(["info", str(m)])
    assert res.code == 0, res.stderr


def test_saving_and_exporting_refuse_non_finite_weights(fx, tmp_path):
    from fewstep.errors import FewstepError
    from fewstep.models.folder import export_diffusers, load_model, save_model

    model = load_model(fx.uncond)
    with torch.no_grad():
        next(model.denoiser.net.parameters()).view(-1)[:3] = float("nan")
    with pytest.raises(FewstepError, match=r"3 NaN or infinite values.*nothing written"):
        save_model(tmp_path / "saved", model.config, model.denoiser.net)
    assert not (tmp_path / "saved").exists()
    with pytest.raises(FewstepError, match=r"3 NaN or infinite values"):
        export_diffusers(model, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_writing_non_finite_samples_is_refused(tmp_path):
    from fewstep.errors import FewstepError
    from fewstep.images import write_samples

    x = torch.zeros(4, 1, 8, 8)
    x[1, 0, 0, 0] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    for name in ("s.npy", "s.png"):
        with pytest.raises(FewstepError, match=r"2 of 4 samples"):
            write_samples(tmp_path / name, x)
    assert not list(tmp_path.iterdir())
