"""Fast checks of benchmarks/sid_text2image.py (the benchmark itself runs for minutes and is not run here), and
that benchmarks/reflow_text2image.py, which imports from it, parses its options."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sid_text2image.py"


def load_script():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports `common` from beside it
    try:
        spec = importlib.util.spec_from_file_location("bench_sid_text2image", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_teacher_measurements_are_kept_and_reused_by_key(tmp_path, monkeypatch):
    script = load_script()
    calls = []

    def fake_measure(name, folder, samples, seed, steps, cfg):
        calls.append((steps, cfg))
        metrics = {"fd": 10.0 + cfg, "align": 0.9, "align_heldout": 0.8, "precision": 0.7, "recall": 0.6}
        return metrics, torch.full((30, 3, 4, 4), float(cfg))

    monkeypatch.setattr(script, "measure", fake_measure)
    folder = tmp_path / "teacher"
    folder.mkdir()
    first = script.measure_teacher(str(folder), 30, 0, 25, 1.5, tmp_path / "cache")
    again = script.measure_teacher(str(folder), 30, 0, 25, 1.5, tmp_path / "cache")
    assert calls == [(25, 1.5)]  # the second is read back
    assert again[0] == first[0] and torch.equal(again[1], first[1][: script.GRID_IMAGES])
    script.measure_teacher(str(folder), 30, 0, 25, 3.0, tmp_path / "cache")  # another scale: measured
    script.measure_teacher(str(folder), 30, 0, 25, 1.5, None)  # no cache: always measured
    assert calls == [(25, 1.5), (25, 3.0), (25, 1.5)]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], (1.5, None)),
        (["--guidance_scale", "2"], (2.0, None)),
        (["--guidance_scale_teacher", "1.25"], (1.25, "1.5,1.5,1.5,1.25")),
        (["--guidance_scale", "1", "--guidance_scale_fake_train", "1.5"], (1.0, "1.5,1,1,1")),
    ],
)
def test_the_teacher_is_compared_at_the_scale_the_student_is_distilled_from(overrides, expected):
    """A student trained against the teacher at kappa4 = guidance_scale_teacher is measured against that teacher,
    not the one at --guidance_scale; differing scales are named in the RESULT line."""
    from engine.config import parse_config

    script = load_script()
    config = parse_config(script.SiDConfig, ["--config", str(script.CONFIG), *overrides])
    assert script.compared_scale(config) == expected


@pytest.mark.parametrize(
    "script, options",
    [
        (SCRIPT, ("--guidance_scale", "--teacher_cache")),
        # reflow_text2image.py imports what it shares with this script: a broken import fails here
        (SCRIPT.parent / "reflow_text2image.py", ("--guidance_scale", "--minutes")),
    ],
    ids=["sid", "reflow"],
)
def test_help_parses(script, options):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert all(option in out.stdout for option in options), out.stdout
