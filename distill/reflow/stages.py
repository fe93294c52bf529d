"""The reflow pipeline's stages and their folders: teacher pairs -> k-rectified flow -> few-step student.

``output_dir`` holds one folder per stage: ``pairs_r{r}`` (round r's pairs, made by the round's source model),
``reflow_r{r}`` (the (r+1)-rectified flow trained on them, exported to ``reflow_r{r}/model``) and ``distill``
(the student, exported to ``distill/student``); ``summary.json`` collects each stage's result. Round 1's source is
the teacher, round r > 1's the r-RF of the round before; the student starts from the k-RF (the teacher when
k = 1) and learns from the last round's pairs.

Teachers: pixel-space or latent (pairs then hold latents; sizes from
:func:`distill.teachers.latents.sample_shape`), unconditional, class-conditional or text-conditioned (the prompts
are encoded once by the teacher's own text encoders, :func:`prompt_source`, and each pair holds its prompt's row).
Start-up checks (:func:`check_run`) refuse what cannot run or be exported before any pair is made.

This module plans and runs stages; what one training stage optimises (its loss, evaluation and export) is the
recipe's (``recipes/reflow.py``), which :func:`run_training` receives as ``recipe_class`` because ``distill``
does not import ``recipes``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from distill.export.flow import DONE_FILE
from distill.export.latent import check_latent_export
from distill.reflow.pairs import generate_pairs, make_spec, open_pairs
from distill.teachers.conditions import ConditionSource, check_conditioning
from distill.teachers.families import TeacherFamily
from distill.teachers.latents import LatentCodec, sample_shape
from distill.teachers.loading import check_teacher, load_teacher
from engine.recipe import Recipe
from engine.threads import configure_threads
from engine.trainer import Trainer, build_accelerator

TrainingStage = Literal["reflow", "distill"]


class StagesConfig(Protocol):
    """The settings the stages read: the fields of the reflow recipe's config (a dataclass)."""

    output_dir: str
    stage: Literal["all", "pairs", "reflow", "distill"]
    teacher: str
    rectified_k: int
    round: int
    num_classes: int | None
    guidance_scale: float
    cpu: bool
    num_threads: int
    progress_bar: bool
    num_pairs: int
    pairs_shard_size: int
    pairs_batch_size: int
    pairs_sampler: str
    pairs_nfe: int
    pairs_sigma_max: float | None
    pairs_seed: int
    pairs_minutes: float
    later_pairs_steps: int
    pairs_dir: str | None
    init_from: str | None
    export_dir: str | None
    reflow_steps: int
    reflow_minutes: float
    distill_steps: int
    distill_minutes: float
    num_steps: int
    prompts: str | None
    prompt_column: str | None
    negative_prompt: str
    prompt_cache_dir: str | None
    resolution: int | None


#: builds one training stage's recipe: (stage config, mode, source model, pairs folder, export folder)
RecipeClass = Callable[[Any, TrainingStage, str, Path, Path], Recipe]


# -------------------------------------------------------------------------------------------- layout
def single_stage(cfg: StagesConfig) -> bool:
    """Whether one stage runs alone: only then do ``pairs_dir`` / ``init_from`` / ``export_dir`` apply."""
    return cfg.stage != "all"


def pairs_dir(cfg: StagesConfig, round_: int) -> Path:
    if cfg.pairs_dir and single_stage(cfg):
        return Path(cfg.pairs_dir)
    return Path(cfg.output_dir) / f"pairs_r{round_}"


def reflow_dir(cfg: StagesConfig, round_: int) -> Path:
    return Path(cfg.output_dir) / f"reflow_r{round_}"


def source_model(cfg: StagesConfig, round_: int) -> str:
    """The model that makes round ``round_``'s pairs and initialises its reflow: teacher, then the r-RF."""
    if cfg.init_from and single_stage(cfg):
        return cfg.init_from
    return cfg.teacher if round_ == 1 else str(reflow_dir(cfg, round_ - 1) / "model")


def distill_source(cfg: StagesConfig) -> str:
    """The student's starting point: the k-RF (the teacher itself when k = 1)."""
    if cfg.init_from and single_stage(cfg):
        return cfg.init_from
    return cfg.teacher if cfg.rectified_k == 1 else str(reflow_dir(cfg, cfg.rectified_k - 1) / "model")


def plan(cfg: StagesConfig) -> list[tuple[str, int]]:
    """(stage, round) in execution order; distillation uses the last round's pairs."""
    last = max(cfg.rectified_k - 1, 1)
    if cfg.stage == "pairs":
        return [("pairs", cfg.round)]
    if cfg.stage == "reflow":
        return [("reflow", cfg.round)]
    if cfg.stage == "distill":
        return [("distill", last)]
    steps: list[tuple[str, int]] = []
    for r in range(1, cfg.rectified_k):
        steps += [("pairs", r), ("reflow", r)]
    if cfg.rectified_k == 1:
        steps.append(("pairs", 1))
    return [*steps, ("distill", last)]


# ------------------------------------------------------------------------------------- teacher checks
def check_run(cfg: StagesConfig) -> TeacherFamily:
    """The teacher's family, or the start-up error (configs only, before any pair): an unsupported family, prompt
    settings that do not fit its conditioning (a text teacher needs ``prompts``), or a latent student the teacher's
    pipeline cannot sample (:func:`distill.export.latent.check_latent_export`; reflow students step
    deterministically, so k steps export too)."""
    family = check_teacher(cfg.teacher)
    check_conditioning(cfg.teacher, family, cfg.prompts, cfg.prompt_column, cfg.negative_prompt)
    if family.latent:
        check_latent_export(family, cfg.num_steps, deterministic=True)
    return family


def prompt_source(cfg: StagesConfig, family: TeacherFamily, accelerator: Any) -> ConditionSource | None:
    """A text teacher's prompts as a :class:`ConditionSource` (encoded by its text encoders, main process first,
    or read from the cache), else ``None``. ``accelerator``: an ``Accelerator`` or ``PartialState``."""
    if not family.conditioning.startswith("text"):
        return None
    return ConditionSource.for_teacher(
        cfg.teacher,
        family,
        prompts=cfg.prompts,
        prompt_column=cfg.prompt_column,
        negative_prompt=cfg.negative_prompt,
        image_size=None if cfg.resolution is None else (cfg.resolution, cfg.resolution),
        accelerator=accelerator,
        cache_dir=cfg.prompt_cache_dir,
    )


def prompt_cache_key(source: ConditionSource) -> str:
    """The cache key of the encoded prompts (teacher, prompts, negative prompt, dtype, ...)."""
    assert source.embeddings is not None
    return str(source.embeddings.meta["key"])


# --------------------------------------------------------------------------------------------- pairs
def run_pairs(cfg: StagesConfig, round_: int, state: Any = None) -> dict[str, Any]:
    """Generate (or complete) round ``round_``'s pair set; returns a summary of the folder."""
    from accelerate import PartialState

    state = state or PartialState(cpu=cfg.cpu or not torch.cuda.is_available())
    threads = configure_threads(cfg.num_threads, on_cpu=state.device.type == "cpu")
    if state.is_main_process:
        print(f"[reflow] pairs round {round_}: {threads}", flush=True)
    folder = pairs_dir(cfg, round_)
    source = source_model(cfg, round_)
    family = check_teacher(cfg.teacher)
    prompts = prompt_source(cfg, family, state)  # encoded before the teacher's weights are loaded
    model = load_teacher(source).to(state.device).eval().requires_grad_(False)
    num_classes = None
    if prompts is None:
        num_classes = cfg.num_classes if cfg.num_classes is not None else model.num_classes
    if round_ == 1:
        sampler, nfe, guidance, sigma_max = (
            cfg.pairs_sampler,
            cfg.pairs_nfe,
            cfg.guidance_scale,
            cfg.pairs_sigma_max,
        )
        shape = None
        if family.latent:  # latents: the autoencoder's factor turns a resolution into a latent size
            codec = LatentCodec.from_teacher(family) if cfg.resolution is not None else None
            shape = sample_shape(model, codec, cfg.resolution)
    else:  # an r-RF was trained on guided pairs: sample it unguided, from the range it was trained on
        previous = open_pairs(pairs_dir(cfg, round_ - 1)).spec
        sampler, nfe, guidance, sigma_max = "flow_euler", cfg.later_pairs_steps, 1.0, previous.sigma_max
        shape = previous.shape
    spec = make_spec(
        model,
        source,
        cfg.num_pairs,
        sampler=sampler,
        nfe=nfe,
        sigma_max=sigma_max,
        guidance_scale=guidance,
        num_classes=num_classes,
        shard_size=cfg.pairs_shard_size,
        batch_size=cfg.pairs_batch_size,
        seed=cfg.pairs_seed,
        round=round_,
        shape=shape,
        num_prompts=None if prompts is None else prompts.num_prompts,
        prompt_cache_key=None if prompts is None else prompt_cache_key(prompts),
    )
    pairs = generate_pairs(
        model,
        spec,
        folder,
        state=state,
        max_minutes=cfg.pairs_minutes,
        progress_bar=cfg.progress_bar,
        conditions=None if prompts is None else prompts.fixed,
    )
    return {"folder": str(folder), "pairs": pairs.num_pairs, "complete": pairs.complete, "nfe": spec.nfe}


# ------------------------------------------------------------------------------------------ training
def run_training(
    cfg: StagesConfig, mode: TrainingStage, round_: int, recipe_class: RecipeClass
) -> dict[str, Any]:
    """One engine run of a training stage in its own folder; returns the export's facts (main process).

    With ``stage=all`` a stage whose export is complete is skipped (its facts are read back).
    """
    if mode == "reflow":
        run_dir, init, default_export = reflow_dir(cfg, round_), source_model(cfg, round_), "model"
        steps, minutes = cfg.reflow_steps, cfg.reflow_minutes
    else:
        run_dir, init, default_export = Path(cfg.output_dir) / "distill", distill_source(cfg), "student"
        steps, minutes = cfg.distill_steps, cfg.distill_minutes
    export = Path(cfg.export_dir) if cfg.export_dir and single_stage(cfg) else run_dir / default_export
    done = export / DONE_FILE
    if not single_stage(cfg) and done.is_file():
        print(f"[reflow] {mode} stage already exported at {export}: skipped", flush=True)
        return json.loads(done.read_text())
    stage_cfg = dataclasses.replace(cfg, output_dir=str(run_dir), max_steps=steps, max_minutes=minutes)
    recipe = recipe_class(stage_cfg, mode, init, pairs_dir(cfg, round_), export)
    trainer = Trainer(stage_cfg, recipe, accelerator=build_accelerator(stage_cfg))
    trainer.fit(end_training=False)
    trainer.accelerator.wait_for_everyone()
    return json.loads(done.read_text()) if trainer.is_main else {}


def run(cfg: StagesConfig, recipe_class: RecipeClass) -> dict[str, Any]:
    """Run the planned stages; the main process keeps ``output_dir/summary.json`` up to date."""
    from accelerate import PartialState

    check_run(cfg)  # before any pairs or copies: refused by family name, conditioning and export
    state = PartialState(cpu=cfg.cpu or not torch.cuda.is_available())
    summary_path = Path(cfg.output_dir) / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for stage, round_ in plan(cfg):
        if stage == "pairs":
            result = run_pairs(cfg, round_, state)
            key = f"pairs_r{round_}"
        else:
            result = run_training(cfg, stage, round_, recipe_class)  # type: ignore[arg-type]
            key = f"reflow_r{round_}" if stage == "reflow" else "distill"
        if state.is_main_process:
            summary[key] = result
            summary_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = summary_path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(summary, indent=1, default=str))
            os.replace(tmp, summary_path)
        state.wait_for_everyone()
    state.destroy_process_group()
    return summary
