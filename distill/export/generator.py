"""Export a trained generator as a diffusers pipeline folder (safetensors) with a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.export.model_card import (
    DEFAULT_LICENSE,
    call_snippet,
    describe_teacher,
    pipeline_tag_for,
    write_export_card,
)
from distill.pipelines import OneStepPipeline, scheduler_from_denoiser
from distill.teachers.denoiser import Denoiser

USAGE = """import torch
from diffusers import DiffusionPipeline

# plain diffusers runs the pipeline code shipped in the folder (onestep_pipeline.py) once told trust_remote_code
pipe = DiffusionPipeline.from_pretrained("{path}", trust_remote_code=True)
# with onestep-toolkit installed: from distill.pipelines import OneStepPipeline
# pipe = OneStepPipeline.from_pretrained("{path}")
{setup}images = pipe(batch_size=16, {kwargs}generator=torch.Generator().manual_seed(0), output_type="pt").images"""


def student_title(num_steps: int, method: str | None, teacher: str) -> str:
    """'One-step SiD student of default_teacher' (the teacher by its display name, never a local path)."""
    steps = "One-step" if num_steps == 1 else f"{num_steps}-step"
    ref = describe_teacher(teacher)
    short = f" {method}" if method and len(method) <= 12 else ""
    return f"{steps}{short} student of {ref.name if ref else teacher}"


def export_generator(
    generator: Denoiser,
    folder: str | Path,
    step_sigmas: list[float],
    base_model: str,
    method: str,
    facts: dict[str, Any],
    sample_grid: str | None = None,
    license: str = DEFAULT_LICENSE,
) -> Path:
    """Write ``folder`` = model_index.json + unet/ (safetensors) + scheduler/ + onestep_pipeline.py (the
    pipeline code, for plain diffusers) + README.md (+ samples.png).

    ``base_model`` is the teacher as the recipe got it ('default', a local folder or a Hub id); ``facts``'
    ``method`` (e.g. 'SiD') goes into the title.
    """
    folder = Path(folder)
    scheduler = scheduler_from_denoiser(generator)
    pipe = OneStepPipeline(unet=generator.model, scheduler=scheduler, step_sigmas=list(step_sigmas))
    pipe.save_pretrained(folder, safe_serialization=True)
    setup, kwargs = call_snippet(generator.model)
    write_export_card(
        folder,
        title=student_title(len(step_sigmas), facts.get("method"), base_model),
        method=method,
        facts={**facts, "parameters": sum(p.numel() for p in generator.parameters())},
        teacher=base_model,
        tags=["distillation", "one-step" if len(step_sigmas) == 1 else "few-step", "sid"],
        usage=USAGE.replace("{setup}", setup).replace("{kwargs}", kwargs),
        sample_grid=sample_grid,
        pipeline_tag=pipeline_tag_for(generator.model),
        license=license,
    )
    return folder
