"""Quality of the shipped default teacher against the number of function evaluations (NFE).

Prints one ``RESULT`` line per sampler setting (FD / precision / recall on held-out digits, fixed noise) and the
real-data floor (train images vs. held-out images), and writes a PNG plot of FD vs. NFE.

    python benchmarks/teacher_quality.py --num-samples 5000 --plot outputs/teacher_quality.png
"""

from __future__ import annotations

import argparse

from common import plot_curves, print_result, teacher_metrics

from distill.evaluation.quality import digits_evaluator

SETTINGS = [(n, "euler") for n in (1, 2, 4, 8, 18, 35)] + [(n, "heun") for n in (3, 7, 17, 35)]


def figures(metrics: dict[str, float]) -> dict[str, str]:
    """The printed metrics, 4 significant digits (classes_covered only where the evaluator reports it)."""
    return {k: f"{metrics[k]:.4g}" for k in ("fd", "precision", "recall", "classes_covered") if k in metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the unit noise every setting starts from"
    )
    parser.add_argument("--plot", default="outputs/teacher_quality.png")
    args = parser.parse_args()

    floor = digits_evaluator().real_floor()  # the 1,397 train images vs. the 400 held-out ones
    print_result(setting="real_floor_train_vs_heldout", **figures(floor))

    curves: dict[str, list[tuple[int, float]]] = {"heun": [], "euler": []}
    for nfe, used, metrics in teacher_metrics(
        args.teacher, args.num_samples, SETTINGS, seed=args.seed, verbose=False
    ):
        curves[used].append((nfe, metrics["fd"]))
        print_result(
            setting=used, nfe=nfe, **figures(metrics), ratio_to_floor=f"{metrics['fd'] / floor['fd']:.3g}"
        )

    plot_curves(
        args.plot,
        {f"teacher, {name}": sorted(points) for name, points in curves.items() if points},
        references={"real data floor (train vs held-out)": floor["fd"]},
        title="Default teacher",
        xlabel="NFE",
        xscale="log",
        panel_size=(6, 4),
    )


if __name__ == "__main__":
    main()
