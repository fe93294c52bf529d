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
from distill.export.latent import STANDARD_PIPELINES, export_latent_student, vp_student_scheduler
from distill.export.model_card import (
    DEFAULT_LICENSE,
    call_snippet,
    describe_teacher,
    pipeline_tag_for,
    write_export_card,
)
from distill.pipelines import ADAPTER_INFO, load_adapter_student, read_adapter_info
from distill.teachers.denoiser import Denoiser
from distill.teachers.families import TeacherFamily, describe_teacher_source
from distill.teachers.loading import load_teacher, resolve_teacher_path

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
    base_unet = peft_model.get_base_model()
    try:  # the teacher's layout decides the diffusers prefix and the usage; a name we cannot read has none
        family: TeacherFamily | None = describe_teacher_source(resolve_teacher_path(teacher))
    except (FileNotFoundError, ValueError):
        family = None
    # diffusers' format too where the denoiser can load it natively (PeftAdapterMixin), under the prefix of
    # its pipeline component ("unet." / "transformer.") as the pipelines' load_lora_weights expects
    native = hasattr(base_unet, "load_lora_adapter")
    component = (family.denoiser_component if family else None) or (
        "transformer" if "Transformer" in type(base_unet).__name__ else "unet"
    )
    save_adapter(
        peft_model,
        folder,
        diffusers_prefix=component if native else None,
        base_model_name_or_path=teacher,
        adapter_name=adapter_name,
    )
    info = {"step_sigmas": [float(s) for s in step_sigmas], "teacher": teacher, "method": method}
    (folder / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n")
    setup, kwargs = call_snippet(base_unet)
    usage = USAGE.replace("{teacher}", teacher).replace("{setup}", setup).replace("{kwargs}", kwargs)
    if family is not None and family.latent:
        usage = latent_adapter_usage(family, folder, step_sigmas, teacher, native)
    ref = describe_teacher(teacher)
    write_export_card(
        folder,
        title=f"One-step LoRA adapter for {ref.name if ref else teacher}",
        method=method,
        facts={**facts, "adapter_parameters": _adapter_parameters(folder)},
        teacher=teacher,
        tags=["distillation", "one-step", "sid", "lora"],
        usage=usage,
        sample_grid=sample_grid,
        pipeline_tag=pipeline_tag_for(base_unet),
        license=license,
    )
    return folder


LATENT_USAGE = """import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler

pipe = DiffusionPipeline.from_pretrained("{teacher}")  # the untouched teacher
pipe.load_lora_weights("{path}")
pipe.scheduler = EulerDiscreteScheduler.from_pretrained("{path}", subfolder="scheduler")  # one step at sigma {sigma}
image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=1.0).images[0]"""

LATENT_MERGED_USAGE = """# {pipeline} samples a one-step student only through the pipeline file an export ships: train with
# lora_export_merged=true and load the merged folder (DiffusionPipeline.from_pretrained(folder,
# trust_remote_code=True)), or apply the adapter with peft to the teacher's {component}:
from peft import PeftModel
{component} = PeftModel.from_pretrained(teacher_{component}, "{path}")  # then sample at sigma {sigma}"""


def latent_adapter_usage(
    family: TeacherFamily, folder: Path, step_sigmas: list[float], teacher: str, native: bool
) -> str:
    """The card's usage for an adapter of a latent teacher, writing the student's scheduler into ``folder``
    where the teacher's own pipeline then samples the one-step student (SD 1.x/2.x, SDXL: an Euler step from
    ``step_sigmas[0]``, as :func:`~distill.export.latent.export_latent_student` configures it)."""
    sigma = f"{float(step_sigmas[0]):g}"
    if native and len(step_sigmas) == 1 and family.pipeline_class in STANDARD_PIPELINES:
        config = dict(teacher_scheduler_config(family))
        vp_student_scheduler(config, float(step_sigmas[0])).save_pretrained(str(folder / "scheduler"))
        return (
            LATENT_USAGE.replace("{teacher}", teacher)
            .replace("{path}", str(folder))
            .replace("{sigma}", sigma)
        )
    component = family.denoiser_component or "unet"
    return (
        LATENT_MERGED_USAGE.replace("{pipeline}", family.label)
        .replace("{component}", component)
        .replace("{path}", str(folder))
        .replace("{sigma}", sigma)
    )


def teacher_scheduler_config(family: TeacherFamily) -> dict[str, Any]:
    """The teacher's scheduler config (a local folder's file; hub teachers through the hub cache)."""
    if family.scheduler_file is None:
        raise FileNotFoundError(f"teacher {family.source!r} has no scheduler config")
    path = Path(family.source) / family.scheduler_file
    if not path.is_file():
        import huggingface_hub

        folder, _, name = family.scheduler_file.rpartition("/")
        path = Path(huggingface_hub.hf_hub_download(family.source, name, subfolder=folder or None))
    return json.loads(path.read_text())


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
    if describe_teacher_source(resolve_teacher_path(teacher)).latent:  # the teacher's own pipeline class
        from peft import PeftModel

        student = load_teacher(teacher)
        student.model = PeftModel.from_pretrained(student.model, str(adapter_folder)).merge_and_unload()
        return export_latent_student(
            student,
            folder,
            step_sigmas=info["step_sigmas"],
            teacher=teacher,
            method=f"{info['method']}, adapter merged into the teacher",
            facts=facts or {},
        )
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
