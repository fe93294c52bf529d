"""Where teachers come from: the embedded default, a local diffusers folder, or a hub id."""

from __future__ import annotations

from pathlib import Path

from distill.teachers.denoiser import Denoiser

DEFAULT_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "default_teacher"


def resolve_teacher_path(spec: str) -> str:
    """'default' -> the teacher shipped in the package; an existing folder -> itself; else a hub id."""
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


def load_teacher(spec: str = "default", **kwargs) -> Denoiser:
    """Load a teacher as a :class:`Denoiser` (frozen use is up to the caller)."""
    return Denoiser.from_pretrained(resolve_teacher_path(spec), **kwargs)
