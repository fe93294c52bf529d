"""Writing an exported folder so that a reader never finds it half written."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def write_then_replace(target: Path, write: Callable[[Path], object]) -> None:
    """``write(folder)`` into the sibling ``<target>.partial``, then put it at ``target``: an existing
    ``target`` is renamed aside first and removed after, so a crash at any point leaves one whole export
    (``target``, or ``<target>.old`` during the two renames). Model cards name their folder by its absolute
    path; the card's mentions of the partial folder are turned into ``target``'s."""
    target = Path(target)
    partial = target.with_name(f"{target.name}.partial")
    old = target.with_name(f"{target.name}.old")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    card = partial / "README.md"
    if card.is_file():
        card.write_text(card.read_text().replace(str(partial.resolve()), str(target.resolve())))
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)
