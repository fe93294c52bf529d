"""Distil the default digits teacher with SiD for M minutes of wall time and compare with the teacher.

Measures the teacher's FD at 1, 4 and 35 NFE (Euler 1 and 4, Heun 35) and the EMA generator's FD along the run
(one step, or k with ``student_sigmas``), all on the same number of samples with fixed evaluation noise against
the held-out digits. Prints ``RESULT teacher_fd=.. student_fd=.. ratio=.. images=..`` (student_fd = the last
evaluation; the best one and the student's step count, student_nfe, are printed too) and writes a PNG of FD vs.
generated images seen with the teacher's figures as horizontal lines.

    python benchmarks/sid_digits.py --minutes 30
    python benchmarks/sid_digits.py --minutes 30 --student lora
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from distill.evaluation.quality import evaluate_sampler
from distill.teachers.loading import load_teacher
from engine.config import parse_config
from engine.trainer import Trainer
from recipes.sid import SiDConfig, SiDRecipe

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def override_args(pairs: list[str]) -> list[str]:
    """``key=value`` pairs as ``--key value...`` arguments (a list value is space-separated)."""
    args = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"override {pair!r} must look like key=value, e.g. alpha=1.2")
        args += [f"--{key}", *value.split()]
    return args


def teacher_reference(num_samples: int) -> dict[int, float]:
    teacher = load_teacher("default").eval()
    out = {}
    for nfe, method in ((1, "euler"), (4, "euler"), (35, "heun")):
        metrics, _ = evaluate_sampler(teacher, num_samples, nfe=nfe, method=method, seed=1)
        out[nfe] = metrics["fd"]
        print(
            f"teacher nfe={nfe} ({method}) fd={metrics['fd']:.3f} precision={metrics['precision']:.3f} "
            f"recall={metrics['recall']:.3f}",
            flush=True,
        )
    return out


def plot(history: list[dict[str, float]], teacher: dict[int, float], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [h["images_seen"] for h in history]
    ax.plot(xs, [h["fd"] for h in history], marker="o", label="SiD one-step generator (EMA)")
    for (nfe, fd), color in zip(sorted(teacher.items()), ("tab:red", "tab:orange", "tab:green")):
        ax.axhline(fd, ls="--", color=color, label=f"teacher, {nfe} NFE")
    ax.set(
        yscale="log", xlabel="generated images seen", ylabel="FD (digits classifier features)", title=title
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--student", choices=["full", "lora"], default="full")
    parser.add_argument("--eval-samples", type=int, default=5000)
    parser.add_argument("--eval-every", type=int, default=200, help="SiD iterations between evaluations")
    parser.add_argument("--output-dir", default="outputs/bench_sid_digits")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="SiD config overrides on top of recipes/configs/sid_(lora_)digits.yaml, e.g. alpha=1.2 "
        "student_sigmas='2.5 0.8'",
    )
    args = parser.parse_args()

    # the recipe's own digits config, so the benchmark measures what README's commands run
    config_file = CONFIGS / ("sid_lora_digits.yaml" if args.student == "lora" else "sid_digits.yaml")
    fixed = dict(
        output_dir=args.output_dir,
        max_steps=10**9,
        max_minutes=args.minutes,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
        log_every=50,
        checkpoint_every=0,
    )
    argv = ["--config", str(config_file)]
    for key, value in fixed.items():
        argv += [f"--{key}", str(value)]
    argv += override_args(args.overrides)  # last, so the user's overrides win
    config = parse_config(SiDConfig, argv)  # bad keys or values fail here, before the teacher is measured
    teacher = teacher_reference(args.eval_samples)
    start = time.perf_counter()
    trainer = Trainer(config, SiDRecipe(config))
    trainer.fit()
    minutes = (time.perf_counter() - start) / 60
    history = trainer.recipe.quality.history
    last, best = history[-1], min(history, key=lambda h: h["fd"])
    for h in history:
        print(
            f"  images={int(h['images_seen'])} step={int(h['step'])} fd={h['fd']:.3f} "
            f"precision={h['precision']:.3f} recall={h['recall']:.3f}"
        )
    student_nfe = len(config.student_sigmas)  # 1 unless student_sigmas asks for a few-step student
    tag = f"SiD ({args.student}, {student_nfe}-step) on the default digits teacher, {args.minutes:g} min"
    plot(history, teacher, Path(args.output_dir) / "fd_vs_images.png", tag)
    print(
        f"wall minutes={minutes:.1f} steps={trainer.step} best_fd={best['fd']:.3f} at images={int(best['images_seen'])}"
    )
    print(
        f"RESULT teacher_fd={teacher[35]:.3f} student_fd={last['fd']:.3f} ratio={last['fd'] / teacher[35]:.3f} "
        f"images={trainer.images_seen} best_student_fd={best['fd']:.3f} teacher_fd_1nfe={teacher[1]:.3f} "
        f"student_nfe={student_nfe}"
    )


if __name__ == "__main__":
    main()
