"""LoRA-GA under a real DeepSpeed ZeRO-3 launch (2 CPU processes over gloo) of recipes/lora.py.

Under a ZeRO-3 launch transformers loads the model already partitioned (accelerate's DeepSpeed plugin registers
the ZeRO-3 config with transformers), so every process holds shards only. LoRA-GA then estimates the gradients
with DeepSpeed's parameter fetching hooks and writes A0, B0 and W - s B0 A0 one gathered layer at a time. Run by
pytest, this file launches itself: each process trains one step through the Trainer and writes its gathered
weights to ``<out>/rank<r>.safetensors``, compared with each other and with a 1-process run of the same config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.usefixtures("one_thread")

#: A0 / B0 of the ZeRO-3 run vs the 1-process run: the gradients differ only by float summation order.
FACTOR_TOLERANCE = 1e-5


def run(out: Path, argv: list[str]) -> None:
    """Every process: the recipe through the Trainer (1 step), then its full (gathered) weights."""
    from engine.config import parse_config
    from engine.trainer import Trainer, gathered_parameters
    from recipes.lora import LoraRecipe, LoraRecipeConfig

    config = parse_config(LoraRecipeConfig, argv)
    trainer = Trainer(config, LoraRecipe(config))
    trainer.fit(end_training=False)
    acc = trainer.accelerator
    module = trainer.trained["model"].module
    with gathered_parameters(acc, module):
        state = {k: v.detach().clone().contiguous() for k, v in acc.unwrap_model(module).state_dict().items()}
    save_file(state, str(out / f"rank{acc.process_index}.safetensors"))
    acc.wait_for_everyone()
    acc.end_training()


def recipe_args(tmp_path: Path, output_dir: Path) -> list[str]:
    args = ["--model", str(tmp_path / "llama"), "--task", "causal_lm", "--dataset", str(tmp_path / "data")]
    args += ["--method", "lora_ga", "--max_steps", "1", "--batch_size", "4", "--lr", "1e-3"]
    args += ["--lora_rank", "2", "--loraga_samples", "16", "--eval_every", "0"]
    return [*args, "--output_dir", str(output_dir), "--log_with", "none", "--progress_bar", "false"]


@pytest.mark.distributed
def test_lora_ga_on_a_zero3_partitioned_model_equals_one_process_and_every_rank_agrees(tmp_path):
    from launch_utils import ROOT, accelerate_launch
    from tiny_models import tiny_llama, tiny_text_dataset

    from recipes.lora import main

    original = tiny_llama(tmp_path / "llama")
    tiny_text_dataset(tmp_path / "data")
    out = tmp_path / "zero3"
    out.mkdir()
    result = accelerate_launch(
        Path(__file__),
        [str(out), *recipe_args(tmp_path, out / "run")],
        config=ROOT / "accelerate_configs" / "deepspeed_zero3.yaml",
        launch_args=["--num_processes", "2", "--mixed_precision", "no"],
    )
    info = json.loads((out / "run" / "run_info.json").read_text())
    assert (info["distributed_type"], info["num_processes"]) == ("DEEPSPEED", 2)
    assert info["deepspeed"]["zero_stage"] == 3
    assert "LoRA-GA initialised" in result.stdout + result.stderr

    # every rank holds the same full weights (gathered from its shards)
    r0, r1 = (load_file(str(out / f"rank{i}.safetensors")) for i in range(2))
    assert r0.keys() == r1.keys() and any("lora_A" in k for k in r0)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)

    # A0 / B0 equal a 1-process (no DeepSpeed) run of the same config
    main(recipe_args(tmp_path, tmp_path / "one"))
    zero3 = load_file(str(out / "run" / "lora_ga_initial.safetensors"))
    one = load_file(str(tmp_path / "one" / "lora_ga_initial.safetensors"))
    assert zero3.keys() == one.keys() and len(zero3) == 28  # A and B of 14 adapted layers
    worst = max(float((zero3[k] - one[k]).abs().max()) for k in zero3)
    assert worst < FACTOR_TOLERANCE, worst
    print(f"\nZeRO-3 (2 processes) vs 1 process: A0/B0 max abs difference {worst:.2e}")

    # every shard of each base weight was offset: W - s B0 A0, W the untouched checkpoint's
    weights = dict(original.named_parameters())
    scaling = 16.0 / 2  # lora_alpha / rank
    offset_layers = 0
    for key in zero3:
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key.removesuffix(".lora_A.weight")
        a0, b0 = zero3[key], zero3[f"{layer}.lora_B.weight"]
        w = weights[layer.removeprefix("base_model.model.") + ".weight"].detach()
        got = r0[f"{layer}.base_layer.weight"]
        assert torch.allclose(got, w - scaling * (b0 @ a0), atol=1e-6), layer
        offset_layers += 1
    assert offset_layers == 14

    # the exported adapter on the untouched base reproduces the trained model
    config = LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=16, target_modules="all-linear")
    trained = get_peft_model(tiny_llama(), config)
    trained.load_state_dict(r0)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(out / "run" / "export" / "adapter"))
    ids = torch.randint(5, 40, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, before = (m.eval()(input_ids=ids).logits for m in (trained, loaded, original))
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()
    assert (want - before).abs().max() > 1e-4


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2:])
