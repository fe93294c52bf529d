"""What a recipe conditions the teacher on, whatever the teacher is conditioned on: nothing, class labels or
prompts.

A recipe asks one :class:`ConditionSource` for its conditions and never looks at the kind again:

* :meth:`ConditionSource.sample`: random training conditions (uniform class labels or prompt indices) and
  their null counterpart for classifier-free guidance (the null class, or the negative prompt's embedding);
* :meth:`ConditionSource.fixed`: deterministic evaluation conditions for fixed sample indices;
* :meth:`ConditionSource.drop`: condition dropout (each sample's condition replaced by the null one with
  probability ``p``), so a trained score also learns the null score its guidance uses.

Prompt embeddings (:class:`~distill.teachers.prompts.PromptEmbeddings`) are keyed by the denoiser keywords; they
become :class:`~distill.teachers.denoiser.Condition` fields as the family's denoiser takes them:
``encoder_hidden_states`` is the field of that name, SDXL's ``text_embeds`` goes into ``added_cond_kwargs`` with
``time_ids``, everything else (``pooled_projections``, ``encoder_attention_mask``) into ``model_kwargs``.
Flux's shared ``txt_ids`` are not passed: the Denoiser builds ``txt_ids`` / ``img_ids`` itself.

:meth:`ConditionSource.for_teacher` builds the source a teacher needs and refuses a mismatch at start-up (a
text teacher without prompts, prompts for a teacher that takes none), before any weights are loaded.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from distill.teachers.denoiser import Condition
from distill.teachers.edm import drop_labels
from distill.teachers.families import TeacherFamily
from distill.teachers.prompts import PromptEmbeddings, encode_prompts, load_prompts

__all__ = ["ConditionSource", "TEXT_CONDITIONINGS", "TeacherInputSettings", "check_conditioning"]

#: ``TeacherFamily.conditioning`` values a ConditionSource feeds from prompts
TEXT_CONDITIONINGS = ("text", "text+pooled")
#: ... and without prompts
UNTEXTED_CONDITIONINGS = ("none", "class_labels")
#: embedding keys that go into ``Condition.added_cond_kwargs`` (SDXL); ``encoder_hidden_states`` is a field
ADDED_COND_KEYS = ("text_embeds",)
#: shared keys the Denoiser builds itself (Flux's ``txt_ids``): never passed on
SKIPPED_SHARED = ("txt_ids",)

Kind = Literal["none", "classes", "prompts"]


def _is_text(family: TeacherFamily) -> bool:
    return family.conditioning.startswith("text")


def check_conditioning(
    teacher: str,
    family: TeacherFamily,
    prompts: str | os.PathLike[str] | None,
    prompt_column: str | None = None,
    negative_prompt: str = "",
) -> None:
    """``ValueError`` when the prompt settings do not fit the teacher's conditioning (configs only, no weights):
    a text teacher needs ``prompts``; a teacher without text takes no prompt settings."""
    label = f"teacher {teacher!r} ({family.label})"
    if _is_text(family):
        if family.conditioning not in TEXT_CONDITIONINGS:
            raise ValueError(
                f"{label} is conditioned on {family.conditioning!r}; conditions can be built for "
                f"{list(TEXT_CONDITIONINGS + UNTEXTED_CONDITIONINGS)}"
            )
        if prompts is None:
            raise ValueError(
                f"{label} is conditioned on text: pass --prompts FILE (a text file, one prompt a line, or "
                ".jsonl/.csv/.parquet/datasets folder with --prompt_column)"
            )
        return
    if family.conditioning not in UNTEXTED_CONDITIONINGS:
        raise ValueError(
            f"{label} is conditioned on {family.conditioning!r}; conditions can be built for "
            f"{list(TEXT_CONDITIONINGS + UNTEXTED_CONDITIONINGS)}"
        )
    given = {
        k: v
        for k, v in (
            ("prompts", prompts),
            ("prompt_column", prompt_column),
            ("negative_prompt", negative_prompt),
        )
        if v not in (None, "")
    }
    if given:
        what = "unconditional" if family.conditioning == "none" else "class-conditional"
        raise ValueError(
            f"{', '.join(f'{k}={v!r}' for k, v in given.items())}: {label} is {what} and takes no prompts; "
            "drop the prompt settings"
        )


class ConditionSource:
    """The conditions of one teacher: ``kind`` is ``none``, ``classes`` or ``prompts``. Build it with
    :meth:`unconditional`, :meth:`classes`, :meth:`prompts` or :meth:`for_teacher`."""

    def __init__(
        self,
        kind: Kind,
        num_classes: int | None = None,
        null_label: int | None = None,
        embeddings: PromptEmbeddings | None = None,
        image_size: tuple[int, int] | None = None,
        family: str | None = None,
        source: str | None = None,
    ) -> None:
        self.kind: Kind = kind
        self.num_classes = num_classes
        self.null_label = null_label
        self.embeddings = embeddings
        self.image_size = image_size
        self.family = family
        self.source = source

    # ------------------------------------------------------------------------------------ constructors
    @classmethod
    def unconditional(cls) -> ConditionSource:
        return cls("none")

    @classmethod
    def classes(cls, num_classes: int, null_label: int | None) -> ConditionSource:
        """Labels ``0..num_classes-1``; ``null_label`` the null class for guidance (``None``: the teacher has
        none, so it cannot be guided or trained with label dropout)."""
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        return cls("classes", num_classes=num_classes, null_label=null_label)

    @classmethod
    def prompts(
        cls,
        embeddings: PromptEmbeddings,
        image_size: tuple[int, int] | None,
        family: str,
        source: str | None = None,
    ) -> ConditionSource:
        """Prompt conditions from encoded prompts; ``image_size`` (H, W) of the images (SDXL's ``time_ids``)."""
        if any(k in ADDED_COND_KEYS for k in embeddings.keys) and image_size is None:
            raise ValueError(
                f"{family} prompt embeddings carry {list(ADDED_COND_KEYS)}: their time_ids need the image size"
            )
        return cls("prompts", embeddings=embeddings, image_size=image_size, family=family, source=source)

    @classmethod
    def for_teacher(
        cls,
        teacher: str,
        family: TeacherFamily,
        *,
        prompts: str | os.PathLike[str] | None = None,
        prompt_column: str | None = None,
        negative_prompt: str = "",
        num_classes: int | None = None,
        null_label: int | None = None,
        image_size: tuple[int, int] | None = None,
        accelerator: Any = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> ConditionSource:
        """The source ``teacher`` (its :class:`TeacherFamily` ``family``) needs.

        Text teachers: ``prompts`` read with ``prompt_column`` and encoded by the teacher's own text encoders
        (cached under ``cache_dir``, default :func:`~distill.teachers.prompts.default_cache_dir`; with an
        ``accelerator`` the main process encodes first, the others read its cache), ``image_size`` default
        ``family.image_size``. Class teachers: ``num_classes`` / ``null_label`` (the recipe reads them from the
        loaded teacher). Raises ``ValueError`` (see :func:`check_conditioning`) and ``FileNotFoundError`` for a
        missing prompt file, before any encoder is loaded.
        """
        check_conditioning(teacher, family, prompts, prompt_column, negative_prompt)
        if not _is_text(family):
            if num_classes is not None:
                return cls.classes(num_classes, null_label)
            if family.conditioning == "class_labels":
                raise ValueError(
                    f"teacher {teacher!r} ({family.label}) is class-conditional: pass num_classes"
                )
            return cls.unconditional()
        assert prompts is not None
        texts = load_prompts(prompts, prompt_column)
        device = getattr(accelerator, "device", None)
        first = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
        with first:
            embeddings = encode_prompts(
                teacher, texts, negative_prompt=negative_prompt, cache_dir=cache_dir, device=device
            )
        return cls.prompts(embeddings, image_size or family.image_size, family.family, source=str(prompts))

    # ---------------------------------------------------------------------------------------- facts
    @property
    def num_prompts(self) -> int:
        return len(self.embeddings) if self.embeddings is not None else 0

    @property
    def has_null(self) -> bool:
        """Whether there is a null condition (guidance and condition dropout need one)."""
        return self.kind == "prompts" or (self.kind == "classes" and self.null_label is not None)

    def all_prompt_texts(self) -> list[str] | None:
        """Every prompt in order (evaluation sample ``i`` gets prompt ``i % num_prompts``), or None without prompts."""
        return self.prompt_texts(list(range(self.num_prompts))) if self.kind == "prompts" else None

    def prompt_texts(self, indices: Tensor | list[int]) -> list[str]:
        """The prompt strings of ``indices`` (taken modulo the prompt count, as :meth:`fixed` does)."""
        if self.embeddings is None:
            raise ValueError(f"a {self.kind!r} condition source has no prompts")
        idx = torch.as_tensor(indices).reshape(-1) % self.num_prompts
        return self.embeddings.prompts(idx)

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.kind == "none":
            return "conditions: none (unconditional teacher)"
        if self.kind == "classes":
            null = "no null class" if self.null_label is None else f"null class {self.null_label}"
            return f"conditions: {self.num_classes:,} classes, {null}"
        assert self.embeddings is not None
        negative = self.embeddings.meta.get("negative_prompt", "")
        source = Path(self.source).name if self.source else "memory"
        return (
            f"conditions: {self.num_prompts:,} prompts from {source} ({self.embeddings.pipeline_class}, "
            f"cache {self.embeddings.folder}), negative {negative!r}"
        )

    # ----------------------------------------------------------------------------------- conditions
    def _text_condition(self, embeds: dict[str, Tensor]) -> Condition:
        """Denoiser keywords -> Condition fields (see the module docstring)."""
        hidden = embeds["encoder_hidden_states"]
        added = {k: v for k, v in embeds.items() if k in ADDED_COND_KEYS}
        model_kwargs = {k: v for k, v in embeds.items() if k != "encoder_hidden_states" and k not in added}
        if added:
            assert self.image_size is not None
            h, w = self.image_size
            # StableDiffusionXLPipeline._get_add_time_ids for a default call: original_size = target_size =
            # (height, width), crops_coords_top_left = (0, 0); in prompt_embeds' dtype, the same for the null
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=hidden.dtype, device=hidden.device)
            added["time_ids"] = time_ids.repeat(hidden.shape[0], 1)
        return Condition(
            encoder_hidden_states=hidden, added_cond_kwargs=added or None, model_kwargs=model_kwargs or None
        )

    def _null_labels(self, labels: Tensor) -> Condition | None:
        if self.null_label is None:
            return None
        return Condition(class_labels=torch.full_like(labels, self.null_label))

    def sample(
        self, n: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Condition | None, Condition | None]:
        """``n`` random conditions and their null (``(None, None)`` for an unconditional teacher, which draws
        nothing; ``None`` null for a class teacher without a null class). Labels are drawn as
        ``torch.randint(0, num_classes, (n,), device=device)``; prompt indices on ``generator``'s device (CPU
        without one), then read from the Arrow cache."""
        if self.kind == "none":
            return None, None
        if self.kind == "classes":
            assert self.num_classes is not None
            labels = torch.randint(0, self.num_classes, (n,), device=device, generator=generator)
            return Condition(class_labels=labels), self._null_labels(labels)
        draw_on = generator.device if generator is not None else "cpu"
        indices = torch.randint(0, self.num_prompts, (n,), device=draw_on, generator=generator)
        return self._prompt_conditions(indices, n, device)

    def _prompt_conditions(
        self, indices: Tensor, n: int, device: torch.device | str | None
    ) -> tuple[Condition, Condition]:
        assert self.embeddings is not None
        cond = self._text_condition(self.embeddings.embeds(indices, device=device))
        null = self._text_condition(self.embeddings.null(n, device=device))
        return cond, null

    def fixed(self, indices: Tensor) -> tuple[Condition | None, Condition | None]:
        """Deterministic conditions for sample ``indices`` (evaluation): class ``i % num_classes`` or prompt
        ``i % num_prompts``, on ``indices``' device, and their null."""
        indices = torch.as_tensor(indices).reshape(-1)
        if self.kind == "none":
            return None, None
        if self.kind == "classes":
            assert self.num_classes is not None
            labels = indices.long() % self.num_classes
            return Condition(class_labels=labels), self._null_labels(labels)
        return self._prompt_conditions(indices.cpu() % self.num_prompts, len(indices), indices.device)

    def drop(
        self,
        cond: Condition | None,
        null: Condition | None,
        p: float,
        generator: torch.Generator | None = None,
    ) -> Condition | None:
        """Condition dropout: each sample's condition becomes the null one with probability ``p``.

        Labels go through :func:`~distill.teachers.edm.drop_labels` (the null class; ``null`` is not needed);
        text through :meth:`Condition.where` with ``null``. Nothing is drawn at ``p = 0``.
        """
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"condition dropout p={p} must be in [0, 1]")
        if cond is None or self.kind == "none":
            return cond
        if self.kind == "classes":
            if self.null_label is None:
                raise ValueError(
                    f"condition dropout p={p}: the teacher has no null class ({self.num_classes} classes)"
                )
            assert cond.class_labels is not None
            return Condition(class_labels=drop_labels(cond.class_labels, p, self.null_label, generator))
        if null is None:
            raise ValueError("condition dropout of prompts needs the null (negative prompt) condition")
        if p == 0:
            return cond
        n = cond.batch_size or 0
        draw_on = generator.device if generator is not None else cond.encoder_hidden_states.device
        drop = torch.rand(n, device=draw_on, generator=generator) < p
        return Condition.where(~drop, cond, null)


@dataclass
class TeacherInputSettings:
    """The settings every distillation recipe shares for what it feeds the teacher: prompts of a text teacher
    (read by :meth:`ConditionSource.for_teacher`), the image resolution of a latent teacher without a configured
    sample size, and the evaluation metrics. Recipe configs inherit them next to ``TrainConfig``."""

    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompts of a text-to-image teacher (required for one): a text file, one prompt a line, or a "
            ".json/.jsonl/.csv/.parquet file, a local datasets folder or a hub dataset (see prompt_column); "
            "encoded once by the teacher's own text encoders and cached on disk."
        },
    )
    prompt_column: str | None = field(
        default=None,
        metadata={
            "help": "Column of the prompts in a table source; None: the first of prompt, text, caption."
        },
    )
    negative_prompt: str = field(
        default="",
        metadata={
            "help": "The null condition of a text teacher's classifier-free guidance (SiD: also of prompt "
            "dropout; reflow: of the guided round-1 pairs)."
        },
    )
    prompt_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where prompt embeddings are cached; None: $ONESTEP_CACHE/prompt_embeddings, else "
            "~/.cache/onestep/prompt_embeddings."
        },
    )
    eval_metrics: Literal["auto", "fashion", "none"] = field(
        default="auto",
        metadata={
            "help": "Feature metrics of the evaluation samples: fashion = the shipped Fashion-MNIST classifier's FD, "
            "prompt alignment and precision/recall; auto = fashion for the shipped text-to-image teacher; none."
        },
    )
    resolution: int | None = field(
        default=None,
        metadata={
            "help": "Image side in pixels (latent teachers: divided by the VAE's factor); None: the teacher's "
            "configured sample size (Flux has none: give it)."
        },
    )
