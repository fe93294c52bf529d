"""The k-step student sampler, written once: SiD's generator, the exported pipelines and reflow's flow sampler.

The loop itself is :func:`distill.export.standalone_pipeline.sample_steps` (the file copied into every exported
student folder so that plain diffusers can sample it); this module adapts it to the toolkit's denoisers.

A student maps noise at ``sigmas[0]`` to an image in one call; a k-step student applies the same network again
at each later noise level. Between calls the sample is moved to the next level either with *fresh* noise
(SiD's multistep generator: ``x = x0 + sigma_{i+1} n``) or *deterministically* along the straight line through
the current sample (rectified flow's Euler step in EDM form: ``x = x0 + sigma_{i+1} (x - x0) / sigma_i``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from distill.export.standalone_pipeline import sample_steps


def student_sample(
    denoiser: Callable[..., Tensor],
    z: Tensor,
    sigmas: Sequence[float],
    cond: Any = None,
    *,
    deterministic: bool = False,
    steps: int | None = None,
    fresh_noise: Callable[[], Tensor] | None = None,
    **denoiser_kwargs: Any,
) -> Tensor:
    """x0 after ``steps`` (default: all) denoiser calls from ``x = sigmas[0] * z``.

    Only the last call records gradients (earlier ones run under ``no_grad``), which is what SiD's generator
    loss needs; under ``torch.no_grad`` this is plain sampling. ``fresh_noise`` draws the re-noising noise
    (default ``torch.randn_like(z)``); it is not used when ``deterministic``.
    """
    steps = len(sigmas) if steps is None else steps
    if not 1 <= steps <= len(sigmas):
        raise ValueError(f"steps={steps}: expected 1..{len(sigmas)} for noise levels {list(sigmas)}")

    def x0_fn(x: Tensor, sigma: Tensor) -> Tensor:
        return denoiser(x, sigma, cond, **denoiser_kwargs)

    noise = fresh_noise if fresh_noise is not None else (lambda: torch.randn_like(z))
    return sample_steps(x0_fn, z, list(sigmas)[:steps], deterministic, noise)
