"""Text fine-tuning data: the offline ``stdlib_docs`` task and loading a user's dataset from any source.

* :func:`stdlib_docstrings`: a real-text classification task -- the first paragraph of every docstring in
  eight pure-Python standard-library packages, labelled by the package (``asyncio`` ... ``importlib``). Each
  text goes to ``train`` or ``validation`` by a hash of the text, so the split never depends on import order.
  The texts (about 1,600; about 1,300 train) change a little between Python versions, so compare runs on one
  version.
* :func:`wordnet_definitions`: an instruction-style causal-LM task -- "Define the word X." -> the WordNet 3.0
  gloss of the word's most frequent sense, from Debian's ``wordnet-base`` package (offline); ``prompt`` /
  ``completion`` columns (trained on the completion only, see :class:`finetune.tasks.TextTask`), split by a hash
  of the word, so a held-out word never occurs in ``train``.
* :func:`load_text_splits`: ``stdlib_docs``, ``wordnet``, a single local data file (``.txt``/``.json``/``.jsonl``/``.csv``/
  ``.parquet``, read with the matching ``datasets`` builder), a folder (``save_to_disk`` output or data files),
  or a hub id; a local path that does not exist is a ``FileNotFoundError``, never a hub lookup.
* :func:`train_and_eval_splits`: the rule for which rows evaluate a run (see its docstring).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import pkgutil
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
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
    """``train`` / ``validation`` splits with columns ``text`` and ``label`` (a ClassLabel named by package).

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
    splits = {"train": [], "validation": []}
    for text, label in rows:
        splits["validation" if _in_eval(text, eval_fraction) else "train"].append((text, label))
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"text": [t for t, _ in items], "label": [y for _, y in items]}, features=features
            )
            for name, items in splits.items()
        }
    )


#: Where Debian's ``wordnet-base`` puts the WordNet 3.0 database (``index.<pos>``, ``data.<pos>``).
WORDNET_DIR = "/usr/share/wordnet"
#: Parts of speech in the order a word's sense is taken from (a word listed as noun and verb gets the noun's).
WORDNET_POS = ("noun", "verb", "adj", "adv")
#: Words kept: lower-case letters, joined by single '_' (a space in the phrase) or '-'.
_WORDNET_WORD = re.compile(r"[a-z]+(?:[_-][a-z]+)*")
WORDNET_PROMPT = "Define the word {word}."


def _wordnet_glosses(path: Path) -> dict[str, tuple[str, set[str]]]:
    """``{synset offset: (definition, the synset's words as written)}`` of one ``data.<pos>`` file; the
    definition is the gloss before its quoted examples."""
    glosses = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("  "):  # the licence header
                continue
            head, sep, gloss = line.partition(" | ")
            definition = gloss.strip().split('; "')[0].strip().rstrip(";").strip()
            if not sep or not definition:
                continue
            fields = head.split()
            count = int(fields[3], 16)  # offset lex_filenum ss_type w_cnt (hex) word lex_id word lex_id ...
            words = {w.split("(")[0] for w in fields[4 : 4 + 2 * count : 2]}  # adjectives may carry "(a)"
            glosses[fields[0]] = (definition, words)
    return glosses


@functools.lru_cache(maxsize=4)
def wordnet_definitions(root: str = WORDNET_DIR, eval_fraction: float = 0.1) -> datasets.DatasetDict:
    """``train`` / ``validation`` splits with columns ``prompt`` ("Define the word X."), ``completion`` (the
    gloss of X's first-listed, i.e. most frequent, sense), ``word`` and ``pos``; one row per lower-case word
    (proper nouns left out), rows sorted by
    word, the split by a hash of the word (so no held-out word is trained on). Cached per process.

    Raises ``FileNotFoundError`` naming the Debian package when the WordNet files are missing."""
    folder = Path(root)
    missing = [
        f"{kind}.{pos}"
        for pos in WORDNET_POS
        for kind in ("index", "data")
        if not (folder / f"{kind}.{pos}").is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"dataset 'wordnet' needs the WordNet 3.0 database in {folder} (missing {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}): it comes from Debian's wordnet-base package, "
            "apt-get install -y wordnet-base (as root; scripts/bootstrap.sh does it when it can)"
        )
    rows: dict[str, tuple[str, str]] = {}
    for pos in WORDNET_POS:
        glosses = _wordnet_glosses(folder / f"data.{pos}")
        with (folder / f"index.{pos}").open(encoding="utf-8") as lines:
            for line in lines:
                if line.startswith("  "):
                    continue
                fields = line.split()
                lemma, synsets = fields[0], int(fields[2])
                if lemma in rows or not _WORDNET_WORD.fullmatch(lemma) or synsets < 1:
                    continue
                first = fields[-synsets]  # index lines end with the synset offsets, most frequent sense first
                definition, written = glosses.get(first, ("", set()))
                if lemma in written:  # not a proper noun (those are written capitalised, indexed lower-case)
                    rows[lemma] = (pos, definition)
    splits: dict[str, dict[str, list[str]]] = {
        name: {"prompt": [], "completion": [], "word": [], "pos": []} for name in ("train", "validation")
    }
    for lemma in sorted(rows):
        pos, gloss = rows[lemma]
        word = lemma.replace("_", " ")
        split = splits["validation" if _in_eval(word, eval_fraction) else "train"]
        split["prompt"].append(WORDNET_PROMPT.format(word=word))
        split["completion"].append(gloss)
        split["word"].append(word)
        split["pos"].append(pos)
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(cols) for name, cols in splits.items()})


#: ``datasets`` builder for a single local data file, by suffix (``.json`` holds JSON lines or one JSON array).
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
#: Files ``Dataset(Dict).save_to_disk`` writes: a folder holding one is read with ``load_from_disk``.
SAVED_DATASET_FILES = ("dataset_dict.json", "dataset_info.json", "state.json")
#: Seed of the held-out share's shuffle: a constant (not the run's seed), so runs with different seeds are
#: scored on the same rows and their eval losses compare.
HOLDOUT_SEED = 0


def _is_local_path(spec: str) -> bool:
    """A path, not a hub id ("name" or "owner/name"): a data-file suffix, an absolute or ./ ../ ~ path, or more
    than one "/"."""
    return (
        Path(spec).suffix.lower() in FILE_BUILDERS or spec.startswith(("/", ".", "~")) or spec.count("/") > 1
    )


def load_text_splits(spec: str) -> datasets.DatasetDict:
    """Every split of the dataset ``spec`` (see the module docstring for what ``spec`` may be).

    A single file becomes one ``train`` split. Raises ``FileNotFoundError`` for a local path that does not exist
    (hub ids are only tried for strings that cannot be local paths).
    """
    if spec == "stdlib_docs":
        return stdlib_docstrings()
    if spec == "wordnet":
        return wordnet_definitions()
    path = Path(spec).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"dataset file {spec!r}: unknown suffix {path.suffix!r}; expected one of {sorted(FILE_BUILDERS)}"
            )
        return datasets.load_dataset(builder, data_files={"train": str(path)})
    if path.is_dir():
        if any((path / f).is_file() for f in SAVED_DATASET_FILES):
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        return datasets.load_dataset(str(path))  # a folder of data files: datasets picks the builder
    if _is_local_path(spec):
        raise FileNotFoundError(
            f"dataset {spec!r} is a local path that does not exist (expected a data file "
            f"{'/'.join(sorted(FILE_BUILDERS))} or a folder)"
        )
    return datasets.load_dataset(spec)


def train_and_eval_splits(
    splits: datasets.DatasetDict,
    train_split: str = "train",
    eval_split: str | None = None,
    eval_holdout: float = 0.1,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, eval) rows. The eval rows are, in this order:

    1. ``eval_split`` when given (a missing name is an error listing the splits);
    2. the dataset's ``validation`` split;
    3. ``eval_holdout`` of the train rows held out (shuffled with :data:`HOLDOUT_SEED`), or no evaluation
       (``None``) when ``eval_holdout`` is 0.

    A ``test`` split is never picked by default: it is for reporting a finished model, not for watching a run.
    """
    if train_split not in splits:
        raise ValueError(f"dataset has no split {train_split!r} (train_split); its splits: {list(splits)}")
    train = splits[train_split]
    if eval_split is not None:
        if eval_split not in splits:
            raise ValueError(f"dataset has no split {eval_split!r} (eval_split); its splits: {list(splits)}")
        return train, splits[eval_split]
    if "validation" in splits and train_split != "validation":
        return train, splits["validation"]
    if eval_holdout == 0:
        return train, None
    parts = train.train_test_split(test_size=eval_holdout, seed=HOLDOUT_SEED)
    return parts["train"], parts["test"]
