"""Peak memory and step time of one SiD iteration under the recipe's memory options, side by side in one run.

Modes (``--modes``; the default is the first three):

    full_fp32        full students, fp32 teacher, torch Adam                    (SiD as published)
    full_lowmem      full students + teacher_dtype=bf16 + gradient_checkpointing + optimizer=adam8bit
    lora_r16_ckpt    LoRA r16 students on one shared fp32 teacher + gradient_checkpointing
    lora_r16         LoRA r16, no checkpointing
    lora_r64         LoRA r64, no checkpointing
    full_lowmem_ema_cpu   full_lowmem + ema_device=cpu (only differs from full_lowmem on a GPU)

The teacher is a diffusers ``UNet2DModel`` built from a config with random weights (DDPM-CIFAR-10 layout:
channels (w, 2w, 2w, 2w), two layers per block, attention at 16x16; ``--width 128`` = 35.7M parameters;
32x32x3, unconditional, EDM scheduler). Each mode runs in a fresh subprocess (peaks do not mix) through the real
recipe and engine: ``Trainer(SiDConfig(...), SiDRecipe)`` builds the networks, optimisers (LoRA+ groups in lora
modes) and G's EMA exactly as training does, and ``trainer.train_step()`` runs one iteration = fake-score step +
generator step. One warm-up iteration (the optimisers allocate their state at their first step), then
``--steps`` timed iterations.

Memory (``peak_mb``): what the training iterations held at their peak, above the process before the networks
were built: models, gradients, optimiser state, EMA and activations (setup's transients, such as the fp32
teacher kept for copying before it is cast, are not counted, as on a GPU they stay in host memory).
  * CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` at the end of setup.
  * CPU: the kernel's peak resident set (VmHWM in /proc/self/status) after resetting it at the end of setup
    (``echo 5 > /proc/self/clear_refs``), minus the resident set right before the networks were built. The
    workers run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every tensor of 64 KiB or more from its
    own mapping and returns it on free (its default threshold adapts upwards to 32 MiB and then keeps freed
    tensors in the heap, which would make RSS remember memory that no tensor holds any more). Small
    allocations and allocator fragmentation still count, so the CPU figure is an upper bound of live tensors.
If the kernel refuses the reset, the whole run's peak (``ru_maxrss``) is used and the line says ``peak=run``.

    OMP_NUM_THREADS=1 python benchmarks/sid_memory.py                     # full_fp32, full_lowmem, lora_r16_ckpt
    python benchmarks/sid_memory.py --batch-size 8 --modes full_fp32 lora_r16 lora_r64

Prints per mode: ``RESULT mode=<mode> params_trained=<n> peak_mb=<x> step_s=<s> ratio_to_full=<peak / peak of
full_fp32>`` (ratio nan when full_fp32 was not run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_result

ROOT = Path(__file__).resolve().parents[1]

#: each mode's SiDConfig settings
MODES: dict[str, dict[str, object]] = {
    "full_fp32": {"student": "full"},
    "full_lowmem": {
        "student": "full",
        "teacher_dtype": "bf16",
        "gradient_checkpointing": True,
        "optimizer": "adam8bit",
    },
    "full_lowmem_ema_cpu": {
        "student": "full",
        "teacher_dtype": "bf16",
        "gradient_checkpointing": True,
        "optimizer": "adam8bit",
        "ema_device": "cpu",
    },
    "lora_r16_ckpt": {"student": "lora", "lora_rank": 16, "lora_alpha": 16.0, "gradient_checkpointing": True},
    "lora_r16": {"student": "lora", "lora_rank": 16, "lora_alpha": 16.0},
    "lora_r64": {"student": "lora", "lora_rank": 64, "lora_alpha": 64.0},
}
DEFAULT_MODES = ["full_fp32", "full_lowmem", "lora_r16_ckpt"]


def cifar_unet(width: int):
    """The benchmark teacher's network: a DDPM-CIFAR-10-layout ``UNet2DModel`` (32x32x3, attention at 16x16;
    35.7M parameters at width 128), random weights."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(width, 2 * width, 2 * width, 2 * width),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


def build_teacher(folder: Path, width: int) -> int:
    import torch

    from distill.teachers.builders import edm_scheduler
    from distill.teachers.denoiser import Denoiser

    torch.manual_seed(0)
    unet = cifar_unet(width)
    Denoiser(unet, edm_scheduler()).save_pretrained(folder)
    return sum(p.numel() for p in unet.parameters())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from engine.trainer import Trainer
    from recipes.sid import SiDConfig, SiDRecipe

    cuda = torch.cuda.is_available()
    config = SiDConfig(
        teacher=args.teacher,
        output_dir=str(Path(args.tmp) / args.mode),
        batch_size=args.batch_size,
        max_steps=10**6,
        eval_every=0,
        eval_samples=1,
        log_with="none",
        progress_bar=False,
        mixed_precision=args.mixed_precision,
        ema_halflife_images=500.0,
        **MODES[args.mode],
    )
    rss_before = _rss_mb()
    trainer = Trainer(config, SiDRecipe(config))
    trained = {id(p): p.numel() for params in trainer._trainable.values() for p in params}
    if cuda:
        torch.cuda.synchronize()
        base = 0.0
        torch.cuda.reset_peak_memory_stats()
        peak_kind = "train"
    else:
        base = rss_before
        peak_kind = "train" if _reset_peak_rss() else "run"
    trainer.train_step()  # warm-up: optimiser state, allocator pools
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / args.steps
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    elif peak_kind == "train":
        peak = _peak_rss_mb() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base  # ru_maxrss: KiB
    out = {
        "mode": args.mode,
        "params_trained": sum(trained.values()),
        "peak_mb": peak,
        "peak": peak_kind,
        "step_s": step_s,
    }
    print("WORKER " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=sorted(MODES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--width", type=int, default=128, help="first UNet level's channels (128: 35.7M params, 160: 55.8M)"
    )
    parser.add_argument("--steps", type=int, default=1, help="timed iterations after one warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher"
        n_params = build_teacher(teacher, args.width)
        print(
            f"teacher: UNet2DModel 32x32x3, {n_params / 1e6:.1f}M parameters; batch {args.batch_size}",
            flush=True,
        )
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "PYTHONPATH": str(ROOT),
            "MALLOC_MMAP_THRESHOLD_": "65536",
        }
        results = {}
        for mode in args.modes:
            cmd = [
                sys.executable, __file__, "--worker", "--mode", mode, "--teacher", str(teacher), "--tmp", tmp,
                "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--threads", str(args.threads),
                "--mixed-precision", args.mixed_precision,
            ]  # fmt: skip
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("WORKER ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(
                    f"{mode} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
                )
            results[mode] = json.loads(lines[-1].removeprefix("WORKER "))
        full = results.get("full_fp32", {}).get("peak_mb")
        for mode, r in results.items():
            print_result(
                mode=mode,
                params_trained=r["params_trained"],
                peak_mb=f"{r['peak_mb']:.1f}",
                step_s=f"{r['step_s']:.2f}",
                ratio_to_full=r["peak_mb"] / full if full else "nan",
                **({"peak": "run"} if r["peak"] == "run" else {}),
            )


if __name__ == "__main__":
    main()
