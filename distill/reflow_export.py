"""Export rectified-flow models (k-RF velocity fields and distilled students) as diffusers pipeline folders.

:class:`RectifiedFlowPipeline` is :class:`distill.pipeline.OneStepPipeline` with the deterministic flow sampler:
Euler in flow time, written in EDM form as ``x' = x0_hat + sigma' (x - x0_hat) / sigma`` (no fresh noise), from
``x = step_sigmas[0] * z``. With one step both pipelines compute ``D(sigma_max * z, sigma_max)``, so a one-step
student folder also loads and samples identically with ``OneStepPipeline``. A reflowed velocity field
(``any_steps=True``) samples in any number of steps on the uniform flow-time grid; a distilled N-step student
(``any_steps=False``) uses its training grid ``step_sigmas`` (or a prefix of it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from distill.denoiser import Condition, Denoiser
from distill.export import scheduler_from_denoiser
from distill.model_card import write_model_card
from distill.pipeline import OneStepPipeline
from distill.reflow import euler_on_sigmas, flow_sigmas

__all__ = ["RectifiedFlowPipeline", "export_flow_model", "DONE_FILE"]

DONE_FILE = "reflow_export.json"

USAGE = """import torch
from distill.reflow_export import RectifiedFlowPipeline

pipe = RectifiedFlowPipeline.from_pretrained("{path}")
images = pipe(batch_size=16, num_inference_steps={steps}, generator=torch.Generator().manual_seed(0),
              output_type="pt").images"""


class RectifiedFlowPipeline(OneStepPipeline):
    """Deterministic 1- or N-step rectified-flow sampling of a student stored as a diffusers UNet + scheduler."""

    def __init__(
        self, unet, scheduler, step_sigmas: list[float] | None = None, any_steps: bool = False
    ) -> None:
        super().__init__(unet=unet, scheduler=scheduler, step_sigmas=step_sigmas)
        self.register_to_config(any_steps=bool(any_steps))

    def sigmas_for(self, num_inference_steps: int | None) -> list[float]:
        """The noise levels sampled for ``num_inference_steps`` (see the module docstring)."""
        sigmas = [float(s) for s in self.config.step_sigmas]
        steps = num_inference_steps or len(sigmas)
        if self.config.any_steps:
            if steps < 1:
                raise ValueError(f"num_inference_steps={steps} must be >= 1")
            return flow_sigmas(steps, sigmas[0])
        if not 1 <= steps <= len(sigmas):
            raise ValueError(
                f"num_inference_steps={steps}: this student was trained for 1..{len(sigmas)} steps"
            )
        return sigmas[:steps]

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
        """Sample ``batch_size`` images from unit noise ``noise`` (drawn from ``generator`` if not given)."""
        sigmas = self.sigmas_for(num_inference_steps)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        device = self.unet.device
        if noise is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        cond = None
        if class_labels is not None or encoder_hidden_states is not None:
            labels = None if class_labels is None else torch.as_tensor(class_labels, device=device).long()
            cond = Condition(class_labels=labels, encoder_hidden_states=encoder_hidden_states)
        images = euler_on_sigmas(Denoiser(self.unet, self.scheduler), noise.to(device), sigmas, cond)
        images = images.clamp(-1, 1)
        if output_type == "pt":
            out = images
        else:
            arr = images.add(1).div(2).permute(0, 2, 3, 1).float().cpu().numpy()
            out = self.numpy_to_pil(arr) if output_type == "pil" else arr
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)


def export_flow_model(
    model: Denoiser,
    folder: str | Path,
    step_sigmas: list[float],
    any_steps: bool,
    base_model: str,
    title: str,
    method: str,
    facts: dict[str, Any],
    sample_grid: str | None = None,
) -> Path:
    """Write ``folder`` = model_index.json + unet/ (safetensors) + scheduler/ + README.md (+ samples.png).

    The folder is loadable by :class:`RectifiedFlowPipeline` (and ``Denoiser.from_pretrained`` for the next
    reflow round) and publishable with ``onestep publish``. ``reflow_export.json`` is written last and marks
    the export complete.
    """
    folder = Path(folder)
    done = folder / DONE_FILE
    done.unlink(missing_ok=True)
    pipe = RectifiedFlowPipeline(
        unet=model.model,
        scheduler=scheduler_from_denoiser(model),
        step_sigmas=[float(s) for s in step_sigmas],
        any_steps=any_steps,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    grid_name = None
    if sample_grid and Path(sample_grid).is_file():
        grid_name = "samples.png"
        shutil.copyfile(sample_grid, folder / grid_name)
    steps = len(step_sigmas)
    facts = {
        **facts,
        "sampling": f"Euler in flow time from x = {step_sigmas[0]:g} z, z ~ N(0, I) "
        + ("(any number of steps)" if any_steps else f"on step_sigmas {[round(s, 4) for s in step_sigmas]}"),
    }
    write_model_card(
        folder,
        title=title,
        method=method,
        facts={**facts, "parameters": sum(p.numel() for p in model.parameters())},
        base_model=base_model if base_model != "default" else "onestep-toolkit/default-digits-teacher",
        tags=["distillation", "rectified-flow", "reflow", "one-step" if steps == 1 else "few-step"],
        sample_grid=grid_name,
        usage=USAGE.format(path=folder, steps=steps),
    )
    done.write_text(
        json.dumps({k: v for k, v in facts.items() if isinstance(v, (int, float, str))}, indent=1)
    )
    return folder
