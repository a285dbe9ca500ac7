"""Coloured shapes: a small labelled RGB image set generated offline, written as an image folder.

Three classes (``square``, ``disk``, ``triangle``), each image one filled shape of a random colour, size and
position on a dark background with a little pixel noise.  It exists so that the RGB path (colour folders,
CFG on colour, sample grids, export) and the RGB benchmark run without any download
(``python -m fewstep.data.shapes FOLDER N SIZE`` writes it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("square", "disk", "triangle")


def shape_image(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of shape ``kind``."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    r = rng.uniform(0.22, 0.38) * size
    cy, cx = rng.uniform(r, size - r, 2)
    if kind == "square":
        mask = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    elif kind == "disk":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    else:  # an upward triangle: below the apex, inside two slanted edges
        top, bottom = cy - r, cy + r
        half = (yy - top) / (2 * r) * r
        mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
    colour = rng.uniform(0.35, 1.0, 3)
    colour[rng.integers(3)] *= rng.uniform(0.0, 0.5)  # saturated hues, not greys
    background = rng.uniform(0.0, 0.15, 3)
    img = np.where(mask[..., None], colour, background) + rng.normal(0, 0.02, (size, size, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def write_shapes(folder: Path, n: int, size: int = 16, seed: int = 0) -> Path:
    """Write ``n`` images (classes cycling) as PNGs into ``folder/<class>/NNNNN.png``; returns ``folder``."""
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (folder / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        kind = CLASSES[i % len(CLASSES)]
        Image.fromarray(shape_image(kind, size, rng)).save(folder / kind / f"{i:05d}.png")
    return folder


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m fewstep.data.shapes FOLDER N [SIZE]")
    print(write_shapes(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) == 4 else 16))
