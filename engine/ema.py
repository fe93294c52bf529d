"""Exponential moving average of a trained model, with EDM's half-life measured in training samples.

diffusers' ``EMAModel`` parameterises the average by a per-step decay; distillation papers (EDM, SiD) specify it
as a half-life in images with a ramp-up (half-life = min(H, ratio * images seen)), which keeps the average
meaningful when the batch size changes. This class implements that rule and nothing else.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn


class EMA:
    """Holds a frozen copy of ``model`` whose floating-point tensors track the model's."""

    def __init__(self, model: nn.Module, halflife_images: float, rampup_ratio: float | None = 0.05) -> None:
        if halflife_images <= 0:
            raise ValueError(f"EMA halflife_images={halflife_images} must be > 0")
        if rampup_ratio is not None and rampup_ratio <= 0:
            raise ValueError(f"EMA rampup_ratio={rampup_ratio} must be > 0 or None")
        self.halflife_images = float(halflife_images)
        self.rampup_ratio = rampup_ratio
        self.module = copy.deepcopy(model).requires_grad_(False).eval()

    def beta(self, images_in_step: int, images_seen: int) -> float:
        """Decay for one step of ``images_in_step`` samples after ``images_seen`` samples in total."""
        halflife = self.halflife_images
        if self.rampup_ratio is not None:
            halflife = min(halflife, images_seen * self.rampup_ratio)
        return 0.5 ** (images_in_step / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, images_in_step: int, images_seen: int) -> float:
        beta = self.beta(images_in_step, images_seen)
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.is_floating_point():
                target.lerp_(value.detach().to(target.dtype), 1.0 - beta)
            else:
                target.copy_(value)
        return beta

    def save(self, path: str | Path) -> None:
        save_model(self.module, str(path))

    def load(self, path: str | Path) -> None:
        missing, unexpected = load_model(self.module, str(path), strict=True)
        if missing or unexpected:  # strict=True raises first; kept for clarity
            raise RuntimeError(f"EMA checkpoint {path} does not match the model: {missing or unexpected}")
