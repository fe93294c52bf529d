"""Builders for the diffusers networks the toolkit trains from scratch (teachers of the default data)."""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import EDMEulerScheduler, UNet2DModel

from distill.teachers.edm import SIGMA_DATA


def build_unet(
    sample_size: int,
    channels: int,
    block_out_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 2,
    attention: bool = False,
    num_classes: int | None = None,
    norm_num_groups: int = 8,
) -> UNet2DModel:
    """A small ``UNet2DModel``; with ``num_classes`` it gets ``num_classes + 1`` label embeddings (last = null)."""
    n = len(block_out_channels)
    down = ["AttnDownBlock2D" if attention and i == n - 1 else "DownBlock2D" for i in range(n)]
    up = ["AttnUpBlock2D" if attention and i == 0 else "UpBlock2D" for i in range(n)]
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=norm_num_groups,
        num_class_embeds=None if num_classes is None else num_classes + 1,
    )


def edm_scheduler(sigma_min: float = 0.002, sigma_max: float = 80.0) -> EDMEulerScheduler:
    """The scheduler a teacher trained with EDM preconditioning ships with (F-prediction = 'epsilon')."""
    return EDMEulerScheduler(
        sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=SIGMA_DATA, prediction_type="epsilon", rho=7.0
    )
