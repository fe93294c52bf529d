"""Fine-tuning data that ships offline, built reproducibly from what is installed.

* :func:`stdlib_docstrings`: a real-text classification task -- the first paragraph of every docstring in
  eight pure-Python standard-library packages, labelled by the package (``asyncio`` ... ``importlib``). Each
  text goes to ``train`` or ``eval`` by a hash of the text, so the split never depends on import order. The
  texts (about 1,600; about 1,300 train) change a little between Python versions, so compare runs on one version.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import warnings
from collections.abc import Sequence
from types import ModuleType

import datasets

#: Packages whose docstrings make the classes of :func:`stdlib_docstrings` (all pure Python, always installed).
STDLIB_PACKAGES = (
    "asyncio",
    "email",
    "xml",
    "http",
    "unittest",
    "logging",
    "multiprocessing",
    "importlib",
)
MIN_CHARS = 20


def _package_modules(package: str) -> list[ModuleType]:
    """The package and its importable submodules (tests and ``__main__`` left out)."""
    root = importlib.import_module(package)
    modules = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), package + "."):
        if ".test" in info.name or info.name.endswith("__main__"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                modules.append(importlib.import_module(info.name))
        except Exception:  # platform-specific submodules (e.g. Windows-only) do not import everywhere
            continue
    return modules


def _first_paragraph(doc: str | None) -> str | None:
    if not doc:
        return None
    text = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    return text if len(text) >= MIN_CHARS else None


def _docstrings(module: ModuleType) -> set[str]:
    """Module, class, function and method docstrings defined in ``module`` (not imported into it)."""
    found = {_first_paragraph(module.__doc__)}
    for obj in list(vars(module).values()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            found.add(_first_paragraph(obj.__doc__))
        if inspect.isclass(obj):
            for member in vars(obj).values():
                if inspect.isfunction(member):
                    found.add(_first_paragraph(member.__doc__))
    found.discard(None)
    return found  # type: ignore[return-value]


def _in_eval(text: str, eval_fraction: float) -> bool:
    digest = int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")
    return digest / 2**64 < eval_fraction


def stdlib_docstrings(
    packages: Sequence[str] = STDLIB_PACKAGES, eval_fraction: float = 0.2
) -> datasets.DatasetDict:
    """``train`` / ``eval`` splits with columns ``text`` and ``label`` (a ClassLabel named by package).

    A text found in several packages is dropped (it would carry two labels); rows are sorted by text.
    """
    owners: dict[str, set[int]] = {}
    for label, package in enumerate(packages):
        for module in _package_modules(package):
            for text in _docstrings(module):
                owners.setdefault(text, set()).add(label)
    rows = sorted((text, labels.pop()) for text, labels in owners.items() if len(labels) == 1)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(packages))}
    )
    splits = {"train": [], "eval": []}
    for text, label in rows:
        splits["eval" if _in_eval(text, eval_fraction) else "train"].append((text, label))
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"text": [t for t, _ in items], "label": [y for _, y in items]}, features=features
            )
            for name, items in splits.items()
        }
    )
