"""Prompts for text-to-image teachers: every source format round-trips, and the cached embeddings equal the
pipeline's own ``encode_prompt`` for every text family, load from the cache without a text encoder, and get a
new cache key when anything they depend on changes."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from diffusers import DiffusionPipeline, SanaPipeline

from distill.teachers import prompts as P
from distill.teachers.prompts import PromptEmbeddings, encode_prompts, load_prompts, prompt_cache_key

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a red car in the city", "a dog sitting on the grass"]
TEXT_FAMILIES = ["sd", "sdxl", "sd3", "pixart", "sana", "flux"]


# ------------------------------------------------------------------------------------------- references
def _reference(
    family: str, folder: Path, prompts: list[str], negative: str | None
) -> tuple[dict, dict, dict]:
    """(rows, null row, shared) from the full pipeline's own ``encode_prompt``, called as its ``__call__`` does."""
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    n = len(prompts)
    with torch.no_grad():
        if family == "sd":
            neg = None if negative is None else [negative] * n
            pe, ne = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=neg)
            return {"encoder_hidden_states": pe}, {"encoder_hidden_states": ne[:1]}, {}
        if family in ("sdxl", "sd3"):
            neg = None if negative is None else [negative] * n
            extra = [None, None] if family == "sd3" else []
            pe, ne, pooled, npooled = pipe.encode_prompt(prompts, *extra, device="cpu", negative_prompt=neg)
            name = "text_embeds" if family == "sdxl" else "pooled_projections"
            return (
                {"encoder_hidden_states": pe, name: pooled},
                {"encoder_hidden_states": ne[:1], name: npooled[:1]},
                {},
            )
        if family in ("pixart", "sana"):
            kwargs = {"clean_caption": True} if family == "pixart" else {}
            if family == "sana":  # SanaPipeline.__call__ prepends its complex human instruction by default
                chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
                assert chi, "the test means to cover Sana's default complex human instruction"
                kwargs["complex_human_instruction"] = chi
            pe, pm, ne, nm = pipe.encode_prompt(
                prompts, negative_prompt=negative or "", device="cpu", **kwargs
            )
            return (
                {"encoder_hidden_states": pe, "encoder_attention_mask": pm},
                {"encoder_hidden_states": ne[:1], "encoder_attention_mask": nm[:1]},
                {},
            )
        assert family == "flux"
        pe, pooled, ids = pipe.encode_prompt(prompts, None, device="cpu")
        npe, npooled, _ = pipe.encode_prompt([negative or ""], None, device="cpu")
        return (
            {"encoder_hidden_states": pe, "pooled_projections": pooled},
            {"encoder_hidden_states": npe, "pooled_projections": npooled},
            {"txt_ids": ids},
        )


#: per-prompt shapes at the tiny widths (tests/tiny_pipelines.py): sequence length x width
SHAPES = {
    "sd": {"encoder_hidden_states": (77, 32)},
    "sdxl": {"encoder_hidden_states": (77, 64), "text_embeds": (32,)},
    "sd3": {"encoder_hidden_states": (77 + 256, 64), "pooled_projections": (64,)},
    "pixart": {"encoder_hidden_states": (120, 32), "encoder_attention_mask": (120,)},
    "sana": {"encoder_hidden_states": (300, 32), "encoder_attention_mask": (300,)},
    "flux": {"encoder_hidden_states": (512, 32), "pooled_projections": (32,)},
}


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert got[k].dtype == want[k].dtype, k
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)


def _no_encoder(*args, **kwargs):
    raise AssertionError("a text encoder was loaded")


# ------------------------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_embeddings_equal_the_pipelines_encode_prompt_and_reload_from_cache(
    family, tiny_pipeline_dir, tmp_path, monkeypatch
):
    folder = tiny_pipeline_dir(family)
    emb = encode_prompts(folder, PROMPTS, cache_dir=tmp_path, batch_size=2, device="cpu")  # two batches
    rows, null, shared = _reference(family, folder, PROMPTS, None)

    assert len(emb) == len(PROMPTS) and emb.prompts() == PROMPTS and emb.family == family
    assert emb.keys == list(SHAPES[family])
    assert {k: tuple(v.shape[1:]) for k, v in emb.embeds([0]).items()} == SHAPES[family]
    _assert_equal(emb.embeds(range(len(PROMPTS))), rows)
    _assert_equal(emb.null(), null)
    _assert_equal(emb.shared, shared)
    if family == "sdxl":  # force_zeros_for_empty_prompt: the pipeline's null branch is zeros, not encoded ""
        assert all(not v.any() for v in emb.null().values())
    else:
        assert emb.null()["encoder_hidden_states"].abs().sum() > 0

    # second call: same folder, read from the cache, no text encoder loaded
    monkeypatch.setattr(P, "load_text_pipeline", _no_encoder)
    again = encode_prompts(folder, PROMPTS, cache_dir=tmp_path, batch_size=3, device="cpu")
    assert again.folder == emb.folder
    assert [p.name for p in tmp_path.iterdir()] == [emb.folder.name]  # no temporary folder left behind
    _assert_equal(again.embeds([2, 0, 2]), {k: v[[2, 0, 2]] for k, v in rows.items()})
    _assert_equal(again.null(), null)
    _assert_equal(again.shared, shared)


def test_negative_prompt_gives_the_pipelines_negative_branch(tiny_pipeline_dir, tmp_path):
    for family in ("sd", "sdxl"):
        folder = tiny_pipeline_dir(family)
        emb = encode_prompts(folder, PROMPTS[:2], negative_prompt="blurry", cache_dir=tmp_path, device="cpu")
        plain = encode_prompts(folder, PROMPTS[:2], cache_dir=tmp_path, device="cpu")
        assert emb.folder != plain.folder
        _, null, _ = _reference(family, folder, PROMPTS[:2], "blurry")
        _assert_equal(emb.null(), null)
        assert not torch.equal(emb.null()["encoder_hidden_states"], plain.null()["encoder_hidden_states"])
        assert emb.null(4)["encoder_hidden_states"].shape == (4, *null["encoder_hidden_states"].shape[1:])
        torch.testing.assert_close(emb.null(4)["encoder_hidden_states"][3], null["encoder_hidden_states"][0])
        _assert_equal(emb.embeds([0, 1]), plain.embeds([0, 1]))  # the prompt rows do not depend on it


def test_bfloat16_embeddings_equal_a_bfloat16_encoder(tiny_pipeline_dir, tmp_path):
    """Arrow has no bfloat16: stored as float32 (exact) and cast back."""
    folder = tiny_pipeline_dir("sd3")
    emb = encode_prompts(folder, PROMPTS, cache_dir=tmp_path, device="cpu", dtype=torch.bfloat16)
    pipe = P.load_text_pipeline(folder, torch.bfloat16, "cpu")
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False
        )
    got = emb.embeds(torch.tensor([0, 1, 2]))
    assert got["encoder_hidden_states"].dtype == torch.bfloat16
    assert torch.equal(got["encoder_hidden_states"], pe) and torch.equal(got["pooled_projections"], pooled)
    assert emb.folder != encode_prompts(folder, PROMPTS, cache_dir=tmp_path, device="cpu").folder


def test_text_pipeline_loads_no_denoiser_or_vae(tiny_pipeline_dir):
    pipe = P.load_text_pipeline(tiny_pipeline_dir("sdxl"), torch.float32, "cpu")
    assert pipe.unet is None and pipe.vae is None and pipe.scheduler is None
    assert pipe.text_encoder is not None and pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None


def test_cache_key_changes_with_prompts_negative_dtype_options_and_teacher(tiny_pipeline_dir, tmp_path):
    sd = tiny_pipeline_dir("sd")
    key = prompt_cache_key(sd, PROMPTS)
    assert key == prompt_cache_key(sd, list(PROMPTS))
    others = [
        prompt_cache_key(sd, PROMPTS[:2]),
        prompt_cache_key(sd, PROMPTS[::-1]),
        prompt_cache_key(sd, PROMPTS, negative_prompt="blurry"),
        prompt_cache_key(sd, PROMPTS, dtype=torch.float16),
        prompt_cache_key(sd, PROMPTS, encode_options={"clip_skip": 1}),
        prompt_cache_key(tiny_pipeline_dir("sd_v"), PROMPTS),  # same text encoder, another folder
    ]
    assert len({key, *others}) == len(others) + 1

    # a copy of the teacher with one changed text-encoder config / tokenizer file is another teacher
    copy = shutil.copytree(sd, tmp_path / "copy")
    base = prompt_cache_key(copy, PROMPTS)
    config = copy / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "layer_norm_eps": 1e-3}))
    changed = prompt_cache_key(copy, PROMPTS)
    assert changed != base
    vocab = copy / "tokenizer" / "tokenizer.json"
    assert '"cat</w>"' in vocab.read_text()
    vocab.write_text(vocab.read_text().replace('"cat</w>"', '"kat</w>"'))
    assert prompt_cache_key(copy, PROMPTS) not in (base, changed)
    # but a changed denoiser does not touch the prompts: same key
    before = prompt_cache_key(copy, PROMPTS)
    unet_config = copy / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "norm_eps": 1e-3}))
    assert prompt_cache_key(copy, PROMPTS) == before


def test_changed_teacher_encodes_again(tiny_pipeline_dir, tmp_path, monkeypatch):
    copy = shutil.copytree(tiny_pipeline_dir("sd"), tmp_path / "teacher")
    cache = tmp_path / "cache"
    first = encode_prompts(copy, PROMPTS, cache_dir=cache, device="cpu")
    state = DiffusionPipeline.from_pretrained(str(copy)).text_encoder
    with torch.no_grad():
        for p in state.parameters():
            p.mul_(0.5)
    state.save_pretrained(str(copy / "text_encoder"))
    loads: list[str] = []
    real = P.load_text_pipeline
    monkeypatch.setattr(P, "load_text_pipeline", lambda *a, **k: loads.append("x") or real(*a, **k))
    second = encode_prompts(copy, PROMPTS, cache_dir=cache, device="cpu")
    assert loads == ["x"] and second.folder != first.folder
    assert not torch.equal(
        second.embeds([0])["encoder_hidden_states"], first.embeds([0])["encoder_hidden_states"]
    )


def test_failed_encoding_leaves_no_cache_folder(tiny_pipeline_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(P, "_encode_null", fail)
    with pytest.raises(RuntimeError, match="boom"):
        encode_prompts(tiny_pipeline_dir("sd"), PROMPTS, cache_dir=tmp_path, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_indices_and_errors(tiny_pipeline_dir, tmp_path, monkeypatch):
    folder = tiny_pipeline_dir("sd")
    emb = encode_prompts(folder, PROMPTS, cache_dir=tmp_path, device="cpu")
    full = emb.embeds([0, 1, 2])["encoder_hidden_states"]
    assert torch.equal(emb.embeds(1)["encoder_hidden_states"], full[1:2])
    assert torch.equal(emb.embeds(torch.tensor([2, 2]))["encoder_hidden_states"], full[[2, 2]])
    assert torch.equal(emb.embeds([-1])["encoder_hidden_states"], full[2:])
    assert emb.prompts([2, 0]) == [PROMPTS[2], PROMPTS[0]]
    with pytest.raises(IndexError, match=r"\[3\]"):
        emb.embeds([0, 3])
    assert torch.equal(PromptEmbeddings.load(emb.folder).embeds([0])["encoder_hidden_states"], full[:1])

    monkeypatch.setattr(P, "load_text_pipeline", _no_encoder)
    with pytest.raises(ValueError, match="empty"):
        encode_prompts(folder, [], cache_dir=tmp_path)
    with pytest.raises(TypeError, match="prompt 1"):
        encode_prompts(folder, ["a", None], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="DiTPipeline.*StableDiffusionPipeline"):
        encode_prompts(tiny_pipeline_dir("dit"), PROMPTS, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="model_index.json"):
        encode_prompts(folder / "unet", PROMPTS, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="complex_human_instruction.*clip_skip"):
        encode_prompts(folder, PROMPTS, cache_dir=tmp_path, encode_options={"complex_human_instruction": []})
    with pytest.raises(FileNotFoundError):
        encode_prompts(tmp_path / "missing", PROMPTS, cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- sources
ROWS = {"prompt": ["a cat", "a dog, on grass", 'a "quoted" car'], "id": [0, 1, 2]}


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_data_files_round_trip(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    ds = datasets.Dataset.from_dict(ROWS)
    if suffix == ".json":  # one JSON array, as people write it by hand
        path.write_text(json.dumps([{"prompt": p, "id": i} for p, i in zip(ROWS["prompt"], ROWS["id"])]))
    elif suffix == ".jsonl":
        ds.to_json(str(path))
    elif suffix == ".csv":
        ds.to_csv(str(path), index=False)
    else:
        ds.to_parquet(str(path))
    assert load_prompts(path) == ROWS["prompt"]


def test_a_missing_value_is_refused_by_row(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,id\na cat,0\n,1\n")  # csv cannot tell an empty prompt from a missing one
    with pytest.raises(ValueError, match="column 'prompt' row 1 is None, not a string"):
        load_prompts(path)


def test_text_file_one_prompt_a_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of a cat\n\n   \n  a red car  \r\nlast line without newline")
    assert load_prompts(path) == ["a photo of a cat", "a red car", "last line without newline"]
    assert load_prompts(str(path)) == load_prompts(path)


def test_fashion_captions_name_the_shipped_teachers_training_captions(tmp_path, monkeypatch):
    from distill.fashion_mnist import FASHION_CLASSES, all_captions

    got = load_prompts(P.FASHION_CAPTIONS)
    assert got == [c for k in range(len(FASHION_CLASSES)) for c in all_captions(k)]
    assert len(got) == len(set(got)) == 132 and "a photo of a sneaker" in got
    monkeypatch.chdir(tmp_path)  # a local folder of that name is read as the data it holds
    (tmp_path / P.FASHION_CAPTIONS).mkdir()
    (tmp_path / P.FASHION_CAPTIONS / "prompts.txt").write_text("a red apple\n")
    assert load_prompts(P.FASHION_CAPTIONS) == ["a red apple"]


def test_saved_and_data_file_folders(tmp_path):
    ds = datasets.Dataset.from_dict({"caption": ["x one", "x two"], "text": ["t one", "t two"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_prompts(tmp_path / "saved") == ["t one", "t two"]  # "text" comes before "caption"
    assert load_prompts(tmp_path / "saved", prompt_column="caption") == ["x one", "x two"]
    datasets.DatasetDict(train=ds, validation=ds.select([1])).save_to_disk(str(tmp_path / "dict"))
    assert load_prompts(tmp_path / "dict", split="validation") == ["t two"]
    with pytest.raises(ValueError, match=r"no split 'test'.*\['train', 'validation'\]"):
        load_prompts(tmp_path / "dict", split="test")
    (tmp_path / "files").mkdir()
    datasets.Dataset.from_dict({"prompt": ["f one", "f two"]}).to_json(str(tmp_path / "files" / "a.jsonl"))
    assert load_prompts(tmp_path / "files") == ["f one", "f two"]


def test_imagefolder_captions(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(2):
            Image.new("RGB", (4, 4)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "caption": f"caption {i}"}) + "\n")
    assert load_prompts(folder) == ["caption 0", "caption 1"]


def test_missing_column_lists_the_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    datasets.Dataset.from_dict({"title": ["a"], "id": [1]}).to_json(str(path))
    with pytest.raises(ValueError, match=r"none of the prompt columns.*\['title', 'id'\]"):
        load_prompts(path)
    with pytest.raises(ValueError, match=r"no column 'prompt_text'.*\['title', 'id'\]"):
        load_prompts(path, prompt_column="prompt_text")
    assert load_prompts(path, prompt_column="title") == ["a"]


def test_missing_paths_never_reach_the_hub_and_hub_ids_do(tmp_path, monkeypatch):
    asked: list[tuple] = []

    def fake_hub(spec, *args, **kwargs):
        asked.append((spec, args, kwargs))
        return datasets.DatasetDict(train=datasets.Dataset.from_dict({"caption": ["hub one"]}))

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    for spec in ("missing.txt", "./prompts", str(tmp_path / "missing"), "~/no/such/prompts.csv"):
        with pytest.raises(FileNotFoundError):
            load_prompts(spec)
    assert asked == []
    assert load_prompts("someone/captions") == ["hub one"]
    assert asked == [("someone/captions", (), {})]
