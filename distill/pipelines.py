"""diffusers pipelines for distilled one-step / k-step students, and loading a plug-in SiD-LoRA adapter.

diffusers has no pipeline for a network that maps noise to an image in one call at a fixed noise level, so
the students' pipelines are small ``DiffusionPipeline`` subclasses (the student's UNet, the teacher's scheduler,
which tells how the UNet's output maps to an x0 prediction, and the student's noise levels in the config),
written once in :mod:`distill.export.standalone_pipeline`. That file imports only torch and diffusers and is
copied into every exported folder, so ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``
loads a student where the toolkit is not installed. The classes here subclass those and add what needs the
toolkit (:attr:`OneStepPipeline.denoiser`, loading a teacher + adapter); ``OneStepPipeline.from_pretrained``
builds the toolkit class without running the folder's copy, for new folders and for folders exported before
the file was shipped (model_index.json ``_class_name: "OneStepPipeline"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from distill.export import standalone_pipeline as standalone
from distill.teachers.denoiser import Denoiser
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


class OneStepPipeline(standalone.OneStepPipeline):
    """x = G(sigma_0 * z; sigma_0); for k-step students, re-noise to sigma_i and apply G again.

    Sampling, saving and loading are :class:`distill.export.standalone_pipeline.OneStepPipeline`'s.
    """

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


class RectifiedFlowPipeline(standalone.RectifiedFlowPipeline, OneStepPipeline):
    """Deterministic 1- or N-step rectified-flow sampling (see
    :class:`distill.export.standalone_pipeline.RectifiedFlowPipeline`).

    With one step both pipelines compute ``D(sigma_max * z, sigma_max)``, so a one-step student folder also
    samples identically with :class:`OneStepPipeline`.
    """


#: pipeline class name (``_class_name`` in model_index.json) -> class, for loading any exported student
STUDENT_PIPELINES: dict[str, type[OneStepPipeline]] = {
    "OneStepPipeline": OneStepPipeline,
    "RectifiedFlowPipeline": RectifiedFlowPipeline,
}


def student_pipeline_class(folder: str | Path) -> type[OneStepPipeline] | None:
    """The toolkit pipeline class an exported student folder names, or None for anything else (a teacher).

    model_index.json's ``_class_name`` is ``["onestep_pipeline", "OneStepPipeline"]`` (the class in the shipped
    file) or, in folders exported before that file was shipped, the bare class name.
    """
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    name = json.loads(index.read_text()).get("_class_name")
    if isinstance(name, list) and len(name) == 2 and name[0] == standalone.PIPELINE_MODULE:
        name = name[1]
    return STUDENT_PIPELINES.get(name) if isinstance(name, str) else None


def load_student(folder: str | Path, device: str | torch.device = "cpu") -> OneStepPipeline:
    """Load an exported student folder with the pipeline class it was saved with."""
    cls = student_pipeline_class(folder)
    if cls is None:
        index = Path(folder) / "model_index.json"
        name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
        raise ValueError(
            f"{folder} is not an exported student: model_index.json names {name!r}, "
            f"expected one of {sorted(STUDENT_PIPELINES)}"
        )
    return cls.from_pretrained(str(folder)).to(device)


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
