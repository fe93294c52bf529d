"""Export a trained generator as a diffusers pipeline folder (safetensors) with a model card."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from distill.export.model_card import write_model_card
from distill.pipelines import OneStepPipeline, scheduler_from_denoiser
from distill.teachers.denoiser import Denoiser

USAGE = """from distill.pipelines import OneStepPipeline, scheduler_from_denoiser

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
