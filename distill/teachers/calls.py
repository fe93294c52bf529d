"""How each family's diffusers denoiser is called: keyword names, timestep units, packing, learned sigma.

:class:`~distill.teachers.denoiser.Denoiser` does the noise-level maths once for every teacher; what differs
between a UNet, SD3's MMDiT, PixArt, Sana, Flux and DiT is only the call itself, which lives here. Each rule was
read from the family's own diffusers pipeline (``diffusers/pipelines/<family>/pipeline_*.py``, the loop that
calls ``self.unet`` / ``self.transformer``):

================================  =================================================================================
model class                       call (``t``: the timestep on the training scale, ``0 .. num_train_timesteps``)
================================  =================================================================================
UNet2DModel, UNet2DConditionModel ``model(x, t, class_labels= / encoder_hidden_states= / added_cond_kwargs=)``
SD3Transformer2DModel             ``model(hidden_states=x, timestep=t, encoder_hidden_states=, pooled_projections=)``
PixArtTransformer2DModel          ``model(x, encoder_hidden_states=, encoder_attention_mask=, timestep=t,
                                  added_cond_kwargs={"resolution", "aspect_ratio"})`` (both ``None`` unless the
                                  model is a 1024-px one, ``sample_size == 128``, as PixArtAlphaPipeline does)
SanaTransformer2DModel            ``model(x, encoder_hidden_states=, encoder_attention_mask=,
                                  timestep=t * config.timestep_scale)``
FluxTransformer2DModel            latents packed into 2 x 2 patches, ``model(hidden_states=packed,
                                  timestep=t / 1000, guidance=, pooled_projections=, encoder_hidden_states=,
                                  txt_ids=zeros(L, 3), img_ids=(0, row, col))``, the output unpacked again
DiTTransformer2DModel             ``model(x, timestep=t, class_labels=)``
================================  =================================================================================

Models whose output has twice the input channels (learned sigma: PixArt, DiT, improved-DDPM UNets) are read as
their first half, the mean prediction, as those pipelines do. :data:`TRANSFORMER_CALLS` lists the transformer
classes with a call; :data:`REQUIRED` the conditioning each one cannot run without, so a missing prompt embedding
is named instead of failing deep inside the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "REQUIRED",
    "TRANSFORMER_CALLS",
    "UNET_CALLS",
    "call_denoiser",
    "denoiser_class_name",
    "flux_pack",
    "flux_unpack",
    "sample_channels",
]

Kwargs = dict[str, Any]


def unwrapped(model: nn.Module) -> nn.Module:
    """The diffusers model inside ``torch.compile``'s and peft's wrappers (a ``PeftModel`` forwards its
    positional and keyword arguments to it, so the call itself goes to the wrapper)."""
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "_orig_mod", model)


def denoiser_class_name(model: nn.Module) -> str:
    """The diffusers class of ``model``, seen through ``torch.compile``'s and peft's wrappers."""
    return type(unwrapped(model)).__name__


def _config(model: nn.Module, key: str, default: Any = None) -> Any:
    cfg = getattr(unwrapped(model), "config", None)
    if cfg is None:
        return default
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"model output must have .sample (diffusers output), be a tuple or a tensor; got {type(out)}"
    )


# ---------------------------------------------------------------------------------------------- Flux packing
def flux_pack(x: Tensor) -> Tensor:
    """[B, C, H, W] latents -> [B, H/2 * W/2, 4C] tokens of 2 x 2 patches (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need an even height and width, got {h} x {w}")
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def flux_unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`flux_pack` for latents of ``height`` x ``width`` (FluxPipeline._unpack_latents)."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def flux_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Flux's positional ids of the packed latent tokens: (0, row, column) per 2 x 2 patch."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- the calls
def _unet(model: nn.Module, x: Tensor, t: Tensor, kw: Kwargs) -> Tensor:
    return _output(model(x, t, **kw))


def _sd3(model: nn.Module, x: Tensor, t: Tensor, kw: Kwargs) -> Tensor:
    return _output(model(hidden_states=x, timestep=t, return_dict=False, **kw))


def _pixart(model: nn.Module, x: Tensor, t: Tensor, kw: Kwargs) -> Tensor:
    added = kw.pop("added_cond_kwargs", None)
    if added is None:
        added = {"resolution": None, "aspect_ratio": None}
        if (
            _config(model, "sample_size") == 128
        ):  # the 1024-px models take the image size as a micro-condition
            h, w = x.shape[-2] * 8, x.shape[-1] * 8  # PixArt's VAE downsamples by 8
            dtype = kw["encoder_hidden_states"].dtype
            added = {
                "resolution": torch.tensor([h, w], device=x.device, dtype=dtype).repeat(len(x), 1),
                "aspect_ratio": torch.tensor([h / w], device=x.device, dtype=dtype).repeat(len(x), 1),
            }
    return _output(model(x, timestep=t, added_cond_kwargs=added, return_dict=False, **kw))


def _sana(model: nn.Module, x: Tensor, t: Tensor, kw: Kwargs) -> Tensor:
    scale = float(_config(model, "timestep_scale", 1.0) or 1.0)
    return _output(model(x, timestep=t * scale, return_dict=False, **kw))


def _flux(model: nn.Module, x: Tensor, t: Tensor, kw: Kwargs) -> Tensor:
    h, w = x.shape[-2:]
    text = kw["encoder_hidden_states"]
    kw = dict(kw)
    if _config(model, "guidance_embeds"):
        guidance = kw.pop("guidance", None)
        kw["guidance"] = (
            torch.ones(len(x), device=x.device, dtype=torch.float32) if guidance is None else guidance.float()
        )
    else:
        kw.pop("guidance", None)
    out = model(
        hidden_states=flux_pack(x),
        timestep=t / 1000.0,
        txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype),
        img_ids=flux_image_ids(h, w, x.device, x.dtype),
        return_dict=False,
        **kw,
    )
    return flux_unpack(_output(out), h, w)


def _dit(model: nn.Module, x: Tensor, t: Tensor, kw: Kwargs) -> Tensor:
    return _output(model(x, timestep=t, return_dict=False, **kw))


UNET_CALLS: dict[str, Callable[[nn.Module, Tensor, Tensor, Kwargs], Tensor]] = {
    "UNet2DModel": _unet,
    "UNet2DConditionModel": _unet,
}
#: transformer classes the Denoiser can call (the hub's legacy ``Transformer2DModel`` folders load as
#: DiTTransformer2DModel or PixArtTransformer2DModel through diffusers' own class remapping)
TRANSFORMER_CALLS: dict[str, Callable[[nn.Module, Tensor, Tensor, Kwargs], Tensor]] = {
    "SD3Transformer2DModel": _sd3,
    "PixArtTransformer2DModel": _pixart,
    "SanaTransformer2DModel": _sana,
    "FluxTransformer2DModel": _flux,
    "DiTTransformer2DModel": _dit,
}
#: conditioning keywords a class cannot run without
REQUIRED: dict[str, tuple[str, ...]] = {
    "SD3Transformer2DModel": ("encoder_hidden_states", "pooled_projections"),
    "PixArtTransformer2DModel": ("encoder_hidden_states",),
    "SanaTransformer2DModel": ("encoder_hidden_states",),
    "FluxTransformer2DModel": ("encoder_hidden_states", "pooled_projections"),
    "DiTTransformer2DModel": ("class_labels",),
}


def sample_channels(model: nn.Module) -> int | None:
    """Channels of the samples the model denoises: ``in_channels``, or a quarter of it for Flux (2 x 2 packed)."""
    channels = _config(model, "in_channels")
    if channels is not None and denoiser_class_name(model) == "FluxTransformer2DModel":
        return int(channels) // 4
    return channels


def call_denoiser(model: nn.Module, x: Tensor, timestep: Tensor, kwargs: Kwargs) -> Tensor:
    """The model's prediction for samples ``x`` [B, C, H, W] at ``timestep`` ([B] float, training scale), in the
    shape of ``x`` (learned-sigma channels dropped). ``kwargs``: the conditioning keywords."""
    name = denoiser_class_name(model)
    missing = [k for k in REQUIRED.get(name, ()) if kwargs.get(k) is None]
    if missing:
        raise ValueError(
            f"{name} needs {', '.join(missing)} in its condition (a text teacher needs prompt embeddings: "
            "--prompts; DiT needs class labels)"
        )
    call = TRANSFORMER_CALLS.get(name) or UNET_CALLS.get(name) or _unet
    out = call(model, x, timestep, kwargs)
    if out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
        out = out[:, : x.shape[1]]  # learned sigma: the first half is the mean prediction
    return out
