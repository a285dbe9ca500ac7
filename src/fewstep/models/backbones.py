"""Backbones: diffusers' ``UNet2DModel`` for images (named presets) and a small MLP for 2-D data.

Every backbone has the call ``net(x, t, class_labels) -> tensor shaped like x``; ``t`` is a float time
input per sample (a training timestep, 1000 * flow time, or EDM's scaled c_noise).  Class-conditional
nets get ``num_classes + 1`` embeddings: the last is the null class of classifier-free guidance.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Annotated, Any, Literal

import torch
from diffusers import UNet2DModel
from pydantic import ConfigDict, Field, field_validator
from torch import nn

from fewstep.errors import FewstepError
from fewstep.schema import NonNegInt, PosInt, Strict, check

# UNet2DModel configs (without sample_size/channels/classes), by preset name.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # ~1.1 M parameters; 8x8 (digits): three levels 8 -> 4 -> 2, attention at 2x2 (~0.07 s/step, batch 64).
    "tiny8": dict(
        sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=16, attention_head_dim=32,
    ),
    # ~1.1 M parameters; 28x28 (mnist, fashion): tiny8's widths at 28 -> 14 -> 7; ~0.8 s/step at batch 64 on
    # one CPU thread, 1.6x faster than small28 (the CPU benchmark teacher).
    "tiny28": dict(
        sample_size=28, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=16, attention_head_dim=32,
    ),
    # ~2.7 M parameters; 28x28 (mnist, fashion): three levels 28 -> 14 -> 7 (a fourth would need 3.5).
    "small28": dict(
        sample_size=28, block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=16, attention_head_dim=32,
    ),
    # 32x32: four levels, for CIFAR-like data or padded 28x28.
    "base32": dict(
        sample_size=32, block_out_channels=(64, 128, 128, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32,
        attention_head_dim=32,
    ),
    # A very small net for tests: 8x8, ~60 k parameters.
    "test8": dict(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
}
MLP_PRESETS: dict[str, dict[str, Any]] = {"mlp": dict(hidden=256, depth=3), "mlp-small": dict(hidden=64, depth=2)}


# --- what a config may say about each backbone (a model folder is data: only these keys, these names) -----------
DOWN_BLOCKS = ("DownBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D", "SkipDownBlock2D", "AttnSkipDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D")
Positive = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, description="a finite number > 0")]


class UNet2DConfig(Strict):
    """The keyword arguments of diffusers' ``UNet2DModel`` (0.42), with the values fewstep can sample."""

    sample_size: Any = Field(None, description="a whole number >= 1 or [height, width]")
    in_channels: PosInt = 3
    out_channels: PosInt = 3
    center_input_sample: bool = False
    time_embedding_type: Literal["positional", "fourier", "learned"] = "positional"
    time_embedding_dim: PosInt | None = None
    freq_shift: NonNegInt = 0
    flip_sin_to_cos: bool = True
    down_block_types: list[Literal[DOWN_BLOCKS]] = Field(  # type: ignore[valid-type]
        ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"], min_length=1,
        description=f"a list of block names ({', '.join(DOWN_BLOCKS)})")
    mid_block_type: Literal["UNetMidBlock2D"] | None = "UNetMidBlock2D"
    up_block_types: list[Literal[UP_BLOCKS]] = Field(  # type: ignore[valid-type]
        ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], min_length=1,
        description=f"a list of block names ({', '.join(UP_BLOCKS)})")
    block_out_channels: list[PosInt] = Field([224, 448, 672, 896], min_length=1,
                                             description="a list of whole numbers >= 1, one per level")
    layers_per_block: PosInt = 2
    mid_block_scale_factor: Positive = 1.0
    downsample_padding: NonNegInt = 1
    downsample_type: Literal["conv", "resnet"] = "conv"
    upsample_type: Literal["conv", "resnet"] = "conv"
    dropout: float = Field(0.0, strict=True, allow_inf_nan=False, ge=0, lt=1, description="a number in [0, 1)")
    act_fn: Literal["silu", "swish", "mish", "gelu", "relu"] = "silu"
    attention_head_dim: PosInt | None = 8
    norm_num_groups: PosInt = 32
    attn_norm_num_groups: PosInt | None = None
    norm_eps: Positive = 1e-5
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    add_attention: bool = True
    class_embed_type: None = Field(None, description="null (fewstep conditions on class ids: num_class_embeds)")
    num_class_embeds: PosInt | None = None
    num_train_timesteps: PosInt | None = None

    @field_validator("sample_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (
            isinstance(v, list) and len(v) == 2 and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                                        for s in v))
        if not ok:
            raise ValueError("give a whole number >= 1 or [height, width] (fewstep needs the sample size)")
        return v

    # level counts that disagree (block_out_channels vs the block lists) fail when diffusers builds the network: one
    # line too ("describes a network that cannot be built"), so no second rule here


class UNet2DFolderConfig(UNet2DConfig):
    """A diffusers folder's ``unet/config.json``: diffusers' private keys (``_class_name``, ``_diffusers_version``)
    and keys of other diffusers versions are ignored, as diffusers ignores them."""

    model_config = ConfigDict(strict=True, extra="ignore")


class MLPConfig(Strict):
    dim: PosInt = 2
    hidden: PosInt = 256
    depth: PosInt = 3
    num_class_embeds: PosInt | None = None


class GuidanceEmbeddedConfig(Strict):
    inner: Literal["unet2d", "mlp"] = Field(description="unet2d or mlp")
    inner_config: dict[str, Any] = Field(description="a mapping: the inner backbone's config")
    w_scale: Positive = 100.0


def check_backbone_config(kind: str, config: Any, where: str, prefix: str = "backbone_config") -> None:
    """``config`` is what backbone ``kind`` takes: a mapping of its own keys with values of the right types and ranges
    (never a name to fetch, a class or a module: a model folder is data).  One FewstepError line otherwise."""
    if kind not in BACKBONES:
        raise FewstepError(f"{where}: unknown backbone {kind!r}: use one of {', '.join(BACKBONES)}")
    if not isinstance(config, dict):
        raise FewstepError(f"{where}: {prefix} = {config!r:.60}: give a mapping of the {kind} network's settings (a "
                           "name or path is never looked up)")
    plain = json.loads(json.dumps(config))  # presets hold tuples: the JSON form, as a config file has it
    check(BACKBONES[kind].config_schema, plain, where, prefix)  # type: ignore[attr-defined]
    if kind == "guidance-embedded":
        check_backbone_config(plain["inner"], plain["inner_config"], where, f"{prefix}.inner_config")


class UNetBackbone(nn.Module):
    """diffusers ``UNet2DModel`` behind the backbone call; ``self.unet`` is the diffusers model itself."""

    kind = "unet2d"
    config_schema = UNet2DConfig

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    @staticmethod
    def from_config(config: dict[str, Any]) -> UNetBackbone:
        return UNetBackbone(UNet2DModel.from_config(config))

    @property
    def config(self) -> dict[str, Any]:
        return {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}

    @property
    def num_class_embeds(self) -> int:
        return self.unet.config.num_class_embeds or 0

    @property
    def sample_shape(self) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, class_labels=class_labels).sample


def _time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    # Transformer-style sinusoidal embedding (Vaswani et al. 2017), as in DDPM.
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class MLPBackbone(nn.Module):
    """A residual MLP for low-dimensional data: x (B, D), float time input, optional class label."""

    kind = "mlp"
    config_schema = MLPConfig

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, num_class_embeds: int | None = None):
        super().__init__()
        self._config = dict(dim=dim, hidden=hidden, depth=depth, num_class_embeds=num_class_embeds)
        self.inp = nn.Linear(dim, hidden)
        self.temb = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.cemb = nn.Embedding(num_class_embeds, hidden) if num_class_embeds else None
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    @staticmethod
    def from_config(config: dict[str, Any]) -> MLPBackbone:
        return MLPBackbone(**config)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    @property
    def num_class_embeds(self) -> int:
        return self._config["num_class_embeds"] or 0

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self._config["dim"],)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.inp(x)
        emb = self.temb(_time_embedding(t, h.shape[1]))
        if self.cemb is not None and class_labels is not None:
            emb = emb + self.cemb(class_labels)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)


class GuidanceEmbedded(nn.Module):
    """A backbone that also takes the guidance scale w as an input (Meng et al. 2023, sec. 4.1: w is embedded
    like the time and added to the time embedding).  The embedding's last layer starts at zero, so a copy of a
    teacher starts out as that teacher, whatever w."""

    kind = "guidance-embedded"
    takes_guidance = True
    config_schema = GuidanceEmbeddedConfig

    def __init__(self, inner: str, inner_config: dict[str, Any], w_scale: float = 100.0):
        super().__init__()
        self._config = dict(inner=inner, inner_config=dict(inner_config), w_scale=w_scale)
        self.inner = build_backbone(inner, inner_config)
        temb = self.inner.unet.time_embedding if isinstance(self.inner, UNetBackbone) else self.inner.temb
        dim = [m for m in temb.modules() if isinstance(m, nn.Linear)][-1].out_features
        self.freq_dim = min(dim, 128)
        self.wemb = nn.Sequential(nn.Linear(self.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        with torch.no_grad():  # a fixed init (not the global RNG), so a distillation run is reproducible
            gen = torch.Generator().manual_seed(0)
            bound = 1 / math.sqrt(self.freq_dim)
            self.wemb[0].weight.copy_(torch.rand(self.wemb[0].weight.shape, generator=gen) * 2 * bound - bound)
            self.wemb[0].bias.copy_(torch.rand(self.wemb[0].bias.shape, generator=gen) * 2 * bound - bound)
        nn.init.zeros_(self.wemb[2].weight)
        nn.init.zeros_(self.wemb[2].bias)
        self._w: torch.Tensor | None = None
        temb.register_forward_hook(self._add_w)

    def _add_w(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if self._w is None:
            raise RuntimeError("GuidanceEmbedded called without w")
        return out + self.wemb(_time_embedding(self._w * self._config["w_scale"], self.freq_dim)).to(out.dtype)

    @staticmethod
    def from_config(config: dict[str, Any]) -> GuidanceEmbedded:
        return GuidanceEmbedded(**config)

    @staticmethod
    def wrap(inner: nn.Module) -> GuidanceEmbedded:
        """A guidance-embedded copy of ``inner`` (its weights copied, w's embedding zero)."""
        g = GuidanceEmbedded(inner.kind, inner.config)
        g.inner.load_state_dict(inner.state_dict())
        return g

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    @property
    def num_class_embeds(self) -> int:
        return self.inner.num_class_embeds

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.inner.sample_shape

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                w: torch.Tensor | None = None) -> torch.Tensor:
        if w is None:
            raise ValueError("this network takes the guidance scale: pass w")
        self._w = torch.as_tensor(w, device=x.device, dtype=torch.float32).expand(x.shape[0])
        try:
            return self.inner(x, t, class_labels)
        finally:
            self._w = None


from fewstep.models.generator import GANGenerator  # noqa: E402 - imports nothing of this module

BACKBONES: dict[str, type[nn.Module]] = {"unet2d": UNetBackbone, "mlp": MLPBackbone,
                                         "guidance-embedded": GuidanceEmbedded, "gan-generator": GANGenerator}


def build_backbone(kind: str, config: dict[str, Any], where: str = "backbone config") -> nn.Module:
    """The network ``kind`` with ``config``, checked first (:func:`check_backbone_config`)."""
    check_backbone_config(kind, config, where)
    return BACKBONES[kind].from_config(config)  # type: ignore[attr-defined]


def preset_backbone(preset: str, sample_shape: tuple[int, ...], num_classes: int = 0) -> tuple[str, dict[str, Any]]:
    """(backbone kind, config) for a named preset, data of ``sample_shape`` and ``num_classes`` (0: none)."""
    classes = num_classes + 1 if num_classes else None  # + the null class for guidance
    if preset in MLP_PRESETS:
        if len(sample_shape) != 1:
            raise FewstepError(f"preset {preset!r} is for vector data, got samples of shape {sample_shape}")
        return "mlp", dict(dim=sample_shape[0], num_class_embeds=classes, **MLP_PRESETS[preset])
    if preset not in UNET_PRESETS:
        raise FewstepError(f"unknown preset {preset!r}: use one of {', '.join([*UNET_PRESETS, *MLP_PRESETS])}")
    if len(sample_shape) != 3:
        raise FewstepError(f"preset {preset!r} is for images, got samples of shape {sample_shape}")
    cfg = copy.deepcopy(UNET_PRESETS[preset])
    h, w = sample_shape[1], sample_shape[2]
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)  # each level but the last halves the size
    if h % factor or w % factor:
        fits = sorted({max(factor, round(s / factor) * factor) for s in (h, w)})
        raise FewstepError(
            f"preset {preset!r} has {len(cfg['block_out_channels'])} levels, so image sides must divide by {factor}; "
            f"the data is {h}x{w}: pass --resolution {fits[0]} (or another multiple of {factor}), or another preset"
        )
    # presets adapt to the data: the preset's widths and levels at the data's size and channels
    cfg.update(sample_size=h if h == w else (h, w), in_channels=sample_shape[0], out_channels=sample_shape[0],
               num_class_embeds=classes)
    return "unet2d", cfg


def default_preset(sample_shape: tuple[int, ...]) -> str:
    """By size: tiny8 up to 16 pixels a side, small28 for 28 (and sizes that divide by 4 but not 8), base32
    otherwise (sides dividing by 8)."""
    if len(sample_shape) == 1:
        return "mlp"
    side = min(sample_shape[1], sample_shape[2])
    if side == 28:
        return "small28"
    if side <= 16:
        return "tiny8"
    if sample_shape[1] % 8 or sample_shape[2] % 8:
        return "small28"
    return "base32"
