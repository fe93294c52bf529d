"""engine.optim.optimizer_class (the one resolver of ``--optimizer``) and 8-bit Adam in the reflow recipe."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch

from distill.reflow import stages
from distill.teachers.builders import build_unet, edm_scheduler
from distill.teachers.denoiser import Denoiser
from engine.optim import optimizer_class
from engine.trainer import Trainer
from recipes import reflow as reflow_recipe

FAST = [
    "--num_pairs", "16", "--pairs_shard_size", "8", "--pairs_batch_size", "8", "--pairs_nfe", "3",
    "--batch_size", "8", "--eval_samples", "8", "--eval_nfes", "1", "--straightness_samples", "4",
    "--straightness_steps", "2", "--log_with", "none", "--progress_bar", "false",
]  # fmt: skip


# ------------------------------------------------------------------------------------- optimizer_class
def test_torch_and_8bit_names_resolve():
    assert optimizer_class("adam") is torch.optim.Adam
    assert optimizer_class("adamw") is torch.optim.AdamW
    assert optimizer_class("sgd") is torch.optim.SGD
    bnb = pytest.importorskip("bitsandbytes")
    assert optimizer_class("adam8bit") is bnb.optim.Adam8bit
    assert optimizer_class("adamw8bit") is bnb.optim.AdamW8bit


def test_unknown_or_disallowed_name_is_refused():
    with pytest.raises(ValueError, match=r"optimizer='lion'; expected one of \['adam', 'adamw'"):
        optimizer_class("lion")
    with pytest.raises(ValueError, match=r"optim='sgd'; expected one of \['adam', 'adam8bit'\]"):
        optimizer_class("sgd", ("adam", "adam8bit"), setting="optim")


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"optimizer=adam8bit needs bitsandbytes: pip install bitsandbytes.*"
                       r"or use optimizer=adam$"):  # fmt: skip
        optimizer_class("adam8bit", ("adam", "adam8bit"))
    with pytest.raises(ImportError, match=r"adamw8bit needs bitsandbytes.*\.\[bitsandbytes\]'\)$"):
        optimizer_class("adamw8bit", ("adamw8bit",))  # no fallback offered where none is allowed
    assert optimizer_class("adam") is torch.optim.Adam  # torch names never import bitsandbytes


# --------------------------------------------------------------------------------- reflow + Adam8bit
def wider_teacher(folder) -> str:
    """A tiny 8x8 teacher with tensors of >= 4096 values (bitsandbytes keeps smaller ones in 32-bit state)."""
    torch.manual_seed(0)
    unet = build_unet(8, 1, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    Denoiser(unet, edm_scheduler()).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("mode", ["reflow", "distill"])
def test_reflow_stage_trains_with_adam8bit(tmp_path, mode):
    bnb = pytest.importorskip("bitsandbytes")
    teacher = wider_teacher(tmp_path / "teacher")
    cfg = reflow_recipe.parse_config(
        reflow_recipe.ReflowConfig,
        ["--teacher", teacher, "--output_dir", str(tmp_path), *FAST, "--optimizer", "adam8bit"],
    )
    stages.run_pairs(cfg, 1)
    stage = replace(cfg, output_dir=str(tmp_path / mode), max_steps=3, adam_beta1=0.8)
    recipe = reflow_recipe.ReflowRecipe(
        stage, mode, teacher, tmp_path / "pairs_r1", tmp_path / mode / "model"
    )
    trainer = Trainer(stage, recipe)
    student = trainer.accelerator.unwrap_model(trainer.trained["student"].module)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    losses = [float(trainer.train_step()["student/loss"]) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    optimizer = trainer.trained["student"].optimizer.optimizer  # accelerate's wrapper around it
    assert isinstance(optimizer, bnb.optim.Adam8bit)
    lr = stage.reflow_lr if mode == "reflow" else stage.distill_lr
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.999)
    assert optimizer.param_groups[0]["initial_lr"] == lr
    moved = [n for n, p in student.named_parameters() if not torch.equal(before[n], p)]
    assert len(moved) == len(before)  # every parameter was stepped
    large = [p for p in student.parameters() if p.numel() >= 4096]
    assert large
    for p in large:  # both moments quantised to 8 bits, with their block-wise scales
        assert optimizer.state[p]["state1"].dtype == torch.uint8
        assert optimizer.state[p]["state2"].dtype == torch.uint8
        assert optimizer.state[p]["state1"].numel() == p.numel()


def test_reflow_adam8bit_without_bitsandbytes_fails_before_the_pairs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    args = ["--teacher", "unused", "--output_dir", str(tmp_path), "--optimizer", "adam8bit"]
    with pytest.raises(ImportError, match="optimizer=adam8bit needs bitsandbytes"):
        reflow_recipe.parse_config(reflow_recipe.ReflowConfig, args)
    assert not any(tmp_path.iterdir())  # nothing was generated
    # the pairs stage alone trains nothing and does not need it
    cfg = reflow_recipe.parse_config(reflow_recipe.ReflowConfig, [*args, "--stage", "pairs"])
    assert cfg.optimizer == "adam8bit"
