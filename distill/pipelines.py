"""diffusers pipelines for distilled one-step / k-step students, and loading a plug-in SiD-LoRA adapter.

diffusers has no pipeline for a network that maps noise to an image in one call at a fixed noise level, so
these are small ``DiffusionPipeline`` subclasses: the student's UNet, the teacher's scheduler (which tells how
the UNet's output maps to an x0 prediction) and the student's noise levels in the config. They save and load
with the usual ``save_pretrained`` / ``from_pretrained`` (safetensors). Both sample with
:func:`distill.sampling.student.student_sample`; they differ only in how a k-step student moves between noise
levels (SiD: fresh noise; rectified flow: deterministic Euler) and in which step counts they accept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from distill.reflow.flow import flow_sigmas
from distill.sampling.student import student_sample
from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.loading import load_teacher

#: Written beside a SiD-LoRA adapter: the student's noise levels and the teacher it belongs to.
ADAPTER_INFO = "onestep_adapter.json"


def scheduler_from_denoiser(denoiser: Denoiser):
    """Rebuild the diffusers scheduler object whose config the denoiser was made from."""
    import diffusers

    cls = getattr(diffusers, denoiser.scheduler_class or "", None)
    if cls is None:
        raise ValueError(f"Cannot export: unknown scheduler class {denoiser.scheduler_class!r}")
    return cls.from_config(dict(denoiser.scheduler_config))


class OneStepPipeline(DiffusionPipeline):
    """x = G(sigma_0 * z; sigma_0); for k-step students, re-noise to sigma_i and apply G again."""

    model_cpu_offload_seq = "unet"
    #: how a k-step student moves to the next noise level (False: fresh noise, as SiD trains it)
    deterministic_steps = False

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
        return load_adapter_student(teacher, adapter_folder, merge=merge, device=device)

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet, self.scheduler)

    def sigmas_for(self, num_inference_steps: int | None) -> list[float]:
        """The noise levels sampled for ``num_inference_steps`` (default: the steps the student was trained for)."""
        sigmas = [float(s) for s in self.config.step_sigmas]
        steps = num_inference_steps or len(sigmas)
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
        dtype = torch.float32 if self.deterministic_steps else self.unet.dtype
        if noise is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        cond = None
        if class_labels is not None or encoder_hidden_states is not None:
            labels = None if class_labels is None else torch.as_tensor(class_labels, device=device).long()
            cond = Condition(class_labels=labels, encoder_hidden_states=encoder_hidden_states)
        images = student_sample(
            self.denoiser,
            noise.to(device, dtype),
            sigmas,
            cond,
            deterministic=self.deterministic_steps,
            fresh_noise=lambda: randn_tensor(shape, generator=generator, device=device, dtype=dtype),
        ).clamp(-1, 1)
        if output_type == "pt":
            out = images
        else:
            arr = images.add(1).div(2).permute(0, 2, 3, 1).float().cpu().numpy()
            out = self.numpy_to_pil(arr) if output_type == "pil" else arr
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)


class RectifiedFlowPipeline(OneStepPipeline):
    """Deterministic 1- or N-step rectified-flow sampling: Euler in flow time, written in EDM form as
    ``x' = x0_hat + sigma' (x - x0_hat) / sigma`` (no fresh noise), from ``x = step_sigmas[0] * z``.

    With one step both pipelines compute ``D(sigma_max * z, sigma_max)``, so a one-step student folder also
    samples identically with :class:`OneStepPipeline`. A reflowed velocity field (``any_steps=True``) samples in
    any number of steps on the uniform flow-time grid; a distilled N-step student (``any_steps=False``) uses its
    training grid ``step_sigmas`` (or a prefix of it).
    """

    deterministic_steps = True

    def __init__(
        self, unet, scheduler, step_sigmas: list[float] | None = None, any_steps: bool = False
    ) -> None:
        super().__init__(unet=unet, scheduler=scheduler, step_sigmas=step_sigmas)
        self.register_to_config(any_steps=bool(any_steps))

    def sigmas_for(self, num_inference_steps: int | None) -> list[float]:
        if not self.config.any_steps:
            return super().sigmas_for(num_inference_steps)
        steps = num_inference_steps or len(self.config.step_sigmas)
        if steps < 1:
            raise ValueError(f"num_inference_steps={steps} must be >= 1")
        return flow_sigmas(steps, float(self.config.step_sigmas[0]))


#: pipeline class name (``_class_name`` in model_index.json) -> class, for loading any exported student
STUDENT_PIPELINES: dict[str, type[OneStepPipeline]] = {
    "OneStepPipeline": OneStepPipeline,
    "RectifiedFlowPipeline": RectifiedFlowPipeline,
}


def load_student(folder: str | Path, device: str | torch.device = "cpu") -> OneStepPipeline:
    """Load an exported student folder with the pipeline class it was saved with."""
    index = Path(folder) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if name not in STUDENT_PIPELINES:
        raise ValueError(
            f"{folder} is not an exported student: model_index.json names {name!r}, "
            f"expected one of {sorted(STUDENT_PIPELINES)}"
        )
    return STUDENT_PIPELINES[name].from_pretrained(str(folder)).to(device)


def read_adapter_info(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a one-step adapter folder: {ADAPTER_INFO} is missing")
    return json.loads(path.read_text())


def load_adapter_student(
    teacher: str | None,
    adapter_folder: str | Path,
    merge: bool = False,
    device: str | torch.device = "cpu",
) -> OneStepPipeline:
    """Teacher UNet + scheduler (``teacher``: as for ``load_teacher``; None = the one named in the adapter
    folder) with the adapter attached by plain peft (``merge``: folded into the weights), as a one-step pipeline.
    """
    from peft import PeftModel

    info = read_adapter_info(adapter_folder)
    denoiser = load_teacher(teacher if teacher is not None else info["teacher"])
    unet = PeftModel.from_pretrained(denoiser.model, str(adapter_folder))
    if merge:
        unet = unet.merge_and_unload()
    unet.eval()
    pipe = OneStepPipeline(
        unet=unet, scheduler=scheduler_from_denoiser(denoiser), step_sigmas=info["step_sigmas"]
    )
    return pipe.to(device)
