"""Prompts for text-to-image teachers: read them from any source, encode them once, keep them on disk.

* :func:`load_prompts`: a list of prompt strings from ``"fashion-captions"`` (the shipped Fashion-MNIST
  teachers' training captions), a text file (one prompt a line, blank lines skipped), a
  ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file, a local ``datasets`` folder (``save_to_disk`` output, or
  a folder of data files / an imagefolder with captions) or a hub dataset id. Local-path detection is
  ``finetune.data.load_text_splits``'s: a local path that does not exist is a ``FileNotFoundError``, never a hub
  lookup.
* :func:`encode_prompts`: the prompts encoded by the teacher pipeline's own ``encode_prompt`` (so tokenization,
  truncation, CLIP skip, pooled outputs, attention masks and T5 lengths are exactly the pipeline's), with the
  text options the pipeline's ``__call__`` uses by default (PixArt's ``clean_caption``, Sana's
  ``complex_human_instruction``, ...). Only the text encoders and tokenizers are loaded, never the denoiser or
  the VAE, and they are freed after encoding. The result is a :class:`PromptEmbeddings` over an Arrow file
  (``datasets``, memory-mapped), cached under a key of everything the embeddings depend on, so a rerun, or
  every process but the first, reads the cache without loading a text encoder.

Tensors are named by the keyword the family's denoiser takes them as, so a recipe can pass them straight on:

======================  ==========================================================================
family (pipeline)       per-prompt tensors (:meth:`PromptEmbeddings.embeds`)
======================  ==========================================================================
sd                      ``encoder_hidden_states``
sdxl                    ``encoder_hidden_states``, ``text_embeds`` (in the UNet's ``added_cond_kwargs``,
                        with ``time_ids``, which depend on the image size, not the prompt)
sd3                     ``encoder_hidden_states``, ``pooled_projections``
pixart, sana            ``encoder_hidden_states``, ``encoder_attention_mask``
flux                    ``encoder_hidden_states``, ``pooled_projections``; ``txt_ids`` is one tensor for
                        every prompt (:attr:`PromptEmbeddings.shared`)
======================  ==========================================================================

The null embedding (:meth:`PromptEmbeddings.null`, for classifier-free guidance) is the pipeline's own
unconditional embedding for ``negative_prompt``: with the default ``""`` it is what the pipeline uses when
called without a negative prompt (the encoded empty prompt; zeros for SDXL folders with
``force_zeros_for_empty_prompt``, as ``StableDiffusionXLPipeline`` does). Flux has no negative branch in its
``encode_prompt`` (FLUX.1-dev is guidance-distilled); its null row is ``negative_prompt`` encoded as a prompt, as
FluxPipeline's ``true_cfg_scale`` does.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import Tensor

from distill.teachers.loading import resolve_teacher_path
from finetune.data import load_text_splits

__all__ = [
    "FASHION_CAPTIONS",
    "PROMPT_COLUMNS",
    "TEXT_PIPELINES",
    "PromptEmbeddings",
    "default_cache_dir",
    "encode_prompts",
    "load_prompts",
    "load_text_pipeline",
    "prompt_cache_key",
]

#: the named source of the Fashion-MNIST teachers' training captions (every template x class name, in class
#: order: ``distill.fashion_mnist.all_captions``), so their configs need no prompts file
FASHION_CAPTIONS = "fashion-captions"
#: columns tried, in order, when ``prompt_column`` is not given
PROMPT_COLUMNS = ("prompt", "text", "caption")
FORMAT = "onestep-prompt-embeddings/1"
ROWS_FILE, NULL_FILE, SHARED_FILE, META_FILE = "rows.arrow", "null.arrow", "shared.arrow", "meta.json"
#: files up to this size are hashed into the cache key; larger ones (weights) enter by size and mtime
HASH_LIMIT = 1 << 20
#: model_index.json components that turn text into embeddings (everything else is never loaded)
TEXT_COMPONENT_PREFIXES = ("text_encoder", "tokenizer")
#: torch dtypes Arrow stores as they are; others (bfloat16) are stored as float32 and cast back on reading
_ARROW_DTYPES = {
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int8: "int8",
    torch.bool: "bool",
}


# ------------------------------------------------------------------------------------------------- prompts
def load_prompts(
    source: str | os.PathLike[str], prompt_column: str | None = None, split: str = "train"
) -> list[str]:
    """The prompts of ``source`` (see the module docstring), in file order; ``"fashion-captions"``
    (:data:`FASHION_CAPTIONS`, unless a local path has that name) is the shipped Fashion-MNIST teachers' training
    captions.

    The column is ``prompt_column`` or the first of :data:`PROMPT_COLUMNS` present; a dataset with several
    splits is read from ``split`` (a dataset with a single split from that one). In a ``.txt`` file every
    non-blank line is one prompt, stripped; other sources keep their values as they are (an empty caption is a
    valid prompt there). Raises ``FileNotFoundError`` for a local path that does not exist and ``ValueError``
    naming the columns when no prompt column is found.
    """
    spec = str(source)
    if spec == FASHION_CAPTIONS and not Path(spec).exists():
        from distill.fashion_mnist import FASHION_CLASSES, all_captions

        return [c for label in range(len(FASHION_CLASSES)) for c in all_captions(label)]
    path = Path(spec).expanduser()
    splits = load_text_splits(spec)
    if split in splits:
        dataset = splits[split]
    elif len(splits) == 1:
        dataset = next(iter(splits.values()))
    else:
        raise ValueError(f"prompt source {spec!r} has no split {split!r}; its splits: {list(splits)}")
    columns = list(dataset.column_names)
    if prompt_column is not None:
        if prompt_column not in columns:
            raise ValueError(
                f"prompt source {spec!r} has no column {prompt_column!r}; its columns: {columns}"
            )
        column = prompt_column
    else:
        column = next((c for c in PROMPT_COLUMNS if c in columns), None)
        if column is None:
            raise ValueError(
                f"prompt source {spec!r} has none of the prompt columns {list(PROMPT_COLUMNS)}; its columns: "
                f"{columns}; name the column with prompt_column"
            )
    values = list(dataset.select_columns([column])[column])  # select first: an imagefolder decodes no image
    bad = next(((i, v) for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(
            f"prompt source {spec!r}: column {column!r} row {bad[0]} is {bad[1]!r}, not a string"
        )
    if path.is_file() and path.suffix.lower() == ".txt":
        values = [v.strip() for v in values if v.strip()]
    if not values:
        raise ValueError(f"prompt source {spec!r} holds no prompts (column {column!r})")
    return values


# ---------------------------------------------------------------------------------------- family table
@dataclass(frozen=True)
class _TextFamily:
    """How one pipeline family's ``encode_prompt`` is called and what its outputs feed the denoiser as."""

    family: str
    outputs: tuple[str, ...]  # encode_prompt's return values, in order
    keys: dict[str, str]  # encode_prompt output -> denoiser keyword (per-prompt rows)
    shared: dict[str, str]  # encode_prompt output -> denoiser keyword (one tensor for every prompt)
    cfg: bool  # encode_prompt takes do_classifier_free_guidance / negative_prompt
    extra_prompts: tuple[str, ...] = ()  # prompt_2, prompt_3: None means "the same prompt"
    #: text options of encode_prompt whose value is taken from the pipeline's __call__ defaults
    options: tuple[str, ...] = ()


_EMBEDS = {"prompt_embeds": "encoder_hidden_states"}
_POOLED = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
_MASKED = (
    "prompt_embeds",
    "prompt_attention_mask",
    "negative_prompt_embeds",
    "negative_prompt_attention_mask",
)
_MASK_KEYS = {**_EMBEDS, "prompt_attention_mask": "encoder_attention_mask"}
_SD = _TextFamily(
    "sd", ("prompt_embeds", "negative_prompt_embeds"), _EMBEDS, shared={}, cfg=True, options=("clip_skip",)
)
_SDXL = _TextFamily(
    "sdxl",
    _POOLED,
    {**_EMBEDS, "pooled_prompt_embeds": "text_embeds"},
    shared={},
    cfg=True,
    extra_prompts=("prompt_2",),
    options=("clip_skip",),
)
_SD3 = _TextFamily(
    "sd3",
    _POOLED,
    {**_EMBEDS, "pooled_prompt_embeds": "pooled_projections"},
    shared={},
    cfg=True,
    extra_prompts=("prompt_2", "prompt_3"),
    options=("clip_skip", "max_sequence_length"),
)
_PIXART = _TextFamily(
    "pixart", _MASKED, _MASK_KEYS, shared={}, cfg=True, options=("clean_caption", "max_sequence_length")
)
_SANA = _TextFamily(
    "sana",
    _MASKED,
    _MASK_KEYS,
    shared={},
    cfg=True,
    options=("clean_caption", "max_sequence_length", "complex_human_instruction"),
)
_FLUX = _TextFamily(
    "flux",
    ("prompt_embeds", "pooled_prompt_embeds", "text_ids"),
    {**_EMBEDS, "pooled_prompt_embeds": "pooled_projections"},
    shared={"text_ids": "txt_ids"},
    cfg=False,
    extra_prompts=("prompt_2",),
    options=("max_sequence_length",),
)
#: pipeline class (model_index.json ``_class_name``) -> how its prompts are encoded
TEXT_PIPELINES: dict[str, _TextFamily] = {
    "StableDiffusionPipeline": _SD,
    "StableDiffusionImg2ImgPipeline": _SD,
    "StableDiffusionXLPipeline": _SDXL,
    "StableDiffusionXLImg2ImgPipeline": _SDXL,
    "StableDiffusion3Pipeline": _SD3,
    "PixArtAlphaPipeline": _PIXART,
    "PixArtSigmaPipeline": _PIXART,
    "SanaPipeline": _SANA,
    "FluxPipeline": _FLUX,
}


def _model_index(folder: Path) -> dict[str, Any]:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(
            f"teacher {str(folder)!r} has no model_index.json: prompts need a text-to-image pipeline folder "
            f"({', '.join(sorted(TEXT_PIPELINES))})"
        )
    return json.loads(index_file.read_text())


def _text_family(folder: Path) -> tuple[str, _TextFamily]:
    pipeline_class = _model_index(folder).get("_class_name")
    if pipeline_class not in TEXT_PIPELINES:
        raise ValueError(
            f"teacher {str(folder)!r} is a {pipeline_class} folder; prompts can be encoded for "
            f"{', '.join(sorted(TEXT_PIPELINES))}"
        )
    return pipeline_class, TEXT_PIPELINES[pipeline_class]


def _text_components(index: dict[str, Any]) -> list[str]:
    return sorted(
        k
        for k, v in index.items()
        if k.startswith(TEXT_COMPONENT_PREFIXES) and isinstance(v, list) and len(v) == 2 and v[1] is not None
    )


def _local_teacher(teacher: str | os.PathLike[str]) -> Path:
    """The teacher's folder; a hub id is fetched (``model_index.json`` and the text parts only) into the HF cache."""
    spec = resolve_teacher_path(str(teacher))
    path = Path(spec)
    if path.is_dir():
        return path.resolve()
    import huggingface_hub

    patterns = ["model_index.json", *(f"{p}*/*" for p in TEXT_COMPONENT_PREFIXES)]
    return Path(huggingface_hub.snapshot_download(spec, allow_patterns=patterns))


def load_text_pipeline(
    folder: Path, dtype: torch.dtype, device: torch.device | str, variant: str | None = None
):
    """The teacher pipeline with only its text encoders and tokenizers loaded (every other component ``None``),
    on ``device`` in ``dtype``: enough for ``encode_prompt``, without the denoiser's or the VAE's weights."""
    from diffusers import DiffusionPipeline

    index = _model_index(folder)
    keep = set(_text_components(index))
    skipped = {
        k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and k not in keep
    }
    kwargs: dict[str, Any] = {"dtype": dtype}
    if variant is not None:
        kwargs["variant"] = variant
    pipe = DiffusionPipeline.from_pretrained(str(folder), **skipped, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _call_defaults(pipeline_class: str, names: Sequence[str]) -> dict[str, Any]:
    """The defaults of the pipeline ``__call__``'s arguments ``names`` (what a plain sampling call uses)."""
    import diffusers

    params = inspect.signature(getattr(diffusers, pipeline_class).__call__).parameters
    return {
        n: params[n].default
        for n in names
        if n in params and params[n].default is not inspect.Parameter.empty
    }


# ------------------------------------------------------------------------------------------- cache key
def _file_entries(folder: Path, components: Sequence[str]) -> list[list[Any]]:
    """(path, content sha256) for small files, (path, size, mtime_ns) for large ones, of the text components."""
    entries: list[list[Any]] = []
    for name in ["model_index.json", *components]:
        target = folder / name
        files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
        for f in files:
            stat = f.stat()
            rel = f.relative_to(folder).as_posix()
            if stat.st_size <= HASH_LIMIT:
                entries.append([rel, hashlib.sha256(f.read_bytes()).hexdigest()])
            else:
                entries.append([rel, stat.st_size, stat.st_mtime_ns])
    return entries


def prompt_cache_key(
    teacher_dir: str | os.PathLike[str],
    prompts: Sequence[str],
    negative_prompt: str = "",
    dtype: torch.dtype = torch.float32,
    encode_options: dict[str, Any] | None = None,
    variant: str | None = None,
) -> str:
    """sha256 (hex) of everything the embeddings depend on: the teacher folder's path, model_index.json and
    its text encoder / tokenizer files (content of small files, size + mtime of weights), the prompts, the
    negative prompt, the dtype, the encode options, and the diffusers / transformers versions. Reads no weights."""
    import diffusers
    import transformers

    folder = _local_teacher(teacher_dir)
    identity = {
        "format": FORMAT,
        "teacher": str(folder),
        "files": _file_entries(folder, _text_components(_model_index(folder))),
        "variant": variant,
        "prompts": hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest(),
        "negative_prompt": negative_prompt,
        "dtype": str(dtype),
        "options": encode_options or {},
        "versions": [diffusers.__version__, transformers.__version__],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$ONESTEP_CACHE/prompt_embeddings``, else ``~/.cache/onestep/prompt_embeddings``."""
    root = os.environ.get("ONESTEP_CACHE") or Path.home() / ".cache" / "onestep"
    return Path(root) / "prompt_embeddings"


# -------------------------------------------------------------------------------------------- encoding
def _encode_rows(
    pipe: Any, fam: _TextFamily, prompts: list[str], device: Any, options: dict
) -> dict[str, Tensor]:
    """Every encode_prompt output, named, for ``prompts`` (no guidance branch)."""
    kwargs: dict[str, Any] = dict(options, prompt=prompts, device=device, num_images_per_prompt=1)
    kwargs.update(dict.fromkeys(fam.extra_prompts))
    if fam.cfg:
        kwargs["do_classifier_free_guidance"] = False
    return dict(zip(fam.outputs, pipe.encode_prompt(**kwargs)))


def _encode_null(
    pipe: Any, fam: _TextFamily, negative: str | None, device: Any, options: dict
) -> dict[str, Tensor]:
    """The pipeline's unconditional branch for ``negative`` (``None``: the pipeline's own default)."""
    if not fam.cfg:
        return _encode_rows(pipe, fam, [negative or ""], device, options)
    kwargs: dict[str, Any] = dict(options, prompt=[""], device=device, num_images_per_prompt=1)
    # encode_prompt wants a list negative prompt with a list prompt; None keeps the pipeline's own default
    negative_list = None if negative is None else [negative]
    kwargs.update(
        dict.fromkeys(fam.extra_prompts), do_classifier_free_guidance=True, negative_prompt=negative_list
    )
    out = dict(zip(fam.outputs, pipe.encode_prompt(**kwargs)))
    return {k: out["negative_" + k] for k in fam.keys}


def _features(rows: dict[str, Tensor], with_prompt: bool) -> datasets.Features:
    """Arrow columns for one row of each tensor (its shape without the batch dimension)."""
    cols: dict[str, Any] = {"prompt": datasets.Value("string")} if with_prompt else {}
    for name, t in rows.items():
        kind = _ARROW_DTYPES.get(t.dtype, "float32")
        shape = tuple(t.shape[1:])
        if len(shape) == 0:
            cols[name] = datasets.Value(kind)
        elif len(shape) == 1:
            cols[name] = datasets.List(datasets.Value(kind), length=shape[0])
        elif len(shape) <= 5:
            cols[name] = getattr(datasets, f"Array{len(shape)}D")(shape, kind)
        else:
            raise ValueError(
                f"prompt embedding {name!r} has {len(shape)} dimensions per prompt; at most 5 are stored"
            )
    return datasets.Features(cols)


def _arrow_batch(rows: dict[str, Tensor]) -> dict[str, list]:
    out: dict[str, list] = {}
    for name, t in rows.items():
        t = t.detach().cpu()
        if t.dtype not in _ARROW_DTYPES:
            t = t.float()
        array = t.numpy()
        out[name] = list(array) if array.ndim > 1 else array.tolist()
    return out


@contextlib.contextmanager
def _temporary_folder(final: Path) -> Iterator[Path]:
    """A fresh sibling of ``final``, removed unless the caller renamed it into place."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_arrow(path: Path, features: datasets.Features, batches: Iterator[dict[str, list]]) -> None:
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(features=features, path=str(path)) as writer:
        for batch in batches:
            writer.write_batch(batch)
        writer.finalize()


def encode_prompts(
    teacher_dir: str | os.PathLike[str],
    prompts: Sequence[str],
    negative_prompt: str = "",
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    encode_options: dict[str, Any] | None = None,
) -> PromptEmbeddings:
    """``prompts`` encoded by the teacher's own text encoders, cached on disk (see the module docstring).

    ``teacher_dir``: a pipeline folder or hub id (as ``--teacher``). ``dtype``: the text encoders' dtype and
    the embeddings'. ``encode_options`` override the pipeline ``__call__`` defaults of the family's text
    options (e.g. ``{"max_sequence_length": 256}`` for Flux). ``cache_dir`` (default :func:`default_cache_dir`)
    holds one folder per key (:func:`prompt_cache_key`); a hit loads no text encoder. Writes go to a temporary
    folder renamed into place, so concurrent processes never read a half-written cache (with several processes,
    let the main one encode first: ``with accelerator.main_process_first(): ...``).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_prompts: the prompt list is empty")
    bad = next(((i, p) for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise TypeError(f"encode_prompts: prompt {bad[0]} is {bad[1]!r}, not a string")
    if batch_size < 1:
        raise ValueError(f"encode_prompts: batch_size must be >= 1, got {batch_size}")
    folder = _local_teacher(teacher_dir)
    pipeline_class, fam = _text_family(folder)
    options = _call_defaults(pipeline_class, fam.options)
    unknown = sorted(set(encode_options or {}) - set(fam.options))
    if unknown:
        raise ValueError(
            f"encode_options {unknown} are not text options of {pipeline_class}; it takes {list(fam.options)}"
        )
    options.update(encode_options or {})
    key = prompt_cache_key(folder, prompts, negative_prompt, dtype, options, variant)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{fam.family}-{key[:32]}"
    if (final / META_FILE).is_file():
        return PromptEmbeddings.load(final)

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    negative = negative_prompt or _call_defaults(pipeline_class, ["negative_prompt"]).get("negative_prompt")
    meta = {
        "format": FORMAT,
        "key": key,
        "teacher": str(folder),
        "pipeline_class": pipeline_class,
        "family": fam.family,
        "num_prompts": len(prompts),
        "negative_prompt": negative_prompt,
        "options": options,
    }
    root.mkdir(parents=True, exist_ok=True)
    pipe = load_text_pipeline(folder, dtype, device, variant)
    try:
        with torch.no_grad(), _temporary_folder(final) as tmp:
            _write_cache(tmp, pipe, fam, prompts, negative, batch_size, device, options, meta)
            try:
                tmp.rename(final)
            except OSError:  # another process renamed its copy first: same key, same content
                if not (final / META_FILE).is_file():
                    raise
    finally:
        del pipe  # the text encoders go now, before the caller loads its denoiser
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return PromptEmbeddings.load(final)


def _write_cache(
    folder: Path,
    pipe: Any,
    fam: _TextFamily,
    prompts: list[str],
    negative: str | None,
    batch_size: int,
    device: torch.device,
    options: dict[str, Any],
    meta: dict[str, Any],
) -> None:
    """Encode in batches straight into ``folder``'s Arrow files (the whole set is never in memory)."""
    first = _encode_rows(pipe, fam, prompts[:batch_size], device, options)
    per_row = {fam.keys[k]: first[k] for k in fam.keys}

    def batches() -> Iterator[dict[str, list]]:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            out = first if start == 0 else _encode_rows(pipe, fam, chunk, device, options)
            yield {"prompt": chunk, **_arrow_batch({fam.keys[k]: out[k] for k in fam.keys})}

    _write_arrow(folder / ROWS_FILE, _features(per_row, with_prompt=True), batches())
    null = _encode_null(pipe, fam, negative, device, options)
    null_rows = {fam.keys[k]: null[k] for k in fam.keys}
    _write_arrow(folder / NULL_FILE, _features(null_rows, with_prompt=False), iter([_arrow_batch(null_rows)]))
    shared = {fam.shared[k]: first[k].unsqueeze(0) for k in fam.shared}
    if shared:
        _write_arrow(folder / SHARED_FILE, _features(shared, False), iter([_arrow_batch(shared)]))
    meta = {
        **meta,
        "dtypes": {k: str(v.dtype) for k, v in {**per_row, **shared}.items()},
        "keys": list(per_row),
        "shared": list(shared),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------- embeddings
def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


class PromptEmbeddings:
    """Encoded prompts on disk: one memory-mapped Arrow row per prompt, the null row, shared tensors.

    ``embeds(indices)`` gives the denoiser keywords of those prompts (see the module docstring), ``null(n)``
    the negative prompt's row ``n`` times, ``shared`` the tensors common to every prompt (Flux's ``txt_ids``).
    Built by :func:`encode_prompts`; :meth:`load` reopens a cache folder.
    """

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.meta = meta
        self.family: str = meta["family"]
        self.pipeline_class: str = meta["pipeline_class"]
        self.keys: list[str] = list(meta["keys"])
        self._dtypes = {k: _dtype(v) for k, v in meta["dtypes"].items()}
        rows = datasets.Dataset.from_file(str(folder / ROWS_FILE), in_memory=False)
        if len(rows) != meta["num_prompts"]:
            raise ValueError(
                f"prompt cache {str(folder)!r} holds {len(rows)} rows; its meta.json says {meta['num_prompts']}"
            )
        self._prompts = rows
        self._rows = rows.with_format("torch", columns=self.keys)
        null = datasets.Dataset.from_file(str(folder / NULL_FILE), in_memory=False).with_format("torch")
        self._null = self._typed(null[:1])
        self.shared: dict[str, Tensor] = {}
        if meta["shared"]:
            shared = datasets.Dataset.from_file(str(folder / SHARED_FILE), in_memory=False).with_format(
                "torch"
            )
            self.shared = {k: v[0] for k, v in self._typed(shared[:1]).items()}

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> PromptEmbeddings:
        """Reopen a cache folder written by :func:`encode_prompts` (no text encoder is loaded)."""
        folder = Path(folder)
        meta_file = folder / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a prompt-embedding cache (no {META_FILE})")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"prompt cache {str(folder)!r} has format {meta.get('format')!r}; expected {FORMAT!r}"
            )
        return cls(folder, meta)

    def _typed(self, batch: dict[str, Tensor], device: torch.device | str | None = None) -> dict[str, Tensor]:
        return {k: v.to(device=device, dtype=self._dtypes[k]) for k, v in batch.items()}

    def __len__(self) -> int:
        return len(self._rows)

    def prompts(self, indices: int | Sequence[int] | Tensor | None = None) -> list[str]:
        """The prompt strings of ``indices`` (all when ``None``)."""
        column = self._prompts.select_columns(["prompt"])
        if indices is None:
            return list(column["prompt"])
        return list(column[_index_list(indices, len(self))]["prompt"])

    def embeds(
        self, indices: int | Sequence[int] | Tensor, device: torch.device | str | None = None
    ) -> dict[str, Tensor]:
        """The per-prompt tensors of rows ``indices`` (batch first, in that order; repeats allowed)."""
        return self._typed(self._rows[_index_list(indices, len(self))], device)

    def null(self, batch_size: int = 1, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """The negative prompt's tensors, ``batch_size`` rows (an expanded view of the one stored row)."""
        return {k: v.to(device).expand(batch_size, *v.shape[1:]) for k, v in self._null.items()}

    def __repr__(self) -> str:
        return f"PromptEmbeddings({self.pipeline_class}, {len(self)} prompts, keys={self.keys}, folder={str(self.folder)!r})"


def _index_list(indices: int | Sequence[int] | Tensor, size: int) -> list[int]:
    if isinstance(indices, Tensor):
        indices = indices.reshape(-1).tolist()
    elif isinstance(indices, (int, np.integer)):
        indices = [int(indices)]
    out = [int(i) for i in indices]
    bad = [i for i in out if not -size <= i < size]
    if bad:
        raise IndexError(f"prompt indices {bad[:5]} out of range for {size} prompts")
    return [i % size for i in out]
