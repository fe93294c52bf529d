"""Every recipe refuses a teacher family it cannot train on yet, by name, before any copy of the teacher exists,
and still trains on the pixel-space teachers it supports (a real DDPM pipeline folder among them)."""

from __future__ import annotations

import pytest
from tiny_models import sid_trainer
from tiny_pipelines import FAMILIES

from recipes import lora as lora_recipe
from recipes import reflow as reflow_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

#: family -> the name the refusal must give (the pipeline class and the family key)
LATENT_FAMILIES = {
    "sd": "StableDiffusionPipeline (sd)",
    "sd_v": "StableDiffusionPipeline (sd)",
    "sdxl": "StableDiffusionXLPipeline (sdxl)",
    "sd3": "StableDiffusion3Pipeline (sd3)",
    "pixart": "PixArtAlphaPipeline (pixart)",
    "pixart_flow": "PixArtSigmaPipeline (pixart)",
    "sana": "SanaPipeline (sana)",
    "flux": "FluxPipeline (flux)",
    "dit": "DiTPipeline (dit)",
    "ldm_vq": "LDMPipeline (ldm)",
    "ldm_kl": "LDMPipeline (ldm)",
}


def test_every_tiny_family_is_either_refused_or_trained():
    assert set(LATENT_FAMILIES) | {"ddpm"} == set(FAMILIES)


#: families SiD trains on without prompts: class-conditional DiT and the unconditional LDMs
SID_WITHOUT_PROMPTS = ("dit", "ldm_kl", "ldm_vq")


@pytest.mark.parametrize("family", sorted(set(LATENT_FAMILIES) - set(SID_WITHOUT_PROMPTS)))
def test_sid_refuses_a_text_teacher_by_name_before_loading(tmp_path, tiny_pipeline_dir, family, monkeypatch):
    folder = tiny_pipeline_dir(family)
    loads = []
    monkeypatch.setattr("recipes.sid.load_teacher", lambda *a, **k: loads.append(a))
    with pytest.raises(ValueError, match="is conditioned on text: pass --prompts") as err:
        sid_trainer(tmp_path, folder)
    assert LATENT_FAMILIES[family].split(" (")[0] in str(err.value)
    assert loads == []  # refused from the configs alone: no teacher was loaded, let alone copied


@pytest.mark.parametrize("family,student", [("dit", "full"), ("ldm_vq", "lora")])
def test_sid_trains_on_latent_teachers_and_shows_decoded_images(tmp_path, tiny_pipeline_dir, family, student):
    trainer = sid_trainer(tmp_path, tiny_pipeline_dir(family), batch_size=2, eval_samples=4, student=student)
    seen = []
    trainer.log_images = lambda tag, images, **kw: seen.append(images.shape)
    trainer.fit()
    assert trainer.step == 2 and trainer.recipe.shape == (4 if family == "dit" else 3, 8, 8)
    assert seen and seen[-1][1:] == (3, 16, 16)  # the grid shows images decoded by the VAE, not latents


def test_reflow_needs_prompts_for_a_text_teacher_and_lora_refuses_a_latent_one(tmp_path, tiny_pipeline_dir):
    """Reflow trains on latent and text teachers (tests/test_reflow_latent.py) but refuses a text teacher without
    prompts, by name, before any pair; LoRA still refuses latent teachers."""
    folder = str(tiny_pipeline_dir("sd"))
    with pytest.raises(
        ValueError, match=r"\(StableDiffusionPipeline\) is conditioned on text: pass --prompts"
    ):
        reflow_recipe.main(
            ["--teacher", folder, "--output_dir", str(tmp_path / "reflow"), "--log_with", "none"]
        )
    assert not (tmp_path / "reflow" / "pairs_r1").exists()  # refused before any pair was generated
    cfg = lora_recipe.LoraRecipeConfig(
        model_kind="unet", model=folder, output_dir=str(tmp_path / "lora"), log_with="none"
    )
    # LoRA's digits task (the default dataset) refuses it by name and points at image datasets, which it trains
    # on (tests/test_lora_images.py)
    with pytest.raises(
        ValueError, match=r"StableDiffusionPipeline \(sd\) teachers are not supported.*--dataset"
    ):
        lora_recipe.LoraRecipe(cfg).task.build_model()


def test_sid_trains_two_steps_on_a_ddpm_pipeline_folder(tmp_path, tiny_pipeline_dir):
    """The pixel-space DDPMPipeline (3x32x32 UNet2DModel + DDPMScheduler) is a supported teacher."""
    trainer = sid_trainer(tmp_path, tiny_pipeline_dir("ddpm"), batch_size=2, eval_samples=4)
    trainer.fit()
    assert trainer.step == 2
    assert (tmp_path / "student" / "model_index.json").is_file()
