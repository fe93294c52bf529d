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
