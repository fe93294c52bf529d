"""Exponential moving averages of trained weights, with EDM's half-life measured in training samples.

diffusers' ``EMAModel`` parameterises the average by a per-step decay; distillation papers (EDM, SiD) specify it
as a half-life in images with a ramp-up (half-life = min(H, ratio * images seen)), which keeps the average
meaningful when the batch size changes. :class:`EMA` averages a whole model (a frozen copy you can call);
:class:`ParameterEMA` averages only named parameters (LoRA adapters on a shared base, where a copy of the whole
model would cost what the adapters save) and swaps the averages in when you need them. Either can live on another
device than the model (``device="cpu"``: off the accelerator; each update copies the weights across).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from engine.fsdp import full_tensor


class _HalfLife:
    def __init__(self, halflife_images: float, rampup_ratio: float | None) -> None:
        if halflife_images <= 0:
            raise ValueError(f"EMA halflife_images={halflife_images} must be > 0")
        if rampup_ratio is not None and rampup_ratio <= 0:
            raise ValueError(f"EMA rampup_ratio={rampup_ratio} must be > 0 or None")
        self.halflife_images = float(halflife_images)
        self.rampup_ratio = rampup_ratio

    def beta(self, images_in_step: int, images_seen: int) -> float:
        """Decay for one step of ``images_in_step`` samples after ``images_seen`` samples in total."""
        halflife = self.halflife_images
        if self.rampup_ratio is not None:
            halflife = min(halflife, images_seen * self.rampup_ratio)
        return 0.5 ** (images_in_step / max(halflife, 1e-8))


class EMA(_HalfLife):
    """Holds a frozen copy of ``model`` whose floating-point tensors track the model's."""

    def __init__(
        self,
        model: nn.Module,
        halflife_images: float,
        rampup_ratio: float | None = 0.05,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(halflife_images, rampup_ratio)
        # accelerate.prepare puts an autocast-wrapped `forward` on the model itself, which unwrap_model keeps (the
        # trained model needs it) and a deepcopy inherits. The EMA is evaluated and exported: strip the wrapper
        # from the copy so it runs in its weights' own precision, as the exported model does.
        copied = copy.deepcopy(model)
        self.module = (
            extract_model_from_parallel(copied, keep_fp32_wrapper=False).requires_grad_(False).eval()
        )
        if device is not None:  # e.g. "cpu": the average off the accelerator, updated across devices
            self.module.to(device)

    @torch.no_grad()
    def update(self, model: nn.Module, images_in_step: int, images_seen: int) -> float:
        beta = self.beta(images_in_step, images_seen)
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            value = full_tensor(value)  # FSDP: one gathered tensor at a time (a collective: every process)
            target = ema_state[name]
            if target.is_floating_point():
                target.lerp_(value.detach().to(target.device, target.dtype), 1.0 - beta)
            else:
                target.copy_(value)
        return beta

    def save(self, path: str | Path) -> None:
        save_model(self.module, str(path))

    def load(self, path: str | Path) -> None:
        load_model(self.module, str(path), strict=True)


class ParameterEMA(_HalfLife):
    """Averages of the named parameters of a model, kept beside it (no copy of the rest)."""

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        halflife_images: float,
        rampup_ratio: float | None = 0.05,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(halflife_images, rampup_ratio)
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"ParameterEMA: {missing[:3]} are not parameters of {type(model).__name__}")
        self.shadow = {n: params[n].detach().to(device, torch.float32, copy=True) for n in names}

    @property
    def module(self) -> nn.Module:
        raise AttributeError("ParameterEMA keeps no model copy: use `with ema.applied(model): ...`")

    @torch.no_grad()
    def update(self, model: nn.Module, images_in_step: int, images_seen: int) -> float:
        beta = self.beta(images_in_step, images_seen)
        params = dict(model.named_parameters())
        for name, target in self.shadow.items():
            target.lerp_(params[name].detach().to(target.device, target.dtype), 1.0 - beta)
        return beta

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averages into ``model`` (restored on exit)."""
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, value in self.shadow.items():
                params[n].copy_(value)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, value in saved.items():
                    params[n].copy_(value)

    def save(self, path: str | Path) -> None:
        save_file({n: t.contiguous() for n, t in self.shadow.items()}, str(path))

    def load(self, path: str | Path) -> None:
        loaded = load_file(str(path))
        if set(loaded) != set(self.shadow):
            raise ValueError(f"EMA checkpoint {path} holds other parameters than this run trains")
        for n, t in loaded.items():
            self.shadow[n].copy_(t)
