"""Quality of the shipped default teacher against the number of function evaluations (NFE).

Prints one ``RESULT`` line per sampler setting (FD / precision / recall on held-out digits, fixed noise) and the
real-data floor (train images vs. held-out images), and writes a PNG plot of FD vs. NFE.

    python benchmarks/teacher_quality.py --num-samples 5000 --plot outputs/teacher_quality.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from distill.evaluation.quality import digits_evaluator, metrics_for
from distill.sampling.ode import sample
from distill.teachers.loading import load_teacher

SETTINGS = [("euler", n) for n in (1, 2, 4, 8, 18, 35)] + [("heun", n) for n in (3, 7, 17, 35)]


def fmt(metrics: dict[str, float]) -> str:
    return " ".join(
        f"{k}={metrics[k]:.4g}" for k in ("fd", "precision", "recall", "classes_covered") if k in metrics
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="outputs/teacher_quality.png")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    teacher = load_teacher(args.teacher).eval()

    floor = digits_evaluator().real_floor()  # the 1,397 train images vs. the 400 held-out ones
    print(f"RESULT setting=real_floor train_vs_heldout {fmt(floor)}", flush=True)

    curves: dict[str, list[tuple[int, float]]] = {"heun": [], "euler": []}
    for method, nfe in SETTINGS:
        result = sample(
            teacher,
            args.num_samples,
            nfe=nfe,
            method=method,
            batch_size=1000,
            generator=torch.Generator().manual_seed(args.seed),
        )
        metrics = metrics_for(result.images.clamp(-1, 1))
        used = "heun" if method == "heun" and nfe > 1 else "euler"
        curves[used].append((result.nfe, metrics["fd"]))
        print(
            f"RESULT setting={used} nfe={result.nfe} {fmt(metrics)} ratio_to_floor={metrics['fd'] / floor['fd']:.3g}",
            flush=True,
        )

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[plots]')")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=f"teacher, {name}")
    ax.axhline(floor["fd"], color="k", ls="--", label="real data floor (train vs held-out)")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="NFE",
        ylabel="FD (digits classifier features)",
        title="Default teacher",
    )
    ax.legend()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
