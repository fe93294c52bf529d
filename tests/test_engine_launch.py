"""The engine under a real ``accelerate launch`` with 2 CPU (gloo) processes."""

import json
import os
import subprocess
import sys

import pytest
from launch_utils import CPU_CONFIG, ROOT, accelerate_launch, free_port
from safetensors.torch import load_file
from test_engine_loop import assert_weights_close, reference_one_step
from toy_recipe import ToyConfig


@pytest.mark.distributed
def test_two_processes_with_accumulation_match_full_batch_then_resume(tmp_path):
    # global batch = 4 per micro-batch x 2 micro-batches x 2 processes = the whole 16-sample dataset
    args = [
        "--output_dir",
        str(tmp_path),
        "--batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--dataset_size",
        "16",
        "--shuffle",
        "false",
        "--optimizer",
        "sgd",
        "--log_with",
        "none",
    ]
    accelerate_launch(ROOT / "tests" / "toy_recipe.py", [*args, "--max_steps", "1"])
    state = json.loads((tmp_path / "checkpoints/step_1/trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["images_seen"] == 16
    cfg = ToyConfig(dataset_size=16, optimizer="sgd")
    assert_weights_close(load_file(tmp_path / "final.safetensors"), reference_one_step(cfg))

    result = accelerate_launch(
        ROOT / "tests" / "toy_recipe.py", [*args, "--max_steps", "3", "--resume_from", "latest"]
    )
    assert "Resumed from" in result.stdout + result.stderr
    # the run's setup line; launch_utils' explicit OMP_NUM_THREADS=1 is the user's choice and stays
    assert (
        "[engine] distributed_type=MULTI_CPU, 2 processes, device=cpu, mixed_precision=no, 1 torch thread per "
        "process (OMP_NUM_THREADS=1, your choice at accelerate launch)" in result.stderr
    )
    state = json.loads((tmp_path / "checkpoints/step_3/trainer_state.json").read_text())
    assert state["step"] == 3 and state["images_seen"] == 48


@pytest.mark.distributed
def test_failing_launch_names_the_recipe_error():
    """Each failing process ends with its one-line error, and torch elastic's failure summary repeats it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG)]
    cmd += ["--main_process_port", str(free_port()), "recipes/engine_demo.py", "--max_steps", "0"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    error = "error: ValueError: config field max_steps=0 must be >= 1"
    # the last line of each of the two processes; both write to one pipe, so another process's output may share
    # the line (seen once in CI: the two tracebacks interleaved)
    own = [line for line in out.stderr.splitlines() if error in line and "traceback :" not in line]
    assert len(own) == 2, out.stderr[-3000:]
    assert f"traceback : {error}" in out.stderr.split("Root Cause")[1]
