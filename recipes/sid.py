"""Score identity Distillation: a one-step (or k-step) generator from any supported diffusers teacher.

    accelerate launch recipes/sid.py                      # the embedded default teacher, this machine
    accelerate launch recipes/sid.py --teacher PATH_OR_ID --config recipes/configs/sid_digits.yaml
    accelerate launch recipes/sid.py --config recipes/configs/sid_lora_digits.yaml   # LoRA students

Algorithm (Zhou et al. 2024, with SiD-LSG guidance for conditional teachers). The teacher f_phi is frozen; the
fake score f_psi and the generator G both start as copies of it. Each iteration is two steps (phases):

  1. fake-score step (:meth:`SiDRecipe.fake_score_step`): x_g = G(sigma_init z) without grad;
     sigma ~ LogNormal(P_mean, P_std); loss = lambda(sigma) ||f_psi(x_g + sigma n) - x_g||^2;
  2. generator step (:meth:`SiDRecipe.generator_step`): x_g = G(sigma_init z) with grad;
     t ~ U[0, max_timestep/1000] -> sigma; x_t = x_g + sigma n;
     loss = SiD(x_g, f_phi(x_t), f_psi(x_t), alpha), the gradient flowing through x_t and both scores into G;

then the EMA of G. Those are SiD's draws for EDM teachers. A teacher trained on a timestep table (discrete VP,
flow matching) is only ever asked about its trained noise levels, as in the authors' SiD-LSG code: both steps draw
t ~ U{min_timestep..max_timestep} (20..979 of 1000) from the table (``Denoiser.timestep_sigma``), and f_psi is
trained with the teacher's own objective, written on x0 (``distill.sid.losses.fake_score_weight``); G's input
levels ``step_sigmas`` must lie in the table too. Samples with non-finite values are dropped inside each loss
(mean over the rest), as the authors do.

G_ema is evaluated periodically (FD on fixed noise) and finally exported as a diffusers pipeline folder with a
model card. A k-step G (``step_sigmas`` with k entries) is sampled by
:func:`distill.sampling.student.student_sample`: in training after a random number of steps, only the last one
differentiable; in evaluation and export with all k.

``--real_data DATA`` (SiDA, Zhou et al. 2024b) adds one term to each step: f_psi's encoder is also a
discriminator (channel mean of its last down block, distill/sid/discriminator.py). Step 1 adds D's loss on real
images noised like x_g (same sigma and noise); G waits ``generator_freeze_images``, and from
``adversarial_start_images`` on step 2's loss is 0.5 SiD + 0.5 * weight * adversarial term. Class teachers:
G draws the real batch's classes in step 1; text teachers: its captions (a ``text`` column, every caption one of
the prompts; ``--real_data fashion-mnist --prompts fashion-captions`` for the shipped teachers). With guidance
(SiD-LSG + SiDA) the logits are the conditional branch's of each guided f_psi call.

``--student lora``: the teacher is loaded once and frozen; f_psi and G are the LoRA adapters "fake_score" and
"generator" on it (f_phi = the base with adapters disabled; see distill/sid/lora_student.py). Only the adapters are
trained (LoRA+ learning rates with ``loraplus_ratio`` > 1), averaged and exported: a plug-in one-step adapter
for the original teacher (distill/export/adapter.py), optionally also merged into a full pipeline folder.
"""

from __future__ import annotations

# isort: off
import engine  # noqa: F401  first: silences bitsandbytes' import-time warning before peft/diffusers load it
# isort: on

import contextlib
import copy
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import datasets
import torch
from torch.utils.data import DataLoader

from distill.data import collate_with_captions, load_image_dataset, torch_collate
from distill.evaluation.quality import QualityTracker
from distill.evaluation.text2image import tracker_kwargs
from distill.export.adapter import export_merged, save_sid_adapter
from distill.export.folders import write_then_replace
from distill.export.generator import export_generator
from distill.export.latent import check_latent_export, export_latent_student
from distill.sampling.student import student_sample
from distill.sid.discriminator import EncoderLogits, conditional_rows
from distill.sid.lora_student import (
    ADAPTERS,
    AdapterView,
    adapter_optimizer,
    adapter_parameter_names,
    add_sid_adapters,
    enable_adapter_checkpointing,
)
from distill.sid.losses import (
    FakeScoreObjective,
    batch_mean,
    discriminator_loss,
    fake_score_loss,
    generator_adversarial_loss,
    keep_finite,
    sample_generator_sigmas,
    sample_table_timesteps,
    sid_generator_loss,
)
from distill.teachers.conditions import ConditionSource, TeacherInputSettings, check_conditioning
from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.edm import sample_lognormal_sigmas
from distill.teachers.families import TeacherFamily
from distill.teachers.latents import LatentCodec, sample_shape
from distill.teachers.loading import check_teacher, load_teacher
from engine.config import TrainConfig, check_adam_betas, parse_config
from engine.launch import run_main
from engine.log import get_logger
from engine.optim import optimizer_class
from engine.recipe import LossOutput, Recipe, RecipeParts, TrainedModel
from engine.trainer import Trainer


@dataclass
class SiDConfig(TrainConfig, TeacherInputSettings):
    #: old config keys, answered by parse_config with their new names
    renamed_keys: ClassVar[dict[str, str]] = {"tmax": "max_timestep", "student_sigmas": "step_sigmas"}

    output_dir: str = field(
        default="outputs/sid",
        metadata={"help": "Run folder: checkpoints, logs, samples, the exported student."},
    )
    teacher: str = field(default="default", metadata={"help": "'default', a diffusers folder, or a hub id."})
    alpha: float = field(
        default=1.0,
        metadata={
            "help": "SiD's alpha in the generator loss; 1.0 as in SiD-LSG and SiDA (the digits student trained "
            "better with it than with the paper's CIFAR-10 1.2)."
        },
    )
    step_sigmas: list[float] = field(
        default_factory=lambda: [2.5],
        metadata={
            "help": "G's input noise level per step (k entries = a k-step student); SiD's sigma_init 2.5."
        },
    )
    noise_levels: Literal["auto", "edm", "table"] = field(
        default="auto",
        metadata={
            "help": "edm: SiD's draws (G: EDM rho-curve, f_psi: log-normal, EDM-weighted); table: the teacher's "
            "timestep table for both, f_psi on the teacher's own objective (SiD-LSG); auto: edm for EDM "
            "teachers, table for discrete VP and flow teachers, so no sigma falls outside their training."
        },
    )
    max_timestep: float | None = field(
        default=None,
        metadata={
            "help": "Largest noise timestep (0-1000 scale). edm: G's t ~ U[min, max]/1000 on the rho-curve, "
            "None = 800 (paper's t_max, sigma <= 24.4); table: both losses, None = 979 (SiD-LSG's)."
        },
    )
    min_timestep: float | None = field(
        default=None,
        metadata={
            "help": "Smallest noise timestep (0-1000 scale): None = 0 for edm draws (sigma 0.002), 20 for "
            "table draws (SiD-LSG's t_min, both losses)."
        },
    )
    p_mean: float = field(
        default=-1.2, metadata={"help": "Mean of log sigma in f_psi's loss, edm draws (EDM's value)."}
    )
    p_std: float = field(
        default=1.2, metadata={"help": "Std of log sigma in f_psi's loss, edm draws (EDM's value)."}
    )
    lr_generator: float = field(default=1e-4, metadata={"help": "Adam lr of the generator G."})
    lr_fake_score: float = field(default=1e-4, metadata={"help": "Adam lr of the fake score f_psi."})
    adam_beta1: float = field(
        default=0.0, metadata={"help": "Adam beta1 of both networks; 0 as the SiD authors use."}
    )
    adam_beta1_generator: float | None = field(
        default=None,
        metadata={"help": "Adam beta1 of G alone (None: adam_beta1); the authors use 0.9 for G on FFHQ."},
    )
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2 of both networks."})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam epsilon of both networks."})
    fake_score_updates: int = field(default=1, metadata={"help": "f_psi steps per generator step."})
    ema_halflife_images: float = field(
        default=200_000.0,
        metadata={"help": "EMA half-life of G in images; shorter ones followed G's late drift on digits."},
    )
    ema_rampup_ratio: float = field(
        default=0.5, metadata={"help": "Half-life <= ratio * images seen early on (EDM's ramp-up)."}
    )
    guidance_scale: float = field(
        default=1.0,
        metadata={
            "help": "CFG scale kappa of every guided call below left None (SiD-LSG; conditional teachers; "
            "the published runs use one value for all four)."
        },
    )
    guidance_scale_fake_train: float | None = field(
        default=None,
        metadata={
            "help": "kappa1: CFG of f_psi's output in its own loss (None: guidance_scale; cfg_train_fake)."
        },
    )
    guidance_scale_fake_difference: float | None = field(
        default=None,
        metadata={
            "help": "CFG of f_psi in G's score difference y_real - y_fake (None: guidance_scale); one half of "
            "the authors' cfg_eval_fake (their kappa2 = kappa3)."
        },
    )
    guidance_scale_fake_alpha: float | None = field(
        default=None,
        metadata={
            "help": "CFG of f_psi in G's alpha term (y_real - x_g) - alpha (y_real - y_fake) (None: "
            "guidance_scale); the other half of the authors' cfg_eval_fake."
        },
    )
    guidance_scale_teacher: float | None = field(
        default=None,
        metadata={"help": "kappa4: CFG of the teacher in G's loss (None: guidance_scale; cfg_eval_real)."},
    )
    label_dropout: float = field(
        default=0.1,
        metadata={
            "help": "Share of f_psi's conditions (labels or prompts) set to null in its step, only when one of "
            "f_psi's CFG scales is not 1 (as the authors): f_psi then learns the null score its guidance uses."
        },
    )
    num_classes: int | None = field(
        default=None,
        metadata={
            "help": "Classes of a class-conditional teacher. None: its class embeddings less the last, the null "
            "class; set it to the embedding count for a teacher without a null class (EDM CIFAR-10-cond "
            "ports), which cannot be guided."
        },
    )
    batch_size: int = field(default=128, metadata={"help": "Generated images per process and step."})
    max_steps: int = field(default=2000, metadata={"help": "Iterations (each: f_psi step(s), then G's)."})
    eval_every: int = field(default=250, metadata={"help": "Evaluate G's EMA every N steps; 0 = at the end."})
    eval_samples: int = field(default=5000, metadata={"help": "Samples per evaluation (FD on fixed noise)."})
    eval_raw_generator: bool = field(
        default=False,
        metadata={
            "help": "Also evaluate G's raw weights at each evaluation (logged as raw_fd etc.): shows what the "
            "EMA costs or gains, e.g. when its half-life is long for the budget."
        },
    )
    eval_seed: int = field(default=12345, metadata={"help": "Seed of the fixed evaluation noise."})
    fp16_initial_scale: float = field(
        default=128.0, metadata={"help": "SiD's fp16 runs use small fixed scales (1 for f_psi, 100 for G)."}
    )
    student: Literal["full", "lora"] = field(
        default="full",
        metadata={"help": "full: three teacher copies; lora: two adapters on one frozen teacher."},
    )
    lora_rank: int = field(default=16, metadata={"help": "lora: rank of both adapters."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling = lora_alpha / lora_rank."})
    lora_targets: list[str] = field(
        default_factory=list,
        metadata={
            "help": "UNet layer names to adapt (peft target_modules); empty = resnet/attention layers."
        },
    )
    loraplus_ratio: float = field(default=1.0, metadata={"help": "LoRA+: B matrices get lr * ratio (>= 1)."})
    lora_init: Literal["default", "lora_ga"] = field(
        default="default", metadata={"help": "'lora_ga' is refused: it would rewrite the shared teacher."}
    )
    lora_export_merged: bool = field(
        default=False, metadata={"help": "lora: also write the adapter merged into a full pipeline folder."}
    )
    real_data: str | None = field(
        default=None,
        metadata={
            "help": "SiDA: real images ('digits', 'fashion-mnist', a local image folder or a hub dataset) for "
            "f_psi's encoder used as a discriminator; None = data-free SiD."
        },
    )
    adversarial_weight_fake_score: float = field(
        default=1.0,
        metadata={"help": "SiDA: weight of the discriminator loss in f_psi's loss (authors' lsd/ls)."},
    )
    adversarial_weight_generator: float = field(
        default=1e-4,
        metadata={
            "help": "SiDA: weight of G's adversarial term against the SiD loss (authors' CIFAR-10 lsg_gan/lsg)."
        },
    )
    adversarial_start_images: int = field(
        default=200_000,
        metadata={"help": "SiDA: G's adversarial term starts after this many images (authors: 200k)."},
    )
    generator_freeze_images: int = field(
        default=100_000,
        metadata={
            "help": "SiDA: G waits this many images while f_psi and the discriminator warm up (authors: 100k)."
        },
    )
    fake_score_grad_value_clip: float | None = field(
        default=None,
        metadata={
            "help": "Clip each f_psi gradient value to [-c, c] before its optimiser step; None: 1 with "
            "real_data (SiDA), off without; 0 = off."
        },
    )
    teacher_dtype: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32",
        metadata={
            "help": "Storage dtype of the frozen teacher f_phi (full students: f_psi and G are copied before the "
            "cast and keep fp32 master weights; lora: the shared base is cast, the adapters stay fp32)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "diffusers' gradient checkpointing on f_psi, G and the teacher (G's loss backpropagates "
            "through the teacher's activations): recomputes block forwards in backward to save activations; "
            "lora: each recomputation runs under the adapter it first ran with."
        },
    )
    optimizer: Literal["adam", "adam8bit"] = field(
        default="adam",
        metadata={"help": "adam: torch Adam; adam8bit: bitsandbytes Adam8bit (8-bit state), both networks."},
    )
    ema_device: Literal["same", "cpu"] = field(
        default="same",
        metadata={
            "help": "Where G's EMA lives: same = G's device; cpu = host memory (updated from the device each "
            "step; moved to the device only while evaluating)."
        },
    )
    export_dir: str | None = field(
        default=None, metadata={"help": "Where to export the EMA student (default: output_dir/student)."}
    )
    export_best: bool = field(
        default=False,
        metadata={
            "help": "Also keep the EMA student of the evaluation with the lowest FD so far in "
            "<export folder>_best (rewritten whenever an evaluation beats it): SiD and SiDA drift, and the "
            "authors report the best checkpoint."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.step_sigmas or min(self.step_sigmas) <= 0:
            raise ValueError(f"step_sigmas={self.step_sigmas} must be one or more noise levels > 0")
        if self.max_timestep is not None and not 0 < self.max_timestep <= 1000:
            raise ValueError(
                f"max_timestep={self.max_timestep} must be in (0, 1000] (teacher timestep scale)"
            )
        if self.min_timestep is not None and not 0 <= self.min_timestep < (self.max_timestep or 1000):
            raise ValueError(
                f"min_timestep={self.min_timestep} must be in [0, max_timestep={self.max_timestep or 1000})"
            )
        if self.fake_score_grad_value_clip is not None and self.fake_score_grad_value_clip < 0:
            raise ValueError(f"fake_score_grad_value_clip={self.fake_score_grad_value_clip} must be >= 0")
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f"label_dropout={self.label_dropout} must be in [0, 1]")
        if self.fake_score_updates < 1:
            raise ValueError(f"fake_score_updates={self.fake_score_updates} must be >= 1")
        for name in (
            "adversarial_weight_fake_score",
            "adversarial_weight_generator",
            "adversarial_start_images",
            "generator_freeze_images",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        check_adam_betas(self, ("adam_beta1", "adam_beta1_generator", "adam_beta2"))
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 1")
        if self.loraplus_ratio < 1:
            raise ValueError(f"loraplus_ratio={self.loraplus_ratio} must be >= 1 (lr_B / lr_A)")
        if self.export_best and not self.eval_every:
            raise ValueError(
                "export_best=true keeps the student of the best evaluation, but eval_every=0 never evaluates; "
                "set eval_every > 0"
            )
        if self.student == "lora" and self.lora_init == "lora_ga":
            raise ValueError(
                "lora_init='lora_ga' is not available with student='lora': LoRA-GA keeps the model's output "
                "unchanged by subtracting s*B0*A0 from the BASE weight, and here the base is the shared teacher "
                "f_phi (and the other adapter's base), so it would change the teacher; use lora_init='default'"
            )

    def guidance_scales(self) -> dict[str, float]:
        """The four SiD-LSG CFG scales, each its own setting or ``guidance_scale``."""
        names = (
            "guidance_scale_fake_train",
            "guidance_scale_fake_difference",
            "guidance_scale_fake_alpha",
            "guidance_scale_teacher",
        )
        return {
            n: float(self.guidance_scale if getattr(self, n) is None else getattr(self, n)) for n in names
        }

    def grad_value_clip(self) -> float:
        """f_psi's gradient value clip (0 = off): the setting, or SiDA's 1."""
        if self.fake_score_grad_value_clip is not None:
            return float(self.fake_score_grad_value_clip)
        return 1.0 if self.real_data is not None else 0.0

    def adam_betas(self, network: str) -> tuple[float, float]:
        """Adam betas of ``network`` ("generator" or "fake_score"): G may have its own beta1."""
        beta1 = self.adam_beta1
        if network == "generator" and self.adam_beta1_generator is not None:
            beta1 = self.adam_beta1_generator
        return (float(beta1), float(self.adam_beta2))


class SiDRecipe(Recipe):
    """SiD on the engine: phases "fake_score" (step 1) and "generator" (step 2), each with its own optimiser."""

    #: the teacher takes its guidance scale as an input (FLUX.1-dev), set in setup
    embedded_guidance: bool = False
    #: every process runs every network in each phase; evaluation and export use G's EMA (a full copy)
    supports_fsdp = True

    def __init__(self, config: SiDConfig) -> None:
        self.config = config

    # 0. networks ---------------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> RecipeParts:
        cfg = self.config
        # refused by family name and conditioning from its configs alone, before any copy of the teacher exists
        family = check_teacher(cfg.teacher)
        check_conditioning(cfg.teacher, family, cfg.prompts, cfg.prompt_column, cfg.negative_prompt)
        if family.latent and (cfg.student == "full" or cfg.lora_export_merged):
            check_latent_export(family, len(cfg.step_sigmas))  # refused now, not after training
        # prompts are encoded (and the text encoders freed) before the teacher's weights are loaded
        prompted = self._conditions(trainer, family) if cfg.prompts is not None else None
        optimizer_cls = sid_optimizer_class(cfg.optimizer)  # a missing bitsandbytes fails before any load
        teacher = load_teacher(cfg.teacher)
        self.embedded_guidance = teacher.embedded_guidance
        # a latent teacher's samples are latents: images only at the edges (grids, metrics, SiDA's real data)
        self.codec = LatentCodec.from_teacher(family) if family.latent else None
        self.shape = sample_shape(teacher, self.codec, cfg.resolution)
        self.num_classes, self.null_label = self._classes(teacher)
        self.conditions = prompted
        if prompted is None:
            self.conditions = self._conditions(trainer, family, self.num_classes, self.null_label)
        self.scales = cfg.guidance_scales()
        self._check_guidance()
        self._noise_setup(teacher)
        if trainer.is_main:
            get_logger().info(self.describe())
        fixed = (lambda i: self.conditions.fixed(i)[0]) if self.conditions.kind == "prompts" else None
        decode = None if self.codec is None else self.codec.to(trainer.device).decode
        self.quality = QualityTracker(
            trainer,
            cfg.eval_samples,
            cfg.eval_seed,
            self.shape,
            self.num_classes,
            decode=decode,
            conditions=fixed,
            **tracker_kwargs(cfg.teacher, self.conditions.all_prompt_texts(), cfg.eval_metrics),
        )
        ema = {
            "ema_halflife_images": cfg.ema_halflife_images,
            "ema_rampup_ratio": cfg.ema_rampup_ratio,
            "ema_device": "cpu" if cfg.ema_device == "cpu" else None,
        }
        lrs = {"fake_score": cfg.lr_fake_score, "generator": cfg.lr_generator}
        self.trainer = trainer
        real_images = self._real_images() if cfg.real_data is not None else None
        if cfg.student == "lora":
            teacher.to(TEACHER_DTYPES[cfg.teacher_dtype])  # the shared base; peft adds fp32 adapters after
            parts = self._lora_parts(teacher, lrs, ema, optimizer_cls)
            if cfg.gradient_checkpointing:
                enable_adapter_checkpointing(teacher)
        else:
            # the trained copies first (fp32 master weights), then the frozen teacher in its storage dtype
            fake_score, generator = copy.deepcopy(teacher), copy.deepcopy(teacher)
            teacher.to(TEACHER_DTYPES[cfg.teacher_dtype])
            if cfg.gradient_checkpointing:
                for module in (fake_score, generator, teacher):
                    enable_checkpointing(module)

            def adam(module: torch.nn.Module, name: str) -> torch.optim.Optimizer:
                return optimizer_cls(
                    module.parameters(), lr=lrs[name], betas=cfg.adam_betas(name), eps=cfg.adam_eps
                )

            parts = RecipeParts(
                trained={
                    "fake_score": TrainedModel(fake_score, adam(fake_score, "fake_score")),
                    "generator": TrainedModel(generator, adam(generator, "generator"), **ema),
                },
                frozen={"teacher": teacher},
            )
        self.discriminator = None
        if real_images is not None:
            self.discriminator = EncoderLogits(parts.trained["fake_score"].module)
            parts.dataloader = real_images
        if cfg.grad_value_clip() > 0:
            clip_gradient_values(parts.trained["fake_score"].optimizer, cfg.grad_value_clip())
        return parts

    # teacher facts: conditions, classes, guidance, noise levels ----------------------------------------
    def _conditions(
        self,
        trainer: Trainer,
        family: TeacherFamily,
        num_classes: int | None = None,
        null_label: int | None = None,
    ) -> ConditionSource:
        """The teacher's conditions: prompts (encoded, main process first), its classes, or none."""
        cfg = self.config
        return ConditionSource.for_teacher(
            cfg.teacher,
            family,
            prompts=cfg.prompts,
            prompt_column=cfg.prompt_column,
            negative_prompt=cfg.negative_prompt,
            num_classes=num_classes,
            null_label=null_label,
            image_size=None if cfg.resolution is None else (cfg.resolution, cfg.resolution),
            accelerator=trainer.accelerator,
            cache_dir=cfg.prompt_cache_dir,
        )

    def _classes(self, teacher: Denoiser) -> tuple[int | None, int | None]:
        """(number of classes, null class or None) of the teacher, from its class embeddings and num_classes.

        The config cannot tell whether the last embedding is a null class: by default it is (teachers trained
        with CFG label dropout, as this toolkit's); ``num_classes`` = the embedding count says there is none.
        """
        embeds, wanted = teacher.num_class_embeds, self.config.num_classes
        if not embeds:
            if wanted is not None:
                raise ValueError(
                    f"num_classes={wanted} but teacher {self.config.teacher!r} has no class embeddings"
                )
            return None, None
        if wanted is None or wanted == embeds - 1:
            return embeds - 1, embeds - 1
        if wanted == embeds:
            return embeds, None
        raise ValueError(
            f"num_classes={wanted} does not fit teacher {self.config.teacher!r} with {embeds} class embeddings: "
            f"expected {embeds - 1} (the last embedding is the null class, the default) or {embeds} (no null class)"
        )

    def _check_guidance(self) -> None:
        """CFG needs a conditional teacher with a null condition (null class, or the negative prompt of a text
        teacher): refused at start-up otherwise."""
        cfg = self.config
        sources = {}  # the settings that make a scale differ from 1: its own, or guidance_scale
        for name, value in self.scales.items():
            if value != 1.0:
                source = name if getattr(cfg, name) is not None else "guidance_scale"
                sources[source] = value
        if not sources or self.conditions.kind == "prompts":  # prompts: the negative prompt is the null
            return
        settings = ", ".join(f"{k}={v:g}" for k, v in sources.items())
        if self.num_classes is None:
            raise ValueError(
                f"{settings}: classifier-free guidance needs a class-conditional teacher; "
                f"{self.config.teacher!r} is unconditional. Use 1.0"
            )
        if self.null_label is None:
            raise ValueError(
                f"{settings}: classifier-free guidance needs a null class, and teacher {self.config.teacher!r} has "
                f"none (num_classes={self.num_classes} = its class embeddings). Use 1.0, or num_classes="
                f"{self.num_classes - 1} if its last embedding is in fact a null class"
            )

    @property
    def drops_labels(self) -> bool:
        """f_psi's conditions (labels or prompts) are dropped to null only when one of f_psi's scales guides it
        (authors' rule)."""
        fake = ("guidance_scale_fake_train", "guidance_scale_fake_difference", "guidance_scale_fake_alpha")
        return self.conditions.has_null and any(self.scales[k] != 1.0 for k in fake)

    def _noise_setup(self, teacher: Denoiser) -> None:
        """Resolve the noise draws (edm or the teacher's table), their timestep range and f_psi's objective."""
        cfg = self.config
        mode = cfg.noise_levels
        if mode == "auto":
            mode = "table" if teacher.has_timestep_table else "edm"
        if mode == "table" and not teacher.has_timestep_table:
            raise ValueError(
                f"noise_levels='table': the {teacher.parameterization} teacher {cfg.teacher!r} has no timestep "
                "table; use noise_levels='edm' (or 'auto')"
            )
        self.noise_levels = mode
        if mode == "edm":
            self.timesteps = (
                0.0 if cfg.min_timestep is None else float(cfg.min_timestep),
                800.0 if cfg.max_timestep is None else float(cfg.max_timestep),
            )
            self.fake_objective: FakeScoreObjective = "edm"
            self.timestep_sigma = None
        else:
            lo = 20.0 if cfg.min_timestep is None else float(cfg.min_timestep)
            hi = 979.0 if cfg.max_timestep is None else float(cfg.max_timestep)
            steps = teacher.num_train_timesteps
            first, last = math.ceil(lo * steps / 1000), math.floor(hi * steps / 1000)
            if last > steps - 1 or first > last:
                raise ValueError(
                    f"min_timestep={lo:g}, max_timestep={hi:g} give table timesteps {first}..{last}; the teacher "
                    f"was trained on 0..{steps - 1} (of {steps}; settings are on a 0-1000 scale)"
                )
            outside = [x for x in cfg.step_sigmas if not teacher.sigma_min <= x <= teacher.sigma_max]
            if outside:
                raise ValueError(
                    f"step_sigmas {outside} lie outside the teacher's trained sigmas [{teacher.sigma_min:.4g}, "
                    f"{teacher.sigma_max:.4g}] (its timestep table); G would be asked about an untrained level"
                )
            self.timesteps = (lo, hi)
            self.table_range = (first, last)
            kind = teacher.parameterization
            self.fake_objective = "flow" if kind == "flow" else kind.removeprefix("vp-")
            self.timestep_sigma = teacher.timestep_sigma

    def describe(self) -> str:
        """One start-up line: the noise draws, f_psi's objective, the classes and the guidance."""
        lo, hi = self.timesteps
        if self.noise_levels == "edm":
            noise = f"EDM noise draws (G: t in [{lo:g}, {hi:g}]/1000 on the rho-curve; f_psi: log-normal)"
        else:
            noise = f"table noise draws t in {self.table_range[0]}..{self.table_range[1]} for both losses"
        classes = "unconditional"
        if self.num_classes is not None:
            null = "no null class" if self.null_label is None else f"null class {self.null_label}"
            classes = f"{self.num_classes} classes, {null}"
        elif self.conditions.kind == "prompts":
            classes = self.conditions.describe()
        return f"SiD: {noise}; f_psi objective {self.fake_objective}; {classes}; CFG {self.scales}"

    def noise_sigmas(self, n: int, device: torch.device, phase: str) -> torch.Tensor:
        """One noise level per sample for ``phase``'s loss (edm: SiD's draws; table: the teacher's table)."""
        if self.noise_levels == "table":
            return self.timestep_sigma(sample_table_timesteps(n, *self.table_range, device=device))
        if phase == "fake_score":
            return sample_lognormal_sigmas(n, self.config.p_mean, self.config.p_std, device=device)
        lo, hi = self.timesteps
        return sample_generator_sigmas(n, hi, device=device, min_timestep=lo)

    def _real_images(self) -> DataLoader:
        """SiDA's real images, checked against the teacher's sample shape before any training."""
        cfg = self.config
        image_shape = self.shape if self.codec is None else self.codec.image_shape_for(self.shape)
        dataset = load_image_dataset(
            cfg.real_data, split="train", resolution=image_shape[-1], channels=image_shape[0]
        )
        shape = tuple(torch.as_tensor(dataset[0]["pixel_values"]).shape)
        if shape != image_shape:
            raise ValueError(
                f"real_data {cfg.real_data!r} gives images of shape {shape}; the teacher makes {image_shape}"
            )
        if len(dataset) < cfg.batch_size:
            raise ValueError(
                f"real_data {cfg.real_data!r} has {len(dataset)} images, fewer than batch_size={cfg.batch_size}"
            )
        if self.num_classes is not None and "label" not in dataset.column_names:
            raise ValueError(
                f"real_data {cfg.real_data!r} has no 'label' column for the class-conditional teacher"
            )
        collate = torch_collate
        if self.conditions.kind == "prompts":
            dataset = self._caption_indices(dataset)
            collate = collate_with_captions
        return DataLoader(
            dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=collate
        )

    def _caption_indices(self, dataset: datasets.Dataset) -> datasets.Dataset:
        """A text teacher's real images with ``caption_index``: the row of each caption among the encoded prompts.

        G draws each real image's caption in f_psi's step, so the discriminator compares real and generated
        images under the same prompt; the text encoders are gone by now, so every caption must be one of the
        prompts (``prompts`` = the same dataset, or ``fashion-captions`` for ``fashion-mnist``).
        """
        cfg = self.config
        if "text" not in dataset.column_names:
            raise ValueError(
                f"real_data {cfg.real_data!r} has no 'text' column (captions): the text-conditioned teacher "
                f"{cfg.teacher!r} needs each real image's prompt (an imagefolder's metadata 'text', or "
                "'fashion-mnist')"
            )
        row_of = {text: i for i, text in enumerate(self.conditions.all_prompt_texts() or [])}
        captions = dataset["text"]
        missing = sorted({c for c in captions if c not in row_of})
        if missing:
            raise ValueError(
                f"real_data {cfg.real_data!r}: {len(missing)} caption(s) are not among the {len(row_of)} prompts "
                f"from {cfg.prompts!r}, e.g. {missing[0]!r}; pass prompts that hold every caption (the same "
                "dataset as prompts, or prompts=fashion-captions with real_data=fashion-mnist)"
            )
        return dataset.add_column("caption_index", [row_of[c] for c in captions])

    def _lora_parts(
        self,
        teacher: Denoiser,
        lrs: dict[str, float],
        ema: dict,
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    ) -> RecipeParts:
        """f_psi and G as adapter views of one frozen teacher; each trains (and averages) only its adapter.

        The views share one module, so each names its `parameters` and uses sync="all_reduce" (the engine
        all-reduces them itself instead of wrapping the module for DDP). The teacher view owns no parameters.
        """
        cfg = self.config
        shared = add_sid_adapters(teacher, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        trained = {}
        for name in ADAPTERS:
            view = AdapterView(shared, name)
            names = adapter_parameter_names(view, name)
            optimizer = adapter_optimizer(
                view,
                names,
                lrs[name],
                cfg.loraplus_ratio,
                optimizer_cls,
                betas=cfg.adam_betas(name),
                eps=cfg.adam_eps,
            )
            extra = ema if name == "generator" else {}
            trained[name] = TrainedModel(view, optimizer, parameters=names, sync="all_reduce", **extra)
        return RecipeParts(trained=trained, frozen={"teacher": AdapterView(shared, None)})

    def phases(self, step: int) -> list[str]:
        cfg = self.config
        fake = ["fake_score"] * cfg.fake_score_updates
        if cfg.real_data is not None and step * self.trainer.samples_per_step < cfg.generator_freeze_images:
            return fake  # SiDA: f_psi and its discriminator warm up on the initial generator first
        return fake + ["generator"]

    def loss(self, phase: str, batch: Any, models: Mapping[str, torch.nn.Module]) -> LossOutput:
        """The phase's step; ``batch`` is SiDA's real images (None for data-free SiD)."""
        step = self.fake_score_step if phase == "fake_score" else self.generator_step
        return step(batch, models)

    # the generator's samples -------------------------------------------------------------------------
    def latents(self, real: Any = None) -> tuple[torch.Tensor, Condition | None, Condition | None]:
        """A batch of G's input noise z, and for conditional teachers random conditions (labels or prompts)
        and their null (None without a null class). SiDA's f_psi step passes its ``real`` batch: G then draws
        that batch's classes (text teachers: its captions), so the discriminator compares like with like."""
        n, device = self.config.batch_size, self.quality.device
        z = torch.randn(n, *self.shape, device=device)
        if real is not None and self.discriminator is not None and self.conditions.kind != "none":
            key = "caption_index" if self.conditions.kind == "prompts" else "label"
            cond, null = self.conditions.fixed(real[key].to(device))
        else:
            cond, null = self.conditions.sample(n, device)
        return z, cond, null

    def generator_sample(self, generator: Denoiser, z: torch.Tensor, cond: Condition | None) -> torch.Tensor:
        """x_g for training: G after a random number of its k steps, only the last call differentiable.

        Each step of a k-step student is trained with the same losses; one step draws nothing.
        """
        sigmas = self.config.step_sigmas
        if len(sigmas) == 1:
            return student_sample(generator, z, sigmas, cond)
        # under FSDP every process must call G as often as the others (each call gathers its shards): the number
        # of steps is drawn from the step number, the same on every process; otherwise from each process's RNG
        shared = None if self.trainer.fsdp is None else torch.Generator().manual_seed(self.trainer.step)
        steps = int(torch.randint(len(sigmas), (), generator=shared).item()) + 1
        return student_sample(generator, z, sigmas, cond, steps=steps)

    def guided(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Condition | None,
        null: Condition | None,
        *scales: float,
    ) -> list[torch.Tensor]:
        """``model``'s x0 under each CFG scale (SiD-LSG), from one forward: null + kappa (cond - null).

        One scale (or no null condition) is one plain guided call; several run the conditional and null
        branches once, batched, and combine them per scale. A guidance-distilled teacher (FLUX.1-dev) takes each
        scale as its guidance input instead (one call per distinct scale; no null branch).
        """
        if self.embedded_guidance and cond is not None:
            by_scale = {k: model(x, sigma, cond, guidance_scale=k) for k in dict.fromkeys(scales)}
            return [by_scale[k] for k in scales]
        if null is None or cond is None:
            y = model(x, sigma, cond)
            return [y] * len(scales)
        if len(set(scales)) == 1:
            y = model(x, sigma, cond, guidance_scale=scales[0], null_cond=null)
            return [y] * len(scales)
        b = x.shape[0]
        both = model(torch.cat([x, x]), torch.cat([sigma, sigma]), Condition.cat(cond, null))
        y_cond, y_null = both[:b], both[b:]
        return [y_cond if k == 1.0 else y_null + k * (y_cond - y_null) for k in scales]

    # 1. fake-score step --------------------------------------------------------------------------------
    def fake_score_step(self, batch: Any, models: Mapping[str, torch.nn.Module]) -> LossOutput:
        """f_psi learns the denoiser of G's current samples: EDM's loss at x_g + sigma n, sigma ~ LogNormal."""
        cfg = self.config
        z, cond, null = self.latents(real=batch)
        with torch.no_grad():
            x_g = self.generator_sample(models["generator"], z, cond)
        sigma = self.noise_sigmas(len(z), z.device, "fake_score")
        noise = torch.randn_like(x_g)
        x_t = x_g + sigma.view(-1, 1, 1, 1) * noise
        train_cond = cond
        if cond is not None and self.drops_labels:
            train_cond = self.conditions.drop(cond, null, cfg.label_dropout)
        with self.discriminator_logits(self.discriminator is not None) as logits_fake:
            (y_fake,) = self.guided(
                models["fake_score"], x_t, sigma, train_cond, null, self.scales["guidance_scale_fake_train"]
            )
        (y_kept, x_kept, s_kept), dropped = keep_finite(y_fake, x_g, sigma)
        loss = batch_mean(fake_score_loss(y_kept, x_kept, s_kept, objective=self.fake_objective))
        extra = {"nonfinite_samples": dropped.float()}
        if self.discriminator is None:
            return loss, extra
        fake_logits = conditional_rows(logits_fake[-1], len(z))
        d_loss = self.discriminator_term(batch, models, sigma, noise, train_cond, fake_logits)
        total = loss + cfg.adversarial_weight_fake_score * d_loss
        return total, {"score_loss": loss.detach(), "discriminator_loss": d_loss.detach(), **extra}

    # 2. generator step ---------------------------------------------------------------------------------
    def generator_step(self, batch: Any, models: Mapping[str, torch.nn.Module]) -> LossOutput:
        """G follows f_phi - f_psi: SiD's loss at x_t = x_g + sigma n, through both scores into G."""
        cfg = self.config
        z, cond, null = self.latents()
        x_g = self.generator_sample(models["generator"], z, cond)
        sigma = self.noise_sigmas(len(z), z.device, "generator")
        x_t = x_g + sigma.view(-1, 1, 1, 1) * torch.randn_like(x_g)
        (y_real,) = self.guided(
            models["teacher"], x_t, sigma, cond, null, self.scales["guidance_scale_teacher"]
        )
        adversarial = (
            self.discriminator is not None and self.trainer.images_seen >= cfg.adversarial_start_images
        )
        with self.discriminator_logits(adversarial) as logits_fake:
            y_fake, y_fake_alpha = self.guided(
                models["fake_score"],
                x_t,
                sigma,
                cond,
                null,
                self.scales["guidance_scale_fake_difference"],
                self.scales["guidance_scale_fake_alpha"],
            )
        extra = {"x_g_std": x_g.detach().float().std()}
        tensors = [x_g, y_real, y_fake] + ([] if y_fake_alpha is y_fake else [y_fake_alpha])
        if adversarial:
            tensors.append(conditional_rows(logits_fake[-1], len(z)))
        kept, dropped = keep_finite(*tensors)
        x_g, y_real, y_fake = kept[:3]
        y_fake_alpha = kept[3] if len(kept) > 3 + adversarial else None
        loss = batch_mean(sid_generator_loss(x_g, y_real, y_fake, cfg.alpha, y_fake_alpha=y_fake_alpha))
        extra["nonfinite_samples"] = dropped.float()
        if not adversarial:
            return loss, extra
        gan = generator_adversarial_loss(kept[-1], x_g, y_real)
        extra |= {"sid_loss": loss.detach(), "adversarial_loss": gan.detach()}
        return 0.5 * loss + 0.5 * cfg.adversarial_weight_generator * gan, extra  # SiDA's 0.5/0.5 mix

    # SiDA's addition to both steps: f_psi's encoder as a discriminator ---------------------------------
    def discriminator_logits(self, active: bool) -> contextlib.AbstractContextManager[list[torch.Tensor]]:
        """Records the encoder logits of the f_psi calls inside it when ``active`` (SiDA), else nothing."""
        return self.discriminator.capture() if active else contextlib.nullcontext([])

    def discriminator_term(
        self,
        batch: Any,
        models: Mapping[str, torch.nn.Module],
        sigma: torch.Tensor,
        noise: torch.Tensor,
        cond: Condition | None,
        logits_fake: torch.Tensor,
    ) -> torch.Tensor:
        """D's loss: real images noised like x_g (same sigma and noise, same conditions, unguided: a guided call's
        conditional branch) against the generated ones."""
        x_real = batch["pixel_values"].to(noise.device, noise.dtype)
        if self.codec is not None:  # the discriminator sees real images as the teacher's latents
            x_real = self.codec.encode(x_real).to(noise.device, noise.dtype)
        with self.discriminator_logits(True) as logits_real:
            models["fake_score"](x_real + sigma.view(-1, 1, 1, 1) * noise, sigma, cond)
        return discriminator_loss(logits_real[-1], logits_fake, sigma)

    # 3. evaluation and export -------------------------------------------------------------------------
    @contextlib.contextmanager
    def ema_generator(self, trainer: Trainer) -> Iterator[Denoiser]:
        """G with its EMA weights (lora: the EMA adapter swapped into the shared model for the duration; an EMA
        kept on the CPU (``ema_device=cpu``) is on the training device only for the duration)."""
        if self.config.student != "lora":
            ema = trainer.models.ema("generator")
            home = next(ema.parameters()).device
            if home == trainer.device:
                yield ema
                return
            try:
                yield ema.to(trainer.device)
            finally:
                ema.to(home)
            return
        view = trainer.accelerator.unwrap_model(trainer.trained["generator"].module)
        with trainer.emas["generator"].applied(view):
            yield view

    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        """FD etc. of G's EMA with all k steps (the exported sampler), on fixed noise; with
        ``eval_raw_generator`` also of G's raw weights (``raw_`` keys; not tracked as the best)."""
        sigmas = self.config.step_sigmas
        with self.ema_generator(trainer) as ema:
            metrics = self.quality.evaluate(
                lambda z, c: student_sample(ema, z, sigmas, c), tag="generator_ema"
            )
        if self.config.eval_raw_generator:
            raw = trainer.accelerator.unwrap_model(trainer.trained["generator"].module)
            was_training = raw.training
            raw.eval()
            try:
                side = self.quality.evaluate(
                    lambda z, c: student_sample(raw, z, sigmas, c), tag="generator", track=False
                )
            finally:
                raw.train(was_training)
            metrics.update({f"raw_{k}": v for k, v in side.items()})
        if self.config.export_best and self.is_new_best(trainer, metrics):
            final = self.export_folder()
            self.export(trainer, final.with_name(f"{final.name}_best"), metrics, "best")
        return metrics

    def is_new_best(self, trainer: Trainer, metrics: dict[str, float]) -> bool:
        """Whether this evaluation (main process) set the tracker's best FD."""
        best = self.quality.best
        return (
            "fd" in metrics and best.get("images_seen") == trainer.images_seen and best["fd"] == metrics["fd"]
        )

    def card_facts(
        self, trainer: Trainer, metrics: dict[str, float], metrics_name: str = "final"
    ) -> dict[str, Any]:
        """The exported model card's facts: the settings that define the student and how far it trained."""
        cfg = self.config
        sida = cfg.real_data is not None
        lo, hi = self.timesteps
        facts = {
            "method": "SiDA" if sida else "SiD",
            "alpha": cfg.alpha,
            "num_steps": len(cfg.step_sigmas),
            "step_sigmas": json.dumps(cfg.step_sigmas),
            "noise_levels": self.noise_levels,
            "min_timestep": lo,
            "max_timestep": hi,
            "fake_score_objective": self.fake_objective,
            "training_steps": trainer.step,
            "generated_images_seen": trainer.images_seen,
            "guidance_scale": cfg.guidance_scale,
            **self.scales,
            **({"num_classes": self.num_classes, "null_class": self.null_label} if self.num_classes else {}),
            **(
                {
                    "prompts": cfg.prompts,
                    "num_prompts": self.conditions.num_prompts,
                    "negative_prompt": cfg.negative_prompt,
                }
                if self.conditions.kind == "prompts"
                else {}
            ),
            **({"fake_score_grad_value_clip": cfg.grad_value_clip()} if cfg.grad_value_clip() else {}),
            "lr_generator": cfg.lr_generator,
            "lr_fake_score": cfg.lr_fake_score,
            "adam_betas_generator": json.dumps(cfg.adam_betas("generator")),
            "adam_betas_fake_score": json.dumps(cfg.adam_betas("fake_score")),
            "lr_decay": f"linear from {cfg.lr_decay_start:g} of the run to {cfg.lr_decay_final:g}x"
            if cfg.lr_decay_start < 1
            else "none",
            "ema_halflife_images": cfg.ema_halflife_images,
            **({"real_data": cfg.real_data} if sida else {}),
            **{f"{metrics_name}_{k}": v for k, v in metrics.items()},
            **{f"best_{k}": v for k, v in self.quality.best.items()},
        }
        if cfg.student == "lora":
            facts |= {
                "lora_rank": cfg.lora_rank,
                "lora_alpha": cfg.lora_alpha,
                "loraplus_ratio": cfg.loraplus_ratio,
            }
        return facts

    def on_train_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.is_main:
            self.export(trainer, self.export_folder(), metrics, "final")

    def export_folder(self) -> Path:
        return Path(self.config.export_dir or Path(self.config.output_dir) / "student")

    def export(self, trainer: Trainer, out: Path, metrics: dict[str, float], metrics_name: str) -> None:
        """Write the EMA student to ``out`` (main process) through a sibling ``.partial`` folder, so a crash
        mid-export leaves the previous export whole; ``lora_export_merged`` adds ``<out>_merged``. The card
        records ``metrics`` as ``<metrics_name>_*`` (final, or best)."""
        facts = self.card_facts(trainer, metrics, metrics_name)
        write_then_replace(out, lambda folder: self.write_student(trainer, folder, facts))
        if self.config.student == "lora" and self.config.lora_export_merged:
            merged = out.with_name(f"{out.name}_merged")
            write_then_replace(merged, lambda folder: export_merged(out, folder, facts=facts))

    def write_student(self, trainer: Trainer, out: Path, facts: dict[str, Any]) -> None:
        """The exported folder: a LoRA adapter, the teacher's pipeline with the student's denoiser, or a
        generator folder, with a model card holding ``facts``."""
        cfg = self.config
        sida = cfg.real_data is not None
        name = "Adversarial Score identity Distillation (SiDA)" if sida else "Score identity Distillation"
        if cfg.student == "lora":
            with self.ema_generator(trainer) as ema:
                save_sid_adapter(
                    ema.shared.model,
                    out,
                    adapter_name="generator",
                    step_sigmas=cfg.step_sigmas,
                    teacher=cfg.teacher,
                    method=f"{name} (Zhou et al. 2024), generator LoRA on the frozen teacher, EMA",
                    facts=facts,
                    sample_grid=self.quality.last_grid,
                )
            return
        if self.codec is not None:  # the teacher's own pipeline class with the student's denoiser
            export_latent_student(
                trainer.models.ema("generator"),
                out,
                step_sigmas=cfg.step_sigmas,
                teacher=cfg.teacher,
                method=f"{name} (Zhou et al. 2024), EMA generator",
                facts=facts,
                sample_grid=self.quality.last_grid,
            )
            return
        export_generator(
            trainer.models.ema("generator"),
            out,
            step_sigmas=cfg.step_sigmas,
            base_model=cfg.teacher,
            method=f"{name} (Zhou et al. 2024), EMA generator",
            facts=facts,
            sample_grid=self.quality.last_grid,
        )


#: --teacher_dtype: the frozen teacher's storage dtype
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sid_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimiser class of ``--optimizer``: torch Adam, or bitsandbytes' Adam8bit (8-bit moments for
    tensors of >= 4096 values, 32-bit for smaller ones, as bitsandbytes does by default)."""
    return optimizer_class(name, ("adam", "adam8bit"))


def enable_checkpointing(denoiser: Denoiser) -> None:
    """diffusers' gradient checkpointing on ``denoiser``'s model (its default torch checkpoint function).

    Active whenever grad mode is on, whether or not the model's parameters require grad (diffusers checks
    ``torch.is_grad_enabled()`` only), so on the frozen teacher it drops the activations G's loss
    backpropagates through; under ``torch.no_grad`` (G's sample in f_psi's step) nothing is recomputed.
    """
    model = denoiser.model
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient_checkpointing: the teacher's {type(model).__name__} does not support diffusers' gradient "
            "checkpointing; set gradient_checkpointing=false"
        )
    model.enable_gradient_checkpointing()


def clip_gradient_values(optimizer: torch.optim.Optimizer, limit: float) -> Any:
    """Clamp every gradient value of ``optimizer``'s parameters to [-limit, limit] right before each of its
    steps (a torch step pre-hook, so after the engine's unscaling, non-finite handling, norm clipping and
    gradient sync; under DeepSpeed it sees the optimiser's own flat partitions, where a value clip is the same).
    Returns the hook handle."""

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.clamp_(-limit, limit)

    return optimizer.register_step_pre_hook(hook)


def main(argv: list[str] | None = None) -> None:
    config = parse_config(SiDConfig, argv)
    Trainer(config, SiDRecipe(config)).fit()


if __name__ == "__main__":
    run_main(main)
