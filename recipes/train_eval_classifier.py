"""Train the classifier that the offline metrics use as their "Inception", and ship it.

    python recipes/train_eval_classifier.py                      # 8x8 digits (default)
    python recipes/train_eval_classifier.py --dataset fashion    # Fashion-MNIST, + reference statistics

Trains :class:`distill.evaluation.classifier.DigitsClassifier` on the digits *train* split only (the held-out split is what
generated samples are compared against, so the classifier must not have seen it), with light augmentation:
random 1-pixel shifts and small Gaussian pixel noise, so that its features move smoothly for the slightly
blurry or noisy images a generator produces instead of flipping on them. Writes
``distill/assets/digits_classifier.safetensors`` and ``digits_classifier.json`` (config, exact command,
held-out accuracy, the real-data FD floor). Plain torch, deterministic for a given seed and torch build,
well under a CPU-minute.

``--dataset fashion`` trains the same architecture, sized for 1x32x32 inputs (:class:`ClassifierConfig` below),
on the 60,000 Fashion-MNIST train images (padded 28 -> 32 as the teachers' data, shifts of up to 2 pixels,
horizontal flips, pixel noise) in about 8 single-thread CPU-minutes, stores it in float16 and then computes,
*with the weights as stored*, the test accuracy and the reference statistics of the 10,000 test images
(``fashion_reference.safetensors``, see :mod:`distill.evaluation.text2image`). Needs Debian's
``dataset-fashion-mnist``.
"""

from __future__ import annotations

# isort: off
import engine  # noqa: F401  first: silences bitsandbytes' import-time warning before peft/diffusers load it
# isort: on

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.data import HELDOUT_PER_CLASS, SPLIT_SEED, load_digits_tensors
from distill.evaluation.classifier import (
    ASSETS_DIR,
    ClassifierConfig,
    DigitsClassifier,
    save_digits_classifier,
)
from engine.launch import run_main

REPO = Path(__file__).resolve().parent.parent

#: per dataset: the classifier's architecture and the training defaults (any flag overrides them)
DATASETS: dict[str, dict] = {
    "digits": {
        "config": ClassifierConfig(),
        "defaults": {
            "epochs": 40,
            "batch_size": 64,
            "lr": 3e-3,
            "max_shift": 1,
            "hflip": False,
            "name": "digits_classifier",
        },
    },
    "fashion": {
        "config": ClassifierConfig(
            widths=(32, 64, 64), hidden=256, feature_dim=128, image_size=32, pools=(1, 1, 1)
        ),
        "defaults": {
            "epochs": 8,
            "batch_size": 128,
            "lr": 3e-3,
            "max_shift": 2,
            "hflip": True,
            "name": "fashion_classifier",
        },
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    parser.add_argument("--epochs", type=int, default=None, help="Default: per dataset (DATASETS).")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument(
        "--max-shift", type=int, default=None, help="Random shifts of up to this many pixels."
    )
    parser.add_argument(
        "--hflip", action=argparse.BooleanOptionalAction, default=None, help="Random horizontal flips."
    )
    parser.add_argument("--noise-std", type=float, default=0.15, help="Per-image noise std ~ U(0, this).")
    parser.add_argument("--label-smoothing", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = bitwise reproducible).")
    parser.add_argument("--out-dir", type=Path, default=ASSETS_DIR)
    parser.add_argument("--name", default=None, help="File stem in --out-dir; default per dataset.")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="Train on the first N images only (quick checks; not shipped).",
    )
    args = parser.parse_args(argv)
    for key, value in DATASETS[args.dataset]["defaults"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with the background value -1."""
    if max_shift <= 0:
        return x
    size = x.shape[-1]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=generator)
    out = torch.empty_like(x)
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            rows = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().flatten()
            if len(rows):
                out[rows] = padded[rows, :, dy : dy + size, dx : dx + size]
    return out


def augment(x: torch.Tensor, args: argparse.Namespace, generator: torch.Generator) -> torch.Tensor:
    x = random_shift(x, args.max_shift, generator)
    if args.hflip:
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    std = torch.rand(len(x), 1, 1, 1, generator=generator) * args.noise_std
    return (x + std * torch.randn(x.shape, generator=generator)).clamp(-1.0, 1.0)


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[float]]:
    pred = model.predict(x)
    per_class = [
        round(float((pred[y == c] == c).double().mean()), 4) for c in range(model.config.num_classes)
    ]
    return round(float((pred == y).double().mean()), 4), per_class


def load_data(dataset: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, held-out images, held-out labels); Fashion-MNIST's held-out is its test
    split, padded to 32x32 like the teachers' data."""
    if dataset == "digits":
        return (*load_digits_tensors("train"), *load_digits_tensors("heldout"))
    from distill.evaluation.text2image import CLASSIFIER_SIZE, fashion_test_images
    from distill.fashion_mnist import load_fashion_mnist_arrays, pixel_values

    images, labels = load_fashion_mnist_arrays("train")
    x_train = torch.from_numpy(pixel_values(images, CLASSIFIER_SIZE))
    return (x_train, torch.from_numpy(labels), *fashion_test_images())


def train(args: argparse.Namespace) -> tuple[DigitsClassifier, dict]:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_held, y_held = load_data(args.dataset)
    if args.limit is not None:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    model = DigitsClassifier(DATASETS[args.dataset]["config"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for idx in order.split(args.batch_size):
            logits = model(augment(x_train[idx], args, generator))
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 10 == 9 or epoch == args.epochs - 1 or args.dataset != "digits":
            model.eval()
            held, _ = accuracy(model, x_held, y_held)
            print(
                f"epoch {epoch + 1:3d}  loss {total / len(x_train):.4f}  heldout_acc {held:.4f}", flush=True
            )
    seconds = time.perf_counter() - start
    model.eval().requires_grad_(False)
    train_acc, _ = accuracy(model, x_train, y_train)
    held_acc, per_class = accuracy(model, x_held, y_held)
    report = {
        "images": [len(x_train), len(x_held)],
        "train_accuracy": train_acc,
        "heldout_accuracy": held_acc,
        "heldout_per_class_accuracy": per_class,
        "train_seconds": round(seconds, 2),
    }
    return model, report


def _display(path: Path) -> str:
    """Paths relative to the repository, so the shipped json does not name this machine's folders."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, report = train(args)
    out = Path(args.out_dir)
    weights = out / f"{args.name}.safetensors"
    raw_argv = sys.argv[1:] if argv is None else argv
    info = {
        "model": "distill.evaluation.classifier.DigitsClassifier",
        "config": json.loads(model.config.to_json()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "command": shlex.join(["python", _display(Path(__file__)), *raw_argv]),
        "training": {k: (_display(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if args.dataset == "fashion":
        info.update(_ship_fashion(model, report, weights, out / "fashion_reference.safetensors"))
    else:
        info.update(_ship_digits(model, report, weights))
    info["torch_version"] = torch.__version__
    info["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (out / f"{args.name}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"({info['train_seconds']} s)\nwrote {weights}")
    return info


def _ship_digits(model: DigitsClassifier, report: dict, weights: Path) -> dict:
    save_digits_classifier(model, weights)

    from distill.evaluation.metrics import DigitsEvaluator  # after saving: it measures the model just trained

    evaluator = DigitsEvaluator(classifier=model)
    floor = evaluator.real_floor()
    noise = evaluator.evaluate(torch.randn(2000, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    print(
        f"heldout accuracy {report['heldout_accuracy']:.4f}  train accuracy {report['train_accuracy']:.4f}  "
        f"FD floor (train vs heldout) {floor['fd']:.3f}  FD of N(0, 1) noise {noise['fd']:.1f}"
    )
    return {
        "data": (
            "sklearn.datasets.load_digits, pixels x/8-1 in [-1, 1]; trained on the 'train' split; held-out = "
            f"{HELDOUT_PER_CLASS} per class chosen by numpy.random.default_rng([{SPLIT_SEED}, class])"
        ),
        **report,
        "real_floor_train_vs_heldout": floor,
        "gaussian_noise_2000_vs_heldout": noise,
        "features": (
            "FD: penultimate Linear(128->64) pre-activations (DigitsClassifier.features); precision/recall: "
            "flattened last conv block, 256-d (DigitsClassifier.conv_features)"
        ),
    }


def _ship_fashion(model: DigitsClassifier, report: dict, weights: Path, reference_file: Path) -> dict:
    """float16 weights, then everything measured with the weights as stored: test accuracy, the reference
    statistics, and what real train images / noise / shuffled prompts score against them."""
    from distill.evaluation.classifier import load_digits_classifier
    from distill.evaluation.text2image import FashionEvaluator, compute_reference
    from distill.fashion_mnist import load_fashion_mnist_arrays, pixel_values

    save_digits_classifier(model, weights, dtype=torch.float16)
    stored = load_digits_classifier(weights)
    _, _, x_test, y_test = load_data("fashion")
    test_acc, per_class = accuracy(stored, x_test, y_test)
    reference = compute_reference(stored, pr_features="conv_2x2", classifier_file=weights)
    reference.save(reference_file)
    evaluator = FashionEvaluator(classifier=stored, reference=reference)
    images, labels = load_fashion_mnist_arrays("train")
    rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))[:2000].numpy()
    train_x, train_y = torch.from_numpy(pixel_values(images[rows])), torch.from_numpy(labels[rows])
    gen = torch.Generator().manual_seed(0)
    floor = evaluator.evaluate(train_x, train_y)
    shuffled = evaluator.evaluate(train_x, train_y[torch.randperm(len(train_y), generator=gen)])
    noise = evaluator.evaluate(torch.randn(2000, 1, 32, 32, generator=gen).clamp(-1, 1), train_y)
    print(
        f"test accuracy (float16 weights) {test_acc:.4f}  train accuracy {report['train_accuracy']:.4f}  "
        f"FD 2000 train images {floor['fd']:.3f} (align {floor['align']:.3f})  FD of noise {noise['fd']:.1f}  "
        f"align with shuffled prompts {shuffled['align']:.3f}"
    )
    report = {**report, "heldout_accuracy": test_acc, "heldout_per_class_accuracy": per_class}
    return {
        "data": (
            "Fashion-MNIST (Debian dataset-fashion-mnist), pixels x/127.5-1 padded 28->32 with -1 "
            "(distill.fashion_mnist.pixel_values); trained on the 60,000 train images; held-out = the 10,000 "
            "test images (accuracies measured with the float16 weights as shipped)"
        ),
        "weights_dtype": "float16",
        **report,
        "reference": {
            "file": reference_file.name,
            "sha256": hashlib.sha256(reference_file.read_bytes()).hexdigest(),
            **reference.metadata,
            "pr_reference_images": len(reference.pr_indices),
        },
        "real_2000_train_vs_test": floor,
        "real_2000_train_shuffled_prompts": shuffled,
        "gaussian_noise_2000_vs_test": noise,
        "features": (
            "FD: penultimate Linear(256->128) pre-activations (DigitsClassifier.features); precision/recall: "
            "the last conv map (64x4x4) average-pooled to 64x2x2, 256-d (FeatureEvaluator pr_features='conv_2x2')"
        ),
    }


if __name__ == "__main__":
    run_main(main)
