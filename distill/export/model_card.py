"""Model cards (README.md with YAML metadata) for exported teachers and students, via huggingface_hub.

The metadata follows what diffusers' training scripts write (``load_or_create_model_card`` +
``populate_model_card``): ``license``, ``library_name: diffusers``, ``pipeline_tag``, tags, ``base_model`` (only
a Hub id: the Hub rejects a local path there), plus the evaluation figures as a ``model-index``
(``EvalResult``s) so the Hub shows them. The usage snippet names the local folder; :func:`card_for_repo` rewrites
it to the repo id when ``onestep publish`` uploads the folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from distill.teachers.loading import DEFAULT_TEACHER

DEFAULT_LICENSE = "apache-2.0"
UNCONDITIONAL = "unconditional-image-generation"
TEXT_TO_IMAGE = "text-to-image"
GRID_NAME = "samples.png"
#: the offline metrics (distill.evaluation.metrics) and the facts that carry them: fd, final_fd, eval_fd_nfe35...
METRIC_NAMES = ("fd", "precision", "recall", "classes_covered", "label_entropy")
_METRIC_KEY = re.compile(r"(?:^|_)(" + "|".join(METRIC_NAMES) + r")(?:_|$)")
#: what those metrics are measured against (the only data they exist for)
EVAL_DATASET = {
    "dataset_type": "digits",
    "dataset_name": "scikit-learn 8x8 digits, held-out split (400 images, digits-classifier features)",
    "dataset_split": "heldout",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_QUOTED = re.compile(r"\"([^\"\n]+)\"")


@dataclass(frozen=True)
class TeacherRef:
    """How a card names a teacher: ``base_model`` (a Hub id, or None) and a display ``name`` (no local path)."""

    spec: str
    base_model: str | None
    name: str
    note: str


def _recorded_hub_id(folder: Path) -> str | None:
    """A Hub id a local model folder records about itself (``_name_or_path`` of its configs), if any."""
    for name in ("model_index.json", "config.json", "unet/config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text()).get("_name_or_path")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, str) and _HUB_ID.match(value) and not Path(value).expanduser().exists():
            return value
    return None


def describe_teacher(spec: str | None) -> TeacherRef | None:
    """Resolve a teacher spec ('default', a local folder, a Hub id) to what a card may say about it."""
    if not spec:
        return None
    if spec == "default":
        note = (
            "`default_teacher`, the 8x8 digits EDM teacher shipped with onestep-toolkit (`--teacher default`)"
        )
        return TeacherRef(spec, None, DEFAULT_TEACHER.name, note)
    if spec == "fashion-sd":
        note = "`text2image_sd`, the Fashion-MNIST text-to-image teacher shipped with onestep-toolkit (`--teacher fashion-sd`)"
        return TeacherRef(spec, None, "text2image_sd", note)
    if spec == "fashion-flow":
        note = (
            "`text2image_flow`, the Fashion-MNIST flow-matching transformer text-to-image teacher shipped with "
            "onestep-toolkit (`--teacher fashion-flow`)"
        )
        return TeacherRef(spec, None, "text2image_flow", note)
    path = Path(spec).expanduser()
    if path.is_dir():
        recorded = _recorded_hub_id(path)
        if recorded:
            return TeacherRef(spec, recorded, recorded, f"[{recorded}](https://huggingface.co/{recorded})")
        name = path.resolve().name
        return TeacherRef(spec, None, name, f"`{name}`, a local folder (not on the Hub)")
    if _HUB_ID.match(spec):
        return TeacherRef(spec, spec, spec, f"[{spec}](https://huggingface.co/{spec})")
    name = Path(spec).name or spec
    return TeacherRef(spec, None, name, f"`{name}` (a local folder when this card was written)")


def _without_local_path(text: str, teacher: TeacherRef | None) -> str:
    """``text`` with the teacher's spec / local path (as a whole token) replaced by its display name."""
    if teacher is None or teacher.spec == teacher.name:
        return text
    names = {teacher.spec, str(Path(teacher.spec).expanduser())}
    if Path(teacher.spec).expanduser().exists():
        names.add(str(Path(teacher.spec).expanduser().resolve()))
    for name in sorted(names, key=len, reverse=True):
        text = re.sub(rf"(?<![\w/.~-]){re.escape(name)}(?![\w/.-])", teacher.name, text)
    return text


def eval_results(
    metrics: dict[str, Any], task_type: str = UNCONDITIONAL, dataset: dict[str, str] | None = None
) -> list[EvalResult]:
    """One ``EvalResult`` per finite metric, named by its fact key (``final_fd``, ``best_fd``...)."""
    results = []
    for key, value in metrics.items():
        value = _plain(value)
        match = _METRIC_KEY.search(key)
        if match is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if not math.isfinite(value):
            continue
        results.append(
            EvalResult(
                task_type=task_type,
                metric_type=match.group(1),
                metric_value=value,
                metric_name=key,
                **(dataset or EVAL_DATASET),
            )
        )
    return results


def write_model_card(
    folder: str | Path,
    title: str,
    method: str,
    facts: dict[str, Any],
    command: str | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
    sample_grid: str | None = None,
    usage: str | None = None,
    *,
    license: str = DEFAULT_LICENSE,
    pipeline_tag: str = UNCONDITIONAL,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/README.md``: metadata header and a short text.

    ``base_model`` is the teacher as given to a recipe ('default', a local folder or a Hub id); only a Hub id
    goes into the metadata, a local teacher is named in the text by its folder name (also in ``title``).
    ``metrics`` default to the facts whose key names an offline metric (``final_fd``, ``eval_fd_nfe35``...).
    """
    folder = Path(folder)
    teacher = describe_teacher(base_model)
    title = _without_local_path(title, teacher)
    metrics = metrics if metrics is not None else facts
    results = eval_results(metrics, task_type=pipeline_tag)
    data = ModelCardData(
        license=license,
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        base_model=teacher.base_model if teacher else None,
        tags=list(
            dict.fromkeys(["onestep-toolkit", "diffusers", "diffusers-training", pipeline_tag, *(tags or [])])
        ),
        model_name=title if results else None,
        eval_results=results or None,
        **{"onestep": {k: _plain(v) for k, v in facts.items()}},
    )
    lines = [f"# {title}", "", f"**Method:** {method}", ""]
    if teacher:
        lines += [f"**Teacher:** {teacher.note}", ""]
    lines += ["| fact | value |", "| --- | --- |"] + [f"| {k} | {_fmt(v)} |" for k, v in facts.items()]
    if sample_grid:
        lines += ["", f"![samples]({sample_grid})"]
    if usage:
        lines += ["", "## Use", "", "```python", usage.strip(), "```"]
    if command:
        lines += ["", "## How it was made", "", "```bash", command, "```"]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    path = folder / "README.md"
    folder.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path


def write_export_card(
    folder: str | Path,
    *,
    title: str,
    method: str,
    facts: dict[str, Any],
    teacher: str | None,
    tags: list[str],
    usage: str,
    sample_grid: str | None = None,
    pipeline_tag: str = UNCONDITIONAL,
    license: str = DEFAULT_LICENSE,
) -> Path:
    """What every exporter ends with: the sample grid copied in as ``samples.png`` and the model card, whose
    ``usage`` has ``{path}`` replaced by the folder's absolute path (runnable from any working directory)."""
    folder = Path(folder)
    grid_name = None
    if sample_grid and Path(sample_grid).is_file():
        grid_name = GRID_NAME
        shutil.copyfile(sample_grid, folder / grid_name)
    return write_model_card(
        folder,
        title=title,
        method=method,
        facts=facts,
        base_model=teacher,
        tags=tags,
        sample_grid=grid_name,
        usage=usage.replace("{path}", str(folder.resolve())),
        license=license,
        pipeline_tag=pipeline_tag,
    )


def pipeline_tag_for(unet: Any) -> str:
    """``text-to-image`` for cross-attention (text-conditioned) UNets, else ``unconditional-image-generation``."""
    config = getattr(unet, "config", None)
    return TEXT_TO_IMAGE if getattr(config, "cross_attention_dim", None) else UNCONDITIONAL


def call_snippet(unet: Any, batch: int = 16) -> tuple[str, str]:
    """(setup lines, keyword arguments) that make ``pipe(...)`` runnable for the UNet's conditioning: class
    labels for class-conditional models, (placeholder) prompt embeddings for text-conditioned ones."""
    config = getattr(unet, "config", None)
    embeds = getattr(config, "num_class_embeds", None)
    dim = getattr(config, "cross_attention_dim", None)
    if dim:
        setup = (
            f"prompt_embeds = torch.zeros({batch}, 1, {dim})  # your text encoder's output [B, L, {dim}]\n"
        )
        return setup, "encoder_hidden_states=prompt_embeds, "
    if embeds:
        classes = max(int(embeds) - 1, 1)  # the last embedding is the null class of guidance
        return "", f"class_labels=torch.arange({batch}) % {classes}, "
    return "", ""


# --- publishing ------------------------------------------------------------------------------------------
def _looks_local(text: str, folder: Path) -> bool:
    """Whether a quoted string in a card is a local path (``folder`` itself, however written, or any other)."""
    if text.startswith(("/", "./", "../", "~")) or os.path.isabs(text):
        return True
    try:
        path = Path(text).expanduser()
        return path.resolve() == folder or (("/" in text or os.sep in text) and path.exists())
    except (OSError, ValueError):
        return False


def card_for_repo(text: str, folder: str | Path, repo_id: str, download: bool = False) -> str:
    """The card ``text`` of ``folder`` as it should read on the Hub under ``repo_id``.

    Quoted references to the folder (absolute or relative) become ``"repo_id"`` (``download``:
    ``snapshot_download("repo_id")``, for loaders that need local files, with its import added after
    ``import torch``); other quoted local paths become ``"path/to/<name>"``, and any remaining mention of the
    folder's absolute path becomes the repo id, so no local path is uploaded.
    """
    folder = Path(folder).resolve()
    target = f'snapshot_download("{repo_id}")' if download else f'"{repo_id}"'
    used = False

    def replace(match: re.Match[str]) -> str:
        nonlocal used
        value = match.group(1)
        if not _looks_local(value, folder):
            return match.group(0)
        if Path(value).expanduser().resolve() == folder:  # (a path that _looks_local resolves)
            used = True
            return target
        return f'"path/to/{Path(value).name}"'

    text = _QUOTED.sub(replace, text)
    text = text.replace(str(folder), repo_id)
    if download and used and "import snapshot_download" not in text:
        text = text.replace(
            "import torch\n", "import torch\nfrom huggingface_hub import snapshot_download\n", 1
        )
    return text


def _plain(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _fmt(value: Any) -> str:
    value = _plain(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)
