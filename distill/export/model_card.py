"""Model cards (README.md with YAML metadata) for exported teachers and students, via huggingface_hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


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
) -> Path:
    """Write ``folder/README.md``: metadata header (library, base model, tags, figures) and a short text."""
    folder = Path(folder)
    data = ModelCardData(
        library_name="diffusers",
        base_model=base_model,
        tags=["onestep-toolkit", *(tags or [])],
        **{"onestep": {k: _plain(v) for k, v in facts.items()}},
    )
    lines = [f"# {title}", "", f"**Method:** {method}", ""]
    if base_model:
        lines += [f"**Base teacher:** `{base_model}`", ""]
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


def _plain(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _fmt(value: Any) -> str:
    value = _plain(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)
