"""The k-step student sampler, written once: SiD's generator, the exported pipelines and reflow's flow sampler.

A student maps noise at ``sigmas[0]`` to an image in one call; a k-step student applies the same network again
at each later noise level. Between calls the sample is moved to the next level either with *fresh* noise
(SiD's multistep generator: ``x = x0 + sigma_{i+1} n``) or *deterministically* along the straight line through
the current sample (rectified flow's Euler step in EDM form: ``x = x0 + sigma_{i+1} (x - x0) / sigma_i``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


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
    n = z.shape[0]
    x = z * sigmas[0]
    for i in range(steps):
        last = i + 1 == steps
        with contextlib.nullcontext() if last else torch.no_grad():
            x0 = denoiser(x, torch.full((n,), float(sigmas[i]), device=z.device), cond, **denoiser_kwargs)
        if last:
            return x0
        nxt = float(sigmas[i + 1])
        if deterministic:
            x0 = x0.to(x.dtype)
            x = x0 + (nxt / float(sigmas[i])) * (x - x0)
        else:
            x = x0 + nxt * (fresh_noise() if fresh_noise is not None else torch.randn_like(z))
    raise AssertionError("unreachable")
