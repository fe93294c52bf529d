"""LoRA-GA across 2 processes: gradients are averaged before the SVD and every rank ends with the same A0, B0
and base weights. Run by pytest, this file launches itself with ``accelerate launch`` (2 CPU processes); each
process estimates gradients on its own data and writes what it holds to ``<out>/rank<r>.safetensors``.

``recipe`` mode builds the LoRA recipe's Trainer (setup only: data, model with a NEW classification head,
LoRA-GA on ``loraga_samples`` rows shared out over the processes) and writes each process's weights the same
way, to compare with a 1-process setup of the same config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from finetune.loraga import (
    LoraGAOptions,
    estimate_gradients,
    initialize_lora_ga,
    lora_ga_factors,
    lora_ga_layers,
)


def build() -> nn.Module:
    """A conv layer and a linear layer, each adapted (peft on a plain nn.Module)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    return get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "3"]))


def run(out: Path) -> None:
    from accelerate import PartialState

    state = PartialState(cpu=True)
    model = build()
    g = torch.Generator().manual_seed(100 + state.process_index)  # different data on every rank
    batches = [
        (torch.randn(4, 3, 4, 4, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)
    ]
    layers = lora_ga_layers(model)
    grads = estimate_gradients(
        model, layers, batches, lambda b: nn.functional.cross_entropy(model(b[0]), b[1])
    )
    local = {f"grad.{k}": v.clone() for k, v in grads.items()}
    initial = initialize_lora_ga(layers, grads, LoraGAOptions())
    tensors = {**local, **{f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()}}
    for name, (a0, b0) in initial.items():
        tensors[f"a0.{name}"], tensors[f"b0.{name}"] = a0, b0
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{state.process_index}.safetensors")
    )
    state.wait_for_everyone()
    state.destroy_process_group()  # leaving gloo's threads to interpreter exit can abort ("terminate called ...")


@pytest.mark.distributed
def test_two_processes_average_gradients_and_agree(tmp_path):
    from launch_utils import accelerate_launch

    accelerate_launch(Path(__file__), [str(tmp_path)])
    r0, r1 = (load_file(str(tmp_path / f"rank{i}.safetensors")) for i in range(2))
    params = [k for k in r0 if k.startswith("param.")]
    assert any("lora_A" in k for k in params) and all(torch.equal(r0[k], r1[k]) for k in params)
    model = build()
    layers = lora_ga_layers(model)
    for name, layer in layers.items():
        g0, g1 = r0[f"grad.{name}"], r1[f"grad.{name}"]
        assert not torch.allclose(g0, g1)  # the ranks really saw different data
        mean = ((g0 + g1) / 2).reshape(g0.shape[0], -1)
        a, b = lora_ga_factors(mean, layer.r["default"])
        for rank in (r0, r1):
            assert torch.allclose(rank[f"a0.{name}"].reshape(a.shape), a, atol=1e-6)
            assert torch.allclose(rank[f"b0.{name}"].reshape(b.shape), b, atol=1e-6)
        weight = layer.get_base_layer().weight.detach()
        offset = layer.scaling["default"] * (b @ a).reshape(weight.shape)
        assert torch.allclose(r0[f"param.{name}.base_layer.weight"], weight - offset, atol=1e-6)


def record_svd_inputs() -> list[torch.Tensor]:
    """Patch LoRA-GA so each averaged gradient handed to the SVD (on its owner process) is kept, in order."""
    import finetune.loraga as loraga

    seen: list[torch.Tensor] = []
    factors = loraga.lora_ga_factors

    def recording(grad, rank, options=None):
        seen.append(grad.detach().clone())
        return factors(grad, rank, options)

    loraga.lora_ga_factors = recording
    return seen


def run_recipe_setup(out: Path, argv: list[str]) -> None:
    """Every process: the recipe's setup through the Trainer, then its model's weights to rank<r>.safetensors
    (plus the averaged gradients it factorised, as ``grad.<j>``: the j-th layer this process owned)."""
    from engine.config import parse_config
    from engine.trainer import Trainer
    from recipes.lora import LoraRecipe, LoraRecipeConfig

    seen = record_svd_inputs()
    config = parse_config(LoraRecipeConfig, argv)
    trainer = Trainer(config, LoraRecipe(config))
    acc = trainer.accelerator
    state = acc.unwrap_model(trainer.trained["model"].module).state_dict()
    tensors = {**state, **{f"grad.{j}": g for j, g in enumerate(seen)}}
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        str(out / f"rank{acc.process_index}.safetensors"),
    )
    info = {"distributed_type": str(acc.distributed_type).split(".")[-1], "num_processes": acc.num_processes}
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(info))
    acc.wait_for_everyone()
    acc.end_training()


def recipe_args(tmp_path: Path, output_dir: Path) -> list[str]:
    """A sequence classifier on a headless base (its head is new), rank 1, 14 LoRA-GA rows in batches of 4:
    batches 0, 2 (8 rows) on process 0 and 1, 3 (4 + 2 rows) on process 1, so the split must weigh by rows."""
    args = ["--model", str(tmp_path / "bert"), "--dataset", str(tmp_path / "data"), "--method", "lora_ga"]
    args += ["--batch_size", "4", "--loraga_samples", "14", "--lora_rank", "1"]
    return [*args, "--output_dir", str(output_dir), "--log_with", "none", "--progress_bar", "false"]


def _well_separated(grad: torch.Tensor, rank: int) -> bool:
    """Singular vectors 0..2r are determined (to float rounding) only where neighbouring singular values are
    apart (A0 = the first r, B0 = the next r with direction ArB2r); a gap under 0.1% of the largest is left
    out (the tiny model's gradients are nearly low-rank, so some layers' later vectors are not defined)."""
    s = torch.linalg.svdvals(grad.double())
    gaps = [s[k] - s[k + 1] for k in range(2 * rank)]
    return min(gaps) > 1e-3 * s[0]


@pytest.mark.distributed
def test_new_head_and_lora_ga_samples_are_the_same_on_every_process_and_as_one_process(tmp_path, one_thread):
    """The bug of issue 22: a head the base does not load was drawn per process (seed + rank), so LoRA-GA
    estimated different gradients on every process. Now setup is seeded alike everywhere: the 2 processes hold
    identical weights; the head is bit for bit a 1-process setup's, the averaged gradients over the same 14 rows
    agree with its to float rounding, and so do A0, B0 and the offset base wherever the SVD is well defined."""
    from launch_utils import accelerate_launch
    from tiny_models import tiny_bert_headless, tiny_text_dataset

    from engine.config import parse_config
    from engine.trainer import Trainer
    from recipes.lora import LoraRecipe, LoraRecipeConfig

    tiny_bert_headless(tmp_path / "bert")
    tiny_text_dataset(tmp_path / "data")
    out = tmp_path / "two"
    out.mkdir()
    accelerate_launch(Path(__file__), ["recipe", str(out), *recipe_args(tmp_path, out / "run")])
    for rank in (0, 1):
        info = json.loads((out / f"rank{rank}.json").read_text())
        assert info == {"distributed_type": "MULTI_CPU", "num_processes": 2}
    r0, r1 = (load_file(str(out / f"rank{i}.safetensors")) for i in range(2))
    weights = [k for k in r0 if not k.startswith("grad.")]
    assert all(torch.equal(r0[k], r1[k]) for k in weights)

    import finetune.loraga as loraga

    factors = loraga.lora_ga_factors
    try:
        seen = record_svd_inputs()
        config = parse_config(LoraRecipeConfig, recipe_args(tmp_path, tmp_path / "one"))
        trainer = Trainer(config, LoraRecipe(config))
    finally:
        loraga.lora_ga_factors = factors
    one = trainer.accelerator.unwrap_model(trainer.trained["model"].module).state_dict()
    assert sorted(one) == sorted(weights)
    head = [k for k in one if "classifier" in k and "lora_" not in k]
    assert head and all(torch.equal(one[k], r0[k]) for k in head)
    # layer i (sorted names) is owned by process i % 2, its j-th: i = 2 j + process
    names = sorted(
        k.removesuffix(".lora_A.default.weight") for k in one if k.endswith(".lora_A.default.weight")
    )
    assert len(seen) == len(names)
    compared = 0
    for i, name in enumerate(names):
        two = (r0, r1)[i % 2][f"grad.{i // 2}"]
        assert torch.allclose(seen[i], two, rtol=1e-5, atol=1e-7 * seen[i].abs().max()), name
        if _well_separated(seen[i], 1):
            compared += 1
            for part in ("lora_A.default.weight", "lora_B.default.weight", "base_layer.weight"):
                key = f"{name}.{part}"
                assert torch.allclose(one[key], r0[key], atol=1e-5), (key, (one[key] - r0[key]).abs().max())
    assert compared >= len(names) // 2, (compared, len(names))


if __name__ == "__main__":
    if sys.argv[1] == "recipe":
        run_recipe_setup(Path(sys.argv[2]), sys.argv[3:])
    else:
        run(Path(sys.argv[1]))
