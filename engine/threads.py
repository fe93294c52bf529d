"""CPU threads per process: replace a launcher's default thread count, keep one the user chose.

How the launchers set ``OMP_NUM_THREADS`` (accelerate 1.x: ``_validate_launch_command`` in
accelerate/commands/launch.py, ``prepare_simple_launcher_cmd_env`` / ``prepare_multi_gpu_env`` in
accelerate/utils/launch.py; torch: ``config_from_args`` in torch/distributed/run.py):

- ``accelerate launch`` without ``--num_cpu_threads_per_process`` takes ``OMP_NUM_THREADS`` from its own
  environment, or else 1 (with ``--cpu``: physical cores / local processes when that is above 1), and always
  exports the result as ``OMP_NUM_THREADS`` to every process it starts. On a CPU machine launched without
  ``--cpu`` (the README's ``accelerate launch recipes/sid.py``) torch then runs on 1 thread of N cores.
- ``torchrun --nproc_per_node N>1`` sets ``OMP_NUM_THREADS=1`` when it is unset.

The started process cannot tell these defaults from a user's value by its own environment: the launchers
leave no marker. The trace is in the launcher process, our parent: its command line (for
``--num_cpu_threads_per_process``) and its *original* environment, ``/proc/<ppid>/environ``. That file holds
the environment the launcher was started with; the launchers add ``OMP_NUM_THREADS`` to a copy
(``subprocess.Popen(env=...)``) or to ``os.environ`` (setenv, torch elastic), neither of which changes it. So:

- ``num_threads > 0`` in the config: exactly that many, on any device.
- not on CPU: torch's default is left alone (the accelerator does the work).
- ``OMP_NUM_THREADS`` set, and the parent is ``accelerate launch``/torchrun which was started without it and
  without ``--num_cpu_threads_per_process``: the launcher's default, replaced by CPUs // local processes.
- ``OMP_NUM_THREADS`` set in any other way (the user's environment, ``tests/launch_utils.py``, a launcher
  started with it, or a parent whose environment cannot be read): respected.
- ``OMP_NUM_THREADS`` unset: torch's own default (all cores) for one process per machine, CPUs // local
  processes for several; a count set in-process with ``torch.set_num_threads`` before the run stands.

More threads pay only on CPUs with nothing else to do: on a 2-core machine busy with other jobs, SiD on the
digits teacher ran at 4.9-15 s per iteration with 2 threads against 1.1-1.4 s with 1 (OpenMP threads wait for
each other); on an idle machine 2 threads took 0.6 s against 1.0 s with 1. ``num_threads: 1`` is the remedy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

_ACCELERATE_FLAG = "--num_cpu_threads_per_process"


@dataclass(frozen=True)
class Launcher:
    """A launcher parent process: its name, command line and the environment it was started with."""

    name: str
    argv: tuple[str, ...]
    environ: Mapping[str, str]

    @property
    def user_chose_threads(self) -> bool:
        flag = any(a == _ACCELERATE_FLAG or a.startswith(_ACCELERATE_FLAG + "=") for a in self.argv)
        return "OMP_NUM_THREADS" in self.environ or flag


@dataclass(frozen=True)
class ThreadChoice:
    threads: int | None  # None: leave torch's thread count as it is
    reason: str


def launcher_name(argv: Sequence[str]) -> str | None:
    """'accelerate launch' or 'torchrun' when ``argv`` is one of those launchers' command lines."""
    names = [os.path.basename(a) for a in argv[:4]]
    for i, name in enumerate(names):
        if name in ("accelerate-launch", "accelerate.commands.launch"):
            return "accelerate launch"
        if name == "accelerate" and i + 1 < len(argv) and argv[i + 1] == "launch":
            return "accelerate launch"
        if name == "accelerate.commands.accelerate_cli" and "launch" in argv[i + 1 : i + 2]:
            return "accelerate launch"
        if name in ("torchrun", "torch.distributed.run", "torch.distributed.launch"):
            return "torchrun"
    return None


def parent_launcher(ppid: int | None = None) -> Launcher | None:
    """The parent process as a :class:`Launcher` when it is accelerate launch or torchrun (Linux /proc), else None."""
    ppid = os.getppid() if ppid is None else ppid
    try:
        argv = [
            a.decode(errors="replace") for a in Path(f"/proc/{ppid}/cmdline").read_bytes().split(b"\0") if a
        ]
        name = launcher_name(argv)
        if name is None:
            return None
        raw = Path(f"/proc/{ppid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    environ = dict(e.decode(errors="replace").split("=", 1) for e in raw if b"=" in e)
    return Launcher(name, tuple(argv), environ)


def local_world_size(env: Mapping[str, str]) -> int:
    """Processes on this machine: torch elastic's LOCAL_WORLD_SIZE, an MPI launcher's local size, else 1."""
    for key in (
        "LOCAL_WORLD_SIZE",
        "MPI_LOCALNRANKS",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MV2_COMM_WORLD_LOCAL_SIZE",
    ):
        if env.get(key, "").isdigit() and int(env[key]) > 0:
            return int(env[key])
    return 1


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which taskset and container cpusets narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def choose_threads(
    num_threads: int,
    env: Mapping[str, str],
    cpus: int,
    local_processes: int,
    on_cpu: bool,
    launcher: Launcher | None,
) -> ThreadChoice:
    """The torch thread count for this process and why (the rules are in the module docstring)."""
    if num_threads > 0:
        return ThreadChoice(num_threads, f"num_threads={num_threads} from the config")
    if not on_cpu:
        return ThreadChoice(None, "torch's count kept: the work runs on the accelerator")
    local_processes = max(1, local_processes)
    auto = max(1, cpus // local_processes)
    share = f"{cpus} CPUs / {local_processes} process{'es' if local_processes > 1 else ''} on this machine"
    omp = env.get("OMP_NUM_THREADS")
    if omp is None:
        if local_processes == 1:
            return ThreadChoice(None, "torch's count kept: OMP_NUM_THREADS is not set, one process")
        return ThreadChoice(auto, f"automatic: {share}")
    if launcher is not None and not launcher.user_chose_threads:
        return ThreadChoice(
            auto,
            f"automatic: {share}; OMP_NUM_THREADS={omp} was {launcher.name}'s default, not yours; set "
            f"OMP_NUM_THREADS, {_ACCELERATE_FLAG} or num_threads to choose",
        )
    source = f"your choice at {launcher.name}" if launcher is not None else "from the environment"
    return ThreadChoice(None, f"OMP_NUM_THREADS={omp}, {source}")


def configure_threads(num_threads: int, on_cpu: bool) -> str:
    """Apply :func:`choose_threads` to this process; returns ``'N torch threads per process (reason)'``."""
    env = os.environ
    launcher = parent_launcher() if "OMP_NUM_THREADS" in env and num_threads <= 0 and on_cpu else None
    choice = choose_threads(num_threads, env, available_cpus(), local_world_size(env), on_cpu, launcher)
    if choice.threads is not None and choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)
    n = torch.get_num_threads()
    return f"{n} torch thread{'s' if n > 1 else ''} per process ({choice.reason})"
