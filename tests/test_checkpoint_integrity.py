"""Checkpoints damaged after they were written: manifests, verification, fallback for ``latest``."""

import hashlib
import json
import logging
import re
import shutil

import pytest
from launch_utils import ROOT, accelerate_launch
from test_engine_loop import assert_weights_close, make
from toy_recipe import final_weights

from engine.checkpoint import MANIFEST_FILE, CheckpointDamagedError, list_checkpoints, resolve_resume

COMMON = dict(
    max_steps=12, checkpoint_every=4, checkpoints_total_limit=5, ema_halflife_images=100, batch_size=8
)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: its final weights, and its three checkpoints to damage (copied per test)."""
    out = tmp_path_factory.mktemp("straight")
    trainer = make(out, **COMMON)
    trainer.fit()
    return out, final_weights(trainer)


@pytest.fixture
def run(straight, tmp_path):
    """A fresh copy of the uninterrupted run's output folder (step_4, step_8, step_12)."""
    shutil.copytree(straight[0], tmp_path / "run")
    return tmp_path / "run"


def test_manifest_lists_every_file_with_size_and_hash(run):
    for folder in list_checkpoints(run):
        manifest = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        on_disk = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_FILE)
        assert sorted(manifest) == on_disk
        assert {"model.safetensors", "model_1.safetensors", "ema_generator.safetensors"} <= set(manifest)
        for name, entry in manifest.items():
            data = (folder / name).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_truncated_latest_falls_back_and_resume_stays_exact(run, straight, caplog):
    caplog.set_level(logging.INFO, logger="engine")
    damaged = run / "checkpoints/step_12/model_1.safetensors"
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[: size // 2])
    resumed = make(run, resume_from="latest", **COMMON)
    assert resumed.step == 8
    skip, use = warnings(caplog)
    assert skip == (
        f"resume_from=latest: skipping damaged checkpoint step_12: {damaged}: "
        f"size {size // 2} bytes, manifest says {size}"
    )
    assert use == f"resume_from=latest: using {run / 'checkpoints/step_8'} (newest intact checkpoint)"
    resumed.fit()
    assert_weights_close(final_weights(resumed), straight[1], exact=True)
    # the damaged checkpoint was rewritten by the resumed run, and is intact again
    assert resolve_resume("latest", run).name == "step_12"


def test_flipped_byte_of_same_size_is_found_by_hash(run, caplog):
    caplog.set_level(logging.INFO, logger="engine")
    damaged = run / "checkpoints/step_12/optimizer.bin"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    assert resolve_resume("latest", run).name == "step_8"
    (skip, _) = warnings(caplog)
    assert skip.startswith(f"resume_from=latest: skipping damaged checkpoint step_12: {damaged}: sha256 ")
    assert "manifest says" in skip


def test_explicit_damaged_path_names_the_file(run):
    folder = run / "checkpoints/step_8"
    (folder / "ema_generator.safetensors").write_bytes(b"")
    want = (
        f"--resume_from '{folder}' is damaged: {folder / 'ema_generator.safetensors'}: size 0 bytes, manifest"
    )
    with pytest.raises(CheckpointDamagedError, match=re.escape(want)):
        make(run, resume_from=str(folder), **COMMON)
    folder = run / "checkpoints/step_4"
    (folder / "random_states_0.pkl").unlink()
    with pytest.raises(CheckpointDamagedError, match=re.escape(f"{folder / 'random_states_0.pkl'}: missing")):
        resolve_resume(str(folder), run)


def test_all_damaged_raises_instead_of_starting_over(run, caplog):
    caplog.set_level(logging.INFO, logger="engine")
    for folder in list_checkpoints(run):
        (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(
        CheckpointDamagedError, match=r"all 3 checkpoints in .* are damaged \(step_12, step_8, step_4;"
    ):
        make(run, resume_from="latest", **COMMON)
    assert len(warnings(caplog)) == 3


def test_unreadable_manifest_is_damage(run):
    (run / "checkpoints/step_12" / MANIFEST_FILE).write_text('{"files": ')
    with pytest.raises(CheckpointDamagedError, match="unreadable manifest"):
        resolve_resume(str(run / "checkpoints/step_12"), run)
    assert resolve_resume("latest", run).name == "step_8"


def test_checkpoint_without_manifest_resumes_with_a_note(run, caplog):
    caplog.set_level(logging.INFO, logger="engine")
    folder = run / "checkpoints/step_12"
    (folder / MANIFEST_FILE).unlink()  # as written before manifests existed
    resumed = make(run, resume_from="latest", **COMMON)
    assert resumed.step == 12 and not warnings(caplog)
    notes = [r.getMessage() for r in caplog.records if "cannot be verified" in r.getMessage()]
    assert notes == [
        f"{folder} has no {MANIFEST_FILE} (written before checkpoint manifests): it cannot be verified"
    ]


@pytest.mark.distributed
def test_two_processes_skip_the_same_damaged_checkpoint(tmp_path):
    args = ["--output_dir", str(tmp_path), "--batch_size", "4", "--dataset_size", "16", "--log_with", "none"]
    args += ["--checkpoint_every", "1", "--progress_bar", "false"]
    accelerate_launch(ROOT / "tests" / "toy_recipe.py", [*args, "--max_steps", "2"])
    manifest = json.loads((tmp_path / "checkpoints/step_2" / MANIFEST_FILE).read_text())["files"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(manifest)  # every process's files
    (tmp_path / "checkpoints/step_2/random_states_1.pkl").write_bytes(b"")
    result = accelerate_launch(
        ROOT / "tests" / "toy_recipe.py", [*args, "--max_steps", "3", "--resume_from", "latest"]
    )
    log = result.stdout + result.stderr
    assert log.count("skipping damaged checkpoint step_2") == 1  # logged by the main process only
    assert (
        log.count("Resumed from") == 1 and f"Resumed from {tmp_path / 'checkpoints/step_1'} at step 1" in log
    )
    state = json.loads((tmp_path / "checkpoints/step_3/trainer_state.json").read_text())
    assert state["step"] == 3
