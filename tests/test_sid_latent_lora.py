"""SiD LoRA students of latent text teachers plug into the untouched teacher pipeline with diffusers' own
``load_lora_weights`` (SD: with the student's Euler scheduler shipped in the adapter folder; transformers under
the ``transformer.`` prefix), and their merged export loads with plain ``DiffusionPipeline.from_pretrained``."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler
from peft import PeftModel
from safetensors.torch import load_file
from test_family_denoisers import _text_conditions
from tiny_models import sid_trainer

from distill.sampling.student import student_sample
from distill.teachers.denoiser import Denoiser
from distill.teachers.latents import LatentCodec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a photo of a cat\na red car\n")
    return path


def _train(tmp_path, teacher, prompt_file, **kw):
    trainer = sid_trainer(
        tmp_path,
        teacher,
        student="lora",
        prompts=str(prompt_file),
        prompt_cache_dir=str(tmp_path / "cache"),
        guidance_scale=2.0,
        batch_size=2,
        eval_samples=4,
        **kw,
    )
    trainer.fit()
    return tmp_path / "student"


def test_sd_lora_student_loads_into_the_teacher_pipeline(tmp_path, tiny_pipeline_dir, prompt_file):
    teacher = tiny_pipeline_dir("sd")
    adapter = _train(tmp_path, teacher, prompt_file, lora_export_merged=True)
    assert set(load_file(adapter / "pytorch_lora_weights.safetensors")) and all(
        k.startswith("unet.") for k in load_file(adapter / "pytorch_lora_weights.safetensors")
    )
    assert "pipe.load_lora_weights(" in (adapter / "README.md").read_text()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    pipe = DiffusionPipeline.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)
    cond, _ = _text_conditions(pipe, "sd")
    pipe.load_lora_weights(adapter)
    pipe.scheduler = EulerDiscreteScheduler.from_pretrained(adapter, subfolder="scheduler")
    call = dict(
        prompt="a photo of a cat", num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="pt"
    )
    plugged = pipe(**call).images

    # the toolkit's own sampling of the same adapter, with plain peft on the teacher's UNet
    student = Denoiser.from_pretrained(teacher)
    student.model = PeftModel.from_pretrained(student.model, str(adapter))
    sigma0 = float(pipe.scheduler.sigmas[0])
    with torch.no_grad():
        x0 = student_sample(student, z, [sigma0], cond)
        own = (LatentCodec.from_teacher(str(teacher)).decode(x0) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(plugged, own, atol=1e-4, rtol=0)
    teacher_image = DiffusionPipeline.from_pretrained(teacher)
    teacher_image.scheduler = EulerDiscreteScheduler.from_pretrained(adapter, subfolder="scheduler")
    teacher_image.set_progress_bar_config(disable=True)
    assert (teacher_image(**call).images - plugged).abs().max() > 1e-4  # the adapter changed the image

    merged = DiffusionPipeline.from_pretrained(tmp_path / "student_merged")  # plain diffusers, no code
    merged.set_progress_bar_config(disable=True)
    torch.testing.assert_close(merged(**call).images, plugged, atol=1e-4, rtol=0)


def test_sd3_lora_student_uses_the_transformer_prefix(tmp_path, tiny_pipeline_dir, prompt_file):
    teacher = tiny_pipeline_dir("sd3")
    adapter = _train(tmp_path, teacher, prompt_file)
    keys = load_file(adapter / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("transformer.") for k in keys)
    pipe = DiffusionPipeline.from_pretrained(teacher)
    pipe.load_lora_weights(adapter)
    peft_student = Denoiser.from_pretrained(teacher)
    peft_student.model = PeftModel.from_pretrained(peft_student.model, str(adapter))
    cond, _ = _text_conditions(pipe, "sd3")
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_student.velocity(z, 0.6, cond)
        got = Denoiser(pipe.transformer, pipe.scheduler).velocity(z, 0.6, cond)
        base = Denoiser.from_pretrained(teacher).velocity(z, 0.6, cond)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-5
    assert "lora_export_merged=true" in (adapter / "README.md").read_text()  # no standard one-step pipeline
