"""``onestep`` console command: small toolkit commands, each implemented in the package that owns it.

Commands are named here as ``module:function`` strings and imported only when run, so the engine does not
import the distillation or fine-tuning packages.
"""

from __future__ import annotations

import importlib
import platform
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("engine.cli:print_env", "print library versions and the accelerate device setup"),
    "eval": (
        "distill.evaluate:main",
        "offline quality metrics (FD, precision/recall) of a teacher or generator",
    ),
    "sample": ("distill.evaluate:sample_main", "write a sample grid of a teacher or one-step generator"),
    "publish": ("distill.publish:main", "push an exported student folder to a hub repo"),
}


def print_env(argv: list[str] | None = None) -> int:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    print(f"python {platform.python_version()} on {platform.platform()}")
    for mod in (torch, accelerate, diffusers, peft, transformers):
        print(f"{mod.__name__} {mod.__version__}")
    print(f"cuda available: {torch.cuda.is_available()} ({torch.cuda.device_count()} devices)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: onestep COMMAND [ARGS]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<10} {help_text}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"onestep: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as err:
        print(f"onestep {name}: not available in this installation ({err})", file=sys.stderr)
        return 2
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
