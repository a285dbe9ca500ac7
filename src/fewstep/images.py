"""Writing samples: raw arrays (.npy) and pictures (.png grids of images, scatter plots of 2-D points)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from fewstep.errors import FewstepError
from fewstep.io import _atomic


def grid_image(x: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 4) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (H', W', C) grid, each pixel repeated ``scale`` times."""
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    canvas = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 64, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = \
            img[i].transpose(1, 2, 0)
    return canvas.repeat(scale, 0).repeat(scale, 1)


def png_bytes(x: torch.Tensor, nrow: int | None = None) -> bytes:
    """PNG of a sample grid (images) or a scatter plot (2-D points)."""
    buf = io.BytesIO()
    if x.ndim == 4:
        from PIL import Image

        arr = grid_image(x, nrow)
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    elif x.ndim == 2 and x.shape[1] == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, alpha=0.5)
        ax.set_aspect("equal")
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
    else:
        raise FewstepError(f"cannot draw samples of shape {tuple(x.shape[1:])} as a PNG: write .npy instead")
    return buf.getvalue()


def check_finite_samples(x: torch.Tensor, what: str) -> None:
    """Refuse samples holding NaN or inf (a NaN array or a grey grid is never a result): ``what`` says what is
    refused and the likely causes."""
    bad = ~torch.isfinite(x.reshape(len(x), -1)) if x.ndim else ~torch.isfinite(x.reshape(1, 1))
    if bad.any():
        n_bad = int(bad.any(dim=1).sum())
        raise FewstepError(f"{n_bad} of {len(bad)} samples hold NaN or infinite values ({int(bad.sum())} values): "
                           f"{what}")


def write_samples(path: Path, x: torch.Tensor, nrow: int | None = None) -> None:
    """``.npy``: the raw array (N, ...) in the data range; ``.png``: a grid or scatter plot.  Samples holding NaN or
    inf are refused (nothing written)."""
    path = Path(path)
    if path.suffix in (".npy", ".png"):
        check_finite_samples(x, f"nothing written to {path}; the cause is upstream: the initial noise (latents), "
                                "the guidance scale, or the model's weights")
    if path.suffix == ".npy":
        arr = x.numpy().astype(np.float32)

        def w(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, arr)
        _atomic(path, w)
    elif path.suffix == ".png":
        data = png_bytes(x, nrow)
        _atomic(path, lambda tmp: Path(tmp).write_bytes(data))
    else:
        raise FewstepError(f"--out {path}: use a .npy (raw array) or .png (picture) file name")
