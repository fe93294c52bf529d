"""Atomic training checkpoints on top of ``accelerator.save_state``.

Accelerate writes a checkpoint file by file; a run killed halfway leaves a folder that looks complete enough to
be loaded. Here every checkpoint is written to ``checkpoints/.tmp-step_N`` and renamed to ``step_N`` only when
all processes are done, so ``latest`` can only ever find complete checkpoints. Engine state (step, data
position, EMA weights) is stored as JSON and safetensors beside accelerate's files, never as pickles.

Atomic writing does not protect a checkpoint damaged *after* it was written (a truncated copy, a bad disk
block). The last file written into each checkpoint is ``manifest.json``: every other file's relative path,
size and sha256. On resume the manifest is checked (sizes first: cheap, and they catch truncation; then
hashes: they catch a flipped byte). ``resume_from=latest`` skips damaged checkpoints and falls back to the
newest intact one; when checkpoints exist but none is intact it raises rather than silently starting over
(discarding progress is the user's decision, e.g. by pointing ``--output_dir`` elsewhere). A checkpoint
without a manifest was written before manifests existed (the rename makes a manifest-less *new* checkpoint
impossible): it is accepted as before, with a note that it cannot be verified.

Cost: hashing streams each file in 4 MiB chunks (constant memory) at about 1.2 GB/s on one CPU core. On the
digits SiD checkpoint (26 MB: two models, two Adam states, EMA) the manifest takes 0.02 s against 0.05 s to
write the same files with a warm page cache (measured on the 2-core CPU dev machine); a save that really
reaches the disk is slower, so hashing adds well under half of a save, once more on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from engine.log import get_logger

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 4 << 20


class CheckpointDamagedError(RuntimeError):
    """A checkpoint whose files do not match its manifest (or no intact checkpoint for ``latest``)."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed in chunks so a multi-GB optimizer state never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` except the manifest, as sorted POSIX relative paths."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE
    )


def write_manifest(folder: Path) -> Path:
    """Record path, size and sha256 of every file in ``folder``; call it after every other file is written."""
    entries = {}
    for rel in _files(folder):
        path = folder / rel
        entries[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    out = folder / MANIFEST_FILE
    with open(out, "w") as fh:
        json.dump({"version": MANIFEST_VERSION, "files": entries}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    return out


def verify_checkpoint(folder: Path) -> bool:
    """Check ``folder`` against its manifest: True when intact, False when it has no manifest (written before
    manifests; cannot be verified). Raises :class:`CheckpointDamagedError` naming the file and what differs.

    All sizes are checked before any hash, so a truncated file is found without reading gigabytes.
    """
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.exists():
        return False
    try:
        files = json.loads(manifest_path.read_text())["files"]
        expected = {rel: (int(v["size"]), str(v["sha256"])) for rel, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointDamagedError(f"{manifest_path}: unreadable manifest ({err})") from err
    for rel, (size, _) in expected.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointDamagedError(f"{path}: missing (manifest lists {size} bytes)")
        found = path.stat().st_size
        if found != size:
            raise CheckpointDamagedError(f"{path}: size {found} bytes, manifest says {size}")
    for rel, (_, sha) in expected.items():
        found = file_sha256(folder / rel)
        if found != sha:
            raise CheckpointDamagedError(f"{folder / rel}: sha256 {found}, manifest says {sha}")
    return True


_ERRORS: dict[str, type[Exception]] = {"missing": FileNotFoundError, "damaged": CheckpointDamagedError}
_Error = tuple[str, str] | None  # (key of _ERRORS, message)


def _pick(resume_from: str, output_dir: str | Path) -> tuple[str | None, list[tuple[int, str]], _Error]:
    """The checkpoint to resume from, the (level, line)s to log, and an error (decided on one process)."""
    notes: list[tuple[int, str]] = []
    unverified = f"has no {MANIFEST_FILE} (written before checkpoint manifests): it cannot be verified"
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        skipped = []
        for folder in reversed(found):
            try:
                verified = verify_checkpoint(folder)
            except CheckpointDamagedError as err:
                notes.append(
                    (logging.WARNING, f"resume_from=latest: skipping damaged checkpoint {folder.name}: {err}")
                )
                skipped.append(folder.name)
                continue
            if not verified:
                notes.append((logging.INFO, f"{folder} {unverified}"))
            if skipped:
                notes.append(
                    (logging.WARNING, f"resume_from=latest: using {folder} (newest intact checkpoint)")
                )
            return str(folder), notes, None
        if found:
            return (
                None,
                notes,
                (
                    "damaged",
                    f"resume_from=latest: all {len(found)} checkpoints in {checkpoint_root(output_dir)} are damaged "
                    f"({', '.join(skipped)}; see the lines above); refusing to start over and discard the progress. "
                    "Repair or remove them, or pass --resume_from with a checkpoint path or another --output_dir",
                ),
            )
        return None, notes, None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        return (
            None,
            notes,
            (
                "missing",
                f"--resume_from {resume_from!r} is not a complete checkpoint folder (expected a folder "
                f"containing {STATE_FILE}, e.g. {checkpoint_root(output_dir)}/step_N, or 'latest')",
            ),
        )
    try:
        if not verify_checkpoint(path):
            notes.append((logging.INFO, f"{path} {unverified}"))
    except CheckpointDamagedError as err:
        return None, notes, ("damaged", f"--resume_from {resume_from!r} is damaged: {err}")
    return str(path), notes, None


def resolve_resume(
    resume_from: str | None, output_dir: str | Path, accelerator: Accelerator | None = None
) -> Path | None:
    """Map ``--resume_from`` to a verified checkpoint folder.

    'latest' with no checkpoint means a fresh start (the Trainer warns, so a re-launch script can always pass
    'latest'); damaged checkpoints are skipped, and if all are damaged this raises. An explicit damaged path
    raises, naming the file. With an ``accelerator`` the main process decides (it alone reads and hashes) and
    broadcasts the choice, so every process resumes from the same folder or raises the same error.
    """
    if not resume_from:
        return None
    distributed = accelerator is not None and accelerator.num_processes > 1
    main = accelerator is None or accelerator.is_main_process
    decision: list[Any] = [None]
    if main:
        path, notes, error = _pick(resume_from, output_dir)
        for level, note in notes:
            get_logger().log(level, note)
        decision = [(path, error)]
    if distributed:
        broadcast_object_list(decision, from_process=0)
    path, error = decision[0]
    if error is not None:
        kind, message = error
        raise _ERRORS[kind](message)
    return Path(path) if path is not None else None


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
    """Write ``step_N`` atomically; ``extra_writers`` are callables ``f(folder)`` run on the main process.

    Once every process has written its files, the main process writes the manifest (last), then renames."""
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
    accelerator.wait_for_everyone()  # other processes' files (random_states_1.pkl, ...) are in place
    if accelerator.is_main_process:
        write_manifest(tmp)
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
