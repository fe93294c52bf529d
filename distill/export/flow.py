"""Export rectified-flow models (k-RF velocity fields and distilled students) as diffusers pipeline folders
that :class:`distill.pipelines.RectifiedFlowPipeline` loads, and plain diffusers too (the pipeline code ships in
the folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.export.model_card import DEFAULT_LICENSE, call_snippet, pipeline_tag_for, write_export_card
from distill.pipelines import RectifiedFlowPipeline, scheduler_from_denoiser
from distill.teachers.denoiser import Denoiser

DONE_FILE = "reflow_export.json"

USAGE = """import torch
from diffusers import DiffusionPipeline

# plain diffusers runs the pipeline code shipped in the folder (onestep_pipeline.py) once told trust_remote_code
pipe = DiffusionPipeline.from_pretrained("{path}", trust_remote_code=True)
# with onestep-toolkit installed: from distill.pipelines import RectifiedFlowPipeline
# pipe = RectifiedFlowPipeline.from_pretrained("{path}")
{setup}images = pipe(batch_size=16, {kwargs}num_inference_steps={steps},
             generator=torch.Generator().manual_seed(0), output_type="pt").images"""


def export_flow_model(
    model: Denoiser,
    folder: str | Path,
    step_sigmas: list[float],
    any_steps: bool,
    base_model: str,
    title: str,
    method: str,
    facts: dict[str, Any],
    sample_grid: str | None = None,
    license: str = DEFAULT_LICENSE,
) -> Path:
    """Write ``folder`` = model_index.json + unet/ (safetensors) + scheduler/ + onestep_pipeline.py + README.md
    (+ samples.png).

    The folder is loadable by :class:`RectifiedFlowPipeline`, by plain diffusers without the toolkit
    (``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``) and by ``Denoiser.from_pretrained``
    (for the next reflow round), and publishable with ``onestep publish``. ``reflow_export.json`` is written last and marks
    the export complete. ``base_model`` is the teacher as the recipe got it; a local one is named by its folder
    name, in ``title`` too.
    """
    folder = Path(folder)
    done = folder / DONE_FILE
    done.unlink(missing_ok=True)
    pipe = RectifiedFlowPipeline(
        unet=model.model,
        scheduler=scheduler_from_denoiser(model),
        step_sigmas=[float(s) for s in step_sigmas],
        any_steps=any_steps,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    steps = len(step_sigmas)
    facts = {
        **facts,
        "sampling": f"Euler in flow time from x = {step_sigmas[0]:g} z, z ~ N(0, I) "
        + ("(any number of steps)" if any_steps else f"on step_sigmas {[round(s, 4) for s in step_sigmas]}"),
    }
    setup, kwargs = call_snippet(model.model)
    write_export_card(
        folder,
        title=title,
        method=method,
        facts={**facts, "parameters": sum(p.numel() for p in model.parameters())},
        teacher=base_model,
        tags=["distillation", "rectified-flow", "reflow", "one-step" if steps == 1 else "few-step"],
        usage=USAGE.replace("{setup}", setup).replace("{kwargs}", kwargs).replace("{steps}", str(steps)),
        sample_grid=sample_grid,
        pipeline_tag=pipeline_tag_for(model.model),
        license=license,
    )
    done.write_text(
        json.dumps({k: v for k, v in facts.items() if isinstance(v, (int, float, str))}, indent=1)
    )
    return folder
