"""Peak memory and step time of one SiD iteration: full students vs. LoRA students on one shared teacher.

The teacher is a diffusers ``UNet2DModel`` built from a config with random weights (DDPM-CIFAR-10 layout,
widened to >= 50M parameters; 32x32x3, unconditional). Each mode runs in a fresh subprocess (so peaks do not
mix) through the real recipe and engine: ``Trainer(SiDConfig(student=...), SiDRecipe)`` builds the networks,
Adam optimisers (LoRA+ groups in lora mode) and the generator EMA exactly as training does, and
``trainer.train_step()`` runs one iteration = fake-score step + generator step. One warm-up iteration (Adam
allocates its state at the first step), then ``--steps`` timed iterations.

Memory: on CUDA, ``torch.cuda.max_memory_allocated()`` over the whole run (models, optimiser state, EMA,
activations). On CPU, peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus the RSS right before the
networks are built (after imports, read from /proc/self/statm), i.e. what building and training the models
added at their peak; allocator caching makes it an upper bound of what tensors needed.

    python benchmarks/sid_memory.py --threads 1             # full, lora-r16, lora-r64
    python benchmarks/sid_memory.py --batch-size 8 --modes full lora-r16

Prints per mode: ``RESULT mode=<full|lora-r16|lora-r64> params_trained=<n> peak_mb=<x> step_s=<s>
ratio_to_full=<peak / peak of full>``.
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


def build_teacher(folder: Path, width: int) -> int:
    import torch
    from diffusers import UNet2DModel

    from distill.teachers.builders import edm_scheduler
    from distill.teachers.denoiser import Denoiser

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(width, 2 * width, 2 * width, 2 * width),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    Denoiser(unet, edm_scheduler()).save_pretrained(folder)
    return sum(p.numel() for p in unet.parameters())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from engine.trainer import Trainer
    from recipes.sid import SiDConfig, SiDRecipe

    cuda = torch.cuda.is_available()
    student, rank = ("full", 16) if args.mode == "full" else ("lora", int(args.mode.split("-r")[1]))
    config = SiDConfig(
        teacher=args.teacher,
        output_dir=str(Path(args.tmp) / args.mode),
        student=student,
        lora_rank=rank,
        lora_alpha=float(rank),
        batch_size=args.batch_size,
        max_steps=10**6,
        eval_every=0,
        eval_samples=1,
        log_with="none",
        progress_bar=False,
        mixed_precision=args.mixed_precision,
        ema_halflife_images=500.0,
    )
    rss_before = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(config, SiDRecipe(config))
    trained = {id(p): p.numel() for params in trainer._trainable.values() for p in params}
    trainer.train_step()  # warm-up: Adam state, allocator pools
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
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before  # ru_maxrss: KiB
    out = {"mode": args.mode, "params_trained": sum(trained.values()), "peak_mb": peak, "step_s": step_s}
    print("WORKER " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", default=["full", "lora-r16", "lora-r64"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--width", type=int, default=160, help="first UNet level's channels (160: ~56M params)"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed iterations after one warm-up")
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
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
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
        full = results.get("full", {}).get("peak_mb")
        for mode, r in results.items():
            print_result(
                mode=mode,
                params_trained=r["params_trained"],
                peak_mb=f"{r['peak_mb']:.1f}",
                step_s=f"{r['step_s']:.2f}",
                ratio_to_full=r["peak_mb"] / full if full else "nan",
            )


if __name__ == "__main__":
    main()
