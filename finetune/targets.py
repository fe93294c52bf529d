"""Default LoRA target names (peft ``target_modules``) for diffusers UNets, shared by every recipe."""

#: Every resnet convolution and time projection, the attention projections and the resamplers: the layers that
#: hold nearly all of a diffusers UNet's weights (peft matches a name equal to, or ending with, ``.target``).
UNET_TARGETS: tuple[str, ...] = (
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
)

#: The same for diffusion transformers (SD3, Flux, PixArt, Sana, DiT): every attention projection, the joint
#: text-stream projections of MMDiT blocks (SD3/Flux), and the feed-forward layers (Flux's single blocks fuse
#: theirs into ``proj_mlp``; Sana's are 1x1 convolutions), so LoRA covers the whole transformer block.
TRANSFORMER_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "conv_inverted",
    "conv_point",
)


def default_targets(model: object) -> tuple[str, ...]:
    """The default LoRA targets for a diffusers denoiser: :data:`TRANSFORMER_TARGETS` for transformers, else
    :data:`UNET_TARGETS`."""
    name = type(getattr(model, "_orig_mod", model)).__name__
    return TRANSFORMER_TARGETS if "Transformer" in name else UNET_TARGETS
