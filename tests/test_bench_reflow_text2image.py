"""Fast check of benchmarks/reflow_text2image.py (the benchmark itself runs for minutes and is not run here): it
imports what it shares with sid_text2image.py and parses its options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reflow_text2image.py"


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
    assert "--guidance_scale" in out.stdout and "--minutes" in out.stdout
