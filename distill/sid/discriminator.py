"""SiDA's discriminator without new parameters: the channel mean of a denoiser's encoder output.

SiDA (Zhou et al., arXiv 2410.14919) reads discriminator logits off the fake score network f_psi itself: the
feature map at the end of its encoder (the lowest resolution, before the decoder), averaged over channels, one
logit per spatial position. diffusers UNets have no such output, so :class:`EncoderLogits` records it with a
forward hook on the UNet's last down block while the usual forward runs; the denoised output and the logits
then come from the same call (no second pass, and gradients flow to both).

Under classifier-free guidance (SiD-LSG + SiDA) f_psi's guided call runs the conditional and null branches as
one batch, conditional rows first (:meth:`~distill.teachers.denoiser.Denoiser._guided`, the recipe's own
multi-scale call): :func:`conditional_rows` keeps the conditional branch's logits, so the discriminator is the
same conditional network with or without guidance, and real images (an unguided conditional call) meet
generated ones under the same prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def find_encoder_end(module: nn.Module) -> nn.Module:
    """The last down block of the diffusers UNet inside ``module`` (a Denoiser, DDP wrapper, peft model...)."""
    for sub in module.modules():
        blocks = getattr(sub, "down_blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks[-1]
    raise ValueError(
        f"{type(module).__name__} holds no diffusers UNet with `down_blocks` (UNet2DModel, UNet2DConditionModel): "
        "SiDA's encoder discriminator needs one; use SiD without real_data for this teacher"
    )


class EncoderLogits:
    """Records ``mean over channels`` of the encoder's output for every forward inside :meth:`capture`."""

    def __init__(self, module: nn.Module) -> None:
        self.block = find_encoder_end(module)

    @contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        """Yields a list that receives one ``(B, 1, h, w)`` logit map per forward run inside the block."""
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, _inputs, output) -> None:
            features = output[0] if isinstance(output, tuple) else output
            captured.append(features.float().mean(dim=1, keepdim=True))

        handle = self.block.register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()


def conditional_rows(logits: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The conditional branch's logits of a call on ``batch_size`` samples: all of them for an unguided call,
    the first half of a guided call's batched ``[cond; null]`` forward."""
    if logits.shape[0] == batch_size:
        return logits
    if logits.shape[0] == 2 * batch_size:
        return logits[:batch_size]
    raise ValueError(
        f"encoder logits for {logits.shape[0]} rows; expected {batch_size} (unguided) or {2 * batch_size} "
        "(guided: conditional and null branches)"
    )
