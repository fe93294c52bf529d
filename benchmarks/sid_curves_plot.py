"""In-training FD against images seen, for any number of SiD / SiDA runs (stages of one chain or rival settings).

The recipes log each in-training evaluation to TensorBoard as ``eval/fd`` (the EMA generator) and, with
``eval_raw_generator=true``, ``eval/raw_fd`` (its raw weights), next to ``images_seen``. This reads those logs from
each run's ``logs/`` folder, prints every evaluation and each run's best, and plots FD against images seen: one
colour per run, EMA solid, raw weights dashed, optional horizontal reference lines (e.g. the teacher's FD). A
resumed run's images continue from its checkpoint's, so the stages of one chain line up on one axis.

    python benchmarks/sid_curves_plot.py --run "SiDA, lr decay=outputs/sida_a" --run "SiDA, batch 64=outputs/sida_b" \
        --reference "teacher, 25 steps=14.6" --plot docs/figures/sid_text2image_sida_curves.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import save_figure


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard logs as ``tag -> [(step, value), ...]`` sorted by step (a tag
    logged by several event files, as a run resumed into its own folder writes, is merged in file-name order,
    which TensorBoard makes the start-time order; the last write of a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = run_dir / "logs"
    files = sorted(logs.rglob("events.out.tfevents.*")) if logs.is_dir() else []
    if not files:
        raise SystemExit(
            f"run {str(run_dir)!r} has no TensorBoard events under {str(logs)!r} (log_with=tensorboard)"
        )
    merged: dict[str, dict[int, float]] = {}
    for path in files:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            for event in events.Scalars(tag):
                merged.setdefault(tag, {})[event.step] = event.value
    return {tag: sorted(values.items()) for tag, values in merged.items()}


def images_at(scalars: dict[str, list[tuple[int, float]]], steps: list[int]) -> np.ndarray:
    """Images seen at each step: ``images_seen`` where logged, linear between log steps (a constant batch), and
    outside the logged steps at the nearest batch size (a resumed run evaluates before its first log step, and
    a run's final evaluation falls after its last)."""
    seen = scalars.get("images_seen")
    if not seen:
        raise SystemExit("the run's logs have no 'images_seen' scalar")
    known_steps, known_images = (np.asarray(column, dtype=float) for column in zip(*seen))
    at = np.asarray(steps, dtype=float)
    images = np.interp(at, known_steps, known_images)
    if len(known_steps) > 1:
        for end, inner, outside in ((-1, -2, at > known_steps[-1]), (0, 1, at < known_steps[0])):
            per_step = (known_images[end] - known_images[inner]) / (known_steps[end] - known_steps[inner])
            images[outside] = known_images[end] + (at[outside] - known_steps[end]) * per_step
    return images


def parse_pair(text: str, what: str) -> tuple[str, str]:
    label, _, value = text.rpartition("=")
    if not label.strip() or not value.strip():
        raise SystemExit(f"{what} {text!r} must be LABEL=VALUE, both non-empty")
    return label, value


def parse_reference(text: str) -> tuple[str, float]:
    label, value = parse_pair(text, "--reference")
    try:
        return label, float(value)
    except ValueError:
        raise SystemExit(f"--reference {text!r}: {value!r} is not a number (LABEL=FD)") from None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (repeat)")
    parser.add_argument(
        "--reference", action="append", default=[], help="LABEL=FD, a horizontal line (repeat)"
    )
    parser.add_argument("--plot", default="outputs/sid_curves.png")
    args = parser.parse_args()
    runs = [parse_pair(text, "--run") for text in args.run]
    references = [parse_reference(text) for text in args.reference]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for index, (label, folder) in enumerate(runs):
        scalars = read_scalars(Path(folder))
        colour = f"C{index}"
        for tag, style in (("eval/fd", "-"), ("eval/raw_fd", "--")):
            points = scalars.get(tag, [])
            if not points:
                continue
            steps, fd = (list(column) for column in zip(*points))
            images = images_at(scalars, steps)
            which = "EMA" if tag == "eval/fd" else "raw G"
            best = int(np.argmin(fd))
            print(f"{label} ({which}): " + " ".join(f"{int(i)}:{v:.1f}" for i, v in zip(images, fd)))
            print(
                f"{label} ({which}): best FD {fd[best]:.2f} at {int(images[best])} images (step {steps[best]})"
            )
            ax.plot(images / 1000, fd, style, color=colour, marker="o", ms=3, label=f"{label} ({which})")
    for label, value in references:
        ax.axhline(value, color="0.4", lw=1, ls=":")
        ax.annotate(
            label,
            (0, value),
            xycoords=("axes fraction", "data"),
            xytext=(4, 3),
            textcoords="offset points",
            fontsize=7,
        )
    ax.set_xlabel("images seen (thousands)")
    ax.set_ylabel("in-training FD (classifier features)")
    ax.legend(fontsize=7)
    ax.set_title("SiD / SiDA in-training FD", fontsize=9)
    save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
