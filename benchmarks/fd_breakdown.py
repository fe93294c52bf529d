"""Where a text-to-image student's FD gap to its teacher lies: the FD split into its mean and covariance terms,
overall and per Fashion-MNIST class, with each class's prompt alignment.

The benchmark's FD is one number; this says whether a student's samples sit in the wrong place (mean term) or
spread too little or too much (covariance term, e.g. recall lost to mode seeking), and in which classes. Each
class's samples (those prompted for it) are compared with that class's 1,000 test images, so it needs the
Fashion-MNIST files (`apt-get install dataset-fashion-mnist`); the overall figures use the shipped statistics as
`onestep eval` does, with the same prompts and noise.

    python benchmarks/fd_breakdown.py --teacher fashion-sd --teacher_steps 25 --guidance_scale 1.5 \
        --student "SiDA=outputs/sida/student" --num_samples 2000 --plot docs/figures/fd_breakdown.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import save_figure

from distill.evaluation.metrics import feature_statistics, frechet_distance_terms
from distill.evaluation.text2image import (
    eval_prompts,
    evaluate_pipeline,
    fashion_evaluator,
    fashion_test_images,
)
from distill.fashion_mnist import FASHION_CLASSES
from distill.teachers.loading import resolve_teacher_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="fashion-sd", help="teacher name or folder; 'none' to skip it")
    parser.add_argument("--teacher_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=1.5, help="the teacher's CFG scale")
    parser.add_argument(
        "--student",
        action="append",
        default=[],
        metavar="LABEL=FOLDER",
        help="an exported student folder (sampled with the steps and scale it declares); repeatable",
    )
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write a per-class bar chart of FD here")
    args = parser.parse_args(argv)
    if args.num_samples < 2 * len(FASHION_CLASSES):
        parser.error(
            f"--num_samples must be >= {2 * len(FASHION_CLASSES)} (2 per class), got {args.num_samples}"
        )
    if args.teacher_steps < 1:
        parser.error(f"--teacher_steps must be >= 1, got {args.teacher_steps}")
    # (label, model, sampler settings): the teacher at --teacher_steps / --guidance_scale, students as they declare
    models = (
        []
        if args.teacher == "none"
        else [("teacher", args.teacher, (args.teacher_steps, args.guidance_scale))]
    )
    for spec in args.student:
        label, sep, folder = spec.partition("=")
        label = label.strip()
        if not sep or not label or not folder.strip():
            parser.error(f"--student takes LABEL=FOLDER, got {spec!r}")
        if not Path(folder).is_dir():
            parser.error(f"--student {label!r}: no folder at {folder!r}")
        if label in [m[0] for m in models]:
            parser.error(
                f"--student {spec!r}: the label {label!r} is taken (labels name the rows of the results)"
            )
        models.append((label, folder, (None, None)))
    if not models:
        parser.error("nothing to evaluate: give --student LABEL=FOLDER or a --teacher")
    args.models = models
    return args


def class_statistics(features: torch.Tensor, labels: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Mean and covariance of the features of each class's rows."""
    return [feature_statistics(features[labels == c]) for c in range(len(FASHION_CLASSES))]


def breakdown(
    features: torch.Tensor,
    predicted: torch.Tensor,
    prompted: torch.Tensor,
    reference: tuple[np.ndarray, np.ndarray],
    class_reference: list[tuple[np.ndarray, np.ndarray]],
) -> dict[str, object]:
    """Overall FD terms against ``reference`` and, per prompted class, FD terms against that class's
    reference and the share of its samples classified as it (alignment)."""
    overall = frechet_distance_terms(*reference, *feature_statistics(features))
    per_class = []
    for c, stats in enumerate(class_reference):
        rows = prompted == c
        terms = frechet_distance_terms(*stats, *feature_statistics(features[rows]))
        per_class.append({**terms, "align": float((predicted[rows] == c).float().mean())})
    return {**overall, "align": float((predicted == prompted).float().mean()), "classes": per_class}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    evaluator = fashion_evaluator()
    test_images, test_labels = fashion_test_images()  # before any sampling: a missing package fails at once
    test_features, _, _ = evaluator.features(evaluator.check_images(test_images))
    class_reference = class_statistics(test_features, test_labels)
    reference = (evaluator.reference_mu, evaluator.reference_sigma)
    _, prompted = eval_prompts(args.num_samples)
    results = {}
    for label, model, (steps, scale) in args.models:
        _, images = evaluate_pipeline(
            resolve_teacher_path(model),
            num_samples=args.num_samples,
            seed=args.seed,
            num_inference_steps=steps,
            guidance_scale=scale,
            heldout=False,
            progress_bar=False,
        )
        features, _, predicted = evaluator.features(evaluator.check_images(images))
        result = breakdown(features, predicted, torch.as_tensor(prompted), reference, class_reference)
        results[label] = result
        print(
            f"RESULT model={label} fd={result['fd']:.3f} fd_mean={result['fd_mean']:.3f} "
            f"fd_covariance={result['fd_covariance']:.3f} align={result['align']:.4f} num_samples={args.num_samples}"
        )
    header = "| class | " + " | ".join(f"{m} FD (mean + cov) | {m} align" for m in results) + " |"
    print(header)
    print("|" + " --- |" * (1 + 2 * len(results)))
    for c, name in enumerate(FASHION_CLASSES):
        cells = []
        for result in results.values():
            row = result["classes"][c]
            cells.append(
                f"{row['fd']:.1f} ({row['fd_mean']:.1f} + {row['fd_covariance']:.1f}) | {row['align']:.3f}"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.plot:
        plot(results, args.plot)
    return 0


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(results)
    x = np.arange(len(FASHION_CLASSES))
    for i, (label, result) in enumerate(results.items()):
        means = [row["fd_mean"] for row in result["classes"]]
        covs = [row["fd_covariance"] for row in result["classes"]]
        bars = ax.bar(x + i * width, means, width, label=f"{label}: mean term")
        ax.bar(
            x + i * width,
            covs,
            width,
            bottom=means,
            color=bars[0].get_facecolor(),
            alpha=0.45,
            label=f"{label}: covariance term",
        )
    ax.set_xticks(x + width * (len(results) - 1) / 2, FASHION_CLASSES, rotation=30, ha="right")
    ax.set_ylabel("FD against the class's test images")
    ax.set_title("Per-class FD, split into mean and covariance terms")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
