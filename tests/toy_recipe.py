"""A two-model toy recipe (generator through a critic, plus a frozen teacher) for engine tests.

It has SiD's structure: the critic phase uses detached generator samples; the generator phase back-propagates
through the critic (not stepped in that phase) and a frozen teacher. Run as a script it trains and writes the
final weights to ``<output_dir>/final.safetensors`` (used by the 2-process ``accelerate launch`` test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from engine.config import TrainConfig, parse_config
from engine.recipe import Recipe, RecipeParts, TrainedModel
from engine.trainer import Trainer


@dataclass
class ToyConfig(TrainConfig):
    lr: float = 0.05
    dim: int = 4
    dataset_size: int = 64
    shuffle: bool = True
    optimizer: Literal["sgd", "adam"] = "adam"
    ema_halflife_images: float = 0.0
    crash_at_step: int = -1
    shared: bool = False  # both trained nets in one container module (as LoRA adapters on one base)


class View(nn.Module):
    """One named sub-network of a shared container, callable on its own."""

    def __init__(self, shared: nn.ModuleDict, key: str) -> None:
        super().__init__()
        self.shared, self.key = shared, key

    def forward(self, x):
        return self.shared[self.key](x)


def toy_data(cfg: ToyConfig) -> torch.Tensor:
    return torch.randn(cfg.dataset_size, cfg.dim, generator=torch.Generator().manual_seed(1234))


def toy_models(cfg: ToyConfig) -> dict[str, nn.Module]:
    torch.manual_seed(4321)
    return {
        "generator": nn.Sequential(nn.Linear(cfg.dim, 16), nn.Tanh(), nn.Linear(16, cfg.dim)),
        "critic": nn.Sequential(nn.Linear(cfg.dim, 8), nn.Tanh(), nn.Linear(8, cfg.dim)),
        "teacher": nn.Linear(cfg.dim, cfg.dim),
    }


def critic_loss(models, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        fake = models["generator"](x)
    return (models["critic"](fake + 0.1 * x) - x).pow(2).mean()


def generator_loss(models, x: torch.Tensor) -> torch.Tensor:
    fake = models["generator"](x)
    return (models["critic"](fake) - x).pow(2).mean() + 0.5 * (models["teacher"](fake) - x).pow(2).mean()


class ToyRecipe(Recipe):
    def __init__(self, config: ToyConfig) -> None:
        self.config = config

    def setup(self, trainer: Trainer) -> RecipeParts:
        self.trainer = trainer
        cfg = self.config
        models = toy_models(cfg)

        def opt(m: nn.Module) -> torch.optim.Optimizer:
            if cfg.optimizer == "sgd":
                return torch.optim.SGD(m.parameters(), lr=cfg.lr)
            return torch.optim.Adam(m.parameters(), lr=cfg.lr, betas=(0.0, 0.999))

        ema = cfg.ema_halflife_images or None
        loader = DataLoader(TensorDataset(toy_data(cfg)), batch_size=cfg.batch_size, shuffle=cfg.shuffle)
        if cfg.shared:
            box = nn.ModuleDict({"generator": models["generator"], "critic": models["critic"]})

            def part(key: str, **kw) -> TrainedModel:
                names = [f"shared.{key}.{n}" for n, _ in models[key].named_parameters()]
                return TrainedModel(
                    View(box, key), opt(models[key]), parameters=names, sync="all_reduce", **kw
                )

            return RecipeParts(
                trained={"critic": part("critic"), "generator": part("generator", ema_halflife_images=ema)},
                frozen={"teacher": models["teacher"]},
                dataloader=loader,
            )
        return RecipeParts(
            trained={
                "critic": TrainedModel(models["critic"], opt(models["critic"])),
                "generator": TrainedModel(
                    models["generator"], opt(models["generator"]), ema_halflife_images=ema
                ),
            },
            frozen={"teacher": models["teacher"]},
            dataloader=loader,
        )

    def loss(self, phase, batch, models):
        if self.trainer.step == self.config.crash_at_step:
            raise RuntimeError(f"injected crash at step {self.trainer.step}")
        (x,) = batch
        if phase == "critic":
            return critic_loss(models, x)
        return generator_loss(models, x), {"fake_mean": models["generator"](x).mean()}


def final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """``<model>.<param>`` for each trained net (shared or not), plus ``ema_<model>.<param>``."""
    out = {}
    for name, tm in trainer.trained.items():
        state = trainer.accelerator.unwrap_model(tm.module).state_dict()
        for key, value in state.items():
            if key.startswith("shared."):
                if not key.startswith(f"shared.{name}."):
                    continue
                key = key[len(f"shared.{name}.") :]
            out[f"{name}.{key}"] = value.detach().clone().contiguous()
    for name, ema in trainer.emas.items():
        state = ema.shadow if hasattr(ema, "shadow") else ema.module.state_dict()
        for key, value in state.items():
            key = key.split(f"shared.{name}.", 1)[-1]
            out[f"ema_{name}.{key}"] = value.detach().clone().contiguous()
    return out


if __name__ == "__main__":
    config = parse_config(ToyConfig)
    trainer = Trainer(config, ToyRecipe(config))
    trainer.fit()
    if trainer.is_main:
        save_file(final_weights(trainer), f"{config.output_dir}/final.safetensors")
