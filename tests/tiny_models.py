"""Tiny diffusers teachers built from configs (no downloads), saved as local folders for recipe tests."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.teachers.builders import build_unet, edm_scheduler
from distill.teachers.denoiser import Denoiser


def tiny_edm_teacher(folder: Path, num_classes: int | None = None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    unet = build_unet(
        8, 1, block_out_channels=(8, 16), layers_per_block=1, num_classes=num_classes, norm_num_groups=4
    )
    Denoiser(unet, edm_scheduler()).save_pretrained(folder)
    return folder


def sid_trainer(tmp_path: Path, teacher: Path, **overrides):
    """A SiD trainer on a tiny teacher, sized for tests (batch 4, 2 steps, no logging); ``overrides`` win."""
    from engine.trainer import Trainer
    from recipes import sid as sid_recipe

    base = dict(
        teacher=str(teacher),
        output_dir=str(tmp_path),
        batch_size=4,
        max_steps=2,
        eval_samples=16,
        eval_every=0,
        log_with="none",
        progress_bar=False,
    )
    cfg = sid_recipe.SiDConfig(**{**base, **overrides})
    return Trainer(cfg, sid_recipe.SiDRecipe(cfg))
