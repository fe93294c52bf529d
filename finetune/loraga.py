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
* randomized SVD only above :data:`EXACT_SVD_MAX_DIM` (the authors and peft use it everywhere, which on a
  small layer is both slower and inexact);
* several processes: each process accumulates its own gradient, then layer by layer the gradient is reduced to
  one owner process (``torch.distributed.reduce``), which computes the SVD and broadcasts A0 and B0, so every
  rank holds the same initialisation and at most one layer's gradient is on the accelerator at a time;
* bounded memory during estimation: each weight's gradient is moved to CPU (fp32) by a post-accumulate hook
  as soon as backward produces it, as the paper's code does (peft keeps every ``.grad`` on the device);
* loud failures where peft falls back to a plain init silently: unsupported or gradient-less target layers,
  embeddings, grouped or dilated convolutions, quantized layers other than bitsandbytes' 4/8-bit Linear.

Quantized bases (bitsandbytes ``Linear4bit`` nf4/fp4, ``Linear8bitLt``), as the authors' code does: the gradient
is taken with respect to the dequantised weight (computed from the layer's input and output gradient, as the
packed weight cannot hold a float gradient), and the base becomes quantise(dequantise(W) - s B0 A0) in the same
quant type, block size and storage (peft's merge route). That is NOT exact: the output changes at step 0 by the
requantisation error, which :func:`apply_lora_ga` measures (``report``) and the recipe logs.

DeepSpeed ZeRO-3-partitioned bases (a model loaded under a ZeRO-3 launch, where transformers builds it inside
``deepspeed.zero.Init``): the forward and backward passes of the estimate run with DeepSpeed's own parameter
fetching hooks (``DeepSpeedZeRoOffload``, nothing persistent, removed afterwards), so only the layers being
computed are gathered; each adapted layer's full gradient is formed from its input and output gradient. Then,
one layer at a time, the base weight and its adapter are gathered (``deepspeed.zero.GatheredParameters`` with
``modifier_rank=0``), A0, B0 and W - s B0 A0 are written, and every shard is updated on leaving the block.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type
from torch import nn
from transformers.pytorch_utils import Conv1D

Direction = Literal["ArB2r", "ArBr", "A2rBr"]
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SUPPORTED = (nn.Linear, Conv1D, *_CONV)
#: Exact SVD up to this smaller dimension (milliseconds there); above it the randomized SVD of the authors' code
#: and peft (``torch.svd_lowrank``, q = 4r, 4 power iterations, seeded): on SmolLM2's 210 matrices (576 x 576 ..
#: 576 x 1536) exact SVDs took 10 s of a 29 s init on one thread, randomized ones ~1 s, with the same first step
#: (docs/experiments/lora_llm.md); tests/test_lora_models.py bounds the difference on a gradient-like matrix.
EXACT_SVD_MAX_DIM = 256


#: Rows (tokens) of the first example each linear layer's probe keeps for :func:`output_change`: 210 SmolLM2
#: layers kept 57 MB with whole examples, for a check any row shows.
PROBE_ROWS = 8
#: Base dtypes on which W - s B0 A0 is stored unrounded: the per-layer probes vouch for the whole model there.
EXACT_DTYPES = ("torch.float32", "torch.float64")


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


def bnb_kind(base: nn.Module) -> Literal["4bit", "8bit"] | None:
    """'4bit' / '8bit' for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` base layer, else None."""
    kind = get_bnb_param_type(getattr(base, "weight", None))
    return kind if kind and isinstance(base, nn.Linear) else None


def is_partitioned(weight: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter: this process holds a shard, the full tensor only inside a gather."""
    return getattr(weight, "ds_shape", None) is not None


def weight_shape(base: nn.Module) -> torch.Size:
    """The full (unquantised, unpartitioned) shape of the base layer's weight."""
    if bnb_kind(base) is not None:
        return torch.Size((base.out_features, base.in_features))
    weight = base.weight
    return torch.Size(weight.ds_shape) if is_partitioned(weight) else weight.shape


def matrix_shape(base: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of the matrix the layer's LoRA factorises (see :func:`weight_matrix`)."""
    shape = weight_shape(base)
    if isinstance(base, Conv1D):
        return shape[1], shape[0]
    return shape[0], math.prod(shape[1:])


def _needs_activation_gradients(layers: dict[str, LoraLayer]) -> bool:
    """Quantized or ZeRO-3-partitioned bases: their weight cannot hold the full float gradient."""
    return any(
        bnb_kind(m.get_base_layer()) is not None or is_partitioned(m.get_base_layer().weight)
        for m in layers.values()
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
        if _is_quantized(base) and bnb_kind(base) is None:
            raise LoraGAError(
                f"LoRA-GA supports bitsandbytes' 4-bit (nf4/fp4) and 8-bit Linear among quantized layers; "
                f"{name!r} is {type(base).__name__} with a {type(base.weight).__name__} weight: load the base "
                "with bitsandbytes or in bf16/fp32, or use method lora / lora_plus"
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
        if is_partitioned(base.weight) and isinstance(base, _CONV) and not isinstance(base.padding, tuple):
            raise LoraGAError(
                f"LoRA-GA on a ZeRO-3-partitioned convolution needs numeric padding; {name!r} has "
                f"padding={base.padding!r}"
            )
        if isinstance(base, _CONV) and base.padding_mode != "zeros" and is_partitioned(base.weight):
            raise LoraGAError(
                f"LoRA-GA on a ZeRO-3-partitioned convolution needs padding_mode='zeros'; {name!r} has "
                f"{base.padding_mode!r}"
            )
        rank = module.r[adapter_name]
        rows, cols = matrix_shape(base)
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
    from_activations: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Mean over ``batches`` of d loss / d W for the base weight of every layer (fp32, shaped like the full
    weight, on this process only).

    ``batch_weight`` (e.g. the batch's number of samples) weights each batch's gradient, so batch means of
    unequal batches average to the mean over samples; None weighs every batch 1. ``probes``, if given, is filled
    with each layer's first input and (base) output on the first example, on CPU, for
    :func:`output_change`. Adapters are disabled while this runs; every gradient leaves the device (to CPU with
    ``offload_to_cpu``) as soon as it is complete. All flags are restored after.

    ``from_activations`` (None: when a base is quantized or ZeRO-3-partitioned): no weight requires a gradient;
    each layer's gradient is computed from its input x and output gradient dy (``dy^T x`` for a Linear,
    ``torch.nn.grad.conv*_weight`` for a convolution), which for a quantized layer is the gradient with respect
    to its dequantised weight. Otherwise the base weights require gradients and a post-accumulate hook takes
    each ``.grad``.
    """
    if from_activations is None:
        from_activations = _needs_activation_gradients(layers)
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def add(name: str, grad: torch.Tensor) -> None:
        grad = grad.detach().to(torch.float32)
        grad = grad.cpu() if offload_to_cpu else grad.clone()
        if name in sums:
            sums[name].add_(grad)
        else:
            sums[name] = grad

    def accumulate(name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            add(name, param.grad)
            param.grad = None

        return hook

    count, total_weight = 0, 0.0
    try:
        for layer in layers.values():
            layer.enable_adapters(False)
        for p in flags:
            p.requires_grad_(False)
        for name, layer in layers.items():
            base = layer.get_base_layer()
            if from_activations:
                hooks.extend(_activation_hooks(name, base, add))
            else:
                base.weight.requires_grad_(True)
                hooks.append(base.weight.register_post_accumulate_grad_hook(accumulate(name)))
            if probes is not None:
                hooks.append(layer.register_forward_hook(_probe(name, probes)))
        model.train()
        with torch.enable_grad():
            for batch in batches:
                weight = 1.0 if batch_weight is None else float(batch_weight(batch))
                if weight <= 0:
                    raise LoraGAError(f"LoRA-GA batch weight must be > 0, got {weight}")
                loss = loss_fn(batch) * weight
                if loss.requires_grad:  # else no target layer is on the loss's path: reported below
                    loss.backward()
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


def _activation_hooks(
    name: str, base: nn.Module, add: Callable[[str, torch.Tensor], None]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks on ``base`` that add d loss / d W (from its input and its output's gradient) under ``name``. The
    input is made a leaf that requires a gradient when it does not, so the output's gradient is computed even
    when nothing before the layer is trained."""

    def before(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and not x.requires_grad:
            return (x.detach().requires_grad_(True), *args[1:])
        return None

    def after(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            x = args[0].detach()
            output.register_hook(lambda dy: add(name, _weight_gradient(module, x, dy)))

    return [base.register_forward_pre_hook(before), base.register_forward_hook(after)]


def _weight_gradient(base: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """d loss / d W of ``base`` (shaped like its full weight) from its input ``x`` and output gradient ``dy``."""
    if isinstance(base, _CONV):
        dims = base.weight.dim() - 2
        weight_grad = getattr(torch.nn.grad, f"conv{dims}d_weight")
        return weight_grad(
            x.float(), weight_shape(base), dy.float(), base.stride, base.padding, base.dilation, base.groups
        )
    rows, cols = matrix_shape(base)
    grad = dy.reshape(-1, rows).float().t() @ x.reshape(-1, cols).float()
    return grad.t() if isinstance(base, Conv1D) else grad


def _probe(
    name: str, probes: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if name not in probes and args and isinstance(args[0], torch.Tensor):
            # copies: a slice (and .cpu() of a CPU tensor) would keep the whole batch's activations alive
            x, y = args[0][:1], output[:1]
            if not isinstance(module.get_base_layer(), _CONV):  # a Linear / Conv1D: a few of its rows suffice
                x, y = x.reshape(-1, x.shape[-1])[:PROBE_ROWS], y.reshape(-1, y.shape[-1])[:PROBE_ROWS]
            probes[name] = (x.detach().to("cpu", copy=True), y.detach().to("cpu", copy=True))

    return hook


@torch.no_grad()
def _recorded_precision(x: torch.Tensor, weight: torch.Tensor) -> contextlib.AbstractContextManager:
    """The autocast a probe's input was recorded under (bf16/fp16 inputs to a layer with other float weights):
    replaying it without would mix dtypes ("Input type BFloat16 and bias type float"), and replaying it in fp32
    would count autocast's own rounding as LoRA-GA's change."""
    low = (torch.bfloat16, torch.float16)
    if x.dtype in low and weight.is_floating_point() and weight.dtype != x.dtype:
        return torch.autocast(x.device.type, dtype=x.dtype)
    return contextlib.nullcontext()


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
            with gathered(list(layer.parameters())):
                weight = layer.get_base_layer().weight
                x = x.to(weight.device)
                with _recorded_precision(x, weight):
                    after = layer(x).float().cpu()
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


def gathered(
    params: list[torch.Tensor], modifier_rank: int | None = None
) -> contextlib.AbstractContextManager:
    """``deepspeed.zero.GatheredParameters`` over the ZeRO-3-partitioned ones among ``params`` (a collective:
    every process enters it); a no-op when none is partitioned. With ``modifier_rank`` the values that process
    writes inside the block are what every shard holds after it."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


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
    report: dict[str, Any] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Average the gradients over processes, set A0, B0 and W <- W - s B0 A0 in every layer.

    ``share`` is this process's weight in the average (its samples / all processes' samples, so the result is
    the mean over every sample whatever the split; the shares must sum to 1); None: 1 / world size. Layer i's
    gradient is reduced to process ``i % world_size``, which computes the SVD and broadcasts the
    factors, so the processes share the work and end with identical weights. Returns ``{layer name: (A0, B0)}``
    as stored in the adapter (CPU, adapter dtype and shape), needed to convert the trained adapter for the
    original base (:func:`finetune.export.lora_ga_to_lora`). ``report``: see :func:`set_lora_ga_weights`.
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
        rows, cols = matrix_shape(base)
        owner = i % world
        grad = grads[name].to(weight.device, torch.float32)
        if world > 1 or share != 1.0:  # a copy: reduce() below works in place (one process: no copy)
            grad = grad * share
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
        initial[name] = set_lora_ga_weights(layer, a, b, adapter_name, report)
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
    layer: LoraLayer,
    a: torch.Tensor,
    b: torch.Tensor,
    adapter_name: str = "default",
    report: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write A0, B0 into the adapter and subtract s B0 A0 from the base weight (in fp32, then cast; a
    bitsandbytes base is dequantised, offset and requantised in its own format). ZeRO-3-partitioned weights are
    gathered for the write, so every shard is updated (a collective). ``report``, if given, keeps in
    ``requantisation_error`` the largest ``max|deq(requantised) - (deq(W) - s B0 A0)| / max|deq(W)|`` so far."""
    base = layer.get_base_layer()
    lora_a = layer.lora_A[adapter_name].weight
    lora_b = layer.lora_B[adapter_name].weight
    with gathered([base.weight, lora_a, lora_b], modifier_rank=0):
        lora_a.copy_(a.reshape(lora_a.shape).to(lora_a.device, lora_a.dtype))
        lora_b.copy_(b.reshape(lora_b.shape).to(lora_b.device, lora_b.dtype))
        # the offset uses the adapter's stored (possibly low-precision) values, as the forward pass will
        product = lora_b.reshape(lora_b.shape[0], -1).float() @ lora_a.reshape(lora_a.shape[0], -1).float()
        offset = layer.scaling[adapter_name] * product
        if bnb_kind(base) is not None:
            error = _offset_quantized(base, offset)
            if report is not None:
                report["requantisation_error"] = max(report.get("requantisation_error", 0.0), error)
        else:
            new = weight_matrix(base, base.weight.float()) - offset.to(base.weight.device)
            base.weight.copy_(_matrix_to_weight(base, new).to(base.weight.dtype))
        return lora_a.detach().cpu().clone(), lora_b.detach().cpu().clone()


def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The fp32 ``d_out x d_in`` weight a bitsandbytes 4/8-bit Linear computes with (peft's dequantisation;
    a 4-bit weight that bitsandbytes repacked for its CPU kernel is unpacked first)."""
    weight = base.weight
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state
        )
    state = getattr(base, "state", None)
    if state is not None and getattr(state, "SCB", None) is None:
        state.SCB = getattr(weight, "SCB", None)
    return dequantize_bnb_weight(weight, state=state if bnb_kind(base) == "8bit" else None).float()


def _offset_quantized(base: nn.Module, offset: torch.Tensor) -> float:
    """base.weight <- quantise(dequantise(W) - offset) in W's own format (as peft merges into a bitsandbytes
    layer); returns the requantisation error relative to the largest dequantised weight."""
    import bitsandbytes as bnb

    weight = base.weight
    original = dequantized_weight(base)
    target = original - offset.to(original.device)
    if bnb_kind(base) == "4bit":
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(bnb_quantized=False, requires_grad=False)
        base.weight = bnb.nn.Params4bit(target.to("cpu"), **kwargs).to(weight.device)
    else:
        base.weight = bnb.nn.Int8Params(
            target.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights
        ).to(weight.device)
        base.state.reset_grads()
        base.state.SCB = base.weight.SCB
    error = (dequantized_weight(base) - target).abs().max()
    return float(error / original.abs().max().clamp_min(torch.finfo(torch.float32).tiny))


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
    :func:`initialize_lora_ga`. Returns the initial factors for :func:`finetune.export.lora_ga_to_lora`.

    ``report``, if given, receives: ``output_change`` (:func:`output_change`, per layer, on this process's
    first example); ``model_output_change`` / ``model_output_change_rel`` (the whole model's output on this
    process's first batch, in eval mode, after the initialisation vs before it: max |dy| and max |dy| / max |y|;
    only when some adapted base is not float32/float64, i.e. where the start can be inexact: on an exact base the
    two extra forwards were 9% of SmolLM2's init and the per-layer change already shows float rounding);
    ``base_dtypes`` (the adapted base weights' dtypes, ``int8``/``4bit`` for bitsandbytes: a bf16/fp16 base
    stores W - s B0 A0 rounded, a quantized one requantised, so the start is not exact there) and, for
    quantized bases, ``requantisation_error`` (:func:`set_lora_ga_weights`)."""
    options = options or LoraGAOptions()
    layers = lora_ga_layers(model, adapter_name)
    probes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if report is not None else None
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise LoraGAError("LoRA-GA gradient estimation got no batches")
    # the whole model's output before and after (two eval forwards of the first batch) only where rounding or
    # requantising the base can move it; on fp32 bases the per-layer change (~1e-7) is the evidence
    whole_model = report is not None and not all(
        _storage(m.get_base_layer()) in EXACT_DTYPES for m in layers.values()
    )
    with _zero3_fetching(model, layers) as release:
        before = _model_output(model, loss_fn, first) if whole_model else None
        grads = estimate_gradients(
            model,
            layers,
            itertools.chain([first], batches),
            loss_fn,
            options.offload_to_cpu,
            batch_weight,
            probes,
        )
        release()  # the writes below gather one layer at a time; nothing may stay gathered from the passes
        initial = initialize_lora_ga(layers, grads, options, adapter_name, share, report)
        after = _model_output(model, loss_fn, first) if whole_model else None
    if report is not None:
        report["output_change"] = output_change(layers, probes or {})
        if whole_model:
            change = (
                (after - before).abs().max() if before is not None and after is not None else torch.zeros(())
            )
            scale = (
                before.abs().max().clamp_min(torch.finfo(torch.float32).tiny) if before is not None else 1.0
            )
            report["model_output_change"] = float(change)
            report["model_output_change_rel"] = float(change / scale)
        report["base_dtypes"] = sorted({_storage(m.get_base_layer()) for m in layers.values()})
    return initial


def _storage(base: nn.Module) -> str:
    kind = bnb_kind(base)
    if kind == "4bit":
        return f"4-bit {base.weight.quant_type}"
    return "int8" if kind == "8bit" else str(base.weight.dtype)


@torch.no_grad()
def _model_output(
    model: nn.Module, loss_fn: Callable[[Any], torch.Tensor], batch: Any
) -> torch.Tensor | None:
    """The model's main output tensor (``logits``, ``sample`` or the first tensor) when ``loss_fn(batch)`` runs
    it in eval mode, fp32 on CPU; None when it returns none."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not seen:
            tensor = _main_tensor(output)
            if tensor is not None:
                seen.append(tensor.detach().float().cpu())

    was_training = model.training
    handle = model.register_forward_hook(hook)
    # bitsandbytes repacks a 4-bit weight for its CPU kernel on an eval no-grad forward (AVX512-BF16 CPUs), and
    # a repacked weight no longer passes gradients to its input: keep the training layout
    packing = {
        m: m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")
    }
    model.eval()
    try:
        for m in packing:
            m.support_avx512bf16_for_cpu = False
        loss_fn(batch)
    finally:
        handle.remove()
        model.train(was_training)
        for m, flag in packing.items():
            m.support_avx512bf16_for_cpu = flag
    return seen[0] if seen else None


def _main_tensor(output: Any) -> torch.Tensor | None:
    for key in ("logits", "sample"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


@contextlib.contextmanager
def _zero3_fetching(model: nn.Module, layers: dict[str, LoraLayer]) -> Iterator[Callable[[], None]]:
    """While LoRA-GA runs on a ZeRO-3-partitioned model (not yet prepared by DeepSpeed), DeepSpeed's own
    fetch/release hooks gather each module's parameters for its forward and backward and release them after
    (``DeepSpeedZeRoOffload`` as ``deepspeed.initialize`` builds it for a model without optimizer, with no
    persistent parameters); the hooks are removed and every parameter released on leaving. Yields the call that
    releases every parameter (a no-op without ZeRO-3)."""
    if not any(is_partitioned(m.get_base_layer().weight) for m in layers.values()):
        yield lambda: None
        return
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.utils.timer import NoopTimer

    fetcher = DeepSpeedZeRoOffload(
        model,
        timers=NoopTimer(),
        ds_config=None,
        param_persistence_threshold=0,
        model_persistence_threshold=0,
    )
    try:
        yield fetcher.partition_all_parameters
    finally:
        fetcher.partition_all_parameters()
        fetcher.destroy()
