"""Fine-tuning a diffusers image teacher (UNet or transformer, pixel or latent, any conditioning) on new images.

:class:`ImageDenoiserTask` is the LoRA recipe's task (:class:`finetune.tasks.FinetuneTask`) for a teacher and an
image dataset: an image folder in diffusers' ``imagefolder`` layout (images + ``metadata.jsonl`` with
``file_name`` and a caption column), a ``datasets`` folder (``save_to_disk``) or a hub dataset id.

* Images are resized (shorter side) and centre-cropped to the teacher's image size (``resolution`` overrides it),
  on the fly (nothing is cached in float32), and a latent teacher's VAE encodes each batch
  (:class:`~distill.teachers.latents.LatentCodec`, posterior samples as diffusers' training scripts draw them;
  the held-out rows use the posterior mode, encoded once).
* Text teachers: the captions (``caption_column``, default the first of ``text``, ``caption``, ``prompt``) are the
  prompt list, encoded once by the teacher's own text encoders (:func:`~distill.teachers.prompts.encode_prompts`,
  cached on disk); each row keeps its caption's index. ``caption_dropout`` replaces a caption by the null
  (empty prompt) embedding. Class teachers (DiT, class UNets) read the ``label`` column (dropout: the null
  class); unconditional teachers (LDM, DDPM) take the images alone.
* Loss: the teacher's own objective (:class:`~distill.teachers.objective.TeacherObjective`). Eval: the same loss
  on the held-out rows at fixed noise levels (``eval_timesteps`` of the table, or ``eval_sigmas`` for EDM
  teachers) with fixed noise per row (seeded by the row's index, so every process count sees the same).

Every mismatch the configs can reveal (no caption column for a text teacher, no labels for a class teacher, a
resolution the VAE cannot divide, a teacher without an image size and no ``resolution``) is refused at start-up,
before any weights are read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from distill.data import pil_to_pixel_values
from distill.teachers.conditions import ConditionSource
from distill.teachers.denoiser import Condition, Denoiser
from distill.teachers.families import TeacherFamily
from distill.teachers.latents import LatentCodec
from distill.teachers.loading import check_teacher, load_teacher, resolve_teacher_path
from distill.teachers.objective import TeacherObjective
from distill.teachers.prompts import encode_prompts
from engine.log import get_logger
from finetune.data import load_text_splits, train_and_eval_splits
from finetune.export import lora_pipeline_class
from finetune.targets import default_targets
from finetune.tasks import FinetuneTask

__all__ = ["CAPTION_COLUMNS", "EVAL_NOISE_SEED", "ImageDenoiserTask", "collate_images"]

#: caption columns tried, in order, when ``caption_column`` is not given
CAPTION_COLUMNS = ("text", "caption", "prompt")
#: seed of the evaluation noise (row ``i`` draws with ``EVAL_NOISE_SEED + i``): a constant, so runs compare
EVAL_NOISE_SEED = 1234


def collate_images(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``pixel_values`` [B, C, H, W] float32, plus ``caption_index`` / ``label`` [B] int64 when the rows have them."""
    batch = {"pixel_values": torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows])}
    for key in ("caption_index", "label"):
        if key in rows[0]:
            batch[key] = torch.as_tensor([int(r[key]) for r in rows], dtype=torch.long)
    return batch


def _image_column(rows: datasets.Dataset, source: str) -> str:
    for name, feature in rows.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(f"dataset {source!r} has no image column; its columns: {rows.column_names}")


def _label_column(rows: datasets.Dataset) -> str | None:
    if "label" in rows.column_names:
        return "label"
    return next((n for n, f in rows.features.items() if isinstance(f, datasets.ClassLabel)), None)


def _conditioning(family: TeacherFamily) -> str:
    if family.conditioning.startswith("text"):
        return "prompts"
    return "classes" if family.conditioning == "class_labels" else "none"


class ImageDenoiserTask(FinetuneTask):
    """A diffusers image teacher fine-tuned on an image dataset with its own objective (module docstring)."""

    peft_task_type = None

    def __init__(
        self,
        model: str,
        dataset: str,
        *,
        caption_column: str | None = None,
        resolution: int | None = None,
        caption_dropout: float = 0.0,
        eval_split: str | None = None,
        eval_holdout: float = 0.1,
        eval_examples: int = 512,
        eval_timesteps: Sequence[int] = (100, 300, 500, 700, 900),
        eval_sigmas: Sequence[float] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
        p_mean: float = -1.2,
        p_std: float = 1.2,
        guidance_scale: float = 3.5,
        batch_size: int = 16,
        prompt_cache_dir: str | None = None,
    ) -> None:
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout={caption_dropout} must be in [0, 1]")
        self.model_spec, self.dataset = model, dataset
        self.caption_column, self.resolution = caption_column, resolution
        self.caption_dropout = caption_dropout
        self.eval_split, self.eval_holdout, self.eval_examples = eval_split, eval_holdout, eval_examples
        self.eval_timesteps, self.eval_sigmas = list(eval_timesteps), list(eval_sigmas)
        self.p_mean, self.p_std, self.guidance_scale = p_mean, p_std, guidance_scale
        self.batch_size, self.prompt_cache_dir = batch_size, prompt_cache_dir
        self.conditions: ConditionSource | None = None
        self.codec: LatentCodec | None = None
        self.objective: TeacherObjective | None = None
        self.eval_rows: datasets.Dataset | None = None
        self._eval_cache: dict[tuple[int, int], list[dict[str, torch.Tensor]]] = {}
        self._labels: list[int] = []

    # ------------------------------------------------------------------------------------------------ data
    def _image_size(self, family: TeacherFamily) -> int:
        """The side the images are cropped to: ``resolution``, else the teacher's square image size."""
        label = f"teacher {self.model_spec!r} ({family.label})"
        if self.resolution is not None:
            size = int(self.resolution)
            if size <= 0:
                raise ValueError(f"resolution={size} must be a positive number of pixels")
        elif family.image_size is None:
            raise ValueError(f"{label} has no sample size in its config: set resolution (image pixels)")
        elif family.image_size[0] != family.image_size[1]:
            raise ValueError(f"{label} makes {family.image_size} images; set a square resolution")
        else:
            size = family.image_size[0]
        factor = family.vae_scale_factor or 1
        if family.latent and size % factor:
            raise ValueError(
                f"resolution {size} is not a multiple of {label}'s autoencoder downsampling factor {factor}; "
                f"use e.g. {max(factor, size // factor * factor)}"
            )
        return size

    def _caption_column(self, rows: datasets.Dataset) -> str:
        columns = rows.column_names
        if self.caption_column is not None:
            if self.caption_column not in columns:
                raise ValueError(
                    f"dataset {self.dataset!r} has no caption column {self.caption_column!r} (caption_column); "
                    f"its columns: {columns}"
                )
            return self.caption_column
        column = next((c for c in CAPTION_COLUMNS if c in columns), None)
        if column is None:
            raise ValueError(
                f"teacher {self.model_spec!r} is conditioned on text, but dataset {self.dataset!r} has none of "
                f"the caption columns {list(CAPTION_COLUMNS)}; its columns: {columns}. Add captions (an "
                "imagefolder's metadata.jsonl with file_name and text) or name the column with caption_column"
            )
        return column

    def load_data(self) -> tuple[datasets.Dataset, Callable[[list[Any]], Any]]:
        """Configs first (teacher family, image size, columns), then the VAE and the caption embeddings."""
        family = check_teacher(self.model_spec)  # unsupported families are refused by name, from configs
        self.family = family
        self.model_path = str(resolve_teacher_path(self.model_spec))
        self.kind = _conditioning(family)
        self.size = self._image_size(family)
        train, evaluation = train_and_eval_splits(
            load_text_splits(self.dataset), "train", self.eval_split, self.eval_holdout
        )
        self.image_column = _image_column(train, self.dataset)
        if evaluation is not None:
            evaluation = evaluation.select(range(min(self.eval_examples, len(evaluation))))
        keep = [self.image_column]
        if self.kind == "prompts":
            column = self._caption_column(train)
            train, evaluation = self._with_caption_indices(train, evaluation, column)
            keep.append("caption_index")
        elif self.kind == "classes":
            train, evaluation = self._with_labels(train, evaluation)
            keep.append("label")
        elif self.caption_dropout:
            raise ValueError(
                f"caption_dropout={self.caption_dropout}: teacher {self.model_spec!r} is unconditional"
            )
        self.codec = LatentCodec.from_teacher(family) if family.latent else None
        self.channels = (
            self.codec.image_channels if self.codec is not None else int(family.sample_channels or 3)
        )
        if self.kind == "prompts":
            self.conditions = self._encode_captions(family)
        transform = self._transform()
        if evaluation is not None and len(evaluation):
            self.eval_rows = evaluation.select_columns(keep).with_transform(transform)
        return train.select_columns(keep).with_transform(transform), collate_images

    def _with_caption_indices(
        self, train: datasets.Dataset, evaluation: datasets.Dataset | None, column: str
    ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        """Each row's caption as an index into the prompt list (the distinct captions, in first-seen order)."""
        parts = [train] + ([evaluation] if evaluation is not None else [])
        captions = [list(p.select_columns([column])[column]) for p in parts]
        for part in captions:
            bad = next(((i, v) for i, v in enumerate(part) if not isinstance(v, str)), None)
            if bad is not None:
                raise ValueError(f"caption column {column!r} row {bad[0]} is {bad[1]!r}, not a string")
        self.prompts = list(dict.fromkeys(c for part in captions for c in part))
        index = {p: i for i, p in enumerate(self.prompts)}
        out = [p.add_column("caption_index", [index[c] for c in cs]) for p, cs in zip(parts, captions)]
        return out[0], (out[1] if evaluation is not None else None)

    def _with_labels(
        self, train: datasets.Dataset, evaluation: datasets.Dataset | None
    ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        column = _label_column(train)
        if column is None:
            raise ValueError(
                f"teacher {self.model_spec!r} ({self.family.label}) is class-conditional, but dataset "
                f"{self.dataset!r} has no label column; its columns: {train.column_names} (an image folder "
                "with one sub-folder per class gives one)"
            )
        parts = [train] + ([evaluation] if evaluation is not None else [])
        if column != "label":
            parts = [p.rename_column(column, "label") for p in parts]
        self._labels = sorted({int(v) for p in parts for v in p.select_columns(["label"])["label"]})
        return parts[0], (parts[1] if evaluation is not None else None)

    def _encode_captions(self, family: TeacherFamily) -> ConditionSource:
        acc = self.accelerator
        first = acc.main_process_first() if acc is not None else contextlib.nullcontext()
        with first:
            embeddings = encode_prompts(
                self.model_path,
                self.prompts,
                cache_dir=self.prompt_cache_dir,
                device=getattr(acc, "device", None),
            )
        return ConditionSource.prompts(embeddings, (self.size, self.size), family.family, source=self.dataset)

    def _transform(self) -> Callable[[dict[str, list]], dict[str, list]]:
        column, size, channels = self.image_column, self.size, self.channels

        def convert(batch: dict[str, list]) -> dict[str, list]:
            out = {k: v for k, v in batch.items() if k != column}
            out["pixel_values"] = [
                torch.from_numpy(pil_to_pixel_values(im, size, channels)) for im in batch[column]
            ]
            return out

        return convert

    # ----------------------------------------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        teacher = load_teacher(self.model_spec)
        self.default_targets = list(default_targets(teacher.model))
        if self.kind == "classes":
            self.conditions = self._class_conditions(teacher)
        if teacher.has_timestep_table:
            last = teacher.num_train_timesteps - 1
            bad = [t for t in self.eval_timesteps if not 0 <= t <= last]
            if bad or not self.eval_timesteps:
                raise ValueError(f"eval_timesteps {self.eval_timesteps} must be non-empty, in [0, {last}]")
        component = self.family.denoiser_component or "unet"
        unet = "UNet" in type(teacher.model).__name__
        if lora_pipeline_class(self.family.pipeline_class, component) is not None:
            self.diffusers_prefix, self.diffusers_pipeline = component, self.family.pipeline_class
        elif unet:  # no pipeline loader, but the UNet layout diffusers' loaders read (unet.load_lora_adapter)
            self.diffusers_prefix = "unet"
        self.objective = TeacherObjective(teacher, self.guidance_scale, self.p_mean, self.p_std)
        if self.accelerator is not None and self.accelerator.is_main_process:
            get_logger().info(self.describe())
        return self.objective

    def _class_conditions(self, teacher: Denoiser) -> ConditionSource:
        classes = teacher.num_classes
        if not classes:
            raise ValueError(f"teacher {self.model_spec!r} has no class embeddings")
        bad = [v for v in self._labels if not 0 <= v < classes]
        if bad:
            raise ValueError(
                f"dataset {self.dataset!r} labels {bad[:5]} are outside the teacher's classes 0..{classes - 1}"
            )
        return ConditionSource.classes(classes, teacher.num_class_embeds - 1)

    def describe(self) -> str:
        denoiser = self.objective.denoiser if self.objective is not None else None
        param = denoiser.parameterization if denoiser is not None else "?"
        conditions = self.conditions.describe() if self.conditions is not None else "conditions: none"
        return (
            f"LoRA on {self.family.label} ({self.family.family}) teacher {self.model_spec!r}: {param} objective, "
            f"images {self.channels}x{self.size}x{self.size}"
            + (f" -> latents via {type(self.codec.vae).__name__}" if self.codec is not None else "")
            + f"; {conditions}"
        )

    def add_lora(self, model: nn.Module, config: LoraConfig) -> tuple[nn.Module, PeftModel]:
        denoiser = model.denoiser
        denoiser.model = get_peft_model(denoiser.model, config)  # the Denoiser keeps its maths around it
        return model, denoiser.model

    # ------------------------------------------------------------------------------------------------ loss
    def _x0(self, pixels: torch.Tensor, generator: torch.Generator | None, sample: bool) -> torch.Tensor:
        """Pixels, or a latent teacher's latents (VAE on the pixels' device)."""
        if self.codec is None:
            return pixels
        if self.codec.device != pixels.device:
            self.codec.to(pixels.device)
        return self.codec.encode(pixels, generator=generator, sample=sample).to(pixels.dtype)

    def _condition(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None, drop: bool
    ) -> Condition | None:
        if self.conditions is None or self.conditions.kind == "none":
            return None
        key = "caption_index" if self.conditions.kind == "prompts" else "label"
        cond, null = self.conditions.fixed(batch[key])
        if drop and self.caption_dropout > 0:
            cond = self.conditions.drop(cond, null, self.caption_dropout, generator)
        return cond

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        pixels = batch["pixel_values"]
        device = pixels.device
        x0 = self._x0(pixels, generator, sample=True)
        cond = self._condition(batch, generator, drop=True)
        assert self.objective is not None
        level = self.objective.draw_levels(len(x0), device, generator)
        draw_on = generator.device if generator is not None else device
        noise = torch.randn(x0.shape, device=draw_on, generator=generator).to(device, x0.dtype)
        return model(x0, noise, level, cond).mean()

    def _eval_levels(self) -> torch.Tensor:
        assert self.objective is not None
        if self.objective.parameterization == "edm":
            return torch.tensor(self.eval_sigmas, dtype=torch.float32)
        return self.objective.table_levels(torch.tensor(self.eval_timesteps))

    def _eval_batches(self, rank: int, world: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """This process's held-out rows as clean samples (latents: posterior mode), encoded once, with their
        fixed noise (one draw per row and level) and condition keys."""
        key = (rank, world)
        if key not in self._eval_cache:
            assert self.eval_rows is not None
            levels = len(self._eval_levels())
            mine = list(range(rank, len(self.eval_rows), world))
            batches = []
            for start in range(0, len(mine), self.batch_size):
                rows = mine[start : start + self.batch_size]
                batch = collate_images([self.eval_rows[i] for i in rows])
                x0 = self._x0(batch.pop("pixel_values").to(device), None, sample=False)
                noise = torch.stack(
                    [
                        torch.randn(
                            levels,
                            *x0.shape[1:],
                            generator=torch.Generator().manual_seed(EVAL_NOISE_SEED + i),
                        )
                        for i in rows
                    ],
                    dim=1,
                )
                batches.append({"x0": x0.cpu(), "noise": noise, **batch})
            self._eval_cache[key] = batches
        return self._eval_cache[key]

    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        if self.eval_rows is None:
            return {}
        levels = self._eval_levels()
        total = torch.zeros((), device=device)
        count = 0
        for batch in self._eval_batches(rank, world, device):
            x0 = batch["x0"].to(device)
            cond = self._condition({k: v.to(device) for k, v in batch.items()}, None, drop=False)
            for level, noise in zip(levels, batch["noise"]):
                lv = torch.full((len(x0),), float(level), device=device)
                total += model(x0, noise.to(device, x0.dtype), lv, cond).sum()
            count += len(x0)
        return {"loss": total / len(levels), "count": torch.tensor(float(count), device=device)}

    # ---------------------------------------------------------------------------------------------- saving
    def _save_denoiser(self, denoiser: Denoiser, folder: Path) -> None:
        """The teacher's own layout with the fine-tuned denoiser: its whole pipeline (the other components read
        from the teacher) or, for a bare model folder, the Denoiser's ``unet/`` + ``scheduler/`` layout."""
        if self.family.pipeline_class is None:
            denoiser.save_pretrained(folder)
            return
        from diffusers import DiffusionPipeline

        component = self.family.denoiser_component or "unet"
        pipe = DiffusionPipeline.from_pretrained(self.model_path, **{component: denoiser.model})
        pipe.save_pretrained(str(folder))

    def save_full(self, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None) -> None:
        if state is not None:
            model.load_state_dict(state)
        self._save_denoiser(model.denoiser, folder)

    def merge(self, adapter: Path, folder: Path) -> None:
        teacher = load_teacher(self.model_spec)
        teacher.model = PeftModel.from_pretrained(teacher.model, str(adapter)).merge_and_unload()
        self._save_denoiser(teacher, folder)

    def how_to_load(self, adapter: Path) -> str:
        component = self.family.denoiser_component or "unet"
        head = f"LoRA adapter for {self.family.label} teacher {self.model_path!r} ({component}).\n\n"
        if self.diffusers_pipeline is not None:
            return head + (
                "```python\nfrom diffusers import DiffusionPipeline\n\n"
                f"pipe = DiffusionPipeline.from_pretrained({self.model_path!r})\n"
                f"pipe.load_lora_weights({str(adapter)!r})\n```\n"
            )
        return head + (
            f"{self.family.label} has no LoRA loader in diffusers; apply the peft adapter to its {component}:\n\n"
            "```python\nfrom diffusers import DiffusionPipeline\nfrom peft import PeftModel\n\n"
            f"pipe = DiffusionPipeline.from_pretrained({self.model_path!r})\n"
            f"pipe.{component} = PeftModel.from_pretrained(pipe.{component}, {str(adapter)!r}).merge_and_unload()\n"
            "```\n"
        )
