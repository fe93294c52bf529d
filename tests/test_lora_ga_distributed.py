"""LoRA-GA across 2 processes: gradients are averaged before the SVD and every rank ends with the same A0, B0
and base weights. Run by pytest, this file launches itself with ``accelerate launch`` (2 CPU processes); each
process estimates gradients on its own data and writes what it holds to ``<out>/rank<r>.safetensors``."""

from __future__ import annotations

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


if __name__ == "__main__":
    run(Path(sys.argv[1]))
