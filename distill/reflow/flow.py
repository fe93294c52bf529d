"""Rectified-flow reflow (Liu et al. 2023; Lee et al. 2024): the pieces of math every stage shares.

Convention (rfpp / diffusers flow matching, and :meth:`distill.teachers.denoiser.Denoiser.velocity`): flow time ``t`` runs
from data (``t = 0``) to noise (``t = 1``), ``x_t = (1 - t) x + t z`` with ``z ~ N(0, I)`` the *unit* noise, and
the velocity is ``v = dx_t/dt = z - x``. Sampling integrates from ``t_max`` down to 0.

Any teacher or student is a :class:`~distill.teachers.denoiser.Denoiser` (EDM convention), and its velocity comes from the
wrapper's conversion ``sigma = t / (1 - t)``, ``x_sigma = x_t / (1 - t)``, ``v = (x_t - D(x_sigma, sigma)) / t``
(flow models are queried directly). EDM / VP models cannot be asked at ``t = 1`` (``sigma = inf``), so a pair
set records the ``sigma_max`` its ODE started from and every model built from it works on
``t in [t_min, t_max]`` with ``t_max = sigma_max / (1 + sigma_max)`` (80 -> 80/81):

* a pair is ``(z, x = ODE(sigma_max * z))``, exactly EDM's sampler start;
* ``N``-step sampling is Euler on the uniform flow-time grid ``t_i = t_max (1 - i / N)`` starting from
  ``x_{t_max} = t_max * z`` (that is ``x_sigma = sigma_max * z``); one step is therefore
  ``x = D(sigma_max * z, sigma_max)``, the same call :class:`distill.pipelines.OneStepPipeline` makes with
  ``step_sigmas = [sigma_max]``. Euler in flow time equals the EDM/DDIM update
  ``x_sigma' = x0_hat + sigma' (x_sigma - x0_hat) / sigma`` (no fresh noise).

In EDM terms the reflow loss is a denoising loss with the *paired* noise: ``x_t / (1 - t) = x + sigma z`` and
``v - (z - x) = (x - x0_hat) / t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from distill.sampling.student import student_sample

__all__ = [
    "TimeDistribution",
    "sample_flow_times",
    "u_shaped_density",
    "u_shaped_icdf",
    "pseudo_huber",
    "default_huber_c",
    "regression_loss",
    "reflow_loss",
    "distill_loss",
    "t_max_for",
    "sigma_to_t",
    "t_to_sigma",
    "flow_time_grid",
    "flow_sigmas",
    "flow_euler_sample",
    "euler_on_sigmas",
    "FlowTrajectory",
    "straightness",
    "interpolate",
    "velocity_from_denoiser",
]

TimeDistribution = Literal["uniform", "logit_normal", "u_shaped"]
LossKind = Literal["l2", "pseudo_huber"]
VelocityFn = Callable[[Tensor, Tensor], Tensor]


# ------------------------------------------------------------------------------------------ time <-> sigma
def t_to_sigma(t: float | Tensor) -> float | Tensor:
    """EDM noise level of flow time ``t`` (``t / (1 - t)``; ``inf`` at ``t = 1``)."""
    if isinstance(t, Tensor):
        return t / (1.0 - t)
    return math.inf if t >= 1.0 else t / (1.0 - t)


def sigma_to_t(sigma: float | Tensor) -> float | Tensor:
    """Flow time of EDM noise level ``sigma`` (``sigma / (1 + sigma)``; 1 at ``sigma = inf``)."""
    if isinstance(sigma, Tensor):
        return 1.0 - 1.0 / (1.0 + sigma)
    return 1.0 if math.isinf(sigma) else sigma / (1.0 + sigma)


def t_max_for(sigma_max: float) -> float:
    """Largest flow time a pair set started from: ``sigma_max / (1 + sigma_max)``."""
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be > 0, got {sigma_max}")
    return float(sigma_to_t(float(sigma_max)))


def interpolate(x: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """The straight path ``(1 - t) x + t z`` for per-sample times ``t`` ([B])."""
    tb = t.view(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    return (1.0 - tb) * x + tb * z


# ------------------------------------------------------------------------------------ time distributions
def u_shaped_density(u: Tensor, a: float) -> Tensor:
    """Lee et al.'s U-shaped density on [0, 1]: ``(e^{a u} + e^{a (1 - u)}) / (2 (e^a - 1) / a)``."""
    if a == 0:
        return torch.ones_like(u)
    norm = 2.0 * math.expm1(a) / a
    return (torch.exp(a * u) + torch.exp(a * (1.0 - u))) / norm


def u_shaped_icdf(uniform: Tensor, branch: Tensor, a: float) -> Tensor:
    """Inverse-CDF sample of the U-shaped density.

    The density is an equal mixture of ``e^{a u}`` and its mirror (both integrate to ``(e^a - 1) / a``), so a
    sample is ``log(1 + U (e^a - 1)) / a`` mirrored to ``1 - .`` where ``branch`` is true.
    """
    if a == 0:
        return uniform
    u = torch.log1p(uniform * math.expm1(a)) / a
    return torch.where(branch, 1.0 - u, u)


def sample_flow_times(
    n: int,
    distribution: TimeDistribution = "uniform",
    t_min: float = 1e-3,
    t_max: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    u_shape_a: float = 4.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training times in ``[t_min, t_max]``: a draw ``u`` on [0, 1] mapped affinely, ``t_min + (t_max - t_min) u``.

    ``uniform`` (Liu et al.), ``logit_normal`` (``u = sigmoid(N(logit_mean, logit_std^2))``, SD3) or
    ``u_shaped`` (density proportional to ``e^{a u} + e^{a (1 - u)}``, Lee et al. 2024, ``a = 4``). The affine
    map keeps the shape of the distribution inside the range a model supports instead of piling mass on the
    clip points.
    """
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    gen_device = generator.device if generator is not None else device
    if distribution == "uniform":
        u = torch.rand(n, device=gen_device, generator=generator)
    elif distribution == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, device=gen_device, generator=generator))
    elif distribution == "u_shaped":
        uniform = torch.rand(n, device=gen_device, generator=generator)
        branch = torch.rand(n, device=gen_device, generator=generator) < 0.5
        u = u_shaped_icdf(uniform, branch, u_shape_a)
    else:
        raise ValueError(
            f"unknown time distribution {distribution!r}; expected uniform, logit_normal or u_shaped"
        )
    return (t_min + (t_max - t_min) * u).to(device)


def velocity_from_denoiser(
    denoiser: Callable[..., Tensor], x_t: Tensor, t: Tensor, cond: Any = None, **kwargs: Any
) -> Tensor:
    """``v = (x_t - D(x_t / (1 - t), t / (1 - t))) / t`` through a denoiser's *forward* (``0 < t < 1``).

    Same as :meth:`Denoiser.velocity` for every parameterization at ``t < 1``, but only calls ``forward``, so it
    also works through a DDP / FSDP wrapper during training.
    """
    tb = t.view(-1, *[1] * (x_t.ndim - 1)).to(torch.float32)
    x0 = denoiser(x_t.float() / (1.0 - tb), (t / (1.0 - t)).float(), cond, **kwargs).float()
    return (x_t.float() - x0) / tb


# ------------------------------------------------------------------------------------------------ losses
def default_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant ``0.00054 * sqrt(d)`` for ``d`` values per sample."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(diff: Tensor, c: float | None = None) -> Tensor:
    """Per-sample ``sqrt(||diff||^2 + c^2) - c`` over all non-batch dimensions (iCT / Lee et al.)."""
    flat = diff.float().flatten(1)
    c = default_huber_c(flat.shape[1]) if c is None else c
    return torch.sqrt(flat.square().sum(1) + c * c) - c


def regression_loss(
    pred: Tensor, target: Tensor, kind: LossKind = "l2", huber_c: float | None = None
) -> Tensor:
    """Per-sample loss: ``l2`` = mean squared error over the sample, or :func:`pseudo_huber` of the difference."""
    diff = pred.float() - target.float()
    if kind == "l2":
        return diff.square().flatten(1).mean(1)
    if kind == "pseudo_huber":
        return pseudo_huber(diff, huber_c)
    raise ValueError(f"unknown loss {kind!r}; expected l2 or pseudo_huber")


def reflow_loss(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    z: Tensor,
    t: Tensor,
    kind: LossKind = "l2",
    huber_c: float | None = None,
) -> Tensor:
    """Per-sample reflow loss: ``v(x_t, t)`` against the straight-line velocity ``z - x`` at ``x_t = (1-t)x + tz``."""
    x_t = interpolate(x, z, t)
    return regression_loss(velocity(x_t, t), z - x, kind, huber_c)


def distill_loss(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    z: Tensor,
    t: Tensor,
    start: Tensor,
    kind: LossKind = "l2",
    huber_c: float | None = None,
) -> Tensor:
    """Per-sample few-step distillation loss: ``x_hat = x_t - t v(x_t, t)`` regressed onto ``x``.

    Where ``start`` is true the input is the sampler's starting point ``t * z`` (pure noise, as at sampling
    time, so the target never leaks into the input); elsewhere the straight interpolation (Liu et al.'s
    k-step grid).
    """
    tb = t.view(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    x_t = torch.where(start.view_as(tb), tb * z, interpolate(x, z, t))
    x_hat = x_t - tb * velocity(x_t, t)
    return regression_loss(x_hat, x, kind, huber_c)


# ---------------------------------------------------------------------------------------------- sampling
def flow_time_grid(num_steps: int, t_max: float) -> list[float]:
    """``num_steps + 1`` decreasing times ``t_max (1 - i / N)``, ending at 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [t_max * (1.0 - i / num_steps) for i in range(num_steps)] + [0.0]


def flow_sigmas(num_steps: int, sigma_max: float) -> list[float]:
    """The EDM noise levels of :func:`flow_time_grid` without the final 0 (pipeline ``step_sigmas``)."""
    if math.isinf(sigma_max):
        raise ValueError("sigma_max must be finite to start a sampler from sigma_max * z")
    t_max = t_max_for(sigma_max)
    grid = flow_time_grid(num_steps, t_max)[:-1]
    return [sigma_max] + [float(t_to_sigma(t)) for t in grid[1:]]


@torch.no_grad()
def euler_on_sigmas(
    denoiser: Callable[..., Tensor],
    z: Tensor,
    sigmas: list[float],
    cond: Any = None,
    guidance_scale: float = 1.0,
    null_cond: Any = None,
) -> Tensor:
    """Deterministic Euler through ``sigmas`` (decreasing, the last one then 0) from ``x = sigmas[0] * z``.

    Written in EDM form, ``x' = x0_hat + sigma' (x - x0_hat) / sigma``, which is exactly Euler in flow time
    on the matching ``t = sigma / (1 + sigma)`` grid; with ``sigmas = flow_sigmas(N, sigma_max)`` this is the
    N-step rectified-flow sampler, and one step is ``D(sigma_max z, sigma_max)``. The state stays in float32.
    """
    guide: dict[str, Any] = {"guidance_scale": guidance_scale} if guidance_scale != 1.0 else {}
    if guide and null_cond is not None:  # text teachers: the negative prompt
        guide["null_cond"] = null_cond
    return student_sample(denoiser, z.float(), sigmas, cond, deterministic=True, **guide).float()


@dataclass
class FlowTrajectory:
    """Result of :func:`flow_euler_sample`: the sample, and (when asked) per-step velocities and times."""

    images: Tensor
    start: Tensor
    velocities: list[Tensor]
    times: list[float]


@torch.no_grad()
def flow_euler_sample(
    velocity: VelocityFn,
    z: Tensor,
    num_steps: int,
    t_max: float,
    keep_velocities: bool = False,
) -> FlowTrajectory:
    """Euler from ``x_{t_max} = t_max * z`` to ``t = 0`` on :func:`flow_time_grid`; NFE = ``num_steps``.

    ``velocity(x_t, t)`` receives ``t`` as a [B] tensor. The state is kept in float32.
    """
    times = flow_time_grid(num_steps, t_max)
    x = z.float() * t_max
    start = x
    kept: list[Tensor] = []
    for t, t_next in zip(times[:-1], times[1:]):
        v = velocity(x, torch.full((x.shape[0],), t, device=x.device)).float()
        if keep_velocities:
            kept.append(v)
        x = x + (t_next - t) * v
    return FlowTrajectory(images=x, start=start, velocities=kept, times=times)


def straightness(velocity: VelocityFn, z: Tensor, num_steps: int, t_max: float) -> float:
    """Liu et al.'s straightness ``S = int E ||(X_start - X_end) / T - v(X_t, t)||^2 dt / T`` along the ODE path.

    The path is the model's own Euler trajectory from ``t_max * z`` (:func:`flow_euler_sample`, ``num_steps``
    uniform steps, ``T = t_max``); ``||.||^2`` is the mean over pixels and the integral the step-weighted mean,
    as rfpp's code computes it. A straight flow (constant velocity along each path) has ``S = 0``.
    """
    traj = flow_euler_sample(velocity, z, num_steps, t_max, keep_velocities=True)
    chord = (traj.start - traj.images) / t_max
    total = 0.0
    for v, t, t_next in zip(traj.velocities, traj.times[:-1], traj.times[1:]):
        total += (t - t_next) / t_max * float((v - chord).square().flatten(1).mean(1).mean())
    return total
