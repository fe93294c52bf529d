"""The embedded SD-format teacher as a ``StableDiffusionPipeline``: building one from parts, encoding captions
exactly as the pipeline does, and the shipped folder (assembled with MiniLM on first use)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from distill.text2image.minilm import assemble_teacher_folder

#: the shipped SD-format teacher (unet/, vae/, scheduler/, model_index.json; no text encoder)
SHIPPED_SD_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "text2image_sd"
SHIPPED_VAE = SHIPPED_SD_TEACHER / "vae"


def build_sd_pipeline(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: torch.nn.Module,
    tokenizer,
    scheduler: SchedulerMixin,
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` without safety checker or feature extractor (nothing to check here)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sampling_scheduler(training_scheduler: SchedulerMixin) -> DDIMScheduler:
    """The exported pipeline's default sampler: DDIM on the training betas (SD's DDIM settings)."""
    return DDIMScheduler.from_config(training_scheduler.config, set_alpha_to_one=False, clip_sample=False)


@torch.no_grad()
def encode_captions(
    pipe: StableDiffusionPipeline, captions: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """``[len(captions), tokens, 384]`` through the pipeline's own ``encode_prompt`` (same tokenization, padding
    and attention mask as generation); ``""`` gives the unconditional embedding CFG uses."""
    device = pipe.text_encoder.device
    chunks = [
        pipe.encode_prompt(list(captions[i : i + batch_size]), device, 1, False)[0]
        for i in range(0, len(captions), batch_size)
    ]
    return torch.cat(chunks)


def fashion_sd_teacher(target_dir: str | Path | None = None) -> Path:
    """The shipped Fashion-MNIST SD-format teacher as a complete pipeline folder (assembled on first use)."""
    if not (SHIPPED_SD_TEACHER / "unet").is_dir():
        raise FileNotFoundError(
            f"the SD-format Fashion-MNIST teacher is not shipped in {SHIPPED_SD_TEACHER}; train it with "
            "accelerate launch recipes/teacher.py --config recipes/configs/teacher_fashion_sd.yaml"
        )
    return assemble_teacher_folder(SHIPPED_SD_TEACHER, target_dir)
