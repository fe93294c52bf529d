"""The LoRA recipe's data and config rules: single local files of every supported format (never a hub lookup),
which rows evaluate a run (validation split, else a fixed held-out share), eval metrics equal to a direct
re-computation, and the model_kind / model / dataset consistency errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest
import torch
from peft import PeftModel
from tiny_models import TEXTS, tiny_bert, tiny_llama

from finetune.data import HOLDOUT_SEED, load_text_splits, train_and_eval_splits

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--log_with", "none", "--progress_bar", "false", "--lora_rank", "2", "--max_steps", "2"]
#: 32 rows: every pair of a text with one of the first four, labelled by the second (a learnable 4-class task)
ROWS = [(f"{a} {b}", ["net", "mail", "loop", "log"][j]) for a in TEXTS for j, b in enumerate(TEXTS[:4])]


def _write(path: Path, labels: str = "names") -> Path:
    """Write :data:`ROWS` as ``path`` (format by suffix); ``labels``: class "names" or integer "ids"."""
    names = sorted({y for _, y in ROWS})
    label = [y if labels == "names" else names.index(y) for _, y in ROWS]
    rows = datasets.Dataset.from_dict({"text": [t for t, _ in ROWS], "label": label})
    if path.suffix == ".txt":
        path.write_text("\n".join(t for t, _ in ROWS) + "\n")
    elif path.suffix == ".csv":
        rows.to_csv(str(path), index=False)
    elif path.suffix in (".jsonl", ".json"):
        rows.to_json(str(path))  # JSON lines
    else:
        rows.to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet", ".txt"])
def test_a_single_local_file_loads_with_its_builder(tmp_path, suffix):
    path = _write(tmp_path / f"rows{suffix}", labels="ids")
    splits = load_text_splits(str(path))
    assert list(splits) == ["train"]
    assert splits["train"]["text"] == [t for t, _ in ROWS]
    if suffix == ".txt":
        assert splits["train"].column_names == ["text"]
    else:
        names = sorted({y for _, y in ROWS})
        assert splits["train"]["label"] == [names.index(y) for _, y in ROWS]


def test_missing_local_paths_never_reach_the_hub(tmp_path, monkeypatch):
    asked: list[str] = []
    monkeypatch.setattr(datasets, "load_dataset", lambda spec, *a, **k: asked.append(spec) or "hub")
    for spec in (
        "missing.csv",
        "sub/missing.jsonl",
        "./folder",
        "../folder",
        str(tmp_path / "gone"),
        "a/b/c",
    ):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_text_splits(spec)
    assert asked == []
    (tmp_path / "rows.xml").write_text("<rows/>")
    with pytest.raises(ValueError, match="unknown suffix '.xml'"):
        load_text_splits(str(tmp_path / "rows.xml"))
    assert load_text_splits("owner/name") == "hub" and asked == ["owner/name"]  # a hub id does go to the hub


def test_eval_rows_validation_else_a_fixed_held_out_share_never_test():
    rows = datasets.Dataset.from_dict({"text": [t for t, _ in ROWS], "i": list(range(len(ROWS)))})
    train, val, test = rows.select(range(20)), rows.select(range(20, 26)), rows.select(range(26, 32))
    splits = datasets.DatasetDict(train=train, validation=val, test=test)
    assert train_and_eval_splits(splits)[1]["i"] == val["i"]
    assert train_and_eval_splits(splits, eval_split="test")[1]["i"] == test["i"]
    with pytest.raises(ValueError, match="no split 'dev'.*'train', 'validation', 'test'"):
        train_and_eval_splits(splits, eval_split="dev")
    without = datasets.DatasetDict(train=train, test=test)
    kept, held = train_and_eval_splits(without, eval_holdout=0.25)
    expected = train.train_test_split(test_size=0.25, seed=HOLDOUT_SEED)
    assert held["i"] == expected["test"]["i"] and len(held) == 5  # from train, not the test split
    assert sorted([*kept["i"], *held["i"]]) == list(train["i"])
    assert train_and_eval_splits(without, eval_holdout=0.0) == (train, None)


def _direct_eval(model, tokenizer, texts: list[str], labels: list[int]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy, one unpadded text at a time."""
    losses, correct = [], 0
    with torch.no_grad():
        for text, label in zip(texts, labels):
            logits = model(**tokenizer(text, return_tensors="pt", truncation=True, max_length=64)).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(label)).item())
            correct += int(logits.argmax() == label)
    return sum(losses) / len(losses), correct / len(labels)


def test_recipe_on_a_csv_file_with_class_names_evaluates_the_held_out_rows(tmp_path):
    """No validation split in a single file: the recipe scores 10% of it, held out with HOLDOUT_SEED; its
    eval metrics equal a direct re-computation with the exported adapter on the untouched base."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from recipes.lora import main

    tiny_bert(tmp_path / "bert")
    csv = _write(tmp_path / "rows.csv")
    args = ["--model", str(tmp_path / "bert"), "--dataset", str(csv), "--method", "lora", "--batch_size", "4"]
    metrics = main([*args, "--lr", "1e-2", "--output_dir", str(tmp_path / "run"), *COMMON])

    names = sorted({y for _, y in ROWS})  # string labels become class ids in sorted order
    held = datasets.load_dataset("csv", data_files=str(csv))["train"].train_test_split(0.1, seed=HOLDOUT_SEED)
    labels = [names.index(y) for y in held["test"]["label"]]
    base = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "bert"), num_labels=4)
    tuned = PeftModel.from_pretrained(
        copy.deepcopy(base), str(tmp_path / "run" / "export" / "adapter")
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "bert"))
    loss, accuracy = _direct_eval(tuned, tokenizer, held["test"]["text"], labels)
    assert metrics["eval_loss"] == pytest.approx(loss, abs=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx(accuracy)
    assert abs(_direct_eval(base.eval(), tokenizer, held["test"]["text"], labels)[0] - loss) > 1e-4  # trained


def test_recipe_on_a_txt_file_trains_a_causal_lm(tmp_path):
    """Every line a text; eval = next-token cross-entropy over the held-out lines' tokens (here 4 lines, one
    batch: equal to the model's own loss on that batch)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    from recipes.lora import main

    tiny_llama(tmp_path / "llama")
    txt = _write(tmp_path / "rows.txt")
    args = [
        "--model",
        str(tmp_path / "llama"),
        "--dataset",
        str(txt),
        "--task",
        "causal_lm",
        "--batch_size",
        "4",
    ]
    metrics = main([*args, "--method", "lora", "--output_dir", str(tmp_path / "run"), *COMMON])
    assert set(metrics) == {"eval_loss"}

    held = datasets.load_dataset("text", data_files=str(txt))["train"].train_test_split(
        0.1, seed=HOLDOUT_SEED
    )
    assert len(held["test"]) == 4
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "llama"))
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)(
        [tokenizer(t, truncation=True, max_length=64) for t in held["test"]["text"]]
    )
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama"))
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "run" / "export" / "adapter")).eval()
    with torch.no_grad():
        assert metrics["eval_loss"] == pytest.approx(tuned(**batch).loss.item(), abs=1e-5)


def test_a_txt_file_cannot_train_a_classifier(tmp_path):
    from recipes.lora import main

    tiny_bert(tmp_path / "bert")
    args = ["--model", str(tmp_path / "bert"), "--dataset", str(_write(tmp_path / "rows.txt"))]
    with pytest.raises(ValueError, match="no label column 'label'.*use task=causal_lm"):
        main([*args, "--output_dir", str(tmp_path / "run"), *COMMON])


# ---------------------------------------------------------------------------------------------- config
def test_model_and_dataset_default_per_model_kind_and_mismatches_raise():
    from recipes.lora import LoraRecipeConfig

    text, unet = LoraRecipeConfig(), LoraRecipeConfig(model_kind="unet")
    assert (text.model, text.dataset) == ("minilm", "stdlib_docs")
    assert (unet.model, unet.dataset) == ("default", "digits")
    bad = [
        (
            {"model_kind": "unet", "dataset": "stdlib_docs"},
            "dataset='stdlib_docs' is the transformers default",
        ),
        ({"model_kind": "unet", "model": "minilm"}, "model='minilm' is the transformers default"),
        ({"model": "default"}, "model='default' is the unet default, but model_kind='transformers'"),
        ({"dataset": "digits"}, "dataset='digits' is the unet default"),
        ({"model_kind": "unet", "caption_dropout": 1.5}, "caption_dropout=1.5 must be in"),
        (
            {"model_kind": "unet", "task": "causal_lm"},
            "task='causal_lm' applies to model_kind='transformers'",
        ),
        ({"lora_rank": 0}, "lora_rank=0"),
        ({"eval_holdout": 1.0}, "eval_holdout=1.0"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", "\\(")):
            LoraRecipeConfig(**kwargs)


def test_old_rank_and_alpha_keys_name_their_new_names(tmp_path):
    from engine.config import parse_config
    from recipes.lora import LoraRecipeConfig

    assert LoraRecipeConfig.renamed_keys == {
        "rank": "lora_rank",
        "alpha": "lora_alpha",
        "loraga_batches": "loraga_samples",
    }
    cfg = parse_config(LoraRecipeConfig, ["--lora_rank", "4", "--lora_alpha", "8"])
    assert (cfg.lora_rank, cfg.lora_alpha) == (4, 8.0)
    for old, new in LoraRecipeConfig.renamed_keys.items():
        with pytest.raises(ValueError, match=f"'{old}'.*'{new}'"):
            parse_config(LoraRecipeConfig, [f"--{old}", "4"])
        (tmp_path / "old.yaml").write_text(json.dumps({old: 4}))
        with pytest.raises(ValueError, match=f"'{old}'.*'{new}'"):
            parse_config(LoraRecipeConfig, ["--config", str(tmp_path / "old.yaml")])


def test_unet_eval_noise_is_the_same_for_every_seed():
    """Runs with different seeds are scored on the same noisy held-out images (EVAL_NOISE_SEED)."""
    from recipes.lora import DenoiserTask, LoraRecipeConfig

    first, second = (
        DenoiserTask(LoraRecipeConfig(model_kind="unet", seed=s, eval_examples=8)) for s in (0, 1)
    )
    first.load_data(), second.load_data()
    assert first.eval_noise.shape == (6, 8, 1, 8, 8)
    assert torch.equal(first.eval_noise, second.eval_noise) and torch.equal(
        first.eval_images, second.eval_images
    )
