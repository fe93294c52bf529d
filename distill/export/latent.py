"""Export a latent teacher's distilled student as the teacher's own pipeline folder, loadable with plain diffusers.

The folder is the teacher's: every component (VAE, text encoders, tokenizers) copied file by file, except the
denoiser (``unet/`` or ``transformer/``: the student's weights) and the scheduler, which is configured so that
the teacher's pipeline, called as usual with ``num_inference_steps=1`` and ``guidance_scale=1`` (the student was
distilled with guidance), computes exactly ``student_sample(G, z, step_sigmas, cond)`` from its noise ``z``:

* Stable Diffusion (1.x/2.x), SDXL, VP-trained PixArt: ``EulerDiscreteScheduler`` from the teacher's config
  with ``timestep_spacing="trailing"``, ``use_karras_sigmas=True`` and ``sigma_min = sigma_max = sigma0``. One
  step has sigmas ``[sigma0, 0]``, ``init_noise_sigma = sigma0``, the fractional timestep of sigma0 by the
  log-sigma interpolation the Denoiser uses, model input ``x / sqrt(1 + sigma0^2)`` and an Euler step to sigma 0,
  i.e. x0. No code ships: ``DiffusionPipeline.from_pretrained(folder)``.
* LDM, DiT (same scheduler) and SD3, Flux, Sana and flow-trained PixArt (unshifted
  ``FlowMatchEulerDiscreteScheduler`` at the student's flow time ``t0 = sigma0 / (1 + sigma0)``): their
  pipelines start from noise the student does not (PixArt's loop also expects a VP scheduler's
  ``init_noise_sigma`` and ``scale_model_input``), so a subclass of the teacher's pipeline ships in the folder
  (:mod:`distill.export.latent_pipeline`, as ``onestep_latent_pipeline.py``); load with
  ``trust_remote_code=True``. Whether a PixArt teacher is flow or VP is read from its scheduler config
  (``TeacherFamily.parameterization``), as the Denoiser reads it.

A k-step student exports this way only when it steps *deterministically* (``deterministic=True``: rectified
flow's Euler ``x' = x0 + s' (x - x0) / s``, which is exactly what both Euler schedulers do between the given
noise levels): SD3/Flux/Sana/flow PixArt and LDM/DiT through the shipped subclass (the levels in the
scheduler config), SD/SDXL/VP PixArt by passing the levels as the pipeline's own ``sigmas`` argument (shown in
the card's usage: ``sigmas=[s0, ..., s_{k-1}, 0.0]``). A k-step SiD student re-noises with fresh noise between
steps, which no diffusers scheduler does: refused.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from distill.export import latent_pipeline
from distill.export.generator import student_title
from distill.export.model_card import DEFAULT_LICENSE, TEXT_TO_IMAGE, UNCONDITIONAL, write_export_card
from distill.teachers.denoiser import Denoiser
from distill.teachers.families import MODEL_INDEX, TeacherFamily, describe_teacher_source
from distill.teachers.loading import resolve_teacher_path

#: teacher pipelines whose own class samples the student with the exported Euler scheduler alone (VP teachers;
#: a flow-trained PixArt's student needs latent_pipeline.FLOW_STUDENT_PIPELINES)
STANDARD_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "PixArtAlphaPipeline",
    "PixArtSigmaPipeline",
)
#: pipelines whose teachers are always flow-trained
FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline", "SanaPipeline")
SUPPORTED = STANDARD_PIPELINES + tuple(latent_pipeline.STUDENT_PIPELINES)

USAGE = """import torch
from diffusers import DiffusionPipeline

{comment}pipe = DiffusionPipeline.from_pretrained("{path}"{trust})
{call}"""


def vp_student_scheduler(
    teacher_config: dict[str, Any], sigma0: float, sigma_last: float | None = None
) -> EulerDiscreteScheduler:
    """The teacher's VP schedule as an Euler scheduler whose one step goes from ``sigma0`` straight to 0 (only
    the teacher's keys Euler knows are kept, so the saved config holds no other scheduler's options).
    ``sigma_last``: a k-step student's last level (Karras from sigma0 down to it, exact for two steps; the
    standard pipelines get all k levels as ``sigmas``)."""
    accepted = set(inspect.signature(EulerDiscreteScheduler.__init__).parameters) - {"self"}
    return EulerDiscreteScheduler.from_config(
        {k: v for k, v in teacher_config.items() if k in accepted},
        timestep_spacing="trailing",
        use_karras_sigmas=True,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        sigma_min=float(sigma0 if sigma_last is None else sigma_last),
        sigma_max=float(sigma0),
        final_sigmas_type="zero",
    )


def flow_student_scheduler(
    num_train_timesteps: int, step_sigmas: list[float]
) -> FlowMatchEulerDiscreteScheduler:
    """An unshifted flow Euler scheduler carrying the student's EDM noise levels for the shipped pipeline."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)
    scheduler.register_to_config(**{latent_pipeline.STEP_SIGMAS_KEY: [float(s) for s in step_sigmas]})
    return scheduler


def student_kinds(pipeline_class: str) -> tuple[str, ...]:
    """The Denoiser kinds (``vp``/``flow``) of the teachers of ``pipeline_class`` whose students export."""
    if pipeline_class in FLOW_PIPELINES:
        return ("flow",)
    if pipeline_class in latent_pipeline.FLOW_STUDENT_PIPELINES:
        return ("vp", "flow")
    return ("vp",)


def shipped_pipeline(pipeline_class: str, flow: bool) -> type | None:
    """The :mod:`~distill.export.latent_pipeline` class an export of a (``flow``) ``pipeline_class`` teacher's
    student ships, or None where the teacher's own class samples it (VP SD, SDXL, PixArt)."""
    if flow and pipeline_class in latent_pipeline.FLOW_STUDENT_PIPELINES:
        return latent_pipeline.FLOW_STUDENT_PIPELINES[pipeline_class]
    return latent_pipeline.STUDENT_PIPELINES.get(pipeline_class)


def _usage(pipeline_class: str, trust: bool, steps: list[float] | None = None) -> str:
    """The card's call; ``steps``: a k-step student's noise levels (k > 1), passed as ``sigmas`` where the
    standard pipelines need them."""
    n = 1 if not steps else len(steps)
    if pipeline_class == "DiTPipeline":
        call = f"image = pipe(class_labels=[207], num_inference_steps={n}, guidance_scale=1.0).images[0]"
    elif pipeline_class == "LDMPipeline":
        call = f"image = pipe(num_inference_steps={n}).images[0]"
    elif n > 1 and not trust:
        sigmas = ", ".join(f"{s!r}" for s in [*steps, 0.0])
        call = (
            f"# the student's {n} noise levels, then 0 (deterministic Euler between them)\n"
            f'image = pipe("a photo of a cat", sigmas=[{sigmas}], guidance_scale=1.0).images[0]'
        )
    else:
        call = f'image = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale=1.0).images[0]'
    comment = (
        "# plain diffusers runs the pipeline subclass shipped in the folder (onestep_latent_pipeline.py)\n"
        if trust
        else ""
    )
    return (
        USAGE.replace("{comment}", comment)
        .replace("{trust}", ", trust_remote_code=True" if trust else "")
        .replace("{call}", call)
    )


def _copy_component(source: Path, target: Path) -> None:
    """A real copy of a component folder (never load and re-save: the files are the teacher's own)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, copy_function=shutil.copy2)


def _local_teacher(spec: str, denoiser_folder: str) -> Path:
    """A local copy of the teacher's folder: itself, or a hub snapshot without its denoiser weights."""
    path = Path(resolve_teacher_path(spec))
    if path.is_dir():
        return path
    import huggingface_hub

    return Path(huggingface_hub.snapshot_download(spec, ignore_patterns=[f"{denoiser_folder}/*"]))


def check_latent_export(family: TeacherFamily, num_steps: int, deterministic: bool = False) -> TeacherFamily:
    """``family``, or ``NotImplementedError`` when its student cannot be exported as a plain diffusers pipeline
    (a multi-step student that re-noises, i.e. not ``deterministic``, or a pipeline outside :data:`SUPPORTED`);
    recipes call it at start-up."""
    if num_steps != 1 and not deterministic:
        raise NotImplementedError(
            f"export_latent_student: {num_steps}-step student; only one-step students of latent teachers export "
            "as a plain diffusers pipeline (SiD's k-step sampler re-noises with fresh noise between steps, which "
            "no diffusers scheduler does): use one step_sigmas entry"
        )
    if not family.latent or family.pipeline_class not in SUPPORTED:
        raise NotImplementedError(
            f"export_latent_student: teacher {family.source!r} has pipeline {family.pipeline_class!r} "
            f"({family.family}); latent students export for {list(SUPPORTED)} only"
        )
    kinds = student_kinds(family.pipeline_class)
    if str(family.parameterization).split("-")[0] not in kinds:  # vp-epsilon -> vp
        raise NotImplementedError(
            f"export_latent_student: teacher {family.source!r} is a {family.parameterization} "
            f"{family.pipeline_class}; its students export as {' or '.join(kinds)} only (no exported "
            f"pipeline samples a {family.parameterization} {family.pipeline_class} student yet)"
        )
    return family


def export_latent_student(
    generator: Denoiser,
    folder: str | Path,
    step_sigmas: list[float],
    teacher: str,
    method: str,
    facts: dict[str, Any],
    sample_grid: str | None = None,
    license: str = DEFAULT_LICENSE,
    tags: list[str] | None = None,
    deterministic: bool = False,
) -> Path:
    """Write ``folder``: the teacher's pipeline folder with the student as its denoiser and a scheduler (plus,
    for LDM/DiT/SD3/Flux/Sana/flow PixArt, ``onestep_latent_pipeline.py``) under which the teacher's pipeline
    samples ``student_sample(generator, z, step_sigmas, cond)``; README.md is the model card (+ samples.png).

    ``teacher`` is the teacher as the recipe got it (a local pipeline folder or a Hub id); ``generator`` is the
    student, a copy of the teacher's denoiser. Raises ``NotImplementedError`` for a multi-step student or a
    pipeline family not listed in :data:`SUPPORTED`, ``ValueError`` for a student that does not match the
    teacher, before anything is written. ``tags``: the method's card tags (default ``["sid"]``).
    ``deterministic``: the student steps as ``student_sample(..., deterministic=True)`` (rectified flow), which
    lets a k-step student export (see the module docstring).
    """
    steps = [float(s) for s in step_sigmas]
    if steps and not steps[0] > 0:
        raise ValueError(f"export_latent_student: step_sigmas[0] must be > 0, got {steps[0]}")
    if any(b >= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"export_latent_student: step_sigmas must decrease, got {steps}")
    family = check_latent_export(
        describe_teacher_source(resolve_teacher_path(teacher)).require(), len(steps), deterministic
    )
    pipeline_class = family.pipeline_class
    flow = family.parameterization == "flow"
    shipped = shipped_pipeline(pipeline_class, flow)
    if generator.kind != ("flow" if flow else "vp"):
        raise ValueError(
            f"export_latent_student: {pipeline_class} students need a {'flow' if flow else 'vp'} denoiser, got "
            f"{generator.parameterization!r}"
        )
    source = _local_teacher(teacher, family.denoiser_folder)
    index = json.loads((source / MODEL_INDEX).read_text())
    denoiser = family.denoiser_component or family.denoiser_folder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in index.items():
        if name.startswith("_") or name in (denoiser, "scheduler") or not isinstance(value, list):
            continue
        if value[0] is not None and (source / name).is_dir():
            _copy_component(source / name, folder / name)
    model = generator.model
    if (folder / denoiser).exists():
        shutil.rmtree(folder / denoiser)
    model.save_pretrained(str(folder / denoiser), safe_serialization=True)
    index[denoiser] = ["diffusers", type(getattr(model, "_orig_mod", model)).__name__]

    if flow:
        scheduler = flow_student_scheduler(generator.num_train_timesteps, steps)
    else:
        scheduler = vp_student_scheduler(dict(generator.scheduler_config), steps[0], steps[-1])
        if len(steps) > 1 and shipped is not None:  # LDM/DiT: the shipped loop reads them
            scheduler.register_to_config(**{latent_pipeline.STEP_SIGMAS_KEY: steps})
    if (folder / "scheduler").exists():
        shutil.rmtree(folder / "scheduler")
    scheduler.save_pretrained(str(folder / "scheduler"))
    index["scheduler"] = ["diffusers", type(scheduler).__name__]

    trust = shipped is not None
    code = folder / f"{latent_pipeline.PIPELINE_MODULE}.py"
    if trust:
        shutil.copyfile(latent_pipeline.__file__, code)
        index["_class_name"] = [
            latent_pipeline.PIPELINE_MODULE,
            shipped.__name__,
        ]
    else:
        code.unlink(missing_ok=True)
        index["_class_name"] = pipeline_class
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    write_export_card(
        folder,
        title=student_title(len(steps), facts.get("method"), teacher),
        method=method,
        facts={
            **facts,
            "teacher_pipeline": pipeline_class,
            "step_sigmas": steps,
            "parameters": sum(p.numel() for p in generator.parameters()),
        },
        teacher=teacher,
        tags=[
            "distillation",
            "one-step" if len(steps) == 1 else "few-step",
            "latent-diffusion",
            *(tags if tags is not None else ["sid"]),
        ],
        usage=_usage(pipeline_class, trust, steps),
        sample_grid=sample_grid,
        pipeline_tag=TEXT_TO_IMAGE if family.conditioning.startswith("text") else UNCONDITIONAL,
        license=license,
    )
    _declare_teacher_metrics(folder, teacher, len(steps))
    return folder


def _declare_teacher_metrics(folder: Path, teacher: str, num_steps: int) -> None:
    """A student of a Fashion-MNIST teacher declares those metrics and its own sampler (``num_steps`` at CFG 1:
    guidance is folded in) in ``onestep_eval.json``, so ``onestep eval --model STUDENT`` needs no flags."""
    from distill.evaluation.text2image import EVAL_INFO_FILE, declare_metrics, metrics_kind

    kind = metrics_kind(teacher)
    if kind is None:
        (folder / EVAL_INFO_FILE).unlink(missing_ok=True)  # a re-export over another teacher's student
        return
    declare_metrics(folder, kind, num_inference_steps=num_steps, guidance_scale=1.0)
