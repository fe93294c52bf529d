import os
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file

from distill.cli import main as cli_main
from engine.images import make_grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_and_say_when_to_use(path):
    config = load_config_from_file(str(path))
    text = path.read_text()
    if config.distributed_type in ("DEEPSPEED", "FSDP"):
        # sharded launches take the process count from --num_processes (the GPU count), never a fixed 8, and never
        # use_cpu (accelerate ignores DeepSpeed/FSDP on a CPU Accelerator: silent DDP)
        assert config.num_processes == -1 and "--num_processes" in text
        assert not config.use_cpu
    else:
        assert config.num_processes >= 1
    assert path.read_text().startswith("#"), "each config opens with a comment on when to use it"


def test_expected_launch_configs_exist():
    names = {p.stem for p in (ROOT / "accelerate_configs").glob("*.yaml")}
    assert {"cpu_2proc", "single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"} <= names


def test_grid_layout_and_values():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 1.0, 0.0)])
    grid = make_grid(images, nrow=2, pad=1)
    assert grid.shape == (1 + 2 * 3, 1 + 2 * 3, 1) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[1, 4, 0] == 255 and grid[4, 1, 0] == 128
    with pytest.raises(ValueError, match=r"\(2, 8, 8\)"):
        make_grid(torch.zeros(2, 8, 8))


def test_cli_lists_and_rejects(capsys):
    assert cli_main([]) == 0
    assert "eval" in capsys.readouterr().out
    assert cli_main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert cli_main(["env"]) == 0
    assert "torch" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ threads
def _choose(env, num_threads=0, cpus=8, local=1, on_cpu=True, launcher=None):
    from engine.threads import choose_threads

    return choose_threads(num_threads, env, cpus, local, on_cpu, launcher)


def test_thread_choice_replaces_only_a_launchers_default():
    from engine.threads import Launcher

    accelerate_argv = ("/venv/bin/python", "/venv/bin/accelerate", "launch", "recipes/sid.py")
    default = Launcher("accelerate launch", accelerate_argv, {"PATH": "/bin"})
    user_env = Launcher("accelerate launch", accelerate_argv, {"OMP_NUM_THREADS": "1"})
    user_flag = Launcher(
        "accelerate launch", (*accelerate_argv[:3], "--num_cpu_threads_per_process", "1", "x.py"), {}
    )
    user_flag_eq = Launcher(
        "accelerate launch", (*accelerate_argv[:3], "--num_cpu_threads_per_process=3"), {}
    )
    omp1 = {"OMP_NUM_THREADS": "1"}
    # accelerate's default of 1 thread: CPUs // local processes instead
    assert _choose(omp1, launcher=default).threads == 8
    assert _choose({**omp1, "LOCAL_WORLD_SIZE": "2"}, local=2, launcher=default).threads == 4
    assert _choose(omp1, cpus=2, local=4, launcher=default).threads == 1  # never 0
    assert "accelerate launch's default" in _choose(omp1, launcher=default).reason
    # the user's OMP_NUM_THREADS (to the launcher or without one) and --num_cpu_threads_per_process stand
    for launcher in (user_env, user_flag, user_flag_eq, None):
        choice = _choose(omp1, launcher=launcher)
        assert choice.threads is None and "OMP_NUM_THREADS=1" in choice.reason
    # num_threads in the config wins everywhere, also off CPU
    assert _choose(omp1, num_threads=3, launcher=default).threads == 3
    assert _choose({}, num_threads=3, on_cpu=False).threads == 3
    # on an accelerator, and for one process without OMP_NUM_THREADS, torch's default stays
    assert _choose(omp1, on_cpu=False, launcher=default).threads is None
    assert _choose({}, local=1).threads is None
    assert _choose({}, cpus=8, local=2).threads == 4  # several processes, nothing set: share the CPUs


def test_launcher_names_and_local_world_size():
    from engine.threads import launcher_name, local_world_size

    assert launcher_name(["/v/bin/python", "/v/bin/accelerate", "launch", "x.py"]) == "accelerate launch"
    assert launcher_name(["python", "-m", "accelerate.commands.launch", "x.py"]) == "accelerate launch"
    assert launcher_name(["/v/bin/python", "/v/bin/torchrun", "--nproc_per_node", "2"]) == "torchrun"
    assert launcher_name(["python", "-m", "torch.distributed.run", "x.py"]) == "torchrun"
    assert launcher_name(["/v/bin/python", "/v/bin/accelerate", "env"]) is None
    assert launcher_name(["bash", "train.sh"]) is None
    assert local_world_size({"LOCAL_WORLD_SIZE": "3"}) == 3
    assert local_world_size({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 2
    assert local_world_size({}) == 1


_FAKE_LAUNCHER = """
import os, subprocess, sys
os.environ["OMP_NUM_THREADS"] = "1"  # as torch elastic's launcher does: setenv in the launcher itself
child = "from engine.threads import parent_launcher; l = parent_launcher(); print(l.name, l.user_chose_threads)"
sys.exit(subprocess.run([sys.executable, "-c", child]).returncode)
"""


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="reads the parent's /proc entries")
@pytest.mark.parametrize("user_omp", [False, True], ids=["launcher_default", "user_value"])
def test_parent_launcher_sees_the_launchers_original_environment(tmp_path, user_omp):
    """A launcher that sets OMP_NUM_THREADS in its own os.environ leaves its /proc environ as it was started."""
    import subprocess
    import sys

    script = tmp_path / "accelerate"  # the name makes its command line look like `accelerate launch`
    script.write_text(_FAKE_LAUNCHER)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT)
    if user_omp:
        env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(
        [sys.executable, str(script), "launch"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["accelerate", "launch", str(user_omp)]


# ----------------------------------------------------------------------------------------- run_main
def test_run_main_ends_with_the_error_line(capsys, monkeypatch, tmp_path):
    from engine.launch import run_main

    def bad(argv):
        raise ValueError("config field lr=-1 must be > 0\nsecond line")

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    with pytest.raises(SystemExit) as info:
        run_main(bad)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise ValueError("config field' in err
    last = err.strip().splitlines()[-1]
    assert last == "error: ValueError: config field lr=-1 must be > 0 | second line"
    # torch elastic's failure summary reads this file (same format as its own ErrorHandler writes)
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))
    assert failure.message["message"] == last


def test_run_main_interrupt_and_system_exit(capsys):
    from engine.launch import run_main

    def interrupted(argv):
        raise KeyboardInterrupt

    def helped(argv):
        raise SystemExit(0)

    with pytest.raises(SystemExit) as info:
        run_main(interrupted)
    assert info.value.code == 130 and "interrupted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run_main(helped)
    assert info.value.code == 0 and capsys.readouterr().err == ""
    assert run_main(lambda argv: 7) is None


@pytest.mark.slow
def test_failing_recipe_script_prints_its_error_last():
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "recipes/engine_demo.py", "--max_steps", "0", "--log_with", "none"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    last = [line for line in out.stderr.splitlines() if line.strip()][-1]
    assert last == "error: ValueError: config field max_steps=0 must be >= 1"


def test_setup_is_seeded_alike_on_every_process_then_each_process_gets_its_own_stream():
    """Weights made in setup are the same on every process; noise drawn after differs; process 0's whole
    stream is the one a 1-process run always had (seed_everything(seed), no re-seed)."""
    import torch

    from engine.seeding import seed_everything, seed_setup_then_processes

    streams = {}
    for rank in (0, 1, 2):
        made = seed_setup_then_processes(7, rank, lambda: torch.randn(4))
        streams[rank] = (made, torch.randn(4))
    seed_everything(7)
    before = (torch.randn(4), torch.randn(4))
    assert all(torch.equal(streams[r][0], before[0]) for r in (1, 2))
    assert torch.equal(streams[0][1], before[1])
    assert not torch.equal(streams[1][1], streams[0][1]) and not torch.equal(streams[1][1], streams[2][1])
