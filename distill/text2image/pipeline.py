"""The embedded text-to-image teachers: the SD-format one (``StableDiffusionPipeline``) and the flow-matching
transformer (``PixArtSigmaPipeline``): building each from parts, encoding captions exactly as its pipeline does,
and the shipped folders (assembled with MiniLM, and the flow teacher with the SD teacher's VAE, on first use).

Why PixArt-Sigma's format for the flow transformer: its pipeline calls ``text_encoder(ids, attention_mask=)[0]``
and its transformer projects ``caption_channels`` (384 for MiniLM) and masks the padding in cross-attention, so a
BertModel is a drop-in text encoder; its VAE is any ``AutoencoderKL``; and it samples with whatever scheduler the
folder names, here DPM-Solver++ on flow sigmas (:func:`distill.text2image.builders.flow_scheduler`).
SANA's pipeline needs an ``AutoencoderDC`` (it reads ``vae.config.encoder_block_out_channels``) and prefixes
every prompt with Gemma's chat instruction by default; SD3 needs two CLIPs and a T5. The one PixArt default that
does not fit: ``use_resolution_binning=True`` knows only 256..2048-px models, so callers pass
``use_resolution_binning=False`` (the tiny 8x8-latent transformer would otherwise raise "Invalid sample size").
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from distill.text2image.minilm import assemble_teacher_folder

#: the shipped SD-format teacher (unet/, vae/, scheduler/, model_index.json; no text encoder)
SHIPPED_SD_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "text2image_sd"
SHIPPED_VAE = SHIPPED_SD_TEACHER / "vae"
#: the shipped flow-matching transformer teacher (transformer/, scheduler/, model_index.json; no VAE, no text
#: encoder: both are added by :func:`fashion_flow_teacher`)
SHIPPED_FLOW_TEACHER = SHIPPED_SD_TEACHER.parent / "text2image_flow"
#: latent sample sizes PixArt's / Sana's resolution binning has tables for (1024 px = 128 latents, ...)
_BINNED_SAMPLE_SIZES = (16, 32, 64, 128, 256)


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


def build_flow_pipeline(
    transformer: PixArtTransformer2DModel,
    vae: AutoencoderKL,
    text_encoder: torch.nn.Module,
    tokenizer,
    scheduler: SchedulerMixin,
) -> PixArtSigmaPipeline:
    """A ``PixArtSigmaPipeline`` around the flow transformer (see the module docstring for why this format)."""
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


@torch.no_grad()
def encode_flow_captions(
    pipe: PixArtSigmaPipeline, captions: Sequence[str], max_length: int, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N, max_length, 384], [N, max_length])``: PixArt's own ``encode_prompt`` (no caption cleaning) -> token
    embeddings and attention mask. The transformer masks the padding, so a teacher trained at ``max_length``
    tokens gives the same output at PixArt's default 300 (only the padding grows)."""
    device = pipe.text_encoder.device
    embeds, masks = [], []
    for i in range(0, len(captions), batch_size):
        e, m, _, _ = pipe.encode_prompt(
            list(captions[i : i + batch_size]),
            do_classifier_free_guidance=False,
            device=device,
            clean_caption=False,
            max_sequence_length=max_length,
        )
        embeds.append(e)
        masks.append(m)
    return torch.cat(embeds), torch.cat(masks)


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


def pipeline_call_defaults(pipe) -> dict[str, object]:
    """Call keywords a small PixArt/Sana-format pipeline needs on top of ``pipe(prompt=...)``: resolution
    binning off when its transformer's ``sample_size`` is not one of the 256..2048-px sizes the binning knows
    (it would raise "Invalid sample size"), and ``max_sequence_length`` = the tokenizer's ``model_max_length``
    when that is shorter than the pipeline's default (300: MiniLM would encode 300 tokens, 276 of them padding
    that the transformer masks anyway), and ``clean_caption=False`` (PixArt's T5 caption cleaning: it warns and
    skips without beautifulsoup4/ftfy but rewrites captions with them, so results would depend on what is
    installed). ``{}`` for other pipelines."""
    params = inspect.signature(pipe.__call__).parameters
    out: dict[str, object] = {}
    transformer = getattr(pipe, "transformer", None)
    if "use_resolution_binning" in params and transformer is not None:
        if transformer.config.get("sample_size") not in _BINNED_SAMPLE_SIZES:
            out["use_resolution_binning"] = False
    if "clean_caption" in params:
        out["clean_caption"] = False
    tokenizer = getattr(pipe, "tokenizer", None)
    if "max_sequence_length" in params and tokenizer is not None:
        default = params["max_sequence_length"].default
        if isinstance(default, int) and tokenizer.model_max_length < default:
            out["max_sequence_length"] = int(tokenizer.model_max_length)
    return out


def fashion_flow_teacher(target_dir: str | Path | None = None) -> Path:
    """The shipped Fashion-MNIST flow-matching transformer teacher as a complete ``PixArtSigmaPipeline`` folder
    (assembled on first use with MiniLM and the SD teacher's VAE, which both teachers share)."""
    if not (SHIPPED_FLOW_TEACHER / "transformer").is_dir():
        raise FileNotFoundError(
            f"the flow-matching Fashion-MNIST teacher is not shipped in {SHIPPED_FLOW_TEACHER}; train it with "
            "accelerate launch recipes/teacher.py --config recipes/configs/teacher_fashion_flow.yaml"
        )
    return assemble_teacher_folder(SHIPPED_FLOW_TEACHER, target_dir, components={"vae": SHIPPED_VAE})
