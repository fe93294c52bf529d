"""Rectified-flow reflow: teacher ODE pairs -> straight (k-rectified) flow -> one- or few-step student.

    accelerate launch recipes/reflow.py --config recipes/configs/reflow_digits.yaml           # all stages
    accelerate launch recipes/reflow.py --stage pairs --num_pairs 50000                       # one stage
    accelerate launch recipes/reflow.py --stage reflow --resume_from latest

Stages (``--stage all`` runs them in order, skipping training stages whose export is complete; the stage runner
and the folders are :mod:`distill.reflow.stages`):

1. ``pairs`` (round r): unit noise z, x = ODE(sigma_max z) from the round's source model (round 1: the teacher's
   probability-flow ODE with Heun, guidance applied for conditional teachers; round r > 1: the r-RF model with
   Euler), written as resumable Arrow shards by all processes (:mod:`distill.reflow.pairs`) into
   ``output_dir/pairs_r{r}``.
2. ``reflow`` (round r): the (r+1)-rectified flow, a copy of the round's source model trained on its pairs: at
   ``x_t = (1 - t) x + t z`` the velocity ``v = (x_t - D(x_t / (1 - t), t / (1 - t))) / t`` is regressed onto
   ``z - x`` (L2 or pseudo-Huber), t from a uniform / logit-normal / U-shaped distribution on
   ``[t_min, t_max]``. Straightness before and after is measured; the EMA model is exported to
   ``output_dir/reflow_r{r}/model``. ``rectified_k`` = k gives k - 1 rounds.
3. ``distill``: the student starts from the k-RF model and is trained on the last round's pairs to map the
   sampler's start ``t_max z`` straight to ``x`` (``x_hat = x_t - t v``, L2 or pseudo-Huber); with
   ``num_steps`` = N > 1 on the N-point grid of Liu et al. Exported to ``output_dir/distill/student``.

Latent teachers (DiT, LDM, SD, SDXL, SD3, PixArt, Sana, Flux): pairs, models and losses are in latent space
(``--resolution`` in image pixels where the teacher has no sample size, Flux); evaluation grids are decoded by
the teacher's autoencoder, and every export is the teacher's own pipeline folder
(:func:`distill.export.latent.export_latent_student`, one step ``D(sigma_max z, sigma_max)``). Text teachers take
``--prompts`` (as SiD): round-1 pairs are made with the guided teacher (``guidance_scale``, null = the negative
prompt), each pair keeps its prompt's row, and the flows and the student are trained on that prompt's
embedding, so the student needs no guidance when sampling.

:class:`ReflowRecipe` is one training stage (2 or 3) on the engine. Sampling (all exports,
:class:`distill.pipelines.RectifiedFlowPipeline`): Euler in flow time from ``x = sigma_max z``, i.e. one step is
``D(sigma_max z, sigma_max)`` with sigma_max the pairs' (80 for EDM).
"""

from __future__ import annotations

# isort: off
import engine  # noqa: F401  first: silences bitsandbytes' import-time warning before peft/diffusers load it
# isort: on

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import DataLoader

from distill.evaluation.quality import QualityTracker
from distill.evaluation.text2image import tracker_kwargs
from distill.export.flow import DONE_FILE, export_flow_model
from distill.export.latent import export_latent_student
from distill.export.model_card import describe_teacher
from distill.reflow.flow import (
    distill_loss,
    euler_on_sigmas,
    flow_sigmas,
    flow_time_grid,
    reflow_loss,
    sample_flow_times,
    straightness,
    velocity_from_denoiser,
)
from distill.reflow.pairs import load_pairs
from distill.reflow.stages import TrainingStage, prompt_cache_key, prompt_source, run
from distill.teachers.conditions import ConditionSource, TeacherInputSettings
from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.latents import LatentCodec
from distill.teachers.loading import check_teacher, load_teacher
from engine.config import TrainConfig, check_adam_betas, parse_config
from engine.launch import run_main
from engine.optim import optimizer_class
from engine.recipe import Recipe, RecipeParts, TrainedModel
from engine.trainer import Trainer

Stage = Literal["all", "pairs", "reflow", "distill"]
#: --optimizer's choices (the training stages' Adam, full or 8-bit state)
REFLOW_OPTIMIZERS = ("adam", "adam8bit")


@dataclass
class ReflowConfig(TrainConfig, TeacherInputSettings):
    """All stages' settings. ``max_steps`` / ``max_minutes`` are set per training stage from ``reflow_*`` and
    ``distill_*``; each stage runs the engine in its own folder under ``output_dir``."""

    #: old config keys, answered by parse_config with their new names
    renamed_keys: ClassVar[dict[str, str]] = {"student_steps": "num_steps", "eval_steps": "eval_nfes"}

    output_dir: str = field(
        default="outputs/reflow", metadata={"help": "Folder of every stage: pairs_rR, reflow_rR, distill."}
    )
    stage: Stage = field(default="all", metadata={"help": "pairs, reflow, distill, or all of them in order."})
    teacher: str = field(default="default", metadata={"help": "'default', a diffusers folder, or a hub id."})
    rectified_k: int = field(
        default=2,
        metadata={
            "help": "k of the k-rectified flow: k - 1 reflow rounds; 2 as Liu et al. (more gain little)."
        },
    )
    round: int = field(default=1, metadata={"help": "Round of a single pairs/reflow stage (1 .. k - 1)."})
    num_classes: int | None = field(
        default=None, metadata={"help": "Classes (default: the teacher's class embeddings less the null)."}
    )
    guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale baked into round-1 pairs."})
    # pairs
    num_pairs: int = field(default=20_000, metadata={"help": "Pairs per round (the reflow's training set)."})
    pairs_shard_size: int = field(
        default=1000, metadata={"help": "Pairs per Arrow shard (the unit of resuming and of splitting work)."}
    )
    pairs_batch_size: int = field(default=500, metadata={"help": "ODE batch inside a shard (fixed per set)."})
    pairs_sampler: Literal["heun", "euler"] = field(
        default="heun", metadata={"help": "Round-1 teacher ODE solver (EDM's Heun: accurate at low NFE)."}
    )
    pairs_nfe: int = field(default=35, metadata={"help": "Teacher NFE per pair (Heun: odd; EDM's 35)."})
    pairs_sigma_max: float | None = field(default=None, metadata={"help": "ODE start (default: 80 or less)."})
    pairs_seed: int = field(default=0, metadata={"help": "Seed of the pairs' noise (per pair index)."})
    pairs_minutes: float = field(
        default=0.0, metadata={"help": "Stop generating at a shard boundary after this; 0 = no limit."}
    )
    later_pairs_steps: int = field(
        default=8, metadata={"help": "Euler steps of the r-RF for round r > 1 pairs (it is nearly straight)."}
    )
    pairs_dir: str | None = field(
        default=None, metadata={"help": "Single stages: pair folder (default output_dir/pairs_rR)."}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "Single stages: source model (default: by round)."}
    )
    # reflow
    time_distribution: Literal["uniform", "logit_normal", "u_shaped"] = field(
        default="u_shaped",
        metadata={
            "help": "Reflow training times; U-shaped (Lee et al. 2024) weights the hard ends of the path."
        },
    )
    t_min: float = field(default=1e-3, metadata={"help": "Smallest training time (velocity divides by t)."})
    logit_mean: float = field(default=0.0, metadata={"help": "logit_normal: mean of logit(t)."})
    logit_std: float = field(default=1.0, metadata={"help": "logit_normal: std of logit(t)."})
    u_shape_a: float = field(default=4.0, metadata={"help": "u_shaped: steepness a (Lee et al.'s 4)."})
    loss: Literal["l2", "pseudo_huber"] = field(default="l2", metadata={"help": "Reflow regression loss."})
    huber_c: float | None = field(
        default=None, metadata={"help": "Pseudo-Huber c (default 0.00054 sqrt(d), as iCT)."}
    )
    reflow_lr: float = field(default=2e-4, metadata={"help": "Adam lr of the reflow stage."})
    reflow_steps: int = field(default=2000, metadata={"help": "Steps of each reflow stage."})
    reflow_minutes: float = field(
        default=0.0, metadata={"help": "Time limit of each reflow stage; 0 = none."}
    )
    # distill
    num_steps: int = field(default=1, metadata={"help": "Sampling steps of the distilled student."})
    distill_loss: Literal["l2", "pseudo_huber"] = field(
        default="l2", metadata={"help": "Distillation regression loss."}
    )
    distill_lr: float = field(default=1e-4, metadata={"help": "Adam lr of the distill stage."})
    distill_steps: int = field(default=1000, metadata={"help": "Steps of the distill stage."})
    distill_minutes: float = field(
        default=0.0, metadata={"help": "Time limit of the distill stage; 0 = none."}
    )
    # shared training
    lr_warmup_steps: int = field(
        default=100,
        metadata={"help": "Linear lr warm-up of each training stage: the copied model meets a new target."},
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1 of both training stages."})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2 of both training stages."})
    optimizer: Literal["adam", "adam8bit"] = field(
        default="adam",
        metadata={
            "help": "adam: torch Adam; adam8bit: bitsandbytes Adam8bit (8-bit moments), both training stages."
        },
    )
    ema_halflife_images: float = field(
        default=20_000.0, metadata={"help": "EMA half-life in pairs seen; 0 = export the raw model."}
    )
    ema_rampup_ratio: float = field(
        default=0.05, metadata={"help": "Half-life <= ratio * pairs seen early on (EDM's ramp-up)."}
    )
    batch_size: int = field(default=128, metadata={"help": "Pairs per process and step."})
    eval_every: int = field(
        default=0, metadata={"help": "Evaluate every N steps of a stage; 0 = at its end."}
    )
    eval_samples: int = field(default=2000, metadata={"help": "Samples per evaluation (FD on fixed noise)."})
    eval_seed: int = field(
        default=12345, metadata={"help": "Seed of the fixed evaluation/straightness noise."}
    )
    eval_nfes: list[int] = field(
        default_factory=lambda: [1, 2, 4],
        metadata={"help": "Euler NFEs at which the reflow model is evaluated (the student: at num_steps)."},
    )
    straightness_samples: int = field(default=512, metadata={"help": "Paths in the straightness measure."})
    straightness_steps: int = field(default=32, metadata={"help": "Euler steps of the straightness measure."})
    export_dir: str | None = field(default=None, metadata={"help": "Single training stages: export folder."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_adam_betas(self, ("adam_beta1", "adam_beta2"))
        if self.stage != "pairs":  # a missing bitsandbytes fails before the pairs are made
            optimizer_class(self.optimizer, REFLOW_OPTIMIZERS)
        if self.rectified_k < 1:
            raise ValueError(f"rectified_k={self.rectified_k} must be >= 1 (1 = distil the teacher directly)")
        if not 1 <= self.round <= max(self.rectified_k - 1, 1):
            raise ValueError(f"round={self.round} must be in 1..{max(self.rectified_k - 1, 1)}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps} must be >= 1")
        if not self.eval_nfes or min(self.eval_nfes) < 1:
            raise ValueError(f"eval_nfes={self.eval_nfes} must be one or more NFEs >= 1")
        if self.stage == "all" and self.resume_from not in (None, "latest"):
            raise ValueError(
                f"resume_from={self.resume_from!r} names one checkpoint; with stage=all use 'latest' (each training "
                "stage resumes from its own latest checkpoint) or run that stage alone"
            )


class ReflowRecipe(Recipe):
    """One training stage on the engine: ``mode='reflow'`` (k-RF velocity field) or ``'distill'`` (student)."""

    def __init__(
        self, config: ReflowConfig, mode: TrainingStage, init: str, pairs: Path, export: Path
    ) -> None:
        self.config = config
        self.mode = mode
        self.init = init
        self.pairs_folder = Path(pairs)
        self.export_folder = Path(export)
        self.facts: dict[str, Any] = {}

    def setup(self, trainer: Trainer) -> RecipeParts:
        cfg = self.config
        dataset, pairs = load_pairs(self.pairs_folder)
        self.spec = pairs.spec
        self.t_max, self.sigma_max = self.spec.t_max, self.spec.sigma_max
        self.num_classes = self.spec.num_classes
        self.prompts = self._prompts(trainer)  # encoded (or read from the cache) before any weights
        # a latent teacher's pairs are latents: its autoencoder decodes the evaluation grids
        self.codec = LatentCodec.from_teacher(cfg.teacher)
        student = load_teacher(self.init)
        self.shape = tuple(self.spec.shape)
        self.grid = flow_time_grid(cfg.num_steps, self.t_max)[:-1]
        self.facts = {
            "stage": self.mode,
            "init": self.init,
            "pairs": len(dataset),
            "pairs_round": self.spec.round,
            "pairs_sampler": self.spec.sampler,
            "pairs_nfe": self.spec.nfe,
            "guidance_scale": self.spec.guidance_scale,
            "sigma_max": self.sigma_max,
            "t_max": self.t_max,
        }
        if self.prompts is not None:
            self.facts.update(
                prompts=cfg.prompts, num_prompts=self.prompts.num_prompts, negative_prompt=cfg.negative_prompt
            )
        if self.mode == "reflow" and trainer.is_main:  # the source model, guided as it made round-1 pairs
            guidance = self.spec.guidance_scale if self.spec.round == 1 else 1.0
            self.facts["straightness_before"] = self.measure_straightness(
                student.to(trainer.device), guidance
            )
        columns = ["noise", "sample"] + (["label"] if self.num_classes is not None else [])
        columns += ["prompt"] if self.prompts is not None else []
        dataset = dataset.with_format("torch", columns=columns)
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=cfg.num_workers,
        )
        lr = cfg.reflow_lr if self.mode == "reflow" else cfg.distill_lr
        betas = (float(cfg.adam_beta1), float(cfg.adam_beta2))
        optimizer = optimizer_class(cfg.optimizer, REFLOW_OPTIMIZERS)(
            student.parameters(), lr=lr, betas=betas
        )
        decode = None if self.codec is None else self.codec.to(trainer.device).decode
        fixed = None if self.prompts is None else (lambda i: self.prompts.fixed(i)[0])
        self.trackers = {
            n: QualityTracker(
                trainer,
                cfg.eval_samples,
                cfg.eval_seed,
                self.shape,
                self.num_classes,
                decode=decode,
                conditions=fixed,
                **tracker_kwargs(
                    cfg.teacher,
                    None if self.prompts is None else self.prompts.all_prompt_texts(),
                    cfg.eval_metrics,
                ),
            )
            for n in self.evaluated_nfes()
        }
        model = TrainedModel(
            student,
            optimizer,
            ema_halflife_images=cfg.ema_halflife_images or None,
            ema_rampup_ratio=cfg.ema_rampup_ratio,
        )
        return RecipeParts(trained={"student": model}, dataloader=loader)

    def _prompts(self, trainer: Trainer) -> ConditionSource | None:
        """Text teachers: the prompts the pairs were made with (their cache key must be the spec's), else None."""
        if self.spec.num_prompts is None:
            return None
        cfg = self.config
        source = prompt_source(cfg, check_teacher(cfg.teacher), trainer.accelerator)
        if source is None:
            raise ValueError(
                f"pairs {self.pairs_folder} hold prompts but teacher {cfg.teacher!r} is not conditioned on text"
            )
        key = prompt_cache_key(source)
        if key != self.spec.prompt_cache_key or source.num_prompts != self.spec.num_prompts:
            raise ValueError(
                f"pairs {self.pairs_folder} were made with other prompts ({self.spec.num_prompts} prompts, cache "
                f"key {self.spec.prompt_cache_key}) than prompts={cfg.prompts!r}, negative_prompt="
                f"{cfg.negative_prompt!r} give ({source.num_prompts} prompts, key {key}); use those settings or "
                "make new pairs"
            )
        return source

    def pair_condition(self, batch: Mapping[str, torch.Tensor]) -> Condition | None:
        """The condition each pair was made with: its class label, or its prompt's embedding."""
        if self.prompts is not None:
            return self.prompts.fixed(batch["prompt"])[0]
        if self.num_classes is not None:
            return Condition(class_labels=batch["label"])
        return None

    # ------------------------------------------------------------------------------------ loss
    def loss(self, phase: str, batch: Mapping[str, torch.Tensor], models: Mapping[str, torch.nn.Module]):
        """reflow: v(x_t, t) onto z - x at t from the time distribution; distill: x_hat = x_t - t v onto x."""
        cfg = self.config
        x, z = batch["sample"].float(), batch["noise"].float()
        cond = self.pair_condition(batch)
        student = models["student"]

        def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return velocity_from_denoiser(student, x_t, t, cond)

        n = x.shape[0]
        if self.mode == "reflow":
            t = sample_flow_times(
                n,
                cfg.time_distribution,
                cfg.t_min,
                self.t_max,
                cfg.logit_mean,
                cfg.logit_std,
                cfg.u_shape_a,
                device=x.device,
            )
            return reflow_loss(velocity, x, z, t, cfg.loss, cfg.huber_c).mean()
        idx = torch.randint(len(self.grid), (n,), device=x.device)  # one of the student's grid times
        t = torch.tensor(self.grid, device=x.device)[idx]
        return distill_loss(velocity, x, z, t, idx == 0, cfg.distill_loss, cfg.huber_c).mean()

    # ------------------------------------------------------------------------------ sampling
    def evaluated_nfes(self) -> list[int]:
        """The reflow model at every ``eval_nfes``; the student at its ``num_steps``."""
        return [self.config.num_steps] if self.mode == "distill" else list(self.config.eval_nfes)

    def sigmas(self, nfe: int) -> list[float]:
        """Noise levels of ``nfe``-step sampling: the uniform flow-time grid from ``sigma_max``."""
        return flow_sigmas(nfe, self.sigma_max)

    @torch.no_grad()
    def sample(self, model: Denoiser, z: torch.Tensor, cond: Condition | None, nfe: int) -> torch.Tensor:
        """``nfe`` Euler steps from ``sigma_max z``, as the exported pipeline samples."""
        return euler_on_sigmas(model, z, self.sigmas(nfe), cond)

    def final_model(self, trainer: Trainer) -> Denoiser:
        if self.config.ema_halflife_images:
            return trainer.models.ema("student")
        return trainer.accelerator.unwrap_model(trainer.trained["student"].module)

    def straightness_noise(self) -> tuple[torch.Tensor, Condition | None, Condition | None]:
        """The fixed paths of the straightness measure: seeded noise and, for conditional sets, cycling labels
        or prompts, and their null (None for labels: the model's null class)."""
        cfg = self.config
        z = torch.randn(
            cfg.straightness_samples, *self.shape, generator=torch.Generator().manual_seed(cfg.eval_seed)
        )
        if self.prompts is not None:
            return (z, *self.prompts.fixed(torch.arange(len(z))))
        if self.num_classes is None:
            return z, None, None
        return z, Condition(class_labels=torch.arange(len(z)) % self.num_classes), None

    def measure_straightness(self, model: Denoiser, guidance_scale: float = 1.0) -> float:
        """Liu et al.'s straightness of ``model``'s flow on :meth:`straightness_noise`."""
        device = next(model.parameters()).device
        z, cond, null = self.straightness_noise()
        cond = None if cond is None else cond.to(device)
        kwargs: dict[str, Any] = {}
        if guidance_scale != 1.0 and cond is not None:
            kwargs["guidance_scale"] = guidance_scale
            if null is not None:
                kwargs["null_cond"] = null.to(device)
        was_training = model.training
        model.eval()
        value = straightness(
            lambda x_t, t: velocity_from_denoiser(model, x_t, t, cond, **kwargs),
            z.to(device),
            self.config.straightness_steps,
            self.t_max,
        )
        model.train(was_training)
        return value

    # ---------------------------------------------------------------------------- evaluation
    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        """FD etc. of the EMA model: the reflow model at each ``eval_nfes`` NFE, the student at its steps."""
        model = self.final_model(trainer)
        model.eval()
        metrics: dict[str, float] = {}
        for i, nfe in enumerate(self.evaluated_nfes()):
            tag = f"{self.mode}_{nfe}step"
            got = self.trackers[nfe].evaluate(lambda z, c, n=nfe: self.sample(model, z, c, n), tag=tag)
            suffix = "" if i == 0 else f"_{nfe}step"
            metrics.update({f"{k}{suffix}": v for k, v in got.items()})
        return metrics

    def on_train_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Main process: straightness after reflow, then export the EMA model with a model card."""
        if not trainer.is_main:
            return
        cfg, model = self.config, self.final_model(trainer)
        facts = dict(self.facts)
        if self.mode == "reflow":
            facts["straightness_after"] = self.measure_straightness(model)
            facts.update(time_distribution=cfg.time_distribution, loss=cfg.loss, lr=cfg.reflow_lr)
        else:
            facts.update(num_steps=cfg.num_steps, loss=cfg.distill_loss, lr=cfg.distill_lr)
        facts.update(training_steps=trainer.step, pairs_seen=trainer.images_seen)
        facts.update({f"final_{k}": v for k, v in metrics.items()})
        self.facts = facts
        grid = self.trackers[self.evaluated_nfes()[0]].last_grid
        teacher_name = describe_teacher(cfg.teacher).name  # a folder name, never a local path
        if self.mode == "reflow":
            title = f"{self.spec.round + 1}-rectified flow of {teacher_name}"
            method = f"Rectified-flow reflow (Liu et al. 2023; Lee et al. 2024), round {self.spec.round}, EMA"
            sigmas, any_steps = [self.sigma_max], True
        else:
            steps = cfg.num_steps
            title = f"{steps}-step rectified-flow student of {teacher_name}"
            method = "Rectified-flow distillation (Liu et al. 2023; InstaFlow) of the k-rectified flow, EMA"
            sigmas, any_steps = self.sigmas(steps), False
        if self.codec is not None:
            self._export_latent(model, facts, method, grid)
            return
        export_flow_model(
            model,
            self.export_folder,
            sigmas,
            any_steps,
            base_model=cfg.teacher,
            title=title,
            method=method,
            facts=facts,
            sample_grid=grid,
        )

    def _export_latent(self, model: Denoiser, facts: dict[str, Any], method: str, grid: str | None) -> None:
        """A latent teacher's model as the teacher's own pipeline folder, then the completion marker the stages
        read. The student samples its ``num_steps`` deterministic Euler steps; the k-RF its one step
        ``D(sigma_max z, sigma_max)`` (its other step counts through the toolkit, :meth:`sample`)."""
        done = self.export_folder / DONE_FILE
        done.unlink(missing_ok=True)
        sigmas = self.sigmas(self.config.num_steps if self.mode == "distill" else 1)
        facts = {
            **facts,
            "method": "reflow",
            "sampling": f"{len(sigmas)} deterministic Euler step(s) from x = {sigmas[0]:g} z, z ~ N(0, I), on "
            f"step_sigmas {[round(s, 4) for s in sigmas]} (the teacher's pipeline, guidance_scale=1)",
        }
        export_latent_student(
            model,
            self.export_folder,
            step_sigmas=sigmas,
            teacher=self.config.teacher,
            method=method,
            facts=facts,
            sample_grid=grid,
            tags=["rectified-flow", "reflow"],
            deterministic=True,
        )
        done.write_text(
            json.dumps({k: v for k, v in facts.items() if isinstance(v, (int, float, str))}, indent=1)
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the configured stages (:func:`distill.reflow.stages.run`); returns their summary."""
    return run(parse_config(ReflowConfig, argv), ReflowRecipe)


if __name__ == "__main__":
    run_main(main)
