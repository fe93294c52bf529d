"""Time the same model, batch and optimiser through the engine and through a plain torch loop.

One process, interleaved blocks (engine block, plain block, ...) so drift in machine load hits both alike.
Last line: ``RESULT overhead_ratio=<engine time / plain time>`` (median over blocks). Target <= 1.05 at ~10 ms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from common import print_result
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from engine.config import TrainConfig
from engine.recipe import Recipe, RecipeParts, TrainedModel
from engine.trainer import Trainer


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 64)
    )


@dataclass
class BenchConfig(TrainConfig):
    width: int = 512


class RegressionRecipe(Recipe):
    def __init__(self, config: BenchConfig, data: torch.Tensor) -> None:
        self.config, self.data = config, data

    def setup(self, trainer: Trainer) -> RecipeParts:
        model = make_model(self.config.width)
        loader = DataLoader(
            TensorDataset(self.data), batch_size=self.config.batch_size, shuffle=True, drop_last=True
        )
        return RecipeParts(
            {"model": TrainedModel(model, torch.optim.Adam(model.parameters(), lr=1e-4))}, dataloader=loader
        )

    def loss(self, phase, batch, models):
        (x,) = batch
        return (models["model"](x) - x).pow(2).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--steps_per_block", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = torch.randn(args.batch_size * 64, 64)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = BenchConfig(
            output_dir=tmp,
            batch_size=args.batch_size,
            width=args.width,
            max_steps=10**9,
            log_with="none",
            progress_bar=False,
            log_every=10**9,
        )
        trainer = Trainer(cfg, RegressionRecipe(cfg, data))

        model = make_model(args.width)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        loader = DataLoader(TensorDataset(data), batch_size=args.batch_size, shuffle=True, drop_last=True)

        def plain_batches():
            while True:
                yield from loader

        plain_iter = plain_batches()

        def plain_step() -> None:
            (x,) = next(plain_iter)
            loss = (model(x) - x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def timed(fn, n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - start) / n

        timed(trainer.train_step, 10)  # warm-up both
        timed(plain_step, 10)
        ratios, engine_ms, plain_ms = [], [], []
        for _ in range(args.blocks):
            e = timed(trainer.train_step, args.steps_per_block)
            p = timed(plain_step, args.steps_per_block)
            ratios.append(e / p)
            engine_ms.append(1e3 * e)
            plain_ms.append(1e3 * p)
        print(
            f"engine step: median {statistics.median(engine_ms):.2f} ms; plain step: median {statistics.median(plain_ms):.2f} ms"
        )
        print(f"per-block ratios: {' '.join(f'{r:.3f}' for r in ratios)}")
        print_result(overhead_ratio=statistics.median(ratios))


if __name__ == "__main__":
    main()
