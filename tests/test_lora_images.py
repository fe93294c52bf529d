"""LoRA on image teachers (recipes/lora.py + distill/image_finetune.py): the teacher's own objective against a
direct call of the diffusers model, exports that the untouched pipeline loads (LoRA and LoRA-GA's rank-2r form),
the held-out loss, and the start-up refusals.

Tiny random pipelines (tests/tiny_pipelines.py) and a tiny imagefolder (8 random PNGs + metadata.jsonl) built here;
nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_pipelines import IMAGE_SIZES

from distill.teachers.conditions import ConditionSource
from distill.teachers.denoiser import Denoiser
from distill.teachers.loading import load_teacher
from distill.teachers.objective import TeacherObjective
from distill.teachers.prompts import encode_prompts
from engine.trainer import Trainer
from recipes.lora import LoraRecipe, LoraRecipeConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a photo of a cat", "a red car", "a dog on the grass"]


def image_folder(root: Path, size: int, captions: bool = True, labels: bool = False, n: int = 8) -> Path:
    """``n`` random RGB PNGs (a little taller than ``size``: the crop is exercised) and a metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pixels = (rng.random((size + 4, size, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(root / f"{i}.png")
        row: dict = {"file_name": f"{i}.png"}
        if captions:
            row["text"] = CAPTIONS[i % len(CAPTIONS)]
        if labels:
            row["label"] = i % 3
        rows.append(row)
    if captions or labels:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Factory: ``images(family)`` is an imagefolder at the family's image size (captions and labels)."""
    made: dict[str, Path] = {}

    def folder(family: str) -> Path:
        size = IMAGE_SIZES[family]
        if size not in made:
            made[size] = image_folder(tmp_path_factory.mktemp(f"images{size}"), size, labels=True)
        return made[size]

    return folder


def config(tmp_path: Path, teacher: Path, dataset: Path, **overrides) -> LoraRecipeConfig:
    values = dict(
        model_kind="unet",
        model=str(teacher),
        dataset=str(dataset),
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        batch_size=2,
        lora_rank=2,
        loraga_samples=2,
        lr=1e-2,
        method="lora",
        eval_holdout=0.25,
        log_with="none",
        progress_bar=False,
        prompt_cache_dir=str(tmp_path / "prompt_cache"),
    )
    values.update(overrides)
    return LoraRecipeConfig(**values)


# --------------------------------------------------------------------------------------------- objective
def _prompt_condition(folder: Path, tmp_path: Path, family: str):
    embeddings = encode_prompts(str(folder), CAPTIONS[:2], cache_dir=tmp_path / "cache")
    size = IMAGE_SIZES[family]
    source = ConditionSource.prompts(embeddings, (size, size), family.removesuffix("_v"))
    return source.fixed(torch.arange(2))[0]


@pytest.mark.parametrize("family", ["sd", "sd_v", "sd3"])
def test_own_objective_equals_the_diffusers_training_loss(tmp_path, tiny_pipeline_dir, family):
    """VP-epsilon (SD 1.5), v-prediction (SD 2.1) and flow matching (SD3): the loss equals the diffusers training
    scripts' ``F.mse_loss(model_pred, target)`` computed with the scheduler's own ``add_noise`` /
    ``get_velocity`` / flow interpolation and a direct call of the diffusers model."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    folder = tiny_pipeline_dir(family)
    teacher = load_teacher(str(folder)).eval()
    objective = TeacherObjective(teacher)
    cond = _prompt_condition(folder, tmp_path, family)
    g = torch.Generator().manual_seed(0)
    shape = (2, teacher.sample_channels, 8, 8)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    model = teacher.model
    with torch.no_grad():
        if family == "sd3":
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
            idx = torch.tensor([5, 900])  # the scheduler's own order: high noise first
            s = scheduler.sigmas[idx]
            T = scheduler.config.num_train_timesteps
            assert torch.allclose(
                objective.table_levels(T - 1 - idx), s.float()
            )  # same table, low noise first
            noisy = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
            pred = model(
                hidden_states=noisy,
                timestep=scheduler.timesteps[idx],
                encoder_hidden_states=cond.encoder_hidden_states,
                pooled_projections=cond.model_kwargs["pooled_projections"],
            ).sample
            want = F.mse_loss(pred, noise - x0, reduction="none").flatten(1).mean(1)
            got = objective(x0, noise, s.float(), cond)
        else:
            scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
            t = torch.tensor([3, 700])
            noisy = scheduler.add_noise(x0, noise, t)
            pred = model(noisy, t, encoder_hidden_states=cond.encoder_hidden_states).sample
            target = noise if family == "sd" else scheduler.get_velocity(x0, noise, t)
            want = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)
            got = objective(x0, noise, objective.table_levels(t), cond)
    assert (
        objective.parameterization == {"sd": "vp-epsilon", "sd_v": "vp-v_prediction", "sd3": "flow"}[family]
    )
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got, want)


# ----------------------------------------------------------------------------------------------- exports
def _train(tmp_path: Path, teacher: Path, dataset: Path, **overrides) -> Trainer:
    cfg = config(tmp_path, teacher, dataset, **overrides)
    trainer = Trainer(cfg, LoraRecipe(cfg))
    trainer.fit()
    return trainer


def _cond(task, family: str):
    if family == "dit":
        return task.conditions.fixed(torch.tensor([0, 2]))[0]
    return task.conditions.fixed(torch.tensor([0, 1]))[0]


@pytest.mark.parametrize(
    "family,method",
    [
        ("sd", "lora"),
        ("sd", "lora_ga"),
        ("sdxl", "lora_ga"),
        ("sd3", "lora_ga"),
        ("flux", "lora_ga"),
        ("sana", "lora_ga"),
        ("pixart", "lora_ga"),
        ("dit", "lora"),
    ],
)
def test_export_loads_on_the_untouched_pipeline(tmp_path, tiny_pipeline_dir, images, family, method):
    """After 2 steps, the exported adapter on a freshly loaded teacher pipeline gives the trained model's output:
    through ``pipe.load_lora_weights(export/adapter)`` where the pipeline has a LoRA loader (SD, SDXL, SD3, Flux,
    Sana), through ``PeftModel.from_pretrained(pipe.transformer, ...)`` where it has none (PixArt, DiT). LoRA-GA's
    adapter is the rank-2r form for the original base."""
    from diffusers import DiffusionPipeline
    from peft import PeftModel

    folder = tiny_pipeline_dir(family)
    extra = {"resolution": IMAGE_SIZES[family]} if family == "flux" else {}
    trainer = _train(tmp_path, folder, images(family), method=method, **extra)
    recipe = trainer.recipe
    task = recipe.task
    trained = trainer.accelerator.unwrap_model(trainer.trained["model"].module).denoiser.eval()
    adapter = tmp_path / "run" / "export" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == (4 if method == "lora_ga" else 2)  # LoRA-GA: [A; A0], [B, -B0] on the original base

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    component = "unet" if family in ("sd", "sdxl") else "transformer"
    base = Denoiser(getattr(pipe, component), pipe.scheduler).eval()
    shape = (task.codec.latent_channels, *task.codec.latent_size_for(task.size))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 2.0])
    cond = _cond(task, family)
    with torch.no_grad():
        want = trained(x, sigma, cond)
        before = base(x, sigma, cond)
    if family in ("pixart", "dit"):
        assert not (adapter / "pytorch_lora_weights.safetensors").exists()
        assert "PeftModel.from_pretrained" in (adapter / "README.md").read_text()
        setattr(pipe, component, PeftModel.from_pretrained(getattr(pipe, component), str(adapter)))
    else:
        assert "load_lora_weights" in (adapter / "README.md").read_text()
        pipe.load_lora_weights(str(adapter))
    loaded = Denoiser(getattr(pipe, component), pipe.scheduler).eval()
    with torch.no_grad():
        got = loaded(x, sigma, cond)
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()
    assert (want - before).abs().max() > 1e-4  # training changed the output


def test_eval_loss_is_the_objective_on_held_out_rows_at_fixed_noise(tmp_path, tiny_pipeline_dir, images):
    """SD: ``eval_loss`` is the teacher objective of the trained model on the held-out rows' latents (posterior
    mode) at every eval timestep, with row ``i``'s noise drawn from ``EVAL_NOISE_SEED + i``."""
    from distill.image_finetune import EVAL_NOISE_SEED, collate_images

    trainer = _train(tmp_path, tiny_pipeline_dir("sd"), images("sd"), eval_timesteps=[10, 500])
    task = trainer.recipe.task
    objective = trainer.accelerator.unwrap_model(trainer.trained["model"].module).eval()
    metrics = json.loads((tmp_path / "run" / "export" / "metrics.json").read_text())
    batch = collate_images([task.eval_rows[i] for i in range(len(task.eval_rows))])
    assert len(task.eval_rows) == 2  # eval_holdout 0.25 of 8 rows
    with torch.no_grad():
        x0 = task.codec.encode(batch["pixel_values"], sample=False)
        cond = task.conditions.fixed(batch["caption_index"])[0]
        losses = []
        for k, t in enumerate([10, 500]):
            noise = torch.stack(
                [
                    torch.randn(
                        2, *x0.shape[1:], generator=torch.Generator().manual_seed(EVAL_NOISE_SEED + i)
                    )[k]
                    for i in range(2)
                ]
            )
            level = objective.table_levels(torch.tensor([t, t]))
            losses.append(objective(x0, noise, level, cond).mean())
    assert metrics["eval_loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


# --------------------------------------------------------------------------------------------- refusals
def _refused(tmp_path, monkeypatch, teacher: Path, dataset: Path, match: str, **overrides) -> None:
    loads = []
    monkeypatch.setattr("distill.image_finetune.load_teacher", lambda *a, **k: loads.append(a))
    cfg = config(tmp_path, teacher, dataset, **overrides)
    with pytest.raises(ValueError, match=match):
        Trainer(cfg, LoraRecipe(cfg)).fit()
    assert loads == []  # refused before the teacher's weights were read


def test_text_teacher_without_captions_is_refused_naming_the_columns(
    tmp_path, tiny_pipeline_dir, monkeypatch
):
    bare = image_folder(tmp_path / "bare", 16, captions=False)
    _refused(
        tmp_path, monkeypatch, tiny_pipeline_dir("sd"), bare, r"none of the caption columns.*\['image'\]"
    )
    named = image_folder(tmp_path / "named", 16)
    _refused(
        tmp_path,
        monkeypatch,
        tiny_pipeline_dir("sd"),
        named,
        r"no caption column 'prompt'.*\['image', 'text'\]",
        caption_column="prompt",
    )


def test_start_up_refusals(tmp_path, tiny_pipeline_dir, monkeypatch):
    folder = image_folder(tmp_path / "images", 16)
    # a resolution the VAE's downsampling (2 for the tiny SD) does not divide
    _refused(tmp_path, monkeypatch, tiny_pipeline_dir("sd"), folder, "not a multiple of", resolution=15)
    # Flux transformers have no sample size: the resolution must be given
    _refused(tmp_path, monkeypatch, tiny_pipeline_dir("flux"), folder, "set resolution")
    # a class-conditional teacher needs labels
    _refused(tmp_path, monkeypatch, tiny_pipeline_dir("dit"), folder, r"class-conditional.*no label column")
    # a data file without images
    rows = tmp_path / "rows.csv"
    rows.write_text("text\na cat\na dog\n")
    _refused(
        tmp_path, monkeypatch, tiny_pipeline_dir("sd"), rows, r"no image column; its columns: \['text'\]"
    )
    # an unconditional teacher has no caption to drop
    _refused(tmp_path, monkeypatch, tiny_pipeline_dir("ldm_vq"), folder, "unconditional", caption_dropout=0.1)


def test_unconditional_latent_teacher_ignores_captions(tmp_path, tiny_pipeline_dir):
    """LDM (VQ) on the captioned folder: captions are ignored, the loss is finite and the UNet export is written."""
    trainer = _train(tmp_path, tiny_pipeline_dir("ldm_vq"), image_folder(tmp_path / "im", 16))
    assert trainer.step == 2 and trainer.recipe.task.conditions is None
    assert (tmp_path / "run" / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_caption_dropout_gives_the_null_embedding(tmp_path, tiny_pipeline_dir, images):
    """``caption_dropout=1``: every training condition is the empty prompt's (the pipeline's null) embedding."""
    cfg = config(tmp_path, tiny_pipeline_dir("sd"), images("sd"), caption_dropout=1.0)
    recipe = LoraRecipe(cfg)
    task = recipe.task
    task.load_data()
    cond = task._condition(
        {"caption_index": torch.tensor([0, 1, 2])}, torch.Generator().manual_seed(0), drop=True
    )
    null = task.conditions.embeddings.null(3)["encoder_hidden_states"]
    kept = task._condition({"caption_index": torch.tensor([0, 1, 2])}, None, drop=False)
    assert torch.equal(cond.encoder_hidden_states, null)
    assert not torch.equal(kept.encoder_hidden_states, null)
    assert sorted(task.prompts) == sorted(CAPTIONS)  # the distinct captions, once each
