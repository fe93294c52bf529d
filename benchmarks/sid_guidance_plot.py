"""SiD-LSG's guidance trade-off from ``benchmarks/sid_text2image.py`` runs: FD vs. prompt alignment per scale.

SiD-LSG reports its students at several guidance scales (low kappa: best FID, high: best CLIP score); this reads
the ``RESULT`` lines of any number of ``sid_text2image.py`` logs (one run per scale and student kind), prints
them as one table sorted by teacher, student kind and scale, and plots FD against alignment with the teacher
(25 steps of its own sampler at the same CFG) and the one-step student of each run, a line from the one to the
other, a colour per teacher (SD-format UNet, flow PixArt).

    python benchmarks/sid_guidance_plot.py run_g1.5.log run_g2.log run_g3.log --plot docs/figures/sid_text2image_guidance.png
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from common import save_figure


def read_results(paths: list[Path]) -> list[dict[str, str]]:
    """Every ``RESULT teacher=..`` line of the logs as a dict (key=value pairs), with the log's name."""
    rows = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"log {str(path)!r} does not exist")
        for line in path.read_text().splitlines():
            if line.startswith("RESULT ") and " teacher_fd=" in line:
                pairs = dict(item.split("=", 1) for item in shlex.split(line)[1:] if "=" in item)
                rows.append({**pairs, "log": path.name})
    if not rows:
        raise SystemExit(f"no 'RESULT teacher=...' line in {[str(p) for p in paths]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--plot", default="outputs/sid_text2image_guidance.png")
    args = parser.parse_args()
    rows = read_results(args.logs)
    rows.sort(key=lambda r: (r["teacher"], r.get("student", "full"), float(r["guidance_scale"])))
    print(
        "teacher student guidance minutes images eval_samples teacher_fd teacher_align student_fd "
        "student_align ratio"
    )
    for r in rows:
        print(
            f"{r['teacher']:7} {r.get('student', 'full'):7} {float(r['guidance_scale']):8g} {float(r['minutes']):7g} "
            f"{r['images']:>6} {r['eval_samples']:>12} {float(r['teacher_fd']):10.2f} "
            f"{float(r['teacher_align']):13.3f} {float(r['student_fd']):10.2f} "
            f"{float(r['student_align']):13.3f} {float(r['ratio']):5.2f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"sd": ("tab:blue", "tab:red"), "flow": ("tab:green", "tab:purple")}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        teacher_colour, student_colour = colours.get(r["teacher"], ("0.3", "0.5"))
        student = r.get("student", "full")
        teacher = (float(r["teacher_align"]), float(r["teacher_fd"]))
        one_step = (float(r["student_align"]), float(r["student_fd"]))
        ax.plot(*zip(teacher, one_step), color="0.7", lw=1, zorder=1)
        ax.scatter(*teacher, marker="o", color=teacher_colour, zorder=2)
        ax.scatter(*one_step, marker="s" if student == "full" else "^", color=student_colour, zorder=2)
        # a run that only measured a checkpoint (--minutes 0) is named by the images its student saw
        length = (
            f"{float(r['minutes']):g} min"
            if float(r["minutes"]) > 0
            else f"{int(r['images']) // 1000}k images"
        )
        label = f"{r['teacher']} {student} CFG {float(r['guidance_scale']):g}, {length}"
        offset = (4, 4) if student == "full" else (-8, 8)  # LoRA rows sit on the full ones' scale
        ax.annotate(
            label,
            one_step,
            textcoords="offset points",
            xytext=offset,
            fontsize=7,
            ha="right" if student != "full" else "left",
        )
        ax.annotate(
            f"CFG {float(r['guidance_scale']):g}",
            teacher,
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
        )
    for name in sorted({r["teacher"] for r in rows}):
        teacher_colour, student_colour = colours.get(name, ("0.3", "0.5"))
        ax.scatter([], [], marker="o", color=teacher_colour, label=f"{name} teacher, 25 steps")
        ax.scatter([], [], marker="s", color=student_colour, label=f"{name} one-step student (full)")
    if any(r.get("student", "full") == "lora" for r in rows):
        ax.scatter([], [], marker="^", color="tab:red", label="sd one-step student (LoRA)")
    ax.set_xlabel("prompt alignment (classifier agrees with the prompt)")
    ax.set_ylabel("FD (Fashion-MNIST classifier features, lower is better)")
    ax.legend(fontsize=7)
    ax.set_title("SiD-LSG on the Fashion-MNIST teachers: guidance trade-off", fontsize=9)
    save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
