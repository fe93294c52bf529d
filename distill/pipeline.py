"""A diffusers pipeline for distilled one-step (or k-step) generators.

diffusers has no pipeline for a network that maps noise to an image in one call at a fixed noise level, so this
is a small ``DiffusionPipeline`` subclass: the generator's UNet, the teacher's scheduler (which tells how the
UNet's output maps to an x0 prediction) and the generator's noise levels in its config. It saves and loads
with the usual ``save_pretrained`` / ``from_pretrained`` (safetensors).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from distill.denoiser import Condition, Denoiser


class OneStepPipeline(DiffusionPipeline):
    """x = G(sigma_0 * z; sigma_0); for k-step students, re-noise to sigma_i and apply G again."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, step_sigmas: list[float] | None = None) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(step_sigmas=list(step_sigmas or [2.5]))

    @classmethod
    def from_teacher_and_adapter(
        cls, teacher: str | None, adapter_folder: str, merge: bool = False, device: str | torch.device = "cpu"
    ) -> OneStepPipeline:
        """One-step sampler from a teacher (folder, hub id or 'default'; None = the one the adapter names) and
        a SiD-LoRA adapter folder: the teacher's UNet with the adapter attached by peft (``merge``: merged)."""
        from distill.lora_export import load_adapter_student

        return load_adapter_student(teacher, adapter_folder, merge=merge, device=device)

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet, self.scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        class_labels: torch.Tensor | list[int] | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample ``batch_size`` images; ``num_inference_steps`` defaults to the steps the student was trained for."""
        sigmas = list(self.config.step_sigmas)
        steps = num_inference_steps or len(sigmas)
        if not 1 <= steps <= len(sigmas):
            raise ValueError(
                f"num_inference_steps={steps}: this student was trained for 1..{len(sigmas)} steps"
            )
        sigmas = sigmas[:steps]
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        device, dtype = self.unet.device, self.unet.dtype
        if noise is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        cond = None
        if class_labels is not None or encoder_hidden_states is not None:
            labels = None if class_labels is None else torch.as_tensor(class_labels, device=device).long()
            cond = Condition(class_labels=labels, encoder_hidden_states=encoder_hidden_states)
        denoiser = self.denoiser
        x = noise * sigmas[0]
        for i, sigma in enumerate(sigmas):
            x0 = denoiser(x, torch.full((shape[0],), sigma, device=device), cond)
            if i + 1 < len(sigmas):
                x = x0 + sigmas[i + 1] * randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        images = x0.clamp(-1, 1)
        if output_type == "pt":
            out = images
        else:
            arr = images.add(1).div(2).permute(0, 2, 3, 1).float().cpu().numpy()
            out = self.numpy_to_pil(arr) if output_type == "pil" else arr
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)
