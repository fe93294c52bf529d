"""Typed run configuration: dataclasses as the schema, a YAML file for a run, command-line overrides on top.

Parsing is done by transformers' ``HfArgumentParser`` (as trl does); this module only turns a YAML file into
the same ``--key value`` form so that YAML values and command-line values go through one type conversion, and
refuses unknown keys with a message that names them (or the key's new name, for keys a recipe renamed).
``--help`` prints every setting with its type, default and meaning (``metadata={"help": ...}`` of the field).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shutil
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

import yaml
from transformers import HfArgumentParser

C = TypeVar("C")


@dataclass
class TrainConfig:
    """Fields every recipe shares. Recipes subclass this and add their own fields."""

    #: old config key -> new key; parse_config answers an old key (YAML or command line) with its new name
    renamed_keys: ClassVar[dict[str, str]] = {}

    output_dir: str = field(
        default="outputs/run", metadata={"help": "Run folder: checkpoints, logs, samples."}
    )
    project_name: str = field(default="onestep", metadata={"help": "Tracker project name."})
    seed: int = field(
        default=0,
        metadata={
            "help": "Base seed: recipe setup (new weights) uses it on every process, then process i uses seed + i for its noise."
        },
    )
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
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None,
        metadata={
            "help": "Autocast precision: no (fp32), fp16 (with a dynamic loss scale) or bf16. None (unset) = "
            "the launcher's (accelerate launch --mixed_precision or its config file), else no. A value set "
            "here (YAML or command line) wins over the launcher's, with a warning naming both when they differ."
        },
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
        default=None,
        metadata={
            "help": "'latest' (newest complete checkpoint in output_dir/checkpoints; a fresh run, with a "
            "warning, when there is none) or a checkpoint folder to resume from."
        },
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
    num_threads: int = field(
        default=0,
        metadata={
            "help": "torch CPU threads per process. 0 = automatic: your OMP_NUM_THREADS or "
            "--num_cpu_threads_per_process when set, else CPUs / processes on this machine (replacing "
            "accelerate launch's default of 1 thread). On a CPU busy with other jobs, 1 can be much faster."
        },
    )

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
            "num_threads",
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


def renamed_keys(config_cls: type) -> dict[str, str]:
    """``renamed_keys`` of the class, checked: an old name must not still be a field, a new one must be."""
    renames = dict(getattr(config_cls, "renamed_keys", {}) or {})
    known = set(_field_names(config_cls))
    for old, new in renames.items():
        if old in known or new not in known:
            raise TypeError(
                f"{config_cls.__name__}.renamed_keys maps {old!r} -> {new!r}: the old key must not be a field "
                "and the new key must be one"
            )
    return renames


def _unknown_key_error(key: str, config_cls: type, source: str) -> ValueError:
    renames = renamed_keys(config_cls)
    if key in renames:
        return ValueError(f"config key '{key}' in {source} was renamed to '{renames[key]}'")
    known = _field_names(config_cls)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ValueError(f"Unknown config key '{key}' in {source}.{hint} Known keys: {', '.join(sorted(known))}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def yaml_to_args(values: dict[str, Any], config_cls: type, source: str) -> list[str]:
    """Turn a YAML mapping into ``--key value`` strings, refusing keys the schema does not have."""
    known = _field_names(config_cls)
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    args: list[str] = []
    for key, value in values.items():
        if key not in known:
            raise _unknown_key_error(str(key), config_cls, source)
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
                raise _unknown_key_error(key, config_cls, "the command line")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one silently)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (lines {seen[key]} and {line})", key_node.start_mark
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml_config(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; syntax errors become a one-line ValueError naming the file, line and column."""
    try:
        loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        context = err.context
        if context and err.context_mark is not None and err.context_mark is not mark:
            context += f" started at line {err.context_mark.line + 1}, column {err.context_mark.column + 1}"
        what = "; ".join(str(m) for m in (context, err.problem) if m)
        raise ValueError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(
            f"Config file {path} must hold a mapping of field: value lines (e.g. 'max_steps: 100'), "
            f"got a {type(loaded).__name__} at the top level"
        )
    return loaded


# --------------------------------------------------------------------------------------------- --help
def field_help(config_cls: type, name: str) -> str:
    """The help text of field ``name``: the most derived class that gives one (a subclass that only changes a
    default keeps its parent's meaning)."""
    for klass in config_cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return str(f.metadata["help"])
    return ""


def _defining_class(config_cls: type, name: str) -> type:
    """The most basic dataclass in the MRO that declares ``name`` (where the setting was introduced)."""
    owner = config_cls
    for klass in config_cls.__mro__:
        if name in getattr(klass, "__dataclass_fields__", {}):
            owner = klass
    return owner


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " | ".join(_type_name(a) for a in inner) + (" | None" if len(inner) < len(args) else "")
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _format_default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def format_help(config_cls: type, prog: str | None = None) -> str:
    """Usage line, then every field as ``--name TYPE (default: X)`` and its help, the recipe's own fields first
    and the shared :class:`TrainConfig` fields last."""
    prog = prog or os.path.basename(sys.argv[0]) or "recipe.py"
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # an annotation that does not resolve: show it as written
        hints = {}
    groups: dict[type, list[dataclasses.Field]] = {}
    for f in dataclasses.fields(config_cls):
        groups.setdefault(_defining_class(config_cls, f.name), []).append(f)
    order = [
        k for k in config_cls.__mro__ if k in groups
    ]  # most derived first: the recipe's own, then shared
    width = min(110, shutil.get_terminal_size((110, 24)).columns)
    doc = (config_cls.__doc__ or "").strip().splitlines()
    lines = [
        f"usage: {prog} [--config FILE.yaml] [--KEY VALUE ...] [-h/--help]",
        "",
        *([doc[0], ""] if doc and not doc[0].startswith(config_cls.__name__ + "(") else []),
        "Each setting starts at its default below; a --config YAML file of 'key: value' lines overrides it, and",
        "--key value on the command line overrides both (lists: --key a b c; booleans: true/false).",
    ]
    for klass in order:
        title = (
            "shared training settings (TrainConfig, every recipe)"
            if klass is TrainConfig
            else f"{klass.__name__} settings"
        )
        lines += ["", f"{title}:"]
        for f in groups[klass]:
            type_name = _type_name(hints[f.name]) if f.name in hints else str(f.type)
            default = _format_default(_field_default(f))
            base = klass.__dataclass_fields__[f.name]
            if klass is not config_cls and _field_default(base) != _field_default(f):
                default += f"; {klass.__name__}'s: {_format_default(_field_default(base))}"
            lines.append(f"  --{f.name} {type_name} (default: {default})")
            text = field_help(config_cls, f.name) or "(no help text)"
            lines += textwrap.wrap(text, width=width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    renames = renamed_keys(config_cls)
    if renames:
        lines += ["", "renamed keys (old -> new): " + ", ".join(f"{o} -> {n}" for o, n in renames.items())]
    return "\n".join(lines)


def parse_config(config_cls: type[C], argv: Sequence[str] | None = None) -> C:
    """Build ``config_cls`` from ``--config FILE`` (YAML) plus ``--field value`` overrides (the CLI wins).

    ``-h``/``--help`` prints every field with its type, default and help, then exits with status 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    renamed_keys(config_cls)  # a broken rename table is the recipe's bug: say so on every run
    if "-h" in argv or "--help" in argv:
        if os.environ.get("RANK", "0") == "0":  # once per launch, not once per process
            print(format_help(config_cls), flush=True)
        raise SystemExit(0)
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
        file_args = yaml_to_args(load_yaml_config(path), config_cls, str(path))
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


def changed_settings_argv(config: Any) -> list[str]:
    """The fields of a config dataclass that differ from its class defaults, as ``--key value`` arguments (lists
    space-joined): the exact command a model card records."""
    default = type(config)()
    flags: list[str] = []
    for name, value in vars(config).items():
        if value != getattr(default, name):
            flags += [f"--{name}", " ".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags
