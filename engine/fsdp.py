"""FSDP run by the engine itself: torch's FSDP2 (``fully_shard``) on each network, over NCCL or gloo.

Why not accelerate's FSDP: accelerate 1.15 enables FSDP only for GPU-like distributed types (on CPU processes it
silently runs DDP) and its ``prepare`` shards the models it is handed as one job. SiD trains two networks whose
backward passes run through each other and through a frozen teacher; with FSDP2 each network is its own set of
sharded parameter groups (``fully_shard`` per block, then the root), so the generator's loss can run through a
sharded fake score and a sharded teacher, and the same code runs on GPUs (NCCL) and on CPU processes (gloo),
where CI tests it.

What the engine does under an FSDP launch (``accelerate launch --config_file accelerate_configs/fsdp.yaml``):
the Accelerator is built without FSDP (plain multi-process data parallel: gloo on CPU, NCCL on GPUs), then
:func:`shard_module` shards every trained network that owns its parameters, and every frozen network that shares
none with a trained one; :func:`rebind_optimizer` points the optimisers at the sharded parameters. Checkpoints hold
full (unsharded) model and optimiser states gathered with ``torch.distributed.checkpoint.state_dict``, written as
safetensors (:func:`save_sharded_state`), so a checkpoint is readable without torch.distributed and never
unpickled; resume loads them on every process and re-shards (:func:`load_sharded_state`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

#: the variable ``accelerate launch`` exports from an FSDP config; the engine consumes it (and turns it off for
#: accelerate, which would otherwise build its own FSDP plugin)
USE_FSDP_ENV = "ACCELERATE_USE_FSDP"
_TRUE = ("true", "1", "yes")
_STRATEGIES = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "1": True, "2": False}


@dataclass(frozen=True)
class FSDPSettings:
    """What an FSDP launch asked for, as FSDP2 terms.

    ``reshard_after_forward``: True frees the gathered parameters after each forward (FULL_SHARD, ZeRO-3-like);
    False keeps them until the backward (SHARD_GRAD_OP, ZeRO-2-like: more memory, fewer all-gathers).
    ``min_num_params``: blocks (elements of the network's ``nn.ModuleList``s) with at least this many parameters
    get their own all-gather group; the rest belongs to the network's root group.
    """

    reshard_after_forward: bool = True
    min_num_params: int = 0
    offload_params: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> FSDPSettings:
        environ = os.environ if environ is None else environ
        strategy = (environ.get("FSDP_SHARDING_STRATEGY") or "FULL_SHARD").strip().upper()
        reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD")
        if reshard is not None and reshard.strip():
            value = reshard.strip().upper()
            if value in _STRATEGIES:  # accelerate writes the strategy name here for FSDP1 configs
                reshard_after_forward = _STRATEGIES[value]
            else:
                reshard_after_forward = value.lower() in _TRUE
        elif strategy in _STRATEGIES:
            reshard_after_forward = _STRATEGIES[strategy]
        else:
            raise ValueError(
                f"FSDP_SHARDING_STRATEGY={strategy!r}: the engine's FSDP2 runs FULL_SHARD or SHARD_GRAD_OP "
                "(fsdp_sharding_strategy or fsdp_reshard_after_forward in the accelerate config)"
            )
        try:
            min_num_params = int(environ.get("FSDP_MIN_NUM_PARAMS") or 0)
        except ValueError as e:
            raise ValueError(
                f"FSDP_MIN_NUM_PARAMS={environ.get('FSDP_MIN_NUM_PARAMS')!r}: expected an integer"
            ) from e
        offload = (environ.get("FSDP_OFFLOAD_PARAMS") or "false").strip().lower() in _TRUE
        return cls(reshard_after_forward, max(min_num_params, 0), offload)

    def describe(self) -> dict[str, Any]:
        return {"fsdp_version": 2, "implementation": "engine (torch fully_shard)", **asdict(self)}


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _blocks(module: nn.Module, min_num_params: int) -> list[nn.Module]:
    """The outermost elements of ``module``'s ModuleLists with at least ``min_num_params`` parameters (the
    down/up/transformer blocks of a diffusers model), each an all-gather group of its own."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                for block in child:
                    if sum(p.numel() for p in block.parameters()) >= max(min_num_params, 1):
                        found.append(block)
                    else:
                        visit(block)
            else:
                visit(child)

    visit(module)
    return found


def shard_module(
    module: nn.Module,
    settings: FSDPSettings,
    device: torch.device,
    param_dtype: torch.dtype | None = None,
) -> int:
    """``fully_shard`` the blocks of ``module`` and then ``module`` itself, over all processes; returns the number
    of groups. ``param_dtype``: the dtype parameters are gathered in for compute (bf16 mixed precision);
    gradients are reduced in the parameters' own dtype (fp32 master weights stay exact)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    dtypes = {p.dtype for p in module.parameters()}
    reduce_dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload = CPUOffloadPolicy() if settings.offload_params and device.type != "cpu" else OffloadPolicy()
    kwargs = {"mesh": mesh, "mp_policy": policy, "offload_policy": offload}
    blocks = _blocks(module, settings.min_num_params)
    for block in blocks:
        fully_shard(block, reshard_after_forward=settings.reshard_after_forward, **kwargs)
    fully_shard(module, reshard_after_forward=settings.reshard_after_forward, **kwargs)
    _initialise_now(module)
    return len(blocks) + 1


def _initialise_now(module: nn.Module) -> None:
    """Run FSDP2's one-time lazy initialisation now rather than at the first forward.

    FSDP2 fixes each group's gradient dtype from the parameters that require grad at its first forward; the
    engine turns ``requires_grad`` off for networks outside their own phase, so SiD's generator first runs with
    none and FSDP2 would then reduce its gradients in bf16 into fp32 parameters (an error). Initialising right
    after sharding, while the trained parameters require grad, fixes the dtypes as they will be. torch 2.13 has
    no public call for this (``FSDPModule.unshard`` initialises the groups but not the root state).
    """
    state = module._get_fsdp_state()
    init = getattr(state, "_lazy_init", None)
    if init is None:
        raise RuntimeError(
            "engine/fsdp.py: this torch's FSDP2 state has no _lazy_init; update _initialise_now"
        )
    init()


def rebind_optimizer(
    optimizer: torch.optim.Optimizer, before: Mapping[str, nn.Parameter], module: nn.Module
) -> None:
    """Point ``optimizer``'s parameter groups at ``module``'s sharded parameters (``fully_shard`` replaces each
    parameter by a new DTensor one; ``before``: the names and parameters it had). Call before any step."""
    if optimizer.state:
        raise RuntimeError("rebind_optimizer: the optimiser already holds state; shard before the first step")
    after = dict(module.named_parameters())
    by_id = {id(p): after[name] for name, p in before.items() if name in after}
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in by_id]
        if missing:
            raise ValueError(
                f"rebind_optimizer: {len(missing)} optimised parameters are not in the sharded module"
            )
        group["params"] = [by_id[id(p)] for p in group["params"]]


def reshard(module: nn.Module) -> None:
    """Free every gathered parameter group of ``module`` (a no-op for groups already sharded).

    With ``reshard_after_forward=False`` a forward without a backward (SiD's generator under ``no_grad`` in the
    fake-score phase) leaves the gathered parameters registered on the module, with the ``requires_grad`` they had
    then; the engine reshards before each phase so the next forward gathers them again with the current flag."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) parameter or gradient; a collective for DTensors."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def sharding_facts(module: nn.Module) -> dict[str, int]:
    """Groups, sharded parameters and this process's share of the elements: what run_info.json records, so a
    test (or a user) sees that the network really is sharded."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    sharded = [p for p in params if isinstance(p, DTensor)]
    return {
        "groups": sum(isinstance(m, FSDPModule) for m in module.modules()),
        "parameters": len(params),
        "sharded_parameters": len(sharded),
        "numel": sum(p.numel() for p in params),
        "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
    }


# ------------------------------------------------------------------------------------------------ checkpoints
def _state_options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimiser state dicts on the main process (empty elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(module, optimizer, options=_state_options(cpu_offload=True))


def save_sharded_state(folder: Path, name: str, model_state: dict, optimizer_state: dict) -> None:
    """Write what :func:`gather_state` returned as ``fsdp_<name>_model.safetensors`` and
    ``fsdp_<name>_optimizer.safetensors`` (+ its parameter groups and non-tensor state as JSON)."""
    save_file(
        {k: v.contiguous() for k, v in model_state.items()}, str(folder / f"fsdp_{name}_model.safetensors")
    )
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, entries in optimizer_state.get("state", {}).items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}/{key}"] = value.contiguous()
            else:
                scalars.setdefault(fqn, {})[key] = value
    save_file(tensors, str(folder / f"fsdp_{name}_optimizer.safetensors"))
    groups = json.dumps(
        {"param_groups": optimizer_state.get("param_groups", []), "scalars": scalars}, indent=1
    )
    (folder / f"fsdp_{name}_optimizer.json").write_text(groups)


def load_sharded_state(folder: Path, name: str, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load :func:`save_sharded_state`'s files into the sharded ``module`` and ``optimizer`` (every process reads
    the full state and keeps its own shards)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_state = load_file(str(folder / f"fsdp_{name}_model.safetensors"))
    meta = json.loads((folder / f"fsdp_{name}_optimizer.json").read_text())
    state: dict[str, dict[str, Any]] = {}
    for key, value in load_file(str(folder / f"fsdp_{name}_optimizer.safetensors")).items():
        fqn, _, entry = key.rpartition("/")
        state.setdefault(fqn, {})[entry] = value
    for fqn, entries in meta["scalars"].items():
        state.setdefault(fqn, {}).update(entries)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    set_state_dict(
        module,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict={"state": state, "param_groups": groups},
        options=_state_options(),
    )
