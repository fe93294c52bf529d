"""Publish a SiD-LoRA generator as a plug-in one-step adapter for the ORIGINAL teacher, and load it back.

The folder holds:

* ``adapter_config.json`` + ``adapter_model.safetensors``: peft's format, for
  ``peft.PeftModel.from_pretrained(teacher_unet, folder)`` (every diffusers UNet, ``UNet2DModel`` included);
* ``pytorch_lora_weights.safetensors`` (only for UNets with diffusers' ``PeftAdapterMixin``, e.g.
  ``UNet2DConditionModel``): diffusers' format, for ``pipe.load_lora_weights(folder)`` or
  ``unet.load_lora_adapter(folder, prefix="unet", use_safetensors=True)`` (diffusers 0.42 looks only for a
  pickle ``.bin`` unless told ``use_safetensors=True`` or ``weight_name=``);
* ``onestep_adapter.json``: the student's noise levels (``step_sigmas``) and the teacher it belongs to;
* ``README.md``: the model card.

:func:`distill.pipelines.load_adapter_student` (also ``OneStepPipeline.from_teacher_and_adapter``) turns teacher +
adapter into a one-step pipeline, optionally merged; :func:`export_merged` writes that merged pipeline as a full
checkpoint folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from distill.export.generator import export_generator
from distill.export.model_card import (
    DEFAULT_LICENSE,
    call_snippet,
    describe_teacher,
    pipeline_tag_for,
    write_export_card,
)
from distill.pipelines import ADAPTER_INFO, load_adapter_student, read_adapter_info
from distill.teachers.denoiser import Denoiser

USAGE = """import torch
from distill.pipelines import OneStepPipeline

pipe = OneStepPipeline.from_teacher_and_adapter("{teacher}", "{path}")
{setup}images = pipe(batch_size=16, {kwargs}generator=torch.Generator().manual_seed(0), output_type="pt").images

# or by hand: the teacher's UNet + plain peft, sampled at sigma = step_sigmas[0] (see onestep_adapter.json)
# from peft import PeftModel
# unet = PeftModel.from_pretrained(teacher_unet, "{path}")
# diffusers UNets with LoRA support (UNet2DConditionModel) also load it natively:
# teacher_unet.load_lora_adapter("{path}", prefix="unet", use_safetensors=True)"""


def save_sid_adapter(
    peft_model,
    folder: str | Path,
    adapter_name: str,
    step_sigmas: list[float],
    teacher: str,
    method: str,
    facts: dict[str, Any],
    sample_grid: str | None = None,
    license: str = DEFAULT_LICENSE,
) -> Path:
    """Write ``adapter_name`` of ``peft_model`` (a peft-wrapped teacher UNet) as a plug-in adapter folder."""
    from finetune.export import save_adapter

    folder = Path(folder)
    if Path(teacher).expanduser().is_dir():
        teacher = str(Path(teacher).expanduser().resolve())  # loadable from any working directory
    # diffusers' format too where the UNet can load it natively (PeftAdapterMixin: UNet2DConditionModel, ...)
    native = hasattr(peft_model.get_base_model(), "load_lora_adapter")
    save_adapter(
        peft_model,
        folder,
        diffusers_prefix="unet" if native else None,
        base_model_name_or_path=teacher,
        adapter_name=adapter_name,
    )
    info = {"step_sigmas": [float(s) for s in step_sigmas], "teacher": teacher, "method": method}
    (folder / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n")
    base_unet = peft_model.get_base_model()
    setup, kwargs = call_snippet(base_unet)
    ref = describe_teacher(teacher)
    write_export_card(
        folder,
        title=f"One-step LoRA adapter for {ref.name if ref else teacher}",
        method=method,
        facts={**facts, "adapter_parameters": _adapter_parameters(folder)},
        teacher=teacher,
        tags=["distillation", "one-step", "sid", "lora"],
        usage=USAGE.replace("{teacher}", teacher).replace("{setup}", setup).replace("{kwargs}", kwargs),
        sample_grid=sample_grid,
        pipeline_tag=pipeline_tag_for(base_unet),
        license=license,
    )
    return folder


def export_merged(
    adapter_folder: str | Path,
    folder: str | Path,
    teacher: str | None = None,
    facts: dict[str, Any] | None = None,
) -> Path:
    """Merge the adapter into (a fresh load of) its teacher and write a full student folder (as
    :func:`~distill.export.generator.export_generator`: loadable by plain diffusers too)."""
    info = read_adapter_info(adapter_folder)
    teacher = teacher if teacher is not None else info["teacher"]
    pipe = load_adapter_student(teacher, adapter_folder, merge=True)
    return export_generator(
        Denoiser(pipe.unet, pipe.scheduler),
        folder,
        step_sigmas=info["step_sigmas"],
        base_model=teacher,
        method=f"{info['method']}, adapter merged into the teacher",
        facts=facts or {},
    )


def _adapter_parameters(folder: Path) -> int:
    return sum(t.numel() for t in load_file(str(folder / "adapter_model.safetensors")).values())
