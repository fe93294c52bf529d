"""One SiD iteration's time against the sum of the network passes it needs, each timed alone.

An iteration through the real recipe and engine (``trainer.train_step()``: fake-score step, then generator step,
with the engine's gradient handling, both Adam steps and G's EMA update) needs these passes:

    fake-score step   g_sample      G forward without grad (x_g = G(sigma_init z))
                      fake_train    f_psi forward + backward into its weights (its denoising loss)
    generator step    g_train       G forward with grad + backward into its weights
                      teacher       teacher forward at x_t + backward into x_t (weights frozen)
                      fake_eval     f_psi forward at x_t + backward into x_t (its weights not trained here)

Each pass is timed alone on the trainer's own networks (the same G, f_psi and teacher objects, same batch and
shapes), with an arbitrary upstream gradient for the backward passes. ``ratio_to_passes`` = iteration time / sum
of the passes: what the recipe and engine add around the networks (noise draws, losses, two Adam steps, the EMA
update, gradient checks, phase switching). Rounds are interleaved (iteration, then every pass) and the median of
each is taken, so a load change on a shared machine hits both sides.

The teacher is the DDPM-CIFAR-10-layout ``UNet2DModel`` of benchmarks/sid_memory.py (``--width 64``: 9.0M
parameters by default here, to keep the run near a minute on one CPU thread), random weights, EDM scheduler.

    OMP_NUM_THREADS=1 python benchmarks/sid_step_efficiency.py
    python benchmarks/sid_step_efficiency.py --width 128 --batch-size 8 --rounds 5

Prints per pass ``pass=<name> seconds=<median>`` and ``RESULT ratio_to_passes=<r> iteration_s=<s> passes_s=<s>``
(target <= 1.15).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import print_result
from sid_memory import build_teacher


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=64, help="first UNet level's channels (64: 9.0M params)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from engine.trainer import Trainer
    from recipes.sid import SiDConfig, SiDRecipe

    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_teacher(Path(tmp) / "teacher", args.width)
        config = SiDConfig(
            teacher=str(Path(tmp) / "teacher"),
            output_dir=str(Path(tmp) / "run"),
            batch_size=args.batch_size,
            max_steps=10**6,
            eval_every=0,
            eval_samples=1,
            log_with="none",
            progress_bar=False,
            ema_halflife_images=500.0,
        )
        trainer = Trainer(config, SiDRecipe(config))
        print(
            f"teacher: UNet2DModel 32x32x3, {n_params / 1e6:.1f}M parameters; batch {args.batch_size}; "
            f"{args.threads} thread(s); {args.rounds} rounds",
            flush=True,
        )
        unwrap = trainer.accelerator.unwrap_model
        g, f = unwrap(trainer.trained["generator"].module), unwrap(trainer.trained["fake_score"].module)
        teacher = trainer.frozen["teacher"]
        device, n = trainer.device, args.batch_size
        shape = trainer.recipe.shape
        z = torch.randn(n, *shape, device=device)
        sigma_init = torch.full((n,), config.step_sigmas[0], device=device)
        sigma = torch.full((n,), 1.0, device=device)
        upstream = torch.randn(n, *shape, device=device)

        def g_sample() -> None:
            with torch.no_grad():
                g(sigma_init.view(-1, 1, 1, 1) * z, sigma_init)

        def weights_pass(model: torch.nn.Module, x: torch.Tensor, s: torch.Tensor) -> None:
            model.requires_grad_(True)
            model(x, s).backward(upstream)
            model.zero_grad(set_to_none=True)

        def input_pass(model: torch.nn.Module) -> None:
            flags = [p.requires_grad for p in model.parameters()]
            model.requires_grad_(False)
            x_t = (z * sigma.view(-1, 1, 1, 1)).requires_grad_(True)
            model(x_t, sigma).backward(upstream)
            for p, flag in zip(model.parameters(), flags, strict=True):
                p.requires_grad_(flag)

        passes: dict[str, Callable[[], None]] = {
            "g_sample": g_sample,
            "fake_train": lambda: weights_pass(f, z * sigma.view(-1, 1, 1, 1), sigma),
            "g_train": lambda: weights_pass(g, sigma_init.view(-1, 1, 1, 1) * z, sigma_init),
            "teacher": lambda: input_pass(teacher),
            "fake_eval": lambda: input_pass(f),
        }
        times: dict[str, list[float]] = {name: [] for name in ["iteration", *passes]}
        for round_ in range(args.rounds + 1):  # round 0 warms up (Adam state, allocator)
            iteration = timed(trainer.train_step)
            alone = {name: timed(fn) for name, fn in passes.items()}
            if round_:
                times["iteration"].append(iteration)
                for name, t in alone.items():
                    times[name].append(t)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        for name in passes:
            print(f"pass={name} seconds={medians[name]:.3f}", flush=True)
        passes_s = sum(medians[name] for name in passes)
        print_result(
            ratio_to_passes=medians["iteration"] / passes_s,
            iteration_s=medians["iteration"],
            passes_s=passes_s,
        )


if __name__ == "__main__":
    main()
