"""benchmarks/fd_breakdown.py: the per-class FD split and its option checks (no sampling here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fd_breakdown.py"


@pytest.fixture(scope="module")
def fd_breakdown():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import fd_breakdown

        yield fd_breakdown
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_breakdown_finds_the_class_whose_samples_moved(fd_breakdown):
    """Samples drawn like the reference except one class shifted: that class's mean term is the large one,
    the others stay near 0; alignment counts predicted == prompted per class."""
    from distill.evaluation.metrics import feature_statistics

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(10, 3))
    real_labels = torch.arange(20_000) % 10
    real = torch.from_numpy(centres[real_labels.numpy()] + rng.normal(size=(20_000, 3)))
    prompted = torch.arange(20_000) % 10
    fake = torch.from_numpy(centres[prompted.numpy()] + rng.normal(size=(20_000, 3)))
    fake[prompted == 3] += 2.0  # class 3 drawn 2 units off in every feature: mean term 12
    predicted = prompted.clone()
    predicted[prompted == 5] = 6  # class 5 never classified as itself
    result = fd_breakdown.breakdown(
        fake, predicted, prompted, feature_statistics(real), fd_breakdown.class_statistics(real, real_labels)
    )
    rows = result["classes"]
    assert rows[3]["fd_mean"] == pytest.approx(12.0, rel=0.05)
    assert all(rows[c]["fd_mean"] < 0.05 and abs(rows[c]["fd_covariance"]) < 0.1 for c in range(10) if c != 3)
    assert rows[5]["align"] == 0.0 and rows[4]["align"] == 1.0 and result["align"] == pytest.approx(0.9)
    assert result["fd"] == pytest.approx(result["fd_mean"] + result["fd_covariance"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--student", "no-label"], "LABEL=FOLDER"),
        (["--student", "s=/no/such/folder"], "no folder at '/no/such/folder'"),
        (["--num_samples", "10"], "--num_samples must be >= 20"),
        (["--teacher", "none"], "nothing to evaluate"),
        # a student may not take the teacher's row (it would be sampled with the teacher's steps and scale)
        (["--student", f"teacher={ROOT}"], "the label 'teacher' is taken"),
        (["--teacher", "none", "--student", f"a={ROOT}", "--student", f"a={ROOT}"], "the label 'a' is taken"),
    ],
)
def test_bad_options_are_refused_by_name(args, message):
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and message in done.stderr, done.stderr
