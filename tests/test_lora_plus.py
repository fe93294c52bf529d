"""LoRA+ parameter groups: peft's classification, the paper's weight decay, no empty groups, and the groups
surviving accelerate's preparation (DDP is covered by the 2-process recipe test)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer as peft_loraplus
from torch import nn

from finetune.loraplus import (
    GROUP_A,
    GROUP_B,
    GROUP_B_NO_DECAY,
    GROUP_EMBEDDING,
    check_loraplus_groups,
    create_loraplus_optimizer,
    loraplus_group_of,
    loraplus_learning_rates,
    loraplus_param_groups,
)


def lora_bert(**extra):
    from test_lora_models import tiny_bert

    config = LoraConfig(
        task_type="SEQ_CLS", r=2, target_modules=["query", "value", "word_embeddings"], **extra
    )
    return get_peft_model(tiny_bert(), config)


def _lr_by_param(optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


def test_groups_match_peft_and_drop_empty_groups():
    model = lora_bert()
    ours = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, ratio=16, lr_embedding=1e-5)
    theirs = peft_loraplus(
        model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5
    )
    assert _lr_by_param(ours) == _lr_by_param(theirs)
    names = [g["name"] for g in ours.param_groups]
    assert all(g["params"] for g in ours.param_groups) and len(names) == len(set(names))
    assert set(names) == {GROUP_A, GROUP_B, GROUP_B_NO_DECAY, GROUP_EMBEDDING}
    rates = loraplus_learning_rates(ours)
    assert rates[GROUP_A] == 1e-3 and rates[GROUP_B_NO_DECAY] == 16e-3 and rates[GROUP_EMBEDDING] == 1e-5

    plain = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    groups = loraplus_param_groups(plain, lr=1e-3)
    assert [g["name"] for g in groups] == [GROUP_A, GROUP_B]  # peft would also build 2 empty groups


def test_weight_decay_as_in_the_paper_and_never_on_norms_biases_or_dora_magnitudes():
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    model = get_peft_model(
        net, LoraConfig(r=2, target_modules=["0", "2"], use_dora=True, modules_to_save=["1"])
    )
    groups = {g["name"]: g for g in loraplus_param_groups(model, lr=1e-3, weight_decay=0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[GROUP_B_NO_DECAY]["params"]}
    assert groups[GROUP_A]["weight_decay"] == 0.1 and groups[GROUP_B_NO_DECAY]["weight_decay"] == 0.0
    assert any("lora_magnitude_vector" in n for n in no_decay)
    assert any("modules_to_save" in n and n.endswith("weight") for n in no_decay)  # the LayerNorm
    assert all("lora_B" in names[id(p)] for p in groups[GROUP_B]["params"])
    assert groups[GROUP_B]["weight_decay"] == 0.1 and groups[GROUP_B]["lr"] == 16e-3
    # peft's own function ignores a plain weight_decay= (it only reads loraplus_weight_decay)
    theirs = peft_loraplus(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    assert {g["weight_decay"] for g in theirs.param_groups} == {0.0}


def test_zero3_flattened_parameters_keep_their_group():
    flat = nn.Parameter(torch.zeros(32))
    flat.ds_shape = torch.Size([4, 8])  # what DeepSpeed ZeRO-3 leaves on a partitioned lora_A weight
    assert loraplus_group_of("layer.lora_A.default.weight", flat, set()) == GROUP_A
    assert loraplus_group_of("layer.lora_B.default.weight", flat, set()) == GROUP_B
    assert loraplus_group_of("layer.bias", nn.Parameter(torch.zeros(4)), {"layer.bias"}) == GROUP_B_NO_DECAY


def test_groups_survive_accelerate_prepare_and_an_lr_scheduler():
    from accelerate import Accelerator

    model = lora_bert()
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, ratio=16)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    acc = Accelerator(cpu=True)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    rates = loraplus_learning_rates(optimizer)
    assert rates[GROUP_B_NO_DECAY] / rates[GROUP_A] == pytest.approx(16)
    check_loraplus_groups(optimizer, lr=1e-3, ratio=16)
    optimizer.step()
    scheduler.step()
    check_loraplus_groups(optimizer, lr=1e-3, ratio=16)
    with pytest.raises(RuntimeError, match="LoRA\\+ group"):
        check_loraplus_groups(optimizer, lr=1e-3, ratio=4)


def test_bitsandbytes_8bit_adamw():
    bnb = pytest.importorskip("bitsandbytes")
    model = lora_bert()
    optimizer = create_loraplus_optimizer(model, bnb.optim.AdamW8bit, lr=1e-3, ratio=16)
    rates = loraplus_learning_rates(optimizer)
    assert rates[GROUP_B_NO_DECAY] / rates[GROUP_A] == pytest.approx(16)
    ids = torch.randint(5, 64, (4, 10))
    model(input_ids=ids, labels=torch.zeros(4, dtype=torch.long)).loss.backward()
    optimizer.step()
