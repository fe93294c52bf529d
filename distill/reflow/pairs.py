"""Reflow pair sets: ``(z, x = ODE(sigma_max * z), condition)`` from a teacher, as resumable Arrow shards.

Generating pairs is the expensive part of reflow, so it is a pipeline of its own:

* **Deterministic.** Pair ``i`` of round ``r`` has the seed ``pair_seed(seed, r, i)`` (numpy ``SeedSequence``),
  its unit noise is ``torch.randn(shape)`` from a generator seeded with it, and its class label (conditional
  teachers) is ``i % num_classes``, its prompt (text teachers) ``i % num_prompts``. Shard ``s`` holds pairs ``[s * shard_size, (s + 1) * shard_size)`` and is
  solved in fixed chunks of ``batch_size``, so a shard's content depends on the spec and ``s`` only: not on the
  number of processes, nor on which process or which run wrote it. Any pair can be regenerated from the
  manifest (:func:`regenerate_pairs`).
* **Parallel.** Process ``p`` of ``P`` (accelerate's ``PartialState``) writes shards ``p, p + P, ...``; no
  communication except two barriers.
* **Resumable.** A shard is written to a temporary name, fsynced and renamed; ``manifest.json`` (rewritten
  atomically under a file lock) lists the complete shards with their row counts, sizes and sha256. A rerun first
  reconciles the folder (temporary files removed, renamed-but-unlisted shards verified and listed, listed but
  missing or corrupt shards dropped), then writes only the shards that are missing. So a killed run continues
  from its last complete shard and never duplicates or drops a pair. A rerun must use the same spec (a
  different one is refused, naming the fields); ``num_pairs`` may grow as long as written shards stay whole.
* **Readable larger than RAM.** :func:`load_pairs` memory-maps the shards with ``datasets.Dataset.from_file``
  (Arrow IPC stream files, the format of ``datasets``' own cache), so training reads pages on demand.

Columns: ``index`` (int64), ``seed`` (int64), ``noise`` and ``sample`` (``Array3D`` float32, C x H x W: pixels, or
the latents of a latent teacher) and, for class-conditional teachers, ``label`` (int64), for text teachers
``prompt`` (int64, the row of the prompt in the run's :class:`~distill.teachers.prompts.PromptEmbeddings`, whose
cache key is in the spec, so other prompts never read these pairs). Classifier-free guidance (null class, or the
negative prompt) is applied while solving and recorded in the spec (``guidance_scale``); the students are trained
on the guided pairs, on each pair's own condition, and sampled without guidance (InstaFlow).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from distill.reflow.flow import euler_on_sigmas, flow_sigmas, t_max_for
from distill.sampling.ode import default_sigma_range, edm_heun_sample, euler_sample, steps_for_nfe
from distill.teachers.denoiser import Condition, Denoiser

__all__ = [
    "PairSpec",
    "PairSet",
    "generate_pairs",
    "load_pairs",
    "read_manifest",
    "pair_seed",
    "pair_noise",
    "pair_labels",
    "pair_prompts",
    "solve_pairs",
    "regenerate_pairs",
    "shard_path",
    "make_spec",
    "open_pairs",
    "reconcile",
    "model_fingerprint",
]

FORMAT = "onestep-reflow-pairs/1"
MANIFEST = "manifest.json"
_LOCK = ".manifest.lock"
_SHARD = re.compile(r"^shard-(\d{5,})\.arrow$")
_TMP_MARK = ".tmp-"
SAMPLERS = ("heun", "euler", "flow_euler")
CONVENTION = (
    "z ~ N(0, I) is the unit noise; x = ODE(sigma_max * z) solved by `sampler` from sigma_max to 0; "
    "flow time t in [0, 1] with x_t = (1 - t) x + t z, t = 0 data; t_max = sigma_max / (1 + sigma_max)"
)


@dataclass
class PairSpec:
    """Everything that determines a pair set; written to the manifest and checked on resume."""

    source: str
    source_kind: str
    sampler: str
    nfe: int
    sigma_max: float
    sigma_min: float
    shape: list[int]
    num_pairs: int
    shard_size: int = 1000
    batch_size: int = 500
    seed: int = 0
    round: int = 1
    rho: float = 7.0
    guidance_scale: float = 1.0
    num_classes: int | None = None
    dtype: str = "float32"
    source_fingerprint: str = ""
    #: text teachers: prompts in the embeddings and their cache key (teacher, prompts, negative prompt, ...)
    num_prompts: int | None = None
    prompt_cache_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} must be one of {SAMPLERS}")
        for name in ("num_pairs", "shard_size", "batch_size", "nfe"):
            if getattr(self, name) < 1:
                raise ValueError(f"PairSpec.{name}={getattr(self, name)} must be >= 1")
        self.shape = [int(s) for s in self.shape]
        self.sigma_max, self.sigma_min = float(self.sigma_max), float(self.sigma_min)
        self.guidance_scale = float(self.guidance_scale)

    @property
    def num_shards(self) -> int:
        return -(-self.num_pairs // self.shard_size)

    @property
    def t_max(self) -> float:
        return t_max_for(self.sigma_max)

    def shard_rows(self, shard: int) -> range:
        """Global pair indices of ``shard``."""
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_pairs))

    def identity(self) -> dict[str, Any]:
        """The fields that must match between runs writing into one folder (``num_pairs`` may grow)."""
        return {k: v for k, v in asdict(self).items() if k != "num_pairs"}


@dataclass
class PairSet:
    """A pair folder as read back: its spec, the complete shard files (in shard order) and the pair count."""

    folder: Path
    spec: PairSpec
    shards: dict[int, dict[str, Any]]

    @property
    def num_pairs(self) -> int:
        return sum(int(s["rows"]) for s in self.shards.values())

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.spec.num_shards

    @property
    def files(self) -> list[Path]:
        return [self.folder / self.shards[k]["file"] for k in sorted(self.shards)]


# ------------------------------------------------------------------------------------------ determinism
def pair_seed(seed: int, round_: int, index: int) -> int:
    """The 63-bit seed of pair ``index`` (independent streams per ``(seed, round, index)``)."""
    state = np.random.SeedSequence([int(seed), int(round_), int(index)]).generate_state(1, dtype=np.uint64)
    return int(state[0] & np.uint64(2**63 - 1))


def pair_noise(seeds: list[int], shape: list[int] | tuple[int, ...]) -> Tensor:
    """Unit noise of the pairs with these seeds, [len(seeds), *shape] float32 on CPU."""
    gen = torch.Generator()
    out = torch.empty(len(seeds), *shape)
    for j, s in enumerate(seeds):
        gen.manual_seed(s)
        out[j] = torch.randn(tuple(shape), generator=gen)
    return out


def pair_labels(indices: range | list[int], num_classes: int | None) -> Tensor | None:
    """Class labels of conditional pairs: ``index % num_classes`` (balanced and reproducible)."""
    if num_classes is None:
        return None
    return torch.as_tensor(list(indices), dtype=torch.long) % num_classes


def pair_prompts(indices: range | list[int], num_prompts: int | None) -> Tensor | None:
    """Prompt rows of text-conditioned pairs: ``index % num_prompts`` (every prompt equally often)."""
    if num_prompts is None:
        return None
    return torch.as_tensor(list(indices), dtype=torch.long) % num_prompts


#: prompt rows -> (their conditions, the null (negative prompt) conditions), e.g. ``ConditionSource.fixed``
PromptConditions = Callable[[Tensor], tuple[Condition | None, Condition | None]]


def _check_prompt_conditions(spec: PairSpec, conditions: PromptConditions | None) -> None:
    if spec.num_prompts is not None and conditions is None:
        raise ValueError(
            f"the pair spec holds {spec.num_prompts} prompts (cache key {spec.prompt_cache_key}): pass their "
            "conditions (ConditionSource.fixed of the encoded prompts)"
        )


@torch.no_grad()
def solve_pairs(
    denoiser: Denoiser,
    spec: PairSpec,
    noise: Tensor,
    labels: Tensor | None,
    progress: Callable[[int], None] | None = None,
    prompts: Tensor | None = None,
    conditions: PromptConditions | None = None,
) -> Tensor:
    """``x = ODE(sigma_max * z)`` with the spec's sampler, guidance and range, in chunks of ``batch_size``
    (``progress(n)`` is called after each chunk of ``n`` pairs). Text teachers: ``prompts`` are the pairs'
    prompt rows and ``conditions`` turns rows into their condition and null (guided towards the first)."""
    device = next(denoiser.parameters()).device
    out = []
    for start in range(0, len(noise), spec.batch_size):
        z = noise[start : start + spec.batch_size].to(device)
        cond = null = None
        if labels is not None:
            cond = Condition(class_labels=labels[start : start + spec.batch_size].to(device))
        if prompts is not None:
            if conditions is None:
                raise ValueError("prompt rows given without their conditions")
            cond, null = conditions(prompts[start : start + spec.batch_size])
            cond = None if cond is None else cond.to(device)
            null = None if null is None else null.to(device)
        if spec.sampler == "flow_euler":
            guidance = spec.guidance_scale if cond is not None else 1.0
            x = euler_on_sigmas(
                denoiser, z, flow_sigmas(spec.nfe, spec.sigma_max), cond, guidance, null_cond=null
            )
        else:
            used, steps = steps_for_nfe(spec.nfe, spec.sampler)
            solver = edm_heun_sample if used == "heun" else euler_sample
            x = solver(
                denoiser,
                z,
                steps,
                cond=cond,
                guidance_scale=spec.guidance_scale if cond is not None else 1.0,
                null_cond=null,
                sigma_min=spec.sigma_min,
                sigma_max=spec.sigma_max,
                rho=spec.rho,
            ).images
        out.append(x.float().cpu())
        if progress is not None:
            progress(len(z))
    return torch.cat(out)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's weights (names, shapes and bytes): pairs of two different teachers never mix."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_spec(
    denoiser: Denoiser,
    source: str,
    num_pairs: int,
    sampler: str = "heun",
    nfe: int = 35,
    sigma_max: float | None = None,
    guidance_scale: float = 1.0,
    num_classes: int | None = None,
    shape: list[int] | tuple[int, ...] | None = None,
    num_prompts: int | None = None,
    prompt_cache_key: str | None = None,
    **kwargs: Any,
) -> PairSpec:
    """A :class:`PairSpec` for ``denoiser``, resolving the noise range as the EDM samplers do.

    ``shape`` (C, H, W): what the denoiser denoises (default: its in_channels and sample_size; latent teachers
    pass :func:`distill.teachers.latents.sample_shape`). Text teachers pass ``num_prompts`` and the embeddings'
    ``prompt_cache_key``; guidance is kept for class- and text-conditioned pairs only."""
    lo, hi = default_sigma_range(denoiser, None, sigma_max)
    if shape is None:
        size = denoiser.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        shape = [int(denoiser.in_channels), int(h), int(w)]
    if (num_prompts is None) != (prompt_cache_key is None):
        raise ValueError("make_spec: num_prompts and prompt_cache_key go together (text teachers)")
    if num_prompts is not None and num_classes is not None:
        raise ValueError("make_spec: pairs are conditioned on classes or on prompts, not both")
    if sampler in ("heun", "euler"):
        steps_for_nfe(nfe, sampler)  # refuse an even Heun NFE before any work
    return PairSpec(
        source=source,
        source_kind=denoiser.parameterization,
        sampler=sampler,
        nfe=nfe,
        sigma_max=hi,
        sigma_min=lo,
        shape=[int(s) for s in shape],
        num_pairs=num_pairs,
        guidance_scale=guidance_scale if num_classes is not None or num_prompts is not None else 1.0,
        num_classes=num_classes,
        num_prompts=num_prompts,
        prompt_cache_key=prompt_cache_key,
        source_fingerprint=model_fingerprint(denoiser),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------- shards
def shard_path(folder: str | Path, shard: int) -> Path:
    return Path(folder) / f"shard-{shard:05d}.arrow"


def _features(spec: PairSpec):
    from datasets import Array3D, Features, Value

    cols = {
        "index": Value("int64"),
        "seed": Value("int64"),
        "noise": Array3D(tuple(spec.shape), spec.dtype),
        "sample": Array3D(tuple(spec.shape), spec.dtype),
    }
    if spec.num_classes is not None:
        cols["label"] = Value("int64")
    if spec.num_prompts is not None:
        cols["prompt"] = Value("int64")
    return Features(cols)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_shard(folder: Path, spec: PairSpec, shard: int, columns: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write one shard atomically (temporary name, fsync, rename); returns its manifest entry."""
    from datasets.arrow_writer import ArrowWriter

    final = shard_path(folder, shard)
    tmp = folder / f".{final.name}{_TMP_MARK}{os.getpid()}"
    with ArrowWriter(features=_features(spec), path=str(tmp)) as writer:
        writer.write_batch({k: list(v) if v.ndim > 1 else v.tolist() for k, v in columns.items()})
        writer.finalize()
    _fsync(tmp)
    rename_shard(tmp, final)
    _fsync(folder)
    return _entry(final, len(columns["index"]))


def _entry(path: Path, rows: int) -> dict[str, Any]:
    return {"file": path.name, "rows": rows, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def _intact(path: Path, entry: dict[str, Any], verify_hashes: bool) -> bool:
    """A listed shard is intact when its size (and, if asked, its sha256) is the recorded one."""
    if not path.is_file() or path.stat().st_size != entry.get("bytes"):
        return False
    return not verify_hashes or _sha256(path) == entry.get("sha256")


def rename_shard(tmp: Path, final: Path) -> None:
    """The commit point of a shard (a separate function so tests can kill a run exactly here)."""
    os.replace(tmp, final)


def _generate_shard(
    denoiser: Denoiser,
    spec: PairSpec,
    shard: int,
    progress: Callable[[int], None] | None = None,
    conditions: PromptConditions | None = None,
) -> dict[str, np.ndarray]:
    rows = spec.shard_rows(shard)
    seeds = [pair_seed(spec.seed, spec.round, i) for i in rows]
    noise = pair_noise(seeds, spec.shape)
    labels = pair_labels(rows, spec.num_classes)
    prompts = pair_prompts(rows, spec.num_prompts)
    sample = solve_pairs(denoiser, spec, noise, labels, progress, prompts, conditions)
    cols = {
        "index": np.asarray(list(rows), dtype=np.int64),
        "seed": np.asarray(seeds, dtype=np.int64),
        "noise": noise.numpy().astype(spec.dtype),
        "sample": sample.numpy().astype(spec.dtype),
    }
    if labels is not None:
        cols["label"] = labels.numpy()
    if prompts is not None:
        cols["prompt"] = prompts.numpy()
    return cols


# ------------------------------------------------------------------------------------------- manifest
@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive lock around read-modify-write of the manifest (processes of one run share the folder)."""
    with open(folder / _LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / f".{MANIFEST}{_TMP_MARK}{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync(tmp)
    os.replace(tmp, folder / MANIFEST)


def _new_manifest(spec: PairSpec) -> dict[str, Any]:
    return {"format": FORMAT, "convention": CONVENTION, "spec": asdict(spec), "shards": {}, "complete": False}


def _record_shard(folder: Path, spec: PairSpec, shard: int, entry: dict[str, Any]) -> None:
    with _locked(folder):
        manifest = read_manifest(folder) or _new_manifest(spec)
        manifest["shards"][str(shard)] = entry
        manifest["complete"] = len(manifest["shards"]) == spec.num_shards
        _write_manifest(folder, manifest)


def _spec_mismatch(old: dict[str, Any], new: PairSpec) -> list[str]:
    old_spec = PairSpec(**old)
    a, b = old_spec.identity(), new.identity()
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _verify_shard(path: Path, spec: PairSpec, shard: int) -> bool:
    """A shard file is usable when it opens, has the expected rows and the expected pair indices."""
    from datasets import Dataset

    try:
        ds = Dataset.from_file(str(path))
        rows = spec.shard_rows(shard)
        return len(ds) == len(rows) and ds["index"][:] == list(rows)
    except Exception:  # a truncated or foreign file is simply not a complete shard
        return False


def reconcile(
    folder: Path, spec: PairSpec, log: Callable[[str], None] = print, verify_hashes: bool = False
) -> dict[str, Any]:
    """Make the manifest agree with the folder before a (re)run; returns the manifest (main process only).

    Listed shards are checked by size (renames are atomic, so a listed shard is whole unless something else
    touched it); ``verify_hashes`` re-reads every shard against its sha256 as well.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        manifest = read_manifest(folder)
        if manifest is not None:
            if manifest.get("format") != FORMAT:
                raise ValueError(
                    f"{folder / MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT}"
                )
            diff = _spec_mismatch(manifest["spec"], spec)
            if diff:
                raise ValueError(
                    f"{folder} holds pairs of a different spec ({'; '.join(diff)}); use another folder or the "
                    "same settings"
                )
        else:
            manifest = _new_manifest(spec)
        manifest["spec"] = asdict(spec)
        for tmp in folder.glob(f".*{_TMP_MARK}*"):
            tmp.unlink(missing_ok=True)
            log(f"[pairs] removed unfinished file {tmp.name}")
        shards: dict[str, Any] = {}
        for key, entry in manifest["shards"].items():
            shard = int(key)
            path = folder / entry["file"]
            rows = spec.shard_rows(shard)
            if shard >= spec.num_shards or entry["rows"] != len(rows):
                raise ValueError(
                    f"{path.name} holds {entry['rows']} pairs but num_pairs={spec.num_pairs} with shard_size="
                    f"{spec.shard_size} needs {len(rows)} there; keep num_pairs a multiple of shard_size to grow"
                )
            if _intact(path, entry, verify_hashes):
                shards[key] = entry
            else:
                log(f"[pairs] listed shard {path.name} is missing or changed: it will be regenerated")
                path.unlink(missing_ok=True)
        for path in sorted(folder.glob("shard-*.arrow")):
            m = _SHARD.match(path.name)
            if m is None or shards.get(str(int(m.group(1))), {}).get("file") == path.name:
                continue
            shard = int(m.group(1))
            if shard < spec.num_shards and _verify_shard(path, spec, shard):
                shards[str(shard)] = _entry(path, len(spec.shard_rows(shard)))
                log(f"[pairs] adopted complete shard {path.name} missing from the manifest")
            else:
                path.unlink()
                log(f"[pairs] removed unusable {path.name}")
        manifest["shards"] = shards
        manifest["complete"] = len(shards) == spec.num_shards
        _write_manifest(folder, manifest)
    return manifest


# ----------------------------------------------------------------------------------------- generation
def generate_pairs(
    denoiser: Denoiser,
    spec: PairSpec,
    folder: str | Path,
    state: Any = None,
    max_minutes: float = 0.0,
    log: Callable[[str], None] | None = None,
    verify_hashes: bool = False,
    progress_bar: bool = True,
    conditions: PromptConditions | None = None,
) -> PairSet:
    """Write the missing shards of ``spec`` into ``folder`` across all processes; returns what is complete.

    ``state`` is accelerate's ``PartialState`` (built on demand). With ``max_minutes`` a process starts a shard
    only if its last shard's duration still fits (the first always runs, so every run makes progress), so a
    time-limited run stops on shard boundaries. ``verify_hashes`` checks every listed shard's sha256 first.
    ``progress_bar``: a bar over the main process's pairs (stderr). ``conditions``: text teachers' prompt
    rows -> (condition, null), required when the spec holds prompts.
    """
    _check_prompt_conditions(spec, conditions)
    if state is None:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
    folder = Path(folder)
    rank, world = state.process_index, state.num_processes
    log = log or tqdm.write  # print, without tearing the progress bar
    if state.is_main_process:
        reconcile(folder, spec, log, verify_hashes)
    state.wait_for_everyone()
    manifest = read_manifest(folder)
    assert manifest is not None
    done = {int(k) for k in manifest["shards"]}
    mine = [s for s in range(rank, spec.num_shards, world) if s not in done]
    if state.is_main_process:
        log(
            f"[pairs] {folder}: {len(done)}/{spec.num_shards} shards present, {world} process(es) writing "
            f"{spec.num_shards - len(done)} ({spec.sampler}, nfe={spec.nfe}, guidance={spec.guidance_scale})"
        )
    todo = sum(len(spec.shard_rows(s)) for s in mine)
    bar = tqdm(
        total=todo,
        desc=f"pairs: {todo} teacher samples at NFE {spec.nfe}"
        + (f" (process 0 of {world})" if world > 1 else ""),
        unit=" pairs",
        disable=not (progress_bar and state.is_main_process),
        file=sys.stderr,
    )
    start, last = time.perf_counter(), 0.0
    for shard in mine:
        elapsed = time.perf_counter() - start
        if max_minutes and last and elapsed + last > 60 * max_minutes:  # every process writes >= 1 shard
            log(
                f"[pairs] process {rank}: time budget reached after {elapsed:.0f}s, stopping at a shard boundary"
            )
            break
        t0 = time.perf_counter()
        cols = _generate_shard(denoiser, spec, shard, bar.update, conditions)
        entry = write_shard(folder, spec, shard, cols)
        last = time.perf_counter() - t0
        entry.update(process=rank, seconds=round(last, 3))
        _record_shard(folder, spec, shard, entry)
        log(f"[pairs] process {rank}: shard {shard} ({entry['rows']} pairs) in {last:.1f}s")
    bar.close()
    state.wait_for_everyone()
    return open_pairs(folder)


def open_pairs(folder: str | Path) -> PairSet:
    """The complete shards listed in ``folder``'s manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"no pair set at {folder} (missing {MANIFEST}); run the 'pairs' stage first")
    spec = PairSpec(**manifest["spec"])
    return PairSet(folder, spec, {int(k): v for k, v in manifest["shards"].items()})


def load_pairs(folder: str | Path):
    """The pairs of ``folder`` as one memory-mapped ``datasets.Dataset`` (torch format), plus the :class:`PairSet`."""
    from datasets import Dataset, concatenate_datasets

    pairs = open_pairs(folder)
    if not pairs.shards:
        raise ValueError(f"{folder} holds no complete shard yet")
    parts = [Dataset.from_file(str(f), in_memory=False) for f in pairs.files]
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return ds.with_format("torch"), pairs


def regenerate_pairs(
    denoiser: Denoiser,
    folder: str | Path,
    indices: list[int],
    conditions: PromptConditions | None = None,
) -> dict[str, Tensor]:
    """Recompute pairs ``indices`` from the manifest's seeds (batched as given, so ``sample`` matches to rounding);
    text teachers' pairs need their prompts' ``conditions``."""
    spec = open_pairs(folder).spec
    _check_prompt_conditions(spec, conditions)
    seeds = [pair_seed(spec.seed, spec.round, i) for i in indices]
    noise = pair_noise(seeds, spec.shape)
    labels = pair_labels(indices, spec.num_classes)
    prompts = pair_prompts(indices, spec.num_prompts)
    out = {"noise": noise, "sample": solve_pairs(denoiser, spec, noise, labels, None, prompts, conditions)}
    if labels is not None:
        out["label"] = labels
    if prompts is not None:
        out["prompt"] = prompts
    return out
