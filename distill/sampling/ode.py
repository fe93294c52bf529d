"""Deterministic probability-flow ODE samplers (EDM Euler / Heun) for any EDM-convention denoiser.

They produce teacher samples for reflow pairs, teacher baselines for benchmarks and sanity checks of a
wrapped teacher. A denoiser is anything called as ``D(x, sigma, cond) -> x0_hat`` (a
:class:`distill.teachers.denoiser.Denoiser` or a plain function); optional ``sigma_min`` / ``sigma_max`` attributes
narrow the default noise range, and ``guidance_scale`` / ``null_cond`` are only passed when guidance is used,
so plain callables need not accept them.

The ODE is ``dx/dsigma = (x - D(x, sigma)) / sigma`` on the Karras et al. (2022) sigma grid; the state is
kept in float32 and the result is *not* clamped (images may leave [-1, 1]; clamp or decode in the caller).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SampleResult",
    "karras_sigmas",
    "default_sigma_range",
    "edm_heun_sample",
    "euler_sample",
    "sample",
    "steps_for_nfe",
]

DenoiserFn = Callable[..., Tensor]
_EDM_SIGMA_MIN = 0.002
_EDM_SIGMA_MAX = 80.0


@dataclass
class SampleResult:
    """Samples plus the number of denoiser evaluations each one cost.

    ``nfe`` counts calls of the denoiser per sample; with classifier-free guidance each call runs the
    network on a doubled batch (conditional + null) but still counts once.
    """

    images: Tensor
    nfe: int


def karras_sigmas(
    num_steps: int,
    sigma_min: float = _EDM_SIGMA_MIN,
    sigma_max: float = _EDM_SIGMA_MAX,
    rho: float = 7.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """EDM's ``rho``-spaced grid: ``num_steps`` decreasing sigmas from ``sigma_max`` to ``sigma_min``, then 0.

    Float64 so that step sizes near ``sigma_min`` are not rounded away. ``num_steps == 1`` gives
    ``[sigma_max, 0]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if num_steps == 1:
        grid = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        ramp = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
        lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
        grid = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([grid, torch.zeros(1, dtype=torch.float64)]).to(device)


def default_sigma_range(
    denoiser: Any, sigma_min: float | None = None, sigma_max: float | None = None
) -> tuple[float, float]:
    """The denoiser's supported range intersected with EDM's [0.002, 80], unless given explicitly.

    VP teachers cannot be queried below their first table sigma (~0.01 for DDPM linear) and flow teachers
    report ``inf`` as their upper end, so the intersection is what both the grid and ``x_T`` use.
    """
    lo = (
        sigma_min
        if sigma_min is not None
        else max(float(getattr(denoiser, "sigma_min", 0.0)), _EDM_SIGMA_MIN)
    )
    hi = (
        sigma_max
        if sigma_max is not None
        else min(float(getattr(denoiser, "sigma_max", _EDM_SIGMA_MAX)), _EDM_SIGMA_MAX)
    )
    if not 0 < lo < hi:
        raise ValueError(f"empty sigma range [{lo}, {hi}] for {type(denoiser).__name__}")
    return float(lo), float(hi)


def _denoise(
    denoiser: DenoiserFn, x: Tensor, sigma: float, cond: Any, guidance_scale: float, null_cond: Any
) -> Tensor:
    if guidance_scale != 1.0 or null_cond is not None:
        out = denoiser(x, sigma, cond, guidance_scale=guidance_scale, null_cond=null_cond)
    else:
        out = denoiser(x, sigma, cond)
    return out.float()


def _solve(
    denoiser: DenoiserFn,
    noise: Tensor,
    num_steps: int,
    heun: bool,
    cond: Any,
    guidance_scale: float,
    null_cond: Any,
    sigma_min: float | None,
    sigma_max: float | None,
    rho: float,
) -> SampleResult:
    lo, hi = default_sigma_range(denoiser, sigma_min, sigma_max)
    sigmas = karras_sigmas(num_steps, lo, hi, rho).tolist()
    x = noise.float() * sigmas[0]
    nfe = 0
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = _denoise(denoiser, x, s, cond, guidance_scale, null_cond)
        nfe += 1
        d = (x - denoised) / s
        # an Euler step to sigma = 0 lands exactly on D(x, s); skip the cancelling arithmetic
        x_next = denoised if s_next == 0 else x + (s_next - s) * d
        if heun and s_next > 0:  # 2nd-order correction, skipped on the final step to sigma = 0
            d_next = (x_next - _denoise(denoiser, x_next, s_next, cond, guidance_scale, null_cond)) / s_next
            nfe += 1
            x_next = x + (s_next - s) * 0.5 * (d + d_next)
        x = x_next
    return SampleResult(images=x, nfe=nfe)


@torch.no_grad()
def edm_heun_sample(
    denoiser: DenoiserFn,
    noise: Tensor,
    num_steps: int,
    cond: Any = None,
    guidance_scale: float = 1.0,
    null_cond: Any = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> SampleResult:
    """EDM Algorithm 1 (deterministic, no churn): Heun steps, Euler on the last; NFE = 2 * num_steps - 1.

    ``noise`` is standard normal; the start is ``x = noise * sigma_max``.
    """
    return _solve(
        denoiser, noise, num_steps, True, cond, guidance_scale, null_cond, sigma_min, sigma_max, rho
    )


@torch.no_grad()
def euler_sample(
    denoiser: DenoiserFn,
    noise: Tensor,
    num_steps: int,
    cond: Any = None,
    guidance_scale: float = 1.0,
    null_cond: Any = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> SampleResult:
    """First-order Euler on the same grid as :func:`edm_heun_sample`; NFE = num_steps.

    With ``num_steps == 1`` this is the one-shot ``D(noise * sigma_max, sigma_max)``.
    """
    return _solve(
        denoiser, noise, num_steps, False, cond, guidance_scale, null_cond, sigma_min, sigma_max, rho
    )


def steps_for_nfe(nfe: int, method: str = "heun") -> tuple[str, int]:
    """(method actually used, num_steps) for a requested NFE.

    Heun needs an odd NFE (``steps = (nfe + 1) // 2`` gives ``2 * steps - 1``); ``nfe == 1`` falls back to a
    single Euler step. Euler uses ``steps = nfe``.
    """
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if method == "euler":
        return "euler", nfe
    if method != "heun":
        raise ValueError(f"unknown method {method!r}; expected 'heun' or 'euler'")
    if nfe == 1:
        return "euler", 1
    if nfe % 2 == 0:
        raise ValueError(f"Heun needs an odd NFE (2 * steps - 1), got {nfe}; use {nfe - 1} or {nfe + 1}")
    return "heun", (nfe + 1) // 2


def _infer_shape(denoiser: Any) -> tuple[int, ...]:
    channels, size = getattr(denoiser, "in_channels", None), getattr(denoiser, "sample_size", None)
    if channels is None or size is None:
        raise ValueError(f"cannot infer the sample shape of {type(denoiser).__name__}; pass shape=(C, H, W)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(channels), int(h), int(w))


def _infer_device(denoiser: Any) -> torch.device:
    params = getattr(denoiser, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _slice(cond: Any, start: int, stop: int) -> Any:
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: (v[start:stop] if isinstance(v, Tensor) else v) for k, v in cond.items()}
    return cond[start:stop]


@torch.no_grad()
def sample(
    denoiser: DenoiserFn,
    num_samples: int,
    nfe: int,
    method: str = "heun",
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    shape: tuple[int, ...] | None = None,
    cond: Any = None,
    guidance_scale: float = 1.0,
    null_cond: Any = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    device: torch.device | str | None = None,
    out_device: torch.device | str | None = "cpu",
) -> SampleResult:
    """Draw ``num_samples`` teacher samples with (about) ``nfe`` evaluations each, in micro-batches.

    Noise is drawn one sample at a time from ``generator`` in sample order, so the output depends on the seed
    but not on ``batch_size``. ``cond`` / ``null_cond`` cover all ``num_samples`` and are sliced per batch.
    ``shape`` defaults to the denoiser's ``(in_channels, sample_size, sample_size)``. Images are returned
    on ``out_device`` without clamping. See :func:`steps_for_nfe` for the NFE -> steps rule; the returned
    ``nfe`` is the one actually spent.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    used, steps = steps_for_nfe(nfe, method)
    solver = edm_heun_sample if used == "heun" else euler_sample
    shape = tuple(shape) if shape is not None else _infer_shape(denoiser)
    device = torch.device(device) if device is not None else _infer_device(denoiser)
    noise_device = generator.device if generator is not None else device
    batch_size = batch_size or num_samples
    chunks, spent = [], 0
    for start in range(0, num_samples, batch_size):
        stop = min(start + batch_size, num_samples)
        noise = torch.cat(
            [torch.randn((1, *shape), generator=generator, device=noise_device) for _ in range(start, stop)]
        )
        res = solver(
            denoiser,
            noise.to(device),
            steps,
            cond=_slice(cond, start, stop),
            guidance_scale=guidance_scale,
            null_cond=_slice(null_cond, start, stop),
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            rho=rho,
        )
        chunks.append(res.images.to(out_device) if out_device is not None else res.images)
        spent = res.nfe
    return SampleResult(images=torch.cat(chunks), nfe=spent)
