"""Reflow on the default digits teacher in M minutes: pairs -> 2-rectified flow -> one-step student.

Time split of ``--minutes M`` (wall time, one process): pair generation 35 %, reflow 35 %, distillation 15 %; the
remaining ~15 % is evaluation (teacher FD vs. NFE, 2-RF FD vs. NFE, student FD, straightness), whose cost is
fixed by ``--eval-samples`` (default 5000, 1000 below 10 minutes). Every FD uses the same unit noise (seed 1)
against the held-out digits. Prints per-point lines, writes ``fd_vs_nfe.png`` and ends with

    RESULT teacher_fd=<Heun 35 NFE> reflow_fd_1step=<> distill_fd_1step=<> straightness_before=<>
           straightness_after=<> pairs=<N>

(on one line). Straightness is Liu et al.'s S of the teacher's flow (before) and of the 2-rectified flow (after),
32 Euler steps on 512 noises.

    python benchmarks/reflow_digits.py --minutes 30
    python benchmarks/reflow_digits.py --minutes 3 --teacher PATH reflow_lr=1e-4
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from common import (
    EVAL_NOISE_SEED,
    fd_line,
    parse_overrides,
    plot_curves,
    print_result,
    reflow_time_budget,
    run_reflow_stages,
    settings_argv,
    teacher_metrics,
)

from distill.evaluation.quality import digits_evaluator, metrics_for
from distill.reflow.flow import euler_on_sigmas, flow_sigmas
from distill.reflow.stages import distill_source
from distill.teachers.loading import load_teacher
from engine.config import parse_config
from recipes.reflow import ReflowConfig

TEACHER_NFES = [(1, "euler"), (3, "heun"), (5, "heun"), (9, "heun"), (17, "heun"), (35, "heun")]
FLOW_NFES = [1, 2, 4, 8, 16]


def teacher_curve(teacher: str, num_samples: int) -> dict[int, float]:
    """The teacher's FD at each of ``TEACHER_NFES`` on the shared evaluation noise (seed 1)."""
    return {nfe: m["fd"] for nfe, _, m in teacher_metrics(teacher, num_samples, TEACHER_NFES)}


@torch.no_grad()
def flow_curve(
    folder: str, name: str, nfes: list[int], num_samples: int, sigma_max: float
) -> dict[int, float]:
    """FD of an exported flow model with ``n``-step Euler on the same noise as the teacher (seed 1)."""
    model = load_teacher(folder).eval()
    shape = (model.in_channels, model.sample_size, model.sample_size)
    gen = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    noise = torch.cat([torch.randn((1, *shape), generator=gen) for _ in range(num_samples)])
    out = {}
    for nfe in nfes:
        images = torch.cat(
            [euler_on_sigmas(model, z, flow_sigmas(nfe, sigma_max)) for z in noise.split(1000)]
        )
        metrics = metrics_for(images.clamp(-1, 1))
        out[nfe] = metrics["fd"]
        print(fd_line(name, nfe, metrics), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--output-dir", default="outputs/bench_reflow_digits")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--resume", action="store_true", help="keep --output-dir and continue/skip done stages"
    )
    parser.add_argument(
        "overrides", nargs="*", help="ReflowConfig fields, e.g. reflow_lr=1e-4 loss=pseudo_huber"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    eval_samples = args.eval_samples or (5000 if args.minutes >= 10 else 1000)
    start = time.perf_counter()

    if Path(args.output_dir).exists() and not args.resume:
        shutil.rmtree(args.output_dir)  # a benchmark times every stage: start from nothing
    settings = {
        "output_dir": args.output_dir,
        "teacher": args.teacher,
        **reflow_time_budget(args.minutes),
        "eval_samples": min(eval_samples, 2000),
        "eval_nfes": 1,
        "log_every": 100,
        "log_with": "none",
        "progress_bar": "false",
    }
    # the user's key=value overrides last, so they win; bad keys or values fail here, before any work
    cfg = parse_config(ReflowConfig, settings_argv(settings) + parse_overrides(args.overrides))
    results = run_reflow_stages(cfg)

    pairs = results["pairs_r1"]["pairs"]
    sigma_max = results["distill"]["sigma_max"]
    t0 = time.perf_counter()
    teacher = teacher_curve(args.teacher, eval_samples)
    reflow = flow_curve(
        str(Path(distill_source(cfg))), "2-rectified flow (Euler)", FLOW_NFES, eval_samples, sigma_max
    )
    student_folder = str(Path(cfg.output_dir) / "distill" / "student")
    student = flow_curve(student_folder, "distilled student", [cfg.num_steps], eval_samples, sigma_max)
    print(f"[bench] evaluation: {(time.perf_counter() - t0) / 60:.2f} min", flush=True)
    curves = {
        "teacher (EDM Heun / Euler)": teacher,
        "2-rectified flow (Euler)": reflow,
        "distilled student": student,
    }
    floor = digits_evaluator().real_floor()["fd"]
    title = f"Reflow on the digits teacher, {args.minutes:g} min, {pairs} pairs"
    plot_curves(
        Path(args.output_dir) / "fd_vs_nfe.png",
        curves,
        references={"real data floor (train vs held-out)": floor},
        title=title,
        xlabel="NFE",
        xscale="log",
    )
    before = results["reflow"]["straightness_before"]
    after = results["reflow"]["straightness_after"]
    print(
        f"wall minutes={(time.perf_counter() - start) / 60:.1f} reflow_steps={results['reflow']['training_steps']} "
        f"distill_steps={results['distill']['training_steps']} straightness_ratio={before / after:.2f} "
        f"fd_ratio_student_vs_teacher={student[cfg.num_steps] / teacher[35]:.2f} real_floor_fd={floor:.3f}"
    )
    ok_fd, ok_straight = student[cfg.num_steps] <= 2 * teacher[35], before >= 5 * after
    print(f"targets: student FD <= 2x teacher 35-NFE FD: {ok_fd}; straightness >= 5x lower: {ok_straight}")
    print_result(
        teacher_fd=teacher[35],
        reflow_fd_1step=reflow[1],
        distill_fd_1step=student[cfg.num_steps],
        straightness_before=f"{before:.5f}",
        straightness_after=f"{after:.5f}",
        pairs=pairs,
    )


if __name__ == "__main__":
    main()
