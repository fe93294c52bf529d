"""``onestep`` console command: small toolkit commands over the engine, distillation and fine-tuning packages.

It lives in ``distill`` because it is the top of the import order (engine <- finetune <- distill): it may import
everything, and nothing imports it.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable


def print_env(argv: list[str] | None = None) -> int:
    """Print library versions and the accelerate device setup."""
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    print(f"python {platform.python_version()} on {platform.platform()}")
    for mod in (torch, accelerate, diffusers, peft, transformers):
        print(f"{mod.__name__} {mod.__version__}")
    print(f"cuda available: {torch.cuda.is_available()} ({torch.cuda.device_count()} devices)")
    print(f"torch threads: {torch.get_num_threads()}")
    return 0


def _eval(argv: list[str]) -> int:
    from distill.evaluation.commands import main

    return main(argv)


def _sample(argv: list[str]) -> int:
    from distill.evaluation.commands import sample_main

    return sample_main(argv)


def _publish(argv: list[str]) -> int:
    from distill.export.publish import main

    return main(argv)


# each command imports its module only when run, so `onestep --help` answers at once
COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "env": (print_env, "print library versions and the accelerate device setup"),
    "eval": (_eval, "offline quality metrics (FD, precision/recall) of a teacher or exported student"),
    "sample": (_sample, "write a sample grid of a teacher or exported student"),
    "publish": (_publish, "push an exported student or teacher folder to a hub repo"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: onestep COMMAND [ARGS]   (onestep COMMAND --help for its options)\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<10} {help_text}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"onestep: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return int(COMMANDS[name][0](rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
