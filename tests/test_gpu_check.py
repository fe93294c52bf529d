"""benchmarks/gpu_check.py (scripts/gpu_check.sh's helper) without a GPU: the launches it builds, its argument
split, how it reads a finished run, and its refusal to run without CUDA. The launches themselves need a GPU (or
GPU_CHECK_ALLOW_CPU=1, minutes on CPU) and are not run here."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import CPU, GPU, ROOT


def test_checks_launch_the_recipes_under_their_configs(tmp_path):
    checks = {c.name: c for c in gpu_check.build_checks(tmp_path, GPU, gpus=8)}
    assert list(checks) == list(gpu_check.CHECKS)
    want = {
        "sid_1proc": ("sid", "single_gpu.yaml", 1),
        "sid_zero2": ("sid", "deepspeed_zero2.yaml", 8),
        "sid_fsdp": ("sid", "fsdp.yaml", 8),
        "lora_ga": ("lora", "single_gpu.yaml", 1),
        "lora_ga_bf16": ("lora", "single_gpu.yaml", 1),
    }
    for name, (recipe, config, processes) in want.items():
        check = checks[name]
        assert (check.recipe, check.config, check.processes) == (recipe, config, processes)
        assert (ROOT / "accelerate_configs" / config).is_file()
        args = check.args
        precision = [args[i + 1] for i, a in enumerate(args) if a == "--mixed_precision"][-1]  # the last wins
        assert precision == ("no" if name == "lora_ga" else "bf16"), name
        assert args[args.index("--output_dir") + 1] == str(tmp_path / name)
    sid = checks["sid_1proc"].args
    assert sid[sid.index("--student") + 1] == "full" and sid[sid.index("--teacher") + 1] == str(
        tmp_path / "teachers" / "sid"
    )
    assert sid[sid.index("--batch_size") + 1] == str(GPU.batch_size)
    lora = checks["lora_ga"].args
    assert lora[lora.index("--method") + 1] == "lora_ga"
    # ZeRO-2 falls back to reflow's one-model stage; its training folder is the distill stage's
    fallback = checks["sid_zero2"].fallback
    assert fallback is not None and fallback.recipe == "reflow" and fallback.config == "deepspeed_zero2.yaml"
    assert fallback.processes == 8 and fallback.train_dir == tmp_path / "reflow_zero2" / "distill"
    assert checks["sid_1proc"].fallback is None
    with pytest.raises(SystemExit, match="nope"):
        gpu_check.build_checks(tmp_path, GPU, 8, ["nope"])


def test_launch_command_round_trips_through_the_run_parser(tmp_path):
    check = gpu_check.build_checks(tmp_path, CPU, gpus=2, names=["sid_zero2"])[0]
    cmd = gpu_check.launch_command(check, python="py", port=1234)
    assert cmd[:8] == [
        "py", "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" /
        "deepspeed_zero2.yaml"), "--num_processes", "2", "--main_process_port",
    ]  # fmt: skip
    script = cmd.index(str(ROOT / "benchmarks" / "gpu_check.py"))
    args = gpu_check.parse_args(cmd[script + 1 :])
    assert (args.command, args.recipe, args.peak_dir) == ("run", "sid", tmp_path / "sid_zero2")
    assert args.recipe_args == check.args  # every recipe argument arrives, --peak-dir not among them
    parent = gpu_check.parse_args(["--checks", "lora_ga", "--dry-run"])
    assert parent.command is None and parent.checks == ["lora_ga"] and parent.dry_run


def test_read_result_from_run_info_logs_and_peak_files(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    check = gpu_check.build_checks(tmp_path, CPU, gpus=2, names=["sid_fsdp"])[0]
    run = check.output_dir
    run.mkdir(parents=True)
    info = {"distributed_type": "FSDP", "num_processes": 2, "mixed_precision": "bf16"}
    info["fsdp"] = {"fsdp_version": 2, "sharding_strategy": "FULL_SHARD"}
    (run / "run_info.json").write_text(json.dumps(info))
    writer = SummaryWriter(str(run / "logs" / "project"))
    for step, rate in ((10, 50.0), (20, 123.4), (30, 130.25)):
        writer.add_scalar("samples_per_s", rate, step)
        writer.add_scalar("generator/loss", 1.0, step)
    writer.close()
    for rank, peak in ((0, 1500.2), (1, 1700.6)):
        (run / gpu_check.PEAK_FILE.format(rank=rank)).write_text(
            json.dumps({"rank": rank, "peak_mb": peak, "kind": "cuda_max_memory_allocated"})
        )
    got = gpu_check.read_result(check)
    assert got == {
        "distributed_type": "FSDP",
        "processes": 2,
        "mixed_precision": "bf16",
        "sharding_strategy": "FULL_SHARD",
        "fsdp_version": "2",
        "images_per_s": "130.2",  # the last window, not the first
        "peak_mb": "1701",  # the largest rank
        "peak_kind": "cuda_max_memory_allocated",
    }
    empty = gpu_check.build_checks(tmp_path / "other", CPU, gpus=2, names=["sid_1proc"])[0]
    assert gpu_check.read_result(empty)["images_per_s"] == "unknown"


def test_error_reason_names_the_recipes_error():
    output = "\n".join([
        "[rank0]: Traceback (most recent call last):",
        "[rank0]: ValueError: DeepSpeed trains one model per Accelerator, this recipe trains ['a', 'b']",
        "[rank1]: ValueError: DeepSpeed trains one model per Accelerator, this recipe trains ['a', 'b']",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
    ])  # fmt: skip
    assert gpu_check.error_reason(output).startswith("ValueError:_DeepSpeed_trains_one_model")
    assert gpu_check.error_reason(output + "\nerror: ValueError: bad x") == "error:_ValueError:_bad_x"
    assert gpu_check.error_reason("") == "no_output"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_script_fails_loudly_and_dry_run_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GPU_CHECK_ALLOW_CPU", raising=False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--sizes", "gpu", "--gpus", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in lines] == [
        "sid_1proc",
        "sid_zero2",
        "reflow_zero2",
        "sid_fsdp",
        "lora_ga",
        "lora_ga_bf16",
    ]
    assert "--num_processes 8" in lines[1] and "--batch_size 64" in lines[0]
    script = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path)],
        env={"PATH": "/usr/bin:/bin", "PYTHON": __import__("sys").executable},
        capture_output=True,
        text=True,
    )
    assert script.returncode == 2 and "CUDA is not available" in script.stderr
