"""recipes/lora.py end to end: 2 CPU processes for both model kinds, the saved adapter on the untouched base
equals the trained model, LoRA+ rates after preparation, resume, ``full``, configs and the offline text data."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from launch_utils import ROOT, accelerate_launch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import UNET_TARGETS, tiny_bert, tiny_edm_teacher, tiny_llama, tiny_text_dataset

RECIPE = ROOT / "recipes" / "lora.py"
COMMON = ["--log_with", "none", "--progress_bar", "false", "--lora_rank", "2", "--loraga_samples", "16"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def _check_text_export(run: Path, bert: Path, data: Path, ratio: float) -> None:
    """The adapter on the original base reproduces the trained model (read back from the last checkpoint),
    and the reported eval metrics are that model's on the validation split."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    info = json.loads((run / "export" / "metrics.json").read_text())
    lrs = info["optimizer_lrs"]
    assert lrs["B"] / lrs["A"] == pytest.approx(ratio)  # the LoRA+ groups survived accelerate.prepare
    base = AutoModelForSequenceClassification.from_pretrained(str(bert), num_labels=4).eval()
    trained = get_peft_model(
        copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=16, target_modules="all-linear")
    )
    step = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir())
    folder = run / "checkpoints" / f"step_{step}"
    if (folder / "model.safetensors").is_file():
        trained.load_state_dict(load_file(str(folder / "model.safetensors")))
    else:  # a DeepSpeed checkpoint: the full fp32 weights rebuilt from the ZeRO shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder))
        lora = {k for k in trained.state_dict() if "lora_" in k}
        assert lora and lora <= set(state)
        trained.load_state_dict(state, strict=False)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(run / "export" / "adapter")).eval()
    ids = torch.randint(5, 40, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, before = (m.eval()(input_ids=ids).logits for m in (trained, loaded, base))
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()
    assert (want - before).abs().max() > 1e-4
    # the eval metrics, summed over both processes' shares, equal the loaded adapter on the validation split
    validation = datasets.load_from_disk(str(data))["validation"]
    tokenizer = AutoTokenizer.from_pretrained(str(bert))
    with torch.no_grad():
        logits = torch.cat([loaded(**tokenizer(t, return_tensors="pt")).logits for t in validation["text"]])
    labels = torch.tensor(list(validation["label"]))
    assert info["eval_loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)
    assert info["eval_accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())


@pytest.mark.distributed
def test_text_recipe_two_processes_lora_ga_plus(tmp_path):
    tiny_bert(tmp_path / "bert")
    tiny_text_dataset(tmp_path / "data")
    run = tmp_path / "run"
    args = ["--model", str(tmp_path / "bert"), "--dataset", str(tmp_path / "data"), "--batch_size", "4"]
    args += [
        "--method",
        "lora_ga_plus",
        "--max_steps",
        "3",
        "--lr",
        "1e-3",
        "--output_dir",
        str(run),
        *COMMON,
    ]
    accelerate_launch(RECIPE, args)
    _check_text_export(run, tmp_path / "bert", tmp_path / "data", ratio=16)
    state = json.loads((run / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2


@pytest.mark.distributed
def test_unet_recipe_two_processes_lora_ga_with_merge(tmp_path):
    from distill.teachers.denoiser import Denoiser

    teacher = tiny_edm_teacher(tmp_path / "teacher")
    run = tmp_path / "run"
    args = ["--model_kind", "unet", "--model", str(teacher), "--method", "lora_ga", "--max_steps", "3"]
    args += [
        "--batch_size",
        "8",
        "--eval_examples",
        "32",
        "--lr",
        "1e-3",
        "--merge",
        "true",
        "--output_dir",
        str(run),
    ]
    args += ["--target_modules", *UNET_TARGETS, *COMMON]
    accelerate_launch(RECIPE, args)
    adapter = run / "export" / "adapter"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()  # diffusers' format beside peft's

    original = Denoiser.from_pretrained(str(teacher)).eval()
    trained = copy.deepcopy(original)
    trained.model = get_peft_model(trained.model, LoraConfig(r=2, lora_alpha=16, target_modules=UNET_TARGETS))
    trained.load_state_dict(load_file(str(run / "checkpoints" / "step_3" / "model.safetensors")))
    loaded = copy.deepcopy(original)
    loaded.model = PeftModel.from_pretrained(loaded.model, str(adapter))
    merged = Denoiser.from_pretrained(str(run / "export" / "merged"))
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 0.5, 1.0, 3.0])
    with torch.no_grad():
        want = trained.eval()(x, sigma)
        for other in (loaded, merged):
            assert torch.allclose(want, other.eval()(x, sigma), atol=1e-5)
        assert (want - original(x, sigma)).abs().max() > 1e-4


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("stage", "method"),
    [(3, "lora_plus"), (2, "lora_ga_plus")],
    ids=["zero3_lora_plus", "zero2_lora_ga_plus"],
)
def test_deepspeed_launch_on_cpu_runs_the_lora_recipe(tmp_path, stage, method):
    """The repository's ZeRO-2 / ZeRO-3 launch files on 2 CPU processes really run DeepSpeed at that stage (over
    gloo; asserted from run_info.json, so a silent DDP fallback fails); LoRA+ rates and the exported adapter
    (gathered from the shards; LoRA-GA + LoRA+ under ZeRO-2) are checked as under any launch. LoRA-GA under ZeRO-3
    (partitioned weights): tests/test_lora_ga_zero3.py."""
    pytest.importorskip("deepspeed")
    tiny_bert(tmp_path / "bert")
    tiny_text_dataset(tmp_path / "data")
    run = tmp_path / "run"
    args = ["--model", str(tmp_path / "bert"), "--dataset", str(tmp_path / "data"), "--batch_size", "4"]
    args += ["--method", method, "--max_steps", "2", "--lr", "1e-3", "--output_dir", str(run), *COMMON]
    config = ROOT / "accelerate_configs" / f"deepspeed_zero{stage}.yaml"
    accelerate_launch(
        RECIPE, args, config=config, launch_args=["--num_processes", "2", "--mixed_precision", "no"]
    )
    info = json.loads((run / "run_info.json").read_text())
    assert (info["distributed_type"], info["num_processes"]) == ("DEEPSPEED", 2)
    assert info["deepspeed"]["zero_stage"] == stage
    _check_text_export(run, tmp_path / "bert", tmp_path / "data", ratio=16)


def test_resumed_lora_ga_run_exports_the_same_adapter(tmp_path):
    """Causal LM + DoRA + LoRA-GA: a run stopped at step 2 and resumed ends with the uninterrupted adapter (the
    resumed run does not re-estimate; it reads the initial factors saved beside the run)."""
    from recipes.lora import main

    tiny_llama(tmp_path / "llama")
    tiny_text_dataset(tmp_path / "data")
    args = ["--model", str(tmp_path / "llama"), "--task", "causal_lm", "--dataset", str(tmp_path / "data")]
    args += ["--method", "lora_ga", "--use_dora", "true", "--batch_size", "4", "--lr", "1e-3", *COMMON]
    main([*args, "--output_dir", str(tmp_path / "straight"), "--max_steps", "3"])
    _reset_accelerate()
    main([*args, "--output_dir", str(tmp_path / "resumed"), "--max_steps", "2"])
    _reset_accelerate()
    shutil.rmtree(tmp_path / "resumed" / "export")
    main([*args, "--output_dir", str(tmp_path / "resumed"), "--max_steps", "3", "--resume_from", "latest"])
    straight = load_file(str(tmp_path / "straight" / "export" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "export" / "adapter" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys() and any("lora_magnitude_vector" in k for k in straight)
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key


def test_full_fine_tuning_of_the_unet_reports_the_eval_loss_of_its_export(tmp_path):
    """``full`` trains every weight; eval_loss is the EDM loss of the exported model on the first
    ``eval_examples`` held-out rotated digits, at every eval sigma with the fixed EVAL_NOISE_SEED noise."""
    from distill.data import new_digits
    from distill.teachers.denoiser import Denoiser
    from distill.teachers.edm import edm_denoising_loss
    from recipes.lora import EVAL_NOISE_SEED, LoraRecipeConfig, main

    teacher = tiny_edm_teacher(tmp_path / "teacher")
    args = ["--model_kind", "unet", "--model", str(teacher), "--method", "full", "--max_steps", "2"]
    metrics = main(
        [*args, "--batch_size", "8", "--eval_examples", "16", "--output_dir", str(tmp_path), *COMMON]
    )
    merged = Denoiser.from_pretrained(str(tmp_path / "export" / "merged")).eval()
    x0 = new_digits("heldout")[0][:16]
    sigmas = LoraRecipeConfig().eval_sigmas
    noise = torch.randn(len(sigmas), *x0.shape, generator=torch.Generator().manual_seed(EVAL_NOISE_SEED))
    with torch.no_grad():
        want = [edm_denoising_loss(merged, x0, torch.full((16,), s), n).mean() for s, n in zip(sigmas, noise)]
        before = Denoiser.from_pretrained(str(teacher)).eval()
        untrained = [
            edm_denoising_loss(before, x0, torch.full((16,), s), n).mean() for s, n in zip(sigmas, noise)
        ]
    assert metrics["eval_loss"] == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)
    assert abs(metrics["eval_loss"] - torch.stack(untrained).mean().item()) > 1e-4  # the weights changed


def test_stdlib_docstrings_is_a_real_offline_text_task():
    from finetune.data import STDLIB_PACKAGES, stdlib_docstrings

    splits = stdlib_docstrings()
    train, evaluation = splits["train"], splits["validation"]
    assert train.features["label"].names == list(STDLIB_PACKAGES)
    assert len(train) > 1000 and len(evaluation) > 200
    assert set(train["label"]) == set(range(len(STDLIB_PACKAGES)))
    assert not set(train["text"]) & set(evaluation["text"])


def test_lora_ga_on_a_bf16_checkpoint_warns_with_the_measured_change_and_float32_loading_is_exact(
    tmp_path, caplog
):
    """transformers loads a bf16 checkpoint in bf16: LoRA-GA's start is then inexact and the run says so with
    the measured change; ``model_dtype: float32`` loads it in fp32 and the start is exact (no warning)."""
    from recipes.lora import main

    tiny_llama().to(torch.bfloat16).save_pretrained(str(tmp_path / "llama"))
    from tiny_models import tiny_tokenizer

    tiny_tokenizer(tmp_path / "llama")
    tiny_text_dataset(tmp_path / "data")
    args = ["--model", str(tmp_path / "llama"), "--task", "causal_lm", "--dataset", str(tmp_path / "data")]
    args += ["--method", "lora_ga", "--batch_size", "4", "--max_steps", "1", "--eval_every", "0", *COMMON]
    changes = {}
    for dtype in ("auto", "float32"):
        caplog.clear()
        with caplog.at_level("INFO", logger="engine"):
            main([*args, "--model_dtype", dtype, "--output_dir", str(tmp_path / dtype)])
        _reset_accelerate()
        info = json.loads((tmp_path / dtype / "export" / "metrics.json").read_text())
        changes[dtype] = info["loraga_output_change"]
        warned = [
            r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "LoRA-GA" in r.getMessage()
        ]
        if dtype == "auto":
            assert len(warned) == 1 and "torch.bfloat16" in warned[0] and f"{changes[dtype]:.2e}" in warned[0]
        else:
            assert not warned
    assert changes["auto"] > 1e-2 and changes["float32"] < 1e-4


def test_loraga_samples_are_cut_into_batches_shared_out_over_processes_and_checked():
    from recipes.lora import LoraRecipeConfig, loraga_batches

    batches = loraga_batches(rows=20, samples=14, size=4, processes=2, seed=0)
    assert [len(rows) for _, rows in batches] == [4, 4, 4, 2] and [j for j, _ in batches] == [0, 1, 2, 3]
    rows = [r for _, part in batches for r in part]
    assert len(set(rows)) == 14 and all(0 <= r < 20 for r in rows)
    assert loraga_batches(20, 14, 4, 1, 0) == batches  # the same batches whatever the number of processes
    with pytest.raises(ValueError, match="more than the 20 training rows"):
        loraga_batches(20, 21, 4, 1, 0)
    with pytest.raises(ValueError, match="makes 1 LoRA-GA batches for 2 processes"):
        loraga_batches(20, 4, 4, 2, 0)
    with pytest.raises(ValueError, match="loraga_samples >= 1"):
        LoraRecipeConfig(loraga_samples=0)


def test_loraga_batches_is_answered_with_its_new_name_and_lora_ga_takes_its_lr_scale():
    from engine.config import parse_config
    from recipes.lora import LoraRecipeConfig

    with pytest.raises(ValueError, match="'loraga_batches' .* renamed to 'loraga_samples'"):
        parse_config(LoraRecipeConfig, ["--loraga_batches", "8"])
    for method, want in (("lora", 1e-3), ("lora_plus", 1e-3), ("lora_ga", 2.5e-4), ("lora_ga_plus", 2.5e-4)):
        cfg = LoraRecipeConfig(method=method, lr=1e-3, loraga_lr_scale=0.25)
        assert cfg.method_lr == pytest.approx(want)
    with pytest.raises(ValueError, match="loraga_lr_scale=0"):
        LoraRecipeConfig(loraga_lr_scale=0)
