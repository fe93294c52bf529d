"""The engine under a real ``accelerate launch`` with 2 CPU (gloo) processes."""

import json

from launch_utils import ROOT, accelerate_launch
from safetensors.torch import load_file
from test_engine_loop import assert_weights_close, reference_one_step
from toy_recipe import ToyConfig


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
    state = json.loads((tmp_path / "checkpoints/step_3/trainer_state.json").read_text())
    assert state["step"] == 3 and state["images_seen"] == 48
