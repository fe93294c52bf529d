"""LoRA-GA (Wang et al. 2024, arXiv 2407.05000): start the adapter where its first step follows the full
fine-tuning gradient.

For each adapted layer with weight W (``d_out x d_in``) and averaged full-weight gradient G = U S V^T:
A0 = c V^T[:r], B0 = c U[:, r:2r] (direction "ArB2r"), c = d_out^(1/4) / sqrt(gamma) (the paper's "stable"
scale, gamma = 16), and W <- W - s B0 A0 (s = the layer's LoRA scaling) so the model's output is unchanged.
The first SGD step then changes the effective weight by -lr s^2 c^2 (G V_r V_r^T + U_{r:2r} U_{r:2r}^T G),
the rank-2r truncation of the full fine-tuning step.

Adapters are injected by peft first (any ``target_modules`` spec, ``all-linear`` included), and then this
module overwrites their A, B and the base weight. What it adds beyond peft 0.21's ``preprocess_loraga``:

* the paper's scaling of both A and B, independent of the gradient's size (peft multiplies B by the singular
  values, so 1000x the loss gives 1000x B);
* convolutions (``nn.Conv1d/2d/3d``, so diffusers UNets): the kernel is treated as the ``d_out x (d_in k_h k_w)``
  matrix that peft's conv LoRA (``B`` 1x1 after a full-kernel ``A``) factorises;
* several processes: each process accumulates its own gradient, then layer by layer the gradient is reduced to
  one owner process (``torch.distributed.reduce``), which computes the SVD and broadcasts A0 and B0, so every
  rank holds the same initialisation and at most one layer's gradient is on the accelerator at a time;
* bounded memory during estimation: each weight's gradient is moved to CPU (fp32) by a post-accumulate hook
  as soon as backward produces it, as the paper's code does (peft keeps every ``.grad`` on the device);
* loud failures where peft falls back to a plain init silently: unsupported or gradient-less target layers,
  embeddings, grouped or dilated convolutions, quantized (bitsandbytes) bases, ZeRO-3-partitioned weights.

Quantized bases are refused: W <- W - s B0 A0 cannot be stored exactly in 4-bit, so the output would change at
initialisation; use LoRA or LoRA+ with a quantized base, or LoRA-GA on a bf16/fp32 base.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

Direction = Literal["ArB2r", "ArBr", "A2rBr"]
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SUPPORTED = (nn.Linear, Conv1D, *_CONV)
#: Exact SVD up to this smaller dimension; peft's randomized SVD (q = 4r, 4 iterations) above it.
EXACT_SVD_MAX_DIM = 2048


@dataclass
class LoraGAOptions:
    """How to turn gradients into A0, B0 (defaults: the paper's)."""

    direction: Direction = "ArB2r"
    stable_gamma: float = 16.0
    offload_to_cpu: bool = True


class LoraGAError(ValueError):
    """A model or setting LoRA-GA cannot initialise correctly (raised instead of a silent plain-LoRA init)."""


def _is_quantized(base: nn.Module) -> bool:
    weight = getattr(base, "weight", None)
    return (
        hasattr(base, "quant_state")
        or getattr(weight, "quant_state", None) is not None
        or type(weight).__name__ in ("Params4bit", "Int8Params")
        or (isinstance(weight, torch.Tensor) and not weight.is_floating_point())
    )


def lora_ga_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """The peft LoRA layers of ``model`` holding ``adapter_name``, checked to be ones LoRA-GA can initialise."""
    layers: dict[str, LoraLayer] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name in getattr(module, "lora_embedding_A", {}):
            raise LoraGAError(
                f"LoRA-GA cannot initialise the embedding layer {name!r} (the paper covers weight matrices "
                "applied to activations): remove it from target_modules"
            )
        if adapter_name not in module.lora_A:
            continue
        base = module.get_base_layer()
        if _is_quantized(base):
            raise LoraGAError(
                f"LoRA-GA does not support the quantized layer {name!r} ({type(base).__name__}): subtracting "
                "the initial adapter from a 4/8-bit weight cannot be stored exactly, so the model's output would "
                "change at step 0. Load the base in bf16/fp32 for LoRA-GA, or use method lora / lora_plus."
            )
        if not isinstance(base, _SUPPORTED):
            raise LoraGAError(
                f"LoRA-GA supports nn.Linear, transformers' Conv1D and nn.Conv1d/2d/3d; {name!r} is "
                f"{type(base).__name__}: remove it from target_modules"
            )
        if isinstance(base, _CONV) and (base.groups != 1 or any(d != 1 for d in base.dilation)):
            raise LoraGAError(
                f"LoRA-GA needs groups=1 and dilation=1 convolutions (peft's conv LoRA is not a kernel "
                f"factorisation otherwise); {name!r} has groups={base.groups}, dilation={base.dilation}"
            )
        if getattr(base.weight, "ds_shape", None) is not None:
            raise LoraGAError(
                f"{name!r} is partitioned by DeepSpeed ZeRO-3: run the LoRA-GA initialisation on the full "
                "model before accelerator.prepare (zero3_init_flag: false in the accelerate config)"
            )
        rank = module.r[adapter_name]
        rows, cols = weight_matrix(base).shape
        if 2 * rank > min(rows, cols):
            raise LoraGAError(
                f"LoRA-GA needs 2 * rank <= min(d_out, d_in); {name!r} is {rows}x{cols} and rank is {rank}"
            )
        layers[name] = module
    if not layers:
        raise LoraGAError(f"No LoRA layers with adapter {adapter_name!r} found: inject the adapter first")
    return layers


def weight_matrix(base: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight (or a tensor shaped like it) as the ``d_out x d_in`` matrix its LoRA factorises."""
    w = base.weight if weight is None else weight
    if isinstance(base, Conv1D):
        return w.t()
    return w.reshape(w.shape[0], -1)


def _matrix_to_weight(base: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    if isinstance(base, Conv1D):
        return matrix.t().contiguous()
    return matrix.reshape(base.weight.shape)


def estimate_gradients(
    model: nn.Module,
    layers: dict[str, LoraLayer],
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    offload_to_cpu: bool = True,
    batch_weight: Callable[[Any], float] | None = None,
    probes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Mean over ``batches`` of d loss / d W for the base weight of every layer (fp32, on this process only).

    ``batch_weight`` (e.g. the batch's number of samples) weights each batch's gradient, so batch means of
    unequal batches average to the mean over samples; None weighs every batch 1. ``probes``, if given, is filled
    with each layer's first input and (base) output on the first example, on CPU, for
    :func:`output_change`. Adapters are disabled and only the target base weights require gradients while this runs; every gradient
    leaves ``.grad`` (to CPU with ``offload_to_cpu``) as soon as it is complete. All flags are restored after.
    """
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def accumulate(name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.detach().to(torch.float32)
            grad = grad.cpu() if offload_to_cpu else grad.clone()
            if name in sums:
                sums[name].add_(grad)
            else:
                sums[name] = grad
            param.grad = None

        return hook

    count, total_weight = 0, 0.0
    try:
        for layer in layers.values():
            layer.enable_adapters(False)
        for p in flags:
            p.requires_grad_(False)
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight
            weight.requires_grad_(True)
            hooks.append(weight.register_post_accumulate_grad_hook(accumulate(name)))
            if probes is not None:
                hooks.append(layer.register_forward_hook(_probe(name, probes)))
        model.train()
        with torch.enable_grad():
            for batch in batches:
                weight = 1.0 if batch_weight is None else float(batch_weight(batch))
                if weight <= 0:
                    raise LoraGAError(f"LoRA-GA batch weight must be > 0, got {weight}")
                (loss_fn(batch) * weight).backward()
                count += 1
                total_weight += weight
    finally:
        for handle in hooks:
            handle.remove()
        for layer in layers.values():
            layer.enable_adapters(True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    if count == 0:
        raise LoraGAError("LoRA-GA gradient estimation got no batches")
    missing = sorted(set(layers) - set(sums))
    if missing:
        raise LoraGAError(
            f"LoRA-GA: no gradient reached {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} layers): they do not influence the loss; remove them from target_modules"
        )
    return {name: s.div_(total_weight) for name, s in sums.items()}


def _probe(
    name: str, probes: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if name not in probes and args and isinstance(args[0], torch.Tensor):
            # copies: a slice (and .cpu() of a CPU tensor) would keep the whole batch's activations alive
            probes[name] = (
                args[0][:1].detach().to("cpu", copy=True),
                output[:1].detach().to("cpu", copy=True),
            )

    return hook


@torch.no_grad()
def output_change(
    layers: dict[str, LoraLayer], probes: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Largest change, relative to the output's largest entry, of a probed layer's output on its probed input
    (in eval mode, so no dropout) now that A0, B0 and the offset base are set: 0 up to float rounding when the
    initialisation is exact; the rounding of W - s B0 A0 to a bf16/fp16 base shows here."""
    worst = 0.0
    for name, (x, before) in probes.items():
        layer = layers[name]
        was_training = layer.training
        layer.eval()
        try:
            after = layer(x.to(layer.get_base_layer().weight.device)).float().cpu()
        finally:
            layer.train(was_training)
        scale = before.float().abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        worst = max(worst, ((after - before.float()).abs().max() / scale).item())
    return worst


def lora_ga_factors(
    grad: torch.Tensor, rank: int, options: LoraGAOptions | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [rank x d_in], B0 [d_out x rank]) from the gradient matrix, in fp32, with the paper's scale."""
    options = options or LoraGAOptions()
    grad = grad.to(torch.float32)
    rows, cols = grad.shape
    if min(rows, cols) <= EXACT_SVD_MAX_DIM:
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[grad.device] if grad.is_cuda else []):
            torch.manual_seed(0)
            u, _, v = torch.svd_lowrank(grad, q=min(4 * rank, rows, cols), niter=4)
        vh = v.t()
    r = rank
    if options.direction == "ArB2r":
        a, b = vh[:r], u[:, r : 2 * r]
    elif options.direction == "ArBr":
        a, b = vh[1 : 2 * r : 2], u[:, 0 : 2 * r : 2]
    elif options.direction == "A2rBr":
        a, b = vh[r : 2 * r], u[:, :r]
    else:
        raise LoraGAError(f"Unknown LoRA-GA direction {options.direction!r}")
    scale = rows**0.25 / math.sqrt(options.stable_gamma)
    return (a * scale).contiguous(), (b * scale).contiguous()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def initialize_lora_ga(
    layers: dict[str, LoraLayer],
    grads: dict[str, torch.Tensor],
    options: LoraGAOptions | None = None,
    adapter_name: str = "default",
    share: float | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Average the gradients over processes, set A0, B0 and W <- W - s B0 A0 in every layer.

    ``share`` is this process's weight in the average (its samples / all processes' samples, so the result is
    the mean over every sample whatever the split; the shares must sum to 1); None: 1 / world size. Layer i's
    gradient is reduced to process ``i % world_size``, which computes the SVD and broadcasts the
    factors, so the processes share the work and end with identical weights. Returns ``{layer name: (A0, B0)}``
    as stored in the adapter (CPU, adapter dtype and shape), needed to convert the trained adapter for the
    original base (:func:`finetune.export.lora_ga_to_lora`).
    """
    options = options or LoraGAOptions()
    world, rank = _world()
    share = 1.0 / world if share is None else float(share)
    _check_shares(share, world, next(iter(layers.values())).get_base_layer().weight.device)
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, name in enumerate(sorted(layers)):
        layer = layers[name]
        base = layer.get_base_layer()
        weight = base.weight
        r = layer.r[adapter_name]
        rows, cols = weight_matrix(base).shape
        owner = i % world
        grad = grads[name].to(weight.device, torch.float32) * share
        if world > 1:
            dist.reduce(grad, dst=owner, op=dist.ReduceOp.SUM)
        if rank == owner:
            a, b = lora_ga_factors(weight_matrix(base, grad), r, options)
        else:
            a = torch.empty(r, cols, device=weight.device)
            b = torch.empty(rows, r, device=weight.device)
        del grad
        if world > 1:
            dist.broadcast(a, src=owner)
            dist.broadcast(b, src=owner)
        initial[name] = set_lora_ga_weights(layer, a, b, adapter_name)
    return initial


def _check_shares(share: float, world: int, device: torch.device) -> None:
    """The processes' shares of the gradient average must be positive and sum to 1 (checked on every process)."""
    total = share
    if world > 1:
        summed = torch.tensor([share], dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        total = float(summed.item())
    if share <= 0 or abs(total - 1.0) > 1e-6:
        raise LoraGAError(
            f"LoRA-GA gradient shares must be > 0 and sum to 1 over the processes; this process has {share}, "
            f"the sum is {total}"
        )


@torch.no_grad()
def set_lora_ga_weights(
    layer: LoraLayer, a: torch.Tensor, b: torch.Tensor, adapter_name: str = "default"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write A0, B0 into the adapter and subtract s B0 A0 from the base weight (in fp32, then cast)."""
    base = layer.get_base_layer()
    lora_a = layer.lora_A[adapter_name].weight
    lora_b = layer.lora_B[adapter_name].weight
    lora_a.copy_(a.reshape(lora_a.shape).to(lora_a.dtype))
    lora_b.copy_(b.reshape(lora_b.shape).to(lora_b.dtype))
    # the offset uses the adapter's stored (possibly low-precision) values, as the forward pass will
    product = lora_b.reshape(lora_b.shape[0], -1).float() @ lora_a.reshape(lora_a.shape[0], -1).float()
    scaling = layer.scaling[adapter_name]
    new = weight_matrix(base, base.weight.float()) - scaling * product
    base.weight.copy_(_matrix_to_weight(base, new).to(base.weight.dtype))
    return lora_a.detach().cpu().clone(), lora_b.detach().cpu().clone()


def apply_lora_ga(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    options: LoraGAOptions | None = None,
    adapter_name: str = "default",
    batch_weight: Callable[[Any], float] | None = None,
    share: float | None = None,
    report: dict[str, Any] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Estimate gradients on ``batches`` and initialise every LoRA layer of ``model`` (a peft model, before
    ``accelerator.prepare``). ``batch_weight`` and ``share``: see :func:`estimate_gradients` and
    :func:`initialize_lora_ga`. ``report``, if given, receives ``output_change`` (:func:`output_change`, on
    this process's first example) and ``base_dtypes`` (the adapted base weights' dtypes: a bf16/fp16 base
    stores W - s B0 A0 rounded, so the start is not exact there). Returns the initial factors for
    :func:`finetune.export.lora_ga_to_lora`."""
    options = options or LoraGAOptions()
    layers = lora_ga_layers(model, adapter_name)
    probes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if report is not None else None
    grads = estimate_gradients(model, layers, batches, loss_fn, options.offload_to_cpu, batch_weight, probes)
    initial = initialize_lora_ga(layers, grads, options, adapter_name, share)
    if report is not None:
        report["output_change"] = output_change(layers, probes or {})
        report["base_dtypes"] = sorted({str(m.get_base_layer().weight.dtype) for m in layers.values()})
    return initial
