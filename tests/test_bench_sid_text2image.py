"""Fast checks of benchmarks/sid_text2image.py (the benchmark itself runs for minutes and is not run here)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from distill.fashion_mnist import FASHION_CLASSES, all_captions

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


def test_prompts_file_holds_every_training_caption(tmp_path):
    path = load_script().write_prompts(tmp_path / "p.txt")
    lines = path.read_text().splitlines()
    expected = [c for label in range(len(FASHION_CLASSES)) for c in all_captions(label)]
    assert lines == expected
    assert not set(lines) & {c for label in range(len(FASHION_CLASSES)) for c in all_captions(label, True)}


def test_help_parses():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--guidance_scale" in out.stdout and "--teacher_steps" in out.stdout
