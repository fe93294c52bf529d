"""Run a script through ``accelerate launch`` with 2 CPU processes, as users do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "accelerate_configs" / "cpu_2proc.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(
    script: str | Path,
    args: list[str],
    timeout: int = 600,
    config: str | Path | None = None,
    launch_args: list[str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file <config, default cpu_2proc.yaml> <launch_args> script args``; with
    ``check`` a failing launch raises with the tail of its output."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config or CPU_CONFIG),
        *(launch_args or []),
        "--main_process_port",
        str(free_port()),
        str(script),
        *args,
    ]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"accelerate launch failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result
