"""Tiny diffusers teachers built from configs (no downloads), saved as local folders for recipe tests."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.denoiser import Denoiser
from distill.models import build_unet, edm_scheduler


def tiny_edm_teacher(folder: Path, num_classes: int | None = None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    unet = build_unet(
        8, 1, block_out_channels=(8, 16), layers_per_block=1, num_classes=num_classes, norm_num_groups=4
    )
    Denoiser(unet, edm_scheduler()).save_pretrained(folder)
    return folder
