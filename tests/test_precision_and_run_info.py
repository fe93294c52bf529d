"""Mixed precision: the launcher's choice unless the recipe config sets one; run_info.json records the run."""

import json
import logging
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
import torch
from launch_utils import CPU_CONFIG, ROOT, free_port
from test_engine_loop import make

from engine.config import TrainConfig, parse_config
from engine.trainer import LAUNCHER_PRECISION_ENV, PrecisionChoice, resolve_mixed_precision

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("configured", "launched", "want"),
    [
        (None, None, PrecisionChoice("no", "default")),
        (None, "bf16", PrecisionChoice("bf16", "launcher")),
        (None, "FP16", PrecisionChoice("fp16", "launcher")),  # accelerate lower-cases it too
        (None, "no", PrecisionChoice("no", "launcher")),
        ("bf16", None, PrecisionChoice("bf16", "config")),
        ("no", None, PrecisionChoice("no", "config")),
        ("fp16", "fp16", PrecisionChoice("fp16", "config")),  # same value: no warning
        # accelerate launch exports "no" when nothing chose a precision: the README's bf16 config, no warning
        ("bf16", "no", PrecisionChoice("bf16", "config")),
    ],
)
def test_resolution(configured, launched, want):
    env = {} if launched is None else {LAUNCHER_PRECISION_ENV: launched}
    assert resolve_mixed_precision(configured, env) == want


def test_explicit_config_wins_over_a_different_launcher_value_with_a_warning():
    got = resolve_mixed_precision("no", {LAUNCHER_PRECISION_ENV: "bf16"})
    assert (got.value, got.source) == ("no", "config")
    assert got.warning == (
        "mixed_precision: the recipe config's 'no' overrides the launcher's 'bf16' (ACCELERATE_MIXED_PRECISION); "
        "remove mixed_precision from the recipe config to use the launcher's"
    )


def test_unsupported_launcher_precision_is_refused_unless_the_config_overrides_it():
    with pytest.raises(ValueError, match=r"ACCELERATE_MIXED_PRECISION='fp8' is not one the engine runs"):
        resolve_mixed_precision(None, {LAUNCHER_PRECISION_ENV: "fp8"})
    assert resolve_mixed_precision("bf16", {LAUNCHER_PRECISION_ENV: "fp8"}).value == "bf16"


def test_yaml_and_command_line_values_are_explicit_and_absent_is_none(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mixed_precision: bf16\n")
    assert parse_config(TrainConfig, []).mixed_precision is None
    assert parse_config(TrainConfig, ["--config", str(path)]).mixed_precision == "bf16"
    assert (
        parse_config(TrainConfig, ["--config", str(path), "--mixed_precision", "no"]).mixed_precision == "no"
    )


def test_in_process_launcher_precision_reaches_the_accelerator_and_run_info(tmp_path, monkeypatch, caplog):
    """ACCELERATE_MIXED_PRECISION as accelerate launch sets it; the config leaves mixed_precision unset."""
    monkeypatch.setenv(LAUNCHER_PRECISION_ENV, "bf16")
    caplog.set_level(logging.INFO, logger="engine")
    trainer = make(tmp_path, max_steps=1)
    assert trainer.accelerator.mixed_precision == "bf16"
    (setup,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert setup.startswith("distributed_type=NO, 1 process, device=cpu, mixed_precision=bf16, ")
    assert setup.endswith("; mixed_precision from the launcher (ACCELERATE_MIXED_PRECISION)")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    trainer.fit()
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["mixed_precision"] == "bf16" and info["mixed_precision_source"] == "launcher"
    assert info["distributed_type"] == "NO" and info["num_processes"] == 1 and info["device"] == "cpu"
    assert info["torch_threads"] == torch.get_num_threads() == 1
    assert "torch thread" in info["torch_threads_reason"]
    assert "deepspeed" not in info and "fsdp" not in info
    for package in ("torch", "accelerate", "diffusers", "peft", "transformers"):
        assert info["versions"][package] == version(package)
    assert not list(tmp_path.glob(".run_info.json.tmp-*"))  # the temporary file was renamed away


def test_explicit_config_overrides_the_launcher_and_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(LAUNCHER_PRECISION_ENV, "bf16")
    caplog.set_level(logging.INFO, logger="engine")
    trainer = make(tmp_path, max_steps=1, mixed_precision="no")
    assert trainer.accelerator.mixed_precision == "no"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [resolve_mixed_precision("no", {LAUNCHER_PRECISION_ENV: "bf16"}).warning]
    trainer.fit()
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert (info["mixed_precision"], info["mixed_precision_source"]) == ("no", "config")


def test_without_launcher_or_config_the_run_is_fp32_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv(LAUNCHER_PRECISION_ENV, raising=False)
    trainer = make(tmp_path, max_steps=1)
    trainer.fit()
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert (info["mixed_precision"], info["mixed_precision_source"]) == ("no", "default")


@pytest.mark.distributed
def test_accelerate_launch_bf16_config_file_is_used_and_recorded(tmp_path):
    """A launch file with mixed_precision: bf16 and a recipe config that does not set one: the run is bf16."""
    launch_file = tmp_path / "cpu_2proc_bf16.yaml"
    text = CPU_CONFIG.read_text()
    assert "mixed_precision: 'no'" in text
    launch_file.write_text(text.replace("mixed_precision: 'no'", "mixed_precision: bf16"))
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
    }
    env.pop(LAUNCHER_PRECISION_ENV, None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_file)]
    cmd += ["--main_process_port", str(free_port()), str(ROOT / "tests" / "toy_recipe.py")]
    cmd += ["--output_dir", str(out), "--max_steps", "1", "--batch_size", "4", "--log_with", "none"]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    info = json.loads((out / "run_info.json").read_text())
    assert (info["mixed_precision"], info["mixed_precision_source"]) == ("bf16", "launcher")
    assert (info["distributed_type"], info["num_processes"], info["device"]) == ("MULTI_CPU", 2, "cpu")
    assert info["torch_threads"] == 1
    assert "mixed_precision=bf16, " in result.stderr
    assert "mixed_precision from the launcher (ACCELERATE_MIXED_PRECISION)" in result.stderr
