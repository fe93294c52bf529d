"""The optimiser classes a recipe's ``--optimizer`` names, bitsandbytes' 8-bit ones included.

One place for every recipe (SiD, reflow, LoRA), so the names, the 8-bit classes and the message when
bitsandbytes is missing are the same everywhere. bitsandbytes is imported only when an 8-bit optimiser is asked
for (it is an optional extra), and its absence is reported when the class is resolved, i.e. before a recipe loads
any weights.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

#: torch's optimisers by setting name
TORCH_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
#: bitsandbytes' 8-bit optimisers by setting name -> class name in ``bitsandbytes.optim``. They keep both Adam
#: moments in 8 bits (block-wise quantised) for tensors of >= 4096 values and in 32 bits for smaller ones
#: (bitsandbytes' default ``min_8bit_size``).
BNB_OPTIMIZERS: dict[str, str] = {"adam8bit": "Adam8bit", "adamw8bit": "AdamW8bit"}


def optimizer_class(
    name: str, allowed: Collection[str] | None = None, setting: str = "optimizer"
) -> type[torch.optim.Optimizer]:
    """The class of ``--optimizer name``: a torch optimiser, or a bitsandbytes 8-bit one.

    ``allowed`` restricts the names a recipe accepts (default: all known); ``setting`` is the config key named in
    errors. Raises ValueError for an unknown or disallowed name and ImportError, saying how to install it, when an
    8-bit optimiser is asked for without bitsandbytes.
    """
    known = [*TORCH_OPTIMIZERS, *BNB_OPTIMIZERS]
    choices = [n for n in known if allowed is None or n in allowed]
    if name not in choices:
        raise ValueError(f"{setting}={name!r}; expected one of {choices}")
    if name in TORCH_OPTIMIZERS:
        return TORCH_OPTIMIZERS[name]
    try:
        import bitsandbytes
    except ImportError as e:
        fallback = name.removesuffix("8bit")
        hint = f"; or use {setting}={fallback}" if fallback in choices else ""
        raise ImportError(
            f"{setting}={name} needs bitsandbytes: pip install bitsandbytes (or this toolkit's 'bitsandbytes' "
            f"extra: pip install -e '.[bitsandbytes]'){hint}"
        ) from e
    return getattr(bitsandbytes.optim, BNB_OPTIMIZERS[name])
