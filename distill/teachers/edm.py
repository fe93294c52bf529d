"""EDM training pieces (Karras et al. 2022): the log-normal noise distribution, the weighted denoising loss, and
label dropout for classifier-free guidance.

Used to train teachers and, in SiD, the fake score f_psi on generator samples. Plain functions of tensors so the
loss can be checked against a direct re-computation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SIGMA_DATA = 0.5


def sample_lognormal_sigmas(
    n: int, p_mean: float = -1.2, p_std: float = 1.2, device: torch.device | str = "cpu", generator=None
) -> torch.Tensor:
    """sigma = exp(N(p_mean, p_std^2)), EDM's training distribution of noise levels."""
    return (torch.randn(n, device=device, generator=generator) * p_std + p_mean).exp()


def edm_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2: unit loss magnitude at every sigma."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_denoising_loss(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor | None = None,
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """Per-sample EDM loss: lambda(sigma) * sum_{C,H,W} (D(x0 + sigma n, sigma) - x0)^2.

    ``denoise(x_sigma, sigma)`` returns x0_hat (EDM convention); ``sigma`` has shape [B].
    """
    if sigma.ndim != 1 or sigma.shape[0] != x0.shape[0]:
        raise ValueError(f"sigma must have shape [{x0.shape[0]}], got {tuple(sigma.shape)}")
    noise = torch.randn_like(x0) if noise is None else noise
    x_sigma = x0 + sigma.view(-1, *[1] * (x0.ndim - 1)) * noise
    x0_hat = denoise(x_sigma, sigma)
    per_sample = (x0_hat.float() - x0.float()).pow(2).flatten(1).sum(1)
    return edm_weight(sigma.float(), sigma_data) * per_sample


def drop_labels(
    labels: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """CFG training: each class label becomes the null class ``null_label`` with probability ``p``.

    A model trained this way also learns the unconditional score, which classifier-free guidance needs.
    Draws ``torch.rand(labels.shape)`` (on ``generator`` when given) only when ``p > 0``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label dropout p={p} must be in [0, 1]")
    if p == 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)
