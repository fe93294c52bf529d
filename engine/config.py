"""Typed run configuration: dataclasses as the schema, a YAML file for a run, command-line overrides on top.

Parsing is done by transformers' ``HfArgumentParser`` (as trl does); this module only turns a YAML file into
the same ``--key value`` form so that YAML values and command-line values go through one type conversion, and
refuses unknown keys with a message that names them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from transformers import HfArgumentParser

C = TypeVar("C")


@dataclass
class TrainConfig:
    """Fields every recipe shares. Recipes subclass this and add their own fields."""

    output_dir: str = field(
        default="outputs/run", metadata={"help": "Run folder: checkpoints, logs, samples."}
    )
    project_name: str = field(default="onestep", metadata={"help": "Tracker project name."})
    seed: int = field(default=0, metadata={"help": "Base seed; process i uses seed + i for its noise."})
    max_steps: int = field(
        default=1000, metadata={"help": "Optimisation steps (each runs every phase once)."}
    )
    max_minutes: float = field(
        default=0.0, metadata={"help": "Stop (with a checkpoint) after this much wall time; 0 = no limit."}
    )
    batch_size: int = field(default=32, metadata={"help": "Micro-batch size per process."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimiser step."}
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "Autocast precision."}
    )
    fp16_initial_scale: float = field(
        default=65536.0, metadata={"help": "Initial loss scale of the fp16 GradScaler (dynamic afterwards)."}
    )
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Clip gradient norm to this; 0 = no clipping."}
    )
    nonfinite_grads: Literal["zero", "skip", "error"] = field(
        default="zero",
        metadata={"help": "Non-finite gradient entries: zero them (SiD), skip the step, or raise."},
    )
    lr_warmup_steps: int = field(
        default=0,
        metadata={"help": "Linear lr warm-up over the first N steps of every trained model; 0 = none."},
    )
    lr_decay_start: float = field(
        default=1.0,
        metadata={
            "help": "Share of the run (steps or max_minutes, whichever ends it) after which every trained "
            "model's lr decays linearly to lr_decay_final x lr at the end; 1.0 = constant lr."
        },
    )
    lr_decay_final: float = field(default=0.1, metadata={"help": "lr at the run's end, as a share of lr."})
    checkpoint_every: int = field(
        default=0, metadata={"help": "Checkpoint every N steps; 0 = only at the end."}
    )
    checkpoints_total_limit: int = field(default=3, metadata={"help": "Keep the last K checkpoints."})
    resume_from: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint folder to resume from."}
    )
    log_every: int = field(default=10, metadata={"help": "Log scalars every N steps."})
    log_with: str = field(
        default="tensorboard", metadata={"help": "Accelerate tracker name(s), comma-separated, or 'none'."}
    )
    eval_every: int = field(
        default=0, metadata={"help": "Call the recipe's evaluation every N steps; 0 = end."}
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    deterministic: bool = field(default=False, metadata={"help": "Use torch deterministic algorithms."})
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even when an accelerator is present."})
    progress_bar: bool = field(default=True, metadata={"help": "Show a tqdm bar on the main process."})

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name}={getattr(self, name)!r} must be >= 1")
        for name in (
            "checkpoint_every",
            "eval_every",
            "num_workers",
            "max_grad_norm",
            "max_minutes",
            "lr_warmup_steps",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"config field {name}={getattr(self, name)!r} must be >= 0")
        for name in ("lr_decay_start", "lr_decay_final"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"config field {name}={getattr(self, name)!r} must be in [0, 1]")
        if self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit={self.checkpoints_total_limit} must be >= 1")


def check_adam_betas(config: Any, names: Sequence[str]) -> None:
    """Raise for any named Adam beta field outside [0, 1) (None allowed: "use the other field").

    torch.optim.Adam checks its betas only when the optimiser is built, after the models are loaded; recipes
    call this in ``__post_init__`` so a bad value fails at parse time with the config key in the message.
    """
    for name in names:
        value = getattr(config, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"config field {name}={value!r} must be in [0, 1)")


def _field_names(config_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


def _unknown_key_error(key: str, known: list[str], source: str) -> ValueError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ValueError(f"Unknown config key '{key}' in {source}.{hint} Known keys: {', '.join(sorted(known))}")


def yaml_to_args(values: dict[str, Any], config_cls: type, source: str) -> list[str]:
    """Turn a YAML mapping into ``--key value`` strings, refusing keys the schema does not have."""
    known = _field_names(config_cls)
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    args: list[str] = []
    for key, value in values.items():
        if key not in known:
            raise _unknown_key_error(key, known, source)
        if value is None:
            if defaults[key] is not None:
                args += [f"--{key}", "None"]
        elif isinstance(value, (list, tuple)):
            args += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            args += [f"--{key}", json.dumps(value)]
        else:
            args += [f"--{key}", str(value)]
    return args


def _check_cli_keys(argv: Sequence[str], config_cls: type) -> None:
    known = _field_names(config_cls)
    for token in argv:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0].replace("-", "_")
            if key not in known and key != "config":
                raise _unknown_key_error(key, known, "the command line")


def parse_config(config_cls: type[C], argv: Sequence[str] | None = None) -> C:
    """Build ``config_cls`` from ``--config FILE`` (YAML) plus ``--field value`` overrides (the CLI wins)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    file_args: list[str] = []
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        if "--config" in argv:
            i = argv.index("--config")
            if i + 1 >= len(argv):
                raise ValueError("--config needs a YAML file path")
            path = Path(argv[i + 1])
            del argv[i : i + 2]
        else:
            i = next(j for j, a in enumerate(argv) if a.startswith("--config="))
            path = Path(argv[i].split("=", 1)[1])
            del argv[i]
        if not path.is_file():
            raise FileNotFoundError(
                f"Config file not found: {path} (expected a YAML file of {config_cls.__name__})"
            )
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(
                f"Config file {path} must hold a mapping of field: value, got {type(loaded).__name__}"
            )
        file_args = yaml_to_args(loaded, config_cls, str(path))
    _check_cli_keys(argv, config_cls)
    parser = HfArgumentParser(config_cls)
    (config,) = parser.parse_args_into_dataclasses(args=file_args + argv)
    _restore_none(config)
    return config


def _restore_none(config: Any) -> None:
    """HfArgumentParser keeps the string 'None' for optional strings; map it back to None."""
    for f in dataclasses.fields(config):
        if getattr(config, f.name) == "None":
            setattr(config, f.name, None)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, loadable again with ``--config``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
