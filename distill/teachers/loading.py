"""Where teachers come from: the embedded default, a local diffusers folder, or a hub id; and whether the
toolkit can use them (:func:`check_teacher`, from JSON configs only, before any weights are read)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from distill.teachers.denoiser import Denoiser
from distill.teachers.families import TeacherFamily, describe_teacher_source
from distill.text2image.pipeline import fashion_flow_teacher, fashion_sd_teacher

DEFAULT_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "default_teacher"


def resolve_teacher_path(spec: str) -> str:
    """'default' -> the teacher shipped in the package; 'fashion-sd' / 'fashion-flow' -> the shipped
    Fashion-MNIST text-to-image teachers (SD-format UNet / PixArt-format flow-matching transformer, assembled with
    their MiniLM text encoder on first use); an existing folder -> itself; else a hub id."""
    if spec == "fashion-sd":
        return str(fashion_sd_teacher())
    if spec == "fashion-flow":
        return str(fashion_flow_teacher())
    if spec == "default":
        if not (DEFAULT_TEACHER / "unet").is_dir():
            raise FileNotFoundError(
                f"The embedded default teacher is missing from {DEFAULT_TEACHER}; reinstall the package or train it "
                "with: accelerate launch recipes/teacher.py --config recipes/configs/teacher_digits.yaml"
            )
        return str(DEFAULT_TEACHER)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(
                f"--teacher {spec!r} is a file; expected a diffusers model or pipeline folder"
            )
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(
            f"--teacher {spec!r}: no such folder (and it does not look like a hub id 'org/name')"
        )
    return spec


#: the conditioning kinds the recipes can feed today (no text encoders yet): for ``check_teacher``
UNTEXTED = ("none", "class_labels")


def check_teacher(
    spec: str = "default", conditioning: Collection[str] | None = None, latent: bool = True
) -> TeacherFamily:
    """The teacher's :class:`TeacherFamily`, or ``ValueError`` naming its family if it cannot be used.

    Reads JSON configs only (hub ids: a few small downloads), so recipes call it at start-up, before any
    weights are loaded or copied. ``conditioning``: the conditioning kinds the caller can feed
    (e.g. ``("none", "class_labels")`` for a recipe without prompts); others are refused too. ``latent=False``:
    the caller cannot decode latents, so latent teachers are refused.
    """
    family = describe_teacher_source(resolve_teacher_path(spec)).require()
    if not latent and family.latent:
        raise ValueError(
            f"{family.label} ({family.family}) teachers are not supported yet by this recipe: it does not decode "
            f"the latents of its {family.vae_class} ({family.vae_component}/) (teacher {spec!r})"
        )
    if conditioning is not None and family.conditioning not in conditioning:
        raise ValueError(
            f"{family.label} ({family.family}) teacher {spec!r} is conditioned on {family.conditioning!r}; "
            f"this recipe can condition on {sorted(conditioning)} only"
        )
    return family


def load_teacher(spec: str = "default", **kwargs: Any) -> Denoiser:
    """Load a teacher as a :class:`Denoiser` (frozen use is up to the caller); unsupported families are
    refused by name (``ValueError``) before any weights are read."""
    return Denoiser.from_pretrained(resolve_teacher_path(spec), **kwargs)
