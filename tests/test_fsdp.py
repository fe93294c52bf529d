"""The engine's own FSDP (torch FSDP2, engine/fsdp.py) under a real ``accelerate launch`` of the repository's
accelerate_configs/fsdp.yaml with 2 CPU processes (gloo).

Each launch asserts from ``run_info.json`` that it ran FSDP and that every network was really sharded (each
process holds half of the elements): a launch that silently ran DDP fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch_utils import ROOT, accelerate_launch
from safetensors.torch import load_file
from tiny_models import tiny_edm_teacher

from engine.checkpoint import resolve_resume
from engine.config import TrainConfig
from engine.fsdp import FSDPSettings
from engine.trainer import build_accelerator

CONFIGS = ROOT / "accelerate_configs"
DEMO = ROOT / "recipes" / "engine_demo.py"
SID = ROOT / "recipes" / "sid.py"


def _fsdp_launch(script: Path, args: list[str], *launch: str, check: bool = True):
    return accelerate_launch(
        script, args, config=CONFIGS / "fsdp.yaml", launch_args=["--num_processes", "2", *launch], check=check
    )


def _assert_sharded(out: Path, names: set[str], precision: str) -> dict:
    info = json.loads((out / "run_info.json").read_text())
    assert (info["distributed_type"], info["num_processes"], info["backend"]) == ("FSDP", 2, "gloo")
    assert info["fsdp"]["fsdp_version"] == 2 and info["fsdp"]["process_group"] == "MULTI_CPU"
    assert info["mixed_precision"] == precision
    models = info["fsdp"]["sharded_models"]
    assert set(models) == names
    for facts in models.values():
        assert facts["sharded_parameters"] == facts["parameters"] > 0
        assert facts["local_numel"] < 0.55 * facts["numel"]  # half of every parameter (padding aside)
    return info


def _tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / f"{name}.safetensors"))


@pytest.mark.distributed
def test_engine_demo_sharded_in_bf16_resumes_bit_for_bit(tmp_path):
    """fsdp.yaml as shipped (bf16): shards the network, and a run stopped at step 2 and resumed ends with the
    uninterrupted run's weights, optimiser state and EMA exactly."""
    common = [
        "--batch_size",
        "8",
        "--log_with",
        "none",
        "--ema_halflife_images",
        "64",
        "--progress_bar",
        "false",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = _fsdp_launch(DEMO, [*common, "--output_dir", str(straight), "--max_steps", "4"])
    assert (
        "[engine] distributed_type=FSDP, fsdp_version=2, reshard_after_forward=True, 2 processes"
        in result.stderr
    )
    _assert_sharded(straight, {"dae"}, "bf16")
    _fsdp_launch(DEMO, [*common, "--output_dir", str(resumed), "--max_steps", "2"])
    out = _fsdp_launch(
        DEMO, [*common, "--output_dir", str(resumed), "--max_steps", "4", "--resume_from", "latest"]
    )
    assert "Resumed from" in out.stdout + out.stderr
    a, b = straight / "checkpoints" / "step_4", resumed / "checkpoints" / "step_4"
    for name in ("fsdp_dae_model", "fsdp_dae_optimizer", "ema_dae"):
        x, y = _tensors(a, name), _tensors(b, name)
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), name
    # the checkpoint holds the full (gathered) weights, readable without torch.distributed
    assert _tensors(a, "fsdp_dae_model")["0.weight"].shape == (256, 64)
    assert json.loads((a / "fsdp_dae_optimizer.json").read_text())["param_groups"][0]["lr"] > 0
    # a sharded network's checkpoint damaged after it was written: latest falls back to the intact step_2
    model_file = b / "fsdp_dae_model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    assert resolve_resume("latest", resumed) == resumed / "checkpoints" / "step_2"


@pytest.mark.distributed
def test_full_sid_sharded_equals_ddp_and_exports(tmp_path):
    """Full SiD (f_psi, G and the frozen teacher each sharded; G's loss runs backward through the sharded f_psi
    and teacher) trains as the DDP launch of the same run does: after 3 steps in fp32 the weights differ by
    less than 0.1% of what training changed (reduction order only), the EMA student is exported, and a run
    stopped at step 2 and resumed ends bit for bit where the uninterrupted one does."""
    teacher = tiny_edm_teacher(tmp_path / "teacher")
    args = ["--teacher", str(teacher), "--batch_size", "4", "--eval_samples", "16", "--eval_every", "0"]
    args += ["--log_with", "none", "--max_steps", "3", "--progress_bar", "false"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    accelerate_launch(SID, [*args, "--output_dir", str(ddp)])
    _fsdp_launch(SID, [*args, "--output_dir", str(fsdp)], "--mixed_precision", "no")
    _assert_sharded(fsdp, {"fake_score", "generator", "teacher"}, "no")
    initial = _tensors(teacher / "unet", "diffusion_pytorch_model")
    d, f = ddp / "checkpoints" / "step_3", fsdp / "checkpoints" / "step_3"
    for ddp_file, name in (("model", "fake_score"), ("model_1", "generator")):
        x, y = _tensors(d, ddp_file), _tensors(f, f"fsdp_{name}_model")
        assert set(x) == set(y)
        moved = sum((x[k] - initial[k.removeprefix("model.")]).abs().sum() for k in x)
        differ = sum((x[k] - y[k]).abs().sum() for k in x)
        assert moved > 0 and differ / moved < 1e-3, (name, float(differ / moved))
    ema_d, ema_f = _tensors(d, "ema_generator"), _tensors(f, "ema_generator")
    assert max((ema_d[k] - ema_f[k]).abs().max() for k in ema_d) < 1e-4
    assert (fsdp / "student" / "model_index.json").is_file()
    # stopped after step 2 (evaluated and exported there) and resumed: step 3 equals the uninterrupted run's
    resumed = tmp_path / "resumed"
    _fsdp_launch(SID, [*args, "--max_steps", "2", "--output_dir", str(resumed)], "--mixed_precision", "no")
    out = _fsdp_launch(
        SID, [*args, "--output_dir", str(resumed), "--resume_from", "latest"], "--mixed_precision", "no"
    )
    assert "Resumed from" in out.stdout + out.stderr
    r = resumed / "checkpoints" / "step_3"
    for name in (
        "fsdp_generator_model",
        "fsdp_fake_score_model",
        "fsdp_generator_optimizer",
        "ema_generator",
    ):
        x, y = _tensors(f, name), _tensors(r, name)
        assert all(torch.equal(x[k], y[k]) for k in x), name


@pytest.mark.distributed
def test_recipe_that_is_not_fsdp_ready_is_refused(tmp_path):
    """The reflow recipe evaluates and exports its trained network on the main process alone: refused by name
    under FSDP before any training."""
    teacher = tiny_edm_teacher(tmp_path / "teacher")
    out = accelerate_launch(
        ROOT / "recipes" / "reflow.py",
        ["--teacher", str(teacher), "--output_dir", str(tmp_path / "out"), "--log_with", "none"],
        config=CONFIGS / "fsdp.yaml",
        launch_args=["--num_processes", "1"],
        check=False,
    )
    assert out.returncode != 0
    assert "does not run under FSDP" in out.stderr and "DeepSpeed" in out.stderr


def test_fsdp_settings_from_the_launch_variables():
    """accelerate exports FSDP1's strategy name, or FSDP2's true/false, in FSDP_RESHARD_AFTER_FORWARD."""
    assert FSDPSettings.from_environ({}) == FSDPSettings(True, 0, False)
    v2 = {"FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_MIN_NUM_PARAMS": "1000", "FSDP_OFFLOAD_PARAMS": "true"}
    assert FSDPSettings.from_environ(v2) == FSDPSettings(False, 1000, True)
    assert (
        FSDPSettings.from_environ({"FSDP_RESHARD_AFTER_FORWARD": "SHARD_GRAD_OP"}).reshard_after_forward
        is False
    )
    assert FSDPSettings.from_environ({"FSDP_SHARDING_STRATEGY": "FULL_SHARD"}).reshard_after_forward is True
    with pytest.raises(ValueError, match="HYBRID_SHARD.*FULL_SHARD or SHARD_GRAD_OP"):
        FSDPSettings.from_environ({"FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"})
    with pytest.raises(ValueError, match="FSDP_MIN_NUM_PARAMS='many'"):
        FSDPSettings.from_environ({"FSDP_MIN_NUM_PARAMS": "many"})


def test_fp16_under_fsdp_is_refused_before_the_accelerator(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="fp16.*FSDP.*bf16"):
        build_accelerator(TrainConfig(output_dir="unused", mixed_precision="fp16"))


@pytest.mark.distributed
def test_sid_zero2_like_with_checkpointing_accumulation_and_a_two_step_student(tmp_path):
    """fsdp_grad_op.yaml (gathered parameters kept from forward to backward) with the memory options: gradient
    checkpointing, a bf16 teacher, 2 micro-batches, and a 2-step student whose step count every process draws
    alike (each G call gathers shards collectively: a differing count would hang)."""
    teacher = tiny_edm_teacher(tmp_path / "teacher")
    args = ["--teacher", str(teacher), "--batch_size", "2", "--eval_samples", "8", "--eval_every", "0"]
    args += [
        "--log_with",
        "none",
        "--max_steps",
        "3",
        "--progress_bar",
        "false",
        "--gradient_checkpointing",
        "true",
    ]
    args += ["--teacher_dtype", "bf16", "--gradient_accumulation_steps", "2", "--step_sigmas", "80.0", "1.5"]
    accelerate_launch(
        SID,
        [*args, "--output_dir", str(tmp_path / "out")],
        config=CONFIGS / "fsdp_grad_op.yaml",
        launch_args=["--num_processes", "2"],
        timeout=900,
    )
    info = _assert_sharded(tmp_path / "out", {"fake_score", "generator", "teacher"}, "bf16")
    assert info["fsdp"]["reshard_after_forward"] is False
    state = json.loads((tmp_path / "out" / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state["images_seen"] == 3 * 2 * 2 * 2
    ema = _tensors(tmp_path / "out" / "checkpoints" / "step_3", "ema_generator")
    assert all(torch.isfinite(t).all() for t in ema.values())
    assert (tmp_path / "out" / "student" / "model_index.json").is_file()


@pytest.mark.distributed
def test_teacher_recipe_sharded_per_block_exports_a_loadable_teacher(tmp_path):
    """The teacher recipe under FSDP with every UNet block its own all-gather group (fsdp_min_num_params 0):
    more than one group per network, and the EMA teacher it exports loads with plain diffusers."""
    from diffusers import UNet2DModel

    out = tmp_path / "teacher"
    args = ["--output_dir", str(out), "--max_steps", "2", "--batch_size", "8", "--log_with", "none"]
    _fsdp_launch(
        ROOT / "recipes" / "teacher.py",
        [*args, "--eval_every", "0", "--progress_bar", "false"],
        "--fsdp_min_num_params",
        "0",
    )
    facts = _assert_sharded(out, {"teacher"}, "bf16")["fsdp"]["sharded_models"]["teacher"]
    assert facts["groups"] > 4  # down/up blocks each, the mid block's lists, then the root
    unet = UNet2DModel.from_pretrained(out / "teacher" / "unet")
    assert sum(p.numel() for p in unet.parameters()) == facts["numel"]
