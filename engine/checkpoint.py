"""Atomic training checkpoints on top of ``accelerator.save_state``.

Accelerate writes a checkpoint file by file; a run killed halfway leaves a folder that looks complete enough to
be loaded. Here every checkpoint is written to ``checkpoints/.tmp-step_N`` and renamed to ``step_N`` only when
all processes are done, so ``latest`` can only ever find complete checkpoints. Engine state (step, data
position, EMA weights) is stored as JSON and safetensors beside accelerate's files, never as pickles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume_from: str | None, output_dir: str | Path) -> Path | None:
    """Map ``--resume_from`` to a checkpoint folder; 'latest' with none present means a fresh start (the
    Trainer warns, so a re-launch script can always pass 'latest')."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume_from {resume_from!r} is not a complete checkpoint folder "
            f"(expected a folder containing {STATE_FILE}, e.g. {checkpoint_root(output_dir)}/step_N, or 'latest')"
        )
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    extra_writers: list[Any] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Write ``step_N`` atomically; ``extra_writers`` are callables ``f(folder)`` run on the main process."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{step}"
    tmp = root / f"{TMP_PREFIX}step_{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        for write in extra_writers or []:
            write(tmp)
        state_path = tmp / STATE_FILE
        state_path.write_text(json.dumps(trainer_state, indent=2))
        with open(state_path) as fh:
            os.fsync(fh.fileno())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())
