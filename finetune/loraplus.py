"""LoRA+ (Hayou et al. 2024, arXiv 2402.12354): B matrices learn ``ratio`` times faster than A matrices.

The parameter classification is the paper's and peft's (``peft.optimizers.create_loraplus_optimizer``, checked
against it in the tests): LoRA on embeddings -> ``lr_embedding``; ``lora_B`` and every trainable 1-D
parameter -> ``lr * ratio``; everything else (``lora_A``, full heads such as ``modules_to_save``) -> ``lr``.
What differs from peft 0.21's function, and why:

* empty groups are dropped: DeepSpeed >= 0.18 drops them itself and a torch >= 2.10 LR scheduler built on the
  4-group optimiser then fails at its first step;
* a plain ``weight_decay`` is honoured, as in the paper's code (peft silently replaces it with
  ``loraplus_weight_decay``, default 0); biases, the parameters of every normalisation layer (LayerNorm,
  RMSNorm, GroupNorm, BatchNorm: the paper's code only knows ``nn.LayerNorm``) and DoRA magnitudes are never
  decayed (decaying a DoRA magnitude shrinks the weight's norm towards 0);
* a parameter's rank is read from DeepSpeed's ``ds_shape`` when present, so ZeRO-3-partitioned (flattened 1-D)
  A matrices are not mistaken for biases and given B's learning rate;
* every group carries a ``name`` ("A", "B", "B_no_decay", "embedding") so that the groups can be checked after
  ``accelerator.prepare`` (see :func:`loraplus_learning_rates`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

GROUP_A, GROUP_B, GROUP_B_NO_DECAY, GROUP_EMBEDDING = "A", "B", "B_no_decay", "embedding"
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._NormBase,
)


def _is_norm(module: nn.Module) -> bool:
    """Normalisation layers, including model-specific ones (``LlamaRMSNorm``, ``T5LayerNorm``)."""
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def _param_ndim(param: torch.Tensor) -> int:
    """Rank of the parameter as the model sees it (ZeRO-3 partitions parameters into flat 1-D shards)."""
    shape = getattr(param, "ds_shape", None)
    return len(shape) if shape is not None else param.ndim


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of trainable parameters that weight decay must not touch: biases, norm layers, DoRA magnitudes."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        norm = _is_norm(module)
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if norm or param_name == "bias" or "lora_magnitude_vector" in full:
                names.add(full)
    return names


def loraplus_group_of(name: str, param: torch.Tensor, no_decay: set[str]) -> str:
    """The LoRA+ group of one trainable parameter (the paper's and peft's rules)."""
    if "lora_embedding_A" in name or "lora_embedding_B" in name:
        return GROUP_EMBEDDING
    if "lora_B" in name or _param_ndim(param) == 1:
        return GROUP_B_NO_DECAY if name in no_decay else GROUP_B
    return GROUP_A


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    lr_embedding: float = 1e-6,
) -> list[dict[str, Any]]:
    """Non-empty parameter groups of the trainable parameters of ``model`` with LoRA+ learning rates."""
    if ratio < 1:
        raise ValueError(f"loraplus ratio must be >= 1 (lr_B / lr_A), got {ratio}")
    no_decay = no_decay_parameter_names(model)
    members: dict[str, list[torch.Tensor]] = {
        GROUP_A: [],
        GROUP_EMBEDDING: [],
        GROUP_B: [],
        GROUP_B_NO_DECAY: [],
    }
    for name, param in model.named_parameters():
        if param.requires_grad:
            members[loraplus_group_of(name, param, no_decay)].append(param)
    settings = {
        GROUP_A: (lr, weight_decay),
        GROUP_EMBEDDING: (lr_embedding, weight_decay),
        GROUP_B: (lr * ratio, weight_decay),
        GROUP_B_NO_DECAY: (lr * ratio, 0.0),
    }
    groups = [
        {"name": key, "params": params, "lr": settings[key][0], "weight_decay": settings[key][1]}
        for key, params in members.items()
        if params
    ]
    if not groups:
        raise ValueError("The model has no trainable parameters (did the adapter get injected?)")
    return groups


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    lr_embedding: float = 1e-6,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """Any optimiser class (torch, bitsandbytes 8-bit, ...) over :func:`loraplus_param_groups`.

    For bitsandbytes 8-bit optimisers, ``nn.Embedding`` weights keep 32-bit optimiser state, as the paper's code
    and peft do (8-bit state is unstable for embeddings).
    """
    groups = loraplus_param_groups(model, lr, ratio, weight_decay, lr_embedding)
    optimizer = optimizer_cls(groups, lr=lr, **optimizer_kwargs)
    if "8bit" in optimizer_cls.__name__:
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def loraplus_learning_rates(optimizer: Any) -> dict[str, float]:
    """``{group name: lr}`` of an optimiser, also after ``accelerator.prepare`` wrapped it (DDP, DeepSpeed,
    FSDP): the check that LoRA+'s groups survived preparation."""
    groups: Iterable[dict[str, Any]] = optimizer.param_groups
    return {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(groups)}


def check_loraplus_groups(optimizer: Any, lr: float, ratio: float) -> None:
    """Raise if a prepared optimiser no longer holds LoRA+'s A and B learning rates (e.g. a DeepSpeed config
    with its own ``optimizer`` section replaced it)."""
    rates = loraplus_learning_rates(optimizer)
    scheduled = _scheduler_factor(optimizer)
    for name, expected in ((GROUP_A, lr), (GROUP_B, lr * ratio), (GROUP_B_NO_DECAY, lr * ratio)):
        if name in rates and not _close(rates[name], expected * scheduled):
            raise RuntimeError(
                f"LoRA+ group {name!r} has lr {rates[name]:.3g} after preparation, expected "
                f"{expected * scheduled:.3g}: the optimiser was replaced or its groups merged; groups now {rates}"
            )
    if GROUP_A not in rates and GROUP_B not in rates and GROUP_B_NO_DECAY not in rates:
        raise RuntimeError(f"The prepared optimiser has no LoRA+ groups (found {rates})")


def _scheduler_factor(optimizer: Any) -> float:
    """Ratio of the current to the initial lr of the first group (an LR scheduler scales all groups alike)."""
    group = optimizer.param_groups[0]
    initial = group.get("initial_lr")
    return float(group["lr"]) / float(initial) if initial else 1.0


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-12)
