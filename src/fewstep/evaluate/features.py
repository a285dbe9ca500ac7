"""Feature networks: a small CNN classifier per image dataset, trained here on the train split and cached.

Its penultimate layer (``FEATURE_DIM`` features, well below the test-split sizes of 500 and more) is the
space where Frechet distance, KID and precision/recall are measured; its test accuracy is reported beside
every metric.  It is never used as a training loss.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.data.datasets import IMAGE_DATASETS, load_dataset
from fewstep.errors import FewstepError
from fewstep.io import cache_dir, file_sha256, load_tensors, save_tensors, write_json

FEATURE_DIM = 64
EPOCHS = {"digits": 60, "mnist": 20, "fashion": 15}
# The recipe's version per dataset, part of the cache folder's name: bump a dataset's entry when its recipe
# changes, so its old network is not reused while the other datasets keep theirs (and their bench rows).
# fashion v1 trained 6 epochs and reached 0.895 test accuracy, below the 0.90 the protocol asks for.
VERSIONS = {"digits": 1, "mnist": 1, "fashion": 2}


class FeatureNet(nn.Module):
    """conv-GELU stack -> global average pool -> FEATURE_DIM features -> class logits."""

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.GroupNorm(8, 2 * width), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, stride=2), nn.GroupNorm(8, 4 * width), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, FEATURE_DIM), nn.GELU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class FeatureExtractor:
    """A trained feature network with its test accuracy."""

    dataset: str
    net: FeatureNet
    test_accuracy: float

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, predicted class) of images in [-1, 1]; samples are clamped to the data range first."""
        feats, preds = [], []
        for lo in range(0, len(x), batch):
            f = self.net.features(x[lo:lo + batch].float().clamp(-1, 1))
            feats.append(f)
            preds.append(self.net.head(f).argmax(1))
        return torch.cat(feats), torch.cat(preds)


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translations by up to max_shift pixels (pad with background -1)."""
    if max_shift == 0:
        return x
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    h, w = x.shape[-2:]
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    return pad[..., dy:dy + h, dx:dx + w]


def train_feature_net(dataset: str, seed: int = 0, epochs: int | None = None) -> FeatureExtractor:
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    torch.manual_seed(seed)
    net = FeatureNet(train.sample_shape[0], train.num_classes)
    epochs = epochs or EPOCHS.get(dataset, 10)
    batch = 128
    steps = epochs * ((len(train) + batch - 1) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    max_shift = 1 if train.sample_shape[-1] <= 8 else 2
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=gen)
        for lo in range(0, len(train), batch):
            idx = perm[lo:lo + batch]
            loss = F.cross_entropy(net(_shift(train.x[idx], gen, max_shift)), train.y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    fx = FeatureExtractor(dataset, net, 0.0)
    fx.test_accuracy = float((fx(test.x)[1] == test.y).float().mean())
    return fx


def _folder(dataset: str) -> Path:
    if dataset not in IMAGE_DATASETS:
        raise FewstepError(f"no feature network for {dataset!r}: image datasets are {', '.join(IMAGE_DATASETS)}")
    return cache_dir() / "features" / f"{dataset}-v{VERSIONS[dataset]}"


def feature_weights_sha256(dataset: str) -> str:
    """SHA-256 (16 hex digits) of ``dataset``'s cached feature-network weights, training the network if missing:
    what a metric was measured with, so a cached result is reused only with the same network."""
    feature_extractor(dataset)
    return file_sha256(_folder(dataset) / "model.safetensors")


def feature_extractor(dataset: str, retrain: bool = False) -> FeatureExtractor:
    """The cached feature network of ``dataset`` (trained on first use; keyed by dataset and its VERSIONS entry)."""
    folder = _folder(dataset)
    version = VERSIONS[dataset]
    if not retrain and (folder / "info.json").is_file():
        try:
            info = json.loads((folder / "info.json").read_text())
            net = FeatureNet(info["channels"], info["num_classes"])
            net.load_state_dict(load_tensors(folder / "model.safetensors", "feature network"))
        except (FewstepError, ValueError, KeyError, RuntimeError) as e:
            raise FewstepError(f"the cached {dataset} feature network in {folder} is unusable ({str(e)[:80]}): "
                               "delete that folder and it is retrained on next use") from None
        return FeatureExtractor(dataset, net.eval(), info["test_accuracy"])
    t0 = time.perf_counter()
    fx = train_feature_net(dataset)
    save_tensors(folder / "model.safetensors", fx.net.state_dict())
    train = load_dataset(dataset, "train")
    write_json(folder / "info.json", {"dataset": dataset, "version": version, "test_accuracy": fx.test_accuracy,
                                      "channels": train.sample_shape[0], "num_classes": train.num_classes,
                                      "feature_dim": FEATURE_DIM, "train_seconds": round(time.perf_counter() - t0, 1)})
    return fx
