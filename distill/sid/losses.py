"""Score identity Distillation (Zhou et al., ICML 2024) as plain functions of tensors.

The loop lives in the engine and the recipe; here are only the noise schedules and the two losses, so each can
be checked against a direct re-computation and for its gradient.

Noise levels follow the teacher's training (the authors' code does): EDM teachers get SiD's EDM draws (the
generator loss on EDM's rho-curve, :func:`sample_generator_sigmas`; f_psi on EDM's log-normal), teachers trained
on a timestep table (discrete VP, flow matching) get SiD-LSG's table timesteps ``t ~ U{t_min..t_max}`` for both
losses (:func:`sample_table_timesteps`, then ``Denoiser.timestep_sigma``), so no network is ever asked about a
noise level outside what the teacher was trained on. f_psi is then trained with the teacher's own objective,
written on x0 predictions (:func:`fake_score_weight`).
"""

from __future__ import annotations

from typing import Literal

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
    min_timestep: float = 0.0,
) -> torch.Tensor:
    """SiD's EDM noise levels for the generator loss: t ~ U[min_timestep/1000, max_timestep/1000] mapped through
    :func:`sid_sigma_from_t`.

    The timesteps are on a 0-1000 scale (the paper's t_max = 800 gives sigma <= 24.4; t_min = 0 gives EDM's
    sigma_min 0.002).
    """
    t = torch.rand(n, device=device, generator=generator) * ((max_timestep - min_timestep) / 1000.0)
    if min_timestep:
        t = t + min_timestep / 1000.0
    return sid_sigma_from_t(t, sigma_min, sigma_max, rho)


def sample_table_timesteps(
    n: int,
    t_min: int,
    t_max: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SiD-LSG's timesteps for both losses on a teacher trained on a table: t ~ U{t_min..t_max} (both included;
    the authors use 20..979 of 1000). ``Denoiser.timestep_sigma`` turns them into the teacher's sigmas."""
    if not 0 <= t_min <= t_max:
        raise ValueError(f"timesteps {t_min}..{t_max}: expected 0 <= t_min <= t_max")
    return torch.randint(t_min, t_max + 1, (n,), device=device, generator=generator)


#: the fake score's training objectives: EDM's, or a table teacher's own (see :func:`fake_score_weight`)
FakeScoreObjective = Literal["edm", "epsilon", "v_prediction", "sample", "flow"]


def fake_score_weight(
    sigma: torch.Tensor, objective: FakeScoreObjective, sigma_data: float = SIGMA_DATA
) -> torch.Tensor:
    """Weight ``w(sigma)`` on ``||x0_hat - x0||^2`` that makes the x0 loss equal a teacher's own objective.

    With ``x_sigma = x0 + sigma n`` (VP: ``abar = 1 / (1 + sigma^2)``; flow: ``s = sigma / (1 + sigma)``):

    * ``edm``: EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2;
    * ``epsilon``: ``eps_hat - n = (x0 - x0_hat) / sigma``, so the unweighted epsilon MSE is ``1 / sigma^2``;
    * ``v_prediction``: ``v_hat - v = (x0 - x0_hat) / sqrt(1 - abar)``, so ``||v_hat - v||^2`` weighted by
      SNR / (SNR + 1) (SNR = abar / (1 - abar) = 1 / sigma^2) is ``(1 + sigma^2)/sigma^2 / (1 + sigma^2)``
      ``= 1 / sigma^2``: the same as epsilon (the SiD-LSG authors' v-prediction loss);
    * ``sample``: an x0-predicting VP teacher's own MSE, weight 1;
    * ``flow``: the flow-matching velocity MSE, ``v_hat - v = (x0 - x0_hat) / s``, weight ``((1 + sigma)/sigma)^2``.
    """
    sigma = sigma.float()
    if objective == "edm":
        return edm_weight(sigma, sigma_data)
    if objective in ("epsilon", "v_prediction"):
        return sigma.square().reciprocal()
    if objective == "sample":
        return torch.ones_like(sigma)
    if objective == "flow":
        return ((1.0 + sigma) / sigma).square()
    raise ValueError(
        f"fake score objective {objective!r}: expected one of edm, epsilon, v_prediction, sample, flow"
    )


def finite_samples(*tensors: torch.Tensor) -> torch.Tensor:
    """[B] bool: True for the samples whose values are finite in every one of ``tensors`` (each [B, ...])."""
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(dim=1)
    return ok


def keep_finite(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The tensors without the samples that are non-finite in any of them, and how many were dropped.

    The authors' code drops such samples inside each loss, so one bad sample does not cost the whole step
    (a NaN in the loss would make every gradient entry NaN). Selection (not masking by multiplication) keeps
    NaN out of the loss's backward: the dropped rows get exactly zero gradient.
    """
    ok = finite_samples(*tensors)
    dropped = (~ok).sum()
    if not bool(dropped):
        return list(tensors), dropped
    return [t[ok] for t in tensors], dropped


def batch_mean(per_sample: torch.Tensor) -> torch.Tensor:
    """Mean over the kept samples; 0 (still differentiable) when none is left."""
    return per_sample.mean() if per_sample.numel() else per_sample.sum()


def sid_generator_loss(
    x_g: torch.Tensor,
    y_real: torch.Tensor,
    y_fake: torch.Tensor,
    alpha: float,
    eps: float = 1e-5,
    y_fake_alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample SiD generator loss (summed over C,H,W).

    loss = (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake')) / w,
    w = stopgrad(mean_{C,H,W} |x_g - y_real|) clamped to >= eps; y_fake' = ``y_fake_alpha`` or ``y_fake``.

    ``y_real`` = f_phi(x_t) (teacher) and ``y_fake`` = f_psi(x_t) (fake score), both x0 predictions at
    x_t = x_g + sigma * n, with gradients flowing through x_t into the generator. ``alpha`` has no default on
    purpose: the paper's CIFAR-10 value is 1.2, SiD-LSG and SiDA use 1.0, and the caller's config decides.
    ``y_fake_alpha``: f_psi under another guidance scale in the alpha term (SiD-LSG's scales for the two uses
    of f_psi in this loss may differ; at alpha = 1 the loss is (y_real - y_fake) (y_fake' - x_g) / w).
    """
    y_fake_alpha = y_fake if y_fake_alpha is None else y_fake_alpha
    if not (x_g.shape == y_real.shape == y_fake.shape == y_fake_alpha.shape):
        raise ValueError(
            f"shapes differ: x_g {tuple(x_g.shape)}, y_real {tuple(y_real.shape)}, y_fake {tuple(y_fake.shape)}, "
            f"y_fake_alpha {tuple(y_fake_alpha.shape)}"
        )
    same = y_fake_alpha is y_fake
    x_g, y_real, y_fake = x_g.float(), y_real.float(), y_fake.float()
    dims = tuple(range(1, x_g.ndim))
    w = (x_g - y_real).abs().mean(dim=dims, keepdim=True).detach().clamp_min(eps)
    diff = y_real - y_fake
    diff_alpha = diff if same else y_real - y_fake_alpha.float()
    per_element = diff * ((y_real - x_g) - alpha * diff_alpha) / w
    return per_element.sum(dim=dims)


def fake_score_loss(
    y_fake: torch.Tensor,
    x_g: torch.Tensor,
    sigma: torch.Tensor,
    sigma_data: float = SIGMA_DATA,
    objective: FakeScoreObjective = "edm",
) -> torch.Tensor:
    """Per-sample denoising loss of the fake score on (detached) generator samples:
    ``fake_score_weight(sigma, objective) * ||y_fake - x_g||^2`` (EDM's weighted loss by default)."""
    per_sample = (y_fake.float() - x_g.float()).pow(2).flatten(1).sum(1)
    return fake_score_weight(sigma, objective, sigma_data) * per_sample


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
