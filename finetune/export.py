"""Saving adapters so that they load on the ORIGINAL pretrained base with the libraries' plain loaders.

A LoRA-GA run trains on a modified base W' = W - s B0 A0. The trained adapter (A, B) is only correct on W';
on the untouched W the fine-tuned weight W' + s B A equals W + s (B A - B0 A0) = W + s [B, -B0] [A; A0], a
plain LoRA of rank 2r. :func:`lora_ga_to_lora` builds it (as peft's ``path_initial_model_for_weight_conversion``
does for Linear layers) with what peft's route lacks:

* no initial adapter folder and no second adapter loaded into the live (possibly DDP/ZeRO-wrapped) model:
  the initial factors are kept from the initialisation (``initial``, also saved beside the run for resume);
* convolutions (A is a full kernel, B a 1x1 kernel: concatenation along their rank dimension);
* DoRA: the magnitude vector is kept (peft's conversion drops it, so the loaded model renormalises wrongly);
* rsLoRA together with ``rank_pattern`` / ``alpha_pattern`` (peft refuses): every alpha is scaled by sqrt(2).

The folder holds peft's format (``adapter_config.json`` + ``adapter_model.safetensors``, for
``PeftModel.from_pretrained``) and, for diffusers models, diffusers' ``pytorch_lora_weights.safetensors`` with
its adapter metadata (for ``pipeline.load_lora_weights`` / ``unet.load_lora_adapter(folder, prefix="unet")``),
written by the teacher pipeline class's own ``save_lora_weights`` when it has a LoRA loader for that component
(:func:`lora_pipeline_class`: SD, SDXL, SD3, Flux, Sana), else in the same layout by hand.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

PEFT_PREFIX = "base_model.model."
INITIAL_FILE = "lora_ga_initial.safetensors"


def lora_ga_to_lora(
    state_dict: Mapping[str, torch.Tensor], initial: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """A peft adapter state dict (keys ``<layer>.lora_A.weight``) trained from ``initial`` -> the rank-2r
    adapter ``A' = [A; A0]``, ``B' = [B, -B0]`` for the original base. Other entries are kept as they are."""
    out = dict(state_dict)
    for name, (a0, b0) in initial.items():
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if key_a not in state_dict or key_b not in state_dict:
            raise KeyError(f"Adapter state dict has no {key_a!r}/{key_b!r} for the LoRA-GA layer {name!r}")
        a, b = state_dict[key_a], state_dict[key_b]
        out[key_a] = torch.cat([a, a0.to(a.device, a.dtype)], dim=0)
        out[key_b] = torch.cat([b, -b0.to(b.device, b.dtype)], dim=1)
    return out


def lora_ga_to_lora_config(config: LoraConfig) -> LoraConfig:
    """The config of :func:`lora_ga_to_lora`'s adapter: ranks doubled, alphas scaled to keep every layer's
    scaling (x2, or x sqrt(2) with rsLoRA), plain init so loading never re-runs an initialisation."""
    new = copy.deepcopy(config)
    factor = math.sqrt(2.0) if new.use_rslora else 2.0
    new.r = 2 * new.r
    new.lora_alpha = new.lora_alpha * factor
    new.rank_pattern = {k: 2 * v for k, v in (new.rank_pattern or {}).items()}
    new.alpha_pattern = {k: v * factor for k, v in (new.alpha_pattern or {}).items()}
    new.init_lora_weights = True
    if hasattr(new, "lora_ga_config"):
        new.lora_ga_config = None
    return new


def save_initial(initial: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path) -> Path:
    """Keep LoRA-GA's initial factors beside the run, so a resumed run can still convert its adapter."""
    tensors = {}
    for name, (a0, b0) in initial.items():
        tensors[f"{name}.lora_A.weight"] = a0.contiguous()
        tensors[f"{name}.lora_B.weight"] = b0.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def load_initial(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tensors = load_file(str(path))
    names = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    return {n: (tensors[f"{n}.lora_A.weight"], tensors[f"{n}.lora_B.weight"]) for n in sorted(names)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def adapter_state_and_config(
    peft_model: PeftModel,
    initial: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    full_state_dict: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The adapter's tensors (peft keys, CPU) and config, converted for the original base when ``initial``
    (LoRA-GA) is given. ``full_state_dict``: the model's gathered state dict under ZeRO-3/FSDP."""
    state = get_peft_model_state_dict(peft_model, state_dict=full_state_dict, adapter_name=adapter_name)
    state = {k: v.detach().cpu() for k, v in state.items()}
    config = peft_model.peft_config[adapter_name]
    if initial:
        state = lora_ga_to_lora(state, initial)
        config = lora_ga_to_lora_config(config)
    return state, config


def save_adapter(
    peft_model: PeftModel,
    folder: str | Path,
    initial: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    full_state_dict: Mapping[str, torch.Tensor] | None = None,
    diffusers_prefix: str | None = None,
    base_model_name_or_path: str | None = None,
    adapter_name: str = "default",
    pipeline_class: str | None = None,
) -> Path:
    """Write the adapter in peft's format (and diffusers' when ``diffusers_prefix``, e.g. "unet", is given),
    converted so it applies to the untouched pretrained base. ``pipeline_class``: the diffusers pipeline the
    adapter is for (e.g. "StableDiffusion3Pipeline"); its ``save_lora_weights`` writes the diffusers file when it
    can load LoRA into ``diffusers_prefix``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, config = adapter_state_and_config(peft_model, initial, full_state_dict, adapter_name)
    config = copy.deepcopy(config)
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = base_model_name_or_path
    config.inference_mode = True
    config.save_pretrained(str(folder))
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    if diffusers_prefix is not None:
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE

        pipeline = lora_pipeline_class(pipeline_class, diffusers_prefix)
        if pipeline is not None:
            own = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items() if ".lora_" in k}
            pipeline.save_lora_weights(
                str(folder),
                safe_serialization=True,
                **{
                    f"{diffusers_prefix}_lora_layers": own,
                    f"{diffusers_prefix}_lora_adapter_metadata": _jsonable(config.to_dict()),
                },
            )
            return folder
        layers = {
            f"{diffusers_prefix}.{k.removeprefix(PEFT_PREFIX)}": v
            for k, v in tensors.items()
            if ".lora_" in k
        }
        meta = {f"{diffusers_prefix}.{k}": v for k, v in _jsonable(config.to_dict()).items()}
        save_file(
            layers,
            str(folder / LORA_WEIGHT_NAME_SAFE),
            metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)},
        )
    return folder


def lora_pipeline_class(pipeline_class: str | None, component: str | None) -> Any:
    """The diffusers pipeline class named ``pipeline_class`` when it loads LoRA weights into ``component``
    (``load_lora_weights`` and ``component`` among its ``_lora_loadable_modules``), else ``None`` (e.g. PixArt,
    DiT, LDM and DDPM pipelines have no LoRA loader in diffusers 0.42)."""
    if not pipeline_class or not component:
        return None
    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    if cls is None or not hasattr(cls, "load_lora_weights") or not hasattr(cls, "save_lora_weights"):
        return None
    return cls if component in (getattr(cls, "_lora_loadable_modules", None) or ()) else None
