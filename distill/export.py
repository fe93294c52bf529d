"""Export a trained generator as a diffusers pipeline folder (safetensors) with a model card."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from distill.denoiser import Denoiser
from distill.model_card import write_model_card
from distill.pipeline import OneStepPipeline

USAGE = """from distill.pipeline import OneStepPipeline

pipe = OneStepPipeline.from_pretrained("{path}")
images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0), output_type="pt").images"""


def export_generator(
    generator: Denoiser,
    folder: str | Path,
    step_sigmas: list[float],
    base_model: str,
    method: str,
    facts: dict[str, Any],
    sample_grid: str | None = None,
) -> Path:
    """Write ``folder`` = model_index.json + unet/ (safetensors) + scheduler/ + README.md (+ samples.png)."""
    folder = Path(folder)
    scheduler = scheduler_from_denoiser(generator)
    pipe = OneStepPipeline(unet=generator.model, scheduler=scheduler, step_sigmas=list(step_sigmas))
    pipe.save_pretrained(folder, safe_serialization=True)
    grid_name = None
    if sample_grid and Path(sample_grid).is_file():
        grid_name = "samples.png"
        shutil.copyfile(sample_grid, folder / grid_name)
    write_model_card(
        folder,
        title=f"One-step student of {base_model}",
        method=method,
        facts={**facts, "parameters": sum(p.numel() for p in generator.parameters())},
        base_model=base_model if base_model != "default" else "onestep-toolkit/default-digits-teacher",
        tags=["distillation", "one-step", "sid"],
        sample_grid=grid_name,
        usage=USAGE.format(path=folder),
    )
    return folder


def scheduler_from_denoiser(denoiser: Denoiser):
    """Rebuild the diffusers scheduler object whose config the denoiser was made from."""
    import diffusers

    cls = getattr(diffusers, denoiser.scheduler_class or "", None)
    if cls is None:
        raise ValueError(f"Cannot export: unknown scheduler class {denoiser.scheduler_class!r}")
    return cls.from_config(dict(denoiser.scheduler_config))


def load_student(folder: str | Path, device: str | torch.device = "cpu") -> OneStepPipeline:
    return OneStepPipeline.from_pretrained(str(folder)).to(device)
