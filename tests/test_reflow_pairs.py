"""Pair generation: deterministic shards, a run killed mid-way resumes without duplicates or gaps, manifest rules."""

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from launch_utils import ROOT
from tiny_models import tiny_edm_teacher

from distill.reflow.pairs import (
    MANIFEST,
    PairSpec,
    generate_pairs,
    load_pairs,
    make_spec,
    open_pairs,
    read_manifest,
    regenerate_pairs,
)
from distill.teachers.denoiser import Denoiser

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher3_dir(tmp_path_factory):
    return tiny_edm_teacher(tmp_path_factory.mktemp("teacher"), num_classes=3)


@pytest.fixture(scope="module")
def teacher(teacher3_dir) -> Denoiser:
    return Denoiser.from_pretrained(teacher3_dir).eval().requires_grad_(False)


def spec_for(teacher: Denoiser, num_pairs: int = 40, **kw) -> PairSpec:
    base = dict(nfe=3, shard_size=8, batch_size=4, num_classes=3, guidance_scale=1.5, seed=7)
    return make_spec(teacher, "tiny", num_pairs, **{**base, **kw})


def quiet(msg: str) -> None:
    return None


def all_pairs(folder) -> dict[str, np.ndarray]:
    ds, _ = load_pairs(folder)
    return {k: ds[k][:].numpy() for k in ds.column_names}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher):
    """An uninterrupted run: the pairs every other run must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    generate_pairs(teacher, spec_for(teacher), folder, log=quiet)
    return folder


def test_pairs_are_complete_deterministic_and_regenerable(reference, teacher):
    pairs = open_pairs(reference)
    assert pairs.complete and pairs.num_pairs == 40 and len(pairs.files) == 5
    got = all_pairs(reference)
    assert got["index"].tolist() == list(range(40))
    assert got["label"].tolist() == [i % 3 for i in range(40)]
    manifest = read_manifest(reference)
    assert manifest["spec"]["guidance_scale"] == 1.5 and manifest["spec"]["sigma_max"] == 80.0
    assert "unit noise" in manifest["convention"]
    again = regenerate_pairs(teacher, reference, [3, 17, 39])  # other batching, same seeds
    torch.testing.assert_close(again["noise"], torch.from_numpy(got["noise"][[3, 17, 39]]), rtol=0, atol=0)
    torch.testing.assert_close(again["sample"], torch.from_numpy(got["sample"][[3, 17, 39]]))
    assert again["label"].tolist() == [0, 2, 0]
    # guidance was applied: unguided pairs from the same noise differ
    unguided = regenerate_pairs_with(teacher, reference, guidance_scale=1.0)
    assert not torch.allclose(unguided, torch.from_numpy(got["sample"][:4]))


def regenerate_pairs_with(teacher, folder, **changes) -> torch.Tensor:
    from distill.reflow.pairs import pair_labels, pair_noise, pair_seed, solve_pairs

    spec = PairSpec(**{**asdict(open_pairs(folder).spec), **changes})
    noise = pair_noise([pair_seed(spec.seed, spec.round, i) for i in range(4)], spec.shape)
    return solve_pairs(teacher, spec, noise, pair_labels(range(4), spec.num_classes))


def test_training_reads_memory_mapped_shards(reference):
    ds, pairs = load_pairs(reference)
    assert [f["filename"] for f in ds.cache_files] == [str(f) for f in pairs.files]  # no copy in RAM or cache
    item = ds[5]
    assert item["noise"].shape == (1, 8, 8) and item["sample"].dtype == torch.float32


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_pairs(tmp_path, teacher3_dir, teacher, reference):
    """SIGKILL a real process while it commits its 3rd shard, then rerun: same pairs, no duplicate, no gap."""
    folder = tmp_path / "pairs"
    spec_json = json.dumps(asdict(spec_for(teacher)))
    script = f"""
import json, os, signal
import distill.reflow.pairs as P
from distill.teachers.denoiser import Denoiser
calls = []
commit = P.rename_shard
def kill_on_third(tmp, final):
    calls.append(final)
    if len(calls) == 3:  # the shard's temporary file is complete but not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    commit(tmp, final)
P.rename_shard = kill_on_third
P.generate_pairs(Denoiser.from_pretrained({str(teacher3_dir)!r}), P.PairSpec(**json.loads({spec_json!r})), {str(folder)!r})
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(open_pairs(folder).shards) == 2
    assert any(p.name.startswith(".shard-") for p in folder.iterdir())  # the half-committed shard
    # also the other crash point: a shard renamed but killed before the manifest listed it
    manifest = read_manifest(folder)
    del manifest["shards"]["1"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    logs: list[str] = []
    generate_pairs(teacher, spec_for(teacher), folder, log=logs.append)
    assert any("removed unfinished" in m for m in logs) and any("adopted" in m for m in logs)
    assert any("2/5 shards present" in m for m in logs)  # shard 0 listed + shard 1 adopted
    got, want = all_pairs(folder), all_pairs(reference)
    assert sorted(got["index"].tolist()) == list(range(40))
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert not any(p.name.startswith(".shard-") for p in folder.iterdir())


def test_manifest_rules(tmp_path, teacher, reference):
    folder = tmp_path / "pairs"
    shutil.copytree(reference, folder)
    with pytest.raises(ValueError, match=r"nfe: 3 -> 5"):
        generate_pairs(teacher, spec_for(teacher, nfe=5), folder, log=quiet)
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="source_fingerprint"):  # same settings, different teacher weights
        generate_pairs(other, spec_for(other), folder, log=quiet)
    # a listed shard that changed on disk is regenerated, identical to the original: a truncated one is
    # caught by its size, a same-size change by its sha256 when hashes are verified
    (folder / "shard-00002.arrow").write_bytes(b"garbage")
    shard3 = folder / "shard-00003.arrow"
    data = bytearray(shard3.read_bytes())
    data[-100] ^= 0xFF
    shard3.write_bytes(bytes(data))
    logs: list[str] = []
    generate_pairs(teacher, spec_for(teacher), folder, log=logs.append, verify_hashes=True)
    assert any("shard-00002.arrow is missing or changed" in m for m in logs)
    assert any("shard-00003.arrow is missing or changed" in m for m in logs)
    np.testing.assert_array_equal(all_pairs(folder)["sample"], all_pairs(reference)["sample"])
    # num_pairs may grow when the written shards stay whole (40 = 5 x 8); the new pairs continue the sequence
    bigger = generate_pairs(teacher, spec_for(teacher, num_pairs=52), folder, log=quiet)
    assert bigger.num_pairs == 52 and all_pairs(folder)["index"].tolist() == list(range(52))
    with pytest.raises(ValueError, match="keep num_pairs a multiple of shard_size"):
        generate_pairs(teacher, spec_for(teacher, num_pairs=60), folder, log=quiet)


def test_time_budget_stops_on_a_shard_boundary(tmp_path, teacher):
    pairs = generate_pairs(teacher, spec_for(teacher), tmp_path, max_minutes=1e-9, log=quiet)
    assert pairs.num_pairs == 8 and not pairs.complete  # the first shard always runs, then time is up
    ds, _ = load_pairs(tmp_path)
    assert len(ds) == 8
