"""SiD with the fake score and the generator as two LoRA adapters on one shared, frozen teacher.

Published SiD keeps three copies of the teacher (f_phi, f_psi, G), two Adam states and an EMA of G. Here the
teacher's diffusers UNet is loaded once and frozen, and peft injects two named adapters into it:

    f_phi(x) = base with every adapter disabled       (AdapterView(shared, None))
    f_psi(x) = base + the "fake_score" adapter         (AdapterView(shared, "fake_score"))
    G(x)     = base + the "generator" adapter          (AdapterView(shared, "generator"))

Only adapter weights get gradients, optimiser state and an EMA. Each view switches the shared model to its
adapter right before calling it. Autograd records the operations of each call, with the weights that call
used, so one graph can hold G's output feeding f_phi and f_psi (the SiD generator loss) and its backward pass
gives each adapter its own gradient (tests/test_sid_lora.py checks this against three separate copies).

Activation checkpointing re-runs each checkpointed block's forward during backward, when the shared model has
long since been switched to another adapter (G's blocks would be recomputed under f_psi's adapter, the last
one called). :func:`enable_adapter_checkpointing` therefore gives diffusers a checkpoint function that records
which adapter (and train/eval mode) was active when the block ran and re-activates it for the recomputation
(tests/test_sid_memory.py checks the gradients against a run without checkpointing).

peft's switching (``set_adapter``, ``enable/disable_adapter_layers``) also rewrites ``requires_grad`` of the
adapter weights; the engine owns those flags (it turns on only the current phase's adapter), so a view
restores every flag right after switching and before running the model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from distill.teachers.denoiser import Denoiser
from finetune.targets import default_targets

ADAPTERS = ("fake_score", "generator")
#: attribute of the shared denoiser holding the adapter :func:`activate` made active (None: all disabled)
_ACTIVE = "_sid_active_adapter"
_UNSET = object()
_LORA_LAYER_TYPES = (nn.Linear, nn.Conv2d)


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a string target: the module's full name, or its name ends with ``.target``."""
    return module_name == target or module_name.endswith("." + target)


def resolve_targets(unet: nn.Module, targets: Sequence[str] | None) -> list[str]:
    """The LoRA target names for ``unet``; every explicitly given target must match a Linear/Conv2d layer."""
    layers = [name for name, m in unet.named_modules() if isinstance(m, _LORA_LAYER_TYPES)]
    if not targets:
        defaults = default_targets(unet)
        found = [t for t in defaults if any(_matches(n, t) for n in layers)]
        if not found:
            raise ValueError(
                f"None of the default LoRA targets {list(defaults)} is a Linear/Conv2d layer of "
                f"{type(unet).__name__}; set lora_targets to some of its layer names"
            )
        return found
    for target in targets:
        if not any(_matches(n, target) for n in layers):
            examples = sorted({n.rsplit(".", 1)[-1] for n in layers})[:12]
            raise ValueError(
                f"lora_targets entry {target!r} matches no Linear/Conv2d layer of the teacher "
                f"{type(unet).__name__} (a target matches a module whose name equals it or ends with "
                f"'.{target}'); layer names end with e.g. {examples}"
            )
    return list(targets)


def add_sid_adapters(
    teacher: Denoiser, rank: int, alpha: float, targets: Sequence[str] | None = None
) -> Denoiser:
    """Freeze ``teacher`` and give its UNet the adapters "fake_score" and "generator" (in place; returned).

    Both adapters start with B = 0, so f_psi = G = f_phi at initialisation as in SiD (where both start as
    copies of the teacher). ``teacher.model`` becomes a ``peft.PeftModel``.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if rank < 1:
        raise ValueError(f"lora_rank={rank} must be >= 1")
    if isinstance(teacher.model, PeftModel):
        raise ValueError("The teacher already carries peft adapters; load a plain teacher")
    unet = teacher.model
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=resolve_targets(unet, targets))
    teacher.requires_grad_(False)
    peft_model = get_peft_model(unet, config, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        peft_model.add_adapter(name, copy.deepcopy(config))
    teacher.model = peft_model
    for p in peft_model.parameters():
        p.requires_grad_(False)  # the engine turns on one adapter per phase
    return teacher


def adapter_parameter_names(module: nn.Module, adapter: str) -> list[str]:
    """Names (as in ``module.named_parameters()``) of the LoRA weights of ``adapter``."""
    names = [
        name
        for name, _ in module.named_parameters()
        if adapter in name.split(".") and any(part.startswith("lora_") for part in name.split("."))
    ]
    if not names:
        raise ValueError(f"{type(module).__name__} holds no parameters of the adapter {adapter!r}")
    return names


def activate(shared: Denoiser, adapter: str | None) -> None:
    """Make ``adapter`` the only active adapter of ``shared`` (None: all disabled), keeping requires_grad."""
    peft_model = shared.model
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    tuner = peft_model.base_model
    if adapter is None:
        tuner.disable_adapter_layers()
    else:
        tuner.set_adapter(adapter)
        tuner.enable_adapter_layers()
    for p, flag in flags:
        p.requires_grad_(flag)
    object.__setattr__(shared, _ACTIVE, adapter)  # a plain attribute, not a submodule or buffer


def active_adapter(shared: Denoiser) -> Any:
    """The adapter last made active by :func:`activate` (None: all disabled; a sentinel if never set)."""
    return getattr(shared, _ACTIVE, _UNSET)


def enable_adapter_checkpointing(shared: Denoiser) -> None:
    """diffusers' gradient checkpointing on the shared model, each recomputation under the adapter it ran with.

    diffusers calls the checkpoint function per block (``_gradient_checkpointing_func(block, *args)``), inside
    the forward of whichever view is running. The function here notes that view's adapter and the block's
    train/eval mode, and the checkpointed closure re-activates both when it runs again in backward (no
    switching on the first run, where they are already active). Non-reentrant torch checkpointing, as
    diffusers' default; RNG state is preserved, so dropout draws the same masks.
    """
    model = _base_model(shared)
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient_checkpointing: the teacher's {type(model).__name__} does not support diffusers' gradient "
            "checkpointing; set gradient_checkpointing=false"
        )

    def checkpoint(block: nn.Module, *args: Any) -> Any:
        adapter, training = active_adapter(shared), block.training

        def run(*inner: Any) -> Any:
            previous, was_training = active_adapter(shared), block.training
            switch = previous != adapter
            if switch:
                activate(shared, adapter)
            if was_training != training:
                block.train(training)
            try:
                return block(*inner)
            finally:
                if was_training != training:
                    block.train(was_training)
                if switch and previous is not _UNSET:
                    activate(shared, previous)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(checkpoint)


def _base_model(shared: Denoiser) -> nn.Module:
    """The diffusers model under the peft wrapper of ``shared``."""
    from peft import PeftModel

    model = shared.model
    return model.get_base_model() if isinstance(model, PeftModel) else model


class AdapterView(nn.Module):
    """The shared denoiser as one network: ``adapter`` active (None = the frozen teacher).

    An adapter view registers the shared denoiser as its submodule, so its ``named_parameters()`` name the
    shared weights (the engine trains a subset of them). The teacher view (``adapter=None``) owns no
    parameters: it can be handed to the engine as a frozen model without the engine freezing the adapters or
    finding the trained weights in a frozen model; it runs the base in eval mode (dropout off), as a frozen
    teacher would be.
    """

    def __init__(self, shared: Denoiser, adapter: str | None) -> None:
        super().__init__()
        self.adapter = adapter
        if adapter is None:
            self._borrowed = (shared,)  # a tuple: not registered as a submodule
        else:
            self.denoiser = shared

    @property
    def shared(self) -> Denoiser:
        return self._borrowed[0] if self.adapter is None else self.denoiser

    def forward(self, *args, **kwargs) -> torch.Tensor:
        shared = self.shared
        activate(shared, self.adapter)
        if self.adapter is not None:
            return shared(*args, **kwargs)
        was_training = shared.training
        shared.eval()
        try:
            return shared(*args, **kwargs)
        finally:
            shared.train(was_training)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}"


def adapter_optimizer(
    module: nn.Module,
    names: Sequence[str],
    lr: float,
    loraplus_ratio: float = 1.0,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    **optimizer_kwargs,
) -> torch.optim.Optimizer:
    """An optimiser over the parameters ``names`` of ``module`` with LoRA+ learning rates (B: lr * ratio)."""
    from finetune.loraplus import create_loraplus_optimizer

    wanted = set(names)
    params = dict(module.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(n in wanted)
        return create_loraplus_optimizer(
            module, optimizer_cls, lr=lr, ratio=loraplus_ratio, **optimizer_kwargs
        )
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
