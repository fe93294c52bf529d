"""Score identity Distillation (Zhou et al., ICML 2024) as plain functions of tensors.

The loop lives in the engine and the recipe; here are only the noise schedules and the two losses, so each can
be checked against a direct re-computation and for its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.teachers.edm import SIGMA_DATA, edm_weight


def sid_sigma_from_t(
    t: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """EDM's rho-curve: sigma(t) = (smax^(1/rho) + (1 - t)(smin^(1/rho) - smax^(1/rho)))^rho, t in [0, 1]."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + (1 - t) * (lo - hi)) ** rho


def sample_generator_sigmas(
    n: int,
    max_timestep: float,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise levels for the generator loss: t ~ U[0, max_timestep/1000] mapped through :func:`sid_sigma_from_t`.

    ``max_timestep`` is on the teacher's 0-1000 timestep scale (the paper's t_max = 800 gives sigma <= 24.4).
    """
    t = torch.rand(n, device=device, generator=generator) * (max_timestep / 1000.0)
    return sid_sigma_from_t(t, sigma_min, sigma_max, rho)


def sid_generator_loss(
    x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float, eps: float = 1e-5
) -> torch.Tensor:
    """Per-sample SiD generator loss (summed over C,H,W).

    loss = (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / w,
    w = stopgrad(mean_{C,H,W} |x_g - y_real|) clamped to >= eps.

    ``y_real`` = f_phi(x_t) (teacher) and ``y_fake`` = f_psi(x_t) (fake score), both x0 predictions at
    x_t = x_g + sigma * n, with gradients flowing through x_t into the generator. ``alpha`` has no default on
    purpose: the paper's CIFAR-10 value is 1.2, SiD-LSG and SiDA use 1.0, and the caller's config decides.
    """
    if not (x_g.shape == y_real.shape == y_fake.shape):
        raise ValueError(
            f"shapes differ: x_g {tuple(x_g.shape)}, y_real {tuple(y_real.shape)}, y_fake {tuple(y_fake.shape)}"
        )
    x_g, y_real, y_fake = x_g.float(), y_real.float(), y_fake.float()
    dims = tuple(range(1, x_g.ndim))
    w = (x_g - y_real).abs().mean(dim=dims, keepdim=True).detach().clamp_min(eps)
    diff = y_real - y_fake
    per_element = diff * ((y_real - x_g) - alpha * diff) / w
    return per_element.sum(dim=dims)


def fake_score_loss(
    y_fake: torch.Tensor, x_g: torch.Tensor, sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
) -> torch.Tensor:
    """Per-sample EDM denoising loss of the fake score on (detached) generator samples."""
    per_sample = (y_fake.float() - x_g.float()).pow(2).flatten(1).sum(1)
    return edm_weight(sigma.float(), sigma_data) * per_sample


# --- SiDA (Zhou et al., arXiv 2410.14919): the fake score's encoder as a discriminator on real images ---------
def discriminator_loss(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
) -> torch.Tensor:
    """SiDA's discriminator loss for f_psi (a scalar), as the authors' code computes it.

    loss = mean_i lambda(sigma_i) * (BCE(logits_real, 1) + BCE(logits_fake, 0)) / 2, where each BCE is the
    mean over the whole batch and every logit: so each logit is weighted by the batch's mean EDM weight, not
    by its own sample's (with the sample's own weight the lowest noise levels would drown the rest). Real
    and generated images are noised with the same sigma and noise.
    """
    if logits_real.shape != logits_fake.shape:
        raise ValueError(
            f"logit shapes differ: real {tuple(logits_real.shape)}, fake {tuple(logits_fake.shape)}"
        )
    bce = F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()
    return edm_weight(sigma.float(), sigma_data).mean() * bce / 2


def generator_adversarial_loss(
    logits_fake: torch.Tensor, x_g: torch.Tensor, y_real: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """SiDA's non-saturating generator term (a scalar) on the same scale as :func:`sid_generator_loss`.

    BCE(clamp(logits, -10, 10), 1) over the batch, divided per sample by SiD's normaliser
    w = stopgrad(mean |x_g - y_real|) and multiplied by the number of elements per sample (SiD's loss is a
    sum over them), then averaged over samples.
    """
    x_g, y_real = x_g.float(), y_real.float()
    dims = tuple(range(1, x_g.ndim))
    w = (x_g - y_real).abs().mean(dim=dims).detach().clamp_min(eps)
    bce = F.softplus(-logits_fake.float().clamp(-10, 10)).mean()
    return bce * (1.0 / w).mean() * x_g[0].numel()
