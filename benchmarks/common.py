"""What the benchmark scripts share: teacher reference figures on fixed noise, ``key=value`` config overrides,
``RESULT key=value ...`` lines and plots (written only when matplotlib is installed).

Imported by the scripts beside it as ``from common import ...`` (``python benchmarks/X.py`` puts this folder
first on ``sys.path``); it is not part of the installed packages.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from distill.teachers.denoiser import Denoiser

#: unit noise of the teacher / flow figures of the SiD and reflow benchmarks, so a teacher figure means the same in
#: both (the students' QualityTracker uses the recipes' own ``eval_seed``; teacher_quality.py keeps its --seed 0,
#: the noise of README's teacher figures)
EVAL_NOISE_SEED = 1
#: the teacher figures the SiD benchmark compares with: one and four Euler steps, and Heun at 35 NFE
SID_TEACHER_NFES: tuple[tuple[int, str], ...] = ((1, "euler"), (4, "euler"), (35, "heun"))
#: colours of horizontal reference lines in the order given (a real-data floor first is drawn black), none of
#: them among the first curves' colours (tab:blue, orange, green, red, purple)
REFERENCE_COLORS = ("k", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


# --- config overrides ---------------------------------------------------------------------------------------
def parse_overrides(pairs: Iterable[str]) -> list[str]:
    """``["key=value", ...]`` as ``["--key", "value", ...]`` arguments for ``engine.config.parse_config``.

    A value with spaces becomes several arguments (a list field, e.g. ``step_sigmas='2.5 0.8'``); the config's
    own parser converts the types and rejects unknown or renamed keys.
    """
    argv: list[str] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or key.startswith("-"):
            raise SystemExit(f"override {pair!r} must look like key=value, e.g. alpha=1.2")
        argv += [f"--{key}", *value.split()]
    return argv


def settings_argv(settings: Mapping[str, object]) -> list[str]:
    """A benchmark's fixed settings as ``--key value`` arguments (put user overrides after them to win)."""
    return [arg for key, value in settings.items() for arg in (f"--{key}", str(value))]


# --- printed figures ----------------------------------------------------------------------------------------
def format_value(value: object) -> str:
    """A figure as printed in RESULT lines: floats with 3 decimals, sequences comma-joined, the rest as str."""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def result_line(tag: str = "RESULT", /, **figures: object) -> str:
    """``RESULT key=value ...``: one line that scripts and other sessions grep for (keep keys stable)."""
    for key, value in figures.items():
        text = format_value(value)
        if not text or any(c.isspace() for c in text):
            raise ValueError(f"figure {key}={text!r} must be one non-empty word")
    return " ".join([tag, *(f"{k}={format_value(v)}" for k, v in figures.items())])


def print_result(tag: str = "RESULT", /, **figures: object) -> None:
    """Print :func:`result_line` and flush (benchmarks run for minutes; the line must not sit in a buffer)."""
    print(result_line(tag, **figures), flush=True)


def fd_line(name: str, nfe: int, metrics: Mapping[str, float], method: str | None = None) -> str:
    """One evaluated sampler setting: ``name nfe=N (method) fd=.. precision=.. recall=..``."""
    sampler = f" ({method})" if method else ""
    return (
        f"{name} nfe={nfe}{sampler} fd={metrics['fd']:.3f} precision={metrics['precision']:.3f} "
        f"recall={metrics['recall']:.3f}"
    )


def seed_summary(seeds: Sequence[int], ratios: Sequence[float], student_fds: Sequence[float]) -> dict:
    """The across-seeds figures of a benchmark run once per seed: every ratio, their median and worst (max)."""
    if not seeds or not (len(seeds) == len(ratios) == len(student_fds)):
        raise ValueError(f"need one ratio and one student FD per seed, got {seeds=} {ratios=} {student_fds=}")
    return {
        "seeds": list(seeds),
        "ratios": [float(r) for r in ratios],
        "median_ratio": float(statistics.median(ratios)),
        "worst_ratio": float(max(ratios)),
        "median_student_fd": float(statistics.median(student_fds)),
    }


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; refuses empty, non-integer or repeated seeds."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {text!r} must name at least one seed, each once, e.g. 0,1,2")
    return seeds


# --- teacher reference --------------------------------------------------------------------------------------
def teacher_metrics(
    teacher: str | Denoiser,
    num_samples: int,
    settings: Iterable[tuple[int, str]],
    seed: int = EVAL_NOISE_SEED,
    name: str = "teacher",
    verbose: bool = True,
) -> list[tuple[int, str, dict[str, float]]]:
    """Metrics of the teacher's ODE sampler at each ``(nfe, method)``, every setting on the same unit noise.

    Returns ``[(nfe actually spent, method actually used, metrics)]`` (Heun at one NFE is one Euler step).
    """
    # imported here so that scripts which only print RESULT lines (sid_memory's parent) stay free of torch
    from distill.evaluation.quality import evaluate_sampler
    from distill.teachers.loading import load_teacher

    model = load_teacher(teacher).eval() if isinstance(teacher, str) else teacher.eval()
    out = []
    for nfe, method in settings:
        metrics, _ = evaluate_sampler(model, num_samples, nfe=nfe, method=method, seed=seed)
        used = "heun" if method == "heun" and nfe > 1 else "euler"
        spent = int(metrics["nfe"])
        out.append((spent, used, metrics))
        if verbose:
            print(fd_line(name, spent, metrics, method), flush=True)
    return out


def teacher_reference(
    num_samples: int,
    settings: Iterable[tuple[int, str]] = SID_TEACHER_NFES,
    teacher: str | Denoiser = "default",
    seed: int = EVAL_NOISE_SEED,
) -> dict[int, float]:
    """The teacher's FD at each NFE of ``settings`` on fixed noise (printed as it goes): ``{nfe: fd}``."""
    rows = teacher_metrics(teacher, num_samples, settings, seed=seed)
    nfes = [nfe for nfe, _, _ in rows]
    if len(set(nfes)) != len(nfes):
        raise ValueError(f"teacher_reference keys its FDs by NFE; the settings repeat one: {nfes}")
    return {nfe: metrics["fd"] for nfe, _, metrics in rows}


# --- plots --------------------------------------------------------------------------------------------------
Curve = Mapping[float, float] | Sequence[tuple[float, float]]


@dataclass
class Panel:
    """One axes: curves (``{label: {x: y}}`` or ``{label: [(x, y), ...]}``) and horizontal reference lines."""

    curves: Mapping[str, Curve]
    title: str = ""
    xlabel: str = ""
    ylabel: str = "FD (digits classifier features)"
    references: Mapping[str, float] = field(default_factory=dict)
    xscale: str = "linear"
    yscale: str = "log"


def _points(curve: Curve) -> tuple[list[float], list[float]]:
    pairs = sorted(curve.items()) if isinstance(curve, Mapping) else list(curve)
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_panels(
    path: str | Path, panels: Sequence[Panel], panel_size: tuple[float, float] = (6.5, 4)
) -> bool:
    """Write the panels side by side to a PNG; without matplotlib say so and return False (figures still print)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[plots]')")
        return False
    width, height = panel_size
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for i, (label, curve) in enumerate(panel.curves.items()):
            marker = "os*^Dv"[i % 6]
            ax.plot(*_points(curve), marker=marker, markersize=10 if marker == "*" else 6, label=label)
        for (label, value), color in zip(panel.references.items(), REFERENCE_COLORS * 4):
            ax.axhline(value, ls="--", lw=1, color=color, label=label)
        ax.set(xscale=panel.xscale, yscale=panel.yscale, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.set_title(panel.title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def save_figure(fig: Figure, path: str | Path) -> None:
    """Lay out, write (folders made) and close a benchmark's figure at the benchmarks' one resolution, and say where."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def plot_curves(
    path: str | Path, curves: Mapping[str, Curve], panel_size: tuple[float, float] = (6.5, 4), **panel: object
) -> bool:
    """One-panel :func:`plot_panels`; ``panel`` takes :class:`Panel`'s fields (title, references, xscale, ...)."""
    return plot_panels(path, [Panel(curves, **panel)], panel_size)  # type: ignore[arg-type]


def reset_accelerate() -> None:
    """Forget accelerate's process-wide singletons so the next Trainer in this process starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


# ------------------------------------------------------------------------------------------ reflow benchmarks
#: how reflow benchmarks split ``--minutes`` of wall time: pairs, 2-RF training, distillation (the rest: evaluation)
REFLOW_SPLIT = {"pairs": 0.35, "reflow": 0.35, "distill": 0.15}


def reflow_time_budget(minutes: float) -> dict[str, object]:
    """The ReflowConfig settings that hold each stage to its share of ``minutes`` (printed), with step and pair
    counts high enough that time is what stops them."""
    import json

    budget = {k: v * minutes for k, v in REFLOW_SPLIT.items()}
    print(f"time split (minutes): {json.dumps({k: round(v, 2) for k, v in budget.items()})}", flush=True)
    return {
        "num_pairs": 1_000_000,
        "pairs_minutes": budget["pairs"],
        "reflow_steps": 10**9,
        "reflow_minutes": budget["reflow"],
        "distill_steps": 10**9,
        "distill_minutes": budget["distill"],
    }


def run_reflow_stages(cfg: object) -> dict[str, dict]:
    """Every planned reflow stage in order, each timed (``[bench] <stage> round <r>: M min``); returns each stage's
    facts under ``pairs_r<r>``, ``reflow`` and ``distill``."""
    import time

    from distill.reflow.stages import plan, run_pairs, run_training
    from recipes.reflow import ReflowRecipe

    results: dict[str, dict] = {}
    for stage, round_ in plan(cfg):
        t0 = time.perf_counter()
        if stage == "pairs":
            results[f"pairs_r{round_}"] = run_pairs(cfg, round_)
        else:
            results[stage] = run_training(cfg, stage, round_, ReflowRecipe)  # type: ignore[arg-type]
        print(f"[bench] {stage} round {round_}: {(time.perf_counter() - t0) / 60:.2f} min", flush=True)
    return results
