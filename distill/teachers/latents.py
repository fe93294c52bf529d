"""Latents <-> images through a latent teacher's own autoencoder (:class:`LatentCodec`).

A latent teacher (Stable Diffusion 1.5/2.1, SDXL, SD3, PixArt, Sana, Flux, DiT, LDM) denoises autoencoder
latents, so the :class:`~distill.teachers.denoiser.Denoiser`, its students and every loss work on latents;
images appear only at the edges: sample grids, quality metrics and exported samples are *decoded*, and real
images (SiDA's real data, LoRA's training images) are *encoded*. This module is that edge, and nothing else.

The conventions are copied from each family's own diffusers pipeline (diffusers 0.42), so a latent the toolkit
makes decodes to the image the family's pipeline would make from it:

- ``StableDiffusionPipeline``, ``PixArtAlphaPipeline``, ``SanaPipeline`` (AutoencoderDC), ``DiTPipeline``
  (``latents = 1 / scaling_factor * latents``) and ``LDMPipeline`` (``latents / vqvae.config.scaling_factor``,
  for a VQModel or an AutoencoderKL in its ``vqvae`` slot): ``image = vae.decode(latents / scaling_factor)``.
- ``StableDiffusion3Pipeline``, ``FluxPipeline``: ``vae.decode(latents / scaling_factor + shift_factor)``;
  the shift is applied only where the VAE config has one. Flux's transformer sees *packed* latents
  (``FluxPipeline._pack_latents``); this codec takes and returns the unpacked ``[B, C, H/8, W/8]`` ones.
- ``StableDiffusionXLPipeline``: ``latents * latents_std / scaling_factor + latents_mean`` when the VAE config
  has both (Playground-style VAEs), else as SD; and with ``force_upcast`` an fp16 VAE decodes in float32 (the
  SDXL VAE overflows in fp16). Here such a VAE is simply held in float32 for decoding and encoding alike, as
  diffusers' SDXL training scripts do.
- ``VQModel.decode`` quantizes (LDMPipeline passes no ``force_not_quantize``), so :meth:`LatentCodec.encode`
  returns the unquantized encoder output, as LDM's UNet was trained on.

Encoding is the inverse, as diffusers' training scripts write it: ``(vae_latent - shift_factor) *
scaling_factor`` (``vae_latent``: ``latent_dist.sample(generator)`` or ``.mode()`` for KL, ``.latents`` for VQ,
``.latent`` for AutoencoderDC). No gradients flow through the codec: the VAE is frozen and only used at the
edges.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distill.teachers.families import TeacherFamily, describe_teacher_source
from distill.teachers.loading import resolve_teacher_path

__all__ = ["LatentCodec", "sample_shape"]

#: pixel values beyond this (in [-1, 1] units) mean the images are not in [-1, 1] at all (e.g. [0, 255]);
#: a little slack lets resizing overshoot through
IMAGE_RANGE_SLACK = 0.1
_RANGE_HINT = "map [0, 255] images with x / 127.5 - 1 and [0, 1] images with x * 2 - 1"


def _pair(hw: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(hw, int):
        return (hw, hw)
    h, w = (int(v) for v in hw)
    return (h, w)


class LatentCodec:
    """A latent teacher's frozen autoencoder, with its family's scaling (and shift) of latents.

    ``vae``: the diffusers autoencoder (AutoencoderKL, VQModel, AutoencoderDC, ...). ``scale_factor``: its
    spatial downsampling (default: ``2 ** (len(block_out_channels) - 1)`` as the pipelines compute it).
    ``upcast``: hold an fp16 VAE in float32 (SDXL's ``force_upcast``). Build it with :meth:`from_teacher`.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        scale_factor: int | None = None,
        upcast: bool = False,
        source: str | None = None,
    ) -> None:
        cfg = vae.config
        self.vae = vae.eval().requires_grad_(False)
        self.source = source
        self.scaling_factor = float(cfg.get("scaling_factor", 1.0) or 1.0)
        shift = cfg.get("shift_factor")
        self.shift_factor = None if shift is None else float(shift)
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        self.latents_mean = None if mean is None or std is None else torch.tensor(mean, dtype=torch.float32)
        self.latents_std = None if mean is None or std is None else torch.tensor(std, dtype=torch.float32)
        if scale_factor is None:
            blocks = cfg.get("encoder_block_out_channels") or cfg.get("block_out_channels")
            if not blocks:
                raise ValueError(
                    f"cannot tell the spatial downsampling of {type(vae).__name__} (no block_out_channels in "
                    "its config); pass scale_factor"
                )
            scale_factor = 2 ** (len(blocks) - 1)
        self.scale_factor = int(scale_factor)
        self.upcast = bool(upcast)
        if self.upcast and self.dtype == torch.float16:
            self.vae.to(torch.float32)

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_teacher(
        cls,
        spec_or_folder: str | os.PathLike[str] | TeacherFamily,
        torch_dtype: torch.dtype | None = None,
    ) -> LatentCodec | None:
        """The teacher's codec, or ``None`` for a pixel-space teacher.

        ``spec_or_folder``: as ``--teacher`` takes it ('default', a pipeline folder, its ``unet/`` or
        ``transformer/`` folder, a hub id) or an already read :class:`TeacherFamily`. The VAE is loaded with
        its own diffusers class (``from_pretrained(source, subfolder=vae_component)``), frozen, in eval mode.
        """
        if isinstance(spec_or_folder, TeacherFamily):
            family = spec_or_folder
        else:
            family = describe_teacher_source(resolve_teacher_path(str(spec_or_folder)))
        if not family.latent:
            return None
        source, component = family.source, family.vae_component
        folder = Path(source) / component
        local = Path(source).is_dir()
        if local and not (folder / "config.json").is_file():
            raise ValueError(
                f"{family.label} teacher {source!r} is a latent teacher but its autoencoder folder {folder} "
                "has no config.json; the full pipeline folder (with its VAE) is needed to decode its latents"
            )
        import diffusers

        vae_cls = getattr(diffusers, family.vae_class or "", None)
        if not isinstance(vae_cls, type) or not hasattr(vae_cls, "from_pretrained"):
            raise ValueError(
                f"{family.label} teacher {source!r}: unknown autoencoder class {family.vae_class!r} in "
                f"{component}/ (expected a diffusers class such as AutoencoderKL, VQModel, AutoencoderDC)"
            )
        kwargs: dict[str, Any] = {"subfolder": component}
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        vae = vae_cls.from_pretrained(source, **kwargs)
        upcast = family.family == "sdxl" and bool(vae.config.get("force_upcast", False))
        return cls(vae, scale_factor=family.vae_scale_factor, upcast=upcast, source=f"{source}/{component}")

    # ------------------------------------------------------------------------------------------- shapes
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def image_channels(self) -> int:
        cfg = self.vae.config
        return int(cfg.get("out_channels") or cfg.get("in_channels") or 3)

    def image_size_for(self, latent_hw: int | Sequence[int]) -> tuple[int, int]:
        """(H, W) of the images that latents of spatial size ``latent_hw`` decode to."""
        h, w = _pair(latent_hw)
        return (h * self.scale_factor, w * self.scale_factor)

    def latent_size_for(self, image_hw: int | Sequence[int]) -> tuple[int, int]:
        """(h, w) of the latents of images of size ``image_hw``; ``ValueError`` if not divisible."""
        h, w = _pair(image_hw)
        f = self.scale_factor
        if h % f or w % f or h <= 0 or w <= 0:
            raise ValueError(
                f"image size {h}x{w} is not a positive multiple of the autoencoder's downsampling factor {f} "
                f"({self.source}); resize or crop the images to e.g. {max(f, h // f * f)}x{max(f, w // f * f)}"
            )
        return (h // f, w // f)

    def image_shape_for(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of the image a latent of shape (c, h, w) decodes to."""
        return (self.image_channels, *self.image_size_for(tuple(latent_shape)[-2:]))

    # ------------------------------------------------------------------------------------------- placement
    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The VAE's compute dtype (inputs are cast to it; outputs are float32)."""
        return next(self.vae.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LatentCodec:
        """Move the VAE (in place); an upcast VAE stays float32 when asked for float16."""
        if self.upcast and dtype == torch.float16:
            dtype = torch.float32
        self.vae.to(device=device, dtype=dtype)
        return self

    def __repr__(self) -> str:
        shift = "" if self.shift_factor is None else f", shift_factor={self.shift_factor}"
        norm = "" if self.latents_mean is None else ", latents_mean/std"
        return (
            f"LatentCodec({type(self.vae).__name__} from {self.source!r}, latent_channels={self.latent_channels}, "
            f"scale_factor={self.scale_factor}, scaling_factor={self.scaling_factor}{shift}{norm}, "
            f"dtype={self.dtype}, device={self.device}{', upcast' if self.upcast else ''})"
        )

    # ------------------------------------------------------------------------------------------- conversions
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.latents_mean is None or self.latents_std is None:
            return None
        view = (1, -1, 1, 1)
        return self.latents_mean.to(like.device).view(view), self.latents_std.to(like.device).view(view)

    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The family's latents -> what ``vae.decode`` takes (float32 arithmetic)."""
        z = latents.float()
        stats = self._stats(z)
        if stats is not None:
            return z * stats[1] / self.scaling_factor + stats[0]
        z = z / self.scaling_factor
        return z if self.shift_factor is None else z + self.shift_factor

    def from_vae_latents(self, vae_latents: torch.Tensor) -> torch.Tensor:
        """What ``vae.encode`` gives -> the family's latents (the inverse of :meth:`to_vae_latents`)."""
        z = vae_latents.float()
        stats = self._stats(z)
        if stats is not None:
            return (z - stats[0]) * self.scaling_factor / stats[1]
        z = z if self.shift_factor is None else z - self.shift_factor
        return z * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Latents [B, c, h, w] -> images [B, C, H, W] in [-1, 1] (not clamped), float32, on the VAE's device."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents of shape {tuple(latents.shape)}: expected [B, {self.latent_channels}, h, w] for "
                f"{self.source}" + (" (Flux latents must be unpacked first)" if latents.ndim == 3 else "")
            )
        chunks = latents.split(batch_size) if batch_size else (latents,)
        out = []
        for chunk in chunks:
            z = self.to_vae_latents(chunk.to(self.device)).to(self.dtype)
            out.append(self.vae.decode(z).sample.float())
        return torch.cat(out)

    def check_images(self, images: torch.Tensor) -> None:
        """``ValueError`` naming what is wrong unless ``images`` is a float [B, C, H, W] batch in about [-1, 1]
        whose size the autoencoder can encode. [0, 1] images cannot be told from bright [-1, 1] ones and pass."""
        shape = tuple(images.shape)
        if images.ndim != 4 or shape[1] != self.image_channels:
            raise ValueError(
                f"images of shape {shape}: expected [B, {self.image_channels}, H, W] for {self.source}"
            )
        self.latent_size_for(shape[-2:])
        if not images.is_floating_point():
            raise ValueError(
                f"images of dtype {images.dtype}: expected floating-point images in [-1, 1] ({_RANGE_HINT})"
            )
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain non-finite values (NaN or inf); expected values in [-1, 1]")
        low, high = float(images.min()), float(images.max())
        limit = 1 + IMAGE_RANGE_SLACK
        if low < -limit or high > limit:
            raise ValueError(f"image values span [{low:.4g}, {high:.4g}]; expected [-1, 1] ({_RANGE_HINT})")

    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        sample: bool = True,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> latents [B, c, H/f, W/f], float32, on the VAE's device.

        KL autoencoders draw from the posterior with ``generator`` when ``sample`` (as the training scripts
        do), else take its mode; VQ and DC autoencoders are deterministic.
        """
        self.check_images(images)
        chunks = images.split(batch_size) if batch_size else (images,)
        out = []
        for chunk in chunks:
            encoded = self.vae.encode(chunk.to(self.device, self.dtype))
            if hasattr(encoded, "latent_dist"):
                dist = encoded.latent_dist
                z = dist.sample(generator) if sample else dist.mode()
            elif hasattr(encoded, "latents"):  # VQModel: the unquantized encoder output
                z = encoded.latents
            elif hasattr(encoded, "latent"):  # AutoencoderDC
                z = encoded.latent
            else:
                raise TypeError(f"{type(self.vae).__name__}.encode returned {type(encoded).__name__}")
            out.append(self.from_vae_latents(z))
        return torch.cat(out)


def sample_shape(
    teacher: Any, codec: LatentCodec | None, resolution: int | None = None
) -> tuple[int, int, int]:
    """(C, H, W) of what ``teacher`` (a Denoiser) denoises: its sample channels, and its configured sample size
    or ``resolution`` (image pixels; divided by the autoencoder's factor for a latent teacher).

    Flux transformers have no sample size in their config, so they need ``resolution``; a ``resolution`` the
    autoencoder's factor does not divide is refused by name."""
    channels = teacher.sample_channels
    if resolution is not None:
        if resolution <= 0:
            raise ValueError(f"resolution={resolution} must be a positive number of pixels")
        h, w = (resolution, resolution) if codec is None else codec.latent_size_for(resolution)
    elif teacher.sample_size is not None:
        size = teacher.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
    else:
        raise ValueError(
            f"{type(teacher.model).__name__} has no sample_size in its config: set resolution (image pixels, "
            "e.g. 1024 for FLUX.1)"
        )
    if channels is None:
        raise ValueError(f"{type(teacher.model).__name__} has no in_channels in its config")
    return (int(channels), int(h), int(w))
