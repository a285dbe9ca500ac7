"""Seeded noise drawn per sample index, so a sample never depends on the batch it was drawn in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _generator(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)


@dataclass(frozen=True)
class IndexedNoise:
    """Noise for samples ``indices`` of a run seeded with ``seed``.

    ``initial(shape)`` is the unit-variance starting noise (stream 0); ``step(i, like)`` the fresh noise
    a stochastic sampler adds at its step ``i`` (stream i + 1).  Each sample's numbers depend only on
    (seed, index, stream).
    """

    seed: int
    indices: tuple[int, ...]

    @staticmethod
    def range(seed: int, start: int, stop: int) -> IndexedNoise:
        return IndexedNoise(seed, tuple(range(start, stop)))

    def _draw(self, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=_generator(self.seed, i, stream)) for i in self.indices])

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(0, tuple(shape))

    def step(self, i: int, like: torch.Tensor) -> torch.Tensor:
        return self._draw(i + 1, tuple(like.shape[1:])).to(like.device, like.dtype)
