"""DeepSpeed ZeRO-2/3 under a real ``accelerate launch`` with 2 CPU processes (gloo) (FSDP: tests/test_fsdp.py).

Each launch asserts the distributed type it meant to test from ``run_info.json``: a ZeRO config that silently
ran as DDP (what ``Accelerator(cpu=True)`` did before) fails here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from launch_utils import ROOT, accelerate_launch
from safetensors.torch import load_file

from engine.checkpoint import MANIFEST_FILE, resolve_resume
from engine.config import TrainConfig
from engine.trainer import accelerator_device_kwargs, launch_sharding

pytest.importorskip("deepspeed")

DEMO = ROOT / "recipes" / "engine_demo.py"
CONFIGS = ROOT / "accelerate_configs"
DEMO_ARGS = ["--batch_size", "8", "--log_with", "none", "--ema_halflife_images", "64"]


def _launch(config: str, out: Path, *args: str, precision: str | None = None) -> subprocess.CompletedProcess:
    launch = ["--num_processes", "2", *(["--mixed_precision", precision] if precision else [])]
    return accelerate_launch(
        DEMO, [*DEMO_ARGS, "--output_dir", str(out), *args], config=CONFIGS / config, launch_args=launch
    )


@pytest.mark.distributed
def test_zero2_launch_config_runs_deepspeed_in_bf16(tmp_path):
    """The repository's ZeRO-2 file as is (bf16): DeepSpeed really runs, stage 2, bf16 weights, gloo."""
    result = _launch("deepspeed_zero2.yaml", tmp_path, "--max_steps", "2")
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert (info["distributed_type"], info["num_processes"], info["backend"]) == ("DEEPSPEED", 2, "gloo")
    assert info["deepspeed"]["zero_stage"] == 2 and info["deepspeed"]["bf16"] is True
    assert info["mixed_precision"] == "bf16" and info["mixed_precision_source"] == "launcher"
    assert "[engine] distributed_type=DEEPSPEED, zero_stage=2, 2 processes, device=cpu" in result.stderr
    # the EMA keeps the model's own fp32 (a copy of the prepared module would be DeepSpeed's bf16 cast)
    ema = load_file(str(tmp_path / "checkpoints" / "step_2" / "ema_dae.safetensors"))
    assert {t.dtype for t in ema.values()} == {torch.float32}


def _fp32_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir))


@pytest.mark.distributed
def test_zero3_resume_equals_uninterrupted_run_and_latest_skips_damage(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _launch("deepspeed_zero3.yaml", straight, "--max_steps", "4", precision="no")
    _launch("deepspeed_zero3.yaml", resumed, "--max_steps", "2", precision="no")
    result = _launch(
        "deepspeed_zero3.yaml", resumed, "--max_steps", "4", "--resume_from", "latest", precision="no"
    )
    assert "Resumed from" in result.stdout + result.stderr
    info = json.loads((resumed / "run_info.json").read_text())
    assert (info["distributed_type"], info["num_processes"]) == ("DEEPSPEED", 2)
    assert info["deepspeed"]["zero_stage"] == 3

    a, b = straight / "checkpoints" / "step_4", resumed / "checkpoints" / "step_4"
    wa, wb = _fp32_weights(a), _fp32_weights(b)
    assert wa.keys() == wb.keys() and len(wa) == 6
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    ea, eb = load_file(str(a / "ema_dae.safetensors")), load_file(str(b / "ema_dae.safetensors"))
    for key in ea:
        assert ea[key].numel() > 0 and torch.equal(ea[key], eb[key]), key  # full tensors, not ZeRO-3 shards
    assert not torch.equal(ea["0.weight"], wa["0.weight"])  # the EMA is an average, not the weights

    # the manifest covers DeepSpeed's per-rank shards; a damaged shard makes `latest` fall back to step_2
    files = json.loads((b / MANIFEST_FILE).read_text())["files"]
    shards = [f for f in files if f.startswith("pytorch_model/zero_pp_rank_")]
    assert len(shards) == 4  # model + optimizer states of each of the 2 ranks
    optim = b / next(f for f in shards if f.endswith("rank_1_mp_rank_00_optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:100])
    assert resolve_resume("latest", resumed) == resumed / "checkpoints" / "step_2"


def test_sharded_launch_variables_and_the_cpu_flag():
    """What accelerate launch exports decides the Accelerator's arguments (no launch needed)."""
    assert launch_sharding({}) is None and launch_sharding({"ACCELERATE_USE_DEEPSPEED": "false"}) is None
    assert launch_sharding({"ACCELERATE_USE_DEEPSPEED": "true"}) == "deepspeed"
    assert launch_sharding({"ACCELERATE_USE_FSDP": "true"}) == "fsdp"
    config = TrainConfig(output_dir="unused")
    if not torch.cuda.is_available():
        plain = accelerator_device_kwargs(config, {})
        assert plain["cpu"] is True and plain["kwargs_handlers"] == []
        ds = accelerator_device_kwargs(config, {"ACCELERATE_USE_DEEPSPEED": "true"})
        assert ds["cpu"] is False and [h.backend for h in ds["kwargs_handlers"]] == ["gloo"]
        # the engine's own FSDP runs on plain data-parallel processes: gloo on CPU, like DDP
        fsdp = accelerator_device_kwargs(config, {"ACCELERATE_USE_FSDP": "true"})
        assert fsdp["cpu"] is True and fsdp["kwargs_handlers"] == []
    with pytest.raises(ValueError, match="use_cpu: true.*silently run plain DDP"):
        accelerator_device_kwargs(config, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "true"})
    with pytest.raises(ValueError, match="--cpu true"):
        accelerator_device_kwargs(
            TrainConfig(output_dir="unused", cpu=True), {"ACCELERATE_USE_DEEPSPEED": "true"}
        )
