"""The GPU check behind ``scripts/gpu_check.sh``: real launches of the recipes on a CUDA machine, one RESULT line
each, in well under 8 minutes. Never part of CI.

Checks (``--checks``; all by default, in this order):

    sid_1proc    bf16 full SiD, 1 process (accelerate_configs/single_gpu.yaml)
    sid_zero2    bf16 full SiD under DeepSpeed ZeRO-2 (deepspeed_zero2.yaml), all visible GPUs. If the engine
                 refuses several trained models under DeepSpeed (it did when this script was written: "DeepSpeed
                 trains one model per Accelerator"), the line says status=refused and the reflow recipe's
                 one-model distill stage runs under ZeRO-2 instead (line check=reflow_zero2).
    sid_fsdp     bf16 full SiD under FSDP (fsdp.yaml), all visible GPUs
    lora_ga      a LoRA-GA run of recipes/lora.py (model_kind unet, digits) on one GPU in fp32: the gradient
                 SVD initialisation, then a few steps
    lora_ga_bf16 the same under bf16 mixed precision (failed on CPU when written: LoRA-GA's exactness probe
                 feeds the bf16 inputs it recorded under autocast to the fp32 layer, finetune/loraga.py
                 output_change)

The SiD teacher is benchmarks/sid_memory.py's DDPM-CIFAR-10-layout ``UNet2DModel`` (32x32x3, attention at 16x16)
built from its config with random weights and saved as a teacher folder; ``--width 160`` = 55.8M parameters. The
LoRA-GA teacher is an 8x8x1 ``UNet2DModel`` (the digits task's shape) from distill/teachers/builders.py.

Each check is one ``accelerate launch`` of this file's ``run`` command, which runs the recipe's ``main`` in the
launched process and then writes that process's peak memory (``torch.cuda.max_memory_allocated``; on a CPU run the
peak resident set) to ``<output_dir>/gpu_check_peak_rank<R>.json``. The parent reads, per check:
``run_info.json`` (distributed type, processes, mixed precision, sharding), the last ``samples_per_s`` the trainer
logged to TensorBoard (a window after the first ``log_every`` steps, so start-up is not in it; all processes'
images) and the peak files (the largest over the ranks; whole run, evaluation and export included). Output:

    RESULT check=<name> status=ok|refused|failed recipe=.. processes=.. distributed_type=.. mixed_precision=..
           images_per_s=.. peak_mb=.. seconds=..  [reason=..]

    scripts/gpu_check.sh                       # on a CUDA machine
    scripts/gpu_check.sh --dry-run             # print the commands only (any machine)
    GPU_CHECK_ALLOW_CPU=1 scripts/gpu_check.sh # the same launches on CPU with tiny settings (checks the plumbing)

Exit status: 0 when every check ended ok (or refused with its stand-in ok), 1 otherwise, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
CHECKS = ("sid_1proc", "sid_zero2", "sid_fsdp", "lora_ga", "lora_ga_bf16")
#: the engine's refusal of several trained models under DeepSpeed (engine/trainer.py)
DEEPSPEED_REFUSAL = "DeepSpeed trains one model per Accelerator"
PEAK_FILE = "gpu_check_peak_rank{rank}.json"


@dataclass(frozen=True)
class Sizes:
    """Model and run sizes: ``GPU`` for the real check, ``CPU`` for the plumbing check on tiny settings."""

    width: int  # first UNet level's channels of the SiD teacher (sid_memory.build_teacher)
    digits_widths: tuple[int, ...]  # the LoRA-GA teacher's block_out_channels
    batch_size: int
    steps: int
    log_every: int
    loraga_samples: int
    eval_samples: int
    reflow_pairs: int
    timeout_s: int  # per launch


GPU = Sizes(160, (128, 256, 256), 64, 30, 10, 256, 64, 1024, 150)
CPU = Sizes(32, (32, 64), 2, 4, 2, 8, 4, 16, 600)


@dataclass
class Check:
    """One launch: ``recipe`` under ``config`` with ``processes`` processes, writing ``output_dir``."""

    name: str
    recipe: str  # module in recipes/
    config: str  # file in accelerate_configs/
    processes: int
    output_dir: Path
    args: list[str]
    train_dir: Path  # where the training stage writes run_info.json and logs/
    fallback: Check | None = None  # run when this one is refused


def build_checks(
    out: Path, sizes: Sizes, gpus: int, names: list[str] | tuple[str, ...] = CHECKS
) -> list[Check]:
    """The checks' launches (nothing is run): teachers under ``out/teachers``, one folder per check."""
    sid_teacher, digits_teacher = out / "teachers" / "sid", out / "teachers" / "digits"
    common = ["--log_with", "tensorboard", "--progress_bar", "false", "--mixed_precision", "bf16"]
    common += ["--log_every", str(sizes.log_every), "--checkpoint_every", "0", "--eval_every", "0"]

    def sid(name: str, config: str, processes: int) -> Check:
        run = out / name
        args = ["--teacher", str(sid_teacher), "--output_dir", str(run), "--student", "full"]
        args += ["--batch_size", str(sizes.batch_size), "--max_steps", str(sizes.steps)]
        args += ["--eval_samples", str(sizes.eval_samples), "--eval_metrics", "none", *common]
        return Check(name, "sid", config, processes, run, args, run)

    def reflow(name: str, config: str, processes: int) -> Check:
        """rectified_k=1: teacher ODE pairs, then the one-step student (one trained model) on them."""
        run = out / name
        args = ["--teacher", str(sid_teacher), "--output_dir", str(run), "--rectified_k", "1"]
        args += ["--num_pairs", str(sizes.reflow_pairs), "--pairs_shard_size", str(sizes.reflow_pairs // 4)]
        args += ["--pairs_batch_size", str(sizes.reflow_pairs // 4), "--pairs_nfe", "5"]
        args += ["--batch_size", str(sizes.batch_size), "--distill_steps", str(sizes.steps)]
        args += ["--eval_samples", str(sizes.eval_samples), "--eval_metrics", "none", *common]
        return Check(name, "reflow", config, processes, run, args, run / "distill")

    def lora_ga(name: str, precision: str) -> Check:
        run = out / name
        args = ["--model_kind", "unet", "--model", str(digits_teacher), "--dataset", "digits"]
        args += [
            "--method",
            "lora_ga",
            "--loraga_samples",
            str(sizes.loraga_samples),
            "--output_dir",
            str(run),
        ]
        args += ["--batch_size", str(sizes.batch_size), "--max_steps", str(sizes.steps)]
        args += ["--eval_examples", str(4 * sizes.batch_size), *common, "--mixed_precision", precision]
        return Check(name, "lora", "single_gpu.yaml", 1, run, args, run)

    builders = {
        "sid_1proc": lambda: sid("sid_1proc", "single_gpu.yaml", 1),
        "sid_zero2": lambda: replace(
            sid("sid_zero2", "deepspeed_zero2.yaml", gpus),
            fallback=reflow("reflow_zero2", "deepspeed_zero2.yaml", gpus),
        ),
        "sid_fsdp": lambda: sid("sid_fsdp", "fsdp.yaml", gpus),
        "lora_ga": lambda: lora_ga("lora_ga", "no"),
        "lora_ga_bf16": lambda: lora_ga("lora_ga_bf16", "bf16"),
    }
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise SystemExit(f"--checks {unknown}: expected some of {list(CHECKS)}")
    return [builders[n]() for n in names]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(check: Check, python: str = sys.executable, port: int | None = None) -> list[str]:
    """``accelerate launch --config_file .. --num_processes N [--main_process_port P] gpu_check.py run ..``"""
    cmd = [python, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / check.config)]
    cmd += ["--num_processes", str(check.processes)]
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    return [*cmd, str(Path(__file__).resolve()), "run", check.recipe, "--peak-dir", str(check.output_dir), "--",
            *check.args]  # fmt: skip


# ------------------------------------------------------------------------------ in the launched process
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_recipe(recipe: str, peak_dir: Path, argv: list[str]) -> None:
    """Run ``recipes.<recipe>.main(argv)`` here, then write this process's peak memory for the parent."""
    import importlib

    import torch

    sys.path.insert(0, str(ROOT))
    from engine.launch import run_main

    module = importlib.import_module(f"recipes.{recipe}")
    cuda = torch.cuda.is_available()
    sys.argv = [str(ROOT / "recipes" / f"{recipe}.py"), *argv]
    run_main(module.main)  # as the recipe's own __main__: an exception ends with its "error:" line, exit 1
    if cuda:
        torch.cuda.synchronize()
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    else:
        peak, kind = _peak_rss_mb(), "cpu_peak_rss"
    rank = int(os.environ.get("RANK", "0"))
    peak_dir.mkdir(parents=True, exist_ok=True)
    (peak_dir / PEAK_FILE.format(rank=rank)).write_text(
        json.dumps({"rank": rank, "peak_mb": peak, "kind": kind})
    )


# ----------------------------------------------------------------------------------- in the parent
def last_scalar(log_dir: Path, tag_suffix: str) -> float | None:
    """The last value of the TensorBoard scalar whose tag ends with ``tag_suffix`` under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    best: tuple[float, float] | None = None  # (wall time, value)
    for events in sorted(log_dir.rglob("events.out.tfevents*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.endswith(tag_suffix):
                for ev in acc.Scalars(tag):
                    if best is None or ev.wall_time >= best[0]:
                        best = (ev.wall_time, ev.value)
    return None if best is None else best[1]


def read_result(check: Check) -> dict[str, object]:
    """The figures of a finished launch: run_info.json, the logged images/s and the peak files."""
    info_path = check.train_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    peaks = [json.loads(p.read_text()) for p in sorted(check.output_dir.glob(PEAK_FILE.format(rank="*")))]
    figures: dict[str, object] = {
        "distributed_type": info.get("distributed_type", "unknown"),
        "processes": info.get("num_processes", "unknown"),
        "mixed_precision": info.get("mixed_precision", "unknown"),
    }
    sharding = info.get("deepspeed") or info.get("fsdp") or {}
    for key in ("zero_stage", "sharding_strategy", "fsdp_version"):
        if sharding.get(key) is not None:
            figures[key] = str(sharding[key]).replace(" ", "")
    rate = last_scalar(check.train_dir / "logs", "samples_per_s")
    figures["images_per_s"] = "unknown" if rate is None else f"{rate:.1f}"
    figures["peak_mb"] = f"{max(p['peak_mb'] for p in peaks):.0f}" if peaks else "unknown"
    if peaks:
        figures["peak_kind"] = peaks[0]["kind"]
    return figures


def error_reason(output: str) -> str:
    """The last ``error:`` line of a failed launch (the engine's run_main prints one), as one word."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]  # the engine's run_main: the recipe's own error
    errors = errors or [
        ln.split("]: ", 1)[-1] for ln in lines if re.match(r"(\[rank\d+\]: )?\w+(Error|Exception):", ln)
    ]
    text = (errors or lines or ["no output"])[-1 if not errors else 0].strip()
    return "_".join(text.split())[:160]


def result_line(**figures: object) -> str:
    return " ".join(["RESULT", *(f"{k}={v}" for k, v in figures.items())])


def run_check(check: Check, sizes: Sizes, env: dict[str, str]) -> bool:
    """Launch ``check`` (and its fallback when refused); print its RESULT line(s); True when it ended ok."""
    cmd = launch_command(check, port=free_port())
    print("+ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=sizes.timeout_s)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, output = 124, f"error: timed out after {sizes.timeout_s}s {e.stderr or ''}"
    seconds = f"{time.perf_counter() - start:.0f}"
    (check.output_dir).mkdir(parents=True, exist_ok=True)
    (check.output_dir / "launch.log").write_text(output)
    base = {"check": check.name, "recipe": check.recipe, "config": check.config}
    if code == 0:
        print(result_line(**base, status="ok", **read_result(check), seconds=seconds), flush=True)
        return True
    if check.fallback is not None and DEEPSPEED_REFUSAL in output:
        print(result_line(**base, status="refused", seconds=seconds, reason=error_reason(output)), flush=True)
        print(
            f"  {check.name} refused; running {check.fallback.name} ({check.fallback.recipe}) instead",
            flush=True,
        )
        return run_check(check.fallback, sizes, env)
    print(output[-3000:], file=sys.stderr, flush=True)
    print(result_line(**base, status="failed", seconds=seconds, reason=error_reason(output)), flush=True)
    return False


def build_teachers(out: Path, sizes: Sizes) -> None:
    """The SiD teacher (sid_memory's layout) and the 8x8x1 LoRA-GA teacher, saved as teacher folders."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from sid_memory import build_teacher

    from distill.teachers.builders import build_unet, edm_scheduler
    from distill.teachers.denoiser import Denoiser

    n = build_teacher(out / "teachers" / "sid", sizes.width)
    torch.manual_seed(0)
    unet = build_unet(8, 1, block_out_channels=sizes.digits_widths, layers_per_block=2, norm_num_groups=8)
    Denoiser(unet, edm_scheduler()).save_pretrained(out / "teachers" / "digits")
    m = sum(p.numel() for p in unet.parameters())
    print(
        f"teachers: SiD UNet2DModel 32x32x3 {n / 1e6:.1f}M parameters; LoRA-GA UNet 8x8x1 {m / 1e6:.1f}M",
        flush=True,
    )
    print(result_line(check="teachers", sid_params=n, loraga_params=m), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parent's options, or ``run RECIPE --peak-dir DIR -- RECIPE_ARGS`` inside a launch (``recipe_args``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:
        head, tail = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
        run = argparse.ArgumentParser(
            prog="gpu_check.py run", description="run one recipe, record its peak memory"
        )
        run.add_argument("command", choices=["run"])
        run.add_argument("recipe", choices=["sid", "reflow", "lora"])
        run.add_argument("--peak-dir", type=Path, required=True)
        args = run.parse_args(head)
        args.recipe_args = tail
        return args
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check", help="work folder")
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    parser.add_argument("--dry-run", action="store_true", help="print the launches only; run nothing")
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        default=os.environ.get("GPU_CHECK_ALLOW_CPU") == "1",
        help="without CUDA, run the same launches on CPU with tiny settings (also GPU_CHECK_ALLOW_CPU=1)",
    )
    parser.add_argument(
        "--sizes", choices=["auto", "gpu", "cpu"], default="auto", help="auto: gpu with CUDA, else cpu"
    )
    parser.add_argument(
        "--gpus", type=int, default=None, help="processes of the multi-GPU checks (default: all)"
    )
    args = parser.parse_args(argv)
    args.command = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "run":
        run_recipe(args.recipe, args.peak_dir, args.recipe_args)
        return 0
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not (args.allow_cpu or args.dry_run):
        print(
            "gpu_check: CUDA is not available (torch.cuda.is_available() is False): this check measures GPUs. "
            "Run it on a CUDA machine, or set GPU_CHECK_ALLOW_CPU=1 to run the same launches on CPU with tiny "
            "settings (plumbing only, no figures worth reading), or pass --dry-run to print the commands.",
            file=sys.stderr,
            flush=True,
        )
        return 2
    sizes = {"gpu": GPU, "cpu": CPU}.get(args.sizes, GPU if cuda else CPU)
    gpus = args.gpus or (torch.cuda.device_count() if cuda else 2)
    out = args.out.resolve()
    checks = build_checks(out, sizes, gpus, args.checks)
    if args.dry_run:
        for check in checks:
            for c in (check, check.fallback) if check.fallback else (check,):
                print(f"{c.name}: " + " ".join(launch_command(c)))
        return 0
    print(f"gpu_check: {'CUDA, ' + str(gpus) + ' GPU(s)' if cuda else 'CPU (GPU_CHECK_ALLOW_CPU=1), 2 processes'}; "
          f"work folder {out}", flush=True)  # fmt: skip
    if cuda:
        print(result_line(check="device", name="_".join(torch.cuda.get_device_name(0).split()), gpus=gpus))
    build_teachers(out, sizes)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if not cuda:
        env["OMP_NUM_THREADS"] = "1"
    results = [run_check(check, sizes, env) for check in checks]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
