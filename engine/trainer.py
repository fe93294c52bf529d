"""The one training loop every recipe runs on.

Per step: draw ``gradient_accumulation_steps`` micro-batches, then for each phase the recipe names, run the
phase's loss on every micro-batch, syncing gradients of the phase's model only on the last micro-batch (DDP
``no_sync`` before it), handle non-finite gradients, clip, step that model's optimiser and update its EMA.
Models that are not being stepped are used unwrapped (DDP) with ``requires_grad`` off, so a backward pass that
runs through them (SiD's generator loss runs through the fake score) neither all-reduces nor stores their
gradients.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import importlib.metadata
import json
import math
import os
import platform
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from engine.checkpoint import checkpoint_root, load_trainer_state, resolve_resume, save_checkpoint
from engine.config import TrainConfig, config_to_dict, save_config
from engine.data import BatchStream
from engine.ema import EMA, ParameterEMA
from engine.fsdp import (
    USE_FSDP_ENV,
    FSDPSettings,
    full_tensor,
    gather_state,
    load_sharded_state,
    rebind_optimizer,
    reshard,
    save_sharded_state,
    shard_module,
    sharding_facts,
)
from engine.images import make_grid, save_grid
from engine.log import get_logger
from engine.recipe import Recipe, RecipeParts, TrainedModel
from engine.schedules import base_learning_rates, lr_factor, scale_learning_rates
from engine.seeding import seed_setup_then_processes, training_rng_kept
from engine.threads import configure_threads

_SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


#: the environment variable ``accelerate launch`` sets in every process it starts to its --mixed_precision
#: (flag, --config_file, or the default config; "no" when none of them names one): accelerate/utils/launch.py
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
PRECISIONS = ("no", "fp16", "bf16")
RUN_INFO_FILE = "run_info.json"
_VERSIONED = ("torch", "accelerate", "diffusers", "peft", "transformers")


@dataclass(frozen=True)
class PrecisionChoice:
    """The mixed precision a run uses and where it came from: "config", "launcher" or "default"."""

    value: str
    source: str
    warning: str | None = None


def resolve_mixed_precision(
    configured: str | None, environ: Mapping[str, str] | None = None
) -> PrecisionChoice:
    """The recipe config's explicit ``mixed_precision`` wins; unset (None), the launcher's; else "no".

    Passing the config's old default "no" to the Accelerator silently replaced a launch file's ``bf16`` with
    fp32, so the config default is None and only a value the user wrote overrides the launcher (with a
    warning naming both when they differ). ``accelerate launch`` exports "no" when nothing chose a precision,
    so a launcher's "no" under a config's bf16/fp16 is not warned about (it is the README's own command).
    """
    environ = os.environ if environ is None else environ
    launched = (environ.get(LAUNCHER_PRECISION_ENV) or "").strip().lower() or None
    if configured is not None:
        if configured not in PRECISIONS:
            raise ValueError(f"mixed_precision={configured!r}: expected one of {', '.join(PRECISIONS)}")
        warning = None
        if launched not in (None, "no") and launched != configured:
            warning = (
                f"mixed_precision: the recipe config's {configured!r} overrides the launcher's {launched!r} "
                f"({LAUNCHER_PRECISION_ENV}); remove mixed_precision from the recipe config to use the launcher's"
            )
        return PrecisionChoice(configured, "config", warning)
    if launched is None:
        return PrecisionChoice("no", "default")
    if launched not in PRECISIONS:
        raise ValueError(
            f"The launcher's mixed precision {LAUNCHER_PRECISION_ENV}={launched!r} is not one the engine runs; "
            f"launch with one of {', '.join(PRECISIONS)} or set mixed_precision in the recipe config"
        )
    return PrecisionChoice(launched, "launcher")


@dataclass(frozen=True)
class _Setup:
    precision: PrecisionChoice
    threads: str
    fsdp: FSDPSettings | None = None


#: what build_accelerator decided for each Accelerator it built (read by the run-info writer)
_SETUPS: weakref.WeakKeyDictionary[Accelerator, _Setup] = weakref.WeakKeyDictionary()


def launch_sharding(environ: Mapping[str, str] | None = None) -> str | None:
    """ "deepspeed" or "fsdp" when ``accelerate launch`` asked for one (the variables it exports from the config's
    ``distributed_type``), else None."""
    environ = os.environ if environ is None else environ
    for name, variable in (("deepspeed", "ACCELERATE_USE_DEEPSPEED"), ("fsdp", "ACCELERATE_USE_FSDP")):
        if (environ.get(variable) or "").strip().lower() in ("true", "1", "yes"):
            return name
    return None


def _has_accelerator_device() -> bool:
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def accelerator_device_kwargs(
    config: TrainConfig, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The ``cpu`` flag and process-group backend for this launch.

    Without a GPU the engine asks ``cpu=True`` so the processes ``accelerate launch``/torchrun start form one gloo
    group (else each reports DistributedType.NO). accelerate ignores DeepSpeed under ``cpu=True``, which
    turned a ZeRO launch into silent DDP; so a DeepSpeed launch gets no CPU flag, and on a machine without a GPU
    a gloo process group (DeepSpeed then picks its CPU accelerator). FSDP is the engine's own (engine/fsdp.py) on
    plain data-parallel processes: NCCL on GPUs, gloo on CPU (``cpu=True``), as for a DDP launch.
    """
    environ = os.environ if environ is None else environ
    sharding = launch_sharding(environ)
    use_cpu = (environ.get("ACCELERATE_USE_CPU") or "").strip().lower() in ("true", "1", "yes")
    if sharding == "fsdp":
        return {"cpu": config.cpu or use_cpu or not _has_accelerator_device(), "kwargs_handlers": []}
    if sharding is None:
        return {"cpu": config.cpu or not _has_accelerator_device(), "kwargs_handlers": []}
    if config.cpu or use_cpu:
        which = "--cpu true (recipe config)" if config.cpu else "use_cpu: true / --cpu (launch config)"
        raise ValueError(
            f"The launch asks for {sharding} and for {which}: accelerate ignores {sharding} on a CPU "
            "Accelerator and would silently run plain DDP. Drop the CPU flag: without a GPU the engine runs "
            "DeepSpeed on CPU processes over gloo"
        )
    if _has_accelerator_device():
        return {"cpu": False, "kwargs_handlers": []}  # NCCL, accelerate's default
    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def build_accelerator(config: TrainConfig) -> Accelerator:
    """One Accelerator from the config; distribution (DDP, DeepSpeed, FSDP) comes from ``accelerate launch``
    (:func:`accelerator_device_kwargs`), precision from the recipe config when it sets one, else from the
    launcher (:func:`resolve_mixed_precision`)."""
    precision = resolve_mixed_precision(config.mixed_precision)
    requested = launch_sharding()
    fsdp = None
    if requested == "fsdp":
        fsdp = FSDPSettings.from_environ()
        if precision.value == "fp16":
            raise ValueError(
                "mixed_precision='fp16' under FSDP: the engine's FSDP2 runs bf16 or fp32 (fp16 would need a "
                "sharded gradient scaler); launch with --mixed_precision bf16"
            )
    trackers = [t.strip() for t in config.log_with.split(",") if t.strip() and t.strip() != "none"]
    device = accelerator_device_kwargs(config)
    if fsdp is not None:
        os.environ[USE_FSDP_ENV] = (
            "false"  # the engine shards (engine/fsdp.py); accelerate runs data parallel
        )
    accelerator = Accelerator(
        mixed_precision=precision.value,
        cpu=device["cpu"],
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=config.output_dir + "/logs"
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        kwargs_handlers=[GradScalerKwargs(init_scale=config.fp16_initial_scale), *device["kwargs_handlers"]],
    )
    if requested == "deepspeed" and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise RuntimeError(
            f"accelerate launch asked for DeepSpeed but the Accelerator runs {accelerator.distributed_type.value}"
            " (an Accelerator or AcceleratorState built earlier in this process with other settings?)"
        )
    if precision.value == "fp16" and accelerator.device.type == "cpu" and accelerator.scaler is None:
        _enable_cpu_fp16(accelerator, config.fp16_initial_scale)
    threads = configure_threads(config.num_threads, on_cpu=accelerator.device.type == "cpu")
    _SETUPS[accelerator] = _Setup(precision, threads, fsdp)
    if accelerator.is_main_process:
        if precision.warning:
            get_logger().warning(precision.warning)
        get_logger().info(run_line(accelerator, threads, precision_source(accelerator)))
    return accelerator


_SOURCE_WORDS = {
    "config": "from the recipe config",
    "launcher": f"from the launcher ({LAUNCHER_PRECISION_ENV})",
    "default": "by default (set by neither the launcher nor the recipe config)",
    "accelerator": "from the Accelerator given to the Trainer",
}


def precision_source(accelerator: Accelerator) -> str:
    """Where ``accelerator``'s mixed precision came from: config, launcher, default, or "accelerator" (one
    not built by :func:`build_accelerator`, or whose DeepSpeed config chose another precision)."""
    setup = _SETUPS.get(accelerator)
    if setup is None or setup.precision.value != accelerator.mixed_precision:
        return "accelerator"
    return setup.precision.source


def run_line(accelerator: Accelerator, threads: str, source: str | None = None) -> str:
    """What runs: distribution, processes, device, precision (and its source) and threads (logged once)."""
    n = accelerator.num_processes
    sharding = sharding_info(accelerator)
    keys = ("zero_stage", "sharding_strategy", "fsdp_version", "reshard_after_forward")
    detail = "".join(f", {k}={v}" for k, v in sharding.items() if k in keys)
    line = (
        f"distributed_type={distributed_type(accelerator)}{detail}, {n} process{'es' if n > 1 else ''}, "
        f"device={accelerator.device.type}, mixed_precision={accelerator.mixed_precision}, {threads}"
    )
    return line + (f"; mixed_precision {_SOURCE_WORDS.get(source, source)}" if source else "")


def fsdp_settings(accelerator: Accelerator) -> FSDPSettings | None:
    """The engine's FSDP settings when ``accelerator`` was built for an FSDP launch (engine/fsdp.py), else None."""
    setup = _SETUPS.get(accelerator)
    return setup.fsdp if setup is not None else None


def distributed_type(accelerator: Accelerator) -> str:
    """accelerate's distributed type, or "FSDP" when the engine shards the networks itself."""
    return "FSDP" if fsdp_settings(accelerator) is not None else accelerator.distributed_type.value


def is_zero3(accelerator: Accelerator) -> bool:
    """DeepSpeed ZeRO stage 3: each process holds only a shard of every parameter of a prepared model."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    return getattr(accelerator.state.deepspeed_plugin, "zero_stage", None) == 3


def gathered_parameters(accelerator: Accelerator, module: nn.Module) -> contextlib.AbstractContextManager:
    """Full parameters of ``module`` for reading inside the block under ZeRO-3 (a collective: every process
    must enter it); a no-op otherwise. Writes inside the block are discarded (modifier_rank=None)."""
    if not is_zero3(accelerator):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def _plain(value: Any) -> Any:
    """A JSON-ready form of a plugin setting (enums by name, other objects as text)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    return str(value)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def sharding_info(accelerator: Accelerator) -> dict[str, Any]:
    """DeepSpeed's ZeRO stage, offload and precision settings, or FSDP's version and strategy; {} otherwise."""
    state = accelerator.state
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = state.deepspeed_plugin
        ds = getattr(plugin, "deepspeed_config", None) or {}
        zero = ds.get("zero_optimization", {})
        return {
            "zero_stage": _plain(getattr(plugin, "zero_stage", None)),
            "offload_optimizer_device": _plain(zero.get("offload_optimizer", {}).get("device", "none")),
            "offload_param_device": _plain(zero.get("offload_param", {}).get("device", "none")),
            "bf16": bool(ds.get("bf16", {}).get("enabled", False)),
            "fp16": bool(ds.get("fp16", {}).get("enabled", False)),
            "gradient_accumulation_steps": _plain(ds.get("gradient_accumulation_steps")),
            "gradient_clipping": _plain(ds.get("gradient_clipping")),
        }
    fsdp = fsdp_settings(accelerator)
    if fsdp is not None:
        return fsdp.describe()
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = state.fsdp_plugin
        return {
            name: _plain(getattr(plugin, name, None))
            for name in ("fsdp_version", "sharding_strategy", "reshard_after_forward")
        }
    return {}


def run_info(accelerator: Accelerator, sharded_models: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run ran on: distribution, world size, sharding, precision and its source, device, threads and
    library versions (the facts a result depends on that config.yaml does not hold). ``sharded_models``: what
    FSDP did to each network (:func:`engine.fsdp.sharding_facts`)."""
    setup = _SETUPS.get(accelerator)
    info: dict[str, Any] = {
        "distributed_type": distributed_type(accelerator),
        "num_processes": accelerator.num_processes,
        "device": accelerator.device.type,
        "mixed_precision": accelerator.mixed_precision,
        "mixed_precision_source": precision_source(accelerator),
        "torch_threads": torch.get_num_threads(),
        "torch_threads_reason": setup.threads if setup is not None else None,
    }
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        info["deepspeed"] = sharding_info(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP or fsdp_settings(accelerator) is not None:
        info["fsdp"] = sharding_info(accelerator)
        info["fsdp"]["process_group"] = accelerator.distributed_type.value
        if sharded_models:
            info["fsdp"]["sharded_models"] = sharded_models
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        info["backend"] = torch.distributed.get_backend()
    info["versions"] = {"python": platform.python_version(), **{p: _version(p) for p in _VERSIONED}}
    return info


def write_run_info(
    accelerator: Accelerator, output_dir: str | Path, sharded_models: dict[str, Any] | None = None
) -> Path:
    """Write :func:`run_info` to ``output_dir/run_info.json`` atomically (a temporary file renamed over it,
    so a reader never sees half a file); call on the main process."""
    path = Path(output_dir) / RUN_INFO_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RUN_INFO_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(run_info(accelerator, sharded_models), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _enable_cpu_fp16(accelerator: Accelerator, init_scale: float) -> None:
    """Accelerate silently ignores fp16 on CPU (no autocast, no loss scaling); turn both on instead.

    torch supports float16 autocast and a GradScaler on CPU, so the fp16 path (scaled losses, unscaling, skipped
    steps on overflow) runs and is tested on machines without a GPU.
    """
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)


class PhaseModels(Mapping[str, nn.Module]):
    """``models[name]`` as a loss should call it during the current phase."""

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer
        self.phase: str | None = None

    def __getitem__(self, name: str) -> nn.Module:
        t = self._trainer
        if name in t.frozen:
            return t.frozen[name]
        if name not in t.trained:
            raise KeyError(f"No model named {name!r}; known: {sorted([*t.trained, *t.frozen])}")
        tm = t.trained[name]
        if name == self.phase or tm.sync == "all_reduce" or t.accelerator.distributed_type in _SHARDED:
            return tm.module
        return t.accelerator.unwrap_model(t.trained[name].module)

    def ema(self, name: str) -> nn.Module:
        return self._trainer.emas[name].module

    def __iter__(self) -> Iterator[str]:
        return iter([*self._trainer.trained, *self._trainer.frozen])

    def __len__(self) -> int:
        return len(self._trainer.trained) + len(self._trainer.frozen)


class Trainer:
    """Runs a :class:`Recipe` under one Accelerator: prepare, resume, loop, log, evaluate, checkpoint."""

    def __init__(self, config: TrainConfig, recipe: Recipe, accelerator: Accelerator | None = None) -> None:
        self.config = config
        self.recipe = recipe
        self.accelerator = accelerator or build_accelerator(config)
        self.fsdp = fsdp_settings(self.accelerator)
        self.sharded: dict[str, dict[str, int]] = {}  # network -> sharding_facts, under FSDP
        self.output_dir = Path(config.output_dir)
        # a bad or damaged checkpoint fails here, before any work; all processes get the same folder
        resume_path = resolve_resume(config.resume_from, config.output_dir, self.accelerator)
        if config.resume_from == "latest" and resume_path is None and self.is_main:
            get_logger().warning(
                f"resume_from=latest: no checkpoint in {checkpoint_root(config.output_dir)}; starting a fresh run"
            )
        # setup draws the same numbers on every process (new heads, LoRA A), then each process its own noise
        parts = seed_setup_then_processes(
            config.seed, self.accelerator.process_index, lambda: recipe.setup(self), config.deterministic
        )
        self._check_parts(parts)
        self.trained: dict[str, TrainedModel] = parts.trained
        self.frozen: dict[str, nn.Module] = {}
        templates = self._ema_templates(parts)
        self._prepare(parts)
        self.models = PhaseModels(self)
        self.emas = self._build_emas(templates)
        self.step = 0
        self.images_seen = 0
        self._time_used = 0.0  # share of max_minutes used by this launch, agreed by all processes each step
        self.nonfinite_steps: dict[str, int] = dict.fromkeys(self.trained, 0)
        self.samples_per_step = config.batch_size * config.gradient_accumulation_steps * self.num_processes
        if resume_path is not None:
            self.load(resume_path)

    # ----------------------------------------------------------------------------------------- setup
    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def _check_parts(self, parts: RecipeParts) -> None:
        if not parts.trained:
            raise ValueError("Recipe.setup returned no trained models")
        overlap = set(parts.trained) & set(parts.frozen)
        if overlap:
            raise ValueError(f"Models {sorted(overlap)} are listed as both trained and frozen")
        frozen_params = {id(p) for m in parts.frozen.values() for p in m.parameters()}
        for name, tm in parts.trained.items():
            owned = {id(p) for p in tm.module.parameters()}
            for group in tm.optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in frozen_params:
                        raise ValueError(f"Optimiser of {name!r} holds a parameter of a frozen model")
                    if id(p) not in owned:
                        raise ValueError(f"Optimiser of {name!r} holds a parameter that is not in {name!r}")
        owners: dict[int, set[str]] = {}
        for name, tm in parts.trained.items():
            for p in tm.module.parameters():
                owners.setdefault(id(p), set()).add(name)
            if tm.parameters is not None:
                known = dict(tm.module.named_parameters())
                missing = [p for p in tm.parameters if p not in known]
                if missing:
                    raise ValueError(f"TrainedModel {name!r}: {missing[:3]} are not parameters of its module")
        for names in {frozenset(n) for n in owners.values() if len(n) > 1}:
            if any(
                parts.trained[n].parameters is None or parts.trained[n].sync != "all_reduce" for n in names
            ):
                raise ValueError(
                    f"Trained models {sorted(names)} share parameters: give each its `parameters` and "
                    "sync='all_reduce'"
                )
        decay, warmup = self.config.lr_decay_start, self.config.lr_warmup_steps
        for name, tm in parts.trained.items():
            if (decay < 1.0 or warmup > 0) and tm.lr_scheduler is not None:
                raise ValueError(
                    f"lr_decay_start={decay}, lr_warmup_steps={warmup} but the recipe gives {name!r} its own "
                    "lr_scheduler; use one or the other (lr_decay_start=1.0 and lr_warmup_steps=0 keep the "
                    "recipe's)"
                )
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED and len(parts.trained) > 1:
            raise ValueError(
                f"DeepSpeed trains one model per Accelerator, this recipe trains {sorted(parts.trained)}: "
                "launch it with accelerate_configs/fsdp.yaml (the engine's FSDP shards each network, ZeRO-3-like; "
                "fsdp_grad_op.yaml is ZeRO-2-like) or a DDP config (multi_gpu.yaml, cpu_2proc.yaml without a GPU)"
            )
        if self.fsdp is not None:
            if not self.recipe.supports_fsdp:
                raise ValueError(
                    f"{type(self.recipe).__name__} does not run under FSDP (its evaluation or export calls a "
                    "network on one process, which a sharded network cannot do): launch it with DeepSpeed "
                    "(accelerate_configs/deepspeed_zero2.yaml / deepspeed_zero3.yaml) or DDP"
                )
            with_scheduler = [n for n, tm in parts.trained.items() if tm.lr_scheduler is not None]
            if with_scheduler:
                raise ValueError(
                    f"Under FSDP the engine's lr schedule (lr_warmup_steps, lr_decay_start) is the only one; "
                    f"the recipe gives {with_scheduler} their own lr_scheduler"
                )
        self.recipe._trained_names = tuple(parts.trained)

    def _ema_templates(self, parts: RecipeParts) -> dict[str, nn.Module]:
        """Under DeepSpeed, copies of the unprepared models that get an EMA; the EMA is built from such a template
        loaded with the (gathered) prepared weights (:meth:`_build_emas`). A copy of the prepared module would
        hold DeepSpeed's bf16/fp16 cast of the weights and, under ZeRO-3, only this process's shards plus
        DeepSpeed's partitioning hooks; the template keeps the model's own dtype."""
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED and self.fsdp is None:
            return {}
        return {
            n: copy.deepcopy(tm.module)
            for n, tm in parts.trained.items()
            if tm.ema_halflife_images and tm.parameters is None
        }

    def _build_emas(self, templates: dict[str, nn.Module]) -> dict[str, EMA | ParameterEMA]:
        emas: dict[str, EMA | ParameterEMA] = {}
        for name, tm in self.trained.items():
            if not tm.ema_halflife_images:
                continue
            model = self.accelerator.unwrap_model(tm.module)
            if name in templates and self.fsdp is not None:
                model = templates[name].to(
                    self.device
                )  # the weights before sharding, which left them as they were
            with gathered_parameters(self.accelerator, model):
                if name in templates and self.fsdp is None:
                    template = templates[name]
                    template.load_state_dict(model.state_dict())
                    model = template.to(self.device)
                if tm.parameters is None:
                    emas[name] = EMA(model, tm.ema_halflife_images, tm.ema_rampup_ratio, tm.ema_device)
                else:
                    emas[name] = ParameterEMA(
                        model, tm.parameters, tm.ema_halflife_images, tm.ema_rampup_ratio, tm.ema_device
                    )
        return emas

    def progress(self) -> float:
        """Share of the run done: the larger of step / max_steps and (this launch's) time / max_minutes."""
        return max(self.step / self.config.max_steps, self._time_used)

    def _prepare(self, parts: RecipeParts) -> None:
        acc = self.accelerator
        names = list(parts.trained)
        wrapped = [n for n in names if parts.trained[n].sync == "wrap"]
        for n in names:
            if parts.trained[n].sync == "all_reduce":
                parts.trained[n].module.to(acc.device)
        if self.fsdp is not None:  # the engine shards these itself; accelerate prepares the rest
            self._shard_networks(parts, wrapped)
            wrapped = []
        modules = [parts.trained[n].module for n in wrapped]
        stepped = [n for n in names if n not in self.sharded]
        optimizers = [parts.trained[n].optimizer for n in stepped]
        schedulers = [
            parts.trained[n].lr_scheduler for n in names if parts.trained[n].lr_scheduler is not None
        ]
        extra = [parts.dataloader] if parts.dataloader is not None else []
        to_prepare = [*modules, *optimizers, *schedulers, *extra]
        prepared = acc.prepare(*to_prepare) if to_prepare else []
        prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
        prepared_iter = iter(prepared)
        for n in wrapped:
            parts.trained[n].module = next(prepared_iter)
        for n in stepped:
            parts.trained[n].optimizer = next(prepared_iter)
        for n in names:
            if parts.trained[n].lr_scheduler is not None:
                parts.trained[n].lr_scheduler = next(prepared_iter)
        self.stream = BatchStream(acc, next(prepared_iter), self.config.seed) if extra else None
        self._trainable = {}
        for n in names:
            tm, model = parts.trained[n], acc.unwrap_model(parts.trained[n].module)
            if tm.parameters is None:
                self._trainable[n] = [p for p in model.parameters() if p.requires_grad]
            else:
                named = dict(model.named_parameters())
                self._trainable[n] = [named[p] for p in tm.parameters]
        for n, module in parts.frozen.items():
            module.requires_grad_(False).eval()
            self.frozen[n] = module.to(acc.device)
            if self.fsdp is not None and n in self._shardable_frozen:
                shard_module(module, self.fsdp, acc.device, self._compute_dtype())
                self.sharded[n] = sharding_facts(module)

    def _compute_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16}.get(self.accelerator.mixed_precision)

    def _shard_networks(self, parts: RecipeParts, names: list[str]) -> None:
        """FSDP: shard each trained network that owns its parameters (and its optimiser with it), and note the
        frozen networks that share no parameter with a trained one (sharded once on the device)."""
        for n in names:
            tm = parts.trained[n]
            tm.module.to(self.device)
            before = dict(tm.module.named_parameters())
            shard_module(tm.module, self.fsdp, self.device, self._compute_dtype())
            rebind_optimizer(tm.optimizer, before, tm.module)
            self.sharded[n] = sharding_facts(tm.module)
        whole = [n for n in parts.trained if n not in names]
        if whole and self.is_main:
            get_logger().info(
                f"FSDP: {whole} share one module (adapters on a frozen base, sync='all_reduce'): it stays whole on "
                "every process and only their gradients are averaged"
            )
        trained_params = {id(p) for tm in parts.trained.values() for p in tm.module.parameters()}
        self._shardable_frozen = {
            n
            for n, m in parts.frozen.items()
            if not any(id(p) in trained_params for p in m.parameters()) and any(True for _ in m.parameters())
        }

    # ------------------------------------------------------------------------------------------ loop
    def fit(self, end_training: bool = True) -> dict[str, float]:
        """Train to ``max_steps`` (or ``max_minutes``), checkpointing and evaluating on the way.

        ``end_training=False`` closes only the trackers and keeps the process group, for launches that run
        several training stages one after another (reflow).
        """
        cfg, acc = self.config, self.accelerator
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
            write_run_info(acc, self.output_dir, self.sharded or None)
        if acc.log_with:
            acc.init_trackers(cfg.project_name, config=_flat_scalars(config_to_dict(cfg)))
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (self.is_main and cfg.progress_bar))
        sums: dict[str, torch.Tensor] = {}
        count, t_start, t_log = 0, time.perf_counter(), time.perf_counter()
        last_metrics: dict[str, float] = {}
        while self.step < cfg.max_steps:
            for key, value in self.train_step().items():
                sums[key] = sums.get(key, 0) + value
            count += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - t_log
                logs = {k: float(v) for k, v in self._reduce_mean(sums, count).items()}
                logs["samples_per_s"] = count * self.samples_per_step / max(elapsed, 1e-9)
                logs["images_seen"] = self.images_seen
                logs.update({f"{n}/nonfinite_steps": c for n, c in self.nonfinite_steps.items()})
                acc.log(logs, step=self.step)
                bar.set_postfix(
                    {k: f"{v:.4g}" for k, v in logs.items() if k.endswith("loss")}
                    | {"img/s": f"{logs['samples_per_s']:.0f}"}
                )
                sums, count, t_log = {}, 0, time.perf_counter()
            out_of_time = self._out_of_time(t_start)
            done = self.step == cfg.max_steps or out_of_time
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not done:
                last_metrics = self.evaluate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not done:
                self.save()
            if out_of_time:
                break
        bar.close()
        last_metrics = self.evaluate()
        with (
            training_rng_kept()
        ):  # an export draws (new models' initial weights): the checkpoint's RNG is training's
            self.recipe.on_train_end(self, last_metrics)
        self.save()
        if end_training:
            # every process reaches the teardown together: a peer still inside a collective (or its store) while
            # another destroys the group can abort the gloo/DeepSpeed teardown on CPU
            acc.wait_for_everyone()
            acc.end_training()
        else:
            for tracker in acc.trackers:
                tracker.finish()
        return last_metrics

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimisation step: every phase once, over ``gradient_accumulation_steps`` micro-batches."""
        accum = self.config.gradient_accumulation_steps
        micro_batches = [next(self.stream) if self.stream is not None else None for _ in range(accum)]
        cfg = self.config
        if cfg.lr_decay_start < 1.0 or cfg.lr_warmup_steps > 0:
            factor = lr_factor(
                self.step, self.progress(), cfg.lr_warmup_steps, cfg.lr_decay_start, cfg.lr_decay_final
            )
            for tm in self.trained.values():
                scale_learning_rates(tm.optimizer, factor)
        logs: dict[str, torch.Tensor] = {}
        for phase in self.recipe.phases(self.step):
            logs.update(self._run_phase(phase, micro_batches))
        self.step += 1
        self.images_seen += self.samples_per_step
        return logs

    def _run_phase(self, phase: str, micro_batches: list[Any]) -> dict[str, torch.Tensor]:
        acc, tm = self.accelerator, self.trained[phase]
        self.enter_phase(phase)
        n = len(micro_batches)
        logs: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            last = i == n - 1
            # accelerate reads this flag (DeepSpeed/FSDP accumulation, optimizer wrapper); DDP needs no_sync too
            acc.gradient_state._set_sync_gradients(last)
            sync = contextlib.nullcontext() if last or tm.sync == "all_reduce" else acc.no_sync(tm.module)
            if phase in self.sharded:  # FSDP2: reduce-scatter once, after the last micro-batch
                tm.module.set_requires_gradient_sync(last)
            with sync:
                with self.autocast():
                    out = self.recipe.loss(phase, batch, self.models)
                loss, extra = (out, {}) if isinstance(out, torch.Tensor) else out
                acc.backward(loss / n)
            for key, value in {"loss": loss, **extra}.items():
                v = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                logs[f"{phase}/{key}"] = logs.get(f"{phase}/{key}", 0) + v / n
        if tm.sync == "all_reduce":
            self._all_reduce_gradients(phase)
        if self._finish_gradients(phase):
            tm.optimizer.step()
            if tm.lr_scheduler is not None:
                tm.lr_scheduler.step()
        tm.optimizer.zero_grad(set_to_none=True)
        if phase in self.emas:
            seen_after = self.images_seen + self.samples_per_step
            model = acc.unwrap_model(tm.module)
            with gathered_parameters(acc, model):
                self.emas[phase].update(model, self.samples_per_step, seen_after)
        return logs

    def _all_reduce_gradients(self, phase: str) -> None:
        """Average the phase's gradients over processes in one flat all-reduce (modules not wrapped for DDP)."""
        if self.num_processes == 1:
            return
        params = self._trainable[phase]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in params])
        torch.distributed.all_reduce(flat)
        flat /= self.num_processes
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    @property
    def _sharded_trained(self) -> list[str]:
        return [n for n in self.trained if n in self.sharded]

    def trained_parameters(self, name: str) -> list[torch.nn.Parameter]:
        """The parameters trained model ``name``'s optimiser steps (for a LoRA view: its adapter's only)."""
        return list(self._trainable[name])

    def enter_phase(self, phase: str) -> None:
        """What the loop does before ``phase``'s loss: only that model's parameters require grad, it is in
        train mode, and ``trainer.models`` hands the phase's model out wrapped (others unwrapped).

        Public so a caller can compute a phase's loss and gradients by hand (tests, diagnostics).
        """
        self.models.phase = phase
        for name in self.sharded:
            reshard(self.trained[name].module if name in self.trained else self.frozen[name])
        for name, params in self._trainable.items():
            flag = name == phase
            for p in params:
                p.requires_grad_(flag)
        self.trained[phase].module.train()

    def _finish_gradients(self, phase: str) -> bool:
        """Unscale, handle non-finite gradients and clip; return whether the optimiser should step."""
        cfg, acc, tm = self.config, self.accelerator, self.trained[phase]
        params = self._trainable[phase]
        if acc.distributed_type in _SHARDED:
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(tm.module.parameters(), cfg.max_grad_norm)
            return True
        if acc.scaler is not None:
            acc.unscale_gradients(optimizer=tm.optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        norm = full_tensor(torch.nn.utils.get_total_norm(grads))  # FSDP: the norm over all shards
        if not torch.isfinite(norm):
            self.nonfinite_steps[phase] += 1
            if cfg.nonfinite_grads == "error":
                raise FloatingPointError(f"Non-finite gradient in phase {phase!r} at step {self.step}")
            if acc.scaler is not None:
                return True  # the fp16 scaler skips this step and lowers its scale; zeroing would hide that
            if cfg.nonfinite_grads == "skip":
                return False
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            norm = full_tensor(torch.nn.utils.get_total_norm(grads))
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.max_grad_norm, norm)
        return True

    def _out_of_time(self, t_start: float) -> bool:
        """Updates the time share used (the largest over processes, so all agree) and says if it reached 1."""
        if not self.config.max_minutes:
            return False
        used = torch.tensor(
            (time.perf_counter() - t_start) / (60 * self.config.max_minutes), device=self.device
        )
        self._time_used = float(self.accelerator.reduce(used, reduction="max").item())
        return self._time_used > 1.0

    def _reduce_mean(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
        if not sums:
            return {}
        keys = sorted(sums)
        stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in keys]).to(self.device)
        stacked = self.accelerator.reduce(stacked, reduction="mean") / count
        return dict(zip(keys, stacked.cpu()))

    # ---------------------------------------------------------------------------- eval and logging
    def autocast(self) -> contextlib.AbstractContextManager:
        """The accelerator's autocast, and under DeepSpeed with bf16/fp16 torch's: DeepSpeed casts the prepared
        model's weights to that dtype but not its inputs, and accelerate's autocast is a no-op under DeepSpeed,
        so fp32 inputs would meet bf16 weights ("mat1 and mat2 must have the same dtype")."""
        acc = self.accelerator
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
        if acc.distributed_type == DistributedType.DEEPSPEED and dtype is not None:
            return torch.autocast(acc.device.type, dtype=dtype)
        return acc.autocast()

    def evaluate(self) -> dict[str, float]:
        with training_rng_kept(), self.autocast():
            metrics = self.recipe.evaluate(self, self.step) or {}
        if metrics:
            self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.step)
            if self.is_main:
                pretty = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                tqdm.write(f"[step {self.step} | {self.images_seen} samples] {pretty}")
        return metrics

    def log_images(self, tag: str, images: torch.Tensor, upscale: int = 1) -> Path | None:
        """Save ``images`` ([N,C,H,W] in [-1,1]) as ``samples/<tag>_<step>.png`` and send them to trackers."""
        if not self.is_main:
            return None
        path = save_grid(images, self.output_dir / "samples" / f"{tag}_{self.step:07d}.png", upscale=upscale)
        grid = make_grid(images, upscale=upscale)[None]
        for tracker in self.accelerator.trackers:
            with contextlib.suppress(NotImplementedError, TypeError, AttributeError):
                tracker.log_images({tag: grid}, step=self.step, dataformats="NHWC")
        return path

    # ---------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "nonfinite_steps": self.nonfinite_steps,
            "data": self.stream.state_dict() if self.stream is not None else None,
            "num_processes": self.num_processes,
        }

    def save(self) -> Path:
        # FSDP: gathering the full states is a collective (every process), writing them is the main process's
        gathered = {
            n: gather_state(self.trained[n].module, self.trained[n].optimizer) for n in self._sharded_trained
        }
        writers = [
            (lambda folder, n=name, st=state: save_sharded_state(Path(folder), n, *st))
            for name, state in gathered.items()
        ]
        writers += [
            (lambda folder, n=name, e=ema: e.save(Path(folder) / f"ema_{n}.safetensors"))
            for name, ema in self.emas.items()
        ]
        # accelerate saves the modules it prepared; parameters of unwrapped (shared-module) models are ours to save
        writers += [
            (
                lambda folder, n=name: save_file(
                    self._unwrapped_state(n), str(Path(folder) / f"trained_{n}.safetensors")
                )
            )
            for name, tm in self.trained.items()
            if tm.sync == "all_reduce"
        ]
        return save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.step,
            self.state_dict(),
            extra_writers=writers,
            total_limit=self.config.checkpoints_total_limit,
        )

    def _unwrapped_state(self, name: str) -> dict[str, torch.Tensor]:
        tm = self.trained[name]
        named = dict(self.accelerator.unwrap_model(tm.module).named_parameters())
        return {key: named[key].detach().contiguous() for key in tm.parameters or named}

    def load(self, folder: str | Path) -> None:
        folder = Path(folder)
        state = load_trainer_state(folder)
        if state.get("num_processes", self.num_processes) != self.num_processes:
            raise ValueError(
                f"Checkpoint {folder} was written by {state['num_processes']} processes, this run has "
                f"{self.num_processes}: data position and per-process RNG states would not match"
            )
        configured = {name: base_learning_rates(tm.optimizer) for name, tm in self.trained.items()}
        self.accelerator.load_state(str(folder))
        for name, ema in self.emas.items():
            ema.load(folder / f"ema_{name}.safetensors")
        for name in self._sharded_trained:
            load_sharded_state(folder, name, self.trained[name].module, self.trained[name].optimizer)
        self._apply_configured_learning_rates(configured)
        for name, tm in self.trained.items():
            if tm.sync == "all_reduce":
                named = dict(self.accelerator.unwrap_model(tm.module).named_parameters())
                with torch.no_grad():
                    for key, value in load_file(str(folder / f"trained_{name}.safetensors")).items():
                        named[key].copy_(value)
        self.step = int(state["step"])
        self.images_seen = int(state["images_seen"])
        self.nonfinite_steps.update(state.get("nonfinite_steps", {}))
        if self.stream is not None and state.get("data") is not None:
            self.stream.load_state_dict(state["data"])
        if self.is_main:
            tqdm.write(f"Resumed from {folder} at step {self.step}")

    def _apply_configured_learning_rates(self, configured: dict[str, list[float]]) -> None:
        """A resumed optimiser's state carries the checkpoint's learning rates; a run resumed with other ones
        (a second stage at a lower lr) means them, so they replace the checkpoint's, with a line that says so.
        The same lr resumes bit for bit."""
        for name, lrs in configured.items():
            optimizer = self.trained[name].optimizer
            saved = base_learning_rates(optimizer)
            if saved == lrs:
                continue
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
                if "initial_lr" in group:
                    group["initial_lr"] = lr
            scheduler = self.trained[name].lr_scheduler
            if scheduler is not None and hasattr(scheduler, "base_lrs"):  # a recipe's own torch schedule
                scheduler.base_lrs = list(lrs)
            if self.is_main:
                tqdm.write(
                    f"[engine] {name}: learning rate {_rates(saved)} in the checkpoint, {_rates(lrs)} from "
                    "this run's configuration, which is used"
                )


def _rates(lrs: list[float]) -> str:
    return "/".join(f"{lr:g}" for lr in lrs)


def _flat_scalars(values: dict[str, Any]) -> dict[str, Any]:
    """Trackers (TensorBoard hparams) accept scalars and strings only."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, (int, float, str, bool)) and not (
            isinstance(value, float) and math.isnan(value)
        ):
            out[key] = value
        else:
            out[key] = str(value)
    return out
