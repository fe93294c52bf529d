"""Rectified-flow reflow: teacher ODE pairs -> straight (k-rectified) flow -> one- or few-step student.

    accelerate launch recipes/reflow.py --config recipes/configs/reflow_digits.yaml           # all stages
    accelerate launch recipes/reflow.py --stage pairs --num_pairs 50000                       # one stage
    accelerate launch recipes/reflow.py --stage reflow --resume_from latest

Stages (``--stage all`` runs them in order, skipping training stages whose export is complete):

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
   ``student_steps`` = N > 1 on the N-point grid of Liu et al. Exported to ``output_dir/distill/student``.

Sampling (all exports, :class:`distill.pipelines.RectifiedFlowPipeline`): Euler in flow time from
``x = sigma_max z``, i.e. one step is ``D(sigma_max z, sigma_max)`` with sigma_max the pairs' (80 for EDM).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from distill.evaluation.quality import QualityTracker
from distill.export.flow import DONE_FILE, export_flow_model
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
from distill.reflow.pairs import generate_pairs, load_pairs, make_spec, open_pairs
from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.loading import load_teacher
from engine.config import TrainConfig, check_adam_betas, parse_config
from engine.recipe import Recipe, RecipeParts, TrainedModel
from engine.trainer import Trainer, build_accelerator

Stage = Literal["all", "pairs", "reflow", "distill"]


@dataclass
class ReflowConfig(TrainConfig):
    """All stages' settings. ``max_steps`` / ``max_minutes`` are set per training stage from ``reflow_*`` and
    ``distill_*``; each stage runs the engine in its own folder under ``output_dir``."""

    output_dir: str = "outputs/reflow"
    stage: Stage = field(default="all", metadata={"help": "pairs, reflow, distill, or all of them in order."})
    teacher: str = field(default="default", metadata={"help": "'default', a diffusers folder, or a hub id."})
    rectified_k: int = field(default=2, metadata={"help": "k of the k-rectified flow: k - 1 reflow rounds."})
    round: int = field(default=1, metadata={"help": "Round of a single pairs/reflow stage (1 .. k - 1)."})
    num_classes: int | None = field(default=None, metadata={"help": "Classes (default: from the teacher)."})
    guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale baked into round-1 pairs."})
    # pairs
    num_pairs: int = 20_000
    pairs_shard_size: int = 1000
    pairs_batch_size: int = field(default=500, metadata={"help": "ODE batch inside a shard (fixed per set)."})
    pairs_sampler: Literal["heun", "euler"] = "heun"
    pairs_nfe: int = field(default=35, metadata={"help": "Teacher NFE per pair (Heun: odd)."})
    pairs_sigma_max: float | None = field(default=None, metadata={"help": "ODE start (default: 80 or less)."})
    pairs_seed: int = 0
    pairs_minutes: float = field(default=0.0, metadata={"help": "Stop generating at a shard after this."})
    later_pairs_steps: int = field(
        default=8, metadata={"help": "Euler steps of the r-RF for round r>1 pairs."}
    )
    pairs_dir: str | None = field(
        default=None, metadata={"help": "Single stages: pair folder (default output_dir/pairs_rR)."}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "Single stages: source model (default: by round)."}
    )
    # reflow
    time_distribution: Literal["uniform", "logit_normal", "u_shaped"] = "u_shaped"
    t_min: float = 1e-3
    logit_mean: float = 0.0
    logit_std: float = 1.0
    u_shape_a: float = 4.0
    loss: Literal["l2", "pseudo_huber"] = "l2"
    huber_c: float | None = field(
        default=None, metadata={"help": "Pseudo-Huber c (default 0.00054 sqrt(d))."}
    )
    reflow_lr: float = 2e-4
    reflow_steps: int = 2000
    reflow_minutes: float = 0.0
    # distill
    student_steps: int = field(default=1, metadata={"help": "Sampling steps of the distilled student."})
    distill_loss: Literal["l2", "pseudo_huber"] = "l2"
    distill_lr: float = 1e-4
    distill_steps: int = 1000
    distill_minutes: float = 0.0
    # shared training
    lr_warmup_steps: int = 100
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    ema_halflife_images: float = 20_000.0
    ema_rampup_ratio: float = 0.05
    batch_size: int = 128
    eval_every: int = 0
    eval_samples: int = 2000
    eval_seed: int = 12345
    eval_steps: list[int] = field(default_factory=lambda: [1, 2, 4], metadata={"help": "Reflow eval NFEs."})
    straightness_samples: int = 512
    straightness_steps: int = 32
    export_dir: str | None = field(default=None, metadata={"help": "Single training stages: export folder."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_adam_betas(self, ("adam_beta1", "adam_beta2"))
        if self.rectified_k < 1:
            raise ValueError(f"rectified_k={self.rectified_k} must be >= 1 (1 = distil the teacher directly)")
        if not 1 <= self.round <= max(self.rectified_k - 1, 1):
            raise ValueError(f"round={self.round} must be in 1..{max(self.rectified_k - 1, 1)}")
        if self.student_steps < 1 or not self.eval_steps or min(self.eval_steps) < 1:
            raise ValueError("student_steps and every eval_steps entry must be >= 1")
        if self.stage == "all" and self.resume_from not in (None, "latest"):
            raise ValueError(
                f"resume_from={self.resume_from!r} names one checkpoint; with stage=all use 'latest' (each training "
                "stage resumes from its own latest checkpoint) or run that stage alone"
            )


# -------------------------------------------------------------------------------------------- layout
def pairs_dir(cfg: ReflowConfig, round_: int) -> Path:
    if cfg.pairs_dir and cfg.stage != "all":
        return Path(cfg.pairs_dir)
    return Path(cfg.output_dir) / f"pairs_r{round_}"


def reflow_dir(cfg: ReflowConfig, round_: int) -> Path:
    return Path(cfg.output_dir) / f"reflow_r{round_}"


def source_model(cfg: ReflowConfig, round_: int) -> str:
    """The model that makes round ``round_``'s pairs and initialises its reflow: teacher, then the r-RF."""
    if cfg.init_from and cfg.stage != "all":
        return cfg.init_from
    return cfg.teacher if round_ == 1 else str(reflow_dir(cfg, round_ - 1) / "model")


def plan(cfg: ReflowConfig) -> list[tuple[str, int]]:
    """(stage, round) in execution order; distillation uses the last round's pairs."""
    last = max(cfg.rectified_k - 1, 1)
    if cfg.stage == "pairs":
        return [("pairs", cfg.round)]
    if cfg.stage == "reflow":
        return [("reflow", cfg.round)]
    if cfg.stage == "distill":
        return [("distill", last)]
    steps: list[tuple[str, int]] = []
    for r in range(1, cfg.rectified_k):
        steps += [("pairs", r), ("reflow", r)]
    if cfg.rectified_k == 1:
        steps.append(("pairs", 1))
    return [*steps, ("distill", last)]


def distill_source(cfg: ReflowConfig) -> str:
    if cfg.init_from and cfg.stage != "all":
        return cfg.init_from
    return cfg.teacher if cfg.rectified_k == 1 else str(reflow_dir(cfg, cfg.rectified_k - 1) / "model")


def teacher_classes(cfg: ReflowConfig, model: Denoiser) -> int | None:
    embeds = model.num_class_embeds
    return cfg.num_classes if cfg.num_classes is not None else (embeds - 1 if embeds else None)


# --------------------------------------------------------------------------------------------- pairs
def run_pairs(cfg: ReflowConfig, round_: int, state: Any = None) -> dict[str, Any]:
    """Generate (or complete) round ``round_``'s pair set; returns a summary of the folder."""
    from accelerate import PartialState

    state = state or PartialState(cpu=cfg.cpu or not torch.cuda.is_available())
    folder = pairs_dir(cfg, round_)
    source = source_model(cfg, round_)
    model = load_teacher(source).to(state.device).eval().requires_grad_(False)
    num_classes = teacher_classes(cfg, model)
    if round_ == 1:
        sampler, nfe, guidance, sigma_max = (
            cfg.pairs_sampler,
            cfg.pairs_nfe,
            cfg.guidance_scale,
            cfg.pairs_sigma_max,
        )
    else:  # an r-RF was trained on guided pairs: sample it unguided, from the range it was trained on
        previous = open_pairs(pairs_dir(cfg, round_ - 1)).spec
        sampler, nfe, guidance, sigma_max = "flow_euler", cfg.later_pairs_steps, 1.0, previous.sigma_max
    spec = make_spec(
        model,
        source,
        cfg.num_pairs,
        sampler=sampler,
        nfe=nfe,
        sigma_max=sigma_max,
        guidance_scale=guidance,
        num_classes=num_classes,
        shard_size=cfg.pairs_shard_size,
        batch_size=cfg.pairs_batch_size,
        seed=cfg.pairs_seed,
        round=round_,
    )
    pairs = generate_pairs(model, spec, folder, state=state, max_minutes=cfg.pairs_minutes)
    return {"folder": str(folder), "pairs": pairs.num_pairs, "complete": pairs.complete, "nfe": spec.nfe}


# ------------------------------------------------------------------------------------------ training
class ReflowRecipe(Recipe):
    """One training stage on the engine: ``mode='reflow'`` (k-RF velocity field) or ``'distill'`` (student)."""

    def __init__(
        self, config: ReflowConfig, mode: Literal["reflow", "distill"], init: str, pairs: Path, export: Path
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
        student = load_teacher(self.init)
        self.shape = tuple(self.spec.shape)
        self.grid = flow_time_grid(cfg.student_steps, self.t_max)[:-1]
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
        if self.mode == "reflow" and trainer.is_main:  # the source model, guided as it made round-1 pairs
            guidance = self.spec.guidance_scale if self.spec.round == 1 else 1.0
            self.facts["straightness_before"] = self.measure_straightness(
                student.to(trainer.device), guidance
            )
        columns = ["noise", "sample"] + (["label"] if self.num_classes is not None else [])
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
        optimizer = torch.optim.Adam(student.parameters(), lr=lr, betas=betas)
        self.trackers = {
            n: QualityTracker(trainer, cfg.eval_samples, cfg.eval_seed, self.shape, self.num_classes)
            for n in self.eval_nfes()
        }
        model = TrainedModel(
            student,
            optimizer,
            ema_halflife_images=cfg.ema_halflife_images or None,
            ema_rampup_ratio=cfg.ema_rampup_ratio,
        )
        return RecipeParts(trained={"student": model}, dataloader=loader)

    # ------------------------------------------------------------------------------------ loss
    def _cond(self, batch: dict[str, torch.Tensor]) -> Condition | None:
        return None if self.num_classes is None else Condition(class_labels=batch["label"])

    def loss(self, phase, batch, models):
        cfg = self.config
        x, z = batch["sample"].float(), batch["noise"].float()
        cond = self._cond(batch)
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
        idx = torch.randint(len(self.grid), (n,), device=x.device)
        t = torch.tensor(self.grid, device=x.device)[idx]
        return distill_loss(velocity, x, z, t, idx == 0, cfg.distill_loss, cfg.huber_c).mean()

    # ------------------------------------------------------------------------------ sampling
    def eval_nfes(self) -> list[int]:
        return [self.config.student_steps] if self.mode == "distill" else list(self.config.eval_steps)

    def sigmas(self, nfe: int) -> list[float]:
        """Noise levels of ``nfe``-step sampling: the uniform flow-time grid from ``sigma_max``."""
        return flow_sigmas(nfe, self.sigma_max)

    @torch.no_grad()
    def sample_with(self, model: Denoiser, z: torch.Tensor, cond: Condition | None, nfe: int) -> torch.Tensor:
        return euler_on_sigmas(model, z, self.sigmas(nfe), cond)

    def final_model(self, trainer: Trainer) -> Denoiser:
        if self.config.ema_halflife_images:
            return trainer.models.ema("student")
        return trainer.accelerator.unwrap_model(trainer.trained["student"].module)

    def measure_straightness(self, model: Denoiser, guidance_scale: float = 1.0) -> float:
        """Straightness of ``model``'s flow on fixed noise (and, for conditional sets, cycling labels)."""
        cfg = self.config
        device = next(model.parameters()).device
        z = torch.randn(
            cfg.straightness_samples, *self.shape, generator=torch.Generator().manual_seed(cfg.eval_seed)
        )
        cond = None
        if self.num_classes is not None:
            cond = Condition(class_labels=(torch.arange(len(z)) % self.num_classes).to(device))
        kwargs = {"guidance_scale": guidance_scale} if guidance_scale != 1.0 and cond is not None else {}
        was_training = model.training
        model.eval()
        value = straightness(
            lambda x_t, t: velocity_from_denoiser(model, x_t, t, cond, **kwargs),
            z.to(device),
            cfg.straightness_steps,
            self.t_max,
        )
        model.train(was_training)
        return value

    # ---------------------------------------------------------------------------- evaluation
    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        """FD etc. of the EMA model: the reflow model at each ``eval_steps`` NFE, the student at its steps."""
        model = self.final_model(trainer)
        model.eval()
        metrics: dict[str, float] = {}
        for i, nfe in enumerate(self.eval_nfes()):
            tag = f"{self.mode}_{nfe}step"
            got = self.trackers[nfe].evaluate(lambda z, c, n=nfe: self.sample_with(model, z, c, n), tag=tag)
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
            facts.update(student_steps=cfg.student_steps, loss=cfg.distill_loss, lr=cfg.distill_lr)
        facts.update(training_steps=trainer.step, pairs_seen=trainer.images_seen)
        facts.update({f"final_{k}": v for k, v in metrics.items()})
        self.facts = facts
        grid = self.trackers[self.eval_nfes()[0]].last_grid
        if self.mode == "reflow":
            title = f"{self.spec.round + 1}-rectified flow of {cfg.teacher}"
            method = f"Rectified-flow reflow (Liu et al. 2023; Lee et al. 2024), round {self.spec.round}, EMA"
            sigmas, any_steps = [self.sigma_max], True
        else:
            steps = cfg.student_steps
            title = f"{steps}-step rectified-flow student of {cfg.teacher}"
            method = "Rectified-flow distillation (Liu et al. 2023; InstaFlow) of the k-rectified flow, EMA"
            sigmas, any_steps = self.sigmas(steps), False
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


# -------------------------------------------------------------------------------------- orchestration
def run_training(cfg: ReflowConfig, mode: Literal["reflow", "distill"], round_: int) -> dict[str, Any]:
    """One engine run of a training stage; a stage whose export is complete is skipped (returns its facts)."""
    if mode == "reflow":
        run_dir, init = reflow_dir(cfg, round_), source_model(cfg, round_)
        export = Path(cfg.export_dir) if cfg.export_dir and cfg.stage != "all" else run_dir / "model"
        steps, minutes, pairs = cfg.reflow_steps, cfg.reflow_minutes, pairs_dir(cfg, round_)
    else:
        run_dir, init = Path(cfg.output_dir) / "distill", distill_source(cfg)
        export = Path(cfg.export_dir) if cfg.export_dir and cfg.stage != "all" else run_dir / "student"
        steps, minutes, pairs = cfg.distill_steps, cfg.distill_minutes, pairs_dir(cfg, round_)
    done = export / DONE_FILE
    if cfg.stage == "all" and done.is_file():
        print(f"[reflow] {mode} stage already exported at {export}: skipped", flush=True)
        return json.loads(done.read_text())
    stage_cfg = dataclasses.replace(cfg, output_dir=str(run_dir), max_steps=steps, max_minutes=minutes)
    recipe = ReflowRecipe(stage_cfg, mode, init, pairs, export)
    trainer = Trainer(stage_cfg, recipe, accelerator=build_accelerator(stage_cfg))
    trainer.fit(end_training=False)
    trainer.accelerator.wait_for_everyone()
    return recipe.facts if trainer.is_main else {}


def run(cfg: ReflowConfig) -> dict[str, Any]:
    """Run the planned stages; the main process keeps ``output_dir/summary.json`` up to date."""
    from accelerate import PartialState

    state = PartialState(cpu=cfg.cpu or not torch.cuda.is_available())
    summary_path = Path(cfg.output_dir) / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for stage, round_ in plan(cfg):
        if stage == "pairs":
            result = run_pairs(cfg, round_, state)
            key = f"pairs_r{round_}"
        else:
            result = run_training(cfg, stage, round_)  # type: ignore[arg-type]
            key = f"reflow_r{round_}" if stage == "reflow" else "distill"
        if state.is_main_process:
            summary[key] = result
            summary_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = summary_path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(summary, indent=1, default=str))
            os.replace(tmp, summary_path)
        state.wait_for_everyone()
    state.destroy_process_group()
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_config(ReflowConfig, argv))


if __name__ == "__main__":
    from engine.launch import run_main

    run_main(main)
