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

then the EMA of G. G_ema is evaluated periodically (FD on fixed noise) and finally exported as a diffusers
pipeline folder with a model card. A k-step G (``step_sigmas`` with k entries) is sampled by
:func:`distill.sampling.student.student_sample`: in training after a random number of steps, only the last one
differentiable; in evaluation and export with all k.

``--real_data DATA`` (SiDA, Zhou et al. 2024b) adds one term to each step: f_psi's encoder is also a
discriminator (channel mean of its last down block, distill/sid/discriminator.py). Step 1 adds D's loss on real
images noised like x_g (same sigma and noise); G waits ``generator_freeze_images``, and from
``adversarial_start_images`` on step 2's loss is 0.5 SiD + 0.5 * weight * adversarial term.

``--student lora``: the teacher is loaded once and frozen; f_psi and G are the LoRA adapters "fake_score" and
"generator" on it (f_phi = the base with adapters disabled; see distill/sid/lora_student.py). Only the adapters are
trained (LoRA+ learning rates with ``loraplus_ratio`` > 1), averaged and exported: a plug-in one-step adapter
for the original teacher (distill/export/adapter.py), optionally also merged into a full pipeline folder.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import DataLoader

from distill.data import load_image_dataset, torch_collate
from distill.evaluation.quality import QualityTracker
from distill.export.adapter import export_merged, save_sid_adapter
from distill.export.generator import export_generator
from distill.sampling.student import student_sample
from distill.sid.discriminator import EncoderLogits
from distill.sid.lora_student import (
    ADAPTERS,
    AdapterView,
    adapter_optimizer,
    adapter_parameter_names,
    add_sid_adapters,
)
from distill.sid.losses import (
    discriminator_loss,
    fake_score_loss,
    generator_adversarial_loss,
    sample_generator_sigmas,
    sid_generator_loss,
)
from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.edm import drop_labels, sample_lognormal_sigmas
from distill.teachers.loading import UNTEXTED, check_teacher, load_teacher
from engine.config import TrainConfig, check_adam_betas, parse_config
from engine.launch import run_main
from engine.recipe import LossOutput, Recipe, RecipeParts, TrainedModel
from engine.trainer import Trainer


@dataclass
class SiDConfig(TrainConfig):
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
    max_timestep: float = field(
        default=800.0,
        metadata={
            "help": "Generator loss noise: t ~ U[0, max_timestep/1000] on EDM's rho-curve (teacher's 0-1000 "
            "scale); the paper's t_max = 800, sigma <= 24.4."
        },
    )
    p_mean: float = field(default=-1.2, metadata={"help": "Mean of log sigma in f_psi's loss (EDM's value)."})
    p_std: float = field(default=1.2, metadata={"help": "Std of log sigma in f_psi's loss (EDM's value)."})
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
        default=1.0, metadata={"help": "CFG scale kappa of f_phi and f_psi (SiD-LSG; conditional teachers)."}
    )
    label_dropout: float = field(
        default=0.1,
        metadata={
            "help": "Share of f_psi's labels set to null in its step, so it learns the null score CFG uses."
        },
    )
    num_classes: int | None = field(
        default=None,
        metadata={
            "help": "Classes of a class-conditional teacher (default: its class embeddings less the null)."
        },
    )
    batch_size: int = field(default=128, metadata={"help": "Generated images per process and step."})
    max_steps: int = field(default=2000, metadata={"help": "Iterations (each: f_psi step(s), then G's)."})
    eval_every: int = field(default=250, metadata={"help": "Evaluate G's EMA every N steps; 0 = at the end."})
    eval_samples: int = field(default=5000, metadata={"help": "Samples per evaluation (FD on fixed noise)."})
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
            "help": "SiDA: real images ('digits', a local image folder or a hub dataset) for f_psi's encoder "
            "used as a discriminator; None = data-free SiD."
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
    export_dir: str | None = field(
        default=None, metadata={"help": "Where to export the EMA student (default: output_dir/student)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.step_sigmas or min(self.step_sigmas) <= 0:
            raise ValueError(f"step_sigmas={self.step_sigmas} must be one or more noise levels > 0")
        if not 0 < self.max_timestep <= 1000:
            raise ValueError(
                f"max_timestep={self.max_timestep} must be in (0, 1000] (teacher timestep scale)"
            )
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
        if self.real_data is not None and self.guidance_scale != 1.0:
            raise ValueError(
                f"real_data (SiDA) with guidance_scale={self.guidance_scale} is not supported: the encoder "
                "discriminator is defined for unguided scores; use guidance_scale=1.0 or drop real_data"
            )
        check_adam_betas(self, ("adam_beta1", "adam_beta1_generator", "adam_beta2"))
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 1")
        if self.loraplus_ratio < 1:
            raise ValueError(f"loraplus_ratio={self.loraplus_ratio} must be >= 1 (lr_B / lr_A)")
        if self.student == "lora" and self.lora_init == "lora_ga":
            raise ValueError(
                "lora_init='lora_ga' is not available with student='lora': LoRA-GA keeps the model's output "
                "unchanged by subtracting s*B0*A0 from the BASE weight, and here the base is the shared teacher "
                "f_phi (and the other adapter's base), so it would change the teacher; use lora_init='default'"
            )

    def adam_betas(self, network: str) -> tuple[float, float]:
        """Adam betas of ``network`` ("generator" or "fake_score"): G may have its own beta1."""
        beta1 = self.adam_beta1
        if network == "generator" and self.adam_beta1_generator is not None:
            beta1 = self.adam_beta1_generator
        return (float(beta1), float(self.adam_beta2))


class SiDRecipe(Recipe):
    """SiD on the engine: phases "fake_score" (step 1) and "generator" (step 2), each with its own optimiser."""

    def __init__(self, config: SiDConfig) -> None:
        self.config = config

    # 0. networks ---------------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> RecipeParts:
        cfg = self.config
        # refused by family name from its configs alone, before any copy of the teacher exists
        check_teacher(cfg.teacher, conditioning=UNTEXTED)
        teacher = load_teacher(cfg.teacher)
        self.shape = (teacher.in_channels, teacher.sample_size, teacher.sample_size)
        self.num_classes = cfg.num_classes if cfg.num_classes is not None else teacher.num_classes
        self.quality = QualityTracker(trainer, cfg.eval_samples, cfg.eval_seed, self.shape, self.num_classes)
        ema = {"ema_halflife_images": cfg.ema_halflife_images, "ema_rampup_ratio": cfg.ema_rampup_ratio}
        lrs = {"fake_score": cfg.lr_fake_score, "generator": cfg.lr_generator}
        self.trainer = trainer
        real_images = self._real_images() if cfg.real_data is not None else None
        if cfg.student == "lora":
            parts = self._lora_parts(teacher, lrs, ema)
        else:
            fake_score, generator = copy.deepcopy(teacher), copy.deepcopy(teacher)

            def adam(module: torch.nn.Module, name: str) -> torch.optim.Optimizer:
                return torch.optim.Adam(
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
        return parts

    def _real_images(self) -> DataLoader:
        """SiDA's real images, checked against the teacher's sample shape before any training."""
        cfg = self.config
        dataset = load_image_dataset(
            cfg.real_data, split="train", resolution=self.shape[-1], channels=self.shape[0]
        )
        shape = tuple(torch.as_tensor(dataset[0]["pixel_values"]).shape)
        if shape != self.shape:
            raise ValueError(
                f"real_data {cfg.real_data!r} gives images of shape {shape}; the teacher samples {self.shape}"
            )
        if len(dataset) < cfg.batch_size:
            raise ValueError(
                f"real_data {cfg.real_data!r} has {len(dataset)} images, fewer than batch_size={cfg.batch_size}"
            )
        if self.num_classes is not None and "label" not in dataset.column_names:
            raise ValueError(
                f"real_data {cfg.real_data!r} has no 'label' column for the class-conditional teacher"
            )
        return DataLoader(
            dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=torch_collate
        )

    def _lora_parts(self, teacher: Denoiser, lrs: dict[str, float], ema: dict) -> RecipeParts:
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
                torch.optim.Adam,
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
    def latents(self) -> tuple[torch.Tensor, Condition | None, Condition | None]:
        """A batch of G's input noise z, and for class-conditional teachers random labels and their null."""
        n, device = self.config.batch_size, self.quality.device
        z = torch.randn(n, *self.shape, device=device)
        if self.num_classes is None:
            return z, None, None
        labels = torch.randint(0, self.num_classes, (n,), device=device)
        return (
            z,
            Condition(class_labels=labels),
            Condition(class_labels=torch.full_like(labels, self.num_classes)),
        )

    def generator_sample(self, generator: Denoiser, z: torch.Tensor, cond: Condition | None) -> torch.Tensor:
        """x_g for training: G after a random number of its k steps, only the last call differentiable.

        Each step of a k-step student is trained with the same losses; one step draws nothing.
        """
        sigmas = self.config.step_sigmas
        steps = int(torch.randint(len(sigmas), ()).item()) + 1 if len(sigmas) > 1 else 1
        return student_sample(generator, z, sigmas, cond, steps=steps)

    def guidance(self, null: Condition | None) -> dict[str, Any]:
        """SiD-LSG: f_phi and f_psi are both called with the CFG scale kappa (conditional teachers)."""
        return {} if null is None else {"guidance_scale": self.config.guidance_scale, "null_cond": null}

    # 1. fake-score step --------------------------------------------------------------------------------
    def fake_score_step(self, batch: Any, models: Mapping[str, torch.nn.Module]) -> LossOutput:
        """f_psi learns the denoiser of G's current samples: EDM's loss at x_g + sigma n, sigma ~ LogNormal."""
        cfg = self.config
        z, cond, null = self.latents()
        if self.discriminator is not None and cond is not None:  # SiDA: G draws the real batch's classes
            cond = Condition(class_labels=batch["label"].to(z.device))
        with torch.no_grad():
            x_g = self.generator_sample(models["generator"], z, cond)
        sigma = sample_lognormal_sigmas(len(z), cfg.p_mean, cfg.p_std, device=z.device)
        noise = torch.randn_like(x_g)
        x_t = x_g + sigma.view(-1, 1, 1, 1) * noise
        train_cond = None
        if cond is not None:
            labels = drop_labels(cond.class_labels, cfg.label_dropout, self.num_classes)
            train_cond = Condition(class_labels=labels)
        with self.discriminator_logits(self.discriminator is not None) as logits_fake:
            y_fake = models["fake_score"](x_t, sigma, train_cond, **self.guidance(null))
        loss = fake_score_loss(y_fake, x_g, sigma).mean()
        if self.discriminator is None:
            return loss
        d_loss = self.discriminator_term(batch, models, sigma, noise, cond, logits_fake[-1])
        total = loss + cfg.adversarial_weight_fake_score * d_loss
        return total, {"score_loss": loss.detach(), "discriminator_loss": d_loss.detach()}

    # 2. generator step ---------------------------------------------------------------------------------
    def generator_step(self, batch: Any, models: Mapping[str, torch.nn.Module]) -> LossOutput:
        """G follows f_phi - f_psi: SiD's loss at x_t = x_g + sigma n, through both scores into G."""
        cfg = self.config
        z, cond, null = self.latents()
        x_g = self.generator_sample(models["generator"], z, cond)
        sigma = sample_generator_sigmas(len(z), cfg.max_timestep, device=z.device)
        x_t = x_g + sigma.view(-1, 1, 1, 1) * torch.randn_like(x_g)
        y_real = models["teacher"](x_t, sigma, cond, **self.guidance(null))
        adversarial = (
            self.discriminator is not None and self.trainer.images_seen >= cfg.adversarial_start_images
        )
        with self.discriminator_logits(adversarial) as logits_fake:
            y_fake = models["fake_score"](x_t, sigma, cond, **self.guidance(null))
        loss = sid_generator_loss(x_g, y_real, y_fake, cfg.alpha).mean()
        extra = {"x_g_std": x_g.detach().float().std()}
        if not adversarial:
            return loss, extra
        gan = generator_adversarial_loss(logits_fake[-1], x_g, y_real)
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
        """D's loss: real images noised like x_g (same sigma and noise) against the generated ones."""
        x_real = batch["pixel_values"].to(noise.device, noise.dtype)
        with self.discriminator_logits(True) as logits_real:
            models["fake_score"](x_real + sigma.view(-1, 1, 1, 1) * noise, sigma, cond)
        return discriminator_loss(logits_real[-1], logits_fake, sigma)

    # 3. evaluation and export -------------------------------------------------------------------------
    @contextlib.contextmanager
    def ema_generator(self, trainer: Trainer) -> Iterator[Denoiser]:
        """G with its EMA weights (lora: the EMA adapter swapped into the shared model for the duration)."""
        if self.config.student != "lora":
            yield trainer.models.ema("generator")
            return
        view = trainer.accelerator.unwrap_model(trainer.trained["generator"].module)
        with trainer.emas["generator"].applied(view):
            yield view

    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        """FD etc. of G's EMA with all k steps (the exported sampler), on fixed noise."""
        sigmas = self.config.step_sigmas
        with self.ema_generator(trainer) as ema:
            return self.quality.evaluate(lambda z, c: student_sample(ema, z, sigmas, c), tag="generator_ema")

    def card_facts(self, trainer: Trainer, metrics: dict[str, float]) -> dict[str, Any]:
        """The exported model card's facts: the settings that define the student and how far it trained."""
        cfg = self.config
        sida = cfg.real_data is not None
        facts = {
            "method": "SiDA" if sida else "SiD",
            "alpha": cfg.alpha,
            "num_steps": len(cfg.step_sigmas),
            "step_sigmas": json.dumps(cfg.step_sigmas),
            "max_timestep": cfg.max_timestep,
            "training_steps": trainer.step,
            "generated_images_seen": trainer.images_seen,
            "guidance_scale": cfg.guidance_scale,
            "lr_generator": cfg.lr_generator,
            "lr_fake_score": cfg.lr_fake_score,
            "adam_betas_generator": json.dumps(cfg.adam_betas("generator")),
            "adam_betas_fake_score": json.dumps(cfg.adam_betas("fake_score")),
            "lr_decay": f"linear from {cfg.lr_decay_start:g} of the run to {cfg.lr_decay_final:g}x"
            if cfg.lr_decay_start < 1
            else "none",
            "ema_halflife_images": cfg.ema_halflife_images,
            **({"real_data": cfg.real_data} if sida else {}),
            **{f"final_{k}": v for k, v in metrics.items()},
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
        if not trainer.is_main:
            return
        cfg = self.config
        out = Path(cfg.export_dir or Path(cfg.output_dir) / "student")
        facts = self.card_facts(trainer, metrics)
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
            if cfg.lora_export_merged:
                export_merged(out, out.parent / f"{out.name}_merged", facts=facts)
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


def main(argv: list[str] | None = None) -> None:
    config = parse_config(SiDConfig, argv)
    Trainer(config, SiDRecipe(config)).fit()


if __name__ == "__main__":
    run_main(main)
