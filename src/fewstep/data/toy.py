"""Toy 2-D data sets and a Gaussian mixture with exact density, score and denoiser.

The toy sets are drawn exactly from a ``torch.Generator`` (nothing is stored).  They are *not* scaled to
[-1, 1]: every set lies roughly within [-3, 3] with a per-coordinate standard deviation of about 1-1.5
(the images' [-1, 1] convention is for pixels):

=============  ==========================================================  ===========
name           what                                                        num_classes
=============  ==========================================================  ===========
gmm            8 isotropic Gaussians (std 0.25), equal weights, centres    8
               on a circle of radius 2; label = component index
moons          two interleaving half circles (as scikit-learn's, noise     0
               0.1), centred, times 2
swissroll      scikit-learn's swiss roll (noise 1.0), coordinates (x, z)   0
               divided by 5
checkerboard   uniform on the 8 dark squares of a 4x4 board on [-2, 2]^2   0
=============  ==========================================================  ===========

Noising is the VE one used everywhere in fewstep: ``x = x0 + sigma * eps``.  For a mixture of isotropic
Gaussians N(mu_k, s_k^2 I) the noised density is again a mixture, N(mu_k, (s_k^2 + sigma^2) I), so its
log density, score and posterior mean ``E[x0 | x]`` are exact (see :class:`GaussianMixture`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fewstep.diffusion.param import Prediction
from fewstep.errors import FewstepError

Tensor = torch.Tensor

TOY_DATASETS = ("gmm", "moons", "swissroll", "checkerboard")
TOY_NUM_CLASSES = {"gmm": 8, "moons": 0, "swissroll": 0, "checkerboard": 0}


def _per_sample(sigma: Tensor | float, n: int) -> Tensor:
    """Noise level(s) -> float64 (n, 1)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if s.ndim == 0:
        s = s.expand(n)
    return s.reshape(n, 1)


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """A mixture of isotropic Gaussians ``sum_k w_k N(mu_k, s_k^2 I)`` in float64.

    ``means`` (K, D), ``stds`` (K,), ``weights`` (K,) (normalized on construction).  Everything below is
    exact; ``sigma`` is the VE noise level (scalar or per sample, shape (B,)) and ``sigma = 0`` is the data.
    """

    means: Tensor
    stds: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        means = torch.as_tensor(self.means, dtype=torch.float64)
        stds = torch.as_tensor(self.stds, dtype=torch.float64).reshape(-1)
        weights = torch.as_tensor(self.weights, dtype=torch.float64).reshape(-1)
        k = means.shape[0]
        if means.ndim != 2 or stds.shape[0] != k or weights.shape[0] != k:
            raise FewstepError(f"mixture shapes disagree: means {tuple(means.shape)}, stds {tuple(stds.shape)}, "
                               f"weights {tuple(weights.shape)} (want (K, D), (K,), (K,))")
        if (stds <= 0).any() or (weights < 0).any() or weights.sum() <= 0:
            raise FewstepError("mixture stds must be positive and weights non-negative with a positive sum")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)
        object.__setattr__(self, "weights", weights / weights.sum())

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    # --- sampling ----------------------------------------------------------------------------------
    def sample_labeled(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` exact draws (float64 (n, D)) and their component indices (int64 (n,))."""
        y = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[y] + self.stds[y, None] * z, y

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws, float64 (n, D)."""
        return self.sample_labeled(n, generator)[0]

    # --- noised density ----------------------------------------------------------------------------
    def _variances(self, sigma: Tensor | float, n: int) -> Tensor:
        """Per-sample, per-component variance of the noised components, (n, K)."""
        return self.stds[None, :] ** 2 + _per_sample(sigma, n) ** 2

    def _component_log_probs(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """log(w_k N(x; mu_k, v_k I)) (n, K), the variances v (n, K) and x - mu (n, K, D)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        v = self._variances(sigma, x.shape[0])
        diff = x[:, None, :] - self.means[None]
        sq = (diff**2).sum(-1)
        logp = self.weights.log()[None] - 0.5 * sq / v - 0.5 * self.dim * torch.log(2 * math.pi * v)
        return logp, v, diff

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """Log density of ``x`` (n, D) under the mixture noised to level ``sigma`` (0 = the data), (n,)."""
        return torch.logsumexp(self._component_log_probs(x, sigma)[0], dim=1)

    def responsibilities(self, x: Tensor, sigma: Tensor | float = 0.0, cond: Tensor | None = None) -> Tensor:
        """p(k | x) under the noised mixture, (n, K).  ``cond`` (n,) pins samples to one component;
        entries outside [0, K) (e.g. the null class K used by guidance) leave that sample unconditional."""
        logp = self._component_log_probs(x, sigma)[0]
        return self._posterior(logp, cond)

    def _posterior(self, logp: Tensor, cond: Tensor | None) -> Tensor:
        if cond is not None:
            cond = torch.as_tensor(cond, device=logp.device).reshape(-1).long()
            pinned = (cond >= 0) & (cond < self.num_components)
            mask = torch.zeros_like(logp, dtype=torch.bool)
            mask[pinned] = True
            mask[pinned, cond[pinned]] = False  # in pinned rows, mask every component but the label's
            logp = logp.masked_fill(mask, -math.inf)
        return torch.softmax(logp, dim=1)

    def score(self, x: Tensor, sigma: Tensor | float = 0.0, cond: Tensor | None = None) -> Tensor:
        """grad_x log p_sigma(x) (conditional on the component when ``cond`` is given), (n, D)."""
        logp, v, diff = self._component_log_probs(x, sigma)
        r = self._posterior(logp, cond)
        return -(r[:, :, None] * diff / v[:, :, None]).sum(1)

    def denoise(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Prediction:
        """The exact denoiser: x0 = E[x0 | x] and eps = E[eps | x] = (x - x0) / sigma, float64.

        Per component, E[x0 | x, k] = (sigma^2 mu_k + s_k^2 x) / (s_k^2 + sigma^2); the posterior mean
        is their average under the responsibilities p(k | x) (Tweedie: x0 = x + sigma^2 score).
        eps is computed directly as sigma * sum_k r_k (x - mu_k) / v_k, so it stays exact as sigma -> 0.
        """
        x = torch.as_tensor(x, dtype=torch.float64)
        logp, v, diff = self._component_log_probs(x, sigma)
        r = self._posterior(logp, cond)
        s = _per_sample(sigma, x.shape[0])
        eps = s * (r[:, :, None] * diff / v[:, :, None]).sum(1)
        x0 = x - s * eps
        return Prediction(x0=x0, eps=eps)

    def as_denoiser(self) -> MixtureDenoiser:
        """This mixture's exact denoiser behind the denoiser contract ``f(x, sigma, cond) -> Prediction``."""
        return MixtureDenoiser(self)


class MixtureDenoiser:
    """``f(x, sigma, cond) -> Prediction`` for a :class:`GaussianMixture`: the ideal (Bayes) denoiser.

    ``x`` (B, D) of any float dtype (computed in float64, returned in x's dtype), ``sigma`` scalar or (B,),
    ``cond`` None or component labels (B,); label ``null_class`` (= K) means unconditional, as guidance
    expects.  Samplers, guidance and NFE counting accept it in place of a network.
    """

    cost = 1

    def __init__(self, mixture: GaussianMixture):
        self.mixture = mixture
        self.num_classes = mixture.num_components

    @property
    def null_class(self) -> int:
        return self.num_classes

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Prediction:
        sigma = sigma.to(torch.float64) if isinstance(sigma, Tensor) else torch.tensor(sigma, dtype=torch.float64)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        p = self.mixture.denoise(x.detach().to(torch.float64).cpu(), sigma.detach().to(torch.float64).cpu(),
                                 None if cond is None else cond.detach().cpu())
        return Prediction(x0=p.x0.to(x.device, x.dtype), eps=p.eps.to(x.device, x.dtype))


# --- the named toy sets ----------------------------------------------------------------------------
def gmm8(radius: float = 2.0, std: float = 0.25, k: int = 8) -> GaussianMixture:
    """The ``gmm`` data set: ``k`` equal-weight isotropic Gaussians with centres on a circle."""
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(means, torch.full((k,), std, dtype=torch.float64), torch.ones(k, dtype=torch.float64))


def _moons(n: int, g: torch.Generator | None) -> Tensor:
    # scikit-learn's make_moons (noise 0.1), with the moon of each point drawn at random.
    t = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    lower = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
    x = torch.where(lower, 1 - t.cos(), t.cos())
    y = torch.where(lower, 0.5 - t.sin(), t.sin())
    pts = torch.stack([x, y], 1) + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return 2 * (pts - torch.tensor([0.5, 0.25], dtype=torch.float64))


def _swissroll(n: int, g: torch.Generator | None) -> Tensor:
    # scikit-learn's make_swiss_roll (noise 1.0) projected on (x, z), divided by 5.
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    pts = torch.stack([t * t.cos(), t * t.sin()], 1) + torch.randn(n, 2, generator=g, dtype=torch.float64)
    return pts / 5


def _checkerboard(n: int, g: torch.Generator | None) -> Tensor:
    # Uniform on the squares [i, i+1) x [j, j+1) of [-2, 2]^2 with i + j even.
    x = 4 * torch.rand(n, generator=g, dtype=torch.float64) - 2
    y = torch.rand(n, generator=g, dtype=torch.float64) + 2 * torch.randint(0, 2, (n,), generator=g) - 2
    y = y + torch.remainder(torch.floor(x), 2)
    return torch.stack([x, y], 1)


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
    """``n`` exact draws (float64 (n, 2)) of toy set ``name`` and their labels (int64, or None).

    Without a generator, torch's global random state is used."""
    if name == "gmm":
        return gmm8().sample_labeled(n, generator)
    samplers = {"moons": _moons, "swissroll": _swissroll, "checkerboard": _checkerboard}
    if name not in samplers:
        raise FewstepError(f"unknown toy data set {name!r}: use one of {', '.join(TOY_DATASETS)}")
    return samplers[name](n, generator), None
