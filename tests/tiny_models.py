"""Every tiny model the tests build, from configs (nothing downloaded): diffusers UNets and teachers saved as
local folders, transformers text models with a word-level tokenizer, a text dataset, and a SiD trainer.

Shared fixtures over these live in conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel, UNet2DModel

from distill.teachers.builders import build_unet, edm_scheduler
from distill.teachers.denoiser import Denoiser

TEXTS = [
    "open a socket and send bytes to the server",
    "parse the message header and return the payload",
    "run the event loop until the future is done",
    "log the record with the given level and handler",
    "start a worker process and wait on the queue",
    "import the module from the given file path",
    "build the element tree from an xml string",
    "assert that the two values are equal in the test",
]
UNET_TARGETS = [
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
]


def tiny_tokenizer(folder: Path):
    """A word-level fast tokenizer over :data:`TEXTS` (with [PAD]/[UNK]/[CLS]/[SEP]/[EOS])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[EOS]",
    )
    fast.save_pretrained(str(folder))
    return fast


def tiny_bert(folder: Path | None = None, num_labels: int = 4, seed: int = 0):
    """BertForSequenceClassification, hidden 32, 2 layers (saved with a tokenizer when ``folder`` is given)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(cfg).eval()
    if folder is not None:
        model.save_pretrained(str(folder))
        tiny_tokenizer(folder)
    return model


def tiny_bert_headless(folder: Path, seed: int = 0) -> Path:
    """:func:`tiny_bert`'s encoder alone (``BertModel``, no classifier) saved with a tokenizer: a sequence
    classifier loaded from it gets a newly created, random head (as from a sentence-embedding checkpoint)."""
    model = tiny_bert(seed=seed)
    model.bert.save_pretrained(str(folder))
    tiny_tokenizer(folder)
    return folder


def tiny_llama(folder: Path | None = None, seed: int = 0, hidden_size: int = 32):
    """LlamaForCausalLM, hidden 32 (or ``hidden_size``, MLP twice that), 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=4,
        bos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    if folder is not None:
        model.save_pretrained(str(folder))
        tiny_tokenizer(folder)
    return model


def tiny_text_dataset(folder: Path) -> Path:
    """A saved ``DatasetDict`` (train/validation, ``text`` + 4-class ``label``) from :data:`TEXTS`."""
    texts = [f"{a} {b}" for a in TEXTS for b in TEXTS[:4]]
    labels = [i % 4 for i in range(len(texts))]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(num_classes=4)}
    )
    full = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
    datasets.DatasetDict({"train": full, "validation": full.select(range(8))}).save_to_disk(str(folder))
    return folder


# ---------------------------------------------------------------------------------------- diffusers models
def tiny_unet(seed: int = 0, num_classes: int | None = None) -> UNet2DModel:
    """8x8x1 UNet2DModel, channels (8, 16), one layer per block; ``num_classes`` adds a null class."""
    torch.manual_seed(seed)
    return build_unet(
        8, 1, block_out_channels=(8, 16), layers_per_block=1, num_classes=num_classes, norm_num_groups=4
    ).eval()


def tiny_text_unet(seed: int = 2, cross_attention_dim: int = 8) -> UNet2DConditionModel:
    """8x8x1 UNet2DConditionModel with cross-attention (a text-to-image teacher's shape, tiny)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
    ).eval()


def tiny_edm_teacher(folder: Path, num_classes: int | None = None, seed: int = 0) -> Path:
    """:func:`tiny_unet` with an EDM scheduler, saved as a diffusers teacher folder."""
    Denoiser(tiny_unet(seed, num_classes), edm_scheduler()).save_pretrained(folder)
    return folder


def tiny_flow_teacher(folder: Path, num_classes: int | None = None, seed: int = 2) -> Path:
    """:func:`tiny_unet` with a flow-matching scheduler, saved as a diffusers teacher folder."""
    Denoiser(tiny_unet(seed, num_classes), FlowMatchEulerDiscreteScheduler()).save_pretrained(folder)
    return folder


def sid_trainer(tmp_path: Path, teacher: Path, **overrides):
    """A SiD trainer on a tiny teacher, sized for tests (batch 4, 2 steps, no logging); ``overrides`` win."""
    from engine.trainer import Trainer
    from recipes import sid as sid_recipe

    base = dict(
        teacher=str(teacher),
        output_dir=str(tmp_path),
        batch_size=4,
        max_steps=2,
        eval_samples=16,
        eval_every=0,
        log_with="none",
        progress_bar=False,
    )
    cfg = sid_recipe.SiDConfig(**{**base, **overrides})
    return Trainer(cfg, sid_recipe.SiDRecipe(cfg))
