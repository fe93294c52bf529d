"""benchmarks/sid_curves_plot.py reads the in-training evaluations a run and its resumed stage log to TensorBoard."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sid_curves_plot.py"


def write_events(folder: Path, scalars: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_curves_merge_a_resumed_stage_and_map_steps_to_images(tmp_path):
    run = tmp_path / "run"
    # first stage: batch 32; the resumed stage (another event file) doubles the batch and rewrites step 100's FD
    write_events(run / "logs" / "a", {"images_seen": [(50, 1600), (100, 3200)], "eval/fd": [(100, 40.0)]})
    write_events(
        run / "logs" / "b",
        {
            "images_seen": [(150, 6400), (200, 9600)],
            "eval/fd": [(100, 30.0), (125, 28.0), (200, 25.0), (210, 26.0)],
            "eval/raw_fd": [(200, 20.0)],
        },
    )
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--run",
            f"chain={run}",
            "--reference",
            "teacher=14.6",
            "--plot",
            str(tmp_path / "curves.png"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # the resumed file's value of step 100 wins; step 125 lies between log steps; the final evaluation (210)
    # comes after the last logged step (200), at the last batch (64)
    assert "chain (EMA): 3200:30.0 4800:28.0 9600:25.0 10240:26.0" in out
    assert "chain (EMA): best FD 25.00 at 9600 images (step 200)" in out
    assert "chain (raw G): best FD 20.00 at 9600 images (step 200)" in out
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_resumed_run_evaluating_before_its_first_log_step_counts_back_at_its_batch(tmp_path):
    run = tmp_path / "resumed"  # resumed at step 3109 (99,488 images) with batch 64; logs every 50 steps
    write_events(run / "logs", {"images_seen": [(3150, 102112), (3200, 105312)], "eval/fd": [(3125, 36.5)]})
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--run", f"b64={run}", "--plot", str(tmp_path / "c.png")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "b64 (EMA): 100512:36.5" in out


def test_a_run_without_logs_is_named(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--run", f"x={tmp_path / 'missing'}"], capture_output=True, text=True
    )
    assert out.returncode != 0 and "has no TensorBoard events" in out.stderr and "missing" in out.stderr


@pytest.mark.parametrize(
    ("option", "bad", "message"),
    [
        ("--run", "no-label", "must be LABEL=VALUE"),
        ("--run", "label-only=", "must be LABEL=VALUE"),
        ("--reference", "teacher=low", "'low' is not a number"),
    ],
)
def test_bad_options_are_refused_by_name(tmp_path, option, bad, message):
    args = ["--run", f"x={tmp_path}"] if option == "--reference" else []
    out = subprocess.run([sys.executable, str(SCRIPT), *args, option, bad], capture_output=True, text=True)
    assert out.returncode != 0 and message in out.stderr and repr(bad) in out.stderr
