"""Engine demo: a small denoising auto-encoder on scikit-learn's 8x8 digits, with EMA, checkpoints and samples.

accelerate launch recipes/engine_demo.py --max_steps 200
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from engine.config import TrainConfig, parse_config
from engine.launch import run_main
from engine.recipe import Recipe, RecipeParts, TrainedModel
from engine.trainer import Trainer


@dataclass
class DemoConfig(TrainConfig):
    """Engine demo: an MLP learns to remove Gaussian noise from 8x8 digits (scikit-learn's 1,797 images)."""

    output_dir: str = "outputs/engine_demo"
    max_steps: int = 300
    batch_size: int = 64
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the denoiser."})
    noise: float = field(
        default=0.5, metadata={"help": "Std of the Gaussian noise added to images scaled to [-1, 1]."}
    )
    ema_halflife_images: float = field(
        default=2000.0,
        metadata={"help": "EMA half-life in images (about one pass over the data); evaluation uses the EMA."},
    )


class DenoisingAutoencoder(Recipe):
    supports_fsdp = True  # every process trains; evaluation reads the EMA

    def __init__(self, config: DemoConfig) -> None:
        self.config = config

    def setup(self, trainer: Trainer) -> RecipeParts:
        images = torch.tensor(load_digits().images, dtype=torch.float32).div(8).sub(1).reshape(-1, 64)
        self.eval_images = images[:64]
        model = nn.Sequential(
            nn.Linear(64, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, 64)
        )
        loader = DataLoader(
            TensorDataset(images), batch_size=self.config.batch_size, shuffle=True, drop_last=True
        )
        opt = torch.optim.AdamW(model.parameters(), lr=self.config.lr)
        return RecipeParts(
            {"dae": TrainedModel(model, opt, ema_halflife_images=self.config.ema_halflife_images)},
            dataloader=loader,
        )

    def loss(self, phase, batch, models):
        (x,) = batch
        noisy = x + self.config.noise * torch.randn_like(x)
        return (models["dae"](noisy) - x).pow(2).mean()

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        x = self.eval_images.to(trainer.device)
        # fixed noise: every evaluation sees the same inputs, and it leaves the training RNG alone (a resumed run
        # then draws the training noise an uninterrupted run draws)
        g = torch.Generator(device=x.device).manual_seed(self.config.seed)
        noisy = x + self.config.noise * torch.randn(x.shape, generator=g, device=x.device)
        clean = trainer.models.ema("dae")(noisy)
        trainer.log_images("denoised", torch.cat([noisy, clean]).reshape(-1, 1, 8, 8), upscale=4)
        return {"ema_mse": float((clean - x).pow(2).mean())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(DemoConfig, argv)
    return Trainer(config, DenoisingAutoencoder(config)).fit()


if __name__ == "__main__":
    run_main(main)
