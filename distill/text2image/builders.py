"""Small diffusers models for the embedded text-to-image teacher: a KL autoencoder (32x32 -> 8x8x4), a
cross-attention UNet over its latents with Stable Diffusion's discrete VP noise schedule, and a PixArt-format
flow-matching transformer with its flow scheduler."""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
)

MINILM_DIM = 384


def build_vae(
    channels: int = 1,
    block_out_channels: Sequence[int] = (32, 64, 64),
    latent_channels: int = 4,
    layers_per_block: int = 1,
    sample_size: int = 32,
    scaling_factor: float = 1.0,
) -> AutoencoderKL:
    """An ``AutoencoderKL`` that downsamples by ``2 ** (len(block_out_channels) - 1)`` (4: 32x32 -> 8x8).
    Its mid-block keeps attention off: at 8x8 it adds parameters and time without visible benefit here."""
    groups = min(32, min(block_out_channels) // 2)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=tuple(block_out_channels),
        latent_channels=latent_channels,
        layers_per_block=layers_per_block,
        norm_num_groups=groups,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        mid_block_add_attention=False,
    )


def build_text2image_unet(
    sample_size: int = 8,
    latent_channels: int = 4,
    block_out_channels: Sequence[int] = (64, 128),
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    cross_attention_dim: int = MINILM_DIM,
) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` with cross-attention to the text tokens at every level (SD's layout, small)."""
    levels = len(block_out_channels)
    groups = min(32, min(block_out_channels) // 2)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=groups,
    )


def sd_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """Stable Diffusion's training schedule: discrete VP, scaled-linear betas 0.00085..0.012, epsilon."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def build_text2image_transformer(
    sample_size: int = 8,
    latent_channels: int = 4,
    patch_size: int = 1,
    num_layers: int = 6,
    num_attention_heads: int = 4,
    attention_head_dim: int = 32,
    caption_channels: int = MINILM_DIM,
) -> PixArtTransformer2DModel:
    """A small ``PixArtTransformer2DModel`` (adaLN-single DiT blocks with cross-attention to the text tokens) that
    predicts the flow velocity: ``out_channels == in_channels``, so PixArt's pipeline reads no learned sigma."""
    width = num_attention_heads * attention_head_dim
    return PixArtTransformer2DModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        patch_size=patch_size,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        cross_attention_dim=width,
        caption_channels=caption_channels,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=1,
    )


def flow_scheduler(num_train_timesteps: int = 1000, flow_shift: float = 1.0) -> DPMSolverMultistepScheduler:
    """Rectified flow ``x_t = (1 - t) x0 + t n``, timestep ``1000 t``, velocity ``n - x0`` ("flow_prediction"),
    sampled by DPM-Solver++ on flow sigmas: SANA's scheduler. PixArt's pipeline calls ``scale_model_input``,
    which ``FlowMatchEulerDiscreteScheduler`` lacks, so that one cannot drive a PixArt pipeline."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=num_train_timesteps,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        algorithm_type="dpmsolver++",
        solver_order=2,
    )
