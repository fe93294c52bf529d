"""Train an EDM-preconditioned diffusers UNet teacher on an image dataset, and export it as a diffusers folder.

    accelerate launch recipes/teacher.py --config recipes/configs/teacher_digits.yaml

1. data: a ``datasets.Dataset`` of images ("digits" = scikit-learn's 8x8 digits, train split; a local image
   folder; or a hub dataset name for users with network);
2. model: ``UNet2DModel`` wrapped by :class:`distill.teachers.denoiser.Denoiser` with an ``EDMEulerScheduler`` config,
   so D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) exactly as diffusers' EDM pipeline calls it;
3. loss: EDM's weighted denoising loss at sigma ~ LogNormal(P_mean, P_std);
4. EMA (half-life in images), evaluation of the EMA model with Heun sampling (FD on digits), export.
"""

from __future__ import annotations

# isort: off
import engine  # noqa: F401  first: silences bitsandbytes' import-time warning before peft/diffusers load it
# isort: on

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from distill.data import load_image_dataset, torch_collate
from distill.evaluation.quality import evaluate_sampler
from distill.export.model_card import write_model_card
from distill.teachers.builders import build_unet, edm_scheduler
from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.edm import drop_labels, edm_denoising_loss, sample_lognormal_sigmas
from engine.config import TrainConfig, parse_config
from engine.launch import run_main
from engine.recipe import Recipe, RecipeParts, TrainedModel
from engine.trainer import Trainer


@dataclass
class TeacherConfig(TrainConfig):
    output_dir: str = field(
        default="outputs/teacher", metadata={"help": "Run folder: checkpoints, logs, samples."}
    )
    dataset: str = field(
        default="digits", metadata={"help": "'digits', a local image folder, or a hub dataset."}
    )
    resolution: int | None = field(default=None, metadata={"help": "Image size (default: the dataset's)."})
    channels: int | None = field(default=None, metadata={"help": "1 or 3 (default: the dataset's)."})
    block_out_channels: list[int] = field(
        default_factory=lambda: [32, 64], metadata={"help": "UNet channels per resolution level."}
    )
    layers_per_block: int = field(default=2, metadata={"help": "UNet ResNet layers per level."})
    attention: bool = field(default=False, metadata={"help": "Self-attention at the lowest resolution."})
    class_conditional: bool = field(
        default=False, metadata={"help": "Condition on the dataset's labels (plus a null class for CFG)."}
    )
    label_dropout: float = field(
        default=0.1,
        metadata={"help": "Share of labels dropped to null, so the teacher also learns CFG's null."},
    )
    lr: float = field(default=2e-3, metadata={"help": "Adam lr."})
    lr_warmup_steps: int = field(
        default=200, metadata={"help": "Linear lr warm-up steps: the high lr is unstable on a fresh UNet."}
    )
    p_mean: float = field(default=-1.2, metadata={"help": "Mean of log sigma in the loss (EDM's value)."})
    p_std: float = field(default=1.2, metadata={"help": "Std of log sigma in the loss (EDM's value)."})
    ema_halflife_images: float = field(default=50_000.0, metadata={"help": "EMA half-life in images."})
    batch_size: int = field(default=128, metadata={"help": "Images per process and step."})
    max_steps: int = field(default=5000, metadata={"help": "Optimisation steps."})
    eval_samples: int = field(default=2000, metadata={"help": "Samples per evaluation (FD on digits)."})
    eval_nfe: int = field(default=35, metadata={"help": "Heun NFE of the evaluation sampler (EDM's 35)."})
    export_dir: str | None = field(default=None, metadata={"help": "Where to write the diffusers teacher."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f"label_dropout={self.label_dropout} must be in [0, 1]")


class TeacherRecipe(Recipe):
    def __init__(self, config: TeacherConfig) -> None:
        self.config = config

    # 1-2. data and model ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> RecipeParts:
        cfg = self.config
        dataset = load_image_dataset(
            cfg.dataset, split="train", resolution=cfg.resolution, channels=cfg.channels
        )
        first = torch.as_tensor(dataset[0]["pixel_values"])
        self.channels, self.size = first.shape[0], first.shape[-1]
        self.num_classes = None
        if cfg.class_conditional:
            if "label" not in dataset.column_names:
                raise ValueError(f"class_conditional=True but dataset {cfg.dataset!r} has no 'label' column")
            self.num_classes = int(max(dataset["label"])) + 1
        unet = build_unet(
            self.size,
            self.channels,
            cfg.block_out_channels,
            cfg.layers_per_block,
            cfg.attention,
            self.num_classes,
        )
        denoiser = Denoiser(unet, edm_scheduler())
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=torch_collate,
            num_workers=cfg.num_workers,
        )
        optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        model = TrainedModel(denoiser, optimizer, ema_halflife_images=cfg.ema_halflife_images)
        return RecipeParts(trained={"teacher": model}, dataloader=loader)

    # 3. loss -----------------------------------------------------------------------------------------
    def loss(self, phase, batch, models):
        x0 = batch["pixel_values"]
        sigma = sample_lognormal_sigmas(x0.shape[0], self.config.p_mean, self.config.p_std, device=x0.device)
        cond = None
        if self.num_classes is not None:  # the null class is num_classes
            cond = Condition(
                class_labels=drop_labels(batch["label"], self.config.label_dropout, self.num_classes)
            )
        teacher = models["teacher"]
        return edm_denoising_loss(lambda x, s: teacher(x, s, cond), x0, sigma).mean()

    # 4. evaluation and export -----------------------------------------------------------------------
    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        if not trainer.is_main:
            return {}
        ema = trainer.models.ema("teacher")
        metrics, images = evaluate_sampler(
            ema,
            self.config.eval_samples,
            nfe=self.config.eval_nfe,
            seed=0,
            num_classes=self.num_classes,
            progress_bar=self.config.progress_bar,
        )
        trainer.log_images("teacher_heun", images[:100], upscale=4)
        return metrics

    def on_train_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.is_main:
            self.export(trainer, metrics)

    def export(self, trainer: Trainer, metrics: dict[str, float]) -> Path:
        cfg = self.config
        out = Path(cfg.export_dir or Path(cfg.output_dir) / "teacher")
        ema: Denoiser = trainer.models.ema("teacher")
        ema.save_pretrained(out)
        write_model_card(
            out,
            title="EDM teacher",
            method="EDM denoising score matching (Karras et al. 2022), diffusers UNet2DModel + EDMEulerScheduler",
            facts={
                "dataset": cfg.dataset,
                "parameters": sum(p.numel() for p in ema.parameters()),
                "steps": trainer.step,
                "images_seen": trainer.images_seen,
                "batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * trainer.num_processes,
                "lr": cfg.lr,
                "ema_halflife_images": cfg.ema_halflife_images,
                **{f"eval_{k}_nfe{cfg.eval_nfe}": v for k, v in metrics.items()},
            },
            command="accelerate launch recipes/teacher.py " + " ".join(_cli_overrides(cfg)),
        )
        return out


def _cli_overrides(cfg: TeacherConfig) -> list[str]:
    """The non-default fields of ``cfg`` as command-line flags (for the model card's exact command)."""
    default = TeacherConfig()
    flags = []
    for name, value in vars(cfg).items():
        if value != getattr(default, name):
            flags += [f"--{name}", " ".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def main(argv: list[str] | None = None) -> None:
    config = parse_config(TeacherConfig, argv)
    Trainer(config, TeacherRecipe(config)).fit()


if __name__ == "__main__":
    run_main(main)
