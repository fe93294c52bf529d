"""Train the small ``AutoencoderKL`` of the embedded text-to-image teacher on Fashion-MNIST, and export it.

    accelerate launch recipes/vae.py --config recipes/configs/vae_fashion.yaml

1. data: Fashion-MNIST's 60k training images (Debian's ``dataset-fashion-mnist``), zero-padded to 32x32 in
   [-1, 1] (1 channel: diffusers' AutoencoderKL and the SD pipeline's image processor both handle it);
2. model: :func:`distill.text2image.builders.build_vae` (32x32 -> 8x8x4 latents);
3. loss: L1 reconstruction + ``kl_weight`` x KL(posterior || N(0, I)), both summed per image and divided by
   the pixel count (LDM's reduction); no adversarial term;
4. export: the EMA weights with ``scaling_factor`` = 1 / std of the training latents (what SD does, so the
   diffusion model sees unit-variance latents), and a model card with the test split's reconstruction MSE/PSNR
   and a figure (originals above their reconstructions).
"""

from __future__ import annotations

# isort: off
import engine  # noqa: F401  first: silences bitsandbytes' import-time warning before peft/diffusers load it
# isort: on

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, TensorDataset

from distill.export.model_card import write_model_card
from distill.fashion_mnist import load_fashion_mnist_arrays, pixel_values
from distill.text2image.builders import build_vae
from engine.config import TrainConfig, changed_settings_argv, parse_config
from engine.images import save_grid
from engine.launch import run_main
from engine.recipe import Recipe, RecipeParts, TrainedModel
from engine.trainer import Trainer


@dataclass
class VAEConfig(TrainConfig):
    output_dir: str = field(default="outputs/vae_fashion", metadata={"help": "Run folder."})
    data_root: str | None = field(
        default=None, metadata={"help": "Folder of the Fashion-MNIST idx.gz files (default: Debian's)."}
    )
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    block_out_channels: list[int] = field(
        default_factory=lambda: [32, 64, 64], metadata={"help": "Channels per level (3 levels: 32 -> 8)."}
    )
    layers_per_block: int = field(default=1, metadata={"help": "ResNet layers per level."})
    latent_channels: int = field(default=4, metadata={"help": "Latent channels."})
    kl_weight: float = field(
        default=1e-4, metadata={"help": "Weight of the KL term (sum-reduced, as in LDM)."}
    )
    lr: float = field(default=1e-3, metadata={"help": "AdamW lr."})
    lr_warmup_steps: int = field(default=100, metadata={"help": "Linear lr warm-up steps."})
    batch_size: int = field(default=128, metadata={"help": "Images per process and step."})
    max_steps: int = field(default=3000, metadata={"help": "Optimisation steps."})
    ema_halflife_images: float = field(default=20_000.0, metadata={"help": "EMA half-life in images."})
    eval_images: int = field(default=2000, metadata={"help": "Test images for the reconstruction figures."})
    scale_images: int = field(default=5000, metadata={"help": "Training images whose latents set the scale."})
    export_dir: str | None = field(default=None, metadata={"help": "Where to write the VAE folder."})
    fp16_export: bool = field(default=False, metadata={"help": "Store the exported weights in fp16."})


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, l1)``: per-image sums of |x - x_hat| and kl_weight * KL, divided by the pixel count."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    l1 = (recon - x).abs().flatten(1).sum(1)
    loss = (l1 + kl_weight * posterior.kl()).mean() / x[0].numel()
    return loss, l1.mean() / x[0].numel()


@torch.no_grad()
def reconstruction_metrics(
    vae: AutoencoderKL, images: torch.Tensor, batch: int = 500
) -> tuple[dict, torch.Tensor]:
    """MSE and PSNR (images in [-1, 1] mapped to [0, 1]; posterior mode, as a pipeline's encode uses) and the
    reconstructions."""
    recons = []
    for chunk in images.split(batch):
        z = vae.encode(chunk).latent_dist.mode()
        recons.append(vae.decode(z).sample.clamp(-1, 1))
    recon = torch.cat(recons)
    mse = ((recon - images) / 2).pow(2).flatten(1).mean(1)
    psnr = (-10 * torch.log10(mse.clamp_min(1e-10))).mean()
    return {
        "recon_mse": float(mse.mean()),
        "recon_psnr": float(psnr),
        "recon_l1": float((recon - images).abs().mean() / 2),
    }, recon


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch: int = 500) -> float:
    """1 / std of sampled latents over ``images`` (Stable Diffusion's recipe for ``scaling_factor``)."""
    z = torch.cat([vae.encode(chunk).latent_dist.sample() for chunk in images.split(batch)])
    return float(1.0 / z.float().std())


class VAERecipe(Recipe):
    def __init__(self, config: VAEConfig) -> None:
        self.config = config

    def setup(self, trainer: Trainer) -> RecipeParts:
        cfg = self.config
        images, _ = load_fashion_mnist_arrays("train", cfg.data_root)
        test, _ = load_fashion_mnist_arrays("test", cfg.data_root)
        if cfg.train_limit is not None:
            images = images[: cfg.train_limit]
        self.train_px = torch.from_numpy(pixel_values(images))
        self.test_px = torch.from_numpy(pixel_values(test[: cfg.eval_images]))
        vae = build_vae(1, cfg.block_out_channels, cfg.latent_channels, cfg.layers_per_block)
        loader = DataLoader(
            TensorDataset(self.train_px),
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=cfg.num_workers,
        )
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
        return RecipeParts(
            {"vae": TrainedModel(vae, opt, ema_halflife_images=cfg.ema_halflife_images)}, dataloader=loader
        )

    def loss(self, phase, batch, models):
        loss, l1 = vae_loss(models["vae"], batch[0], self.config.kl_weight)
        return loss, {"l1": l1.detach()}

    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        if not trainer.is_main:
            return {}
        vae = trainer.models.ema("vae")
        x = self.test_px[:500].to(trainer.device)
        metrics, recon = reconstruction_metrics(vae, x)
        trainer.log_images("recon", _pairs(x[:32], recon[:32]), upscale=2)
        return metrics

    def on_train_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.is_main:
            self.export(trainer)

    def export(self, trainer: Trainer) -> Path:
        cfg = self.config
        out = Path(cfg.export_dir or Path(cfg.output_dir) / "vae")
        vae: AutoencoderKL = trainer.models.ema("vae")
        vae.eval()
        gen = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(self.train_px), generator=gen)[: cfg.scale_images]
        device = next(vae.parameters()).device
        scale = latent_scaling_factor(vae, self.train_px[pick].to(device))
        vae.register_to_config(scaling_factor=scale)
        test = self.test_px.to(device)
        metrics, recon = reconstruction_metrics(vae, test)
        if cfg.fp16_export:
            # metrics above are of the fp32 model; re-measure what is shipped
            vae = vae.to(torch.float16).to(torch.float32)
            metrics, recon = reconstruction_metrics(vae, test)
        vae.save_pretrained(out)
        figure = "reconstructions.png"
        save_grid(_pairs(test[:40], recon[:40]).cpu(), out / figure, nrow=20, upscale=2)
        write_model_card(
            out,
            title="Fashion-MNIST AutoencoderKL (32x32 -> 8x8x4)",
            method="KL autoencoder (Rombach et al. 2022): L1 reconstruction + KL, no adversarial loss",
            facts={
                "dataset": "Fashion-MNIST train (60,000 images, zero-padded to 32x32, 1 channel)",
                "parameters": sum(p.numel() for p in vae.parameters()),
                "scaling_factor": round(scale, 5),
                "steps": trainer.step,
                "images_seen": trainer.images_seen,
                "kl_weight": cfg.kl_weight,
                "weights_dtype": "float16" if cfg.fp16_export else "float32",
                **{f"test_{k}": round(v, 5) for k, v in metrics.items()},
                "test_images": len(test),
            },
            command="accelerate launch recipes/vae.py " + " ".join(changed_settings_argv(cfg)),
            sample_grid=figure,
        )
        if cfg.fp16_export:
            from safetensors.torch import load_file, save_file

            weights = out / "diffusion_pytorch_model.safetensors"
            save_file({k: v.half() for k, v in load_file(weights).items()}, weights)
        return out


def _pairs(x: torch.Tensor, recon: torch.Tensor, per_row: int = 20) -> torch.Tensor:
    """Originals and reconstructions interleaved by rows of ``per_row`` (a row of originals above its recons)."""
    rows = []
    for i in range(0, len(x), per_row):
        rows += [x[i : i + per_row], recon[i : i + per_row]]
    return torch.cat(rows)


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(VAEConfig, argv)
    return Trainer(config, VAERecipe(config)).fit()


if __name__ == "__main__":
    run_main(main)
